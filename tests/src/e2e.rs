//! End-to-end harness: a real Linux guest with guest-init as PID 1, driven over vsock.
//!
//! [`Guest::boot`] builds (once per process) the static musl guest-init and an agent-layout
//! image of Debian's busybox-static with rootfs-builder (`/kiln/guest-init`, container files
//! under `/rootfs`), boots kiln's kernel with `kiln_runtime::vm` on the given backend (QEMU TCG
//! with `vhost-device-vsock` here, host-vmm where KVM runs Linux userspace), and connects an
//! [`AgentClient`]. The helpers below build container specs and run processes the way the
//! runtime does: exec, attach stdio streams, wait.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_protocol::codec::{read_frame, write_frame};
use kiln_protocol::{
    AgentClient, AgentMessage, ContainerSpec, ErrorKind, ExitStatus, Hello, HostMessage, MountSpec,
    Namespace, NamespaceKind, ProcessSpec, Request, Response, RootSpec, StdioStream,
    PROTOCOL_VERSION,
};
use kiln_runtime::vm::{Backend, Vm, VmConfig};

use crate::guests::{target_dir, TempDir};
use crate::{images, kernel};

/// How long a booting guest may take until the agent answers (TCG on a busy 2-core host).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Guest memory of the end-to-end VMs.
pub const MEM_MIB: u32 = 256;

/// vCPUs of the end-to-end VMs.
pub const VCPUS: u32 = 2;

/// The static musl guest-init (release build), built once per process into this test's target
/// directory; `KILN_GUEST_INIT` names a prebuilt one instead.
pub fn guest_init_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| build_guest_init().map_err(|e| format!("{e:#}")));
    built.clone().map_err(anyhow::Error::msg)
}

fn build_guest_init() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_GUEST_INIT") {
        return Ok(PathBuf::from(path));
    }
    let target = target_dir()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("kiln-tests: building the static guest-init (release, musl)");
    let out = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "-p", "kiln-guest-init"])
        .args(["--target", "x86_64-unknown-linux-musl", "--target-dir"])
        .arg(&target)
        .output()
        .context("running cargo build for guest-init")?;
    if !out.status.success() {
        bail!(
            "building guest-init failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target.join("x86_64-unknown-linux-musl/release/guest-init"))
}

/// A busybox-static container tree at `root`: `/bin/busybox`, one symlink per applet, empty
/// `/proc /dev /sys /tmp /etc /root`.
pub fn busybox_tree(root: &Path) -> Result<()> {
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("creating {}", root.join(dir).display()))?;
    }
    std::fs::copy(images::BUSYBOX, root.join("bin/busybox"))
        .with_context(|| format!("copying {} (install busybox-static)", images::BUSYBOX))?;
    let list = Command::new(images::BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", images::BUSYBOX))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .with_context(|| format!("linking /bin/{applet}"))?;
    }
    Ok(())
}

/// `<dir>/agent.ext4`: rootfs-builder's agent layout of a busybox tree, with guest-init.
pub fn busybox_agent_image(dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("busybox");
    busybox_tree(&tree)?;
    let image = dir.join("agent.ext4");
    let mut opts = rootfs_builder::BuildOptions::new(&tree, Some(image.clone()));
    opts.layout = rootfs_builder::Layout::Agent {
        guest_init: guest_init_bin()?,
    };
    opts.cache = None;
    opts.size = Some(64 << 20);
    rootfs_builder::build_image(&opts).context("rootfs-builder")?;
    std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    Ok(image)
}

/// The guest kernel: `$KILN_VMLINUX` if set (e.g. a cached build while a new one is being
/// built), else [`kernel::vmlinux`].
pub fn vmlinux() -> PathBuf {
    match std::env::var_os("KILN_VMLINUX") {
        Some(path) => PathBuf::from(path),
        None => kernel::vmlinux(),
    }
}

/// A booted guest with a connected control client.
pub struct Guest {
    /// The VM (dropped last: kills the VMM and removes its sockets).
    pub vm: Vm,
    /// Control connection to the agent.
    pub client: Arc<AgentClient>,
    /// Scratch directory: image, sockets, console log.
    pub dir: TempDir,
    /// Kills the VMM after [`GUEST_LIFETIME`]: calls and stdio reads on the agent then end.
    _watchdog: crate::bounded::Watchdog,
}

/// How long one booted guest (one test) may run at all: generous, a PVM host needs seconds per
/// fork and exec.
pub const GUEST_LIFETIME: Duration = Duration::from_secs(1200);

impl Guest {
    /// Builds the image, boots it on `backend` and connects to the agent.
    pub fn boot(backend: Backend, tag: &str) -> Result<Guest> {
        let dir = TempDir::new(tag);
        let image = busybox_agent_image(dir.path())?;
        let mut cfg = VmConfig::new(vmlinux(), image, backend, dir.path().join("vm"));
        cfg.mem_mib = MEM_MIB;
        cfg.vcpus = VCPUS;
        let vm = Vm::launch(&cfg).context("launching the VM")?;
        let client = match vm.connect_agent(BOOT_TIMEOUT) {
            Ok(client) => client,
            Err(e) => {
                // Keep the logs (console, VMM, vsock device) for the post-mortem.
                let kept = dir.path().to_path_buf();
                std::mem::forget(dir);
                drop(vm);
                return Err(e).with_context(|| {
                    format!("waiting for the agent (logs kept in {})", kept.display())
                });
            }
        };
        Ok(Guest {
            _watchdog: crate::bounded::Watchdog::kill_pid_after(
                vm.vmm_pid(),
                GUEST_LIFETIME,
                "the guest's VMM",
            ),
            vm,
            client: Arc::new(client),
            dir,
        })
    }

