//! The command line: runc's global flags and subcommands, as clap definitions only.
//!
//! Flags may follow the container id (`kiln create ID --bundle B`), as runc allows. Flags that
//! runc accepts but that mean nothing for a VM (`--systemd-cgroup`, `--no-pivot`,
//! `--no-new-keyring`, `--rootless`, ...) are accepted and ignored so clients need no special
//! case. The hidden `shim` and `exec-shim` subcommands are how `kiln` re-executes itself.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default state directory (`--root`).
pub const DEFAULT_ROOT: &str = "/run/kiln";

/// kiln: a runc-compatible OCI runtime that runs each container in its own microVM.
#[derive(Debug, Parser)]
#[command(name = "kiln", disable_version_flag = true)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// The command.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options before (or after) the subcommand.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Directory for container state.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Write log messages to this file instead of stderr.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format: text or json (one JSON object per line, like runc).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log debug messages too.
    #[arg(long, global = true)]
    pub debug: bool,
    /// VMM backend: host-vmm, qemu, qemu-kvm or qemu-tcg (overrides the config file).
    #[arg(long, global = true)]
    pub vmm: Option<String>,
    /// Accepted for runc compatibility; kiln manages no host cgroups through systemd.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility and ignored.
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility and ignored.
    #[arg(long, global = true)]
    pub criu: Option<String>,
    /// Print the version and the VMM backends that work on this host.
    #[arg(short = 'v', long = "version")]
    pub version: bool,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time="..." level=... msg="..."` lines.
    Text,
    /// `{"level":...,"msg":...,"time":...}` lines.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container: boot its VM and prepare the process without starting it.
    Create(CreateArgs),
    /// Start a created container.
    Start(IdArg),
    /// Print the state of a container as JSON.
    State(IdArg),
    /// Send a signal to the container's main process.
    Kill(KillArgs),
    /// Delete a container and everything it holds on the host.
    Delete(DeleteArgs),
    /// Create and start a container, attached unless --detach.
    Run(RunArgs),
    /// Run a further process in a running container.
    Exec(ExecArgs),
    /// List containers.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show the host processes of a container.
    Ps(PsArgs),
    /// Freeze a container (stops its VM's vCPUs).
    Pause(IdArg),
    /// Unfreeze a paused container.
    Resume(IdArg),
    /// Print the features this runtime supports as JSON.
    Features,
    /// Write a default config.json.
    Spec(SpecArgs),
    /// Update resource limits (not supported).
    Update(UpdateArgs),
    /// Internal: the per-container shim that owns the VM.
    #[command(hide = true)]
    Shim(ShimArgs),
    /// Internal: the per-process shim of a detached exec.
    #[command(hide = true)]
    ExecShim(ExecShimArgs),
}

/// A single container id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Container id.
    pub id: String,
}

/// `create` (and the part of `run` it shares).
#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// Container id.
    pub id: String,
    /// The bundle directory (config.json and the root filesystem).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the shim's pid (the process that exits with the container) to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master fd (terminal containers).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility and ignored.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// `kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal every process of the container (the guest's pid namespace).
    #[arg(short, long)]
    pub all: bool,
    /// Container id.
    pub id: String,
    /// Signal name (TERM, SIGTERM) or number; default SIGTERM.
    pub signal: Option<String>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill the container first if it is still running.
    #[arg(short, long)]
    pub force: bool,
    /// Container id.
    pub id: String,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Create options.
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the container has started instead of waiting for it.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the container's state after it exits.
    #[arg(long)]
    pub keep: bool,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Container id.
    pub id: String,
    /// The command and its arguments (unless --process is given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// An OCI process JSON file describing the process.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Run on a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Unix socket that receives the terminal's master fd.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Return once the process has started.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the pid of the process that exits with the exec'd process to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// UID[:GID] to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privs.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility and ignored.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility and ignored.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Add a capability to the process (bounding, effective, permitted; also inheritable and
    /// ambient when the process has inheritable capabilities), as runc does.
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Extra fds to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Only ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// table or json.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Container id.
    pub id: String,
    /// ps(1) options (ignored).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `spec`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
}

/// `update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Container id.
    pub id: String,
    /// Everything else.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// `shim` (internal).
#[derive(Debug, Args)]
pub struct ShimArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
}

/// `exec-shim` (internal).
#[derive(Debug, Args)]
pub struct ExecShimArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
    /// JSON file with the exec request (written by `kiln exec --detach`).
    #[arg(long)]
    pub request: PathBuf,
}
