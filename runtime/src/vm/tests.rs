//! Unit tests of the launcher that need no VM: input checks, a VMM that exits at once, clean-up.
//! Booting real guests is tested in the `tests/` crate (`e2e_agent.rs`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-vm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, b"x").unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn host_vmm_cfg(s: &Scratch, binary: &str) -> VmConfig {
    VmConfig::new(
        s.file("vmlinux"),
        s.file("img.ext4"),
        Backend::HostVmm {
            binary: binary.into(),
        },
        s.0.join("state"),
    )
}

#[test]
fn missing_kernel_is_reported() {
    let s = Scratch::new("missing");
    let mut cfg = host_vmm_cfg(&s, "/bin/true");
    cfg.kernel = s.0.join("nope");
    let e = Vm::launch(&cfg).unwrap_err();
    assert!(
        matches!(e, VmError::MissingFile { what: "kernel", .. }),
        "{e}"
    );
}

#[test]
fn bad_drives_are_refused_before_spawning() {
    let s = Scratch::new("drives");
    let mut cfg = host_vmm_cfg(&s, "/bin/true");
    let drive = |name: &str, serial: &str| Drive {
        path: s.0.join(name),
        read_only: true,
        serial: serial.into(),
    };
    s.file("d.ext4");
    cfg.drives = vec![drive("gone.ext4", "kiln-bind-0")];
    let e = Vm::launch(&cfg).unwrap_err();
    assert!(
        matches!(
            e,
            VmError::MissingFile {
                what: "drive image",
                ..
            }
        ),
        "{e}"
    );
    for (drives, want) in [
        (vec![drive("d.ext4", "a b")], "is not 1-20"),
        (vec![drive("d.ext4", &"x".repeat(21))], "is not 1-20"),
        (
            vec![drive("d.ext4", "s"), drive("d.ext4", "s")],
            "is used twice",
        ),
        (
            (0..=MAX_DRIVES)
                .map(|i| drive("d.ext4", &format!("s{i}")))
                .collect(),
            "more than 8",
        ),
    ] {
        cfg.drives = drives;
        let e = Vm::launch(&cfg).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(!s.0.join("state").exists(), "nothing created");
}

#[test]
fn long_state_dir_is_refused_before_spawning() {
    let s = Scratch::new("long");
    let mut cfg = host_vmm_cfg(&s, "/bin/true");
    cfg.state_dir = s.0.join("d".repeat(100));
    let e = Vm::launch(&cfg).unwrap_err();
    assert!(matches!(e, VmError::SocketPathTooLong { .. }), "{e}");
}

#[test]
fn missing_vmm_binary_is_a_spawn_error() {
    let s = Scratch::new("nobin");
    let cfg = host_vmm_cfg(&s, "/nonexistent/host-vmm");
    let e = Vm::launch(&cfg).unwrap_err();
    assert!(matches!(e, VmError::Spawn { .. }), "{e}");
}

/// A "VMM" that exits at once: connect_agent reports the exit and its log instead of waiting
/// out the timeout.
#[test]
fn vmm_exit_ends_the_wait_for_the_agent() {
    let s = Scratch::new("exit");
    let cfg = host_vmm_cfg(&s, "/bin/false");
    let vm = Vm::launch(&cfg).unwrap();
    let started = Instant::now();
    let e = vm.connect_agent(Duration::from_secs(60)).unwrap_err();
    assert!(matches!(e, VmError::Exited { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!vm.try_wait().unwrap().unwrap().success());
    assert!(vm.timings().agent_ready.is_none());
}

/// Drop kills the VMM, reaps it and removes the hybrid socket and `<uds>_<port>` sockets.
#[test]
fn drop_kills_and_removes_sockets() {
    let s = Scratch::new("drop");
    let cfg = host_vmm_cfg(&s, "/bin/sleep");
    // `sleep --kernel ...` fails; use a shell that ignores its arguments and sleeps instead.
    let script = s.0.join("fake-vmm");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = VmConfig {
        backend: Backend::HostVmm {
            binary: script.clone(),
        },
        ..cfg
    };
    let vm = Vm::launch(&cfg).unwrap();
    let pid = vm.vmm_pid();
    // Stand-ins for the sockets a VMM creates.
    let _uds = UnixListener::bind(vm.vsock_uds()).unwrap();
    let guest_port = PathBuf::from(format!("{}_1025", vm.vsock_uds().display()));
    let _port = UnixListener::bind(&guest_port).unwrap();
    assert!(vm.try_wait().unwrap().is_none());
    let uds = vm.vsock_uds().to_path_buf();
    drop(vm);
    assert!(!uds.exists() && !guest_port.exists());
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "VMM {pid} still there"
    );
}

#[test]
fn kill_then_wait_reports_the_signal() {
    let s = Scratch::new("kill");
    let script = s.0.join("fake-vmm");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cfg = host_vmm_cfg(&s, "/bin/true");
    cfg.backend = Backend::HostVmm { binary: script };
    let vm = Vm::launch(&cfg).unwrap();
    assert!(vm
        .wait_timeout(Duration::from_millis(50))
        .unwrap()
        .is_none());
    let status = vm.kill().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_eq!(vm.wait().unwrap(), status);
}

/// When the VMM exits on its own, the monitor stops the vsock device without anyone calling
/// wait (a device outliving QEMU would keep the host's connections open).
#[test]
fn monitor_stops_the_vsock_device_when_the_vmm_exits() {
    let vmm = Command::new("sleep").arg("0.2").spawn().unwrap();
    let device = Command::new("sleep").arg("1000").spawn().unwrap();
    let device_pid = device.id();
    let procs = Processes::start(vmm, Some(device));
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock(&procs.vsock_device).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lock(&procs.vsock_device).is_none(), "device still running");
    assert!(lock(&procs.status).is_some_and(|s| s.success()));
    assert!(!PathBuf::from(format!("/proc/{device_pid}")).exists());
}
