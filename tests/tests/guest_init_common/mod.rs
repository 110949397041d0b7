//! Shared by the guest-init tests: building the static guest-init, busybox container roots,
//! container specs, and test cases that run the same way against an agent on the host
//! (`guest_init_host.rs`, unix socket) and in a VM (`guest_init_qemu.rs`, hybrid vsock).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::client::{AgentClient, ClientError};
use kiln_protocol::codec::{read_frame, write_frame};
use kiln_protocol::transport::attach_stdio;
use kiln_protocol::{
    AgentMessage, ContainerSpec, ErrorKind, Event, ExitStatus, Hello, HostMessage, MountSpec,
    Namespace, NamespaceKind, ProcessSpec, ProtocolVersion, Request, Resources, Response, RootSpec,
    StdioStream, TtySize, INIT_EXEC_ID,
};
use sha2::{Digest, Sha256};

mod security;
mod signals;
// Each test binary that includes this module runs only some of the cases.
#[allow(unused_imports)]
pub use security::{case_capabilities, case_seccomp};
#[allow(unused_imports)]
pub use signals::case_signal_all;

/// The static musl guest-init (built once, release); `KILN_GUEST_INIT` overrides.
pub fn guest_init_bin() -> PathBuf {
    kiln_tests::e2e::guest_init_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A busybox-static tree at `root` (`/bin/busybox` plus one symlink per applet).
pub fn make_busybox_root(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            let _ = symlink("busybox", root.join("bin").join(applet));
        }
    }
}

fn ns(kinds: &[NamespaceKind]) -> Vec<Namespace> {
    kinds
        .iter()
        .map(|&kind| Namespace { kind, path: None })
        .collect()
}

