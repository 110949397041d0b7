//! `host-vmm [OPTIONS] -- CMD...`: boot guest-init from the rootfs, run CMD in it with this
//! process's stdin, stdout and stderr (a pty when stdin is a terminal), exit with CMD's status
//! (128+N for a signal), and power the guest off.
//!
//! Threads: the VM (event loop, then its vCPU threads) runs on a thread of its own, built by
//! [`crate::vmm::run_vm_with`]; the main thread is the agent's client. Once the VM thread is
//! started the main thread installs its own seccomp filter ([`crate::seccomp::client`]), which
//! the relay threads it starts inherit. SIGINT/SIGTERM/SIGHUP/SIGWINCH are blocked everywhere and
//! taken by one `sigwait` thread ([`signals`]).
//!
//! The parts that do not need a VM (spec, stdio relay, signals to the process) are in
//! [`session`] and [`spec`], usable against any agent connection; this file owns the VM side:
//! the socket path, the guest command line, waiting for the agent, shutting the guest down.
//! It must not interpret guest output beyond showing the console tail when the boot fails.

pub mod session;
pub mod signals;
pub mod spec;
pub mod terminal;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_protocol::transport::TransportError;
use kiln_protocol::{AgentClient, Request};

use crate::cli::{Cli, ConsoleArg};
use crate::devices::serial::{ConsoleOutput, ConsoleTail};
use crate::exit::{ExitHandle, VmOutcome};
use crate::seccomp::{FilterContext, ThreadFilter, ThreadKind};
use crate::vmm::{run_vm_with, VmConfig, VmHooks, VsockConfig};
use session::{Control, ControlChannel, HostStdio, HybridVsock, SessionEnd};

/// Where guest-init is in the image (rootfs-builder's agent layout).
pub const GUEST_INIT: &str = "/kiln/guest-init";

/// How long the guest may take from start until the agent answers.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the guest may take to power off after `Shutdown` before the VM is stopped.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Invalid combinations of options with `-- CMD`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No image to find guest-init and the container in.
    #[error("a command after -- needs --rootfs (an image with {GUEST_INIT} and /rootfs)")]
    NoRootfs,
    /// `--jail` is not combined with `--` yet.
    #[error("--jail cannot be combined with a command after -- yet")]
    Jail,
    /// The private socket directory could not be created.
    #[error("cannot create the private directory {}", .0.display())]
    TempDir(PathBuf, #[source] std::io::Error),
}

/// `extra` with `init=/kiln/guest-init` appended unless it already sets `init=`.
pub fn guest_cmdline(extra: Option<&str>) -> String {
    let extra = extra.unwrap_or("").trim();
    if extra.split_whitespace().any(|w| w.starts_with("init=")) {
        extra.to_string()
    } else if extra.is_empty() {
        format!("init={GUEST_INIT}")
    } else {
        format!("{extra} init={GUEST_INIT}")
    }
}

