//! Launching agent microVMs: one kernel, one root image with guest-init as PID 1, extra disks
//! ([`Drive`], each with a serial the guest finds it by), one vsock device, under host-vmm or
//! QEMU microvm ([`Backend`]).
//!
//! [`Vm::launch`] spawns the VMM process (for QEMU, `vhost-device-vsock` first), [`Vm::connect_agent`]
//! waits for guest-init to answer on vsock port [`AGENT_VSOCK_PORT`] and returns the protocol
//! client, [`Vm::attach`] opens stdio streams. Dropping a [`Vm`] kills and reaps its processes
//! and removes its sockets; the console log stays in the state directory.
//!
//! This module knows nothing about OCI: callers (the `kiln` runtime, `host-vmm --` tests, the
//! benchmarks) build the image and the container spec.

pub mod backend;
pub mod cmdline;
pub mod command;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kiln_protocol::client::{AgentClient, ClientError};
use kiln_protocol::transport::{self, TransportError};
use kiln_protocol::{StdioStream, AGENT_VSOCK_PORT};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use backend::{Accel, Backend, Detection, HostProbe};
pub use cmdline::KernelCmdline;

/// Longest unix socket path (`sun_path` is 108 bytes with the NUL); guest-initiated vsock
/// connections use `<uds>_<port>`, so the hybrid socket keeps 11 bytes spare.
const MAX_SOCKET_PATH: usize = 107 - 11;

/// How long `vhost-device-vsock` may take to create its vhost-user socket.
const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable naming the `vhost-device-vsock` executable.
pub const VHOST_DEVICE_VSOCK_ENV: &str = "KILN_VHOST_DEVICE_VSOCK";

/// The environment variable naming the QEMU executable.
pub const QEMU_ENV: &str = "KILN_QEMU";

/// The console line guest-init writes once its vsock listener is up (`guest-init/src/main.rs`).
///
/// With QEMU, kiln connects only after this line appeared: `vhost-device-vsock` 0.3.0 stops
/// answering host-initiated connections for good when one arrives while the guest driver is
/// activating the device (seen here about once in ten boots with 5-50 ms retries; every later
/// `CONNECT` then waits forever for the guest's RESPONSE). host-vmm has no such window.
pub const AGENT_LISTENING_MARKER: &str = "listening on vsock port";

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Root image (agent layout: `/kiln/guest-init`, container under `/rootfs`), `/dev/vda`.
    pub rootfs: PathBuf,
    /// Attach and mount the root image read-only.
    pub read_only: bool,
    /// Extra disks after the root image, in order (`/dev/vdb`, ... under host-vmm; the guest
    /// should find them by serial, QEMU's order differs).
    pub drives: Vec<Drive>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Extra kernel command-line options, appended last.
    pub extra_cmdline: Option<String>,
    /// Keep the full kernel log on the console (no `quiet`).
    pub verbose_console: bool,
    /// The VMM.
    pub backend: Backend,
    /// Directory for this VM's sockets and logs (created if missing; one VM per directory).
    pub state_dir: PathBuf,
    /// Where the guest console goes; default `<state_dir>/console.log`.
    pub console_log: Option<PathBuf>,
}

impl VmConfig {
    /// A config with 256 MiB, one vCPU, read-write root, quiet console.
    pub fn new(
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
        backend: Backend,
        state_dir: impl Into<PathBuf>,
    ) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            read_only: false,
            drives: Vec::new(),
            mem_mib: 256,
            vcpus: 1,
            extra_cmdline: None,
            verbose_console: false,
            backend,
            state_dir: state_dir.into(),
            console_log: None,
        }
    }
}

/// An extra virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Image file.
    pub path: PathBuf,
    /// Attach read-only (the device refuses writes).
    pub read_only: bool,
    /// Serial the guest reads back (`/sys/block/vdX/serial`): 1 to [`MAX_SERIAL`] characters
    /// of `[A-Za-z0-9-_.]`, unique within the VM.
    pub serial: String,
}

/// Longest drive serial (virtio-blk GET_ID answers 20 bytes).
pub const MAX_SERIAL: usize = 20;

/// Most extra drives (host-vmm's `--drive` limit).
pub const MAX_DRIVES: usize = 8;

