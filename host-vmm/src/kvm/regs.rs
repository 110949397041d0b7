//! Initial vCPU state for each boot protocol: general and segment registers, FPU, boot MSRs and
//! the local APIC's LINT pins.
//!
//! The builders are pure (unit-tested); `apply_*` functions issue the ioctls.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::gdt::{gdt_table, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use crate::boot::BootProtocol;
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting vCPU state (the ioctl that failed is named).
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM_SET_MSRS set only {set} of {total} boot MSRs (first rejected: {first:#x})")]
    Msrs {
        /// Accepted count.
        set: usize,
        /// Requested count.
        total: usize,
        /// Index of the first rejected MSR.
        first: u32,
    },
}

/// General-purpose registers at the kernel entry.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// Decodes a GDT descriptor into the form KVM takes; `index` gives the selector.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Special registers at the kernel entry, starting from KVM's reset state `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let gdt = gdt_table(protocol);
    let code = segment_from_gdt(gdt[CODE_INDEX], CODE_INDEX);
    let data = segment_from_gdt(gdt[DATA_INDEX], DATA_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[TSS_INDEX], TSS_INDEX);
    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// FPU state Linux expects at entry (the power-on values).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs a BIOS would have initialised.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI delivery in a `kvm_lapic_state` register page.
pub fn set_lint_delivery(regs: &mut [std::os::raw::c_char]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(regs, offset);
        set_lapic_reg(regs, offset, (v & !0x700) | (mode << 8));
    }
}

/// CPU state every vCPU needs before its first `KVM_RUN` (BSP and APs alike).
pub fn apply_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Ioctl("KVM_SET_FPU", e))?;
    let entries = boot_msr_entries();
    // `from_entries` only fails beyond KVM_MAX_MSR_ENTRIES; we pass 11.
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| RegsError::Ioctl("KVM_SET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Ioctl("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
            first: entries.get(set).map_or(0, |e| e.index),
        });
    }
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Ioctl("KVM_GET_LAPIC", e))?;
    set_lint_delivery(&mut lapic.regs);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Ioctl("KVM_SET_LAPIC", e))
}

/// Entry state of the boot vCPU.
pub fn apply_boot_state(
    vcpu: &VcpuFd,
    protocol: BootProtocol,
    entry: u64,
) -> Result<(), RegsError> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Ioctl("KVM_GET_SREGS", e))?;
    vcpu.set_sregs(&boot_sregs(sregs, protocol))
        .map_err(|e| RegsError::Ioctl("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&boot_regs(protocol, entry))
        .map_err(|e| RegsError::Ioctl("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::gdt::gdt_entry;

    #[test]
    fn segments_decode_like_kvm_expects() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.present, code.dpl),
            (8, 0xb, 1, 0)
        );
        assert_eq!(
            (code.s, code.l, code.db, code.g, code.limit),
            (1, 1, 0, 1, 0xffff_ffff)
        );
        assert_eq!((code.base, code.unusable), (0, 0));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.db, data.l), (16, 3, 1, 0));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.g, tss.limit),
            (24, 0xb, 0, 0, 0x67)
        );
        let base = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0), 0);
        assert_eq!(base.base, 0x1234_5678);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(kvm_sregs::default(), BootProtocol::Linux64);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0x500, 31, 0x520, 7)
        );
        assert_eq!(
            (s.cs.selector, s.cs.l, s.ss.selector, s.tr.selector),
            (8, 1, 16, 24)
        );
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode() {
        let reset = kvm_sregs {
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        let s = boot_sregs(reset, BootProtocol::Pvh);
        assert_eq!((s.cr0, s.cr4, s.efer), (X86_CR0_PE | X86_CR0_ET, 0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(BootProtocol::Linux64, 0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rbp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 0x8ff0, 2)
        );
        let r = boot_regs(BootProtocol::Pvh, 0x100_0040);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0040, 0x6000, 2));
    }

    #[test]
    fn fpu_and_msrs() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
        let m = boot_msr_entries();
        let misc = m.iter().find(|e| e.index == MSR_IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.data, 1);
        assert!(m.iter().any(|e| e.index == MSR_LSTAR));
    }

    #[test]
    fn lint_pins() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x0001_02ff);
        set_lint_delivery(&mut regs);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0x0001_07ff);
        assert_eq!(lapic_reg(&regs, APIC_LVT1), 0x400);
    }
}
