//! The `kiln` runtime's runc CLI contract with a busybox bundle: errors without a VM, then the
//! container lifecycle (create/start/state/exec/kill/delete), `run` exit codes and output, a
//! terminal over `--console-socket`, and `delete --force` cleaning up everything. The backend is
//! whatever `kiln` picks on this host (QEMU TCG on PVM machines); each test prints it.

mod runtime_common;

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use kiln_tests::bounded::VM_WAIT;
use runtime_common::{processes_mentioning, stderr, stdout, Kiln};

fn backend_of(k: &Kiln, id: &str) -> String {
    let state = k.state(id).expect("state");
    let b = state["annotations"]["io.kiln.backend"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    eprintln!("backend used for {id}: {b}");
    b
}

#[test]
fn runtime_cli_errors_match_runc() {
    let k = Kiln::new("rt-errors");
    // Missing bundle.
    let o = k.run(&["create", "--bundle", "/nonexistent-bundle", "c"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bundle /nonexistent-bundle"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "one line");
    // Invalid config.json.
    let bad = k.scratch.path().join("bad");
    std::fs::create_dir_all(bad.join("rootfs")).unwrap();
    std::fs::write(bad.join("config.json"), "{bad").unwrap();
    let o = k.run(&["create", "--bundle", bad.to_str().unwrap(), "c"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("config.json: invalid runtime spec"),
        "{}",
        stderr(&o)
    );
    // Nothing half-written.
    assert!(!k.root.join("c").exists());
    // Unknown id: runc's message for every command.
    for args in [
        vec!["state", "nope"],
        vec!["start", "nope"],
        vec!["kill", "nope", "KILL"],
        vec!["delete", "nope"],
        vec!["exec", "nope", "true"],
    ] {
        let o = k.run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("container does not exist"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // Invalid id.
    let o = k.run(&["state", "../etc"]);
    assert_eq!(o.status.code(), Some(1));
    // JSON log lines like runc's.
    let log = k.scratch.path().join("log.json");
    let o = k.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "state",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "error");
    assert_eq!(line["msg"], "container does not exist");
    assert!(line["time"].is_string());
    // A bind mount of a host file (not a directory: those become disks) is refused clearly.
    let b = k.bundle("bind", &["true"]);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
        {"destination": "/data", "type": "bind", "source": "/etc/passwd", "options": ["rbind"]}));
    std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let o = k.run(&["create", "--bundle", b.to_str().unwrap(), "c"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bind mount of host file /etc/passwd on /data is not supported"),
        "{}",
        stderr(&o)
    );
    assert!(!k.root.join("c").exists(), "nothing left behind");
    // `spec` refuses to overwrite, `features` and `--version` name the backends.
    let o = k.run(&["spec", "--bundle", b.to_str().unwrap()]);
    assert!(stderr(&o).contains("File config.json exists"));
    let o = k.run(&["features"]);
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(f["annotations"]["io.kiln.backend.qemu-tcg"].is_string());
    let o = k.run(&["--version"]);
    assert!(stdout(&o).contains("backend host-vmm:"), "{}", stdout(&o));
}

#[test]
fn runtime_cli_lifecycle_exec_kill_delete() {
    if !kiln_tests::require_kvm("runtime_cli_lifecycle_exec_kill_delete") {
        return;
    }
    let k = Kiln::new("rt-life");
    let b = k.bundle("b", &["sleep", "1000"]);
    let pid_file = k.scratch.path().join("c1.pid");
    let o = k.run(&[
        "create",
        "c1",
        "--bundle",
        b.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let st = k.state("c1").unwrap();
    assert_eq!(st["status"], "created");
    assert_eq!(st["pid"], pid);
    assert_eq!(st["id"], "c1");
    assert_eq!(st["ociVersion"], "1.0.2");
    assert!(st["bundle"].as_str().unwrap().ends_with("/b"));
    backend_of(&k, "c1");

    let o = k.run(&["create", "--bundle", b.to_str().unwrap(), "c1"]);
    assert!(stderr(&o).contains("container with given ID already exists"));
    assert!(k.run(&["start", "c1"]).status.success());
    assert_eq!(k.state("c1").unwrap()["status"], "running");
    let o = k.run(&["start", "c1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot start an already running container"));

    // exec: exit code, both streams, env and cwd, hostname from the spec.
    let o = k.run(&[
        "exec",
        "--env",
        "FOO=bar",
        "--cwd",
        "/bin",
        "c1",
        "sh",
        "-c",
        "echo out $FOO $(pwd) $(hostname); echo err >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(stdout(&o), "out bar /bin kiln-test\n");
    assert!(stderr(&o).contains("err"));
    // exec --detach: the pid file names a process that exits with the exec'd process.
    let exec_pid = k.scratch.path().join("exec.pid");
    let o = k.run(&[
        "exec",
        "--detach",
        "--pid-file",
        exec_pid.to_str().unwrap(),
        "c1",
        "sleep",
        "1",
    ]);
    assert!(o.status.success());
    let epid: i32 = std::fs::read_to_string(&exec_pid).unwrap().parse().unwrap();
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{epid}")).exists()
        && std::fs::read_to_string(format!("/proc/{epid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "exec shim did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // list and ps.
    let o = k.run(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");
    let o = k.run(&["ps", "--format", "json", "c1"]);
    let ps: Vec<i32> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(ps.contains(&pid));

    // Delete refuses a running container; SIGKILL stops it; kill again is an error.
    let o = k.run(&["delete", "c1"]);
    assert!(
        stderr(&o).contains("is not stopped: running"),
        "{}",
        stderr(&o)
    );
    assert!(k.run(&["kill", "c1", "9"]).status.success());
    assert!(k.wait_status("c1", "stopped", Duration::from_secs(30)));
    assert_eq!(k.state("c1").unwrap()["pid"], 0);
    let o = k.run(&["kill", "c1", "SIGKILL"]);
    assert!(stderr(&o).contains("container not running"));
    let o = k.run(&["start", "c1"]);
    assert!(stderr(&o).contains("cannot start a container that has stopped"));
    assert!(k.run(&["delete", "c1"]).status.success());
    assert!(k.state("c1").is_none());
    assert!(!k.root.join("c1").exists());
    assert!(processes_mentioning(k.root.to_str().unwrap()).is_empty());
}

#[test]
fn runtime_cli_run_exit_codes_output_and_force_delete() {
    if !kiln_tests::require_kvm("runtime_cli_run_exit_codes_output_and_force_delete") {
        return;
    }
    let k = Kiln::new("rt-run");
    let b = k.bundle("b", &["sh", "-c", "echo hello from $(hostname); exit 3"]);
    // Host hooks get the state JSON on stdin.
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    let hook = |stage: &str| {
        let out = k.scratch.path().join(format!("hook-{stage}.json"));
        serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]}])
    };
    spec["hooks"] = serde_json::json!({
        "createRuntime": hook("createRuntime"),
        "poststart": hook("poststart"),
        "poststop": hook("poststop"),
    });
    std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let started = Instant::now();
    let o = k.run(&["run", "--bundle", b.to_str().unwrap(), "r1"]);
    eprintln!("kiln run took {:?}", started.elapsed());
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "hello from kiln-test\n");
    assert!(!k.root.join("r1").exists(), "run removes the container");
    for (stage, status) in [
        ("createRuntime", "created"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ] {
        let path = k.scratch.path().join(format!("hook-{stage}.json"));
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect(stage)).unwrap();
        assert_eq!(state["id"], "r1", "{stage}");
        assert_eq!(state["status"], status, "{stage}");
    }

    // createContainer and startContainer hooks run inside the container (in the guest), with
    // the state on stdin; a failing startContainer hook fails `start` and stops the container.
    let b6 = k.bundle(
        "b6",
        &["sh", "-c", "cat /tmp/cc.json; echo; cat /tmp/sc.json"],
    );
    let in_guest = |file: &str| {
        serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {file}")],
                            "timeout": 60}])
    };
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b6.join("config.json")).unwrap()).unwrap();
    spec["hooks"] = serde_json::json!({
        "createContainer": in_guest("/tmp/cc.json"),
        "startContainer": in_guest("/tmp/sc.json"),
    });
    std::fs::write(b6.join("config.json"), spec.to_string()).unwrap();
    let o = k.run(&["run", "--bundle", b6.to_str().unwrap(), "r6"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let states: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(states.len(), 2, "{out}");
    for state in &states {
        assert_eq!(state["id"], "r6");
        assert_eq!(state["status"], "created");
    }
    let b7 = k.bundle("b7", &["sleep", "1000"]);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b7.join("config.json")).unwrap()).unwrap();
    spec["hooks"] = serde_json::json!({
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo hook-says-no >&2; exit 4"]}],
    });
    std::fs::write(b7.join("config.json"), spec.to_string()).unwrap();
    let o = k.run(&["create", "--bundle", b7.to_str().unwrap(), "r7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = k.run(&["start", "r7"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("startContainer hook /bin/sh failed: exit status 4"),
        "{}",
        stderr(&o)
    );
    assert!(k.wait_status("r7", "stopped", Duration::from_secs(60)));
    assert!(k.run(&["delete", "r7"]).status.success());
    assert!(!k.root.join("r7").exists());

    // Killed by a signal: 128 + signal, like a shell.
    let b2 = k.bundle("b2", &["sleep", "1000"]);
    let mut attached = k
        .cmd(&["run", "--bundle", b2.to_str().unwrap(), "r2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(k.wait_status("r2", "running", Duration::from_secs(60)));
    assert!(k.run(&["kill", "r2", "KILL"]).status.success());
    let status = kiln_tests::bounded::wait_child(&mut attached, VM_WAIT, "kiln run r2");
    assert_eq!(status.code(), Some(137));

    // Signals sent to an attached `kiln run` reach the container.
    let b5 = k.bundle(
        "b5",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 9' TERM; while true; do sleep 0.2; done",
        ],
    );
    let attached = k
        .cmd(&["run", "--bundle", b5.to_str().unwrap(), "r5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(k.wait_status("r5", "running", Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(500));
    let pid = attached.id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let o = kiln_tests::bounded::wait_output(attached, VM_WAIT, "kiln run r5");
    assert_eq!(o.status.code(), Some(9));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got-term\n");

    // stdin reaches the container.
    let b3 = k.bundle("b3", &["sh", "-c", "read line; echo got $line"]);
    let mut child = k
        .cmd(&["run", "--bundle", b3.to_str().unwrap(), "r3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ping\n").unwrap();
    let o = kiln_tests::bounded::wait_output(child, VM_WAIT, "kiln run r3");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got ping\n");

    // delete --force of a running container removes the VM and the state.
    let b4 = k.bundle("b4", &["sleep", "1000"]);
    assert!(k
        .run(&["run", "--detach", "--bundle", b4.to_str().unwrap(), "r4"])
        .status
        .success());
    assert!(!backend_of(&k, "r4").is_empty());
    assert!(!processes_mentioning(k.root.join("r4").to_str().unwrap()).is_empty());
    assert!(k.run(&["delete", "--force", "r4"]).status.success());
    assert!(!k.root.join("r4").exists());
    assert!(processes_mentioning(k.root.to_str().unwrap()).is_empty());
}

/// Receives one fd sent with SCM_RIGHTS on `listener`.
fn receive_fd(listener: &UnixListener) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let conn = kiln_tests::bounded::accept(listener, VM_WAIT, "kiln's console socket");
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed this descriptor for us; nobody else owns it.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received");
}

#[test]
fn runtime_cli_terminal_over_console_socket() {
    if !kiln_tests::require_kvm("runtime_cli_terminal_over_console_socket") {
        return;
    }
    let k = Kiln::new("rt-tty");
    let b = k.bundle("b", &["sh"]);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    spec["process"]["terminal"] = true.into();
    std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let sock = k.scratch.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_fd(&listener));
    let o = k.run(&[
        "create",
        "--bundle",
        b.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        "t1",
    ]);
    assert!(o.status.success());
    let master = std::fs::File::from(receiver.join().unwrap());
    // A window size set on the master after create reaches the guest's pty (SIGWINCH in the
    // shim, ResizeTty to the agent).
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&master);
    // SAFETY: TIOCSWINSZ reads one winsize from a live local.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(k.run(&["start", "t1"]).status.success());
    let mut w = master.try_clone().unwrap();
    w.write_all(b"stty size; exit 5\n").unwrap();
    let mut out = Vec::new();
    let mut r = master;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if String::from_utf8_lossy(&out).contains("40 100") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("\r\n40 100\r\n"),
        "size inside the guest: {text:?}"
    );
    assert!(k.wait_status("t1", "stopped", Duration::from_secs(30)));
    assert!(k.run(&["delete", "t1"]).status.success());
}
