//! host-vmm virtio-blk tests on KVM: a minimal virtio-mmio driver in the test guest reads, writes
//! and flushes sectors of a host file; the host side checks the file.

use std::path::{Path, PathBuf};

use kiln_tests::guests::{
    boot_guest, fnv1a, pattern_byte, pseudo_random, Guest, TempDir, VmOutput,
};
use kiln_tests::require_kvm;
use sha2::{Digest, Sha256};

const SECTORS: u64 = 128;

fn image(dir: &TempDir, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

fn sha256(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Sha256::digest(&bytes).to_vec()
}

fn run_blk(mode: &str, disk: &Path, extra: &[&str]) -> VmOutput {
    let disk = disk.to_str().expect("utf-8 temp path");
    let mut args = vec!["--rootfs", disk];
    args.extend_from_slice(extra);
    let out = boot_guest(Guest::Pvh, mode, &args);
    assert_eq!(
        out.code(),
        Some(0),
        "expected a clean exit\n{}",
        out.describe()
    );
    assert!(out.saw("done"), "guest did not finish\n{}", out.describe());
    assert!(
        out.get("blk.error").is_none(),
        "driver error\n{}",
        out.describe()
    );
    assert!(out.get("panic").is_none(), "{}", out.describe());
    assert_eq!(out.expect("virtio.devices"), "1");
    assert_eq!(
        out.expect("blk.capacity"),
        SECTORS.to_string(),
        "{}",
        out.describe()
    );
    out
}

#[test]
fn blk_cmdline_names_the_device() {
    if !require_kvm("blk_cmdline_names_the_device") {
        return;
    }
    let dir = TempDir::new("blk-cmdline");
    let disk = image(&dir, &vec![0u8; (SECTORS * 512) as usize]);
    let out = boot_guest(
        Guest::Pvh,
        "bootinfo",
        &["--rootfs", disk.to_str().expect("utf-8")],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let cmdline = out.expect("cmdline");
    assert!(cmdline.contains("root=/dev/vda rw"), "{cmdline:?}");
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmdline:?}"
    );
    // Order: base, root=, devices, then the user's --cmdline last.
    let root = cmdline.find("root=/dev/vda").expect("root=");
    let dev = cmdline.find("virtio_mmio.device=").expect("device");
    assert!(root < dev, "root= should precede the devices: {cmdline:?}");
    assert!(
        cmdline.ends_with("kiln.test=bootinfo"),
        "user text must come last: {cmdline:?}"
    );
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        1,
        "{cmdline:?}"
    );
    let out = boot_guest(
        Guest::Pvh,
        "bootinfo",
        &["--rootfs", disk.to_str().expect("utf-8"), "--read-only"],
    );
    assert!(
        out.expect("cmdline").contains("root=/dev/vda ro"),
        "{}",
        out.describe()
    );
}

#[test]
fn blk_reads_return_image_bytes() {
    if !require_kvm("blk_reads_return_image_bytes") {
        return;
    }
    let dir = TempDir::new("blk-read");
    let bytes = pseudo_random((SECTORS * 512) as usize, 0x6b696c6e);
    let disk = image(&dir, &bytes);
    let out = run_blk(
        "blk-read",
        &disk,
        &["--cmdline", &format!("kiln.sectors={SECTORS}")],
    );
    assert_eq!(out.expect("blk.read.status"), "0", "{}", out.describe());
    assert_eq!(out.expect("blk.read.sectors"), SECTORS.to_string());
    let first16: String = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        out.expect("blk.read.first16"),
        first16,
        "{}",
        out.describe()
    );
    assert_eq!(
        out.expect("blk.read.fnv"),
        format!("{:#018x}", fnv1a(&bytes)),
        "whole-disk hash"
    );
    assert_eq!(out.expect("blk.ro"), "0");
}

#[test]
fn blk_writes_reach_the_host_file() {
    if !require_kvm("blk_writes_reach_the_host_file") {
        return;
    }
    let dir = TempDir::new("blk-write");
    let before = pseudo_random((SECTORS * 512) as usize, 7);
    let disk = image(&dir, &before);
    let (first, count) = (5u64, 4u64);
    let out = run_blk(
        "blk-write",
        &disk,
        &[
            "--cmdline",
            &format!("kiln.sector={first} kiln.sectors={count}"),
        ],
    );
    assert_eq!(out.expect("blk.write.status"), "0", "{}", out.describe());
    assert_eq!(out.expect("blk.readback"), "match");
    assert_eq!(out.expect("blk.flush.status"), "0");
    let after = std::fs::read(&disk).expect("reading the image back");
    assert_eq!(after.len(), before.len(), "image size changed");
    let (lo, hi) = ((first * 512) as usize, ((first + count) * 512) as usize);
    for (i, (&a, &b)) in after.iter().zip(&before).enumerate() {
        let want = if (lo..hi).contains(&i) {
            pattern_byte(i as u64)
        } else {
            b
        };
        assert_eq!(a, want, "byte {i} of the image (written range {lo}..{hi})");
    }
}

