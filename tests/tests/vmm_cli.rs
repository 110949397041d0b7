//! host-vmm command-line errors: each bad input gives exit status 1 and exactly one line on stderr
//! naming the problem, and never a panic. Most need no KVM (host-vmm must validate its input
//! before touching /dev/kvm, or the message would be about KVM instead of the input).

use std::path::Path;
use std::process::Command;

use kiln_tests::guests::{guest, host_vmm, run_with_timeout, Guest, TempDir, VmOutput, VM_TIMEOUT};
use kiln_tests::require_kvm;

fn run(args: &[&str]) -> VmOutput {
    let mut cmd = Command::new(host_vmm());
    cmd.args(args);
    run_with_timeout(cmd, VM_TIMEOUT).expect("running host-vmm")
}

/// Exit 1, no panic, one stderr line mentioning every `needles` entry (case-insensitive).
fn assert_user_error(out: &VmOutput, needles: &[&str]) {
    assert_eq!(
        out.code(),
        Some(1),
        "expected exit status 1\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("panicked"),
        "host-vmm panicked\n{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("KILN-TEST"),
        "a guest ran\n{}",
        out.describe()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one error line\n{}",
        out.describe()
    );
    let line = lines[0].to_lowercase();
    for n in needles {
        assert!(
            line.contains(&n.to_lowercase()),
            "error line does not mention {n:?}: {line:?}"
        );
    }
}

fn kernel() -> String {
    guest(Guest::Pvh).to_str().expect("utf-8 path").to_string()
}

#[test]
fn missing_kernel_file() {
    let out = run(&["--kernel", "/nonexistent/kiln/vmlinux"]);
    assert_user_error(&out, &["/nonexistent/kiln/vmlinux"]);
}

#[test]
fn no_kernel_installed_is_one_line() {
    // Without --kernel, host-vmm picks the installed kiln kernel (`--kernel auto`); with none
    // installed it must say which build to run, in one line, and exit 1.
    if Path::new(host_vmm::kernel_pick::INSTALL_DIR).exists() {
        eprintln!(
            "a kiln kernel is installed in {}: case not applicable here",
            host_vmm::kernel_pick::INSTALL_DIR
        );
        return;
    }
    let empty = TempDir::new("cli-nokernel");
    let mut cmd = Command::new(host_vmm());
    cmd.env_remove("KILN_KERNEL")
        .env("KILN_KERNEL_CACHE", empty.path());
    let out = run_with_timeout(cmd, VM_TIMEOUT).expect("running host-vmm");
    assert_user_error(&out, &["kernel-config/build.sh", "--kernel"]);
}

#[test]
fn non_kernel_file_as_kernel() {
    let dir = TempDir::new("cli-notkernel");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"this is not a kernel image\n".repeat(100)).expect("write");
    let p = path.to_str().expect("utf-8");
    let out = run(&["--kernel", p]);
    assert_user_error(&out, &[p]);
}

#[test]
fn empty_file_as_kernel() {
    let dir = TempDir::new("cli-empty");
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").expect("write");
    let p = path.to_str().expect("utf-8");
    let out = run(&["--kernel", p]);
    assert_user_error(&out, &[p]);
}

#[test]
fn missing_rootfs_file() {
    let k = kernel();
    let out = run(&["--kernel", &k, "--rootfs", "/nonexistent/kiln/rootfs.img"]);
    assert_user_error(&out, &["/nonexistent/kiln/rootfs.img"]);
}

#[test]
fn zero_memory() {
    let k = kernel();
    let out = run(&["--kernel", &k, "--mem-mib", "0"]);
    assert_user_error(&out, &["mem"]);
}

#[test]
fn too_many_vcpus() {
    let k = kernel();
    let out = run(&["--kernel", &k, "--vcpus", "33"]);
    assert_user_error(&out, &["vcpus"]);
    let out = run(&["--kernel", &k, "--vcpus", "0"]);
    assert_user_error(&out, &["vcpus"]);
}

#[test]
fn bad_boot_protocol_value() {
    let k = kernel();
    let out = run(&["--kernel", &k, "--boot-protocol", "multiboot"]);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

#[test]
fn pvh_forced_on_kernel_without_note() {
    // Needs KVM only if host-vmm checks the note after opening /dev/kvm.
    if !require_kvm("pvh_forced_on_kernel_without_note") {
        return;
    }
    let k = guest(Guest::Linux64);
    let k = k.to_str().expect("utf-8");
    let out = run(&["--kernel", k, "--boot-protocol", "pvh"]);
    assert_user_error(&out, &["pvh"]);
}

/// With /dev/kvm absent (an empty tmpfs over /dev in a private mount namespace) host-vmm must
/// say so in one line. Needs root and unshare(1); skipped with a note otherwise.
#[test]
fn no_dev_kvm() {
    let unshare_ok = Command::new("unshare")
        .args(["-m", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !unshare_ok || !Path::new("/dev/kvm").exists() {
        eprintln!("no_dev_kvm: cannot hide /dev/kvm here (needs root, unshare and /dev/kvm)");
        return;
    }
    let script = "mount -t tmpfs none /dev && exec \"$0\" \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", script])
        .arg(host_vmm())
        .args(["--kernel", &kernel()]);
    let out = run_with_timeout(cmd, VM_TIMEOUT).expect("running host-vmm without KVM");
    assert_user_error(&out, &["kvm"]);
}
