//! host-vmm under `--jail` (with the default `--seccomp kill`), run as root dropping to
//! uid/gid 65534: the block and vsock test guests work unchanged; the jailed process has no
//! capabilities, no_new_privs, the jail ids, no inherited fds, a root holding only what the jail
//! put there, and mounts only the jail's; the monitor forwards SIGTERM; a rootless run gets
//! as far as opening /dev/kvm.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::guests::{
    boot_guest, fnv1a, guest, host_vmm, pattern_byte, pseudo_random, Guest, RunningVm, TempDir,
};
use kiln_tests::require_kvm;

const WAIT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;
const SECTORS: u64 = 128;

/// KVM and root (the jail drops to another uid); a missing one is logged loudly.
fn kvm_and_root(test: &str) -> bool {
    if !require_kvm(test) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: needs root (the jail switches to uid {NOBODY})");
        return false;
    }
    true
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A disk image owned by the jail uid.
fn image(dir: &TempDir, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::write(&path, bytes).expect("writing the image");
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown image");
    path
}

fn jail_args(jail: &Path) -> Vec<String> {
    vec![
        "--jail".into(),
        s(jail).into(),
        "--jail-uid".into(),
        NOBODY.to_string(),
        "--jail-gid".into(),
        NOBODY.to_string(),
    ]
}

/// The hybrid-vsock handshake on the device's socket.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connect to the vsock socket");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("CONNECT");
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        stream.read_exact(&mut b).expect("the OK line");
        reply.push(b[0]);
    }
    assert!(reply.starts_with(b"OK "), "{reply:?}");
    stream
}

/// Writes `data`, half-closes, reads everything back.
fn echo(stream: UnixStream, data: &[u8]) -> Vec<u8> {
    let mut w = stream.try_clone().expect("clone");
    let d = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&d).expect("write");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::new();
    let mut r = stream;
    r.read_to_end(&mut back).expect("echo");
    writer.join().expect("writer");
    back
}

#[test]
fn blk_write_and_read_in_the_jail() {
    if !kvm_and_root("blk_write_and_read_in_the_jail") {
        return;
    }
    let dir = TempDir::new("jail-blk");
    let before = pseudo_random((SECTORS * 512) as usize, 11);
    let disk = image(&dir, &before);
    let jail = dir.path().join("jail");
    let mut args: Vec<String> = vec!["--rootfs".into(), s(&disk).into()];
    args.extend(jail_args(&jail));
    args.extend(["--cmdline".into(), "kiln.sector=5 kiln.sectors=4".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "blk-write", &argv);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.expect("blk.readback"), "match");
    assert_eq!(out.expect("blk.flush.status"), "0");
    let after = std::fs::read(&disk).expect("reading the image back");
    assert_eq!(after.len(), before.len());
    for (i, (&a, &b)) in after.iter().zip(&before).enumerate() {
        let want = if (5 * 512..9 * 512).contains(&i) {
            pattern_byte(i as u64)
        } else {
            b
        };
        assert_eq!(a, want, "byte {i} of the image");
    }

    // Read-only, a second VM in the same jail directory.
    let mut args: Vec<String> = vec!["--rootfs".into(), s(&disk).into(), "--read-only".into()];
    args.extend(jail_args(&jail));
    args.extend(["--cmdline".into(), format!("kiln.sectors={SECTORS}")]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "blk-read", &argv);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.expect("blk.read.fnv"),
        format!("{:#018x}", fnv1a(&after))
    );
}

#[test]
fn vsock_both_ways_in_the_jail() {
    if !kvm_and_root("vsock_both_ways_in_the_jail") {
        return;
    }
    let dir = TempDir::new("jail-vsock");
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).expect("jail dir");
    let uds = jail.join("vsock.sock");
    let mut args = vec!["--vsock-uds".to_string(), s(&uds).into()];
    args.extend(jail_args(&jail));

    // Host -> guest.
    let mut vm = RunningVm::start(&args, "vsock-echo-server kiln.vsock.conns=1");
    assert_eq!(vm.wait_line("KILN-TEST vsock.listening="), "5000");
    let data = pseudo_random(1 << 20, 5);
    assert_eq!(echo(vsock_connect(&uds, 5000), &data), data);
    let (code, stderr) = vm.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(!uds.exists(), "the jailed VMM removes its socket");

    // Guest -> host: the listener lives in the jail directory, connectable by the jail uid.
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).expect("bind");
    std::fs::set_permissions(
        format!("{}_6000", uds.display()),
        std::fs::Permissions::from_mode(0o777),
    )
    .expect("chmod listener");
    let mut vm = RunningVm::start(&args, "vsock-connect kiln.vsock.conns=1");
    let stream = kiln_tests::bounded::accept(&listener, WAIT, "the jailed guest");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let data = pseudo_random(300_000, 6);
    assert_eq!(echo(stream, &data), data);
    let (code, stderr) = vm.wait();
    assert_eq!(code, 0, "{stderr}");
}

