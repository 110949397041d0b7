//! `host-vmm -- CMD` (issue 3 item 4).
//!
//! - Relay tests (no KVM): host-vmm's run session (`host_vmm::run::session`: the default spec,
//!   CreateContainer, stdio attach, start, byte relay, signal forwarding, wait) against guest-init
//!   running as a host process (PID 1 of fresh pid and mount namespaces, listening on a unix
//!   socket, `--root` standing for the image with a busybox container at `/rootfs`): exit codes,
//!   stdout and stderr apart, stdin piped with EOF, signals, a terminal on a host pty (raw mode
//!   and its restoration, initial size, resize). One run happens in a re-executed copy of this
//!   test binary under the client seccomp filter in kill mode.
//! - End to end: the `host-vmm` binary booting kiln's kernel with guest-init as PID 1 from a
//!   rootfs-builder image. Not on a PVM host (`/sys/module/kvm_pvm`): a boot takes minutes there,
//!   so `pvm_agent.rs` covers the run mode in the same single boot as its agent cases.
//! - CLI errors of the run mode (no KVM).
//!
//! Needs root for the relay tests (namespaces, mounts).

mod guest_init_common;

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_init_common as common;
use host_vmm::run::session::{
    self, Control, ControlChannel, HostStdio, SessionEnd, UnixAgent, CONTAINER_ID,
};
use host_vmm::run::spec::command_spec;
use kiln_protocol::{AgentClient, ExitStatus};
use kiln_tests::guests::{host_vmm, run_with_timeout, TempDir};
use sha2::{Digest, Sha256};

/// guest-init as a host process.
struct HostAgent {
    child: Child,
    /// Kills the agent after `host_agent::LIFETIME`: every client call, stdio read and wait on
    /// it then ends, so a hang fails the test instead of blocking it forever.
    _watchdog: kiln_tests::bounded::Watchdog,
    dir: TempDir,
    socket: PathBuf,
    cgroup_base: PathBuf,
}

impl HostAgent {
    fn start(tag: &str) -> HostAgent {
        let dir = TempDir::new(&format!("run-{tag}"));
        common::make_busybox_root(&dir.path().join("rootfs"));
        let socket = dir.path().join("agent.sock");
        // A cgroup base of its own: the container id is the same in every test.
        let cgroup_base = PathBuf::from(format!(
            "/sys/fs/cgroup/kiln-test-run-{}-{tag}",
            std::process::id()
        ));
        // The guest's /dev/pts, which the default spec binds into the container, is the host's
        // here: bound into the agent's root inside its own mount namespace only.
        let (child, watchdog) = kiln_tests::host_agent::launch(&kiln_tests::host_agent::Launch {
            bin: common::guest_init_bin(),
            root: dir.path().to_path_buf(),
            socket: socket.clone(),
            cgroup_base: Some(cgroup_base.clone()),
            log_level: None,
            bind_dev_pts: true,
        });
        HostAgent {
            _watchdog: watchdog,
            child,
            dir,
            socket,
            cgroup_base,
        }
    }

    fn log(&self) -> String {
        kiln_tests::host_agent::log(self.dir.path())
    }

    fn connector(&self) -> UnixAgent {
        UnixAgent {
            path: self.socket.clone(),
        }
    }

    fn client(&self) -> Arc<AgentClient> {
        let s = UnixStream::connect(&self.socket).expect("connecting to the agent");
        Arc::new(AgentClient::connect(s, "vmm-run-test").expect("handshake"))
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kiln_tests::host_agent::remove_cgroup_base(&self.cgroup_base);
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
    }
}

