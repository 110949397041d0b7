//! host-vmm boot tests on KVM with the bare-metal test guests (`tests/guests`): the boot protocol
//! values, memory map, command line, MP table and CPU bring-up, serial output and exit statuses,
//! all checked from inside the guest.

use kiln_tests::guests::{boot_guest, Guest, VmOutput};
use kiln_tests::require_kvm;

/// The base command line host-vmm always passes (issue 2).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// First virtio-mmio device address; everything from here to 4 GiB is MMIO.
const MMIO_START: u64 = 0xd000_0000;

fn assert_clean_exit(out: &VmOutput) {
    assert_eq!(
        out.code(),
        Some(0),
        "expected a clean exit\n{}",
        out.describe()
    );
    assert!(
        out.saw("marker"),
        "no marker on the serial console\n{}",
        out.describe()
    );
    assert!(
        out.saw("done"),
        "guest did not finish its checks\n{}",
        out.describe()
    );
    assert!(
        out.get("error").is_none(),
        "guest reported an error\n{}",
        out.describe()
    );
    assert!(
        out.get("panic").is_none(),
        "guest panicked\n{}",
        out.describe()
    );
}

fn parse_hex(v: &str) -> u64 {
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("not a hex number: {v:?}: {e}"))
}

/// Checks the memory map the guest saw for a VM of `mem_mib` MiB (below the 32-bit MMIO gap).
fn assert_memory_map(out: &VmOutput, mem_mib: u64) {
    let mem = mem_mib << 20;
    let ram_end = parse_hex(&out.expect("e820.ram_end"));
    if mem <= 3 << 30 {
        assert_eq!(ram_end, mem, "highest RAM address\n{}", out.describe());
    } else {
        assert!(
            ram_end > 1 << 32,
            "no RAM above 4 GiB for {mem_mib} MiB\n{}",
            out.describe()
        );
    }
    let ram: u64 = out
        .expect("e820.ram_bytes")
        .parse()
        .expect("ram_bytes is a number");
    // Only the legacy hole below 1 MiB (EBDA, VGA, BIOS) may be missing from RAM.
    assert!(
        ram <= mem && ram >= mem - (1 << 20),
        "usable RAM {ram} does not match --mem-mib {mem_mib}\n{}",
        out.describe()
    );
    assert_eq!(out.expect("e820.image_in_ram"), "1", "{}", out.describe());
    let entries: usize = out.expect("e820.entries").parse().expect("entries");
    assert!(entries >= 1, "{}", out.describe());
    // Entries must not overlap: collect [start, end) and check pairwise.
    let mut ranges: Vec<(u64, u64, u32)> = (0..entries)
        .map(|i| {
            let v = out.expect(&format!("e820.{i}"));
            let f: Vec<&str> = v.split(',').collect();
            assert_eq!(f.len(), 3, "bad e820 entry {v}");
            let start = parse_hex(f[0]);
            (start, start + parse_hex(f[1]), f[2].parse().expect("type"))
        })
        .collect();
    ranges.sort();
    for &(start, end, kind) in &ranges {
        // RAM must stay clear of the MMIO window (virtio-mmio devices, IOAPIC, LAPIC).
        let mmio = MMIO_START..1u64 << 32;
        let clear = end <= mmio.start || start >= mmio.end;
        assert!(
            kind != 1 || clear,
            "RAM {start:#x}..{end:#x} overlaps MMIO\n{}",
            out.describe()
        );
    }
    for w in ranges.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "overlapping e820 entries {w:?}\n{}",
            out.describe()
        );
    }
}

fn assert_cmdline(out: &VmOutput, mode: &str) {
    let cmdline = out.expect("cmdline");
    assert!(
        cmdline.starts_with(BASE_CMDLINE),
        "command line must start with {BASE_CMDLINE:?}: {cmdline:?}"
    );
    assert!(
        cmdline.contains(&format!("kiln.test={mode}")),
        "user --cmdline missing: {cmdline:?}"
    );
    assert!(
        !cmdline.contains("root="),
        "no rootfs, yet root= present: {cmdline:?}"
    );
    assert!(
        !cmdline.contains("virtio_mmio.device="),
        "no devices expected: {cmdline:?}"
    );
    assert_eq!(out.expect("cmdline.len"), cmdline.len().to_string());
}

#[test]
fn pvh_boot_protocol_values() {
    if !require_kvm("pvh_boot_protocol_values") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "bootinfo", &[]);
    assert_clean_exit(&out);
    assert_eq!(out.expect("boot.protocol"), "pvh", "{}", out.describe());
    assert_eq!(out.expect("pvh.magic"), "0x336ec578");
    assert!(out.expect("pvh.version").parse::<u32>().expect("version") >= 1);
    assert_eq!(out.expect("pvh.nr_modules"), "0");
    assert_eq!(out.expect("pvh.memmap_entries"), out.expect("e820.entries"));
    assert_ne!(parse_hex(&out.expect("pvh.cmdline_paddr")), 0);
    assert_cmdline(&out, "bootinfo");
    assert_memory_map(&out, 128);
}

