//! Booting images made by rootfs-builder with the real guest-init, for `tests/rootfs_boot.rs`.
//!
//! Owns the inputs those tests share with `tests/rootfs_images.rs` (the busybox-static image
//! made by `podman import` and saved in every `podman save` format; a Debian minbase made by
//! `debootstrap` and cached under `target/`), building agent-layout images from them, and one
//! boot of such an image: launch a VM on the detected backend, run the container's main process
//! through guest-init over vsock, shut down, and time each step. Nothing here checks what a
//! command printed: the tests do.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_protocol::{ContainerSpec, ExitStatus, ProcessSpec, StdioStream, INIT_EXEC_ID};
use kiln_runtime::vm::backend::find_host_vmm;
use kiln_runtime::vm::{Backend, Detection, HostProbe, Vm, VmConfig};
use rootfs_builder::{build_image, BuildOptions, Format, Layout};

use crate::e2e::{container_spec, guest_init_bin, vmlinux, BOOT_TIMEOUT};
use crate::guests::TempDir;
use crate::workspace_root;

/// Where Debian's busybox-static installs its statically linked binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets linked in the podman busybox image's `/bin`.
pub const APPLETS: &[&str] = &["sh", "ls", "cat", "echo", "true"];

/// Debian suite and mirror of the minbase image.
pub const DEBIAN_SUITE: &str = "bookworm";
/// The mirror `debootstrap` downloads from (the one in this machine's apt sources).
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// `PATH` of a Debian container.
pub const DEBIAN_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the VMM may take to exit after the agent acknowledged `Shutdown`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one boot may run at all (a PVM host needs minutes).
const VM_LIFETIME: Duration = Duration::from_secs(1200);

/// Runs `cmd`, panics with its stderr unless it succeeds, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh directory `target/rootfs-tests/<name>` (emptied first).
pub fn scratch(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/rootfs-tests").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A busybox-static root file system directory: `/bin/busybox` with [`APPLETS`] linked to it,
/// `/etc/passwd` and `/etc/group` (root and nobody). Nothing else: no `/proc`, `/dev` mount
/// points, as in real minimal images.
pub fn busybox_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::copy(BUSYBOX, dir.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("copying {BUSYBOX} (install busybox-static): {e}"));
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// The busybox image `localhost/kiln-busybox:test` saved by podman in every format.
pub struct PodmanImages {
    /// `podman save --format oci-archive`.
    pub oci_archive: PathBuf,
    /// `podman save --format docker-archive`.
    pub docker_archive: PathBuf,
    /// `podman save --format oci-dir`.
    pub oci_dir: PathBuf,
}

/// Imports [`busybox_rootfs`] with `podman import` (CMD `sh -c "echo hi"`, WORKDIR `/etc`, USER
/// nobody) into a private podman store and saves it in every format, once per test process,
/// under `target/rootfs-tests/podman`.
pub fn podman_images() -> &'static PodmanImages {
    static IMAGES: OnceLock<PodmanImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = scratch("podman");
        let rootfs = dir.join("rootfs");
        busybox_rootfs(&rootfs);
        let tarball = dir.join("busybox.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg("."));
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        let podman = |args: &[&str]| {
            let mut c = Command::new("podman");
            c.env("CONTAINERS_CONF", &conf)
                .arg("--root")
                .arg(dir.join("storage"))
                .arg("--runroot")
                .arg(dir.join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args);
            run(&mut c)
        };
        podman(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\", \"-c\", \"echo hi\"]",
            "--change",
            "WORKDIR /etc",
            "--change",
            "USER nobody",
            tarball.to_str().unwrap(),
            "localhost/kiln-busybox:test",
        ]);
        let out = |n: &str| dir.join(n);
        let images = PodmanImages {
            oci_archive: out("busybox-oci.tar"),
            docker_archive: out("busybox-docker.tar"),
            oci_dir: out("busybox-oci-dir"),
        };
        for (format, path) in [
            ("oci-archive", &images.oci_archive),
            ("docker-archive", &images.docker_archive),
            ("oci-dir", &images.oci_dir),
        ] {
            podman(&[
                "save",
                "--format",
                format,
                "-o",
                path.to_str().unwrap(),
                "localhost/kiln-busybox:test",
            ]);
        }
        images
    })
}

