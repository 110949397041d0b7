//! Boots kiln's own guest kernel (kernel-config/) with a busybox root filesystem.
//!
//! 1. Under QEMU TCG (`-M microvm`, pure software): the kernel must reach the busybox `/init`,
//!    which reports what the config promises (SMP, devtmpfs, cgroup v2 controllers, namespaces,
//!    seccomp) and reboots through the i8042 reset (`reboot=k`), ending QEMU cleanly.
//! 2. Under host-vmm on KVM: on a hardware-KVM host the same full run is expected. On a PVM host
//!    (`/sys/module/kvm_pvm`, design.md "This machine's KVM is PVM") the test boots the PVM
//!    flavour of the kernel (`build.sh --flavour pvm`, whose patch lets user-mode SYSCALLs reach
//!    the kernel there) and expects the same full run, with one vCPU and 128 MiB.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_tests::{images, kernel};

/// `/init` for the boot tests. Every `KILN-` line is checked by [`check_full_boot`].
const INIT_SCRIPT: &str = r#"#!/bin/sh
export PATH=/bin
echo KILN-INIT-START
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "KILN-UNAME $(uname -r)"
echo "KILN-CPUS $(grep -c ^processor /proc/cpuinfo)"
echo "KILN-DEVTMPFS $(grep -c '^devtmpfs /dev devtmpfs' /proc/mounts)"
echo "KILN-ROOT $(grep '^/dev/root / ext4' /proc/mounts | cut -d' ' -f1-3)"
echo "KILN-CGROUP $(cat /sys/fs/cgroup/cgroup.controllers)"
echo "KILN-NS $(ls /proc/self/ns | tr '\n' ' ')"
echo "KILN-SECCOMP $(grep -c '^Seccomp:' /proc/self/status)"
echo KILN-INIT-DONE
reboot -f
"#;

/// What a finished VM run produced.
struct Run {
    /// Exit status, `None` when the VM was killed at the timeout.
    status: Option<ExitStatus>,
    /// Console output (stdout and stderr interleaved as they arrived).
    console: String,
    /// Wall time from spawn to the first console line containing each watched needle.
    seen: Vec<(&'static str, Option<Duration>)>,
    /// Wall time from spawn to exit (or kill).
    elapsed: Duration,
}

impl Run {
    fn seen_at(&self, needle: &str) -> Option<Duration> {
        self.seen
            .iter()
            .find(|(n, _)| *n == needle)
            .and_then(|(_, t)| *t)
    }

