//! Bare-metal test guests for host-vmm.
//!
//! The guests check, from inside the VM, what the VMM set up and print `KILN-TEST key=value`
//! lines on COM1 for the host-side tests (`tests/tests/vmm_*.rs`) to compare. The command line
//! word `kiln.test=<mode>` picks what they do:
//!
//! | mode           | checks                                                              |
//! |----------------|---------------------------------------------------------------------|
//! | `marker`       | only the marker line, then exit (the default; used by the benchmark) |
//! | `idle`         | marker, then halt forever (memory measurements)                     |
//! | `bootinfo`     | PVH start_info or zero page fields, memory map, command line         |
//! | `smp`          | MP table (checksums, processor entries), wakes APs, counts them      |
//! | `blk-read`     | reads sectors, prints their FNV-1a hash and first bytes              |
//! | `blk-write`    | writes a pattern, reads it back, flushes                             |
//! | `blk-ro`       | a write to a read-only device must fail                              |
//! | `blk-oob`      | reads past the capacity must fail                                    |
//! | `blk-flush`    | FLUSH and GET_ID                                                     |
//! | (all `blk-*`) | `kiln.blk_index=N` uses the N-th virtio-blk device (0: the first)      |
//! | `reset`        | exit through the i8042 reset only                                    |
//! | `vsock-*`      | virtio-vsock: echo, connect, sink, source, credit, rst (`vsock_modes`) |
//! | `triple-fault` | crash on purpose (the VMM must report a guest crash)                 |
//! | `panic`        | exercise the panic handler (prints `panic=...`, then triple-faults)  |
//!
//! Every mode first prints `KILN-TEST marker`, ends with `KILN-TEST done`, then exits by writing
//! 0xFE to port 0x64 (i8042 reset), or by a triple fault with `kiln.exit=triple` (QEMU's microvm
//! machine has no i8042; run it with `-no-reboot`).
//!
//! Guest code runs in ring 0, which this project's PVM host emulates at about 1.4 MIPS: every
//! mode keeps its instruction count small.

#![no_std]

pub mod arch;
pub mod bootinfo;
pub mod modes;
pub mod serial;
pub mod smp;
pub mod virtio_blk;
pub mod vsock;
pub mod vsock_conn;
pub mod vsock_modes;

use arch::{outb, triple_fault};
use bootinfo::BootInfo;

/// Port of host-vmm's boot-timer device, and the value that marks "guest code is running".
const BOOT_TIMER_PORT: u16 = 0x440;
const BOOT_TIMER_VALUE: u8 = 0x7b;

/// Common Rust entry, called by both assembly entry stubs with the boot information address and
/// the protocol code ([`arch::PROTOCOL_PVH`] or [`arch::PROTOCOL_LINUX64`]).
#[no_mangle]
pub extern "C" fn kiln_main(info_addr: u64, protocol: u32) -> ! {
    serial::write_bytes(b"KILN-TEST marker\n");
    outb(BOOT_TIMER_PORT, BOOT_TIMER_VALUE);
    let boot = BootInfo::read(protocol, info_addr);
    if let Some(err) = boot.error {
        report!("error=boot-info:{}", err);
        exit(&boot);
    }
    modes::run(&boot);
    report!("done");
    exit(&boot)
}

/// Ends the VM: i8042 reset (then halt until the VMM stops us), or a triple fault on request.
pub fn exit(boot: &BootInfo) -> ! {
    if boot.param("kiln.exit") == Some(b"triple") {
        triple_fault();
    }
    outb(0x64, 0xfe);
    arch::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    report!("panic={}", info);
    triple_fault()
}