/// `Name:\tvalue` from a /proc status file.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in status"))
}

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

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn jailed_process_is_confined() {
    if !kvm_and_root("jailed_process_is_confined") {
        return;
    }
    let dir = TempDir::new("jail-confined");
    let disk = image(&dir, &pseudo_random(64 * 1024, 1));
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).expect("jail dir");
    let uds = jail.join("vsock.sock");
    // A host file the VMM must not keep: an inherited fd without CLOEXEC.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"host secret").expect("secret");
    let secret_file = std::fs::File::open(&secret).expect("open secret");
    // SAFETY: dup without O_CLOEXEC so host-vmm inherits it; closed below.
    let leaked = unsafe { libc::dup(secret_file.as_raw_fd()) };
    assert!(leaked > 2);
    let mut args = vec![
        "--rootfs".to_string(),
        s(&disk).into(),
        "--vsock-uds".into(),
        s(&uds).into(),
        "--vcpus".into(),
        "2".into(),
    ];
    args.extend(jail_args(&jail));
    let mut vm = RunningVm::start(&args, "idle");
    // SAFETY: our duplicate, no longer needed once the child has started.
    unsafe { libc::close(leaked) };
    vm.wait_line("KILN-TEST marker");
    let monitor = vm.pid();
    let pid = only_child(monitor);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).expect("status");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    assert_eq!(status_field(&status, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Groups:"), "");
    assert_eq!(
        status_field(&status, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    // Its own namespaces, not the host's.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("own ns");
        let its = std::fs::read_link(proc_dir.join("ns").join(ns)).expect("jailed ns");
        assert_ne!(mine, its, "{ns} namespace is shared with the host");
    }
    // Its root holds only what the jail put there.
    let root = proc_dir.join("root");
    let mut want = vec!["dev", "kernel", "rootfs", "vsock.sock"];
    if Path::new("/sys/module/kvm_pvm").exists() {
        want.push("sys");
    }
    want.sort_unstable();
    assert_eq!(names_in(&root), want);
    assert_eq!(names_in(&root.join("dev")), ["kvm"]);
    // No host path resolves there.
    for host_path in ["etc/passwd", "proc/self", "usr", "tmp", "work"] {
        assert!(
            !root.join(host_path).exists(),
            "{host_path} visible in the jail"
        );
    }
    // Other local users cannot reach the socket: DIR is 0700 and owned by the jail uid.
    let meta = std::fs::metadata(&jail).expect("jail dir");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, NOBODY));
    let mounts = std::fs::read_to_string(proc_dir.join("mountinfo")).expect("mountinfo");
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut want_points = vec!["/", "/dev", "/kernel", "/rootfs"];
    if want.contains(&"sys") {
        want_points.push("/sys");
    }
    want_points.sort_unstable();
    assert_eq!(points, want_points, "{mounts}");
    // No inherited fd survived: nothing points at the host file, only stdio, KVM and device fds.
    for fd in std::fs::read_dir(proc_dir.join("fd"))
        .expect("fd dir")
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(!t.contains("secret"), "fd {:?} -> {t}", fd.file_name());
        assert!(
            t.starts_with("anon_inode:")
                || t.starts_with("socket:")
                || t.starts_with("pipe:")
                || t == "/dev/null"
                || t == "/dev/kvm"
                || t == "/rootfs",
            "unexpected fd {:?} -> {t}",
            fd.file_name()
        );
    }
    let limits = std::fs::read_to_string(proc_dir.join("limits")).expect("limits");
    let line = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(line("Max open files").contains("1024 1024"), "{limits}");
    assert!(line("Max file size").contains("65536 65536"), "{limits}");
    assert!(line("Max core file size").contains("0 0"), "{limits}");

    // SIGTERM to the monitor ends the VMM (forwarded as SIGKILL).
    // SAFETY: signals our own child.
    unsafe { libc::kill(monitor as i32, libc::SIGTERM) };
    let (code, stderr) = vm.wait();
    assert_eq!(code, 128 + libc::SIGKILL, "{stderr}");
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "jailed VMM {pid} still alive");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn user_errors_name_the_problem() {
    if !require_kvm("user_errors_name_the_problem") {
        return;
    }
    let dir = TempDir::new("jail-errors");
    let jail = dir.path().join("jail");
    let outside = dir.path().join("v.sock");
    let out = kiln_tests::guests::run_vmm([
        "--kernel",
        s(&guest(Guest::Pvh)),
        "--vsock-uds",
        s(&outside),
        "--jail",
        s(&jail),
    ]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("with --jail the socket must be inside"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.describe());
    let out = kiln_tests::guests::run_vmm(["--kernel", "/nonexistent/k", "--jail", s(&jail)]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("kernel /nonexistent/k"),
        "{}",
        out.describe()
    );
}

/// Not root: a user namespace maps only the caller's ids; the jail is built and the VMM then
/// needs /dev/kvm access of its own (this machine's /dev/kvm is root-only, so a run as nobody
/// stops exactly there).
#[test]
fn rootless_jail_reaches_dev_kvm() {
    if !kvm_and_root("rootless_jail_reaches_dev_kvm") {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("rootless_jail_reaches_dev_kvm: no setpriv, skipped");
        return;
    }
    let dir = TempDir::new("jail-rootless");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    let kernel = dir.path().join("guest");
    std::fs::copy(guest(Guest::Pvh), &kernel).expect("copy guest");
    std::os::unix::fs::chown(&kernel, Some(NOBODY), Some(NOBODY)).expect("chown");
    // A ro drive too: its bind mount is made inside the user namespace as well.
    let drive = dir.path().join("drive.img");
    std::fs::write(&drive, [7u8; 4096]).expect("drive");
    std::os::unix::fs::chown(&drive, Some(NOBODY), Some(NOBODY)).expect("chown");
    let jail = dir.path().join("jail");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(host_vmm())
        .args(["--kernel", s(&kernel), "--jail", s(&jail)])
        .args(["--drive", &format!("{},ro", s(&drive))])
        .args(["--cmdline", "kiln.test=marker"]);
    let out = kiln_tests::guests::run_with_timeout(cmd, WAIT).expect("run");
    let kvm_mode = std::fs::metadata("/dev/kvm")
        .expect("/dev/kvm")
        .permissions()
        .mode();
    if kvm_mode & 0o006 == 0o006 {
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        assert!(out.saw("marker"));
    } else {
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.contains("cannot open /dev/kvm"),
            "the jail must be built before KVM is opened\n{}",
            out.describe()
        );
    }
    // The jail was built: its placeholders exist on the host, owned by the caller.
    let names = names_in(&jail);
    assert_eq!(names.first().map(String::as_str), Some("dev"));
    assert!(names.iter().any(|n| n == "drives"), "{names:?}");
}