/// A directory only this user can enter, removed on drop, holding the vsock socket.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<Self, RunError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("host-vmm-run-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| RunError::TempDir(path.clone(), e))?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // The VMM removes its socket when the VM ends; this covers a VM that never started.
        let _ = std::fs::remove_file(self.0.join("vsock.sock"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The VM configuration of the run mode (not yet validated).
pub fn vm_config(cli: &Cli, uds: &Path) -> Result<VmConfig, RunError> {
    if cli.rootfs.is_none() {
        return Err(RunError::NoRootfs);
    }
    if cli.jail.is_some() {
        return Err(RunError::Jail);
    }
    let mut config = cli.vm_config();
    config.console = cli.console == Some(ConsoleArg::On);
    config.extra_cmdline = Some(guest_cmdline(cli.cmdline.as_deref()));
    config.vsock = Some(VsockConfig {
        uds: uds.to_owned(),
        cid: cli.cid,
    });
    Ok(config)
}

fn describe_outcome(result: &Result<VmOutcome, crate::vmm::VmmError>) -> String {
    match result {
        Ok(VmOutcome::GuestShutdown(why)) => format!("the guest shut down ({why})"),
        Ok(VmOutcome::GuestCrash(why)) => format!("the guest crashed: {why}"),
        Ok(VmOutcome::HostError(why)) => format!("host error: {why}"),
        Err(e) => kiln_protocol::error_chain(e),
    }
}

/// The VM thread and how to stop it.
struct RunningVm {
    thread: JoinHandle<()>,
    exit: ExitHandle,
}

impl RunningVm {
    /// Stops the VM now (if it still runs) and waits for its thread.
    fn stop(self, why: &str) {
        self.exit.request(VmOutcome::HostError(why.into()));
        let _ = self.thread.join();
    }

    /// Gives the guest `timeout` to power off by itself, then stops it.
    fn finish(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !self.thread.is_finished() {
            log::warn!("the guest did not power off within {timeout:?}; stopping the VM");
        }
        self.stop("the guest did not power off after Shutdown");
    }
}

/// Starts the VM thread; `Err` carries the message when the VM could not be built.
fn start_vm(
    config: VmConfig,
    start: Instant,
    console: ConsoleOutput,
    controls: mpsc::Sender<Control>,
) -> Result<RunningVm, String> {
    let (exit_tx, exit_rx) = mpsc::channel();
    let hooks = VmHooks {
        console: Some(console),
        exit_handle: Some(exit_tx),
    };
    let (result_tx, result_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("vmm".into())
        .spawn(move || {
            let result = run_vm_with(&config, start, hooks);
            let why = describe_outcome(&result);
            log::debug!("VM ended: {why}");
            let _ = controls.send(Control::VmStopped(why.clone()));
            let _ = result_tx.send(why);
        })
        .map_err(|e| format!("cannot start the VM thread: {e}"))?;
    match exit_rx.recv() {
        Ok(exit) => Ok(RunningVm { thread, exit }),
        // The VM failed before it had an exit handle (bad image, no KVM).
        Err(_) => {
            let _ = thread.join();
            Err(result_rx
                .recv()
                .unwrap_or_else(|_| "the VM thread ended without a result".into()))
        }
    }
}

/// How waiting for the agent ended, other than with a client.
enum NoAgent {
    VmStopped(String),
    Signal(i32),
    Failed(String),
}

/// Connects the control client, retrying while the guest boots, until the agent answers, the
/// VM stops, a signal arrives or [`AGENT_TIMEOUT`] passes. The attempts run on a thread of their
/// own: one can block for [`kiln_protocol::transport::HANDSHAKE_TIMEOUT`] while the VMM holds a
/// CONNECT the guest does not answer yet, and a Ctrl-C must not wait for that.
fn wait_for_agent(conn: &HybridVsock, channel: &ControlChannel) -> Result<AgentClient, NoAgent> {
    use session::AgentConnector;
    use std::sync::atomic::{AtomicBool, Ordering};
    let give_up = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (conn, stop) = (conn.clone(), Arc::clone(&give_up));
    let attempts = move || {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        let result = loop {
            match conn.connect() {
                Ok(stream) => {
                    break AgentClient::connect(stream, "host-vmm")
                        .map_err(|e| kiln_protocol::error_chain(&e))
                }
                // Timeout: the VMM held the CONNECT because the guest's vsock driver is not
                // up yet (a slow boot); try again.
                Err(e) if e.is_retryable() || matches!(e, TransportError::Timeout { .. }) => {}
                Err(e) => break Err(kiln_protocol::error_chain(&e)),
            }
            if Instant::now() >= deadline {
                break Err(format!("the agent did not answer within {AGENT_TIMEOUT:?}"));
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = tx.send(result);
    };
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(attempts)
        .map_err(|e| NoAgent::Failed(format!("cannot start the connect thread: {e}")))?;
    let stop = || give_up.store(true, Ordering::Relaxed);
    loop {
        match rx.try_recv() {
            Ok(result) => return result.map_err(NoAgent::Failed),
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(NoAgent::Failed("the connect thread ended".into()))
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        match channel.recv_timeout(Duration::from_millis(10)) {
            Some(Control::VmStopped(why)) => {
                stop();
                return Err(NoAgent::VmStopped(why));
            }
            Some(Control::Signal(signal)) => {
                stop();
                return Err(NoAgent::Signal(signal));
            }
            _ => {}
        }
    }
}

fn print_tail(tail: &ConsoleTail) {
    let bytes = tail.contents();
    if bytes.is_empty() {
        eprintln!("host-vmm: (the guest console printed nothing)");
        return;
    }
    eprintln!("host-vmm: last guest console output:");
    let text = String::from_utf8_lossy(&bytes);
    for line in text.lines() {
        eprintln!("  {line}");
    }
}

fn shell_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

/// Runs `cli.command` in a fresh VM; returns the exit status for the process.
pub fn run_command(cli: &Cli, start: Instant) -> u8 {
    // User errors first, before anything is created.
    if let Err(e) = vm_config(cli, Path::new("")) {
        eprintln!("host-vmm: error: {e}");
        return 1;
    }
    let dir = match PrivateDir::new() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("host-vmm: error: {}", kiln_protocol::error_chain(&e));
            return 1;
        }
    };
    let uds = cli
        .vsock_uds
        .clone()
        .unwrap_or_else(|| dir.0.join("vsock.sock"));
    let config = match vm_config(cli, &uds) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-vmm: error: {e}");
            return 1;
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("host-vmm: error: {}", kiln_protocol::error_chain(&e));
        return 1;
    }
    let stdio = match HostStdio::inherit() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("host-vmm: error: {}", kiln_protocol::error_chain(&e));
            return 1;
        }
    };
    // Before any thread exists, so all inherit the mask.
    if let Err(e) = signals::block() {
        eprintln!("host-vmm: error: blocking signals: {e}");
        return 1;
    }
    let tail = ConsoleTail::default();
    let console = if config.console {
        ConsoleOutput::Stderr(Vec::with_capacity(4096))
    } else {
        ConsoleOutput::Tail(tail.clone())
    };
    // Compiled before the VM starts, installed right after (the VM thread has its own).
    let filter =
        match ThreadFilter::compile(ThreadKind::Client, cli.seccomp, &FilterContext::current()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("host-vmm: error: {}", crate::seccomp::describe(&e));
                return 1;
            }
        };
    let channel = ControlChannel::new();
    let vm = match start_vm(config.clone(), start, console, channel.sender()) {
        Ok(vm) => vm,
        Err(why) => {
            eprintln!("host-vmm: error: {why}");
            return 1;
        }
    };
    if let Err(e) = filter.apply() {
        eprintln!("host-vmm: error: {}", crate::seccomp::describe(&e));
        vm.stop("seccomp");
        return 1;
    }
    if let Err(e) = signals::spawn_forwarder(channel.sender()) {
        eprintln!("host-vmm: error: cannot start the signal thread: {e}");
        vm.stop("no signal thread");
        return 1;
    }

    let conn = HybridVsock { uds };
    let client = match wait_for_agent(&conn, &channel) {
        Ok(c) => Arc::new(c),
        Err(NoAgent::VmStopped(why)) => {
            eprintln!("host-vmm: the VM stopped before the agent answered: {why}");
            if !config.console {
                print_tail(&tail);
            }
            vm.stop("stopped");
            return 1;
        }
        Err(NoAgent::Signal(signal)) => {
            vm.stop("interrupted while booting");
            return shell_code(128 + signal);
        }
        Err(NoAgent::Failed(why)) => {
            eprintln!("host-vmm: error: no agent: {why}");
            if !config.console {
                print_tail(&tail);
            }
            vm.stop("no agent");
            return 1;
        }
    };
    log::debug!(
        "agent {:?} answered after {:?}",
        client.agent(),
        start.elapsed()
    );

    let terminal = stdio.terminal.then(|| {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        (term, terminal::window_size(stdio.stdin.as_fd()))
    });
    let spec = spec::command_spec(
        &cli.command,
        terminal.as_ref().map(|(t, size)| (t.as_str(), *size)),
    );
    let end = session::run(&client, &conn, spec, stdio, channel);
    let code = match end {
        Ok(SessionEnd::Exited(status)) => {
            if let Err(e) = client.call_timeout(Request::Shutdown, SHUTDOWN_TIMEOUT) {
                log::debug!("Shutdown: {}", kiln_protocol::error_chain(&e));
            }
            drop(client);
            vm.finish(SHUTDOWN_TIMEOUT);
            return shell_code(status.shell_code());
        }
        Ok(SessionEnd::Interrupted(signal)) => {
            eprintln!("host-vmm: second signal: stopping the VM");
            shell_code(128 + signal)
        }
        Ok(SessionEnd::VmStopped(why)) => {
            eprintln!("host-vmm: the VM stopped while the command ran: {why}");
            1
        }
        Err(e) => {
            eprintln!("host-vmm: error: {}", kiln_protocol::error_chain(&e));
            1
        }
    };
    drop(client);
    vm.stop("host-vmm ended the run");
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn init_is_added_unless_given() {
        assert_eq!(guest_cmdline(None), "init=/kiln/guest-init");
        assert_eq!(
            guest_cmdline(Some(" quiet ")),
            "quiet init=/kiln/guest-init"
        );
        assert_eq!(guest_cmdline(Some("init=/bin/sh x")), "init=/bin/sh x");
        assert_eq!(
            guest_cmdline(Some("rdinit=/x")),
            "rdinit=/x init=/kiln/guest-init"
        );
    }

    #[test]
    fn run_mode_config() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("host-vmm").chain(args.iter().copied())).unwrap()
        };
        let cli = parse(&["--kernel", "k", "--", "/bin/sh", "-c", "exit 3"]);
        assert_eq!(cli.command, ["/bin/sh", "-c", "exit 3"]);
        assert!(matches!(
            vm_config(&cli, Path::new("/s")),
            Err(RunError::NoRootfs)
        ));
        let cli = parse(&["--kernel", "k", "--rootfs", "r", "--", "true"]);
        let c = vm_config(&cli, Path::new("/s")).unwrap();
        assert!(!c.console, "console off by default with a command");
        assert_eq!(c.vsock.unwrap().uds, Path::new("/s"));
        assert_eq!(c.extra_cmdline.as_deref(), Some("init=/kiln/guest-init"));
        let cli = parse(&[
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "--console",
            "on",
            "--",
            "true",
        ]);
        assert!(vm_config(&cli, Path::new("/s")).unwrap().console);
        let cli = parse(&[
            "--kernel", "k", "--rootfs", "r", "--jail", "/j", "--", "true",
        ]);
        assert!(matches!(
            vm_config(&cli, Path::new("/s")),
            Err(RunError::Jail)
        ));
    }
}
