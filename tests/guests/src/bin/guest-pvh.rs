//! Test guest booted through PVH: the ELF note below names `kiln_pvh_start`, the 32-bit entry in
//! `arch.rs`. The ELF entry point is still the 64-bit `_start`, so the same image also boots with
//! the Linux 64-bit protocol (`--boot-protocol linux64`).

#![no_std]
#![no_main]

use kiln_test_guests as _;

// XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen": the 32-bit physical entry address.
core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long kiln_pvh_start
    .balign 4
    .popsection
    "#,
    options(att_syntax)
);