#[test]
fn blk_read_only_rejects_writes() {
    if !require_kvm("blk_read_only_rejects_writes") {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let disk = image(&dir, &pseudo_random((SECTORS * 512) as usize, 99));
    let digest = sha256(&disk);
    let out = run_blk("blk-ro", &disk, &["--read-only"]);
    assert_eq!(
        out.expect("blk.ro"),
        "1",
        "VIRTIO_BLK_F_RO must be offered\n{}",
        out.describe()
    );
    assert_eq!(out.expect("blk.read.status"), "0");
    let w = out.expect("blk.write.status");
    assert!(
        w == "1" || w == "2",
        "write to a read-only disk returned status {w}"
    );
    assert_eq!(sha256(&disk), digest, "read-only image changed");
    // The same write without --read-only does reach the file (the test is not vacuous).
    let out = run_blk("blk-ro", &disk, &[]);
    assert_eq!(out.expect("blk.write.status"), "0", "{}", out.describe());
    assert_ne!(
        sha256(&disk),
        digest,
        "a writable image should have changed"
    );
}

#[test]
fn blk_out_of_range_sectors_fail() {
    if !require_kvm("blk_out_of_range_sectors_fail") {
        return;
    }
    let dir = TempDir::new("blk-oob");
    let bytes = pseudo_random((SECTORS * 512) as usize, 3);
    let disk = image(&dir, &bytes);
    let out = run_blk("blk-oob", &disk, &[]);
    assert_eq!(
        out.expect("blk.oob.last_sector.status"),
        "0",
        "{}",
        out.describe()
    );
    for key in ["at_capacity", "span", "huge", "write"] {
        assert_eq!(
            out.expect(&format!("blk.oob.{key}.status")),
            "1",
            "{key}: out-of-range request must get VIRTIO_BLK_S_IOERR\n{}",
            out.describe()
        );
    }
    assert_eq!(std::fs::read(&disk).expect("image"), bytes, "image changed");
}

/// Whether `strace` can trace a child here (it needs ptrace).
fn strace_works() -> bool {
    std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=none", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn blk_flush_reaches_the_disk() {
    if !require_kvm("blk_flush_reaches_the_disk") {
        return;
    }
    let dir = TempDir::new("blk-flush");
    let disk = image(&dir, &vec![0u8; (SECTORS * 512) as usize]);
    let out = run_blk("blk-flush", &disk, &[]);
    assert_eq!(
        out.expect("blk.flush"),
        "1",
        "VIRTIO_BLK_F_FLUSH must be offered"
    );
    assert_eq!(out.expect("blk.flush.status"), "0", "{}", out.describe());
    assert_eq!(
        out.expect("blk.get_id.status"),
        "0",
        "GET_ID\n{}",
        out.describe()
    );
    assert!(
        !out.expect("blk.get_id").is_empty(),
        "empty GET_ID serial\n{}",
        out.describe()
    );

    if !strace_works() {
        eprintln!("strace unavailable: checked the FLUSH status only, not the fdatasync");
        return;
    }
    // Trace the VMM: a guest FLUSH must become fdatasync/fsync on the backing file.
    let trace = dir.path().join("trace");
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=fdatasync,fsync", "-o"])
        .arg(&trace)
        .arg(kiln_tests::guests::host_vmm())
        .arg("--kernel")
        .arg(kiln_tests::guests::guest(Guest::Pvh))
        .arg("--rootfs")
        .arg(&disk)
        .args(["--cmdline", "kiln.test=blk-flush"]);
    let out = kiln_tests::guests::run_with_timeout(cmd, kiln_tests::guests::VM_TIMEOUT)
        .expect("running host-vmm under strace");
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let log = std::fs::read_to_string(&trace).expect("strace log");
    let syncs = log
        .lines()
        .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
        .count();
    assert!(
        syncs >= 1,
        "no fdatasync/fsync after a guest FLUSH; strace:\n{log}"
    );
}

/// `--drive`: a second virtio-blk device after the rootfs, with its own slot and IRQ on the
/// command line, read-only and answering GET_ID with the serial given.
#[test]
fn blk_second_drive_reads_its_own_image() {
    if !require_kvm("blk_second_drive_reads_its_own_image") {
        return;
    }
    let dir = TempDir::new("blk-drive");
    let root = image(&dir, &vec![0u8; (SECTORS * 512) as usize]);
    let data_sectors = 48u64;
    let data = pseudo_random((data_sectors * 512) as usize, 0x64726976);
    let data_path = dir.path().join("data.img");
    std::fs::write(&data_path, &data).expect("writing data.img");
    let drive = format!("{},ro,serial=kiln-test-data", data_path.display());
    let out = boot_guest(
        Guest::Pvh,
        "blk-read",
        &[
            "--rootfs",
            root.to_str().expect("utf-8"),
            "--drive",
            &drive,
            "--cmdline",
            &format!("kiln.blk_index=1 kiln.sectors={data_sectors}"),
        ],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.get("blk.error").is_none(), "{}", out.describe());
    assert_eq!(out.expect("virtio.devices"), "2", "{}", out.describe());
    assert_eq!(out.expect("blk.index"), "1");
    assert_eq!(out.expect("blk.capacity"), data_sectors.to_string());
    assert_eq!(out.expect("blk.ro"), "1", "the drive was given with ro");
    assert_eq!(out.expect("blk.read.status"), "0", "{}", out.describe());
    assert_eq!(
        out.expect("blk.read.fnv"),
        format!("{:#018x}", fnv1a(&data)),
        "the second device must read the second image"
    );
    assert_eq!(out.expect("blk.read.get_id"), "kiln-test-data");
}

/// A missing `--drive` file is one line naming it, before any VM exists.
#[test]
fn blk_missing_drive_is_one_line() {
    let dir = TempDir::new("blk-drive-missing");
    let root = image(&dir, &vec![0u8; 512]);
    let missing = dir.path().join("nope.img");
    let out = kiln_tests::guests::run_vmm([
        "--kernel".to_string(),
        kiln_tests::guests::guest(Guest::Pvh).display().to_string(),
        "--rootfs".into(),
        root.display().to_string(),
        "--drive".into(),
        format!("{},ro", missing.display()),
    ]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let want = format!("host-vmm: error: drive {}: No such file", missing.display());
    assert!(out.stderr.contains(&want), "{}", out.describe());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.describe());
}
