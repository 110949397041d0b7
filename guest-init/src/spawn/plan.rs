//! Turns an untrusted [`ContainerSpec`] / [`ProcessSpec`] into plans the cloned child can carry
//! out without allocating ([`RootPlan`], [`ExecPlan`]).
//!
//! Every string becomes a `CString` here, every path is checked (absolute, no `..` escaping the
//! container root, symlinks resolved inside the root), every option is parsed. Nothing here touches
//! the system except `lstat`/`readlink`/`stat` to resolve paths and reading `/sys/block/*/serial`
//! to find a disk named by serial ([`disk`]).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kiln_protocol::{ContainerSpec, MountSpec, NamespaceKind, ProcessSpec};
use std::sync::Arc;

use super::caps::{self, CapsPlan};
use super::seccomp::SeccompProgram;
use libc::{c_int, c_ulong};

/// `MS_NOSYMFOLLOW` (Linux 5.10; not in every libc release).
const MS_NOSYMFOLLOW: c_ulong = 256;
use thiserror::Error;

pub mod disk;

/// Why a spec cannot be turned into a plan (an `InvalidArgument` for the host).
#[derive(Debug, Error)]
pub enum PlanError {
    /// A string holds a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which field.
        what: &'static str,
    },
    /// A field that must be set is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A path that must be absolute is not, or climbs out with `..`.
    #[error("{what} `{path}` must be an absolute path without `..`")]
    BadPath {
        /// Which field.
        what: &'static str,
        /// The offending path.
        path: String,
    },
    /// Symlinks inside the root loop or nest too deeply.
    #[error("too many symlinks resolving `{0}` inside the container root")]
    SymlinkLoop(String),
    /// An rlimit name we do not know.
    #[error("unknown rlimit `{0}`")]
    UnknownRlimit(String),
    /// A namespace setting guest-init cannot honour.
    #[error("{0}")]
    Namespace(String),
    /// A mount that cannot be expressed.
    #[error("mount {index} (`{destination}`): {problem}")]
    Mount {
        /// Position in `mounts`.
        index: usize,
        /// Its destination.
        destination: String,
        /// What is wrong.
        problem: String,
    },
    /// Any other invalid value.
    #[error("{0}")]
    Invalid(String),
}

fn cstring(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, PlanError> {
    CString::new(s).map_err(|_| PlanError::Nul { what })
}

fn cpath(what: &'static str, p: &Path) -> Result<CString, PlanError> {
    cstring(what, p.as_os_str().as_bytes())
}

/// A NULL-terminated array of C string pointers (`argv`, `envp`) with its owned strings.
pub struct CStringArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStringArray {
    fn new(strings: Vec<CString>) -> Self {
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray {
            _strings: strings,
            ptrs,
        }
    }

    /// Pointer for `execve`.
    pub fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }
}

/// The child's ends of stdio, already open.
#[derive(Debug, Clone, Copy)]
pub enum Stdio {
    /// Three pipes.
    Pipes {
        /// Read end of the stdin pipe.
        stdin: c_int,
        /// Write end of the stdout pipe.
        stdout: c_int,
        /// Write end of the stderr pipe.
        stderr: c_int,
    },
    /// A pty slave for all three.
    Pty {
        /// The slave descriptor.
        slave: c_int,
    },
}

impl Stdio {
    /// The descriptors a child must keep open until it has dup'ed them.
    pub fn fds(&self) -> Vec<c_int> {
        match *self {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => vec![stdin, stdout, stderr],
            Stdio::Pty { slave } => vec![slave],
        }
    }
}

/// Everything needed to turn the child into the container process.
pub struct ExecPlan {
    /// `argv`.
    pub argv: CStringArray,
    /// `envp`.
    pub envp: CStringArray,
    /// Paths tried in order with `execve` (PATH lookup done ahead).
    pub candidates: Vec<CString>,
    /// Working directory inside the container.
    pub cwd: CString,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
    /// File mode creation mask.
    pub umask: libc::mode_t,
    /// `(RLIMIT_*, limit)` pairs.
    pub rlimits: Vec<(c_int, libc::rlimit64)>,
    /// Set `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// `process.capabilities`; `None` keeps the agent's (root's) capabilities.
    pub caps: Option<CapsPlan>,
    /// The container's seccomp filter (set by the caller: it belongs to the container, not
    /// to the process spec), installed last before `execve`.
    pub seccomp: Option<Arc<SeccompProgram>>,
    /// Contents for `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<Vec<u8>>,
    /// Whether the process runs on a pty.
    pub terminal: bool,
    /// Filled in by the spawner once the descriptors exist.
    pub stdio: Stdio,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn rlimit_resource(name: &str) -> Option<c_int> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as c_int)
}

