//! Linux userspace under host-vmm on a PVM host (issue 7), in ONE boot: a PVM boot takes over a
//! minute and every guest fork+exec seconds (kernel-config/README.md, "PVM flavour"), so
//! everything PVM needs to show runs in the same VM.
//!
//! `host-vmm --kernel auto --rootfs <busybox agent image> --vsock-uds S -- sh -c 'read line; ...'`
//! must pick the PVM kernel flavour by itself (and log it). While the run-mode command waits on
//! its stdin, the test connects its own client to the same agent through the hybrid vsock socket
//! `S` and runs the agent cases as execs in the command's container (a second container would
//! cost another ~25 s here): stdin in, exit code, stdout and stderr apart and the environment of
//! one exec; a process killed by a signal; a malformed frame that gets an Error reply on a
//! connection that then goes on working. Finally it feeds the command's stdin: the command
//! prints and exits 3, which host-vmm returns as its own status.
//!
//! The same agent cases run in more depth under QEMU TCG and hardware KVM (`e2e_agent.rs`), and
//! the run mode's cases in `vmm_run.rs` (which leaves PVM hosts to this test). Not a PVM host:
//! the test says so and passes. Every wait is bounded: a watchdog (`kiln_tests::bounded`) kills
//! host-vmm after [`DEADLINE`], which ends every blocked call and read.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use host_vmm::run::session::CONTAINER_ID as RUN_CONTAINER;
use kiln_protocol::transport::hybrid_vsock_connect;
use kiln_protocol::{AgentClient, ExitStatus, StdioStream, AGENT_VSOCK_PORT};
use kiln_tests::bounded::{self, Watchdog};
use kiln_tests::e2e::{
    busybox_agent_image, malformed_frame_keeps_the_connection, process, read_all, sh,
};
use kiln_tests::guests::{host_vmm, TempDir};

/// The whole test: boot (about 1-2 minutes here), cases, exit.
const DEADLINE: Duration = Duration::from_secs(330);