fn mount(dest: &str, fstype: &str, options: &[&str]) -> MountSpec {
    MountSpec {
        destination: dest.into(),
        fstype: Some(fstype.into()),
        source: Some(fstype.into()),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// A process running `args` with PATH and FOO set.
pub fn process(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into(), "FOO=bar from spec".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// `sh -c script`.
pub fn sh(script: &str) -> ProcessSpec {
    process(&["sh", "-c", script])
}

/// A container spec: busybox root at `/rootfs`, the usual mounts, mount/ipc/uts namespaces and,
/// with `pid_ns`, a pid namespace (without one, orphans come to the agent), running `main`.
pub fn spec(main: ProcessSpec, pid_ns: bool) -> ContainerSpec {
    let mut kinds = vec![NamespaceKind::Mount, NamespaceKind::Ipc, NamespaceKind::Uts];
    if pid_ns {
        kinds.push(NamespaceKind::Pid);
    }
    let mut s = ContainerSpec {
        process: main,
        root: RootSpec {
            path: "/rootfs".into(),
            ..Default::default()
        },
        hostname: Some("kiln-test".into()),
        mounts: vec![
            mount("/proc", "proc", &["nosuid"]),
            mount("/dev", "tmpfs", &["nosuid", "mode=755"]),
            mount("/dev/pts", "devpts", &["newinstance", "ptmxmode=0666"]),
            mount("/tmp", "tmpfs", &["nosuid", "nodev"]),
            mount("/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]),
        ],
        ..Default::default()
    };
    s.linux.namespaces = ns(&kinds);
    s
}

/// A connected agent: how to open new connections, and a control client.
pub struct Target {
    pub connect: Box<dyn Fn() -> UnixStream + Send + Sync>,
    pub client: Arc<AgentClient>,
}

impl Target {
    /// Connects `connect()` and performs the handshake.
    pub fn new(connect: Box<dyn Fn() -> UnixStream + Send + Sync>) -> Target {
        let client =
            Arc::new(AgentClient::connect(connect(), "guest-init-test").expect("handshake"));
        Target { connect, client }
    }

    /// Another control client.
    pub fn new_client(&self) -> Arc<AgentClient> {
        Arc::new(AgentClient::connect((self.connect)(), "guest-init-test").expect("handshake"))
    }

    /// A stdio connection.
    pub fn attach(&self, container: &str, exec: &str, stream: StdioStream) -> UnixStream {
        attach_stdio((self.connect)(), container, exec, stream).expect("attach")
    }

    /// Execs `p`, closes its stdin, collects stdout and stderr, waits: (status, stdout, stderr).
    pub fn run(&self, id: &str, exec: &str, p: ProcessSpec) -> (ExitStatus, String, String) {
        let c = &self.client;
        c.exec(id, exec, p).expect("exec");
        c.close_stdin(id, exec).expect("close stdin");
        let out = self.attach(id, exec, StdioStream::Stdout);
        let err = self.attach(id, exec, StdioStream::Stderr);
        let err_reader = std::thread::spawn(move || read_all(err));
        let out = read_all(out);
        let err = kiln_tests::bounded::join(err_reader, kiln_tests::bounded::WAIT, "stderr");
        let status = c.wait(id, exec).expect("wait");
        (
            status,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    /// Creates and starts a container whose main process sleeps.
    pub fn sleeper(&self, id: &str, pid_ns: bool) {
        self.client
            .create_container(id, spec(process(&["sleep", "1000000"]), pid_ns))
            .expect("create");
        self.client.start(id).expect("start");
    }
}

/// Reads a stream to its end.
pub fn read_all(s: UnixStream) -> Vec<u8> {
    kiln_tests::bounded::read_to_end(&s, kiln_tests::bounded::WAIT, "a stdio stream")
}

/// The kind of an agent error.
pub fn agent_error(e: ClientError) -> ErrorKind {
    match e {
        ClientError::Agent(reply) => reply.kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

fn expect_error(s: &mut UnixStream, kind: ErrorKind) {
    match read_frame::<_, AgentMessage>(s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, kind, "{e}"),
        other => panic!("expected a {kind:?} error, got {other:?}"),
    }
}

/// Version, health, a wrong version, an oversize and a malformed first frame; new connections
/// keep working after each.
pub fn case_handshake_and_bad_openings(t: &Target) {
    t.client.health().unwrap();
    let v = t.client.version().unwrap();
    assert!(v.agent.starts_with("kiln-guest-init"), "{v:?}");

    let mut s = (t.connect)();
    let hello = HostMessage::Hello(Hello {
        version: ProtocolVersion {
            major: 99,
            minor: 0,
        },
        client: "future".into(),
    });
    write_frame(&mut s, &hello).unwrap();
    expect_error(&mut s, ErrorKind::IncompatibleVersion);
    t.new_client().health().unwrap();

    let mut s = (t.connect)();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    expect_error(&mut s, ErrorKind::FrameTooLarge);
    let mut s = (t.connect)();
    s.write_all(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]).unwrap();
    expect_error(&mut s, ErrorKind::MalformedFrame);
    t.client.health().unwrap();
    t.new_client().health().unwrap();
}

/// Prints round-trip numbers: `Health` and exec + wait of `/bin/true`. Uses container `nb1`.
pub fn report_numbers(t: &Target, label: &str) {
    let c = &t.client;
    let n = 100;
    let t0 = Instant::now();
    for _ in 0..n {
        c.health().unwrap();
    }
    let health = t0.elapsed() / n;
    t.sleeper("nb1", true);
    let runs = 20;
    let t0 = Instant::now();
    for i in 0..runs {
        let exec = format!("true{i}");
        c.exec("nb1", &exec, process(&["true"])).unwrap();
        assert_eq!(c.wait("nb1", &exec).unwrap(), ExitStatus::Exited(0));
    }
    let exec = t0.elapsed() / runs;
    c.remove("nb1", true).unwrap();
    eprintln!("{label}: Health round trip {health:?}, exec+wait of /bin/true {exec:?} (means)");
}

/// Malformed and oversize frames after the handshake: error replies, the connection goes on.
pub fn case_bad_frames_on_control_connection(t: &Target) {
    let mut s = (t.connect)();
    let hello = HostMessage::Hello(Hello {
        version: kiln_protocol::PROTOCOL_VERSION,
        client: "raw".into(),
    });
    write_frame(&mut s, &hello).unwrap();
    assert!(matches!(
        read_frame::<_, AgentMessage>(&mut s).unwrap(),
        AgentMessage::HelloOk(_)
    ));
    s.write_all(&[4, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    expect_error(&mut s, ErrorKind::MalformedFrame);
    // A Request with a readable id but an unknown call: answered under that id.
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&77u64.to_le_bytes());
    body.extend_from_slice(&999u32.to_le_bytes());
    s.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&body).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Response {
            id: 77,
            response: Response::Error(e),
        } => assert_eq!(e.kind, ErrorKind::Unsupported, "{e}"),
        other => panic!("expected an error response for id 77, got {other:?}"),
    }
    let health = HostMessage::Request {
        id: 5,
        request: Request::Health,
    };
    write_frame(&mut s, &health).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Response {
            id: 5,
            response: Response::Ok,
        } => {}
        other => panic!("expected Ok for id 5, got {other:?}"),
    }
    s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
    expect_error(&mut s, ErrorKind::FrameTooLarge);
    drop(s);
    t.new_client().health().unwrap();
}

/// Exit codes 0/1/3/137, SIGTERM/SIGKILL, a main process's exit, events, error kinds.
/// Uses containers `ex1` and `ex3`.
pub fn case_exit_codes_signals_and_events(t: &Target) {
    let c = t.new_client();
    let events = c.take_events().expect("event receiver");
    t.sleeper("ex1", true);
    for (exec, script, want) in [
        ("e0", "exit 0", ExitStatus::Exited(0)),
        ("e1", "exit 1", ExitStatus::Exited(1)),
        ("e3", "exit 3", ExitStatus::Exited(3)),
        ("e137", "kill -9 $$", ExitStatus::Signaled(9)),
    ] {
        let (status, _, _) = t.run("ex1", exec, sh(script));
        assert_eq!(status, want, "{script}");
    }
    assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);

    c.exec("ex1", "sleep-term", process(&["sleep", "1000"]))
        .unwrap();
    c.signal("ex1", "sleep-term", 15).unwrap();
    assert_eq!(
        c.wait("ex1", "sleep-term").unwrap(),
        ExitStatus::Signaled(15)
    );
    c.exec("ex1", "sleep-kill", process(&["sleep", "1000"]))
        .unwrap();
    c.signal("ex1", "sleep-kill", 9).unwrap();
    assert_eq!(
        c.wait("ex1", "sleep-kill").unwrap(),
        ExitStatus::Signaled(9)
    );

    // The main process: stdio attached between create and start, output complete at exit.
    c.create_container(
        "ex3",
        spec(sh("echo main-out; echo main-err >&2; exit 3"), true),
    )
    .unwrap();
    let out = t.attach("ex3", INIT_EXEC_ID, StdioStream::Stdout);
    let err = t.attach("ex3", INIT_EXEC_ID, StdioStream::Stderr);
    c.close_stdin("ex3", INIT_EXEC_ID).unwrap();
    c.start("ex3").unwrap();
    assert_eq!(c.wait("ex3", INIT_EXEC_ID).unwrap(), ExitStatus::Exited(3));
    assert_eq!(read_all(out), b"main-out\n");
    assert_eq!(read_all(err), b"main-err\n");
    assert_eq!(
        agent_error(c.start("ex3").unwrap_err()),
        ErrorKind::InvalidState
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let want_c3 = ("ex3".to_string(), String::new(), ExitStatus::Exited(3));
    let want_137 = (
        "ex1".to_string(),
        "e137".to_string(),
        ExitStatus::Signaled(9),
    );
    while !(seen.contains(&want_c3) && seen.contains(&want_137)) && Instant::now() < deadline {
        if let Ok(Event::ProcessExited {
            container_id,
            exec_id,
            status,
        }) = events.recv_timeout(Duration::from_millis(200))
        {
            seen.push((container_id, exec_id, status));
        }
    }
    assert!(
        seen.contains(&want_c3) && seen.contains(&want_137),
        "{seen:?}"
    );

    assert_eq!(
        agent_error(c.wait("nope", "").unwrap_err()),
        ErrorKind::NotFound
    );
    assert_eq!(
        agent_error(c.exec("ex1", "e0", sh("true")).unwrap_err()),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        agent_error(c.remove("ex1", false).unwrap_err()),
        ErrorKind::InvalidState
    );
    c.remove("ex1", true).unwrap();
    c.remove("ex3", false).unwrap();
    assert_eq!(
        agent_error(c.stats("ex1").unwrap_err()),
        ErrorKind::NotFound
    );
}

/// stdout/stderr apart, 8 MiB stdin -> cat -> stdout with matching sha256, CloseStdin.
/// Uses container `io1`.
pub fn case_stdio(t: &Target) {
    let c = &t.client;
    t.sleeper("io1", true);
    let (status, out, err) = t.run("io1", "apart", sh("echo out; echo err >&2; exit 0"));
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");

    c.exec("io1", "cat", process(&["cat"])).unwrap();
    let mut stdin = t.attach("io1", "cat", StdioStream::Stdin);
    let stdout = t.attach("io1", "cat", StdioStream::Stdout);
    // A second attach of the same stream is refused with an error frame.
    assert!(attach_stdio((t.connect)(), "io1", "cat", StdioStream::Stdout).is_err());
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&data);
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let started = Instant::now();
    let got = read_all(stdout);
    let took = started.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert_eq!(Sha256::digest(&got), want);
    assert_eq!(c.wait("io1", "cat").unwrap(), ExitStatus::Exited(0));
    eprintln!(
        "8 MiB stdin->cat->stdout in {took:?} ({:.1} MB/s each way)",
        8.0 * 1.048_576 / took.as_secs_f64()
    );

    c.exec("io1", "close", sh("cat; echo done")).unwrap();
    let out = t.attach("io1", "close", StdioStream::Stdout);
    c.close_stdin("io1", "close").unwrap();
    assert_eq!(read_all(out), b"done\n");
    assert_eq!(c.wait("io1", "close").unwrap(), ExitStatus::Exited(0));
    c.remove("io1", true).unwrap();
}

/// 20 execs at once, each with its own output and exit code. Uses container `cc1`.
pub fn case_twenty_concurrent_execs(t: &Arc<Target>) {
    t.sleeper("cc1", true);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let script = format!("sleep 0.3; echo exec-{i}; exit {}", i % 7);
                t.run("cc1", &format!("x{i}"), sh(&script))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, out, _) = h.join().unwrap();
        assert_eq!(status, ExitStatus::Exited(i as i32 % 7));
        assert_eq!(out, format!("exec-{i}\n"));
    }
    t.client.remove("cc1", true).unwrap();
}

/// 500 orphans in a container without a pid namespace: they come to the agent. Returns after the
/// spawning process exited; the caller checks for zombies its own way. Uses container `rp1`.
pub fn case_spawn_500_orphans(t: &Target) {
    t.sleeper("rp1", false);
    let script = "i=0; while [ $i -lt 500 ]; do (true &); i=$((i+1)); done; echo spawned";
    let (status, out, _) = t.run("rp1", "orphans", sh(script));
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(out, "spawned\n");
}

/// env, hostname, cwd, uid/gid and the pid namespace of an exec. Uses container `en1`.
pub fn case_env_hostname_user(t: &Target) {
    t.sleeper("en1", true);
    let mut p = sh("echo \"$FOO\"; hostname; pwd; id -u; id -g; echo $$");
    p.cwd = "/tmp".into();
    p.user.uid = 1234;
    p.user.gid = 567;
    let (status, out, err) = t.run("en1", "env", p);
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        ["bar from spec", "kiln-test", "/tmp", "1234", "567"]
    );
    let pid: u32 = lines[5].parse().unwrap();
    assert!(
        pid > 1 && pid < 100,
        "pid {pid} is not in the container's pid namespace"
    );
    t.client.remove("en1", true).unwrap();
}

