//! Jail unit tests: path rules, id rules, exit statuses, and (as root) the privilege drop in a
//! forked child. The namespace and mount set-up is covered end to end by
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
fn limits_follow_the_image() {
    let exe = std::env::current_exe().unwrap();
    let size = std::fs::metadata(&exe).unwrap().len();
    let l = Limits::for_image(Some(&exe)).unwrap();
    assert_eq!((l.nofile, l.fsize), (privs::NOFILE_LIMIT, Some(size)));
    assert_eq!(Limits::for_image(None).unwrap().fsize, None);
    assert!(Limits::for_image(Some(Path::new("/nonexistent/img"))).is_err());
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
