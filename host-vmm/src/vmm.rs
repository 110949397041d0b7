//! Builds a microVM from a [`VmConfig`] and runs it to the end.
//!
//! Order of work (the boot path, kept short: no memory zeroing, no sleeps, no polling):
//! validate the config, open KVM and create the VM, map guest RAM lazily and register it, load
//! the kernel, create devices and wire their eventfds, write the boot structures, configure the
//! vCPUs, start one thread per vCPU, then serve the event loop on the calling thread until the
//! exit eventfd fires; finally kick and join the vCPU threads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::cmdline::{
    build_cmdline, is_pvm_host, CmdlineOptions, MmioDeviceArg, PVM_CMDLINE,
};
use crate::boot::{self, BootError, BootProtocolChoice};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleOutput, SerialConsole};
use crate::devices::virtio::{
    Block, BlockError, DriveConfig, MmioTransport, VirtioDevice, VirtioError, Vsock, VsockError,
    MAX_DRIVES, MMIO_LEN,
};
use crate::event_loop::EventLoop;
use crate::exit::{ExitHandle, VmOutcome};
use crate::kvm::vcpu::{configure_vcpu, kick_signal, register_kick_handler, Vcpu, VcpuError};
use crate::kvm::vm::{Vm, VmError};
use crate::layout::{
    virtio_irq, virtio_mmio_base, BOOT_TIMER_PORT, I8042_PORT, I8042_PORT_LEN, SERIAL_IRQ,
    SERIAL_PORT, SERIAL_PORT_LEN,
};
use crate::memory::{create_guest_memory, GuestMemoryMmap, MemoryError, MAX_MEM_MIB, MIN_MEM_MIB};
use crate::seccomp::{FilterContext, SeccompError, SeccompMode, ThreadFilter, ThreadKind};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Offset of the QueueNotify register in a virtio-mmio window.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Disk image attached as the first virtio-blk device (`/dev/vda`, the root).
    pub rootfs: Option<PathBuf>,
    /// Open the rootfs read-only and mount it `ro`.
    pub read_only: bool,
    /// Extra virtio-blk devices after the rootfs (`--drive`), in order.
    pub drives: Vec<DriveConfig>,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Appended to the kernel command line.
    pub extra_cmdline: Option<String>,
    /// Forward the guest console to stdout (and stdin to the guest).
    pub console: bool,
    /// Boot protocol selection.
    pub boot_protocol: BootProtocolChoice,
    /// virtio-vsock device, attached after the block devices.
    pub vsock: Option<VsockConfig>,
    /// Per-thread seccomp filters (`seccomp` module).
    pub seccomp: SeccompMode,
}

/// The virtio-vsock device's host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Unix socket host processes connect to (created by the VMM; must not exist).
    pub uds: PathBuf,
    /// Guest CID.
    pub cid: u64,
}

/// Invalid user input, caught before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Guest RAM out of range.
    #[error("--mem-mib {0}: guest memory must be between {min} and {max} MiB", min = MIN_MEM_MIB, max = .1)]
    Memory(u64, u64),
    /// vCPU count out of range.
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    /// A file argument cannot be used.
    #[error("{what} {}", path.display())]
    File {
        /// "kernel" or "rootfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// More `--drive`s than [`MAX_DRIVES`].
    #[error("{0} drives given: at most {MAX_DRIVES} --drive options are supported")]
    TooManyDrives(usize),
    /// A file argument is a directory or similar.
    #[error("{what} {}: not a regular file or block device", path.display())]
    NotAFile {
        /// "kernel" or "rootfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
}

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM set-up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading and boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// vsock device.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// Block device.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// virtio transport.
    #[error("virtio device {index}")]
    Virtio {
        /// Device slot.
        index: usize,
        /// Why.
        #[source]
        source: VirtioError,
    },
    /// More virtio devices than IRQ lines.
    #[error("too many virtio devices: no IRQ line left for device {0}")]
    TooManyDevices(usize),
    /// Device bus layout.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A host resource (eventfd, epoll, thread).
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
}

