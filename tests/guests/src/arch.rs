//! x86_64 entry stubs and low-level CPU access for the test guests.
//!
//! Two entry points lead to [`crate::kiln_main`]:
//! - `_start` (the ELF entry): the Linux 64-bit boot protocol. Long mode is already on, RSI holds the
//!   zero page address.
//! - `kiln_pvh_start` (named by the PVH ELF note of `guest-pvh`): 32-bit protected mode with paging
//!   off, EBX holds the `hvm_start_info` address. The stub enables PAE, long mode and paging itself.
//!
//! Both switch to the guest's own GDT, stack and page tables (identity map of the first 4 GiB with
//! 2 MiB pages, so virtio-mmio at 0xd000_0000 and the LAPIC at 0xfee0_0000 are reachable whatever
//! the VMM mapped). Everything the guest touches afterwards is in this image or found through the
//! boot information, so the guest depends on nothing the VMM set up beyond the protocol itself.

use core::arch::{asm, global_asm};

/// Boot protocol code passed to `kiln_main` by the PVH entry stub.
pub const PROTOCOL_PVH: u32 = 1;
/// Boot protocol code passed to `kiln_main` by the Linux 64-bit entry stub.
pub const PROTOCOL_LINUX64: u32 = 2;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start
_start:
    cli
    cld
    mov %rsi, %r12
    lea kiln_stack_top(%rip), %rsp
    lgdt kiln_gdt_ptr(%rip)
    mov $kiln_pml4, %eax
    mov %rax, %cr3
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    pushq $0x08
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:
    mov %r12, %rdi
    mov ${linux64}, %esi
    call kiln_main
2:
    cli
    hlt
    jmp 2b

    .code32
    .global kiln_pvh_start
kiln_pvh_start:
    cli
    cld
    mov %ebx, %edi
    lgdt kiln_gdt_ptr
    mov $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $kiln_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $0x08, $kiln_pvh_long

    .code64
kiln_pvh_long:
    mov $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    lea kiln_stack_top(%rip), %rsp
    mov %edi, %edi
    mov ${pvh}, %esi
    call kiln_main
3:
    cli
    hlt
    jmp 3b

    .section .rodata.kiln_gdt, "a"
    .balign 16
kiln_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
kiln_gdt_end:
    .balign 16
kiln_gdt_ptr:
    .word kiln_gdt_end - kiln_gdt - 1
    .quad kiln_gdt

    .section .data.pagetables, "aw"
    .balign 4096
kiln_pml4:
    .quad kiln_pdpt + 0x3
    .fill 511, 8, 0
kiln_pdpt:
    .quad kiln_pd + 0x3
    .quad kiln_pd + 0x1003
    .quad kiln_pd + 0x2003
    .quad kiln_pd + 0x3003
    .fill 508, 8, 0
kiln_pd:
    .set kiln_pd_i, 0
    .rept 2048
    .quad (kiln_pd_i << 21) | 0x83
    .set kiln_pd_i, kiln_pd_i + 1
    .endr

    .section .bss.kiln_stack, "aw", @nobits
    .balign 4096
kiln_stack:
    .skip 65536
kiln_stack_top:

    .section .rodata.kiln_ap, "a"
    .code16
    .global kiln_ap_tramp_start
    .global kiln_ap_tramp_end
kiln_ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    and $31, %ebx
    mov %bl, %cl
    mov $1, %eax
    shl %cl, %eax
    lock orl %eax, (kiln_ap_bitmap - kiln_ap_tramp_start)
    lock incl (kiln_ap_count - kiln_ap_tramp_start)
4:
    hlt
    jmp 4b
    .balign 4
kiln_ap_bitmap:
    .long 0
kiln_ap_count:
    .long 0
kiln_ap_tramp_end:
    .code64
    "#,
    pvh = const PROTOCOL_PVH,
    linux64 = const PROTOCOL_LINUX64,
    options(att_syntax)
);

extern "C" {
    static kiln_ap_tramp_start: u8;
    static kiln_ap_tramp_end: u8;
}

/// Offsets, inside the AP trampoline, of the APIC-id bitmap and the check-in counter.
pub const AP_BITMAP_OFFSET_FROM_END: usize = 8;
/// See [`AP_BITMAP_OFFSET_FROM_END`].
pub const AP_COUNT_OFFSET_FROM_END: usize = 4;

/// The real-mode trampoline that started APs run: it records its APIC id and halts.
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols are labels in one section of this image, start before end; the bytes
    // between them are immutable code and data emitted by the assembler above.
    unsafe {
        let start = &raw const kiln_ap_tramp_start;
        let end = &raw const kiln_ap_tramp_end;
        let len = (end as usize).saturating_sub(start as usize);
        core::slice::from_raw_parts(start, len)
    }
}

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the guest owns the whole machine.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter into registers.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Stops this CPU for good: interrupts off, halt forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; nothing else depends on it running.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Loads an empty IDT and raises an exception: #UD cannot be delivered, nor can the #GP and #DF
/// that follow, so the CPU triple-faults (the VMM sees a shutdown).
pub fn triple_fault() -> ! {
    let idt: [u16; 5] = [0; 5];
    // SAFETY: deliberately crashes the VM; the IDT pointer points at a valid 10-byte descriptor
    // on the stack.
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) idt.as_ptr(), options(noreturn, nostack));
    }
}

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a device register (or RAM) identity-mapped by the guest page tables.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// As for [`mmio_read32`].
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads bytes of guest-physical memory (identity-mapped below 4 GiB) into `out`.
/// Returns false when the range is not below 4 GiB.
pub fn read_phys(addr: u64, out: &mut [u8]) -> bool {
    let Some(end) = addr.checked_add(out.len() as u64) else {
        return false;
    };
    if addr == 0 || end > 0x1_0000_0000 {
        return false;
    }
    // SAFETY: the range is inside the identity map and does not overlap `out` (a Rust object in
    // this image's stack or data); reading guest RAM has no side effects.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
    true
}
