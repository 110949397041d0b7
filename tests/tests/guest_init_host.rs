//! guest-init as a host process: the protocol server and process management, no VM and no KVM.
//!
//! Each test starts its own agent, the static musl `guest-init` binary, as PID 1 of fresh pid and
//! mount namespaces (`unshare --pid --mount --fork --mount-proc --kill-child`), listening on a
//! unix socket, with `--root <tmp>` standing for the guest's `/` and a busybox-static container
//! root at `<tmp>/rootfs`. Tests drive it with `kiln_protocol::client`, like the host does.
//!
//! Needs root (namespaces, mounts, cgroups). The cgroup limit test needs cgroup v2 with the
//! memory and pids controllers delegated; without them it says so loudly and skips.

mod guest_init_common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_init_common as common;
use kiln_protocol::ExitStatus;
use kiln_tests::guests::TempDir;

/// The cgroup v2 directory tests may create cgroups in, if any.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// A running agent with its scratch directory and cgroup base.
struct Agent {
    child: Child,
    /// Kills the agent after `host_agent::LIFETIME`: every client call, stdio read and wait on
    /// it then ends, so a hang fails the test instead of blocking it forever.
    _watchdog: kiln_tests::bounded::Watchdog,
    dir: TempDir,
    socket: PathBuf,
    cgroup_base: Option<PathBuf>,
}

impl Agent {
    fn start(tag: &str) -> Agent {
        let dir = TempDir::new(&format!("gi-{tag}"));
        common::make_busybox_root(&dir.path().join("rootfs"));
        let socket = dir.path().join("agent.sock");
        let cgroup_base =
            cgroup2_root().map(|r| r.join(format!("kiln-test-{}-{tag}", std::process::id())));
        let (child, watchdog) = kiln_tests::host_agent::launch(&kiln_tests::host_agent::Launch {
            bin: common::guest_init_bin(),
            root: dir.path().to_path_buf(),
            socket: socket.clone(),
            cgroup_base: cgroup_base.clone(),
            log_level: Some("debug".into()),
            bind_dev_pts: false,
        });
        Agent {
            _watchdog: watchdog,
            child,
            dir,
            socket,
            cgroup_base,
        }
    }

    fn log(&self) -> String {
        kiln_tests::host_agent::log(self.dir.path())
    }

    /// A protocol target on this agent's unix socket.
    fn target(&self) -> common::Target {
        let socket = self.socket.clone();
        common::Target::new(Box::new(move || {
            UnixStream::connect(&socket).expect("connecting to the agent")
        }))
    }

    /// guest-init's pid as the host sees it (the child of `unshare`).
    fn agent_host_pid(&self) -> u32 {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("guest-init process under unshare")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(base) = &self.cgroup_base {
            kiln_tests::host_agent::remove_cgroup_base(base);
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
    }
}

#[test]
fn handshake_version_health_and_bad_openings() {
    let agent = Agent::start("hello");
    let t = agent.target();
    common::case_handshake_and_bad_openings(&t);
    common::report_numbers(&t, "guest-init on the host (unix socket)");
}

#[test]
fn malformed_and_oversize_frames_on_a_control_connection() {
    let agent = Agent::start("frames");
    common::case_bad_frames_on_control_connection(&agent.target());
}

#[test]
fn exit_codes_signals_and_events() {
    let agent = Agent::start("exit");
    common::case_exit_codes_signals_and_events(&agent.target());
}

#[test]
fn stdio_apart_and_8mib_through_stdin_and_stdout() {
    let agent = Agent::start("stdio");
    common::case_stdio(&agent.target());
}

#[test]
fn twenty_concurrent_execs() {
    let agent = Agent::start("concurrent");
    common::case_twenty_concurrent_execs(&Arc::new(agent.target()));
}

fn zombies_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        if field("PPid:") == ppid.to_string() && field("State:").starts_with('Z') {
            out.push(pid);
        }
    }
    out
}

#[test]
fn five_hundred_orphans_are_reaped() {
    let agent = Agent::start("reap");
    let t = agent.target();
    common::case_spawn_500_orphans(&t);
    let host_pid = agent.agent_host_pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let z = zombies_of(host_pid);
        if z.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "zombies left: {z:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent still works afterwards.
    let (status, _, _) = t.run("rp1", "after", common::sh("exit 0"));
    assert_eq!(status, ExitStatus::Exited(0));
}

#[test]
fn env_hostname_cwd_and_user_applied() {
    let agent = Agent::start("env");
    common::case_env_hostname_user(&agent.target());
}

#[test]
fn process_settings_and_root_protection() {
    let agent = Agent::start("settings");
    common::case_process_settings(&agent.target());
}

#[test]
fn capabilities_applied() {
    let agent = Agent::start("caps");
    common::case_capabilities(&agent.target());
}

#[test]
fn seccomp_profile_applied() {
    let agent = Agent::start("seccomp");
    common::case_seccomp(&agent.target());
}

#[test]
fn bad_specs_and_failed_execs() {
    let agent = Agent::start("badspec");
    common::case_bad_specs(&agent.target());
}

#[test]
fn kill_all_signals_every_process_of_the_container() {
    let agent = Agent::start("killall");
    common::case_signal_all(&agent.target());
}

#[test]
fn terminal_process_gets_a_pty_and_resizes() {
    let agent = Agent::start("tty");
    common::case_terminal(&agent.target());
}

#[test]
fn cgroup_pids_and_memory_limits() {
    let agent = Agent::start("cgroup");
    let Some(base) = agent.cgroup_base.clone() else {
        eprintln!("\n!!! SKIPPED cgroup_pids_and_memory_limits: no cgroup v2 hierarchy here\n");
        return;
    };
    let controllers =
        std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    if !(controllers.contains("memory") && controllers.contains("pids")) {
        eprintln!(
            "\n!!! SKIPPED cgroup_pids_and_memory_limits: cgroup v2 at {} has controllers \
             `{}`, not memory and pids (cgroup v1 host?). guest_init_qemu covers the limits \
             in a real guest kernel.\n",
            base.display(),
            controllers.trim()
        );
        return;
    }
    common::case_cgroup_limits(&agent.target());
}
