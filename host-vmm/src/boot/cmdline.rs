//! Assembly of the guest kernel command line (pure functions, no I/O except PVM detection).

use std::fmt::Write as _;
use std::path::Path;

use crate::layout::CMDLINE_MAX_SIZE;

/// Options every guest gets.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// What an unmodified kernel needs to get through boot on a PVM host (design.md, "PVM"): the
/// emulator cannot execute these instructions in guest kernel mode.
pub const PVM_CMDLINE: &str = "clearcpuid=cx16,popcnt,smap,fsgsbase,rdrand,rdseed,invpcid noxsave";

/// Errors building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// The result does not fit the kernel's `COMMAND_LINE_SIZE`.
    #[error("kernel command line is {len} bytes, the maximum is {max}")]
    TooLong {
        /// Length without the NUL.
        len: usize,
        /// Maximum length without the NUL.
        max: usize,
    },
    /// A NUL byte in user input would truncate the command line.
    #[error("--cmdline contains a NUL byte")]
    Nul,
}

/// A virtio-mmio device as announced on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceArg {
    /// Base guest physical address.
    pub base: u64,
    /// Window length in bytes.
    pub len: u64,
    /// IRQ line.
    pub irq: u32,
}

/// Inputs of [`build_cmdline`].
#[derive(Debug, Clone, Default)]
pub struct CmdlineOptions<'a> {
    /// Root device: `Some(read_only)` when a rootfs is attached as `/dev/vda`.
    pub root_read_only: Option<bool>,
    /// `--console off`: add `quiet`.
    pub quiet: bool,
    /// Append [`PVM_CMDLINE`].
    pub pvm: bool,
    /// virtio-mmio devices, in `/dev/vdX` order.
    pub mmio_devices: &'a [MmioDeviceArg],
    /// User's `--cmdline`, appended last so it can override earlier options.
    pub extra: Option<&'a str>,
}

/// Builds the kernel command line.
pub fn build_cmdline(opts: &CmdlineOptions<'_>) -> Result<String, CmdlineError> {
    let mut s = String::from(BASE_CMDLINE);
    if opts.quiet {
        s.push_str(" quiet");
    }
    if let Some(ro) = opts.root_read_only {
        s.push_str(if ro {
            " root=/dev/vda ro"
        } else {
            " root=/dev/vda rw"
        });
    }
    for dev in opts.mmio_devices {
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            " virtio_mmio.device={}K@{:#x}:{}",
            dev.len / 1024,
            dev.base,
            dev.irq
        );
    }
    if opts.pvm {
        s.push(' ');
        s.push_str(PVM_CMDLINE);
    }
    if let Some(extra) = opts.extra.map(str::trim).filter(|e| !e.is_empty()) {
        if extra.contains('\0') {
            return Err(CmdlineError::Nul);
        }
        s.push(' ');
        s.push_str(extra);
    }
    let max = CMDLINE_MAX_SIZE - 1;
    if s.len() > max {
        return Err(CmdlineError::TooLong { len: s.len(), max });
    }
    Ok(s)
}

/// True when the host's KVM is PVM, judged by `<sys_root>/module/kvm_pvm` (`sys_root` is `/sys`
/// outside tests).
pub fn is_pvm_host(sys_root: &Path) -> bool {
    sys_root.join("module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_cmdline() {
        let s = build_cmdline(&CmdlineOptions::default()).unwrap();
        assert_eq!(s, "console=ttyS0 reboot=k panic=1 pci=off");
    }

    #[test]
    fn full_cmdline_in_order() {
        let devs = [
            MmioDeviceArg {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDeviceArg {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let s = build_cmdline(&CmdlineOptions {
            root_read_only: Some(true),
            quiet: true,
            pvm: true,
            mmio_devices: &devs,
            extra: Some("  init=/bin/sh "),
        })
        .unwrap();
        assert_eq!(
            s,
            "console=ttyS0 reboot=k panic=1 pci=off quiet root=/dev/vda ro \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             clearcpuid=cx16,popcnt,smap,fsgsbase,rdrand,rdseed,invpcid noxsave init=/bin/sh"
        );
    }

    #[test]
    fn writable_root() {
        let s = build_cmdline(&CmdlineOptions {
            root_read_only: Some(false),
            ..Default::default()
        })
        .unwrap();
        assert!(s.ends_with(" root=/dev/vda rw"));
    }

    #[test]
    fn pvm_additions_only_on_pvm() {
        let off = build_cmdline(&CmdlineOptions::default()).unwrap();
        assert!(!off.contains("clearcpuid") && !off.contains("noxsave"));
        let on = build_cmdline(&CmdlineOptions {
            pvm: true,
            ..Default::default()
        })
        .unwrap();
        assert!(on.ends_with(PVM_CMDLINE));
    }

    #[test]
    fn pvm_detection_reads_sysfs() {
        let dir = std::env::temp_dir().join(format!("host-vmm-pvm-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module")).unwrap();
        assert!(!is_pvm_host(&dir));
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        assert!(is_pvm_host(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_long_and_nul_are_rejected() {
        let long = "x".repeat(2100);
        let err = build_cmdline(&CmdlineOptions {
            extra: Some(&long),
            ..Default::default()
        });
        assert!(matches!(err, Err(CmdlineError::TooLong { max: 2047, .. })));
        let fits = "x".repeat(2047 - BASE_CMDLINE.len() - 1);
        assert_eq!(
            build_cmdline(&CmdlineOptions {
                extra: Some(&fits),
                ..Default::default()
            })
            .unwrap()
            .len(),
            2047
        );
        let nul = build_cmdline(&CmdlineOptions {
            extra: Some("a\0b"),
            ..Default::default()
        });
        assert_eq!(nul, Err(CmdlineError::Nul));
    }
}