/// The monitor exits with the jailed VMM's own status (here a guest crash, 2).
#[test]
fn guest_crash_status_passes_through_the_monitor() {
    if !kvm_and_root("guest_crash_status_passes_through_the_monitor") {
        return;
    }
    let dir = TempDir::new("jail-crash");
    let jail = dir.path().join("jail");
    let args = jail_args(&jail);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "triple-fault", &argv);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("guest crashed"), "{}", out.describe());
}

/// A file owned by root, mode 0644: the jail uid may read it but not write it.
fn root_owned(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("writing a drive image");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// The mount options (field 6 of mountinfo) of the topmost mount at `point`.
fn mount_options<'a>(mountinfo: &'a str, point: &str) -> &'a str {
    mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .rev()
        .find(|f| f.get(4) == Some(&point))
        .and_then(|f| f.get(5).copied())
        .unwrap_or_else(|| panic!("no mount at {point}\n{mountinfo}"))
}

/// `--drive` under `--jail`: a `ro` drive owned by root (0644) is read by the jailed guest as
/// the second device, offered read-only, refuses writes and stays unchanged; a rw drive larger
/// than the rootfs is written past the rootfs's size (the file size limit follows the largest
/// disk); the jail holds `/drives/0` and `/drives/1` and nothing else of the host, the ro one
/// bound and opened read-only; the host sees only empty placeholders afterwards.
#[test]
fn drives_in_the_jail() {
    if !kvm_and_root("drives_in_the_jail") {
        return;
    }
    let dir = TempDir::new("jail-drives");
    let rootfs = image(&dir, &pseudo_random((SECTORS * 512) as usize, 21));
    let data_sectors = 48u64;
    let data = pseudo_random((data_sectors * 512) as usize, 0x6a61696c);
    let data_path = root_owned(&dir, "data.img", &data);
    // A host file next to the drives that must not appear in the jail.
    std::fs::write(dir.path().join("neighbour"), b"host only").expect("neighbour");
    let rw_sectors = 1024u64;
    let rw_path = dir.path().join("scratch.img");
    std::fs::write(&rw_path, vec![0u8; (rw_sectors * 512) as usize]).expect("scratch");
    std::os::unix::fs::chown(&rw_path, Some(NOBODY), Some(NOBODY)).expect("chown scratch");
    let jail = dir.path().join("jail");
    let mut args: Vec<String> = vec![
        "--rootfs".into(),
        s(&rootfs).into(),
        "--drive".into(),
        format!("{},ro,serial=kiln-jail-data", s(&data_path)),
        "--drive".into(),
        format!("{},serial=kiln-jail-rw", s(&rw_path)),
    ];
    args.extend(jail_args(&jail));

    // The ro drive, read as the second device.
    let with = |cmdline: String| {
        let mut a = args.clone();
        a.extend(["--cmdline".into(), cmdline]);
        a
    };
    let a = with(format!("kiln.blk_index=1 kiln.sectors={data_sectors}"));
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "blk-read", &argv);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.get("blk.error").is_none(), "{}", out.describe());
    assert_eq!(out.expect("virtio.devices"), "3", "{}", out.describe());
    assert_eq!(out.expect("blk.capacity"), data_sectors.to_string());
    assert_eq!(out.expect("blk.ro"), "1", "a ro drive is offered read-only");
    assert_eq!(out.expect("blk.read.status"), "0", "{}", out.describe());
    assert_eq!(
        out.expect("blk.read.fnv"),
        format!("{:#018x}", fnv1a(&data)),
        "the jailed guest must read the second drive's image"
    );
    assert_eq!(out.expect("blk.read.get_id"), "kiln-jail-data");

    // A write to it fails and the file is unchanged.
    let a = with("kiln.blk_index=1".into());
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "blk-ro", &argv);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let w = out.expect("blk.write.status");
    assert!(w == "1" || w == "2", "write to a ro drive: status {w}");
    assert_eq!(std::fs::read(&data_path).expect("data.img"), data);

    // The rw drive, written past the rootfs's size.
    let first = 1000u64;
    let a = with(format!(
        "kiln.blk_index=2 kiln.sector={first} kiln.sectors=4"
    ));
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = boot_guest(Guest::Pvh, "blk-write", &argv);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.expect("blk.write.status"), "0", "{}", out.describe());
    assert_eq!(out.expect("blk.readback"), "match");
    assert_eq!(out.expect("blk.flush.status"), "0");
    let after = std::fs::read(&rw_path).expect("scratch.img");
    assert_eq!(after.len() as u64, rw_sectors * 512);
    for (i, &b) in after.iter().enumerate() {
        let written = (first * 512..(first + 4) * 512).contains(&(i as u64));
        let want = if written { pattern_byte(i as u64) } else { 0 };
        assert_eq!(b, want, "byte {i} of the rw drive");
    }

    // A running jailed VM with both drives: what its root holds.
    let mut vm = RunningVm::start(&args, "idle");
    let monitor = vm.pid();
    let pid = only_child(monitor);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // The VM is built (drives open) once the guest runs: wait for its device fds.
    let deadline = Instant::now() + WAIT;
    let drive_fds = loop {
        let fds: Vec<(String, String)> = std::fs::read_dir(proc_dir.join("fd"))
            .expect("fd dir")
            .flatten()
            .filter_map(|fd| {
                let target = std::fs::read_link(fd.path()).ok()?;
                let t = target.to_string_lossy().into_owned();
                t.starts_with("/drives/")
                    .then(|| (fd.file_name().to_string_lossy().into_owned(), t))
            })
            .collect();
        if fds.len() == 2 {
            break fds;
        }
        assert!(Instant::now() < deadline, "drive fds: {fds:?}");
        thread::sleep(Duration::from_millis(10));
    };
    // Opened O_RDONLY / O_RDWR as asked.
    for (fd, target) in &drive_fds {
        let info = std::fs::read_to_string(proc_dir.join("fdinfo").join(fd)).expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| i32::from_str_radix(v.trim(), 8).expect("octal flags"))
            .expect("flags line");
        let want = if target == "/drives/0" {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        assert_eq!(
            flags & libc::O_ACCMODE,
            want,
            "{target} opened with {flags:o}"
        );
    }
    let root = proc_dir.join("root");
    let mut want = vec!["dev", "drives", "kernel", "rootfs"];
    if Path::new("/sys/module/kvm_pvm").exists() {
        want.push("sys");
    }
    want.sort_unstable();
    assert_eq!(names_in(&root), want);
    assert_eq!(names_in(&root.join("drives")), ["0", "1"]);
    assert_eq!(names_in(&root.join("dev")), ["kvm"]);
    for host_path in ["etc/passwd", "neighbour", "data.img", "work", "tmp"] {
        assert!(
            !root.join(host_path).exists(),
            "{host_path} visible in the jail"
        );
    }
    // The jail's view of the drives is the drives' content.
    let seen = std::fs::read(root.join("drives/0")).expect("reading /drives/0 through /proc");
    assert_eq!(seen, data);
    // The ro drive is a read-only mount: not even root can write through it.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("drives/0"))
        .expect_err("/drives/0 opened for writing");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let mounts = std::fs::read_to_string(proc_dir.join("mountinfo")).expect("mountinfo");
    let opts = |p| mount_options(&mounts, p).split(',').collect::<Vec<_>>();
    for point in ["/drives", "/drives/0"] {
        for flag in ["ro", "nosuid", "noexec"] {
            assert!(opts(point).contains(&flag), "{point}: {:?}", opts(point));
        }
    }
    for flag in ["rw", "nosuid", "nodev", "noexec"] {
        assert!(opts("/drives/1").contains(&flag), "{:?}", opts("/drives/1"));
    }
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut want_points = vec![
        "/",
        "/dev",
        "/drives",
        "/drives/0",
        "/drives/1",
        "/kernel",
        "/rootfs",
    ];
    if want.contains(&"sys") {
        want_points.push("/sys");
    }
    want_points.sort_unstable();
    assert_eq!(points, want_points, "{mounts}");
    // The file size limit is the largest disk (the rw drive), not the rootfs.
    let limits = std::fs::read_to_string(proc_dir.join("limits")).expect("limits");
    let fsize = (rw_sectors * 512).to_string();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.split_whitespace().any(|w| w == fsize)),
        "{limits}"
    );
    // SAFETY: signals our own child.
    unsafe { libc::kill(monitor as i32, libc::SIGTERM) };
    let (code, stderr) = vm.wait();
    assert_eq!(code, 128 + libc::SIGKILL, "{stderr}");

    // On the host: only the empty placeholders, nothing written into DIR.
    let mut host_want = vec!["dev", "drives", "kernel", "rootfs"];
    if want.contains(&"sys") {
        host_want.push("sys");
    }
    assert_eq!(names_in(&jail), host_want);
    assert!(names_in(&jail.join("drives")).is_empty());
    for placeholder in ["kernel", "rootfs"] {
        let len = std::fs::metadata(jail.join(placeholder))
            .expect("placeholder")
            .len();
        assert_eq!(len, 0, "{placeholder} placeholder on the host");
    }
    assert_eq!(std::fs::read(&data_path).expect("data.img"), data);
}

/// A drive the jail uid may not write is refused on the host, one line naming it, before
/// anything is built; the same drive with `ro` is fine (covered above).
#[test]
fn drive_the_jail_uid_cannot_write_is_one_line() {
    if !kvm_and_root("drive_the_jail_uid_cannot_write_is_one_line") {
        return;
    }
    let dir = TempDir::new("jail-drive-access");
    let data = root_owned(&dir, "data.img", &[0u8; 4096]);
    let jail = dir.path().join("jail");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        s(&guest(Guest::Pvh)).into(),
        "--drive".into(),
        s(&data).into(),
    ];
    args.extend(jail_args(&jail));
    let out = kiln_tests::guests::run_vmm(&args);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let want = format!(
        "host-vmm: error: --drive {}: not readable and writable by the jail uid 65534 / gid 65534 (owner 0:0, mode 0644)",
        data.display()
    );
    assert_eq!(out.stderr.trim(), want, "{}", out.describe());
    assert!(
        !jail.join("drives").exists(),
        "nothing built for a refused drive"
    );
}