    /// The last `n` lines of the console, for failure messages.
    fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// How long a VM may keep running after the `stop_after` needle of [`run_vm`] appeared.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `cmd` with stdin closed, collecting its console until it exits or `timeout` passes (then
/// it is killed). `watch` lists console substrings whose first appearance is timed. When
/// `stop_after` is one of them, the VM is killed [`STOP_GRACE`] after it appeared.
fn run_vm(
    mut cmd: Command,
    timeout: Duration,
    watch: &[&'static str],
    stop_after: Option<&'static str>,
) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let console = Arc::new(Mutex::new(String::new()));
    let seen = Arc::new(Mutex::new(
        watch.iter().map(|w| (*w, None)).collect::<Vec<_>>(),
    ));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped stderr")),
    ]
    .into_iter()
    .map(|mut pipe| {
        let console = Arc::clone(&console);
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut text = console.lock().expect("console lock");
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                for (needle, at) in seen.lock().expect("seen lock").iter_mut() {
                    if at.is_none() && text.contains(*needle) {
                        *at = Some(start.elapsed());
                    }
                }
            }
        })
    })
    .collect();

    let status = loop {
        match child.try_wait().expect("waiting for the VM") {
            Some(status) => break Some(status),
            None if start.elapsed() > timeout || stop_due(&seen, stop_after, start.elapsed()) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let elapsed = start.elapsed();
    // The pipes end with the VM; a process that inherited them must not hang the test.
    let grace = Instant::now() + Duration::from_secs(10);
    for reader in readers {
        while !reader.is_finished() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let console = console.lock().expect("console lock").clone();
    let seen = seen.lock().expect("seen lock").clone();
    Run {
        status,
        console,
        seen,
        elapsed,
    }
}

/// True once `stop_after` was seen at least [`STOP_GRACE`] before `now` (both measured from the
/// VM's spawn).
fn stop_due(
    seen: &Mutex<Vec<(&'static str, Option<Duration>)>>,
    stop_after: Option<&str>,
    now: Duration,
) -> bool {
    let Some(needle) = stop_after else {
        return false;
    };
    let seen = seen.lock().expect("seen lock");
    let at = seen
        .iter()
        .find(|(n, _)| *n == needle)
        .and_then(|(_, t)| *t);
    at.is_some_and(|at| now >= at + STOP_GRACE)
}

/// The guest's own printk timestamp (seconds since kernel start) on the console line holding
/// `needle`, e.g. `[    0.412345] Run /init as init process`.
fn printk_time(console: &str, needle: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(needle))?;
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    line[open + 1..close].trim().parse().ok()
}

/// The value after `KILN-<key> ` on the console, if the guest printed it.
fn marker<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("KILN-{key} ");
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
}

/// Asserts a complete boot: `/init` ran every check and the VM ended through the reset.
fn check_full_boot(run: &Run, cpus: u32, what: &str) {
    let c = &run.console;
    let tail = run.tail(60);
    assert!(
        run.status.is_some(),
        "{what}: VM killed after {:?}; console tail:\n{tail}",
        run.elapsed
    );
    assert!(!c.contains("Kernel panic"), "{what}: kernel panic:\n{tail}");
    assert!(
        c.contains("KILN-INIT-DONE"),
        "{what}: /init did not finish:\n{tail}"
    );
    let uname = marker(c, "UNAME").unwrap_or("");
    assert!(uname.starts_with("6.1."), "{what}: uname -r is '{uname}'");
    assert_eq!(
        marker(c, "CPUS"),
        Some(cpus.to_string().as_str()),
        "{what}: CPU count"
    );
    assert_eq!(
        marker(c, "DEVTMPFS"),
        Some("1"),
        "{what}: devtmpfs not auto-mounted on /dev"
    );
    assert_eq!(
        marker(c, "ROOT"),
        Some("/dev/root / ext4"),
        "{what}: root filesystem"
    );
    let controllers: Vec<&str> = marker(c, "CGROUP").unwrap_or("").split(' ').collect();
    for want in ["cpuset", "cpu", "memory", "pids"] {
        assert!(
            controllers.contains(&want),
            "{what}: cgroup v2 lacks {want}: {controllers:?}"
        );
    }
    let ns: Vec<&str> = marker(c, "NS").unwrap_or("").split_whitespace().collect();
    for want in ["cgroup", "ipc", "mnt", "net", "pid", "user", "uts"] {
        assert!(
            ns.contains(&want),
            "{what}: namespace {want} missing: {ns:?}"
        );
    }
    assert_eq!(
        marker(c, "SECCOMP"),
        Some("1"),
        "{what}: no seccomp in /proc/self/status"
    );
    assert!(
        c.contains("NET: Registered PF_VSOCK protocol family"),
        "{what}: vsock not built in:\n{tail}"
    );
    let status = run.status.expect("checked above");
    assert!(
        status.success(),
        "{what}: VM exit status {status}; console tail:\n{tail}"
    );
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report(what: &str, run: &Run) {
    let init = "Run /init as init process";
    eprintln!(
        "{what}: spawn->'{init}' {:?} (printk {:?} s), spawn->marker {:?}, spawn->restart {:?}, \
         spawn->exit {:?}",
        run.seen_at(init),
        printk_time(&run.console, init),
        run.seen_at("KILN-INIT-DONE"),
        run.seen_at("reboot: machine restart"),
        run.elapsed
    );
}

#[test]
fn linux_boots_to_busybox_init_under_qemu_tcg() {
    let vmlinux = kernel::vmlinux();
    let scratch = Scratch::new("linux-tcg");
    let image = images::busybox_ext4(&scratch.0, INIT_SCRIPT).expect("building the test image");

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max"])
        .args(["-smp", "2", "-m", "256"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&vmlinux)
        .args([
            "-append",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/init",
        ])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root", "-no-reboot"])
        // The keyboard controller, as host-vmm has one: `reboot=k` then resets through port 0x64
        // at once (without it the kernel's reset attempts time out first, costing seconds).
        .args(["-device", "i8042"]);
    let run = run_vm(
        qemu,
        Duration::from_secs(120),
        &[
            "Run /init as init process",
            "KILN-INIT-DONE",
            "reboot: machine restart",
        ],
        None,
    );
    report("QEMU TCG", &run);
    check_full_boot(&run, 2, "QEMU TCG");
}

/// host-vmm's binary: `$KILN_HOST_VMM`, else the one cargo built next to this test binary
/// (`cargo test --workspace` builds it).
fn host_vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_HOST_VMM") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/<profile>/deps/linux_boot-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let bin = profile_dir.join("host-vmm");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p host-vmm` with the same profile, or set KILN_HOST_VMM",
        bin.display()
    );
    bin
}

#[test]
fn linux_boots_under_host_vmm() {
    if !kiln_tests::require_kvm("linux_boots_under_host_vmm") {
        return;
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let vmlinux = if pvm {
        kernel::vmlinux_pvm()
    } else {
        kernel::vmlinux()
    };
    let scratch = Scratch::new("linux-host-vmm");
    let image = images::busybox_ext4(&scratch.0, INIT_SCRIPT).expect("building the test image");

    // On PVM every guest-kernel instruction is emulated and boot work grows with memory and
    // CPUs (struct page set-up, AP bring-up), so the PVM run uses one vCPU and 128 MiB; the
    // bare-metal test guests check multi-vCPU start-up there.
    let (vcpus, mem_mib) = if pvm { (1, 128) } else { (2, 256) };
    let mut vmm = Command::new(host_vmm_binary());
    vmm.arg("--kernel")
        .arg(&vmlinux)
        .arg("--rootfs")
        .arg(&image)
        .args([
            "--vcpus",
            &vcpus.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
        ])
        .args(["--cmdline", "init=/init"]);
    let init = "Run /init as init process";
    let watch = [
        "virtio_blk virtio0: [vda]",
        "EXT4-fs (vda): mounted",
        init,
        "KILN-INIT-DONE",
    ];
    if !pvm {
        let run = run_vm(vmm, Duration::from_secs(60), &watch, None);
        report("host-vmm (KVM)", &run);
        check_full_boot(&run, vcpus, "host-vmm (KVM)");
        return;
    }

    // PVM: every guest-kernel instruction is emulated (kernel-config/README.md, "PVM flavour"):
    // /init after about 60-90 s on a loaded 2-core host, then the busybox checks take a while.
    let run = run_vm(vmm, Duration::from_secs(900), &watch, None);
    report("host-vmm (PVM)", &run);
    check_full_boot(&run, vcpus, "host-vmm (PVM flavour)");
}

#[test]
fn console_parsing_helpers() {
    let console = "[    0.412345] Run /init as init process\r\nKILN-CPUS 2\r\nKILN-UNAME 6.1.192\n";
    assert_eq!(printk_time(console, "Run /init"), Some(0.412345));
    assert_eq!(printk_time(console, "absent"), None);
    assert_eq!(marker(console, "CPUS"), Some("2"));
    assert_eq!(marker(console, "UNAME"), Some("6.1.192"));
    assert_eq!(marker(console, "NS"), None);
}