/// A Debian minbase tree made by `debootstrap --variant=minbase` from [`DEBIAN_MIRROR`], cached
/// in `target/rootfs-tests/debian-minbase` (206 MiB; about a minute the first time). A build
/// goes to a per-process `.partial` directory renamed into place, so concurrent first runs
/// never see half a tree.
pub fn debian_minbase() -> Result<PathBuf> {
    let base = workspace_root().join("target/rootfs-tests");
    let rootfs = base.join("debian-minbase");
    if rootfs.join("usr/bin/apt").exists() {
        return Ok(rootfs);
    }
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let partial = base.join(format!("debian-minbase.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    eprintln!(
        "rootfs-boot: debootstrap --variant=minbase {DEBIAN_SUITE} from {DEBIAN_MIRROR} \
         (first run only, about a minute)"
    );
    // Bounded: a stalled mirror must not hang the test run.
    let out = crate::bounded::output(
        Command::new("debootstrap")
            .args(["--variant=minbase", DEBIAN_SUITE])
            .arg(&partial)
            .arg(DEBIAN_MIRROR),
        Duration::from_secs(900),
        "debootstrap (install Debian's debootstrap package)",
    );
    if !out.status.success() {
        let log =
            fs::read_to_string(partial.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let _ = fs::remove_dir_all(&partial);
        bail!(
            "debootstrap --variant=minbase {DEBIAN_SUITE} from {DEBIAN_MIRROR} failed ({}): is \
             {DEBIAN_MIRROR} reachable from this machine?\n--- stderr ---\n{}\n--- \
             debootstrap.log (last lines) ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    if let Err(e) = fs::rename(&partial, &rootfs) {
        // Another process finished first: use its tree.
        let _ = fs::remove_dir_all(&partial);
        if !rootfs.join("usr/bin/apt").exists() {
            return Err(e).with_context(|| format!("renaming into {}", rootfs.display()));
        }
    }
    Ok(rootfs)
}

/// [`Backend::detect`] with host-vmm made findable: when this host's KVM runs Linux userspace
/// and no `host-vmm` executable is found, the workspace's is built ([`crate::guests::host_vmm`]).
/// QEMU TCG on PVM hosts such as the development machines.
pub fn detect_backend() -> Detection {
    static DETECTED: OnceLock<Detection> = OnceLock::new();
    DETECTED
        .get_or_init(|| {
            let probe = HostProbe::system();
            let host_vmm = match probe.linux_userspace_blocker() {
                Some(_) => None,
                None => find_host_vmm().or_else(|| Some(crate::guests::host_vmm())),
            };
            Backend::detect_with(&probe, host_vmm)
        })
        .clone()
}

/// An agent-layout image built from `input` with the real guest-init.
pub struct BuiltImage {
    /// The image file (inside the caller's directory).
    pub path: PathBuf,
    /// ext4 or EROFS.
    pub format: Format,
    /// Wall time of `build_image`.
    pub build_time: Duration,
    /// Apparent size in bytes.
    pub size: u64,
}

/// Builds `<dir>/<name>.<ext>` from `input` (any input kind rootfs-builder detects), agent layout
/// with [`guest_init_bin`], no cache.
pub fn build_agent_image(
    input: &Path,
    dir: &Path,
    name: &str,
    format: Format,
) -> Result<BuiltImage> {
    let path = dir.join(format!("{name}.{}", format.extension()));
    let mut opts = BuildOptions::new(input, Some(path.clone()));
    opts.layout = Layout::Agent {
        guest_init: guest_init_bin()?,
    };
    opts.format = format;
    opts.cache = None;
    let started = Instant::now();
    let built = build_image(&opts)
        .with_context(|| format!("rootfs-builder {} -> {}", input.display(), path.display()))?;
    Ok(BuiltImage {
        path,
        format,
        build_time: started.elapsed(),
        size: built.size,
    })
}

/// The container spec for one boot: `process` as the main process in `/rootfs`, with
/// [`container_spec`]'s mounts (`/proc`, `/dev`, `/tmp`, `/sys`) when `mounts`, else none.
///
/// guest-init creates missing mount points inside the container root; on a read-only EROFS
/// root it cannot, so images without those directories (the busybox ones) boot from EROFS with
/// no mounts. An EROFS root needs a writable layer for containers that write; kiln has none yet.
pub fn boot_spec(process: ProcessSpec, mounts: bool) -> ContainerSpec {
    let mut spec = container_spec(process, true);
    if !mounts {
        spec.mounts.clear();
    }
    spec
}

/// A process running `args` with `env`, in `/`.
pub fn process_with_env(args: &[&str], env: &str) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![env.to_string()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// What one boot did and how long each step took (all measured from [`Vm::launch`]).
#[derive(Debug)]
pub struct BootRun {
    /// The backend that ran the VM.
    pub backend: String,
    /// Exit status of the container's main process.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// Launch to the agent's handshake.
    pub agent_ready: Duration,
    /// Launch to the main process's exit status.
    pub command_done: Duration,
    /// Launch to the VMM's exit after `Shutdown` (boot-to-exit).
    pub vm_exit: Duration,
}

impl BootRun {
    /// One line for the test log and docs/rootfs.md.
    pub fn summary(&self, what: &str) -> String {
        format!(
            "rootfs-boot [{}] {what}: agent ready {:.2?}, command exited {:.2?}, VM exited \
             (boot-to-exit) {:.2?}",
            self.backend, self.agent_ready, self.command_done, self.vm_exit
        )
    }
}

/// Boots `image` on `backend`, creates container `ctr` from `spec` (the main process's stdin
/// closed, stdout and stderr attached before it starts, as the runtime does), reads both to
/// their ends, waits for the exit status, asks the agent to shut down and waits for the VMM to
/// exit. One boot at a time per process, so the timings of parallel tests do not mix. On a
/// failure the VM's logs are kept and named in the error.
pub fn boot_and_run(image: &BuiltImage, spec: ContainerSpec, backend: &Backend) -> Result<BootRun> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let state = TempDir::new("rootfs-boot");
    let mut cfg = VmConfig::new(
        vmlinux(),
        &image.path,
        backend.clone(),
        state.path().join("vm"),
    );
    if image.format == Format::Erofs {
        cfg.read_only = true;
        cfg.extra_cmdline = Some("rootfstype=erofs".into());
    }
    let vm = Vm::launch(&cfg).context("launching the VM")?;
    match drive(&vm, spec) {
        Ok(mut run) => {
            run.backend = backend.to_string();
            Ok(run)
        }
        Err(e) => {
            let tail = vm.console_tail(40);
            let kept = state.path().to_path_buf();
            std::mem::forget(state);
            drop(vm);
            Err(e.context(format!(
                "booting {} (VM logs kept in {}); console tail:\n{tail}",
                image.path.display(),
                kept.display()
            )))
        }
    }
}

fn drive(vm: &Vm, spec: ContainerSpec) -> Result<BootRun> {
    const CTR: &str = "rootfs-boot";
    // The VMM is killed after VM_LIFETIME: calls and stdio reads on the agent then end.
    let _watchdog = crate::bounded::Watchdog::kill_pid_after(vm.vmm_pid(), VM_LIFETIME, "the VMM");
    let client = vm
        .connect_agent(BOOT_TIMEOUT)
        .context("waiting for guest-init")?;
    let agent_ready = vm.since_launch();
    client
        .create_container(CTR, spec)
        .context("creating the container")?;
    client
        .close_stdin(CTR, INIT_EXEC_ID)
        .context("closing the main process's stdin")?;
    let out = vm
        .attach(CTR, INIT_EXEC_ID, StdioStream::Stdout)
        .context("attaching stdout")?;
    let err = vm
        .attach(CTR, INIT_EXEC_ID, StdioStream::Stderr)
        .context("attaching stderr")?;
    client.start(CTR).context("starting the container")?;
    let err_reader = std::thread::spawn(move || read_to_end(err));
    let stdout = read_to_end(out)?;
    let stderr = err_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))??;
    let status = client
        .wait(CTR, INIT_EXEC_ID)
        .context("waiting for the main process")?;
    let command_done = vm.since_launch();
    client.shutdown().context("Shutdown")?;
    let vm_exit = match vm
        .wait_timeout(EXIT_TIMEOUT)
        .context("waiting for the VMM")?
    {
        Some(_) => vm.since_launch(),
        None => bail!("the VMM did not exit within {EXIT_TIMEOUT:?} of Shutdown"),
    };
    Ok(BootRun {
        backend: String::new(),
        status,
        stdout,
        stderr,
        agent_ready,
        command_done,
        vm_exit,
    })
}

fn read_to_end(mut s: std::os::unix::net::UnixStream) -> Result<String> {
    let mut buf = Vec::new();
    s.set_read_timeout(Some(crate::bounded::VM_WAIT))
        .context("setting a read timeout")?;
    s.read_to_end(&mut buf).context("reading a stdio stream")?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
