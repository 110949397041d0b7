//! guest-init as a host process: the launcher shared by the tests that drive the agent without
//! a VM (`guest_init_host.rs`, `vmm_run.rs`).
//!
//! The static guest-init runs as PID 1 of fresh pid and mount namespaces (`unshare --pid
//! --mount --fork --mount-proc --kill-child`), listening on a unix socket, with `--root` standing
//! for the guest's `/`. It dies with the test (`PR_SET_PDEATHSIG`), and a [`Watchdog`] kills it
//! after [`LIFETIME`], so a hung call or read on it fails the test instead of blocking it. Its
//! stdout and stderr go to `<root>/agent.log`.
//!
//! Needs root (namespaces, mounts, cgroups).

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bounded::Watchdog;

/// How long one agent (one test) may live at all.
pub const LIFETIME: Duration = Duration::from_secs(300);

/// How long the agent may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start one agent.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The static guest-init binary.
    pub bin: PathBuf,
    /// `--root`: the scratch directory standing for the guest's `/` (holds `agent.log`).
    pub root: PathBuf,
    /// `--listen-unix`.
    pub socket: PathBuf,
    /// `--cgroup-base`, if any.
    pub cgroup_base: Option<PathBuf>,
    /// `--log-level`, if any.
    pub log_level: Option<String>,
    /// Bind the host's `/dev/pts` at `<root>/dev/pts` inside the agent's mount namespace (the
    /// default container spec of `host-vmm --` binds the guest's `/dev/pts`).
    pub bind_dev_pts: bool,
}

/// `<root>/agent.log`: what the agent printed.
pub fn log(root: &Path) -> String {
    std::fs::read_to_string(root.join("agent.log")).unwrap_or_default()
}

/// Starts the agent and waits until its socket accepts connections. Returns the `unshare`
/// process and the watchdog that kills it after [`LIFETIME`]; the caller kills and reaps the
/// child when done (drop the watchdog after reaping or not at all: it holds a pidfd, so a late
/// kill cannot hit another process). Panics with the agent's log when it does not listen.
pub fn launch(l: &Launch) -> (Child, Watchdog) {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--mount", "--fork", "--mount-proc", "--kill-child"]);
    if l.bind_dev_pts {
        std::fs::create_dir_all(l.root.join("dev/pts")).expect("creating <root>/dev/pts");
        cmd.args([
            "sh",
            "-c",
            "mount --bind /dev/pts \"$0/dev/pts\" && exec \"$@\"",
        ])
        .arg(&l.root);
    }
    cmd.arg(&l.bin)
        .arg("--root")
        .arg(&l.root)
        .arg("--listen-unix")
        .arg(&l.socket);
    if let Some(level) = &l.log_level {
        cmd.args(["--log-level", level]);
    }
    if let Some(cg) = &l.cgroup_base {
        cmd.arg("--cgroup-base").arg(cg);
    }
    let log_file = std::fs::File::create(l.root.join("agent.log")).expect("creating agent.log");
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("cloning the agent.log handle"))
        .stderr(log_file);
    // SAFETY: the pre-exec hook only calls prctl, which is async-signal-safe: if the test dies
    // without running Drop, unshare (and with --kill-child the agent) goes too.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawning unshare + guest-init");
    let watchdog = Watchdog::kill_after(&child, LIFETIME, "the guest-init agent");
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while UnixStream::connect(&l.socket).is_err() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent not listening after {LISTEN_TIMEOUT:?}:\n{}",
                log(&l.root)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, watchdog)
}

/// Removes a cgroup base the agent used and the cgroups in it, once they are empty (processes
/// die with the pid namespace; their cgroups empty shortly after). Best effort, up to 2 s.
pub fn remove_cgroup_base(base: &Path) {
    for _ in 0..100 {
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        if std::fs::remove_dir(base).is_ok() || !base.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