/// What one run produced.
struct Ran {
    end: SessionEnd,
    /// Time in the session (create to exit and drained output).
    took: Duration,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Ran {
    fn code(&self) -> i32 {
        match &self.end {
            SessionEnd::Exited(status) => status.shell_code(),
            other => panic!("process did not exit: {other:?}"),
        }
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `args` through host-vmm's session on `agent` with `input` as stdin; `controls` are sent
/// on the session's channel after the given delays. Removes the container afterwards.
fn run_on(
    agent: &HostAgent,
    client: &Arc<AgentClient>,
    args: &[&str],
    input: &[u8],
    controls: Vec<(Duration, Control)>,
) -> Ran {
    let scratch = TempDir::new("run-io");
    let (inp, out, err) = (
        scratch.path().join("in"),
        scratch.path().join("out"),
        scratch.path().join("err"),
    );
    std::fs::write(&inp, input).unwrap();
    let stdio = HostStdio {
        stdin: File::open(&inp).unwrap(),
        stdout: File::create(&out).unwrap(),
        stderr: File::create(&err).unwrap(),
        terminal: false,
    };
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let channel = ControlChannel::new();
    let tx = channel.sender();
    std::thread::spawn(move || {
        for (delay, control) in controls {
            std::thread::sleep(delay);
            if tx.send(control).is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let end = session::run(
        client,
        &agent.connector(),
        command_spec(&args, None),
        stdio,
        channel,
    )
    .unwrap_or_else(|e| panic!("session: {}", kiln_protocol::error_chain(&e)));
    let took = t.elapsed();
    if !matches!(end, SessionEnd::Exited(_)) {
        // Still running (the session was cut short): kill it and wait, so the id is free.
        let _ = client.signal(CONTAINER_ID, "", libc::SIGKILL);
        let status = client
            .wait(CONTAINER_ID, "")
            .expect("waiting for the killed process");
        assert_eq!(status, ExitStatus::Signaled(libc::SIGKILL));
    }
    // Right after the exit the agent may fail to remove the cgroup (still busy) yet forget
    // the container (NotFound afterwards): either way the id is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.remove(CONTAINER_ID, true) {
            Ok(()) => break,
            Err(kiln_protocol::ClientError::Agent(e))
                if e.kind == kiln_protocol::ErrorKind::NotFound =>
            {
                break
            }
            Err(e) => assert!(Instant::now() < deadline, "removing the container: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ran {
        end,
        took,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn sh(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

#[test]
fn relay_exit_codes_and_stdout_stderr_apart() {
    let agent = HostAgent::start("codes");
    let c = agent.client();
    let r = run_on(&agent, &c, &sh("echo hi; exit 3"), b"", vec![]);
    assert_eq!(
        (r.code(), r.out(), r.err()),
        (3, "hi\n".into(), String::new())
    );
    for code in [0, 1] {
        let r = run_on(&agent, &c, &sh(&format!("exit {code}")), b"", vec![]);
        assert_eq!(r.code(), code);
    }
    let r = run_on(
        &agent,
        &c,
        &sh("echo out; echo err >&2; kill -9 $$"),
        b"",
        vec![],
    );
    assert_eq!(r.end, SessionEnd::Exited(ExitStatus::Signaled(9)));
    assert_eq!(
        (r.code(), r.out(), r.err()),
        (137, "out\n".into(), "err\n".into())
    );
    // The default spec: PATH, cwd, uid, hostname.
    let r = run_on(
        &agent,
        &c,
        &sh("echo $PATH; pwd; id -u; hostname"),
        b"",
        vec![],
    );
    assert_eq!(
        r.out(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/\n0\nkiln\n"
    );
    // A command that cannot be started is the agent's error, not a hang.
    let e = session::run(
        &c,
        &agent.connector(),
        command_spec(&["/no/such/binary".to_string()], None),
        HostStdio {
            stdin: File::open("/dev/null").unwrap(),
            stdout: File::create("/dev/null").unwrap(),
            stderr: File::create("/dev/null").unwrap(),
            terminal: false,
        },
        ControlChannel::new(),
    );
    // guest-init reports it as a failed StartContainer (host-vmm prints it, exit 1).
    let e = kiln_protocol::error_chain(&e.expect_err("a missing binary cannot start"));
    assert!(
        e.contains("StartContainer failed") && e.contains("No such file or directory"),
        "{e}"
    );
}

#[test]
fn relay_stdin_piped_through_with_eof() {
    let agent = HostAgent::start("stdin");
    let c = agent.client();
    let input: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
    let r = run_on(&agent, &c, &["cat"], &input, vec![]);
    let took = r.took;
    assert_eq!(r.code(), 0, "stderr: {}", r.err());
    assert_eq!(r.stdout.len(), input.len());
    assert_eq!(Sha256::digest(&r.stdout), Sha256::digest(&input));
    eprintln!("4 MiB through stdin and stdout (whole session, create to exit): {took:?}");
    // EOF reaches the process: wc counts and exits.
    let r = run_on(&agent, &c, &sh("wc -c; echo done >&2"), b"12345", vec![]);
    assert_eq!((r.out().trim(), r.err()), ("5", "done\n".into()));
    // Empty stdin.
    let r = run_on(&agent, &c, &sh("cat; exit 4"), b"", vec![]);
    assert_eq!((r.code(), r.out()), (4, String::new()));
}

/// A host reader that goes away (`host-vmm -- yes | head -1`): the relay closes the stream,
/// the process gets EPIPE/SIGPIPE and the run ends instead of hanging.
#[test]
fn relay_closed_host_stdout_ends_the_writer() {
    let agent = HostAgent::start("epipe");
    let c = agent.client();
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the live array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both fds were just created and are owned by nobody else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    drop(read_end);
    let stdio = HostStdio {
        stdin: File::open("/dev/null").unwrap(),
        stdout: write_end,
        stderr: File::create("/dev/null").unwrap(),
        terminal: false,
    };
    let args: Vec<String> = ["yes"].iter().map(|s| s.to_string()).collect();
    let (tx_done, rx_done) = std::sync::mpsc::channel();
    let conn = agent.connector();
    let client = Arc::clone(&c);
    std::thread::spawn(move || {
        let end = session::run(
            &client,
            &conn,
            command_spec(&args, None),
            stdio,
            ControlChannel::new(),
        );
        let _ = tx_done.send(end.map_err(|e| kiln_protocol::error_chain(&e)));
    });
    let end = rx_done
        .recv_timeout(Duration::from_secs(20))
        .expect("the run hangs after its reader went away");
    assert_eq!(
        end,
        Ok(SessionEnd::Exited(ExitStatus::Signaled(libc::SIGPIPE)))
    );
}

#[test]
fn relay_signals_forwarded_then_second_one_interrupts() {
    let agent = HostAgent::start("signals");
    let c = agent.client();
    // The first SIGTERM goes to the process.
    let r = run_on(
        &agent,
        &c,
        &["sleep", "100"],
        b"",
        vec![(Duration::from_millis(300), Control::Signal(libc::SIGTERM))],
    );
    assert_eq!(r.code(), 128 + libc::SIGTERM);
    let r = run_on(
        &agent,
        &c,
        &sh("trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 0.05; done"),
        b"",
        vec![(Duration::from_millis(500), Control::Signal(libc::SIGINT))],
    );
    assert_eq!((r.code(), r.out()), (5, "ready\ngot INT\n".into()));
    // A process that ignores it: the second signal ends the session.
    let t = Instant::now();
    let r = run_on(
        &agent,
        &c,
        &sh("trap '' TERM; exec sleep 100"),
        b"",
        vec![
            (Duration::from_millis(300), Control::Signal(libc::SIGTERM)),
            (Duration::from_millis(300), Control::Signal(libc::SIGTERM)),
        ],
    );
    assert_eq!(r.end, SessionEnd::Interrupted(libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(10));
    // The VM stopping ends the session too.
    let r = run_on(
        &agent,
        &c,
        &["sleep", "100"],
        b"",
        vec![(
            Duration::from_millis(200),
            Control::VmStopped("test".into()),
        )],
    );
    assert_eq!(r.end, SessionEnd::VmStopped("test".into()));
}

/// A host pty pair: (master, slave).
fn host_pty() -> (File, File) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the live integers; name, termios and size are null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    use std::os::fd::FromRawFd;
    // SAFETY: both fds were just opened and are owned by nobody else.
    unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) }
}

fn set_size(tty: &File, rows: u16, cols: u16) {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the live `ws`.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
}

fn lflag(tty: &File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: tcgetattr fills the zeroed termios (plain data).
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(tty.as_raw_fd(), &mut t), 0);
        t.c_lflag
    }
}

/// Stdin is a terminal: one pty stream, the host terminal in raw mode during the run and
/// restored after, the initial size in the spec, a window change forwarded as ResizeTty.
#[test]
fn relay_terminal_raw_mode_and_resize() {
    let agent = HostAgent::start("tty");
    let c = agent.client();
    let (mut master, slave) = host_pty();
    set_size(&slave, 30, 100);
    let cooked = lflag(&slave);
    assert_ne!(cooked & libc::ICANON, 0);
    let output = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut reader = master.try_clone().unwrap();
    let sink = Arc::clone(&output);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut reader, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let stdio = HostStdio {
        stdin: slave.try_clone().unwrap(),
        stdout: slave.try_clone().unwrap(),
        stderr: slave.try_clone().unwrap(),
        terminal: true,
    };
    let size = host_vmm::run::terminal::window_size(std::os::fd::AsFd::as_fd(&slave));
    let args: Vec<String> = sh(
        "stty size; read line; echo \"got $line\"; sleep 1; stty size; \
                                tty >/dev/null && echo tty-ok; exit 9",
    )
    .iter()
    .map(|s| s.to_string())
    .collect();
    let channel = ControlChannel::new();
    let tx = channel.sender();
    let resize_slave = slave.try_clone().unwrap();
    let out_probe = Arc::clone(&output);
    let driver = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let saw = |what: &str| String::from_utf8_lossy(&out_probe.lock().unwrap()).contains(what);
        while !saw("30 100") {
            assert!(Instant::now() < deadline, "no initial size");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Raw mode on the host side while the process runs.
        assert_eq!(lflag(&resize_slave) & (libc::ICANON | libc::ECHO), 0);
        master.write_all(b"hello\r").unwrap();
        while !saw("got hello") {
            assert!(Instant::now() < deadline, "no answer to the input");
            std::thread::sleep(Duration::from_millis(10));
        }
        set_size(&resize_slave, 40, 120);
        tx.send(Control::WindowChanged).unwrap();
    });
    let end = session::run(
        &c,
        &agent.connector(),
        command_spec(&args, Some(("xterm", size))),
        stdio,
        channel,
    )
    .unwrap_or_else(|e| panic!("session: {}", kiln_protocol::error_chain(&e)));
    driver.join().expect("driver");
    assert_eq!(end, SessionEnd::Exited(ExitStatus::Exited(9)));
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
        if text.contains("tty-ok") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(text.contains("30 100\r\n"), "{text:?}");
    assert!(text.contains("hello"), "echo of the input: {text:?}");
    assert!(text.contains("got hello\r\n"), "{text:?}");
    assert!(text.contains("40 120\r\n"), "resize forwarded: {text:?}");
    assert!(text.contains("tty-ok"), "{text:?}");
    assert_eq!(lflag(&slave), cooked, "terminal mode restored");
}

/// Set in the re-executed child of [`relay_under_client_seccomp_filter`].
const SECCOMP_CHILD_ENV: &str = "KILN_VMM_RUN_SECCOMP_CHILD";

/// The session under the client seccomp filter in kill mode: a call missing from the list kills
/// the process with SIGSYS. Runs in a copy of this test binary (the filter would otherwise
/// stay on a test-harness thread); the child runs `seccomp_child` below.
#[test]
fn relay_under_client_seccomp_filter() {
    let agent = HostAgent::start("seccomp");
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "seccomp_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(SECCOMP_CHILD_ENV, &agent.socket);
    let out = run_with_timeout(cmd, Duration::from_secs(60)).unwrap();
    assert!(
        out.code() == Some(0)
            && !out.stderr.contains("blocked syscall")
            && out.stdout.contains("SECCOMP-CHILD-OK"),
        "child under the client filter failed (SIGSYS = a call missing from \
         host-vmm/src/seccomp/client.rs)\n{}",
        out.describe()
    );
}

#[test]
fn seccomp_child() {
    let Some(socket) = std::env::var_os(SECCOMP_CHILD_ENV) else {
        return; // only meaningful when started by relay_under_client_seccomp_filter
    };
    use host_vmm::seccomp::{FilterContext, SeccompMode, ThreadFilter, ThreadKind};
    // KILN_VMM_RUN_SECCOMP_LOG=1 names a missing call instead of killing (diagnosis).
    let mode = if std::env::var_os("KILN_VMM_RUN_SECCOMP_LOG").is_some() {
        SeccompMode::Log
    } else {
        SeccompMode::Kill
    };
    let filter =
        ThreadFilter::compile(ThreadKind::Client, mode, &FilterContext::current()).unwrap();
    let dir = TempDir::new("run-seccomp-io");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    std::fs::write(dir.path().join("in"), b"from stdin\n").unwrap();
    let stdio = HostStdio {
        stdin: File::open(dir.path().join("in")).unwrap(),
        stdout: File::create(&out).unwrap(),
        stderr: File::create(&err).unwrap(),
        terminal: false,
    };
    // The filter goes on a thread of its own so the test harness (which reads files and
    // prints) stays unfiltered; everything on it runs as host-vmm's main thread does after
    // the VM thread is started.
    let end = std::thread::spawn(move || {
        filter.apply().expect("installing the client filter");
        let channel = ControlChannel::new();
        let tx = channel.sender();
        let conn = UnixAgent {
            path: PathBuf::from(socket),
        };
        let client = {
            use host_vmm::run::session::AgentConnector;
            Arc::new(AgentClient::connect(conn.connect().unwrap(), "seccomp").unwrap())
        };
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = tx.send(Control::WindowChanged);
        });
        let args: Vec<String> = sh("cat; echo to-stderr >&2; sleep 0.5; exit 6")
            .iter()
            .map(|s| s.to_string())
            .collect();
        let end = session::run(&client, &conn, command_spec(&args, None), stdio, channel);
        client
            .call_timeout(kiln_protocol::Request::Health, Duration::from_secs(5))
            .unwrap();
        drop(client);
        end.map_err(|e| kiln_protocol::error_chain(&e))
    })
    .join()
    .expect("session thread");
    assert_eq!(end, Ok(SessionEnd::Exited(ExitStatus::Exited(6))));
    assert_eq!(std::fs::read(&out).unwrap(), b"from stdin\n");
    assert_eq!(std::fs::read(&err).unwrap(), b"to-stderr\n");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "SECCOMP-CHILD-OK").unwrap();
}

#[test]
fn end_to_end_host_vmm_runs_a_command() {
    if !kiln_tests::require_kvm("end_to_end_host_vmm_runs_a_command") {
        return;
    }
    // On a PVM host a boot takes minutes (kernel-config/README.md, "PVM flavour"): pvm_agent.rs
    // runs the headline case there, in the same boot as its agent cases.
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "end_to_end_host_vmm_runs_a_command: PVM host: covered by pvm_agent.rs (run mode              and agent cases in one boot)"
        );
        return;
    }
    let dir = TempDir::new("run-e2e");
    let image = kiln_tests::e2e::busybox_agent_image(dir.path()).expect("agent image");
    let kernel = kiln_tests::kernel::vmlinux();
    let timeout = Duration::from_secs(120);
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let mut cmd = Command::new(host_vmm());
        cmd.arg("--kernel")
            .arg(&kernel)
            .arg("--rootfs")
            .arg(&image)
            .args(["--mem-mib", "256", "--"])
            .args(args);
        match stdin {
            None => run_with_timeout(cmd, timeout).unwrap(),
            Some(input) => {
                let input_path = dir.path().join("stdin");
                std::fs::write(&input_path, input).unwrap();
                cmd.stdin(File::open(&input_path).unwrap())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let child = cmd.spawn().unwrap();
                let out = kiln_tests::bounded::wait_output(child, timeout, "host-vmm");
                kiln_tests::guests::VmOutput {
                    status: Some(out.status),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    elapsed: Duration::ZERO,
                }
            }
        }
    };
    let out = run(&sh("echo hi; exit 3"), None);
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(3), "hi\n"),
        "{}",
        out.describe()
    );
    eprintln!("host-vmm -- sh -c 'echo hi; exit 3': {:?}", out.elapsed);
    for (script, code) in [("exit 0", 0), ("exit 1", 1), ("kill -9 $$", 137)] {
        let out = run(&sh(script), None);
        assert_eq!(out.code(), Some(code), "{script}\n{}", out.describe());
    }
    let out = run(&sh("echo out; echo err >&2"), None);
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out\n", "err\n")
    );
    let out = run(&["wc", "-c"], Some(b"0123456789"));
    assert_eq!(out.stdout.trim(), "10", "{}", out.describe());
}

