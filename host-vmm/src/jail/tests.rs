//! Jail unit tests: path rules, id rules, exit statuses, the file plan (what is bound where,
//! read-only or not, access of the jail uid), and (as root) the privilege drop in a forked
//! child. The namespace and mount set-up is covered end to end by
//! `tests/tests/vmm_jail.rs`, which boots a VM inside the jail.

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use super::privs::{self, Limits};
use super::*;

fn cfg(uid: Option<u32>, gid: Option<u32>) -> JailConfig {
    JailConfig {
        dir: "/jail".into(),
        uid,
        gid,
        seccomp: SeccompMode::Kill,
    }
}

#[test]
fn socket_must_be_strictly_inside_the_jail() {
    let dir = Path::new("/srv/jail");
    assert_eq!(
        path_inside(dir, Path::new("/srv/jail/vsock.sock")),
        Some("/vsock.sock".into())
    );
    assert_eq!(
        path_inside(dir, Path::new("/srv/jail/run/v.sock")),
        Some("/run/v.sock".into())
    );
    for bad in [
        "/srv/jail",
        "/srv/other/v.sock",
        "/srv/jailbreak/v.sock",
        "/srv/jail/kernel",
        "/srv/jail/rootfs",
        "/srv/jail/drives",
        "/srv/jail/drives/0",
        "/srv/jail/dev/v.sock",
        "/srv/jail/sys",
    ] {
        assert_eq!(path_inside(dir, Path::new(bad)), None, "{bad}");
    }
}

#[test]
fn ids() {
    let root = resolve_ids(&cfg(Some(1000), Some(1001)), 0, 0).unwrap();
    assert_eq!((root.uid, root.gid, root.rootless), (1000, 1001, false));
    let keep = resolve_ids(&cfg(None, None), 0, 0).unwrap();
    assert_eq!((keep.uid, keep.gid), (0, 0));
    let user = resolve_ids(&cfg(None, None), 1000, 100).unwrap();
    assert_eq!((user.uid, user.gid, user.rootless), (1000, 100, true));
    assert!(resolve_ids(&cfg(Some(1000), None), 1000, 100).is_ok());
    assert!(matches!(
        resolve_ids(&cfg(Some(0), None), 1000, 100),
        Err(JailError::IdsNeedRoot)
    ));
    assert!(matches!(
        resolve_ids(&cfg(None, Some(5)), 1000, 100),
        Err(JailError::IdsNeedRoot)
    ));
}

#[test]
fn monitor_exit_status() {
    use super::monitor::exit_status;
    assert_eq!(exit_status(0), 0);
    assert_eq!(exit_status(2 << 8), 2);
    assert_eq!(exit_status(libc::SIGKILL), 128 + 9);
    assert_eq!(exit_status(libc::SIGSYS), 128 + 31);
}

#[test]
fn limits_follow_the_largest_disk() {
    let dir = Scratch::new("limits");
    let small = dir.file("small.img", 4096, 0o600);
    let large = dir.file("large.img", 3 * 4096, 0o600);
    let l = Limits::for_disks([small.as_path()]).unwrap();
    assert_eq!((l.nofile, l.fsize), (privs::NOFILE_LIMIT, Some(4096)));
    // A drive larger than the rootfs must be writable to its end.
    let l = Limits::for_disks([small.as_path(), large.as_path()]).unwrap();
    assert_eq!(l.fsize, Some(3 * 4096));
    let l = Limits::for_disks([large.as_path(), small.as_path()]).unwrap();
    assert_eq!(l.fsize, Some(3 * 4096));
    assert_eq!(Limits::for_disks([]).unwrap().fsize, None);
    assert!(Limits::for_disks([Path::new("/nonexistent/img")]).is_err());
}

