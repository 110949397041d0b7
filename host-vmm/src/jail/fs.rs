//! The jail's root file system, built from DIR inside a new mount namespace.
//!
//! DIR/kernel and DIR/rootfs are (empty, on the host) mount points for read-only/read-write bind
//! mounts of the kernel and the image; DIR/dev is a private tmpfs holding only `kvm` (a device
//! node owned by the jail uid when root, a bind mount of the host's `/dev/kvm` when rootless);
//! DIR/sys is a private tmpfs holding `module/kvm_pvm` only when the host has it (host-vmm
//! reads that one fact to pick the PVM kernel command line). Everything else in DIR (the vsock
//! socket and its `_PORT` listeners) is shared with the host. Mounts made here never propagate
//! back (the whole tree is made private first), so the host sees only the placeholders.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, pivot_root, sethostname, Gid, Uid};

use super::{JailError, JailIds};

/// Hostname inside the jail's UTS namespace.
pub const JAIL_HOSTNAME: &str = "kiln-vmm";

/// Everything needed to build the root, checked before any namespace is entered.
#[derive(Debug, Clone)]
pub struct RootPlan {
    dir: PathBuf,
    kernel: PathBuf,
    rootfs: Option<PathBuf>,
    read_only: bool,
    ids: JailIds,
    kvm_rdev: u64,
    pvm_host: bool,
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    JailError::sys(what)
}

fn io_sys(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |e| JailError::Sys(what, e)
}

/// Mount flags currently set on the mount holding `path`, in `MS_*` form (the `ST_*` bits
/// `statvfs` reports have the same values). A remount inside a user namespace must keep them.
fn locked_flags(path: &Path) -> Result<MsFlags, JailError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(sys("statvfs"))?;
    let keep = MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC
        | MsFlags::MS_NOATIME
        | MsFlags::MS_NODIRATIME
        | MsFlags::MS_RELATIME;
    Ok(MsFlags::from_bits_truncate(st.flags().bits() as _) & keep)
}

/// Bind-mounts `src` on `dst` and remounts it with `extra` flags added.
fn bind(src: &Path, dst: &Path, extra: MsFlags) -> Result<(), JailError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys("bind mount"))?;
    let flags = locked_flags(dst)? | extra;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .map_err(sys("remount bind mount"))
}

/// Creates an empty regular file to mount over (kept if it exists).
fn placeholder(path: &Path) -> Result<(), JailError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
        .map_err(io_sys("creating a mount point in the jail directory"))
}

fn mkdir(path: &Path) -> Result<(), JailError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(JailError::Sys("creating a directory in the jail", e))
        }
        _ => Ok(()),
    }
}

fn small_tmpfs(dst: &Path) -> Result<(), JailError> {
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,nr_inodes=16,mode=0755"),
    )
    .map_err(sys("mounting a tmpfs in the jail"))
}

impl RootPlan {
    /// Checks the inputs (DIR, kernel, image, `/dev/kvm`) from the host's view.
    pub fn new(
        dir: &Path,
        kernel: &Path,
        rootfs: Option<&Path>,
        read_only: bool,
        ids: JailIds,
    ) -> Result<Self, JailError> {
        let abs = |p: &Path| p.canonicalize().map_err(io_sys("resolving a VM file path"));
        let kvm = std::fs::metadata("/dev/kvm").map_err(io_sys("/dev/kvm"))?;
        if !kvm.file_type().is_char_device() {
            return Err(JailError::Sys(
                "/dev/kvm",
                io::Error::new(io::ErrorKind::InvalidInput, "not a character device"),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            kernel: abs(kernel)?,
            rootfs: rootfs.map(abs).transpose()?,
            read_only,
            ids,
            kvm_rdev: kvm.rdev(),
            pvm_host: crate::boot::cmdline::is_pvm_host(Path::new("/sys")),
        })
    }

    /// In the jailed child: new mount/IPC/UTS/net namespaces, the root built from DIR, pivot,
    /// old root detached. Afterwards the process sees only the jail.
    pub fn enter(&self) -> Result<(), JailError> {
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET,
        )
        .map_err(sys("unshare(mount, IPC, UTS, net)"))?;
        sethostname(JAIL_HOSTNAME).map_err(sys("sethostname"))?;
        // Nothing mounted from here on may reach the host's namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(sys("making mounts private"))?;
        let dir = &self.dir;
        // pivot_root needs the new root to be a mount point.
        mount(
            Some(dir.as_path()),
            dir.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind-mounting the jail directory"))?;
        let ro_noexec =
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let kernel = dir.join("kernel");
        placeholder(&kernel)?;
        bind(&self.kernel, &kernel, ro_noexec)?;
        if let Some(image) = &self.rootfs {
            let target = dir.join("rootfs");
            placeholder(&target)?;
            let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
            // A block-device image must stay openable as a device.
            let is_device = std::fs::metadata(image)
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false);
            if !is_device {
                flags |= MsFlags::MS_NODEV;
            }
            if self.read_only {
                flags |= MsFlags::MS_RDONLY;
            }
            bind(image, &target, flags)?;
        }
        self.make_dev()?;
        if self.pvm_host {
            let sys_dir = dir.join("sys");
            mkdir(&sys_dir)?;
            small_tmpfs(&sys_dir)?;
            std::fs::create_dir_all(sys_dir.join("module/kvm_pvm"))
                .map_err(io_sys("mirroring /sys/module/kvm_pvm"))?;
        }
        // The jail directory itself: the socket lives there, so it stays writable.
        let root_flags =
            locked_flags(dir)? | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            None::<&str>,
            dir.as_path(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | root_flags,
            None::<&str>,
        )
        .map_err(sys("remounting the jail directory"))?;
        if !self.ids.rootless {
            // The jail uid creates the vsock socket there.
            chown(
                dir.as_path(),
                Some(Uid::from_raw(self.ids.uid)),
                Some(Gid::from_raw(self.ids.gid)),
            )
            .map_err(sys("chown of the jail directory"))?;
        }
        // pivot_root(".", "."): the old root ends up stacked on the new one; detach it.
        chdir(dir.as_path()).map_err(sys("chdir into the jail"))?;
        pivot_root(".", ".").map_err(sys("pivot_root"))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
        chdir("/").map_err(sys("chdir /"))?;
        Ok(())
    }

    /// DIR/dev: a private tmpfs with `kvm` only.
    fn make_dev(&self) -> Result<(), JailError> {
        let dev = self.dir.join("dev");
        mkdir(&dev)?;
        small_tmpfs(&dev)?;
        let kvm = dev.join("kvm");
        if self.ids.rootless {
            // No mknod in a user namespace: bind the host node (the caller can open it).
            File::create(&kvm).map_err(io_sys("creating /dev/kvm in the jail"))?;
            bind(
                Path::new("/dev/kvm"),
                &kvm,
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            )?;
        } else {
            mknod(
                &kvm,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                self.kvm_rdev as libc::dev_t,
            )
            .map_err(sys("mknod /dev/kvm in the jail"))?;
            chown(
                &kvm,
                Some(Uid::from_raw(self.ids.uid)),
                Some(Gid::from_raw(self.ids.gid)),
            )
            .map_err(sys("chown of the jail's /dev/kvm"))?;
        }
        // Read-only from now on: nothing else can be created there.
        let flags =
            locked_flags(&dev)? | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        mount(
            None::<&str>,
            &dev,
            None::<&str>,
            MsFlags::MS_REMOUNT | flags,
            None::<&str>,
        )
        .map_err(sys("remounting the jail's /dev read-only"))
    }
}