/// The VM side of `host-vmm --` with a bare-metal test guest that never runs an agent: the
/// guest stops first (one line naming it, then the console tail, exit 1, the vsock socket
/// removed), and a SIGINT while waiting for the agent stops the VM at once (exit 130). Runs the
/// binary's VM thread, console tail and client seccomp filter (kill mode) on real KVM.
#[test]
fn vm_side_without_an_agent() {
    if !kiln_tests::require_kvm("vm_side_without_an_agent") {
        return;
    }
    let dir = TempDir::new("run-noagent");
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let guest = kiln_tests::guests::guest(kiln_tests::guests::Guest::Linux64);
    let uds = dir.path().join("vsock.sock");
    let mut cmd = Command::new(host_vmm());
    cmd.arg("--kernel")
        .arg(&guest)
        .arg("--rootfs")
        .arg(&image)
        .arg("--vsock-uds")
        .arg(&uds)
        .args(["--", "/bin/sh", "-c", "echo never"]);
    let out = run_with_timeout(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first
            .starts_with("host-vmm: the VM stopped before the agent answered: the guest shut down"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("  KILN-TEST marker"),
        "console tail\n{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
    assert!(!uds.exists(), "vsock socket left behind");

    let mut child = Command::new(host_vmm())
        .arg("--kernel")
        .arg(&guest)
        .arg("--rootfs")
        .arg(&image)
        .args(["--cmdline", "kiln.test=idle", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "idle guest ended early"
    );
    let t = Instant::now();
    // SAFETY: kill has no memory effects; the pid is our live child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "SIGINT did not stop host-vmm"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "SIGINT while waiting for the agent: exit after {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(130));
}

#[test]
fn cli_errors_of_the_run_mode() {
    let dir = TempDir::new("run-cli");
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--", "true"], "needs --rootfs"),
        (
            &["--jail", "/nonexistent", "--rootfs", "/x", "--", "true"],
            "--jail",
        ),
        (
            &["--rootfs", "/nonexistent/img", "--", "true"],
            "rootfs /nonexistent/img",
        ),
    ];
    for (args, needle) in cases {
        let mut cmd = Command::new(host_vmm());
        cmd.arg("--kernel").arg(&kernel).args(args);
        let out = run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(out.code(), Some(1), "{args:?}\n{}", out.describe());
        assert_eq!(lines.len(), 1, "{args:?}: one line\n{}", out.describe());
        assert!(lines[0].contains(needle), "{args:?}\n{}", out.describe());
        assert!(out.stdout.is_empty());
    }
}