fn host_ram_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => (p.saturating_mul(s) >> 20).min(MAX_MEM_MIB),
        _ => MAX_MEM_MIB,
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::File {
        what,
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if ft.is_file() || ft.is_block_device() {
        Ok(())
    } else {
        Err(ConfigError::NotAFile {
            what,
            path: path.to_owned(),
        })
    }
}

impl VmConfig {
    /// Checks ranges and that the files exist, without creating anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_host_ram(host_ram_mib())
    }

    fn validate_with_host_ram(&self, host_mib: u64) -> Result<(), ConfigError> {
        let max = host_mib.clamp(MIN_MEM_MIB, MAX_MEM_MIB);
        if !(MIN_MEM_MIB..=max).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib, max));
        }
        if !(1..=u32::from(MAX_VCPUS)).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        check_file("kernel", &self.kernel)?;
        if let Some(rootfs) = &self.rootfs {
            check_file("rootfs", rootfs)?;
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::TooManyDrives(self.drives.len()));
        }
        for drive in &self.drives {
            check_file("drive", &drive.path)?;
        }
        Ok(())
    }
}

/// Adds a virtio device as MMIO slot `index`: bus window, ioeventfds, irqfd.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<(Arc<Mutex<MmioTransport>>, MmioDeviceArg), VmmError> {
    let irq = virtio_irq(index).ok_or(VmmError::TooManyDevices(index))?;
    let base = virtio_mmio_base(index);
    let transport = MmioTransport::new(mem.clone(), device)
        .map_err(|source| VmmError::Virtio { index, source })?;
    for (q, evt) in transport.queue_evts().iter().enumerate() {
        vm.register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
    }
    vm.register_irqfd(transport.irq_evt(), irq)?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, MMIO_LEN)?;
    Ok((
        transport,
        MmioDeviceArg {
            base,
            len: MMIO_LEN,
            irq,
        },
    ))
}

/// Kicks every vCPU thread out of `KVM_RUN` and waits for all of them.
fn stop_vcpus(exit: &ExitHandle, handles: Vec<JoinHandle<()>>) {
    debug_assert!(exit.is_stopping());
    for h in &handles {
        // ESRCH (the thread already returned) is fine.
        let _ = h.kill(kick_signal());
    }
    for h in handles {
        if h.join().is_err() {
            exit.request(VmOutcome::HostError("a vCPU thread panicked".into()));
        }
    }
}

/// What a caller driving the VM from another thread (`host-vmm -- CMD`, module `run`) changes
/// in [`run_vm_with`]. The default changes nothing.
#[derive(Default)]
pub struct VmHooks {
    /// Console sink replacing the one `config.console` selects. When set, stdin is never
    /// forwarded to the guest console (it belongs to the caller).
    pub console: Option<ConsoleOutput>,
    /// Receives the VM's [`ExitHandle`] as soon as it exists, so the caller can stop the VM.
    pub exit_handle: Option<std::sync::mpsc::Sender<ExitHandle>>,
}

/// Builds and runs the VM described by `config`. `start` is the process start, the zero of
/// the boot-timer log line. Returns how the guest ended; `Err` only for host-side failures
/// before the guest ran.
pub fn run_vm(config: &VmConfig, start: Instant) -> Result<VmOutcome, VmmError> {
    run_vm_with(config, start, VmHooks::default())
}