impl ExecPlan {
    /// Checks and converts a process spec. `stdio` must be set before use.
    pub fn new(spec: &ProcessSpec) -> Result<Self, PlanError> {
        let Some(arg0) = spec.args.first() else {
            return Err(PlanError::Empty("process.args"));
        };
        if arg0.is_empty() {
            return Err(PlanError::Empty("process.args[0]"));
        }
        let args = spec
            .args
            .iter()
            .map(|a| cstring("process.args", a.as_str()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut path_var = None;
        let mut env = Vec::with_capacity(spec.env.len() + 1);
        for e in &spec.env {
            if !e.contains('=') {
                return Err(PlanError::Invalid(format!(
                    "process.env entry `{e}` is not KEY=VALUE"
                )));
            }
            if let Some(p) = e.strip_prefix("PATH=") {
                path_var = Some(p.to_string());
            }
            env.push(cstring("process.env", e.as_str())?);
        }
        let candidates = if arg0.contains('/') {
            vec![cstring("process.args[0]", arg0.as_str())?]
        } else {
            path_var
                .as_deref()
                .unwrap_or(DEFAULT_PATH)
                .split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    cstring("PATH", format!("{}/{arg0}", dir.trim_end_matches('/')))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };
        if !cwd.starts_with('/') {
            return Err(PlanError::BadPath {
                what: "process.cwd",
                path: cwd.to_string(),
            });
        }
        let mut rlimits = Vec::with_capacity(spec.rlimits.len());
        for r in &spec.rlimits {
            let res =
                rlimit_resource(&r.kind).ok_or_else(|| PlanError::UnknownRlimit(r.kind.clone()))?;
            if r.soft > r.hard {
                return Err(PlanError::Invalid(format!(
                    "rlimit {}: soft limit {} above hard limit {}",
                    r.kind, r.soft, r.hard
                )));
            }
            rlimits.push((
                res,
                libc::rlimit64 {
                    rlim_cur: r.soft,
                    rlim_max: r.hard,
                },
            ));
        }
        let oom_score_adj = match spec.oom_score_adj {
            None => None,
            Some(v) if (-1000..=1000).contains(&v) => Some(v.to_string().into_bytes()),
            Some(v) => {
                return Err(PlanError::Invalid(format!(
                    "oomScoreAdj {v} outside -1000..=1000"
                )))
            }
        };
        let caps = match &spec.capabilities {
            None => None,
            Some(c) => {
                let (plan, warnings) = CapsPlan::new(c, caps::kernel_last_cap())?;
                for w in warnings {
                    log::warn!("process {:?}: {w}", spec.args.first());
                }
                Some(plan)
            }
        };
        let umask = spec.user.umask.unwrap_or(0o022);
        if umask > 0o777 {
            return Err(PlanError::Invalid(format!("umask {umask:o} above 0777")));
        }
        Ok(ExecPlan {
            argv: CStringArray::new(args),
            envp: CStringArray::new(env),
            candidates,
            cwd: cstring("process.cwd", cwd)?,
            uid: spec.user.uid,
            gid: spec.user.gid,
            groups: spec.user.additional_gids.clone(),
            umask: umask as libc::mode_t,
            rlimits,
            no_new_privs: spec.no_new_privileges,
            caps,
            seccomp: None,
            oom_score_adj,
            terminal: spec.terminal,
            stdio: Stdio::Pipes {
                stdin: -1,
                stdout: -1,
                stderr: -1,
            },
        })
    }
}

/// One mount, with its mount point resolved inside the (not yet pivoted) root.
pub struct MountStep {
    /// `source` argument.
    pub source: Option<CString>,
    /// Absolute target under the root.
    pub target: CString,
    /// `fstype` argument.
    pub fstype: Option<CString>,
    /// `mountflags`.
    pub flags: c_ulong,
    /// `data` argument (comma-joined fs options).
    pub data: Option<CString>,
    /// Directories to create first, outermost first.
    pub mkdirs: Vec<CString>,
    /// The target is a file (bind of a file): create it empty before mounting.
    pub target_is_file: bool,
    /// Flags for a second `MS_REMOUNT|MS_BIND` call (read-only and friends on bind mounts).
    pub remount_flags: Option<c_ulong>,
    /// Propagation change (`MS_PRIVATE`, `MS_SLAVE`, ...) applied last.
    pub propagation: Option<c_ulong>,
}

/// How the container's root is built in its mount namespace.
pub struct RootPlan {
    /// The root directory (before pivot), as guest-init sees it.
    pub rootfs: CString,
    /// Block device and fs type to mount at `rootfs` first.
    pub device: Option<(CString, CString)>,
    /// Remount the root read-only after the pivot.
    pub readonly: bool,
    /// The spec's mounts plus default devices.
    pub mounts: Vec<MountStep>,
    /// `(target, link)` symlinks created in the container's `/dev`.
    pub dev_symlinks: Vec<(CString, CString)>,
    /// Paths to mask (under the root, before pivot).
    pub masked: Vec<CString>,
    /// Paths to make read-only (under the root, before pivot).
    pub readonly_paths: Vec<CString>,
    /// guest-init's `/dev/null`, bound over masked files.
    pub dev_null: CString,
    /// `(<root>/proc/sys/..., value)`, written through the container's /proc before the pivot.
    pub sysctl: Vec<(CString, Vec<u8>)>,
    /// Host name for a new UTS namespace.
    pub hostname: Option<CString>,
    /// The container has its own network namespace (its `lo` is brought up).
    pub new_net_ns: bool,
}

/// Namespaces the container gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceSet {
    /// `clone` flags of namespaces created at clone time.
    pub clone_flags: c_ulong,
    /// A new cgroup namespace, unshared after joining the cgroup.
    pub cgroup: bool,
}

impl NamespaceSet {
    /// Checks `spec.linux.namespaces`. A mount namespace is required.
    pub fn from_spec(spec: &ContainerSpec) -> Result<(Self, Vec<String>), PlanError> {
        let mut set = NamespaceSet::default();
        let mut warnings = Vec::new();
        for ns in &spec.linux.namespaces {
            if let Some(path) = &ns.path {
                return Err(PlanError::Namespace(format!(
                    "joining an existing {:?} namespace (`{path}`) is not supported",
                    ns.kind
                )));
            }
            let flag = match ns.kind {
                NamespaceKind::Pid => libc::CLONE_NEWPID,
                NamespaceKind::Network => libc::CLONE_NEWNET,
                NamespaceKind::Mount => libc::CLONE_NEWNS,
                NamespaceKind::Ipc => libc::CLONE_NEWIPC,
                NamespaceKind::Uts => libc::CLONE_NEWUTS,
                NamespaceKind::Cgroup => {
                    set.cgroup = true;
                    0
                }
                NamespaceKind::User | NamespaceKind::Time => {
                    warnings.push(format!(
                        "{:?} namespace ignored: the VM is the isolation boundary",
                        ns.kind
                    ));
                    0
                }
            };
            set.clone_flags |= flag as c_ulong;
        }
        if set.clone_flags & libc::CLONE_NEWNS as c_ulong == 0 {
            return Err(PlanError::Namespace(
                "a mount namespace is required (linux.namespaces lacks `mount`)".into(),
            ));
        }
        if spec.hostname.is_some() && set.clone_flags & libc::CLONE_NEWUTS as c_ulong == 0 {
            return Err(PlanError::Namespace(
                "hostname is set but linux.namespaces lacks `uts`".into(),
            ));
        }
        Ok((set, warnings))
    }

