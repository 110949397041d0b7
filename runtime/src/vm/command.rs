//! The command lines of the processes a VM consists of, built without running anything.
//!
//! - host-vmm: `host-vmm --kernel K --rootfs R [--drive D,ro,serial=S ...] --mem-mib M
//!   --vcpus N [--read-only] --cmdline <agent part> --vsock-uds U --cid 3`; its stdout is the
//!   guest console.
//! - QEMU: `vhost-device-vsock --guest-cid 3 --socket VHU --uds-path U` first, then
//!   `qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem ... -device
//!   vhost-user-vsock-device,chardev=vs ... -serial file:<console log>` (the command lines checked
//!   in design.md, plus an i8042 so `reboot=k` ends QEMU at once).

use std::ffi::OsString;
use std::path::Path;

use super::backend::Accel;
use super::cmdline::KernelCmdline;
use super::VmConfig;

/// The guest's vsock context id (any value above 2; one VM per device).
pub const GUEST_CID: u32 = 3;

/// Arguments of `host-vmm` for `cfg`, with the hybrid vsock socket at `uds`.
pub fn host_vmm_args(cfg: &VmConfig, uds: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--kernel".into(),
        cfg.kernel.clone().into(),
        "--rootfs".into(),
        cfg.rootfs.clone().into(),
    ];
    for d in &cfg.drives {
        let ro = if d.read_only { ",ro" } else { "" };
        args.push("--drive".into());
        args.push(format!("{}{ro},serial={}", qemu_escape(&d.path), d.serial).into());
    }
    args.extend::<[OsString; 4]>([
        "--mem-mib".into(),
        cfg.mem_mib.to_string().into(),
        "--vcpus".into(),
        cfg.vcpus.to_string().into(),
    ]);
    if cfg.read_only {
        args.push("--read-only".into());
    }
    args.push("--cmdline".into());
    args.push(kernel_cmdline(cfg).agent_part().into());
    args.push("--vsock-uds".into());
    args.push(uds.into());
    args.push("--cid".into());
    args.push(GUEST_CID.to_string().into());
    args
}

/// Arguments of `vhost-device-vsock`: vhost-user socket `vhu` (QEMU connects to it), hybrid vsock
/// socket `uds` (kiln connects to it).
pub fn vhost_device_vsock_args(vhu: &Path, uds: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--socket".into(),
        vhu.into(),
        "--uds-path".into(),
        uds.into(),
    ]
}

