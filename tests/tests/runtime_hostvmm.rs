//! `kiln --vmm host-vmm run` end to end, on every host where host-vmm can run Linux userspace:
//! hardware KVM with the default kernel, or a PVM host (`/sys/module/kvm_pvm`) with the PVM kernel
//! flavour (`kernel-config/build.sh --flavour pvm`, built here if needed). One container, one
//! boot (a PVM boot takes about a minute, more under load): a busybox shell prints a line and
//! exits 3, which `kiln run` must return with the output. The other runtime tests run through
//! whatever `kiln` picks (QEMU TCG on PVM hosts); this one pins host-vmm and prints the backend
//! line of kiln's log. Bounded: `kiln run` is killed after [`DEADLINE`], then `delete --force`
//! removes whatever is left (shim, VMM, state).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::guests::TempDir;
use kiln_tests::runtime::{busybox_bundle, kiln_bin, kiln_env};

/// The whole `kiln run` (PVM: agent ready after 33-60 s on a lightly loaded host).
const DEADLINE: Duration = Duration::from_secs(360);

/// The kernel host-vmm needs here: the PVM flavour on a PVM host, else the default flavour.
fn kernel_for_host_vmm() -> (PathBuf, &'static str) {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        (
            kiln_tests::kernel::vmlinux_pvm(),
            "PVM host, PVM kernel flavour",
        )
    } else {
        (
            kiln_tests::kernel::vmlinux(),
            "hardware KVM, default kernel",
        )
    }
}

#[test]
fn runtime_hostvmm_run_exit_code_and_output() {
    if !kiln_tests::require_kvm("runtime_hostvmm_run_exit_code_and_output") {
        return;
    }
    let (kernel, why) = kernel_for_host_vmm();
    let scratch = TempDir::new("rt-hostvmm");
    let root = scratch.path().join("root");
    let log = scratch.path().join("kiln.log");
    let (out, err) = (scratch.path().join("out"), scratch.path().join("err"));
    let bundle = busybox_bundle(
        &scratch.path().join("bundle"),
        &["sh", "-c", "echo hello from host-vmm; exit 3"],
    );
    let kiln = |args: &[&str]| {
        let mut c = Command::new(kiln_bin());
        c.envs(kiln_env())
            .env("KILN_KERNEL", &kernel)
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdin(Stdio::null());
        c
    };

    let started = Instant::now();
    let status = kiln_tests::bounded::status(
        kiln(&["--vmm", "host-vmm", "run", "--bundle"])
            .arg(&bundle)
            .arg("hv")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap()),
        DEADLINE,
        "kiln --vmm host-vmm run",
    );
    let took = started.elapsed();
    // Whatever happened, nothing stays behind (a no-op after a clean run).
    let _ = kiln_tests::bounded::status(
        kiln(&["delete", "--force", "hv"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        Duration::from_secs(60),
        "kiln delete --force",
    );

    let stdout = String::from_utf8_lossy(&std::fs::read(&out).unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&std::fs::read(&err).unwrap_or_default()).into_owned();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let backend_line = log_text
        .lines()
        .find(|l| l.contains(" VM (") && l.contains("created in a"))
        .unwrap_or("(no backend line in kiln's log)");
    eprintln!(
        "backend used: host-vmm ({why}, kernel {}); kiln run -> {:?} in {:.1} s\n  {backend_line}\n  \
         stdout: {}\n  stderr: {}",
        kernel.display(),
        status.code(),
        took.as_secs_f64(),
        stdout.trim_end(),
        stderr.trim_end()
    );
    assert_eq!(
        status.code(),
        Some(3),
        "kiln run status; stderr: {stderr}\nlog:\n{log_text}"
    );
    assert_eq!(stdout, "hello from host-vmm\n");
    assert!(
        backend_line.contains("host-vmm VM"),
        "kiln's log names another backend: {backend_line}"
    );
}