/// Reads `pty` until `needle` shows up in what was read (20 s read timeout each).
fn read_pty_until(pty: &mut UnixStream, seen: &mut Vec<u8>, needle: &str) {
    pty.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let n = match pty.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("pty: {e}; got so far: {:?}", String::from_utf8_lossy(seen)),
        };
        assert!(n > 0, "pty closed early: {}", String::from_utf8_lossy(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A terminal process: initial size, ResizeTty, input through the pty, and `tty` naming the
/// container's own `/dev/pts/N` (the pty comes from the container's devpts), for an exec'd
/// process and for a container's main process; a container without devpts still gets a working
/// terminal. Uses containers `tt1`, `tt2` and `tt3`.
pub fn case_terminal(t: &Target) {
    let c = &t.client;
    // The main process on a terminal: attached before start, as runc clients do.
    let mut main = sh("tty; stty size; ls /dev/pts; echo main-done");
    main.terminal = true;
    main.console_size = Some(TtySize { rows: 33, cols: 77 });
    c.create_container("tt2", spec(main, true)).unwrap();
    let mut pty = t.attach("tt2", INIT_EXEC_ID, StdioStream::Pty);
    c.start("tt2").unwrap();
    let mut seen = Vec::new();
    read_pty_until(&mut pty, &mut seen, "main-done");
    let text = String::from_utf8_lossy(&seen).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first().copied(), Some("/dev/pts/0"), "{text}");
    assert_eq!(lines.get(1).copied(), Some("33 77"), "{text}");
    assert_eq!(c.wait("tt2", INIT_EXEC_ID).unwrap(), ExitStatus::Exited(0));
    c.remove("tt2", true).unwrap();

    // A container without a /dev tmpfs and devpts has no /dev/ptmx: the terminal still works
    // (a guest pty), only `tty` names no path there.
    let mut bare = sh("stty size; echo fallback-done");
    bare.terminal = true;
    bare.console_size = Some(TtySize { rows: 21, cols: 42 });
    let mut s = spec(bare, true);
    s.mounts.retain(|m| !m.destination.starts_with("/dev"));
    c.create_container("tt3", s).unwrap();
    let mut pty = t.attach("tt3", INIT_EXEC_ID, StdioStream::Pty);
    c.start("tt3").unwrap();
    let mut seen = Vec::new();
    read_pty_until(&mut pty, &mut seen, "fallback-done");
    assert!(String::from_utf8_lossy(&seen).contains("21 42"));
    assert_eq!(c.wait("tt3", INIT_EXEC_ID).unwrap(), ExitStatus::Exited(0));
    c.remove("tt3", true).unwrap();

    t.sleeper("tt1", true);
    let mut p = sh("tty; stty size; read line; stty size; echo got-$line");
    p.terminal = true;
    p.console_size = Some(TtySize {
        rows: 40,
        cols: 100,
    });
    c.exec("tt1", "tty", p).unwrap();
    let mut pty = t.attach("tt1", "tty", StdioStream::Pty);
    pty.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("40 100") {
        let n = match pty.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("pty: {e}; got so far: {:?}", String::from_utf8_lossy(&seen)),
        };
        assert!(
            n > 0,
            "pty closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    c.resize_tty(
        "tt1",
        "tty",
        TtySize {
            rows: 50,
            cols: 120,
        },
    )
    .unwrap();
    pty.write_all(b"hello\n").unwrap();
    loop {
        let n = match pty.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("pty: {e}; got so far: {:?}", String::from_utf8_lossy(&seen)),
        };
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("50 120") && text.contains("got-hello"),
        "{text}"
    );
    // The exec'd process's pty is in the container's devpts too (the main one has none).
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.trim() == "/dev/pts/0"),
        "`tty` should name the container's /dev/pts/0: {text}"
    );
    assert_eq!(c.wait("tt1", "tty").unwrap(), ExitStatus::Exited(0));
    assert!(attach_stdio((t.connect)(), "tt1", "tty", StdioStream::Stdout).is_err());
    c.remove("tt1", true).unwrap();
}