    /// A raw connection to the agent's port (no handshake).
    pub fn connect_raw(&self) -> UnixStream {
        self.vm
            .connect_port(kiln_protocol::AGENT_VSOCK_PORT, Duration::from_secs(10))
            .expect("connecting to the agent port")
    }

    /// A further control connection.
    pub fn new_client(&self) -> Arc<AgentClient> {
        Arc::new(AgentClient::connect(self.connect_raw(), "kiln-e2e").expect("agent handshake"))
    }

    /// Opens a stdio stream.
    pub fn attach(&self, container: &str, exec: &str, stream: StdioStream) -> UnixStream {
        self.vm
            .attach(container, exec, stream)
            .unwrap_or_else(|e| panic!("attach {stream:?} of {container}/{exec}: {e:#}"))
    }

    /// Execs `p` in `container`, closes its stdin, reads stdout and stderr to their ends and
    /// waits: (status, stdout, stderr).
    pub fn run(&self, container: &str, exec: &str, p: ProcessSpec) -> (ExitStatus, String, String) {
        let c = &self.client;
        c.exec(container, exec, p)
            .unwrap_or_else(|e| panic!("exec {container}/{exec}: {e:#}"));
        c.close_stdin(container, exec).expect("close stdin");
        let out = self.attach(container, exec, StdioStream::Stdout);
        let err = self.attach(container, exec, StdioStream::Stderr);
        let err_reader = std::thread::spawn(move || read_all(err));
        let out = read_all(out);
        let err = crate::bounded::join(err_reader, crate::bounded::VM_WAIT, "stderr reader");
        let status = c.wait(container, exec).expect("wait");
        (
            status,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    /// Creates and starts container `id` from `spec`.
    pub fn start_container(&self, id: &str, spec: ContainerSpec) {
        self.client
            .create_container(id, spec)
            .unwrap_or_else(|e| panic!("create {id}: {e:#}"));
        self.client
            .start(id)
            .unwrap_or_else(|e| panic!("start {id}: {e:#}"));
    }

    /// Creates and starts a container whose main process sleeps (execs go into it).
    pub fn sleeper(&self, id: &str, pid_ns: bool) {
        self.start_container(id, container_spec(process(&["sleep", "1000000"]), pid_ns));
    }
}

/// Reads one frame from a raw agent connection and checks that it is an `Error` of `kind`
/// (bounded: 120 s, for slow PVM guests too).
pub fn expect_error(s: &mut UnixStream, kind: ErrorKind, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    match read_frame::<_, AgentMessage>(s) {
        Ok(AgentMessage::Error(e)) => assert_eq!(e.kind, kind, "{what}: {e}"),
        other => panic!("{what}: expected a {kind:?} error, got {other:?}"),
    }
}

/// On a fresh raw connection `s`: Hello, then a malformed frame, which must get a
/// `MalformedFrame` error reply, then `Health` on the same connection, which must still answer:
/// bad input from the host side neither kills the connection nor the agent.
pub fn malformed_frame_keeps_the_connection(s: &mut UnixStream) {
    let hello = HostMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        client: "raw".into(),
    });
    write_frame(&mut *s, &hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    assert!(matches!(
        read_frame::<_, AgentMessage>(&mut *s),
        Ok(AgentMessage::HelloOk(_))
    ));
    s.write_all(&[4, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    expect_error(s, ErrorKind::MalformedFrame, "malformed frame after Hello");
    let health = HostMessage::Request {
        id: 5,
        request: Request::Health,
    };
    write_frame(&mut *s, &health).unwrap();
    match read_frame::<_, AgentMessage>(&mut *s) {
        Ok(AgentMessage::Response {
            id: 5,
            response: Response::Ok,
        }) => {}
        other => panic!("Health after a malformed frame: {other:?}"),
    }
}

/// Reads a stream to its end.
pub fn read_all(s: UnixStream) -> Vec<u8> {
    crate::bounded::read_to_end(&s, crate::bounded::VM_WAIT, "a stdio stream")
}

/// A process running `args` with `PATH` and `KILN_E2E` set, in `/`.
pub fn process(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into(), "KILN_E2E=env from the spec".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// `sh -c script`.
pub fn sh(script: &str) -> ProcessSpec {
    process(&["sh", "-c", script])
}

fn mount(destination: &str, fstype: &str, options: &[&str]) -> MountSpec {
    MountSpec {
        destination: destination.into(),
        fstype: Some(fstype.into()),
        source: Some(fstype.into()),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// A container on the image's `/rootfs` with hostname `kiln-e2e`, the usual mounts, mount/ipc/uts
/// namespaces and, with `pid_ns`, a pid namespace (without one its orphans go to guest-init).
pub fn container_spec(main: ProcessSpec, pid_ns: bool) -> ContainerSpec {
    let mut kinds = vec![NamespaceKind::Mount, NamespaceKind::Ipc, NamespaceKind::Uts];
    if pid_ns {
        kinds.push(NamespaceKind::Pid);
    }
    let mut spec = ContainerSpec {
        process: main,
        root: RootSpec {
            path: rootfs_builder::CONTAINER_ROOT.into(),
            ..Default::default()
        },
        hostname: Some("kiln-e2e".into()),
        mounts: vec![
            mount("/proc", "proc", &["nosuid", "nodev", "noexec"]),
            mount("/dev", "tmpfs", &["nosuid", "mode=755"]),
            mount("/tmp", "tmpfs", &["nosuid", "nodev"]),
            mount("/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]),
        ],
        ..Default::default()
    };
    spec.linux.namespaces = kinds
        .into_iter()
        .map(|kind| Namespace { kind, path: None })
        .collect();
    spec
}
