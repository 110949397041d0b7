//! Command-line interface of the `host-vmm` binary (clap), turned into a [`VmConfig`].
//!
//! Parsing is here rather than in `main.rs` so it is unit-tested. Range and file checks live in
//! [`VmConfig::validate`] so library users get them too. A trailing `-- CMD...` selects the
//! run mode (module `run`): boot guest-init from the rootfs and run CMD in it.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::boot::BootProtocolChoice;
use crate::jail::JailConfig;
use crate::seccomp::SeccompMode;
use crate::vmm::{VmConfig, VsockConfig};

/// `--console`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsoleArg {
    /// Guest console on stdout, stdin forwarded to the guest.
    On,
    /// Serial device kept, output discarded, `quiet` added to the command line.
    Off,
}

/// `--boot-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootProtocolArg {
    /// PVH when the kernel has the PVH note, else the Linux 64-bit protocol.
    Auto,
    /// PVH (32-bit entry, `hvm_start_info`); fails if the kernel has no PVH note.
    Pvh,
    /// Linux 64-bit boot protocol (zero page, long mode).
    Linux64,
}

/// kiln's VMM: boots one microVM on KVM.
#[derive(Debug, Parser)]
#[command(name = "host-vmm", version)]
pub struct Cli {
    /// Guest kernel: ELF vmlinux or bzImage, or `auto`: the installed kiln kernel of this host's
    /// flavour (the PVM flavour on a PVM host), see `kernel_pick`.
    #[arg(long, value_name = "PATH", default_value = crate::kernel_pick::AUTO)]
    pub kernel: PathBuf,
    /// Root disk image, attached as /dev/vda (virtio-blk).
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Extra disk after the rootfs (/dev/vdb, /dev/vdc, ... in order; at most 8):
    /// `PATH[,ro][,serial=ID]`, `,,` for a comma in PATH. The guest can find it by its serial
    /// (`/sys/block/vdX/serial`). With --jail it is bound into the jail like the rootfs
    /// (read-only for `ro`).
    #[arg(long = "drive", value_name = "PATH[,ro][,serial=ID]")]
    pub drives: Vec<crate::devices::virtio::DriveConfig>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub mem_mib: u64,
    /// Number of vCPUs (1-32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// Extra kernel command-line options, appended last.
    #[arg(long, value_name = "EXTRA", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Open the rootfs read-only and mount it `ro`.
    #[arg(long)]
    pub read_only: bool,
    /// Guest console on stdout (default on; with `-- CMD` default off, and on means stderr).
    #[arg(long, value_enum)]
    pub console: Option<ConsoleArg>,
    /// Boot protocol.
    #[arg(long, value_enum, default_value_t = BootProtocolArg::Auto)]
    pub boot_protocol: BootProtocolArg,
    /// Attach a virtio-vsock device whose host side is this unix socket (created; must not
    /// exist). Host processes connect to it and send `CONNECT <port>\n`; guest connections to
    /// host port P go to `PATH_P`.
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device (3 to 4294967294).
    #[arg(long, value_name = "N", default_value_t = 3, requires = "vsock_uds")]
    pub cid: u64,
    /// Per-thread seccomp filters: `kill` (default) kills the process on a call outside a
    /// thread's list, `log` names the call on stderr and fails it with ENOSYS, `off` disables.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Confine the VMM before the guest runs: new mount/PID/IPC/UTS/net namespaces, root
    /// pivoted into DIR (created if missing; it gets the kernel, the image, the drives,
    /// /dev/kvm; the vsock socket must be inside it), inherited fds closed, rlimits,
    /// no_new_privs, no capabilities.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// uid the jailed VMM runs as (root only).
    #[arg(long, value_name = "N", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// gid the jailed VMM runs as (root only).
    #[arg(long, value_name = "N", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// More logging on stderr (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Run this command in the guest (guest-init as PID 1 from the rootfs, stdio relayed,
    /// exit status returned) instead of just booting.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl Cli {
    /// The VM configuration the arguments describe (not yet validated).
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
            read_only: self.read_only,
            drives: self.drives.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            extra_cmdline: self.cmdline.clone(),
            console: self.console.unwrap_or(ConsoleArg::On) == ConsoleArg::On,
            boot_protocol: match self.boot_protocol {
                BootProtocolArg::Auto => BootProtocolChoice::Auto,
                BootProtocolArg::Pvh => BootProtocolChoice::Pvh,
                BootProtocolArg::Linux64 => BootProtocolChoice::Linux64,
            },
            vsock: self.vsock_uds.as_ref().map(|uds| VsockConfig {
                uds: uds.clone(),
                cid: self.cid,
            }),
            seccomp: self.seccomp,
        }
    }

    /// The jail, if `--jail` was given.
    pub fn jail_config(&self) -> Option<JailConfig> {
        self.jail.as_ref().map(|dir| JailConfig {
            dir: dir.clone(),
            uid: self.jail_uid,
            gid: self.jail_gid,
            seccomp: self.seccomp,
        })
    }

    /// Log level for `-v` count. With `-- CMD` stderr is the command's, so only warnings.
    pub fn log_level(&self) -> log::LevelFilter {
        match self.verbose {
            0 if !self.command.is_empty() => log::LevelFilter::Warn,
            0 => log::LevelFilter::Info,
            1 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("host-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "k"]).unwrap().vm_config();
        assert_eq!(
            (c.mem_mib, c.vcpus, c.console, c.read_only),
            (128, 1, true, false)
        );
        assert_eq!(c.boot_protocol, BootProtocolChoice::Auto);
        assert!(c.rootfs.is_none() && c.extra_cmdline.is_none());
        assert_eq!(c.seccomp, SeccompMode::Kill);
        for (arg, mode) in [("log", SeccompMode::Log), ("off", SeccompMode::Off)] {
            let c = parse(&["--kernel", "k", "--seccomp", arg])
                .unwrap()
                .vm_config();
            assert_eq!(c.seccomp, mode);
        }
        assert!(parse(&["--kernel", "k", "--seccomp", "maybe"]).is_err());
        assert!(parse(&["--kernel", "k"]).unwrap().jail_config().is_none());
        let j = parse(&[
            "--kernel",
            "k",
            "--jail",
            "/j",
            "--jail-uid",
            "7",
            "--jail-gid",
            "8",
        ])
        .unwrap()
        .jail_config()
        .expect("jail");
        assert_eq!(
            (j.dir.to_str(), j.uid, j.gid),
            (Some("/j"), Some(7), Some(8))
        );
        assert!(
            parse(&["--kernel", "k", "--jail-uid", "7"]).is_err(),
            "needs --jail"
        );
    }

    #[test]
    fn all_options() {
        let cli = parse(&[
            "--kernel",
            "k",
            "--rootfs",
            "r.img",
            "--mem-mib",
            "512",
            "--vcpus",
            "4",
            "--cmdline",
            "-- init=/x",
            "--read-only",
            "--console",
            "off",
            "--boot-protocol",
            "linux64",
            "-vv",
        ])
        .unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Trace);
        let c = cli.vm_config();
        assert_eq!(c.rootfs.as_deref(), Some(std::path::Path::new("r.img")));
        assert_eq!(
            (c.mem_mib, c.vcpus, c.read_only, c.console),
            (512, 4, true, false)
        );
        assert_eq!(c.extra_cmdline.as_deref(), Some("-- init=/x"));
        assert_eq!(c.boot_protocol, BootProtocolChoice::Linux64);
    }

    #[test]
    fn drive_options() {
        let c = parse(&["--kernel", "k"]).unwrap().vm_config();
        assert!(c.drives.is_empty());
        let c = parse(&[
            "--kernel",
            "k",
            "--drive",
            "a.img",
            "--drive",
            "b.img,ro,serial=data",
        ])
        .unwrap()
        .vm_config();
        assert_eq!(c.drives.len(), 2);
        assert_eq!(
            (c.drives[0].read_only, c.drives[1].read_only),
            (false, true)
        );
        assert_eq!(c.drives[1].serial.as_deref(), Some("data"));
        assert!(parse(&["--kernel", "k", "--drive", "a,bogus"]).is_err());
        let jailed = parse(&["--kernel", "k", "--drive", "a,ro", "--jail", "/j"]).unwrap();
        assert!(jailed.jail_config().is_some());
        assert_eq!(
            jailed.vm_config().drives.len(),
            1,
            "--drive is bound into the jail"
        );
    }

    #[test]
    fn vsock_options() {
        let c = parse(&["--kernel", "k"]).unwrap().vm_config();
        assert!(c.vsock.is_none());
        let c = parse(&["--kernel", "k", "--vsock-uds", "/tmp/v.sock"])
            .unwrap()
            .vm_config();
        let v = c.vsock.expect("vsock configured");
        assert_eq!((v.uds.to_str(), v.cid), (Some("/tmp/v.sock"), 3));
        let c = parse(&["--kernel", "k", "--vsock-uds", "v", "--cid", "42"])
            .unwrap()
            .vm_config();
        assert_eq!(c.vsock.map(|v| v.cid), Some(42));
        assert!(
            parse(&["--kernel", "k", "--cid", "42"]).is_err(),
            "--cid needs --vsock-uds"
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            parse(&[]).unwrap().kernel,
            PathBuf::from(crate::kernel_pick::AUTO),
            "--kernel defaults to auto"
        );
        assert!(parse(&["--kernel", "k", "--mem-mib", "lots"]).is_err());
        assert!(parse(&["--kernel", "k", "--console", "maybe"]).is_err());
        assert!(parse(&["--kernel", "k", "--boot-protocol", "uefi"]).is_err());
        // Out-of-range numbers parse; VmConfig::validate rejects them with one clear line.
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus", "99"]).unwrap().vcpus,
            99
        );
    }
}
