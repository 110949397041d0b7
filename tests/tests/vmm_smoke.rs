//! host-vmm smoke tests on KVM that the guest-side suites do not cover: a `bzImage` kernel
//! (the test guest wrapped in a bzImage by the test itself) and stopping a VM whose other vCPUs
//! are still running when the boot vCPU asks for the reset.

use std::path::Path;

use kiln_tests::guests::{guest, run_vmm, Guest, TempDir, VmOutput};
use kiln_tests::require_kvm;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Wraps an ELF64 image (its PT_LOAD segments, flattened) in a minimal bzImage whose 64-bit
/// entry (load address + 0x200) is the ELF's entry point.
fn elf_to_bzimage(elf: &[u8], out: &Path) {
    assert_eq!(&elf[..4], b"\x7fELF");
    let entry = u64_at(elf, 24);
    let phoff = u64_at(elf, 32) as usize;
    let phnum = usize::from(u16_at(elf, 56));
    let segs: Vec<(u64, usize, usize)> = (0..phnum)
        .map(|i| &elf[phoff + i * 56..phoff + (i + 1) * 56])
        .filter(|ph| u32_at(ph, 0) == 1 && u64_at(ph, 32) > 0) // PT_LOAD with file bytes
        .map(|ph| {
            (
                u64_at(ph, 24),
                u64_at(ph, 8) as usize,
                u64_at(ph, 32) as usize,
            )
        })
        .collect();
    let lowest = segs.iter().map(|s| s.0).min().expect("no PT_LOAD");
    assert!(entry >= lowest);
    let load = entry - 0x200;
    let end = segs.iter().map(|s| s.0 + s.2 as u64).max().unwrap();
    let mut payload = vec![0u8; (end - load) as usize];
    for (paddr, off, len) in segs {
        let at = (paddr - load) as usize;
        payload[at..at + len].copy_from_slice(&elf[off..off + len]);
    }
    let setup_sects = 4u8;
    let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&(load as u32).to_le_bytes());
    image.extend_from_slice(&payload);
    std::fs::write(out, image).unwrap();
}

fn assert_clean(out: &VmOutput) {
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.saw("marker") && out.saw("done"), "{}", out.describe());
    assert!(out.get("error").is_none(), "{}", out.describe());
}

#[test]
fn bzimage_boots_with_the_linux64_protocol() {
    if !require_kvm("bzimage_boots_with_the_linux64_protocol") {
        return;
    }
    let dir = TempDir::new("bzimage");
    let bz = dir.path().join("guest.bzImage");
    elf_to_bzimage(&std::fs::read(guest(Guest::Linux64)).unwrap(), &bz);
    let out = run_vmm([
        "--kernel".as_ref(),
        bz.as_os_str(),
        "--cmdline".as_ref(),
        "kiln.test=bootinfo".as_ref(),
    ]);
    assert_clean(&out);
    assert_eq!(out.expect("boot.protocol"), "linux64", "{}", out.describe());
    // The zero page carries the bzImage's own setup header, with our loader fields on top.
    assert_eq!(out.expect("zp.version"), "0x20f", "{}", out.describe());
    assert_eq!(out.expect("zp.type_of_loader"), "0xff");
    assert_eq!(out.expect("zp.header"), "HdrS");
    assert_eq!(out.expect("zp.loadflags"), "0x1");
}

#[test]
fn bzimage_cannot_be_forced_to_pvh() {
    if !require_kvm("bzimage_cannot_be_forced_to_pvh") {
        return;
    }
    let dir = TempDir::new("bzimage-pvh");
    let bz = dir.path().join("guest.bzImage");
    elf_to_bzimage(&std::fs::read(guest(Guest::Linux64)).unwrap(), &bz);
    let out = run_vmm([
        "--kernel".as_ref(),
        bz.as_os_str(),
        "--boot-protocol".as_ref(),
        "pvh".as_ref(),
    ]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("no PVH entry note"),
        "{}",
        out.describe()
    );
    assert_eq!(
        out.stderr
            .trim()
            .lines()
            .filter(|l| l.contains("error"))
            .count(),
        1
    );
}

#[test]
fn reset_stops_all_vcpus_repeatedly() {
    if !require_kvm("reset_stops_all_vcpus_repeatedly") {
        return;
    }
    // The smp mode wakes every AP, which then idles in the guest while vCPU 0 resets: the VMM
    // must kick every vCPU thread out of KVM_RUN and exit 0, every time.
    for _ in 0..5 {
        let out = run_vmm([
            "--kernel".as_ref(),
            guest(Guest::Pvh).as_os_str(),
            "--vcpus".as_ref(),
            "8".as_ref(),
            "--cmdline".as_ref(),
            "kiln.test=smp".as_ref(),
        ]);
        assert_clean(&out);
        assert_eq!(out.expect("smp.cpus_online"), "8", "{}", out.describe());
        assert!(out.elapsed.as_secs() < 10, "{}", out.describe());
    }
}