#[test]
fn linux64_boot_protocol_values() {
    if !require_kvm("linux64_boot_protocol_values") {
        return;
    }
    let out = boot_guest(Guest::Linux64, "bootinfo", &[]);
    assert_clean_exit(&out);
    assert_eq!(out.expect("boot.protocol"), "linux64", "{}", out.describe());
    assert_eq!(
        out.expect("boot.info_addr"),
        "0x7000",
        "zero page address (RSI)"
    );
    assert_eq!(out.expect("zp.boot_flag"), "0xaa55");
    assert_eq!(out.expect("zp.header"), "HdrS");
    assert_eq!(out.expect("zp.type_of_loader"), "0xff");
    assert_eq!(out.expect("zp.cmd_line_ptr"), "0x20000");
    assert_eq!(out.expect("zp.e820_entries"), out.expect("e820.entries"));
    assert_cmdline(&out, "bootinfo");
    assert_memory_map(&out, 128);
}

#[test]
fn pvh_guest_forced_to_linux64() {
    if !require_kvm("pvh_guest_forced_to_linux64") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "bootinfo", &["--boot-protocol", "linux64"]);
    assert_clean_exit(&out);
    assert_eq!(out.expect("boot.protocol"), "linux64", "{}", out.describe());
    assert_eq!(out.expect("zp.header"), "HdrS");
}

#[test]
fn mem_mib_512_shows_in_e820() {
    if !require_kvm("mem_mib_512_shows_in_e820") {
        return;
    }
    for guest in [Guest::Pvh, Guest::Linux64] {
        let out = boot_guest(guest, "bootinfo", &["--mem-mib", "512"]);
        assert_clean_exit(&out);
        assert_memory_map(&out, 512);
    }
}

#[test]
fn mem_above_the_mmio_gap() {
    if !require_kvm("mem_above_the_mmio_gap") {
        return;
    }
    let out = boot_guest(Guest::Linux64, "bootinfo", &["--mem-mib", "4096"]);
    assert_clean_exit(&out);
    assert_memory_map(&out, 4096);
}

fn assert_cpus(out: &VmOutput, n: u32) {
    assert_clean_exit(out);
    assert_eq!(out.expect("mp.found"), "1", "{}", out.describe());
    assert_eq!(out.expect("mp.table_checksum"), "ok");
    assert_eq!(out.expect("mp.cpus"), n.to_string(), "{}", out.describe());
    assert_eq!(out.expect("mp.enabled_cpus"), n.to_string());
    assert_eq!(out.expect("mp.bsp_apic_id"), "0");
    let ids = (1u64 << n) - 1;
    assert_eq!(
        parse_hex(&out.expect("mp.apic_ids")),
        ids,
        "APIC ids in the MP table"
    );
    assert_eq!(
        out.expect("smp.cpus_online"),
        n.to_string(),
        "CPUs that checked in after INIT-SIPI-SIPI\n{}",
        out.describe()
    );
    assert_eq!(
        parse_hex(&out.expect("smp.ap_apic_ids")),
        ids & !1,
        "APs' APIC ids"
    );
}

#[test]
fn vcpus_4_brings_up_4_cpus() {
    if !require_kvm("vcpus_4_brings_up_4_cpus") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "smp", &["--vcpus", "4"]);
    assert_cpus(&out, 4);
    let out = boot_guest(Guest::Linux64, "smp", &["--vcpus", "4"]);
    assert_cpus(&out, 4);
}

#[test]
fn vcpus_32_is_the_maximum() {
    if !require_kvm("vcpus_32_is_the_maximum") {
        return;
    }
    let out = boot_guest(Guest::Linux64, "smp", &["--vcpus", "32"]);
    assert_cpus(&out, 32);
}

#[test]
fn vcpus_default_is_one_cpu() {
    if !require_kvm("vcpus_default_is_one_cpu") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "smp", &[]);
    assert_cpus(&out, 1);
}

#[test]
fn i8042_reset_exits_zero() {
    if !require_kvm("i8042_reset_exits_zero") {
        return;
    }
    for guest in [Guest::Pvh, Guest::Linux64] {
        let out = boot_guest(guest, "reset", &[]);
        assert_clean_exit(&out);
    }
}

#[test]
fn triple_fault_exits_two() {
    if !require_kvm("triple_fault_exits_two") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "triple-fault", &[]);
    assert_eq!(
        out.code(),
        Some(2),
        "guest crash must exit 2\n{}",
        out.describe()
    );
    assert_eq!(out.expect("triple-fault"), "now");
    assert!(!out.saw("done"));
}

#[test]
fn guest_panic_is_a_crash() {
    if !require_kvm("guest_panic_is_a_crash") {
        return;
    }
    let out = boot_guest(Guest::Linux64, "panic", &[]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.expect("panic").contains("panicked at"),
        "{}",
        out.describe()
    );
}

#[test]
fn console_off_hides_guest_output() {
    if !require_kvm("console_off_hides_guest_output") {
        return;
    }
    let out = boot_guest(Guest::Pvh, "marker", &["--console", "off"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        !out.stdout.contains("KILN-TEST"),
        "console off, yet output\n{}",
        out.describe()
    );
}
