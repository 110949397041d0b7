//! guest-init as PID 1 of a real Linux guest: kiln's kernel under QEMU TCG (pure software, no
//! KVM needed), a block image holding `/kiln/guest-init` and a busybox container root at
//! `/rootfs`, vsock through `vhost-user-vsock` served by rust-vmm's `vhost-device-vsock` (the same
//! hybrid unix-socket interface as host-vmm). One boot runs every case of `guest_init_common`,
//! including the cgroup limits the host test cannot check on a cgroup v1 host, then `Shutdown`
//! must end the VM.

mod guest_init_common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_init_common as common;
use kiln_protocol::transport::{hybrid_vsock_connect, hybrid_vsock_connect_retry};
use kiln_protocol::{ExitStatus, AGENT_VSOCK_PORT};
use kiln_tests::bounded::Watchdog;
use kiln_tests::guests::TempDir;
use kiln_tests::kernel;

/// Kills a helper process when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vhost_device_vsock() -> PathBuf {
    let candidates = [
        std::env::var_os("KILN_VHOST_DEVICE_VSOCK").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/vhost-device-vsock")),
        Some(PathBuf::from("/usr/local/bin/vhost-device-vsock")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect(
            "vhost-device-vsock missing: run scripts/setup.sh (cargo install vhost-device-vsock)",
        )
}

/// `<dir>/image.ext4`: `/kiln/guest-init`, the container root `/rootfs`, empty mount points.
fn build_image(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    for d in ["kiln", "dev", "proc", "sys", "run", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(common::guest_init_bin(), tree.join("kiln/guest-init")).unwrap();
    common::make_busybox_root(&tree.join("rootfs"));
    let image = dir.join("image.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M")
        .output()
        .expect("running mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

fn wait_for(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long the VM of this test may run at all (it needs seconds to a minute).
const QEMU_LIFETIME: Duration = Duration::from_secs(600);

#[test]
fn guest_init_as_pid1_under_qemu_tcg() {
    let vmlinux = kernel::vmlinux();
    let dir = TempDir::new("gi-qemu");
    let image = build_image(dir.path());
    let vhu = dir.path().join("vhu.sock");
    let uds = dir.path().join("vsock.sock");
    let _vsock = Reaped(
        Command::new(vhost_device_vsock())
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhu)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting vhost-device-vsock"),
    );
    wait_for(&vhu, Duration::from_secs(10));
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let mut qemu = Reaped(
        Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off,memory-backend=mem", "-accel", "tcg"])
            .args(["-cpu", "max", "-smp", "2", "-m", "256"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&vmlinux)
            .args([
                "-append",
                "console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/kiln/guest-init",
            ])
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none",
                image.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root", "-no-reboot"])
            .args(["-device", "i8042"])
            .arg("-chardev")
            .arg(format!("socket,id=vs,path={}", vhu.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vs"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64"),
    );
    // QEMU and the vsock backend are killed after QEMU_LIFETIME: every client call and stdio
    // read on the agent then ends, so a hang fails the test instead of blocking it forever.
    let _qemu_watchdog = Watchdog::kill_after(&qemu.0, QEMU_LIFETIME, "QEMU");
    let _vsock_watchdog = Watchdog::kill_after(&_vsock.0, QEMU_LIFETIME, "vhost-device-vsock");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    // vhost-device-vsock 0.3.0 can drop every CONNECT made while the guest driver is still
    // initialising the device, so wait for guest-init's listening line first (as the launcher
    // in kiln_runtime::vm does).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !console_text().contains(kiln_runtime::vm::AGENT_LISTENING_MARKER) {
        assert!(
            Instant::now() < deadline,
            "guest-init never listened:\n{}",
            console_text()
        );
        if let Some(s) = qemu.0.try_wait().unwrap() {
            panic!("qemu exited early with {s}:\n{}", console_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = hybrid_vsock_connect_retry(&uds, AGENT_VSOCK_PORT, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("agent not reachable: {e}\n{}", console_text()));
    drop(first);
    eprintln!(
        "QEMU TCG: start -> agent accepting on vsock {:?}",
        started.elapsed()
    );
    let connect_uds = uds.clone();
    let t = Arc::new(common::Target::new(Box::new(move || -> UnixStream {
        hybrid_vsock_connect(&connect_uds, AGENT_VSOCK_PORT).expect("hybrid vsock connect")
    })));
    common::report_numbers(&t, "guest-init under QEMU TCG (vhost-user-vsock)");
    let v = t.client.version().unwrap();
    eprintln!("agent {} on kernel {}", v.agent, v.kernel);

    let timed = |name: &str, f: &dyn Fn()| {
        let t0 = Instant::now();
        f();
        eprintln!("case {name}: {:?}", t0.elapsed());
    };
    timed("case_handshake_and_bad_openings", &|| {
        common::case_handshake_and_bad_openings(&t)
    });
    timed("case_bad_frames_on_control_connection", &|| {
        common::case_bad_frames_on_control_connection(&t)
    });
    timed("case_exit_codes_signals_and_events", &|| {
        common::case_exit_codes_signals_and_events(&t)
    });
    timed("case_stdio", &|| common::case_stdio(&t));
    timed("case_twenty_concurrent_execs", &|| {
        common::case_twenty_concurrent_execs(&t)
    });
    timed("case_env_hostname_user", &|| {
        common::case_env_hostname_user(&t)
    });
    timed("case_terminal", &|| common::case_terminal(&t));
    timed("case_signal_all", &|| common::case_signal_all(&t));
    timed("case_process_settings", &|| {
        common::case_process_settings(&t)
    });
    timed("case_bad_specs", &|| common::case_bad_specs(&t));
    timed("case_capabilities", &|| common::case_capabilities(&t));
    timed("case_seccomp", &|| common::case_seccomp(&t));
    timed("case_cgroup_limits", &|| common::case_cgroup_limits(&t));

    // 500 orphans come to PID 1 (the container has no pid namespace); none may stay a zombie.
    common::case_spawn_500_orphans(&t);
    let count_zombies = "n=0; for f in /proc/[0-9]*/status; do \
                         grep -q '^State:.*Z' $f 2>/dev/null && n=$((n+1)); done; echo $n";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        i += 1;
        let (status, out, _) = t.run("rp1", &format!("zombies{i}"), common::sh(count_zombies));
        assert_eq!(status, ExitStatus::Exited(0));
        if out.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left in the guest: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // guest-init brought the guest's own loopback up at boot (rp1 shares the guest's network).
    let (_, out, _) = t.run("rp1", "lo", common::sh("cat /sys/class/net/lo/flags"));
    assert_eq!(out.trim(), "0x9", "lo flags in the guest");

    // Shutdown: the answer arrives, then the VM ends on its own.
    t.client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = qemu.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "VM still running 30 s after Shutdown:\n{}",
            console_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = console_text();
    assert!(status.success(), "qemu exited with {status}:\n{text}");
    assert!(text.contains("guest-init: resetting the VM"), "{text}");
    assert!(!text.contains("Kernel panic"), "{text}");
}