/// A directory under the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("kiln-jail-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }

    fn file(&self, name: &str, len: usize, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vm_config(args: &[&str]) -> crate::vmm::VmConfig {
    use clap::Parser;
    crate::cli::Cli::try_parse_from(std::iter::once("host-vmm").chain(args.iter().copied()))
        .unwrap()
        .vm_config()
}

/// The caller's own ids, as a jail that keeps them would use.
fn own_ids() -> JailIds {
    JailIds {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        rootless: false,
    }
}

#[test]
fn plan_binds_kernel_rootfs_and_drives_in_order() {
    use super::fs::{plan_binds, Bind};
    let dir = Scratch::new("plan");
    let kernel = dir.file("k", 512, 0o600);
    let rootfs = dir.file("root.img", 512, 0o600);
    let data = dir.file("data.img", 1024, 0o600);
    let scratch = dir.file("scratch,1.img", 512, 0o600);
    // Symlinks are resolved: the jail binds the real file.
    std::os::unix::fs::symlink(&data, dir.0.join("link.img")).unwrap();
    let link = dir.0.join("link.img");
    let vm = vm_config(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--read-only",
        "--drive",
        &format!("{},ro,serial=data", link.display()),
        "--drive",
        &format!("{}", scratch.display()).replace(',', ",,"),
    ]);
    let binds = plan_binds(&vm, own_ids()).unwrap();
    let real = |p: &Path| p.canonicalize().unwrap();
    let want = [
        (real(&kernel), "/kernel", true, false),
        (real(&rootfs), "/rootfs", true, true),
        (real(&data), "/drives/0", true, true),
        (real(&scratch), "/drives/1", false, true),
    ];
    let got: Vec<_> = binds
        .iter()
        .map(|b: &Bind| {
            (
                b.source.clone(),
                b.target.to_str().unwrap(),
                b.read_only,
                b.disk,
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(jail_drive_path(7), Path::new("/drives/7"));

    // Without drives: only the kernel (and the rootfs when given).
    let vm = vm_config(&["--kernel", kernel.to_str().unwrap()]);
    let binds = plan_binds(&vm, own_ids()).unwrap();
    assert_eq!(binds.len(), 1);
    assert_eq!(binds[0].target, Path::new(JAIL_KERNEL));
}

#[test]
fn plan_names_a_missing_drive() {
    let dir = Scratch::new("plan-missing");
    let kernel = dir.file("k", 512, 0o600);
    let missing = dir.0.join("nope.img");
    let vm = vm_config(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--drive",
        &format!("{},ro", missing.display()),
    ]);
    let e = fs::plan_binds(&vm, own_ids()).unwrap_err();
    assert_eq!(e.to_string(), format!("--drive {}", missing.display()));
}

#[test]
fn access_follows_the_permission_bits() {
    use super::access::mode_allows;
    let ids = |uid, gid| JailIds {
        uid,
        gid,
        rootless: false,
    };
    // Owner class.
    assert!(mode_allows(0o600, 7, 7, ids(7, 9), true));
    assert!(mode_allows(0o400, 7, 7, ids(7, 9), false));
    assert!(!mode_allows(0o400, 7, 7, ids(7, 9), true));
    // The owner class decides even when others have more.
    assert!(!mode_allows(0o066, 7, 7, ids(7, 7), false));
    // Group class, then others.
    assert!(mode_allows(0o040, 0, 9, ids(7, 9), false));
    assert!(!mode_allows(0o040, 0, 9, ids(7, 9), true));
    assert!(mode_allows(0o604, 0, 0, ids(65534, 65534), false));
    assert!(!mode_allows(0o600, 0, 0, ids(65534, 65534), false));
    assert!(mode_allows(0o666, 0, 0, ids(65534, 65534), true));
}

/// As root: a drive the jail uid cannot open is refused on the host with one line naming it;
/// `ro` needs read access only.
#[test]
fn plan_refuses_a_drive_the_jail_uid_cannot_open() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("plan_refuses_a_drive_the_jail_uid_cannot_open: needs root, skipped");
        return;
    }
    let dir = Scratch::new("plan-access");
    let kernel = dir.file("k", 512, 0o644);
    let data = dir.file("data.img", 512, 0o644);
    let nobody = JailIds {
        uid: 65534,
        gid: 65534,
        rootless: false,
    };
    let drive = |opts: &str| {
        vm_config(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--drive",
            &format!("{}{opts}", data.display()),
        ])
    };
    assert!(fs::plan_binds(&drive(",ro"), nobody).is_ok());
    let e = fs::plan_binds(&drive(""), nobody).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "--drive {}: not readable and writable by the jail uid 65534 / gid 65534 (owner 0:0, mode 0644)",
            data.display()
        )
    );
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    assert!(fs::plan_binds(&drive(""), nobody).is_ok());
}

/// As root: after `confine`, the child has no capabilities, no groups, the target ids,
/// no_new_privs and the limits. Runs in a forked child; skipped (with a note) when not root.
#[test]
fn confine_drops_everything() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("confine_drops_everything: needs root, skipped");
        return;
    }
    let ids = JailIds {
        uid: 65534,
        gid: 65534,
        rootless: false,
    };
    let limits = Limits {
        nofile: 64,
        fsize: Some(4096),
    };
    // SAFETY: the child makes only syscalls (through nix/libc wrappers that do not allocate)
    // and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = (|| {
            // SAFETY: a fresh pipe; the write end is handed to `confine` as the fd to keep.
            let kept = unsafe {
                let mut fds = [0; 2];
                if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                    return 9;
                }
                std::os::fd::OwnedFd::from_raw_fd(fds[1])
            };
            let Ok(kept) = privs::confine(ids, &limits, kept) else {
                return 10;
            };
            if kept.as_raw_fd() != 3 {
                return 16;
            }
            match privs::current_caps() {
                Ok((0, 0, 0)) => {}
                _ => return 11,
            }
            // SAFETY: plain id and prctl queries.
            let (uid, euid, gid, groups, nnp, bnd0) = unsafe {
                (
                    libc::getuid(),
                    libc::geteuid(),
                    libc::getgid(),
                    libc::getgroups(0, std::ptr::null_mut()),
                    libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                    libc::prctl(libc::PR_CAPBSET_READ, 21 /* CAP_SYS_ADMIN */, 0, 0, 0),
                )
            };
            if (uid, euid, gid) != (65534, 65534, 65534) {
                return 12;
            }
            if groups != 0 || nnp != 1 || bnd0 != 0 {
                return 13;
            }
            let mut rl = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: writes into a live rlimit.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
            if rl.rlim_cur != 64 {
                return 14;
            }
            // fd 4 and above are closed (3 is the kept fd): a dup of stderr gets 4.
            // SAFETY: dup of fd 2.
            if unsafe { libc::dup(2) } != 4 {
                return 15;
            }
            0
        })();
        // SAFETY: leaves the child without running the harness's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (exit code = failed check)"
    );
}