/// Arguments of `qemu-system-x86_64` for `cfg`, with the vhost-user socket at `vhu` and the
/// console written to `console_log`.
pub fn qemu_args(cfg: &VmConfig, accel: Accel, vhu: &Path, console_log: &Path) -> Vec<OsString> {
    let cpu = match accel {
        Accel::Tcg => "max",
        // PVM (and some nested set-ups) refuse MSR 0x10a; the guest does not need it.
        Accel::Kvm => "host,-arch-capabilities",
    };
    let readonly = if cfg.read_only { ",readonly=on" } else { "" };
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    push(&["-M", "microvm,acpi=off,memory-backend=mem"]);
    push(&["-accel", accel.as_str(), "-cpu", cpu]);
    push(&[
        "-smp",
        &cfg.vcpus.to_string(),
        "-m",
        &format!("{}M", cfg.mem_mib),
    ]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.mem_mib),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=vs,path={}", qemu_escape(vhu)),
    ]);
    push(&["-device", "vhost-user-vsock-device,chardev=vs"]);
    push(&[
        "-drive",
        &format!(
            "id=root,file={},format=raw,if=none{readonly}",
            qemu_escape(&cfg.rootfs)
        ),
    ]);
    push(&["-device", "virtio-blk-device,drive=root"]);
    for (i, d) in cfg.drives.iter().enumerate() {
        let readonly = if d.read_only { ",readonly=on" } else { "" };
        push(&[
            "-drive",
            &format!(
                "id=drive{i},file={},format=raw,if=none{readonly}",
                qemu_escape(&d.path)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-device,drive=drive{i},serial={}", d.serial),
        ]);
    }
    // The keyboard controller: `reboot=k` resets through port 0x64 at once; without it the
    // kernel's other reset methods time out first.
    push(&["-device", "i8042"]);
    push(&["-kernel", &cfg.kernel.to_string_lossy()]);
    push(&["-append", &kernel_cmdline(cfg).full()]);
    push(&[
        "-serial",
        &format!("file:{}", console_log.to_string_lossy()),
    ]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    args
}

/// The kernel command line of `cfg`.
pub fn kernel_cmdline(cfg: &VmConfig) -> KernelCmdline {
    KernelCmdline {
        read_only: cfg.read_only,
        quiet: !cfg.verbose_console,
        extra: cfg.extra_cmdline.clone(),
    }
}

/// A path inside a QEMU `key=value,...` option (or a host-vmm `--drive`): commas are doubled.
fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::super::backend::Backend;
    use super::*;

    fn cfg() -> VmConfig {
        let mut c = VmConfig::new(
            "/k/vmlinux",
            "/i/a,b.ext4",
            Backend::QemuMicrovm { accel: Accel::Tcg },
            "/run/vm1",
        );
        c.mem_mib = 192;
        c.vcpus = 2;
        c
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn qemu_command_line() {
        let mut c = cfg();
        c.read_only = true;
        let a = joined(&qemu_args(
            &c,
            Accel::Tcg,
            Path::new("/run/vm1/vhost-user.sock"),
            Path::new("/run/vm1/console.log"),
        ));
        for want in [
            "-M microvm,acpi=off,memory-backend=mem -accel tcg -cpu max -smp 2 -m 192M",
            "-object memory-backend-memfd,id=mem,size=192M,share=on",
            "-chardev socket,id=vs,path=/run/vm1/vhost-user.sock",
            "-device vhost-user-vsock-device,chardev=vs",
            "-drive id=root,file=/i/a,,b.ext4,format=raw,if=none,readonly=on",
            "-device virtio-blk-device,drive=root -device i8042 -kernel /k/vmlinux",
            "-append console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/kiln/guest-init quiet",
            "-serial file:/run/vm1/console.log -nodefaults -no-user-config -nographic -no-reboot",
        ] {
            assert!(a.contains(want), "{want:?} missing from {a}");
        }
        let k = joined(&qemu_args(&c, Accel::Kvm, Path::new("/v"), Path::new("/c")));
        assert!(k.contains("-accel kvm -cpu host,-arch-capabilities"), "{k}");
    }

    #[test]
    fn host_vmm_command_line() {
        let mut c = cfg();
        c.verbose_console = true;
        c.extra_cmdline = Some("loglevel=8".into());
        let a = joined(&host_vmm_args(&c, Path::new("/run/vm1/vsock.sock")));
        assert_eq!(
            a,
            "--kernel /k/vmlinux --rootfs /i/a,b.ext4 --mem-mib 192 --vcpus 2 \
             --cmdline init=/kiln/guest-init loglevel=8 --vsock-uds /run/vm1/vsock.sock --cid 3"
        );
    }

    #[test]
    fn drives_on_both_backends() {
        let mut c = cfg();
        c.drives = vec![
            super::super::Drive {
                path: "/s/bind-0.ext4".into(),
                read_only: true,
                serial: "kiln-bind-0".into(),
            },
            super::super::Drive {
                path: "/s/b,1.ext4".into(),
                read_only: false,
                serial: "kiln-bind-1".into(),
            },
        ];
        let a = joined(&host_vmm_args(&c, Path::new("/u")));
        assert!(
            a.starts_with(
                "--kernel /k/vmlinux --rootfs /i/a,b.ext4 --drive /s/bind-0.ext4,ro,serial=kiln-bind-0 \
                 --drive /s/b,,1.ext4,serial=kiln-bind-1 --mem-mib 192"
            ),
            "{a}"
        );
        let q = joined(&qemu_args(&c, Accel::Tcg, Path::new("/v"), Path::new("/c")));
        for want in [
            "-device virtio-blk-device,drive=root -drive \
             id=drive0,file=/s/bind-0.ext4,format=raw,if=none,readonly=on \
             -device virtio-blk-device,drive=drive0,serial=kiln-bind-0",
            "-drive id=drive1,file=/s/b,,1.ext4,format=raw,if=none \
             -device virtio-blk-device,drive=drive1,serial=kiln-bind-1",
        ] {
            assert!(q.contains(want), "{want:?} missing from {q}");
        }
    }

    #[test]
    fn vhost_device_vsock_command_line() {
        let a = joined(&vhost_device_vsock_args(Path::new("/v"), Path::new("/u")));
        assert_eq!(a, "--guest-cid 3 --socket /v --uds-path /u");
    }
}
