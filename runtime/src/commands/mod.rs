//! One module per subcommand. Each takes its parsed arguments and a [`Context`] and returns the
//! process exit code or a [`CommandError`], which `main` prints as one line (and logs).

pub mod create;
pub mod delete;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod version;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use thiserror::Error;

use crate::bundle::BundleError;
use crate::cli::{GlobalOpts, LogFormat};
use crate::config::{ConfigError, RuntimeConfig};
use crate::image::ImageError;
use crate::sandbox::SandboxError;
use crate::shim::{ShimError, READY_FD};
use crate::signals::SignalError;
use crate::state::{StateError, StateStore};

/// Errors of the subcommands. Messages are runc's where runc has one.
#[derive(Debug, Error)]
pub enum CommandError {
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// Bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Runtime config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Disk image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// VM.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Shim.
    #[error(transparent)]
    Shim(#[from] ShimError),
    /// Signal name.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// OCI hooks.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// A call to the agent failed.
    #[error("{0}")]
    Agent(String, #[source] kiln_protocol::ClientError),
    /// The host cgroup (the string names the bundle's config.json).
    #[error("{0}")]
    Cgroup(String, #[source] crate::cgroups::CgroupError),
    /// A file operation.
    #[error("{path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The container is in the wrong state for the command.
    #[error("{0}")]
    InvalidState(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A shim reported failure while starting.
    #[error("{0}")]
    ShimFailed(String),
    /// Not supported by kiln.
    #[error("{0}")]
    Unsupported(String),
}

impl CommandError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        CommandError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// What every command gets.
pub struct Context<'a> {
    /// Global options.
    pub global: &'a GlobalOpts,
    /// The state store at `--root`.
    pub store: StateStore,
}

impl<'a> Context<'a> {
    /// A context for `global`.
    pub fn new(global: &'a GlobalOpts) -> Self {
        Context {
            global,
            store: StateStore::new(&global.root),
        }
    }

    /// The runtime config (file + environment).
    pub fn config(&self) -> Result<RuntimeConfig, CommandError> {
        Ok(RuntimeConfig::load()?)
    }

    /// Starts `kiln <global flags> <args>` in a new session with our stdio and a ready pipe on
    /// fd [`READY_FD`]; waits for its one-line report. Returns the child once it said "ok".
    pub fn spawn_helper(&self, args: &[&str]) -> Result<Child, CommandError> {
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| CommandError::io("pipe", "create ready pipe", e.into()))?;
        let exe = std::env::current_exe()
            .map_err(|e| CommandError::io("/proc/self/exe", "resolve", e))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--root").arg(&self.global.root);
        if let Some(log) = &self.global.log {
            cmd.arg("--log").arg(log);
        }
        if self.global.log_format == LogFormat::Json {
            cmd.args(["--log-format", "json"]);
        }
        if self.global.debug {
            cmd.arg("--debug");
        }
        cmd.args(args);
        let write_fd = write_end.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (setsid, dup2).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(write_fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| CommandError::io("kiln", "start helper process", e))?;
        drop(write_end);
        let report = read_report(read_end)?;
        match report.trim_end() {
            "ok" => Ok(child),
            other => {
                let msg = other.strip_prefix("error: ").unwrap_or(other);
                let msg = if msg.is_empty() {
                    "the shim exited before reporting (see the log)".to_string()
                } else {
                    msg.to_string()
                };
                let mut child = child;
                let _ = child.wait();
                Err(CommandError::ShimFailed(msg))
            }
        }
    }
}

/// Reads the helper's report line (up to the first newline; EOF when it exits without one).
fn read_report(read_end: OwnedFd) -> Result<String, CommandError> {
    let mut f = std::fs::File::from(read_end);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 64 * 1024 {
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CommandError::io("ready pipe", "read", e)),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).into_owned())
}

/// Writes a pid file atomically (runc writes it the same way).
pub fn write_pid_file(path: &std::path::Path, pid: u32) -> Result<(), CommandError> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.kiln-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("pid")
    ));
    std::fs::write(&tmp, pid.to_string()).map_err(|e| CommandError::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CommandError::io(path, "write pid file", e)
    })
}
