//! guest-init as a host process: the protocol server and process management, no VM and no KVM.
//!
//! Each test starts its own agent, the static musl `guest-init` binary, as PID 1 of fresh pid and
//! mount namespaces (`unshare --pid --mount --fork --mount-proc --kill-child`), listening on a
//! unix socket, with `--root <tmp>` standing for the guest's `/` and a busybox-static container
//! root at `<tmp>/rootfs`. Tests drive it with `kiln_protocol::client`, like the host does.
//!
//! Needs root (namespaces, mounts, cgroups). The cgroup limit test needs cgroup v2 with the
//! memory and pids controllers delegated; without them it says so loudly and skips.

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_protocol::client::{AgentClient, ClientError};
use kiln_protocol::codec::{read_frame, write_frame};
use kiln_protocol::transport::attach_stdio;
use kiln_protocol::{
    AgentMessage, ContainerSpec, ErrorKind, Event, ExitStatus, Hello, HostMessage, MountSpec,
    Namespace, NamespaceKind, ProcessSpec, ProtocolVersion, Request, Resources, Response, RootSpec,
    StdioStream, TtySize, INIT_EXEC_ID,
};
use kiln_tests::guests::{target_dir, TempDir};
use sha2::{Digest, Sha256};

/// Builds (once) and returns the static musl guest-init; `KILN_GUEST_INIT` overrides.
fn guest_init_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_GUEST_INIT") {
            return Ok(PathBuf::from(p));
        }
        let target = target_dir().map_err(|e| format!("{e:#}"))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let release = exe.components().any(|c| c.as_os_str() == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(kiln_tests::workspace_root()).args([
            "build",
            "-p",
            "kiln-guest-init",
            "--target",
            "x86_64-unknown-linux-musl",
        ]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd
            .arg("--target-dir")
            .arg(&target)
            .output()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building guest-init failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let profile = if release { "release" } else { "debug" };
        Ok(target
            .join("x86_64-unknown-linux-musl")
            .join(profile)
            .join("guest-init"))
    });
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The cgroup v2 directory tests may create cgroups in, if any.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// A running agent with its scratch directory and cgroup base.
struct Agent {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
    cgroup_base: Option<PathBuf>,
}

impl Agent {
    fn start(tag: &str) -> Agent {
        let dir = TempDir::new(&format!("gi-{tag}"));
        make_busybox_root(&dir.path().join("rootfs"));
        let socket = dir.path().join("agent.sock");
        let cgroup_base =
            cgroup2_root().map(|r| r.join(format!("kiln-test-{}-{tag}", std::process::id())));
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--mount", "--fork", "--mount-proc", "--kill-child"])
            .arg(guest_init_bin())
            .arg("--root")
            .arg(dir.path())
            .arg("--listen-unix")
            .arg(&socket)
            .args(["--log-level", "debug"]);
        if let Some(cg) = &cgroup_base {
            cmd.arg("--cgroup-base").arg(cg);
        }
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawning unshare + guest-init");
        let agent = Agent {
            child,
            dir,
            socket,
            cgroup_base,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent did not listen: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).expect("connecting to the agent")
    }

    fn client(&self) -> Arc<AgentClient> {
        Arc::new(AgentClient::connect(self.connect(), "guest-init-test").expect("handshake"))
    }

    fn attach(&self, container: &str, exec: &str, stream: StdioStream) -> UnixStream {
        attach_stdio(self.connect(), container, exec, stream).expect("attach")
    }

