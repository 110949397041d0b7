//! The jail's root file system, built from DIR inside a new mount namespace.
//!
//! DIR/kernel and DIR/rootfs are (empty, on the host) mount points for read-only/read-write bind
//! mounts of the kernel and the image; DIR/drives (only with `--drive`) is a private tmpfs
//! holding one mount point `N` per drive, bound like the image (read-only for a `ro` drive) and
//! then remounted read-only, so the host sees one empty directory; DIR/dev is a private tmpfs
//! holding only `kvm` (a device
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

use super::{access, jail_drive_path, JailError, JailIds, JAIL_DRIVES, JAIL_KERNEL, JAIL_ROOTFS};
use crate::vmm::VmConfig;

/// Hostname inside the jail's UTS namespace.
pub const JAIL_HOSTNAME: &str = "kiln-vmm";

/// One host file bind-mounted into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host file, absolute and free of symlinks.
    pub source: PathBuf,
    /// Where it appears inside the jail (`/kernel`, `/rootfs`, `/drives/N`).
    pub target: PathBuf,
    /// Bound read-only (the VMM opens it `O_RDONLY` too).
    pub read_only: bool,
    /// A disk (rootfs or drive) rather than the kernel.
    pub disk: bool,
}

/// Everything needed to build the root, checked before any namespace is entered.
#[derive(Debug, Clone)]
pub struct RootPlan {
    dir: PathBuf,
    binds: Vec<Bind>,
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

/// Creates a directory to mount over; an existing one is kept, anything else there (a symlink
/// left in DIR, a file) is refused.
fn mkdir(path: &Path) -> Result<(), JailError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(JailError::Sys("creating a directory in the jail", e))
        }
        Err(_) if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) => {
            Err(JailError::Sys(
                "a mount point in the jail directory",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", path.display()),
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Remounts the tmpfs at `dir` read-only: nothing more can be created there.
fn seal(dir: &Path) -> Result<(), JailError> {
    let flags = locked_flags(dir)? | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(sys("remounting a jail directory read-only"))
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

/// The files `vm` needs in the jail, in order (kernel, rootfs, drives): each resolved to its
/// real path and openable by `ids` the way the VMM will open it (read-only or read-write).
pub fn plan_binds(vm: &VmConfig, ids: JailIds) -> Result<Vec<Bind>, JailError> {
    let mut files: Vec<(&'static str, &Path, PathBuf, bool, bool)> =
        vec![("--kernel", &vm.kernel, JAIL_KERNEL.into(), true, false)];
    if let Some(rootfs) = &vm.rootfs {
        files.push(("--rootfs", rootfs, JAIL_ROOTFS.into(), vm.read_only, true));
    }
    for (index, drive) in vm.drives.iter().enumerate() {
        let target = jail_drive_path(index);
        files.push(("--drive", &drive.path, target, drive.read_only, true));
    }
    let mut binds = Vec::with_capacity(files.len());
    for (what, path, target, read_only, disk) in files {
        let source = path.canonicalize().map_err(|source| JailError::File {
            what,
            path: path.to_owned(),
            source,
        })?;
        access::check(what, &source, !read_only, ids)?;
        binds.push(Bind {
            source,
            target,
            read_only,
            disk,
        });
    }
    Ok(binds)
}

impl RootPlan {
    /// Checks the inputs (DIR, kernel, image, drives, `/dev/kvm`) from the host's view, see
    /// [`plan_binds`].
    pub fn new(dir: &Path, vm: &VmConfig, ids: JailIds) -> Result<Self, JailError> {
        let binds = plan_binds(vm, ids)?;
        let kvm = std::fs::metadata("/dev/kvm").map_err(io_sys("/dev/kvm"))?;
        if !kvm.file_type().is_char_device() {
            return Err(JailError::Sys(
                "/dev/kvm",
                io::Error::new(io::ErrorKind::InvalidInput, "not a character device"),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            binds,
            ids,
            kvm_rdev: kvm.rdev(),
            pvm_host: crate::boot::cmdline::is_pvm_host(Path::new("/sys")),
        })
    }

    /// The files bound into the jail, in order: kernel, rootfs, drives.
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// The host paths of the disks (rootfs and drives).
    pub fn disks(&self) -> impl Iterator<Item = &Path> {
        self.binds
            .iter()
            .filter(|b| b.disk)
            .map(|b| b.source.as_path())
    }

    /// Mount flags of a bind: never suid or exec; no device nodes except a block-device disk,
    /// which must stay openable as a device; read-only when asked.
    fn bind_flags(bind: &Bind) -> MsFlags {
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let is_device = std::fs::metadata(&bind.source)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if !is_device {
            flags |= MsFlags::MS_NODEV;
        }
        if bind.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        flags
    }

    /// Binds every planned file on a placeholder in DIR (drives in a private tmpfs).
    fn bind_files(&self) -> Result<(), JailError> {
        let drives_dir = self.dir.join(JAIL_DRIVES.trim_start_matches('/'));
        let has_drives = self.binds.iter().any(|b| b.target.starts_with(JAIL_DRIVES));
        if has_drives {
            mkdir(&drives_dir)?;
            small_tmpfs(&drives_dir)?;
        }
        for bind_spec in &self.binds {
            let rel = bind_spec
                .target
                .strip_prefix("/")
                .unwrap_or(&bind_spec.target);
            let target = self.dir.join(rel);
            placeholder(&target)?;
            bind(&bind_spec.source, &target, Self::bind_flags(bind_spec))?;
        }
        if has_drives {
            seal(&drives_dir)?;
        }
        Ok(())
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
        self.bind_files()?;
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
        seal(&dev)
    }
}