    /// Whether the namespace of `flag` is new for the container.
    pub fn has(&self, flag: c_int) -> bool {
        self.clone_flags & flag as c_ulong != 0
    }
}

/// Checks an absolute path and returns its normal components.
fn checked_components<'a>(what: &'static str, path: &'a str) -> Result<Vec<&'a OsStr>, PlanError> {
    let bad = || PlanError::BadPath {
        what,
        path: path.to_string(),
    };
    if !path.starts_with('/') {
        return Err(bad());
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(out)
}

/// Maps a guest path (e.g. `/rootfs`) to where it is for this agent (`<image root>/rootfs`).
pub fn guest_path(image_root: &Path, what: &'static str, path: &str) -> Result<PathBuf, PlanError> {
    let mut p = image_root.to_path_buf();
    for c in checked_components(what, path)? {
        p.push(c);
    }
    Ok(p)
}

/// Resolves `path` (absolute inside the container) under `root`, following symlinks as if `root`
/// were `/`, so a link in the image can never point a mount outside the container root.
pub fn resolve_in_root(root: &Path, what: &'static str, path: &str) -> Result<PathBuf, PlanError> {
    let mut pending: VecDeque<std::ffi::OsString> = checked_components(what, path)?
        .into_iter()
        .map(|c| c.to_os_string())
        .collect();
    let mut current: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            current.pop();
            continue;
        }
        if c == "." || c.is_empty() {
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(current.iter());
        candidate.push(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(PlanError::SymlinkLoop(path.to_string()));
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|_| PlanError::SymlinkLoop(path.to_string()))?;
                if target.is_absolute() {
                    current.clear();
                }
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(n) => pending.push_front(n.to_os_string()),
                        Component::ParentDir => pending.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            _ => current.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(current.iter());
    Ok(out)
}

/// Directories between `root` (exclusive) and `dir` (inclusive), outermost first.
fn dirs_to_create(root: &Path, dir: &Path) -> Result<Vec<CString>, PlanError> {
    let mut out = Vec::new();
    let mut p = dir;
    while p.starts_with(root) && p != root {
        out.push(cpath("mount point", p)?);
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// Parsed mount(8)-style options.
struct MountOptions {
    flags: c_ulong,
    clear: c_ulong,
    propagation: Option<c_ulong>,
    data: Vec<String>,
}

fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions {
        flags: 0,
        clear: 0,
        propagation: None,
        data: Vec::new(),
    };
    for opt in options {
        let (set, clear): (c_ulong, c_ulong) = match opt.as_str() {
            "defaults" => (0, 0),
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nosymfollow" => (MS_NOSYMFOLLOW, 0),
            "symfollow" => (0, MS_NOSYMFOLLOW),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let rec = if opt.starts_with('r') {
                    libc::MS_REC
                } else {
                    0
                };
                let p = match opt.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                };
                o.propagation = Some(p | rec);
                (0, 0)
            }
            other => {
                o.data.push(other.to_string());
                (0, 0)
            }
        };
        o.flags = (o.flags | set) & !clear;
        o.clear |= clear;
    }
    o
}

const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn mount_step(
    index: usize,
    m: &MountSpec,
    rootfs: &Path,
    image_root: &Path,
) -> Result<MountStep, PlanError> {
    let err = |problem: String| PlanError::Mount {
        index,
        destination: m.destination.clone(),
        problem,
    };
    let target = resolve_in_root(rootfs, "mount destination", &m.destination)?;
    let opts = parse_options(&m.options);
    let fstype = m
        .fstype
        .as_deref()
        .filter(|t| !t.is_empty() && *t != "none");
    let is_bind = opts.flags & libc::MS_BIND != 0 || fstype == Some("bind");
    // As runc: procfs and sysfs go on an ordinary directory, never through a symlink the
    // image planted (which could aim them over other parts of the container's tree).
    if matches!(fstype, Some("proc" | "sysfs")) && !is_bind {
        let literal = rootfs.join(m.destination.trim_start_matches('/'));
        if target != literal {
            return Err(err(format!(
                "{} must be mounted on an ordinary directory, not through a symlink",
                fstype.unwrap_or_default()
            )));
        }
    }
    let mut flags = opts.flags;
    let (source, fstype, target_is_file, remount_flags, data) = if is_bind {
        let src = m
            .source
            .as_deref()
            .ok_or_else(|| err("bind mount without source".into()))?;
        let src = guest_path(image_root, "bind mount source", src)?;
        let meta = std::fs::metadata(&src)
            .map_err(|e| err(format!("bind source {}: {e}", src.display())))?;
        flags |= libc::MS_BIND;
        let extra = flags & !(libc::MS_BIND | libc::MS_REC);
        let remount = (extra != 0).then_some(libc::MS_REMOUNT | libc::MS_BIND | extra);
        flags &= libc::MS_BIND | libc::MS_REC;
        (
            Some(cpath("bind mount source", &src)?),
            None,
            !meta.is_dir(),
            remount,
            None,
        )
    } else if let Some(serial) = m.source.as_deref().and_then(disk::serial_in_source) {
        // An extra virtio disk named by serial (a host directory packed by the runtime).
        let (dev, fstype) = disk::resolve(serial, fstype).map_err(err)?;
        let data = (!opts.data.is_empty()).then(|| opts.data.join(","));
        (
            Some(cpath("mount source", &dev)?),
            Some(cstring("mount type", fstype)?),
            false,
            None,
            data.map(|d| cstring("mount options", d)).transpose()?,
        )
    } else {
        let Some(fstype) = fstype else {
            return Err(err("no filesystem type".into()));
        };
        let allowed = [
            "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2", "cgroup", "shm",
        ];
        if !allowed.contains(&fstype) {
            return Err(err(format!("filesystem type `{fstype}` is not supported")));
        }
        // cgroup v1 requests get the v2 hierarchy (the only one in the guest).
        let fstype = if fstype == "cgroup" {
            "cgroup2"
        } else {
            fstype
        };
        let source = m.source.as_deref().unwrap_or(fstype);
        let data = (!opts.data.is_empty()).then(|| opts.data.join(","));
        (
            Some(cstring("mount source", source)?),
            Some(cstring("mount type", fstype)?),
            false,
            None,
            data.map(|d| cstring("mount options", d)).transpose()?,
        )
    };
    let mkdir_base = if target_is_file {
        target.parent().unwrap_or(rootfs).to_path_buf()
    } else {
        target.clone()
    };
    Ok(MountStep {
        source,
        mkdirs: dirs_to_create(rootfs, &mkdir_base)?,
        target: cpath("mount destination", &target)?,
        fstype,
        flags,
        data,
        target_is_file,
        remount_flags,
        propagation: opts.propagation,
    })
}

impl RootPlan {
    /// Checks and converts the root, mounts, masked paths, sysctls and hostname of `spec`.
    /// `image_root` is where the guest's `/` is for this agent (`/` when PID 1).
    pub fn new(spec: &ContainerSpec, image_root: &Path) -> Result<Self, PlanError> {
        if spec.root.path.is_empty() {
            return Err(PlanError::Empty("root.path"));
        }
        let rootfs = guest_path(image_root, "root.path", &spec.root.path)?;
        let device = match &spec.root.device {
            None => None,
            Some(dev) => {
                let dev = guest_path(Path::new("/"), "root.device", dev)?;
                if spec.root.fstype.is_empty() {
                    return Err(PlanError::Empty("root.fstype"));
                }
                Some((
                    cpath("root.device", &dev)?,
                    cstring("root.fstype", spec.root.fstype.as_str())?,
                ))
            }
        };
        if device.is_none() && !rootfs.is_dir() {
            return Err(PlanError::Invalid(format!(
                "root.path `{}` is not a directory in the guest",
                spec.root.path
            )));
        }
        let mut mounts = Vec::with_capacity(spec.mounts.len() + DEFAULT_DEVICES.len());
        let mut dev_symlinks = Vec::new();
        for (i, m) in spec.mounts.iter().enumerate() {
            mounts.push(mount_step(i, m, &rootfs, image_root)?);
            let is_dev_tmpfs = checked_components("mount destination", &m.destination)?
                == [OsStr::new("dev")]
                && m.fstype.as_deref() == Some("tmpfs");
            if is_dev_tmpfs {
                let dev_dir = resolve_in_root(&rootfs, "mount destination", "/dev")?;
                for name in DEFAULT_DEVICES {
                    mounts.push(MountStep {
                        source: Some(cstring("device", format!("/dev/{name}"))?),
                        target: cpath("device", &dev_dir.join(name))?,
                        fstype: None,
                        flags: libc::MS_BIND,
                        data: None,
                        mkdirs: Vec::new(),
                        target_is_file: true,
                        remount_flags: None,
                        propagation: None,
                    });
                }
                for (target, link) in [
                    ("/proc/self/fd", "fd"),
                    ("/proc/self/fd/0", "stdin"),
                    ("/proc/self/fd/1", "stdout"),
                    ("/proc/self/fd/2", "stderr"),
                    ("pts/ptmx", "ptmx"),
                ] {
                    dev_symlinks.push((
                        cstring("symlink", target)?,
                        cpath("symlink", &dev_dir.join(link))?,
                    ));
                }
            }
        }
        let in_root = |what: &'static str, list: &[String]| -> Result<Vec<CString>, PlanError> {
            list.iter()
                .map(|p| cpath(what, &resolve_in_root(&rootfs, what, p)?))
                .collect()
        };
        let masked = in_root("masked path", &spec.linux.masked_paths)?;
        let readonly_paths = in_root("readonly path", &spec.linux.readonly_paths)?;
        let mut sysctl = Vec::with_capacity(spec.linux.sysctl.len());
        for (key, value) in &spec.linux.sysctl {
            let ok = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
                && !key.contains("..");
            if !ok {
                return Err(PlanError::Invalid(format!("sysctl key `{key}` is invalid")));
            }
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            let path = resolve_in_root(&rootfs, "sysctl key", &path)?;
            sysctl.push((cpath("sysctl key", &path)?, value.as_bytes().to_vec()));
        }
        let hostname = match &spec.hostname {
            None => None,
            Some(h) if h.len() > 64 => {
                return Err(PlanError::Invalid(format!(
                    "hostname `{h}` is longer than 64 bytes"
                )))
            }
            Some(h) => Some(cstring("hostname", h.as_str())?),
        };
        Ok(RootPlan {
            rootfs: cpath("root.path", &rootfs)?,
            device,
            readonly: spec.root.readonly,
            mounts,
            dev_symlinks,
            masked,
            readonly_paths,
            dev_null: cstring("device", "/dev/null")?,
            sysctl,
            hostname,
            new_net_ns: spec
                .linux
                .namespaces
                .iter()
                .any(|n| n.kind == NamespaceKind::Network),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_stay_inside_root() {
        let dir = std::env::temp_dir().join(format!("kiln-plan-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("/real", dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../etc", dir.join("up")).unwrap();
        assert_eq!(
            resolve_in_root(&dir, "t", "/abs/x").unwrap(),
            dir.join("real/x")
        );
        assert_eq!(resolve_in_root(&dir, "t", "/up").unwrap(), dir.join("etc"));
        assert!(resolve_in_root(&dir, "t", "relative").is_err());
        assert!(resolve_in_root(&dir, "t", "/a/../b").is_err());
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        assert!(resolve_in_root(&dir, "t", "/loop").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proc_and_sys_refuse_symlinked_destinations() {
        let dir = std::env::temp_dir().join(format!("kiln-plan-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::fs::create_dir_all(dir.join("sys")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("proc")).unwrap();
        let m = |dest: &str, fstype: &str| MountSpec {
            destination: dest.into(),
            fstype: Some(fstype.into()),
            source: Some(fstype.into()),
            options: Vec::new(),
        };
        let e = mount_step(0, &m("/proc", "proc"), &dir, &dir)
            .err()
            .unwrap();
        assert!(e.to_string().contains("ordinary directory"), "{e}");
        assert!(mount_step(1, &m("/sys", "sysfs"), &dir, &dir).is_ok());
        // Other file systems may still go through a symlink that stays inside the root.
        assert!(mount_step(2, &m("/proc", "tmpfs"), &dir, &dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn path_lookup_and_bad_specs() {
        let mut spec = ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        };
        let plan = ExecPlan::new(&spec).unwrap();
        let c: Vec<_> = plan
            .candidates
            .iter()
            .map(|c| c.to_str().unwrap())
            .collect();
        assert_eq!(c, ["/bin/sh", "/usr/bin/sh"]);
        spec.args.clear();
        assert!(ExecPlan::new(&spec).is_err());
        spec.args = vec!["a\0b".into()];
        assert!(ExecPlan::new(&spec).is_err());
        spec.args = vec!["x".into()];
        spec.cwd = "rel".into();
        assert!(ExecPlan::new(&spec).is_err());
    }

    #[test]
    fn mount_options() {
        let o = parse_options(&["nosuid".into(), "ro".into(), "mode=755".into(), "rw".into()]);
        assert_eq!(o.flags, libc::MS_NOSUID);
        assert_eq!(o.data, ["mode=755"]);
        let o = parse_options(&["nosymfollow".into(), "nodev".into()]);
        assert_eq!(o.flags, MS_NOSYMFOLLOW | libc::MS_NODEV);
        assert!(o.data.is_empty());
    }
}