/// Reads a child's pipe to its end on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// A control client on the agent, retried while the guest boots (the VMM holds or refuses the
/// CONNECT until the guest listens) and while `host-vmm` runs, until `deadline`.
fn connect_agent(uds: &Path, vmm: &mut Child, deadline: Instant) -> AgentClient {
    let mut last = String::from("socket not created yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = vmm.try_wait() {
            panic!("host-vmm ended ({status}) before the agent answered; last error: {last}");
        }
        match hybrid_vsock_connect(uds, AGENT_VSOCK_PORT) {
            Ok(stream) => match AgentClient::connect(stream, "pvm-agent-test") {
                Ok(client) => return client,
                Err(e) => last = kiln_protocol::error_chain(&e),
            },
            Err(e) => last = kiln_protocol::error_chain(&e),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the agent did not answer before the deadline; last error: {last}");
}

/// A raw connection to the agent's port.
fn raw(uds: &Path) -> UnixStream {
    let s = hybrid_vsock_connect(uds, AGENT_VSOCK_PORT).expect("connecting to the agent port");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// One stdio stream of an exec.
fn attach(uds: &Path, container: &str, exec: &str, which: StdioStream) -> UnixStream {
    kiln_protocol::transport::hybrid_vsock_attach(uds, AGENT_VSOCK_PORT, container, exec, which)
        .unwrap_or_else(|e| panic!("attach {which:?} of {container}/{exec}: {e}"))
}

/// The agent cases, on the booted guest.
fn agent_cases(c: &AgentClient, uds: &Path) {
    let step = |name: &str, started: Instant| {
        eprintln!("pvm_agent: {name}: ok ({:.1?})", started.elapsed())
    };

    // The run-mode command's container: host-vmm creates it once the agent answers (execs
    // into it are refused until then), and its main process waits on stdin meanwhile.
    let t = Instant::now();
    let mut p = sh("read x; echo \"out $x\"; echo err >&2; echo \"$PVM_CASE\"; exit 3");
    p.env.push("PVM_CASE=env from the spec".into());
    let until = Instant::now() + Duration::from_secs(120);
    while let Err(e) = c.exec(RUN_CONTAINER, "e3", p.clone()) {
        assert!(Instant::now() < until, "exec into {RUN_CONTAINER}: {e}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut stdin = attach(uds, RUN_CONTAINER, "e3", StdioStream::Stdin);
    let err = attach(uds, RUN_CONTAINER, "e3", StdioStream::Stderr);
    let err = std::thread::spawn(move || read_all(err));
    let stdout = attach(uds, RUN_CONTAINER, "e3", StdioStream::Stdout);
    stdin.write_all(b"from stdin\n").unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    let out = String::from_utf8_lossy(&read_all(stdout)).into_owned();
    let err = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
    let status = c.wait(RUN_CONTAINER, "e3").expect("wait");
    assert_eq!(status, ExitStatus::Exited(3), "stderr {err:?}");
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("out from stdin\nenv from the spec\n", "err\n")
    );
    step(
        "exec: stdin in, exit code 3, stdout and stderr apart, env",
        t,
    );

    let t = Instant::now();
    c.exec(RUN_CONTAINER, "sleep", process(&["sleep", "1000"]))
        .expect("exec sleep");
    c.signal(RUN_CONTAINER, "sleep", 9).expect("signal");
    assert_eq!(
        c.wait(RUN_CONTAINER, "sleep").unwrap(),
        ExitStatus::Signaled(9)
    );
    step("killed by SIGKILL", t);

    let t = Instant::now();
    malformed_frame_keeps_the_connection(&mut raw(uds));
    c.health()
        .expect("the test's client after the malformed frame");
    step("malformed frame: Error reply, connection goes on", t);
}

#[test]
fn pvm_host_vmm_runs_userspace_and_agent_cases() {
    if !kiln_tests::require_kvm("pvm_host_vmm_runs_userspace_and_agent_cases") {
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "pvm_agent: not a PVM host (no /sys/module/kvm_pvm): vmm_run and e2e_agent cover \
             this host's KVM"
        );
        return;
    }
    // Builds (or finds) the PVM flavour and points build.sh's stable link at it, which is what
    // `--kernel auto` resolves.
    let kernel = kiln_tests::kernel::vmlinux_pvm();
    let dir = TempDir::new("pvm-agent");
    let image = busybox_agent_image(dir.path()).expect("agent image");
    let uds = dir.path().join("vsock.sock");
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let mut vmm = Command::new(host_vmm())
        .args(["--kernel", "auto", "--rootfs"])
        .arg(&image)
        .args(["--mem-mib", "128", "--vsock-uds"])
        .arg(&uds)
        .args([
            "-v",
            "--",
            "sh",
            "-c",
            "read line; echo \"hi $line\"; exit 3",
        ])
        // An explicit choice would win over the flavour pick under test.
        .env_remove("KILN_KERNEL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning host-vmm");
    let watchdog = Watchdog::kill_after(&vmm, DEADLINE, "host-vmm on PVM (boot and agent cases)");
    let stdout = collect(vmm.stdout.take().unwrap());
    let stderr = collect(vmm.stderr.take().unwrap());
    let mut stdin = vmm.stdin.take().unwrap();

    let cases = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let client = connect_agent(&uds, &mut vmm, deadline);
        eprintln!(
            "pvm_agent: agent ready {:.1?} after spawn",
            started.elapsed()
        );
        agent_cases(&client, &uds);
    }));
    // The run-mode command: one line on its stdin, then it prints and exits 3.
    let fed = stdin.write_all(b"there\n");
    drop(stdin);
    let status = bounded::wait_child(
        &mut vmm,
        deadline.saturating_duration_since(Instant::now()),
        "host-vmm",
    );
    drop(watchdog);
    let pipes = Duration::from_secs(10);
    let stdout = bounded::join(stdout, pipes, "host-vmm's stdout");
    let stderr = bounded::join(stderr, pipes, "host-vmm's stderr");
    eprintln!(
        "pvm_agent: host-vmm exited {status} {:.1?} after spawn",
        started.elapsed()
    );
    if let Err(panic) = cases {
        eprintln!("pvm_agent: host-vmm stderr:\n{stderr}");
        std::panic::resume_unwind(panic);
    }
    fed.expect("writing the command's stdin");
    let picked = std::fs::canonicalize(&kernel).unwrap();
    assert!(
        stderr.contains(&format!(
            "PVM host: using the PVM kernel flavour {}",
            picked.display()
        )),
        "host-vmm did not log its PVM flavour pick of {}:\n{stderr}",
        picked.display()
    );
    assert_eq!(
        (status.code(), stdout.as_str()),
        (Some(3), "hi there\n"),
        "stderr:\n{stderr}"
    );
}
