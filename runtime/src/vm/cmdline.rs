//! The guest kernel command line for kiln's agent VMs, in one place.
//!
//! Every backend boots the same way: the root disk is `/dev/vda`, guest-init is PID 1
//! (`init=/kiln/guest-init`), the console is the first 8250 UART, `reboot=k` makes a guest reboot
//! go through the i8042 reset (which ends the VMM), and `panic=1` turns a kernel panic into that
//! reset. host-vmm writes the first part itself (plus one `virtio_mmio.device=` per device and,
//! on PVM, its instruction workarounds), so it only receives [`KernelCmdline::agent_part`];
//! QEMU receives [`KernelCmdline::full`].

/// Path of the agent inside agent-layout images (rootfs-builder's `GUEST_INIT_PATH`).
pub const GUEST_INIT_PATH: &str = "/kiln/guest-init";

/// Options host-vmm also writes on its own (its `BASE_CMDLINE` and root option).
pub const BASE_OPTIONS: &str = "console=ttyS0 reboot=k panic=1";

/// Options that shorten boot and keep the serial console (slow under emulation) nearly silent.
/// `i8042.*` skip probing of a keyboard and aux port kiln's VMs never have; `nomodule`: the
/// kernel has no modules.
pub const QUIET_OPTIONS: &str = "quiet nomodule i8042.noaux i8042.nomux i8042.nopnp \
                                 i8042.dumbkbd cryptomgr.notests";

/// Kernel command line of an agent VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    /// Mount the root disk read-only (`ro`) instead of `rw`.
    pub read_only: bool,
    /// Add [`QUIET_OPTIONS`] (false keeps the full boot log on the console).
    pub quiet: bool,
    /// Extra options, appended last so they override earlier ones.
    pub extra: Option<String>,
}

impl KernelCmdline {
    /// The complete command line, for VMMs that add nothing themselves (QEMU).
    pub fn full(&self) -> String {
        let root = if self.read_only { "ro" } else { "rw" };
        format!("{BASE_OPTIONS} root=/dev/vda {root} {}", self.agent_part())
    }

    /// The part after host-vmm's own options (`init=`, quiet options, extra).
    pub fn agent_part(&self) -> String {
        let mut s = format!("init={GUEST_INIT_PATH}");
        if self.quiet {
            s.push(' ');
            s.push_str(QUIET_OPTIONS);
        }
        if let Some(extra) = self.extra.as_deref().map(str::trim) {
            if !extra.is_empty() {
                s.push(' ');
                s.push_str(extra);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_line_read_write_quiet() {
        let c = KernelCmdline {
            read_only: false,
            quiet: true,
            extra: Some("  loglevel=7 ".into()),
        };
        assert_eq!(
            c.full(),
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/kiln/guest-init quiet \
             nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests \
             loglevel=7"
        );
    }

    #[test]
    fn read_only_verbose_no_extra() {
        let c = KernelCmdline {
            read_only: true,
            quiet: false,
            extra: Some(" ".into()),
        };
        assert_eq!(
            c.full(),
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/kiln/guest-init"
        );
        assert_eq!(c.agent_part(), "init=/kiln/guest-init");
    }
}