/// `pids.max` and `memory.max` from the spec: forks fail beyond the limit, an allocating process
/// is OOM-killed and reported, the agent survives. Uses container `lim`.
pub fn case_cgroup_limits(t: &Target) {
    let c = t.new_client();
    let events = c.take_events().unwrap();
    let mut s = spec(process(&["sleep", "1000000"]), true);
    s.linux.resources = Resources {
        memory_limit: Some(32 << 20),
        pids_limit: Some(16),
        ..Default::default()
    };
    c.create_container("lim", s).unwrap();
    c.start("lim").unwrap();
    let stats = c.stats("lim").unwrap();
    assert_eq!(stats.pids_max, Some(16));
    assert_eq!(stats.memory_max, Some(32 << 20));
    let script = "for i in $(seq 40); do sleep 5 & done; echo spawned";
    let (_, out, err) = t.run("lim", "forks", sh(script));
    let stats = c.stats("lim").unwrap();
    assert!(stats.pids_current <= 16, "{stats:?}");
    assert!(
        err.contains("fork") || err.contains("Resource temporarily unavailable"),
        "no fork failure under pids.max=16: stdout {out:?} stderr {err:?}"
    );
    // dd allocates its 200 MiB block and fills it from /dev/zero: far above memory.max.
    let hog = process(&["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"]);
    let (status, out, err) = t.run("lim", "hog", hog);
    assert_eq!(status, ExitStatus::Signaled(9), "{out} {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut oom = false;
    while !oom && Instant::now() < deadline {
        oom = matches!(
            events.recv_timeout(Duration::from_millis(100)),
            Ok(Event::OomKilled { ref container_id }) if container_id == "lim"
        );
    }
    assert!(oom, "no OomKilled event");
    assert!(c.stats("lim").unwrap().oom_kills >= 1);
    c.health().unwrap();
    c.remove("lim", true).unwrap();
}

/// rlimits, umask, supplementary groups, no_new_privs, oom_score_adj, a read-only root, masked
/// and read-only paths, sysctl. Uses container `ps1`.
pub fn case_process_settings(t: &Target) {
    let c = &t.client;
    let mut s = spec(process(&["sleep", "1000000"]), true);
    s.root.readonly = true;
    s.linux.masked_paths = vec![
        "/proc/version".into(),
        "/sys/kernel".into(),
        "/nonexistent".into(),
    ];
    s.linux.readonly_paths = vec!["/proc/sys".into()];
    s.linux.namespaces.push(Namespace {
        kind: NamespaceKind::Network,
        path: None,
    });
    s.linux
        .sysctl
        .insert("net.ipv4.ip_forward".into(), "1".into());
    c.create_container("ps1", s).unwrap();
    c.start("ps1").unwrap();
    let mut p = sh("ulimit -n; ulimit -Hn; umask; id -G; \
                    grep NoNewPrivs /proc/self/status | tr -d '\\t '; cat /proc/self/oom_score_adj; \
                    touch /rootfile 2>/dev/null && echo root-rw || echo root-ro; \
                    touch /tmp/x && echo tmp-rw; \
                    wc -c < /proc/version; ls /sys/kernel | wc -l; \
                    echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo sys-rw || echo sys-ro; \
                    cat /proc/sys/net/ipv4/ip_forward; cat /sys/class/net/lo/flags");
    p.rlimits = vec![kiln_protocol::Rlimit {
        kind: "RLIMIT_NOFILE".into(),
        soft: 77,
        hard: 99,
    }];
    p.user.umask = Some(0o027);
    p.user.additional_gids = vec![10, 20];
    p.no_new_privileges = true;
    p.oom_score_adj = Some(123);
    let (status, out, err) = t.run("ps1", "settings", p);
    assert_eq!(status, ExitStatus::Exited(0), "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "77",
            "99",
            "0027",
            "0 10 20",
            "NoNewPrivs:1",
            "123",
            "root-ro",
            "tmp-rw",
            "0",
            "0",
            "sys-ro",
            "1",
            "0x9"
        ],
        "stderr: {err}"
    );
    c.remove("ps1", true).unwrap();
}

