//! The KVM VM: opened and set up once (API 12, TSS, in-kernel irqchip and PIT2), guest memory
//! registered as slots, eventfds wired as irqfds and ioeventfds.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::KVM_TSS_ADDRESS;
use crate::memory::GuestMemoryMmap;

/// The only KVM API version there is.
const KVM_API_VERSION: i32 = 12;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Unexpected API version.
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// An open VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM with an in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
        Ok(Self { kvm, fd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// CPUID entries KVM supports on this host (the base every vCPU adjusts).
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))
    }

    /// Registers every region of `mem` as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).map_err(|_| {
                VmError::Ioctl(
                    "KVM_SET_USER_MEMORY_REGION",
                    kvm_ioctls::Error::new(libc::EFAULT),
                )
            })?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `mem`, which the VMM keeps alive (and never unmaps) until after the VM is dropped.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }

    /// Makes writes to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))
    }

    /// Makes guest writes of `datamatch` to MMIO address `addr` signal `evt` in the kernel.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmError::Ioctl("KVM_IOEVENTFD", e))
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))
    }
}