    /// guest-init's pid as the host sees it (the child of `unshare`).
    fn agent_host_pid(&self) -> u32 {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("guest-init process under unshare")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(base) = &self.cgroup_base {
            // Processes die with the pid namespace; cgroups empty shortly after.
            for _ in 0..100 {
                if let Ok(rd) = std::fs::read_dir(base) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                if std::fs::remove_dir(base).is_ok() || !base.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
    }
}

fn make_busybox_root(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
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

fn process(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into(), "FOO=bar from spec".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ProcessSpec {
    process(&["sh", "-c", script])
}

/// A container spec: busybox root, the usual mounts, pid/mount/ipc/uts namespaces (or no pid
/// namespace, so orphans come to the agent), running `main`.
fn spec(main: ProcessSpec, pid_ns: bool) -> ContainerSpec {
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
            mount("/dev", "tmpfs", &["nosuid", "mode=755"]),
            mount("/dev/pts", "devpts", &["newinstance", "ptmxmode=0666"]),
            mount("/tmp", "tmpfs", &["nosuid", "nodev"]),
            mount("/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]),
        ],
        ..Default::default()
    };
    if pid_ns {
        s.mounts.insert(0, mount("/proc", "proc", &["nosuid"]));
    }
    s.linux.namespaces = ns(&kinds);
    s
}

/// Creates and starts a container whose main process sleeps.
fn sleeper(client: &AgentClient, id: &str, pid_ns: bool) {
    client
        .create_container(id, spec(process(&["sleep", "1000000"]), pid_ns))
        .expect("create");
    client.start(id).expect("start");
}

fn read_all(mut s: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading stdio");
    out
}

/// Execs `p`, collects stdout and stderr, waits: (status, stdout, stderr).
fn run(
    agent: &Agent,
    c: &AgentClient,
    id: &str,
    exec: &str,
    p: ProcessSpec,
) -> (ExitStatus, String, String) {
    c.exec(id, exec, p).expect("exec");
    c.close_stdin(id, exec).expect("close stdin");
    let out = agent.attach(id, exec, StdioStream::Stdout);
    let err = agent.attach(id, exec, StdioStream::Stderr);
    let err_reader = std::thread::spawn(move || read_all(err));
    let out = read_all(out);
    let err = err_reader.join().unwrap();
    let status = c.wait(id, exec).expect("wait");
    (
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn agent_error(e: ClientError) -> ErrorKind {
    match e {
        ClientError::Agent(reply) => reply.kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn handshake_version_health_and_bad_openings() {
    let agent = Agent::start("hello");
    let c = agent.client();
    c.health().unwrap();
    let v = c.version().unwrap();
    assert!(v.agent.starts_with("kiln-guest-init"), "{v:?}");

    // Wrong major version: an error reply, then a new connection works.
    let mut s = agent.connect();
    let hello = HostMessage::Hello(Hello {
        version: ProtocolVersion {
            major: 99,
            minor: 0,
        },
        client: "future".into(),
    });
    write_frame(&mut s, &hello).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::IncompatibleVersion, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    agent.client().health().unwrap();

    // An oversize length as the very first frame.
    let mut s = agent.connect();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::FrameTooLarge, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // Garbage as the first frame.
    let mut s = agent.connect();
    s.write_all(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::MalformedFrame, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    c.health().unwrap();
    agent.client().health().unwrap();
}

#[test]
fn malformed_and_oversize_frames_on_a_control_connection() {
    let agent = Agent::start("frames");
    let mut s = agent.connect();
    let hello = HostMessage::Hello(Hello {
        version: kiln_protocol::PROTOCOL_VERSION,
        client: "raw".into(),
    });
    write_frame(&mut s, &hello).unwrap();
    assert!(matches!(
        read_frame::<_, AgentMessage>(&mut s).unwrap(),
        AgentMessage::HelloOk(_)
    ));
    // A body that is no message at all.
    s.write_all(&[4, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::MalformedFrame, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // A Request whose id is readable but whose call is unknown: answered under that id.
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
    // The same connection still serves calls.
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
    // An oversize length: error reply; the agent skips what follows.
    s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
    match read_frame::<_, AgentMessage>(&mut s).unwrap() {
        AgentMessage::Error(e) => assert_eq!(e.kind, ErrorKind::FrameTooLarge, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    drop(s);
    agent.client().health().unwrap();
}

#[test]
fn exit_codes_signals_and_events() {
    let agent = Agent::start("exit");
    let c = agent.client();
    let events = c.take_events().expect("event receiver");
    sleeper(&c, "c1", true);
    for (exec, script, want) in [
        ("e0", "exit 0", ExitStatus::Exited(0)),
        ("e1", "exit 1", ExitStatus::Exited(1)),
        ("e3", "exit 3", ExitStatus::Exited(3)),
        ("e137", "kill -9 $$", ExitStatus::Signaled(9)),
    ] {
        let (status, _, _) = run(&agent, &c, "c1", exec, sh(script));
        assert_eq!(status, want, "{script}");
    }
    assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);

    // SignalProcess: SIGTERM and SIGKILL to exec'd processes.
    c.exec("c1", "sleep-term", process(&["sleep", "1000"]))
        .unwrap();
    c.signal("c1", "sleep-term", 15).unwrap();
    assert_eq!(
        c.wait("c1", "sleep-term").unwrap(),
        ExitStatus::Signaled(15)
    );
    c.exec("c1", "sleep-kill", process(&["sleep", "1000"]))
        .unwrap();
    c.signal("c1", "sleep-kill", 9).unwrap();
    assert_eq!(c.wait("c1", "sleep-kill").unwrap(), ExitStatus::Signaled(9));

    // The main process of a container exiting with 3.
    c.create_container("c3", spec(sh("exit 3"), true)).unwrap();
    c.start("c3").unwrap();
    assert_eq!(c.wait("c3", INIT_EXEC_ID).unwrap(), ExitStatus::Exited(3));

    // Every exit came as an event too.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 7 && Instant::now() < deadline {
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
        seen.contains(&("c3".into(), "".into(), ExitStatus::Exited(3))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("c1".into(), "e137".into(), ExitStatus::Signaled(9))),
        "{seen:?}"
    );

    // Errors: unknown container, duplicate exec id, remove while running.
    assert_eq!(
        agent_error(c.wait("nope", "").unwrap_err()),
        ErrorKind::NotFound
    );
    assert_eq!(
        agent_error(c.exec("c1", "e0", sh("true")).unwrap_err()),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        agent_error(c.remove("c1", false).unwrap_err()),
        ErrorKind::InvalidState
    );
    c.remove("c1", true).unwrap();
    c.remove("c3", false).unwrap();
    assert_eq!(agent_error(c.stats("c1").unwrap_err()), ErrorKind::NotFound);
}

#[test]
fn stdio_apart_and_8mib_through_stdin_and_stdout() {
    let agent = Agent::start("stdio");
    let c = agent.client();
    sleeper(&c, "c1", true);
    let (status, out, err) = run(
        &agent,
        &c,
        "c1",
        "apart",
        sh("echo out; echo err >&2; exit 0"),
    );
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");

    c.exec("c1", "cat", process(&["cat"])).unwrap();
    let mut stdin = agent.attach("c1", "cat", StdioStream::Stdin);
    let stdout = agent.attach("c1", "cat", StdioStream::Stdout);
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&data);
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let got = read_all(stdout);
    writer.join().unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert_eq!(Sha256::digest(&got), want);
    assert_eq!(c.wait("c1", "cat").unwrap(), ExitStatus::Exited(0));

    // CloseStdin ends a reader that has no stdin connection.
    c.exec("c1", "close", sh("cat; echo done")).unwrap();
    let out = agent.attach("c1", "close", StdioStream::Stdout);
    c.close_stdin("c1", "close").unwrap();
    assert_eq!(read_all(out), b"done\n");
    assert_eq!(c.wait("c1", "close").unwrap(), ExitStatus::Exited(0));
}

#[test]
fn twenty_concurrent_execs() {
    let agent = Arc::new(Agent::start("concurrent"));
    let c = agent.client();
    sleeper(&c, "c1", true);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (agent, c) = (agent.clone(), c.clone());
            std::thread::spawn(move || {
                let script = format!("sleep 0.3; echo exec-{i}; exit {}", i % 7);
                run(&agent, &c, "c1", &format!("x{i}"), sh(&script))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, out, _) = h.join().unwrap();
        assert_eq!(status, ExitStatus::Exited(i as i32 % 7));
        assert_eq!(out, format!("exec-{i}\n"));
    }
}

fn zombies_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        if field("PPid:") == ppid.to_string() && field("State:").starts_with('Z') {
            out.push(pid);
        }
    }
    out
}

#[test]
fn five_hundred_orphans_are_reaped() {
    let agent = Agent::start("reap");
    let c = agent.client();
    // No pid namespace: the orphans are re-parented to the agent, which must reap them.
    sleeper(&c, "c1", false);
    let script = "i=0; while [ $i -lt 500 ]; do (true &); i=$((i+1)); done; echo spawned";
    let (status, out, _) = run(&agent, &c, "c1", "orphans", sh(script));
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(out, "spawned\n");
    let host_pid = agent.agent_host_pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let z = zombies_of(host_pid);
        if z.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "zombies left: {z:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent still works afterwards.
    let (status, _, _) = run(&agent, &c, "c1", "after", sh("exit 0"));
    assert_eq!(status, ExitStatus::Exited(0));
}

#[test]
fn env_hostname_cwd_and_user_applied() {
    let agent = Agent::start("env");
    let c = agent.client();
    sleeper(&c, "c1", true);
    let mut p = sh("echo \"$FOO\"; hostname; pwd; id -u; id -g; echo $$");
    p.cwd = "/tmp".into();
    p.user.uid = 1234;
    p.user.gid = 567;
    let (status, out, err) = run(&agent, &c, "c1", "env", p);
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        ["bar from spec", "kiln-test", "/tmp", "1234", "567"]
    );
    // In the container's pid namespace, pid 1 is the main process: an exec gets a small pid.
    let pid: u32 = lines[5].parse().unwrap();
    assert!(pid > 1 && pid < 100, "pid {pid}");
}

#[test]
fn terminal_process_gets_a_pty_and_resizes() {
    let agent = Agent::start("tty");
    let c = agent.client();
    sleeper(&c, "c1", true);
    let mut p = sh("stty size; read line; stty size; echo got-$line");
    p.terminal = true;
    p.console_size = Some(TtySize {
        rows: 40,
        cols: 100,
    });
    c.exec("c1", "tty", p).unwrap();
    let mut pty = agent.attach("c1", "tty", StdioStream::Pty);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("40 100") {
        let n = pty.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "pty closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    c.resize_tty(
        "c1",
        "tty",
        TtySize {
            rows: 50,
            cols: 120,
        },
    )
    .unwrap();
    pty.write_all(b"hello\n").unwrap();
    loop {
        let n = pty.read(&mut buf).unwrap_or(0);
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
    assert_eq!(c.wait("c1", "tty").unwrap(), ExitStatus::Exited(0));
    // A terminal process has no separate stdout.
    assert!(attach_stdio(agent.connect(), "c1", "tty", StdioStream::Stdout).is_err());
}

#[test]
fn cgroup_pids_and_memory_limits() {
    let agent = Agent::start("cgroup");
    let Some(base) = agent.cgroup_base.clone() else {
        eprintln!("!!! SKIPPED cgroup_pids_and_memory_limits: no cgroup v2 hierarchy here");
        return;
    };
    let controllers =
        std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    if !(controllers.contains("memory") && controllers.contains("pids")) {
        eprintln!(
            "\n!!! SKIPPED cgroup_pids_and_memory_limits: cgroup v2 at {} has controllers \
             `{}`, not memory and pids (cgroup v1 host?). The guest kernel has them; the QEMU \
             end-to-end tests cover the limits.\n",
            base.display(),
            controllers.trim()
        );
        return;
    }
    let c = agent.client();
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
    let (_, out, _) = run(
        &agent,
        &c,
        "lim",
        "forks",
        sh("n=0; for i in $(seq 40); do sleep 2 & n=$((n+1)); done 2>/dev/null; echo started"),
    );
    let stats = c.stats("lim").unwrap();
    assert!(stats.pids_current <= 16, "{stats:?} {out}");
    let (status, _, _) = run(
        &agent,
        &c,
        "lim",
        "hog",
        sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"),
    );
    assert!(
        matches!(status, ExitStatus::Signaled(9) | ExitStatus::Exited(137)),
        "{status:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut oom = false;
    while !oom && Instant::now() < deadline {
        oom = matches!(
            events.recv_timeout(Duration::from_millis(100)),
            Ok(Event::OomKilled { ref container_id }) if container_id == "lim"
        );
    }
    assert!(oom, "no OomKilled event");
    c.health().unwrap();
}