/// Bad specs and failing execs get clear errors and leave nothing behind.
pub fn case_bad_specs(t: &Target) {
    let c = &t.client;
    let mut s = spec(process(&["true"]), true);
    s.process.cwd = "relative".into();
    assert_eq!(
        agent_error(c.create_container("bad1", s).unwrap_err()),
        ErrorKind::InvalidArgument
    );
    let mut s = spec(process(&["true"]), true);
    s.linux
        .namespaces
        .retain(|n| n.kind != NamespaceKind::Mount);
    assert_eq!(
        agent_error(c.create_container("bad1", s).unwrap_err()),
        ErrorKind::InvalidArgument
    );
    let mut s = spec(process(&["true"]), true);
    s.mounts[0].destination = "/../../etc".into();
    assert_eq!(
        agent_error(c.create_container("bad1", s).unwrap_err()),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        agent_error(
            c.create_container("../x", spec(process(&["true"]), true))
                .unwrap_err()
        ),
        ErrorKind::InvalidArgument
    );
    // A program that does not exist: Start fails and names the problem.
    c.create_container("bad2", spec(process(&["/no/such/program"]), true))
        .unwrap();
    match c.start("bad2").unwrap_err() {
        ClientError::Agent(e) => assert!(e.message.contains("executing"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.wait("bad2", INIT_EXEC_ID).unwrap(),
        ExitStatus::Exited(127)
    );
    c.remove("bad2", false).unwrap();
    // The same id can be used again after a failed create and after remove.
    t.sleeper("bad1", true);
    match c
        .exec("bad1", "nx", process(&["nonexistent-program"]))
        .unwrap_err()
    {
        ClientError::Agent(e) => assert!(e.message.contains("No such file"), "{e}"),
        other => panic!("{other:?}"),
    }
    let (status, _, _) = t.run("bad1", "nx", sh("exit 4"));
    assert_eq!(status, ExitStatus::Exited(4));
    c.remove("bad1", true).unwrap();
    t.sleeper("bad1", true);
    c.remove("bad1", true).unwrap();
}
