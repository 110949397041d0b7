//! host-vmm's per-thread seccomp filters, seen from outside on a running VM: every thread of
//! the process (and of the jail's monitor) reports `Seccomp: 2` (filter mode) and exactly one
//! filter in `/proc/PID/task/*/status`; `--seccomp off` installs none; `--seccomp log` runs the
//! block and vsock guests without naming a single blocked call (the allow lists are complete
//! for that work). The filters' contents are tested in `host-vmm/src/seccomp/tests.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::guests::{boot_guest, pseudo_random, Guest, RunningVm, TempDir};
use kiln_tests::require_kvm;

const WAIT: Duration = Duration::from_secs(60);

/// `(tid, comm, Seccomp, Seccomp_filters)` of every thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

/// Polls until `pid` runs `vcpus` vCPU threads and every thread reports mode `mode` with
/// `filters` filters. Threads: the main thread (`host-vmm`), `vcpuN`, and threads KVM itself
/// adds to the process (`kvm-nx-lpage-recovery`, created at the first `KVM_RUN` from the vCPU
/// thread, so it carries that thread's filter; it never makes system calls of its own).
fn wait_for_filters(
    pid: u32,
    vcpus: usize,
    mode: &str,
    filters: &str,
) -> Vec<(String, String, String, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = thread_filters(pid);
        let known =
            |comm: &str| comm == "host-vmm" || comm.starts_with("vcpu") || comm.starts_with("kvm-");
        let n_vcpus = t.iter().filter(|x| x.1.starts_with("vcpu")).count();
        let main = t.iter().filter(|x| x.0 == pid.to_string()).count();
        if n_vcpus == vcpus
            && main == 1
            && t.iter()
                .all(|(_, c, m, f)| known(c) && m == mode && f == filters)
        {
            return t;
        }
        if Instant::now() > deadline {
            panic!(
                "pid {pid}: expected {vcpus} vCPU threads, all with Seccomp {mode} and {filters} \
                 filter(s); got {t:?}"
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until `pid` (the jail monitor) is single-threaded with mode `mode`, `filters` filters.
fn wait_for_monitor_filter(pid: u32, mode: &str, filters: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = thread_filters(pid);
        if t.len() == 1 && t[0].2 == mode && t[0].3 == filters {
            return;
        }
        assert!(Instant::now() < deadline, "monitor {pid}: {t:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The only child of `pid` (the jailed VMM under the monitor).
fn only_child(pid: u32) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let kids: Vec<u32> = text
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if kids.len() == 1 {
            return kids[0];
        }
        assert!(
            Instant::now() < deadline,
            "monitor {pid} children: {kids:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn disk(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pseudo_random(64 * 1024, 3)).expect("writing the image");
    path
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn every_vmm_thread_has_one_filter() {
    if !require_kvm("every_vmm_thread_has_one_filter") {
        return;
    }
    let dir = TempDir::new("seccomp-threads");
    let img = disk(&dir);
    let uds = dir.path().join("v.sock");
    let vm = RunningVm::start(
        &["--vcpus", "3", "--rootfs", s(&img), "--vsock-uds", s(&uds)],
        "idle",
    );
    vm.wait_line("KILN-TEST marker");
    wait_for_filters(vm.pid(), 3, "2", "1");
}

#[test]
fn seccomp_off_installs_no_filter() {
    if !require_kvm("seccomp_off_installs_no_filter") {
        return;
    }
    let vm = RunningVm::start(&["--vcpus", "2", "--seccomp", "off"], "idle");
    vm.wait_line("KILN-TEST marker");
    // Give the threads the time they would need to install a filter.
    thread::sleep(Duration::from_millis(200));
    wait_for_filters(vm.pid(), 2, "0", "0");
}

#[test]
fn jailed_vmm_threads_and_monitor_have_one_filter_each() {
    if !require_kvm("jailed_vmm_threads_and_monitor_have_one_filter_each") {
        return;
    }
    let dir = TempDir::new("seccomp-jail");
    let jail = dir.path().join("jail");
    let vm = RunningVm::start(
        &[
            "--vcpus",
            "2",
            "--jail",
            s(&jail),
            "--jail-uid",
            "65534",
            "--jail-gid",
            "65534",
        ],
        "idle",
    );
    vm.wait_line("KILN-TEST marker");
    wait_for_monitor_filter(vm.pid(), "2", "1");
    let child = only_child(vm.pid());
    wait_for_filters(child, 2, "2", "1");
}

#[test]
fn log_mode_names_nothing_for_block_and_vsock_work() {
    if !require_kvm("log_mode_names_nothing_for_block_and_vsock_work") {
        return;
    }
    let dir = TempDir::new("seccomp-log");
    let img = disk(&dir);
    let out = boot_guest(
        Guest::Pvh,
        "blk-write",
        &["--rootfs", s(&img), "--seccomp", "log", "--vcpus", "2"],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.expect("blk.readback"), "match");
    assert!(
        !out.stderr.contains("seccomp: blocked"),
        "{}",
        out.describe()
    );

    // vsock: host-initiated echo through the guest, then the guest shuts down.
    let uds = dir.path().join("v.sock");
    let mut vm = RunningVm::start(
        &["--vsock-uds", s(&uds), "--seccomp", "log"],
        "vsock-echo-server kiln.vsock.conns=1",
    );
    assert_eq!(vm.wait_line("KILN-TEST vsock.listening="), "5000");
    let mut stream = UnixStream::connect(&uds).expect("connect to the vsock socket");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(b"CONNECT 5000\n").expect("CONNECT");
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        stream.read_exact(&mut b).expect("the OK line");
        reply.push(b[0]);
    }
    assert!(reply.starts_with(b"OK "), "{reply:?}");
    let data = pseudo_random(256 * 1024, 9);
    let writer = {
        let mut w = stream.try_clone().expect("clone");
        let d = data.clone();
        thread::spawn(move || {
            w.write_all(&d).expect("write");
            w.shutdown(std::net::Shutdown::Write).expect("shutdown");
        })
    };
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("echo");
    writer.join().expect("writer");
    assert_eq!(back, data, "echoed bytes");
    let (code, stderr) = vm.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("seccomp: blocked"), "{stderr}");
}