/// [`run_vm`] with [`VmHooks`].
pub fn run_vm_with(
    config: &VmConfig,
    start: Instant,
    hooks: VmHooks,
) -> Result<VmOutcome, VmmError> {
    let mark = |what: &str| {
        let t = start.elapsed();
        log::debug!(
            "boot path: {what} at {}.{:03} ms",
            t.as_micros() / 1000,
            t.as_micros() % 1000
        );
    };
    config.validate()?;
    let vcpus = config.vcpus as u8;
    let vm = Vm::new()?;
    mark("VM created");
    let mem_bytes = config.mem_mib << 20;
    let mem = create_guest_memory(config.mem_mib)?;
    vm.register_memory(&mem)?;
    mark("guest memory registered");
    let kernel = boot::load_kernel(&mem, mem_bytes, &config.kernel, config.boot_protocol)?;
    mark("kernel loaded");
    log::debug!(
        "kernel entry {:#x}, protocol {:?}",
        kernel.entry,
        kernel.protocol
    );

    let exit = ExitHandle::new(usize::from(vcpus)).map_err(|e| VmmError::Io("exit eventfd", e))?;
    if let Some(tx) = &hooks.exit_handle {
        // The receiver may be gone already; the VM then simply runs to its own end.
        let _ = tx.send(exit.clone());
    }
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Io("serial eventfd", e))?;
    vm.register_irqfd(&serial_evt, SERIAL_IRQ)?;
    let console_input = config.console && hooks.console.is_none();
    let output = match hooks.console {
        Some(output) => output,
        None if config.console => ConsoleOutput::stdout(),
        None => ConsoleOutput::Sink,
    };
    let serial = Arc::new(Mutex::new(SerialConsole::new(serial_evt, output)));
    pio.insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_PORT,
        I8042_PORT_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(BootTimer::new(start))),
        BOOT_TIMER_PORT,
        1,
    )?;

    let mut virtio = Vec::new();
    let mut mmio_args = Vec::new();
    if let Some(rootfs) = &config.rootfs {
        let block = Block::new(rootfs, config.read_only)?;
        let (dev, arg) = attach_virtio(&vm, &mem, &mut mmio, virtio.len(), Box::new(block))?;
        virtio.push(dev);
        mmio_args.push(arg);
    }
    for drive in &config.drives {
        let block = Block::with_serial(&drive.path, drive.read_only, drive.serial.as_deref())?;
        let (dev, arg) = attach_virtio(&vm, &mem, &mut mmio, virtio.len(), Box::new(block))?;
        virtio.push(dev);
        mmio_args.push(arg);
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock.cid, &vsock.uds)?;
        let (dev, arg) = attach_virtio(&vm, &mem, &mut mmio, virtio.len(), Box::new(device))?;
        virtio.push(dev);
        mmio_args.push(arg);
    }

    let pvm = is_pvm_host(Path::new("/sys"));
    if pvm {
        log::info!(
            "PVM host (/sys/module/kvm_pvm): adding `{PVM_CMDLINE}` to the kernel command line"
        );
    }
    let cmdline = build_cmdline(&CmdlineOptions {
        root_read_only: config.rootfs.as_ref().map(|_| config.read_only),
        quiet: !config.console,
        pvm,
        mmio_devices: &mmio_args,
        extra: config.extra_cmdline.as_deref(),
    })
    .map_err(BootError::from)?;
    log::debug!("kernel command line: {cmdline}");
    boot::write_boot_structures(&mem, mem_bytes, &kernel, &cmdline, vcpus)?;
    mark("devices and boot structures ready");

    // Every vCPU exists before any runs (an INIT/SIPI to a vCPU not yet created would be
    // lost); only vCPU 0 is configured here, the others configure themselves on their threads.
    let cpuid = Arc::new(vm.supported_cpuid()?);
    let mut vcpu_fds = Vec::with_capacity(usize::from(vcpus));
    for id in 0..vcpus {
        vcpu_fds.push(vm.create_vcpu(id)?);
    }
    configure_vcpu(
        &vcpu_fds[0],
        0,
        vcpus,
        &cpuid,
        Some((kernel.protocol, kernel.entry)),
    )?;
    mark("vCPUs created, boot vCPU configured");
    register_kick_handler()?;
    // Compiled once here; each thread installs its own before it handles guest input.
    let filter_ctx = FilterContext::current();
    let vcpu_filter = ThreadFilter::compile(ThreadKind::Vcpu, config.seccomp, &filter_ctx)?;
    let vmm_filter = ThreadFilter::compile(ThreadKind::Vmm, config.seccomp, &filter_ctx)?;
    let mut event_loop = EventLoop::new(exit.clone(), serial.clone(), virtio, console_input)
        .map_err(|e| VmmError::Io("event loop", e))?;

    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut handles = Vec::with_capacity(vcpu_fds.len());
    for (id, fd) in (0..vcpus).zip(vcpu_fds) {
        let mut vcpu = Vcpu::new(id, fd, pio.clone(), mmio.clone(), exit.clone())
            .with_seccomp(vcpu_filter.clone());
        if id != 0 {
            vcpu = vcpu.with_deferred_setup(cpuid.clone(), vcpus);
        }
        match std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run())
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                exit.request(VmOutcome::HostError(format!(
                    "cannot start vCPU thread {id}: {e}"
                )));
                break;
            }
        }
    }

    mark("vCPU threads started");
    // The event loop has not served any guest-triggered event yet.
    if let Err(e) = vmm_filter.apply() {
        exit.request(VmOutcome::HostError(crate::seccomp::describe(&e)));
    } else if let Err(e) = event_loop.run() {
        exit.request(VmOutcome::HostError(format!("event loop failed: {e}")));
    }
    // The loop only returns once a stop was requested (or on error, requested above).
    stop_vcpus(&exit, handles);
    serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
    Ok(exit
        .outcome()
        .unwrap_or_else(|| VmOutcome::HostError("VM stopped without a reason".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &Path) -> VmConfig {
        VmConfig {
            kernel: kernel.to_owned(),
            rootfs: None,
            read_only: false,
            drives: Vec::new(),
            mem_mib: 128,
            vcpus: 1,
            extra_cmdline: None,
            console: true,
            boot_protocol: BootProtocolChoice::Auto,
            vsock: None,
            seccomp: SeccompMode::Kill,
        }
    }

    #[test]
    fn validation_messages_name_the_problem() {
        let exe = std::env::current_exe().unwrap();
        assert!(config(&exe).validate_with_host_ram(4096).is_ok());

        let mut c = config(&exe);
        c.mem_mib = 0;
        let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
        assert_eq!(
            e,
            "--mem-mib 0: guest memory must be between 2 and 4096 MiB"
        );
        c.mem_mib = 4097;
        assert!(c.validate_with_host_ram(4096).is_err());

        for bad in [0, 33, 1000] {
            let mut c = config(&exe);
            c.vcpus = bad;
            let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
            assert_eq!(e, format!("--vcpus {bad}: must be between 1 and 32"));
        }

        let mut c = config(Path::new("/nonexistent/vmlinux"));
        let e = c.validate_with_host_ram(4096).unwrap_err();
        assert_eq!(e.to_string(), "kernel /nonexistent/vmlinux");
        assert!(std::error::Error::source(&e).is_some());
        c.kernel = exe.clone();
        c.rootfs = Some("/nonexistent/rootfs.ext4".into());
        let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
        assert_eq!(e, "rootfs /nonexistent/rootfs.ext4");
        c.rootfs = Some(std::env::temp_dir());
        let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
        assert!(e.ends_with("not a regular file or block device"), "{e}");

        let mut c = config(&exe);
        c.drives = vec!["/nonexistent/data.img,ro".parse().unwrap()];
        let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
        assert_eq!(e, "drive /nonexistent/data.img");
        c.drives = vec![format!("{}", exe.display()).parse().unwrap(); MAX_DRIVES + 1];
        let e = c.validate_with_host_ram(4096).unwrap_err().to_string();
        assert_eq!(e, "9 drives given: at most 8 --drive options are supported");
        c.drives.truncate(MAX_DRIVES);
        assert!(c.validate_with_host_ram(4096).is_ok());
    }
}