/// Errors of launching and driving a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// The state directory could not be created or cleaned.
    #[error("cannot prepare the VM state directory {path}")]
    StateDir {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A kernel or image file is missing.
    #[error("{what} {path} is not a readable file")]
    MissingFile {
        /// "kernel" or "root image".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Too many drives, or a serial that cannot be passed on.
    #[error("drive {path}: {problem}")]
    BadDrive {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A socket path would not fit `sockaddr_un`.
    #[error(
        "socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a shorter state directory"
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// An executable the backend needs was not found.
    #[error("{tool} not found ({hint})")]
    ToolNotFound {
        /// The program.
        tool: &'static str,
        /// Where it was looked for / how to install it.
        hint: String,
    },
    /// A process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `vhost-device-vsock` did not create its socket in time or exited.
    #[error("vhost-device-vsock did not create {socket} within {waited:?}; its log: {log}")]
    DeviceNotReady {
        /// The vhost-user socket.
        socket: PathBuf,
        /// Time waited.
        waited: Duration,
        /// The end of its log.
        log: String,
    },
    /// The VMM exited while the agent was awaited.
    #[error("the VMM exited ({status}) before the agent answered; VMM log: {vmm_log}; console: {console}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The end of the VMM's own log.
        vmm_log: String,
        /// The end of the guest console.
        console: String,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer on vsock port {AGENT_VSOCK_PORT} within {waited:?}; console: {console}")]
    AgentTimeout {
        /// Time waited.
        waited: Duration,
        /// The end of the guest console.
        console: String,
        /// The last connection attempt's error.
        #[source]
        last: Box<TransportError>,
    },
    /// QEMU: guest-init did not log that it listens on vsock in time.
    #[error("guest-init did not report \"{AGENT_LISTENING_MARKER}\" on the console within {waited:?}; console: {console}")]
    AgentNotListening {
        /// Time waited.
        waited: Duration,
        /// The end of the guest console.
        console: String,
    },
    /// Connecting or attaching over hybrid vsock failed.
    #[error("vsock connection to the guest failed")]
    Transport(#[source] Box<TransportError>),
    /// The protocol handshake with the agent failed.
    #[error("handshake with the agent failed")]
    Client(#[source] Box<ClientError>),
    /// Waiting for or killing a process failed.
    #[error("waiting for the VMM failed")]
    Wait(#[source] io::Error),
}

/// When things happened, measured from the start of [`Vm::launch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmTimings {
    /// Until every process of the VM was spawned (for QEMU: the vsock device's socket exists and
    /// QEMU was spawned).
    pub spawned: Duration,
    /// Until the first [`Vm::connect_agent`] completed its handshake.
    pub agent_ready: Option<Duration>,
}

/// A running VM. See the module documentation.
#[derive(Debug)]
pub struct Vm {
    backend: Backend,
    procs: Arc<Processes>,
    uds: PathBuf,
    vhost_user_socket: Option<PathBuf>,
    console_log: PathBuf,
    vmm_log: PathBuf,
    launched: Instant,
    spawned: Duration,
    agent_ready: OnceLock<Duration>,
    /// QEMU only: [`AGENT_LISTENING_MARKER`] must be on the console before the first connect.
    wait_for_marker: bool,
    marker_seen: OnceLock<()>,
}

impl Vm {
    /// Starts the VM's processes. Returns once they are spawned; the guest boots meanwhile.
    pub fn launch(cfg: &VmConfig) -> Result<Vm, VmError> {
        let launched = Instant::now();
        for (what, path) in [("kernel", &cfg.kernel), ("root image", &cfg.rootfs)] {
            if !path.is_file() {
                return Err(VmError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        check_drives(&cfg.drives)?;
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| VmError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let uds = dir.join("vsock.sock");
        let vhu = dir.join("vhost-user.sock");
        for socket in [&uds, &vhu] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::SocketPathTooLong {
                    path: socket.clone(),
                });
            }
        }
        remove_sockets(&uds, Some(&vhu))?;
        let console_log = cfg
            .console_log
            .clone()
            .unwrap_or_else(|| dir.join("console.log"));
        let vmm_log = dir.join("vmm.log");

        let (vmm, vsock_device, vhost_user_socket) = match &cfg.backend {
            Backend::HostVmm { binary } => {
                let mut cmd = Command::new(binary);
                cmd.args(command::host_vmm_args(cfg, &uds))
                    .stdin(Stdio::null())
                    .stdout(Stdio::from(create_log(&console_log)?))
                    .stderr(Stdio::from(create_log(&vmm_log)?));
                (spawn(cmd, binary)?, None, None)
            }
            Backend::QemuMicrovm { accel } => {
                let device = start_vsock_device(dir, &vhu, &uds)?;
                let qemu = find_tool(
                    QEMU_ENV,
                    "qemu-system-x86_64",
                    "apt-get install qemu-system-x86",
                )?;
                // QEMU truncates its -serial file; create it so it exists from the start.
                create_log(&console_log)?;
                let mut cmd = Command::new(&qemu);
                cmd.args(command::qemu_args(cfg, *accel, &vhu, &console_log))
                    .stdin(Stdio::null())
                    .stdout(Stdio::from(create_log(&vmm_log)?))
                    .stderr(Stdio::from(create_log(&vmm_log)?));
                let qemu_child = match spawn(cmd, &qemu) {
                    Ok(c) => c,
                    Err(e) => {
                        let mut device = device;
                        stop(&mut device);
                        let _ = remove_sockets(&uds, Some(&vhu));
                        return Err(e);
                    }
                };
                (qemu_child, Some(device), Some(vhu))
            }
        };
        let vm = Vm {
            backend: cfg.backend.clone(),
            procs: Processes::start(vmm, vsock_device),
            uds,
            vhost_user_socket,
            console_log,
            vmm_log,
            launched,
            spawned: launched.elapsed(),
            agent_ready: OnceLock::new(),
            wait_for_marker: matches!(cfg.backend, Backend::QemuMicrovm { .. }),
            marker_seen: OnceLock::new(),
        };
        log::debug!(
            "VM launched with {} in {:?} (state {})",
            vm.backend,
            vm.spawned,
            dir.display()
        );
        Ok(vm)
    }

    /// The backend running this VM.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The hybrid vsock unix socket (`CONNECT <port>\n`).
    pub fn vsock_uds(&self) -> &Path {
        &self.uds
    }

    /// The guest console log.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// The VMM's own stdout/stderr log (host-vmm: stderr only).
    pub fn vmm_log(&self) -> &Path {
        &self.vmm_log
    }

    /// PID of the VMM process.
    pub fn vmm_pid(&self) -> u32 {
        lock(&self.procs.vmm).id()
    }

    /// Spawn and agent-ready times.
    pub fn timings(&self) -> VmTimings {
        VmTimings {
            spawned: self.spawned,
            agent_ready: self.agent_ready.get().copied(),
        }
    }

    /// Time since [`Vm::launch`] started (for start-to-X measurements by callers).
    pub fn since_launch(&self) -> Duration {
        self.launched.elapsed()
    }

    /// The last `lines` lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console_log, lines)
    }

    /// Waits until the agent answers (the guest is booting meanwhile), then performs the
    /// protocol handshake. Fails early when the VMM exits. The first success sets
    /// [`VmTimings::agent_ready`].
    pub fn connect_agent(&self, timeout: Duration) -> Result<AgentClient, VmError> {
        let stream = self.connect_port(AGENT_VSOCK_PORT, timeout)?;
        let client =
            AgentClient::connect(stream, "kiln").map_err(|e| VmError::Client(Box::new(e)))?;
        let _ = self.agent_ready.set(self.launched.elapsed());
        Ok(client)
    }

    /// A raw connection to guest vsock `port`, retried while the guest does not listen yet, the
    /// VMM is alive and `timeout` has not passed.
    pub fn connect_port(&self, port: u32, timeout: Duration) -> Result<UnixStream, VmError> {
        let started = Instant::now();
        self.wait_for_listener(started, timeout)?;
        let mut pause = Duration::from_millis(5);
        loop {
            self.check_running()?;
            match transport::hybrid_vsock_connect(&self.uds, port) {
                Ok(stream) => return Ok(stream),
                // A handshake timeout means the device got no answer from a guest that is not
                // up yet (or is busy): also worth retrying.
                Err(e) if e.is_retryable() || matches!(e, TransportError::Timeout { .. }) => {
                    if started.elapsed() >= timeout {
                        return Err(VmError::AgentTimeout {
                            waited: started.elapsed(),
                            console: self.console_tail(30),
                            last: Box::new(e),
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(VmError::Transport(Box::new(e))),
            }
        }
    }

    /// QEMU: waits until the console shows [`AGENT_LISTENING_MARKER`] (once per VM).
    fn wait_for_listener(&self, started: Instant, timeout: Duration) -> Result<(), VmError> {
        if !self.wait_for_marker || self.marker_seen.get().is_some() {
            return Ok(());
        }
        loop {
            self.check_running()?;
            let console = std::fs::read(&self.console_log).unwrap_or_default();
            let needle = AGENT_LISTENING_MARKER.as_bytes();
            if console.windows(needle.len()).any(|w| w == needle) {
                let _ = self.marker_seen.set(());
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(VmError::AgentNotListening {
                    waited: started.elapsed(),
                    console: self.console_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Err(Exited)` once the VMM has exited.
    fn check_running(&self) -> Result<(), VmError> {
        match self.try_wait()? {
            Some(status) => Err(VmError::Exited {
                status,
                vmm_log: tail(&self.vmm_log, 20),
                console: self.console_tail(30),
            }),
            None => Ok(()),
        }
    }

    /// Opens stdio stream `stream` of process `exec_id` in `container_id` (raw bytes after it).
    pub fn attach(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: StdioStream,
    ) -> Result<UnixStream, VmError> {
        transport::hybrid_vsock_attach(&self.uds, AGENT_VSOCK_PORT, container_id, exec_id, stream)
            .map_err(|e| VmError::Transport(Box::new(e)))
    }

    /// The VMM's exit status if it has exited (then the vsock device is stopped too).
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, VmError> {
        self.procs.try_wait()
    }

    /// Waits for the VMM to exit (e.g. after the agent's `Shutdown`).
    pub fn wait(&self) -> Result<ExitStatus, VmError> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `timeout` for the VMM to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the VMM (SIGKILL) and the vsock device, reaps them and removes the sockets.
    pub fn kill(&self) -> Result<ExitStatus, VmError> {
        let status = self.procs.kill()?;
        self.remove_sockets();
        Ok(status)
    }

    fn remove_sockets(&self) {
        if let Err(e) = remove_sockets(&self.uds, self.vhost_user_socket.as_deref()) {
            log::warn!("{e}");
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            log::warn!("stopping the VM: {e}");
        }
    }
}

/// The VM's processes, shared with the monitor thread.
#[derive(Debug)]
struct Processes {
    vmm: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    vsock_device: Mutex<Option<Child>>,
}

impl Processes {
    /// With a vsock device, also starts a thread that stops the device as soon as the VMM
    /// exits: a `vhost-device-vsock` outliving QEMU would keep the host's connections open, so
    /// agent calls would hang instead of failing with "disconnected".
    fn start(vmm: Child, vsock_device: Option<Child>) -> Arc<Processes> {
        let monitor = vsock_device.is_some();
        let procs = Arc::new(Processes {
            vmm: Mutex::new(vmm),
            status: Mutex::new(None),
            vsock_device: Mutex::new(vsock_device),
        });
        if monitor {
            let weak = Arc::downgrade(&procs);
            let spawned = std::thread::Builder::new()
                .name("kiln-vm-monitor".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(50));
                    // Gone (the Vm was dropped), exited, or unreadable: nothing left to watch.
                    match weak.upgrade().map(|p| p.try_wait()) {
                        Some(Ok(None)) => {}
                        _ => break,
                    }
                });
            if let Err(e) = spawned {
                log::warn!("no VM monitor thread ({e}): the vsock device stops on wait or drop");
            }
        }
        procs
    }

    fn try_wait(&self) -> Result<Option<ExitStatus>, VmError> {
        let mut status = lock(&self.status);
        if status.is_none() {
            *status = lock(&self.vmm).try_wait().map_err(VmError::Wait)?;
            if status.is_some() {
                self.stop_vsock_device();
            }
        }
        Ok(*status)
    }

    fn kill(&self) -> Result<ExitStatus, VmError> {
        let status = {
            let mut status = lock(&self.status);
            match *status {
                Some(s) => s,
                None => {
                    let mut vmm = lock(&self.vmm);
                    // Kill fails only when the child was already reaped, which `status` rules
                    // out.
                    let _ = vmm.kill();
                    let s = vmm.wait().map_err(VmError::Wait)?;
                    *status = Some(s);
                    s
                }
            }
        };
        self.stop_vsock_device();
        Ok(status)
    }

    fn stop_vsock_device(&self) {
        if let Some(mut device) = lock(&self.vsock_device).take() {
            stop(&mut device);
        }
    }
}

/// Checks the drives' count, files and serials before anything is started.
fn check_drives(drives: &[Drive]) -> Result<(), VmError> {
    let bad = |d: &Drive, problem: String| VmError::BadDrive {
        path: d.path.clone(),
        problem,
    };
    for (i, d) in drives.iter().enumerate() {
        if i >= MAX_DRIVES {
            return Err(bad(d, format!("more than {MAX_DRIVES} extra disks")));
        }
        if !d.path.is_file() {
            return Err(VmError::MissingFile {
                what: "drive image",
                path: d.path.clone(),
            });
        }
        let valid = (1..=MAX_SERIAL).contains(&d.serial.len())
            && d.serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(bad(
                d,
                format!("serial {:?} is not 1-20 of [A-Za-z0-9-_.]", d.serial),
            ));
        }
        if drives[..i].iter().any(|o| o.serial == d.serial) {
            return Err(bad(d, format!("serial {:?} is used twice", d.serial)));
        }
    }
    Ok(())
}

/// Starts `vhost-device-vsock` and waits for its vhost-user socket.
fn start_vsock_device(dir: &Path, vhu: &Path, uds: &Path) -> Result<Child, VmError> {
    let program = find_tool(
        VHOST_DEVICE_VSOCK_ENV,
        "vhost-device-vsock",
        "cargo install vhost-device-vsock (scripts/setup.sh)",
    )?;
    let log_path = dir.join("vsock-device.log");
    let mut cmd = Command::new(&program);
    cmd.args(command::vhost_device_vsock_args(vhu, uds))
        .stdin(Stdio::null())
        .stdout(Stdio::from(create_log(&log_path)?))
        .stderr(Stdio::from(create_log(&log_path)?));
    let mut child = spawn(cmd, &program)?;
    let started = Instant::now();
    loop {
        if vhu.exists() {
            return Ok(child);
        }
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if exited || started.elapsed() > DEVICE_START_TIMEOUT {
            stop(&mut child);
            let _ = remove_sockets(uds, Some(vhu));
            return Err(VmError::DeviceNotReady {
                socket: vhu.to_path_buf(),
                waited: started.elapsed(),
                log: tail(&log_path, 10),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `$env`, else `name` on `PATH`, else `~/.cargo/bin/<name>`.
fn find_tool(env: &str, name: &'static str, install: &str) -> Result<PathBuf, VmError> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = backend::find_in_path(name) {
        return Ok(path);
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join(name));
    match cargo_bin {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(VmError::ToolNotFound {
            tool: name,
            hint: format!("set ${env}, put it on PATH, or: {install}"),
        }),
    }
}

fn spawn(mut cmd: Command, program: &Path) -> Result<Child, VmError> {
    cmd.spawn().map_err(|source| VmError::Spawn {
        program: program.to_path_buf(),
        source,
    })
}

/// Kills and reaps a helper process.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Opens `path` for appending (created if missing): each process gets its own handle.
fn create_log(path: &Path) -> Result<File, VmError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| VmError::StateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes the VM's sockets and the `<uds>_<port>` sockets of guest-initiated connections.
fn remove_sockets(uds: &Path, vhu: Option<&Path>) -> Result<(), VmError> {
    let mut paths: Vec<PathBuf> = vec![uds.to_path_buf()];
    paths.extend(vhu.map(Path::to_path_buf));
    if let (Some(dir), Some(name)) = (uds.parent(), uds.file_name()) {
        let prefix = format!("{}_", name.to_string_lossy());
        if let Ok(entries) = std::fs::read_dir(dir) {
            paths.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path()),
            );
        }
    }
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(VmError::StateDir { path, source }),
        }
    }
    Ok(())
}

/// The last `lines` lines of a log file ("" when unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent across a panic (single assignments).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
