//! Host cgroups of a container's VM processes: the shim, the VMM (host-vmm, or QEMU and
//! vhost-device-vsock) and whatever they spawn go into the host cgroup that the OCI
//! `linux.cgroupsPath` names, where engines (podman's cgroupfs manager, containerd) look for the
//! container's processes: accounting, `podman stats`, limits, cleanup. The container's own
//! processes live inside the VM; the guest applies `linux.resources` there as well.
//!
//! Paths follow runc's cgroupfs semantics: an absolute path is relative to the root of every
//! mounted hierarchy; a relative one is taken from the root too (runc would put it under its own
//! cgroup); the systemd form `slice:prefix:name` is mapped to the directory systemd would use
//! (`/a.slice/a-b.slice/prefix-name.scope`) without talking to systemd. No path: `/kiln/<id>`.
//! Works on cgroup v2 (unified) and on v1/hybrid hosts (every mounted hierarchy is joined, as
//! runc does).
//!
//! `kiln create` makes the directories and writes the limits ([`HostCgroup::setup`]) and records
//! them in `<state dir>/cgroup.json`; the shim joins them before it spawns the VMM so every VM
//! process inherits them ([`HostCgroup::join`]); `delete` removes the directories kiln made once
//! they are empty ([`HostCgroup::remove`]). Limits written on the host:
//! - cpu: quota/period and shares (weight on v2), as runc writes them: the VMM's threads are the
//!   container's CPU use on the host;
//! - pids: the limit plus [`HOST_PIDS_OVERHEAD`]: on the host the cgroup holds the shim's and the
//!   VMM's threads, not the guest's processes, and a small guest limit must not starve the VMM;
//! - memory: only when the spec sets a limit, then the VM's RAM plus
//!   [`VMM_MEMORY_OVERHEAD_MIB`] (the VMM's own memory, QEMU's TCG translation cache, the shim):
//!   the guest enforces the container's own limit inside the VM.
//!
//! This module touches only cgroupfs files; it does not signal or wait for processes except in
//! [`HostCgroup::kill_leftovers`] (delete of a cgroup kiln made).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The record of a container's host cgroup in its state directory.
pub const RECORD: &str = "cgroup.json";

/// Parent of the cgroups of containers whose spec names none (`/kiln/<id>-<hash of the state
/// directory>`: the same id under two `--root`s must not share a cgroup).
pub const DEFAULT_PARENT: &str = "/kiln";

/// Memory the host allows a container's VM processes above the VM's RAM (MiB).
pub const VMM_MEMORY_OVERHEAD_MIB: u64 = 256;

/// Tasks (threads) the host allows above the spec's pids limit: the shim's and VMM's threads.
pub const HOST_PIDS_OVERHEAD: i64 = 128;

/// How long `remove` retries a cgroup that is still busy (exiting processes).
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Errors of host cgroup set-up.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` cannot be used.
    #[error("invalid linux.cgroupsPath {path:?}: {problem}")]
    InvalidPath {
        /// The value.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// No cgroup hierarchy is mounted.
    #[error("no cgroup hierarchy is mounted (/proc/self/mountinfo)")]
    NoHierarchy,
    /// A cgroupfs operation failed.
    #[error("{path}: {op}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl CgroupError {
    /// The cgroupfs refused for lack of permission (rootless, read-only, not delegated).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            CgroupError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EPERM | libc::EROFS)
            ),
            _ => false,
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, op, source }
}

/// The cgroup v1 controllers (other mount options of a v1 hierarchy are not controllers).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// cgroup v2.
    pub v2: bool,
    /// v1 controllers bound to it (`cpu`, `pids`, `name=systemd`, ...); empty for v2.
    pub controllers: Vec<String>,
}

/// The mounted hierarchies, from `/proc/self/mountinfo` (the first mount of each).
pub fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path, "read"))?;
    let found = parse_mountinfo(&text);
    if found.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(found)
}

/// The cgroup hierarchies of a mountinfo text whose mount root is `/`.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut found: Vec<Hierarchy> = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let after: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || after.len() < 3 || fields[3] != "/" {
            continue;
        }
        let mount = PathBuf::from(unescape(fields[4]));
        let h = match after[0] {
            "cgroup2" => Hierarchy {
                mount,
                v2: true,
                controllers: Vec::new(),
            },
            "cgroup" => Hierarchy {
                mount,
                v2: false,
                controllers: after[2]
                    .split(',')
                    .filter(|o| o.starts_with("name=") || V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect(),
            },
            _ => continue,
        };
        let dup = found
            .iter()
            .any(|f| f.v2 == h.v2 && f.controllers == h.controllers);
        if !dup {
            found.push(h);
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup path (from the hierarchy root, starting with `/`) for `linux.cgroupsPath`;
/// without one, `/kiln/<default_name>`.
pub fn resolve_path(cgroups_path: Option<&str>, default_name: &str) -> Result<String, CgroupError> {
    let invalid = |problem: &str| CgroupError::InvalidPath {
        path: cgroups_path.unwrap_or_default().to_string(),
        problem: problem.to_string(),
    };
    let raw = match cgroups_path.map(str::trim).filter(|p| !p.is_empty()) {
        None => return Ok(format!("{DEFAULT_PARENT}/{default_name}")),
        Some(p) => p,
    };
    let path = if !raw.starts_with('/') && raw.matches(':').count() == 2 {
        systemd_path(raw).ok_or_else(|| invalid("expected slice:prefix:name"))?
    } else if raw.contains(':') {
        return Err(invalid(
            "expected an absolute path or the systemd form slice:prefix:name",
        ));
    } else {
        format!("/{}", raw.trim_start_matches('/'))
    };
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() {
        return Err(invalid("the root cgroup cannot hold a container"));
    }
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(invalid("'.' and '..' are not allowed"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `slice:prefix:name` → `/a.slice/a-b.slice/prefix-name.scope` (systemd's directory layout).
fn systemd_path(raw: &str) -> Option<String> {
    let mut it = raw.splitn(3, ':');
    let (slice, prefix, name) = (it.next()?, it.next()?, it.next()?);
    if name.is_empty() || slice.contains('/') || name.contains('/') || prefix.contains('/') {
        return None;
    }
    let mut path = String::new();
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        let mut acc = String::new();
        for part in stem.split('-') {
            if part.is_empty() {
                return None;
            }
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push_str(&format!("/{acc}.slice"));
        }
    }
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    Some(format!("{path}/{unit}"))
}

/// Host limits for the VM processes, derived from `linux.resources`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CFS quota in µs per period (-1: none).
    pub cpu_quota: Option<i64>,
    /// CFS period in µs.
    pub cpu_period: Option<u64>,
    /// v1 cpu.shares (v2: converted to cpu.weight).
    pub cpu_shares: Option<u64>,
    /// pids.max (already including [`HOST_PIDS_OVERHEAD`]).
    pub pids_max: Option<i64>,
    /// Memory limit in bytes (VM RAM + [`VMM_MEMORY_OVERHEAD_MIB`]).
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// The host limits for a container of `spec` in a VM of `vm_memory_mib`.
    pub fn from_spec(spec: &Spec, vm_memory_mib: u32) -> Limits {
        let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
            return Limits::default();
        };
        let cpu = r.cpu().as_ref();
        let memory_set = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .is_some_and(|l| l > 0);
        Limits {
            cpu_quota: cpu.and_then(|c| c.quota()).filter(|&q| q > 0),
            cpu_period: cpu.and_then(|c| c.period()).filter(|&p| p > 0),
            cpu_shares: cpu.and_then(|c| c.shares()).filter(|&s| s > 0),
            pids_max: r
                .pids()
                .as_ref()
                .map(|p| p.limit())
                .filter(|&l| l > 0)
                .map(|l| l.saturating_add(HOST_PIDS_OVERHEAD)),
            memory_bytes: memory_set
                .then(|| (u64::from(vm_memory_mib) + VMM_MEMORY_OVERHEAD_MIB) << 20),
        }
    }

    /// Files and values to write for one hierarchy, in order.
    fn writes(&self, h: &CgroupDir) -> Vec<(&'static str, String)> {
        let has = |c: &str| h.controllers.iter().any(|x| x == c);
        let mut w = Vec::new();
        if h.v2 {
            if self.cpu_quota.is_some() || self.cpu_period.is_some() {
                let period = self.cpu_period.unwrap_or(100_000);
                let quota = self.cpu_quota.map_or("max".into(), |q| q.to_string());
                w.push(("cpu.max", format!("{quota} {period}")));
            }
            if let Some(s) = self.cpu_shares {
                let weight = 1 + (s.clamp(2, 262_144) - 2) * 9999 / 262_142;
                w.push(("cpu.weight", weight.to_string()));
            }
            if let Some(p) = self.pids_max {
                w.push(("pids.max", p.to_string()));
            }
            if let Some(m) = self.memory_bytes {
                w.push(("memory.max", m.to_string()));
            }
            return w;
        }
        if has("cpu") {
            if let Some(s) = self.cpu_shares {
                w.push(("cpu.shares", s.to_string()));
            }
            if let Some(p) = self.cpu_period {
                w.push(("cpu.cfs_period_us", p.to_string()));
            }
            if let Some(q) = self.cpu_quota {
                w.push(("cpu.cfs_quota_us", q.to_string()));
            }
        }
        if has("pids") {
            if let Some(p) = self.pids_max {
                w.push(("pids.max", p.to_string()));
            }
        }
        if has("memory") {
            if let Some(m) = self.memory_bytes {
                w.push(("memory.limit_in_bytes", m.to_string()));
            }
        }
        w
    }
}

/// The container's directory in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    /// The cgroup directory.
    pub dir: PathBuf,
    /// cgroup v2.
    pub v2: bool,
    /// v1 controllers of the hierarchy.
    pub controllers: Vec<String>,
    /// Directories kiln created, outermost first (removed innermost first at delete).
    pub created: Vec<PathBuf>,
}

/// A container's host cgroup (`cgroup.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroup {
    /// The cgroup path from each hierarchy's root.
    pub path: String,
    /// One directory per hierarchy.
    pub dirs: Vec<CgroupDir>,
    /// The limits written.
    pub limits: Limits,
}

impl HostCgroup {
    /// Creates `path` in every hierarchy and writes `limits`. On failure, what was created is
    /// removed again.
    pub fn setup(path: &str, limits: &Limits) -> Result<HostCgroup, CgroupError> {
        Self::setup_in(&hierarchies()?, path, limits)
    }

    /// [`HostCgroup::setup`] with the hierarchies given.
    pub fn setup_in(
        hierarchies: &[Hierarchy],
        path: &str,
        limits: &Limits,
    ) -> Result<HostCgroup, CgroupError> {
        let mut cg = HostCgroup {
            path: path.to_string(),
            dirs: Vec::new(),
            limits: limits.clone(),
        };
        let pure_v2 = hierarchies.iter().all(|h| h.v2);
        let result = hierarchies.iter().try_for_each(|h| {
            let dir = cg_dir(h, path, &mut cg)?;
            for (file, value) in limits.writes(dir) {
                let f = dir.dir.join(file);
                if dir.v2 && !f.exists() {
                    // The controller is not available on v2 here: bound to v1 (hybrid mode;
                    // the v1 hierarchy takes the limit), or not delegated to this cgroup.
                    if pure_v2 {
                        log::warn!("{}: no such file: limit {value} not applied", f.display());
                    }
                    continue;
                }
                fs::write(&f, &value).map_err(io_err(&f, "write"))?;
            }
            Ok(())
        });
        if let Err(e) = result {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Moves process `pid` (0: the caller) into the cgroup in every hierarchy.
    pub fn join(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let f = d.dir.join("cgroup.procs");
            fs::write(&f, pid.to_string()).map_err(io_err(&f, "join"))?;
        }
        Ok(())
    }

    /// The pids in the cgroup (from the first hierarchy that lists any).
    pub fn procs(&self) -> Vec<i32> {
        for d in &self.dirs {
            let pids = read_procs(&d.dir);
            if !pids.is_empty() {
                return pids;
            }
        }
        Vec::new()
    }

    /// SIGKILLs processes still in the container's cgroup where kiln created that directory
    /// itself (delete), waiting up to 2 s. A cgroup kiln found in place is not its to empty.
    pub fn kill_leftovers(&self) {
        let own: Vec<&CgroupDir> = self
            .dirs
            .iter()
            .filter(|d| d.created.contains(&d.dir))
            .collect();
        if own.is_empty() {
            return;
        }
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            let mut pids: Vec<i32> = own.iter().flat_map(|d| read_procs(&d.dir)).collect();
            pids.sort_unstable();
            pids.dedup();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids.into_iter().filter(|&p| p > 1) {
                log::info!("cgroup {}: killing leftover pid {pid}", self.path);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the directories kiln created, innermost first. The container's own directory is
    /// retried for up to 2 s while busy (exiting processes), then left with a warning; a parent
    /// kiln made is removed only if empty (other containers may be under it). Directories kiln
    /// did not create stay.
    pub fn remove(&self) {
        for d in &self.dirs {
            for dir in d.created.iter().rev() {
                let own = *dir == d.dir;
                let result = if own {
                    rmdir_retry(dir)
                } else {
                    fs::remove_dir(dir)
                };
                match result {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) if own => {
                        log::warn!("cgroup {}: cannot remove it: {e}", dir.display());
                        break;
                    }
                    Err(e) => {
                        log::debug!("cgroup {}: kept: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }

    /// Writes the record into the state directory `state_dir`.
    pub fn save(&self, state_dir: &Path) -> Result<(), CgroupError> {
        let path = state_dir.join(RECORD);
        let json = serde_json::to_vec(self).map_err(|e| CgroupError::Io {
            path: path.clone(),
            op: "serialise",
            source: io::Error::other(e.to_string()),
        })?;
        fs::write(&path, json).map_err(io_err(&path, "write"))
    }

    /// The record in `state_dir`, if any (none for containers made before host cgroups).
    pub fn load(state_dir: &Path) -> Option<HostCgroup> {
        let bytes = fs::read(state_dir.join(RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Creates `path` under hierarchy `h` (and records what it made in `cg`).
fn cg_dir<'a>(
    h: &Hierarchy,
    path: &str,
    cg: &'a mut HostCgroup,
) -> Result<&'a CgroupDir, CgroupError> {
    let mut created: Vec<PathBuf> = Vec::new();
    let mut result = Ok(());
    // A parent kiln made can vanish under us when another container's delete removes it
    // (empty) just before our mkdir below it: start again, a few times.
    for attempt in 0..3 {
        let mut dir = h.mount.clone();
        result = Ok(());
        for part in path.split('/').filter(|c| !c.is_empty()) {
            let parent = dir.clone();
            if h.v2 {
                enable_v2_controllers(&parent);
            }
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    if !created.contains(&dir) {
                        created.push(dir.clone());
                    }
                    if h.controllers.iter().any(|c| c == "cpuset") {
                        if let Err(e) = inherit_cpuset(&parent, &dir) {
                            return finish(cg, h, path, created, Err(e));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let retry = e.kind() == io::ErrorKind::NotFound && attempt < 2;
                    result = Err(io_err(&dir, "create")(e));
                    if retry {
                        break;
                    }
                    return finish(cg, h, path, created, result);
                }
            }
        }
        if result.is_ok() {
            break;
        }
    }
    finish(cg, h, path, created, result)
}

/// Records the directory (also on failure, so that what was made is removed).
fn finish<'a>(
    cg: &'a mut HostCgroup,
    h: &Hierarchy,
    path: &str,
    created: Vec<PathBuf>,
    result: Result<(), CgroupError>,
) -> Result<&'a CgroupDir, CgroupError> {
    cg.dirs.push(CgroupDir {
        dir: h.mount.join(path.trim_start_matches('/')),
        v2: h.v2,
        controllers: h.controllers.clone(),
        created,
    });
    result?;
    Ok(cg.dirs.last().expect("just pushed"))
}

/// Enables cpu, pids and memory for the children of v2 cgroup `dir`, where available. Best
/// effort: a cgroup with processes of its own cannot delegate (the limits then stay unwritten).
fn enable_v2_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in ["cpu", "pids", "memory"] {
        let has = |s: &str| s.split_whitespace().any(|x| x == c);
        if has(&available) && !has(&enabled) {
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                log::debug!("{}: cannot enable {c}: {e}", dir.display());
            }
        }
    }
}

/// A new v1 cpuset cgroup starts with no CPUs and memory nodes; copy the parent's.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let f = dir.join(file);
        if fs::read_to_string(&f).unwrap_or_default().trim().is_empty() {
            let p = parent.join(file);
            let value = fs::read_to_string(&p).map_err(io_err(&p, "read"))?;
            fs::write(&f, value.trim()).map_err(io_err(&f, "write"))?;
        }
    }
    Ok(())
}

fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn rmdir_retry(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + REMOVE_WAIT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_runc() {
        assert_eq!(resolve_path(None, "c1").unwrap(), "/kiln/c1");
        assert_eq!(resolve_path(Some(""), "c1").unwrap(), "/kiln/c1");
        assert_eq!(
            resolve_path(Some("/libpod_parent/libpod-x"), "c1").unwrap(),
            "/libpod_parent/libpod-x"
        );
        assert_eq!(resolve_path(Some("a//b/"), "c").unwrap(), "/a/b");
        assert_eq!(
            resolve_path(Some("machine-a.slice:libpod:abc"), "c").unwrap(),
            "/machine.slice/machine-a.slice/libpod-abc.scope"
        );
        assert_eq!(
            resolve_path(Some("system.slice::abc"), "c").unwrap(),
            "/system.slice/abc.scope"
        );
        for bad in ["/a/../b", "/", "a:b", "x.slice::", "bad:p:n"] {
            let e = resolve_path(Some(bad), "c").unwrap_err().to_string();
            assert!(e.starts_with("invalid linux.cgroupsPath"), "{bad}: {e}");
        }
    }

    #[test]
    fn mountinfo_of_a_hybrid_host() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
            33 31 0:29 / /mnt/again rw - cgroup cgroup rw,cpu,cpuacct\n\
            40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
            42 31 0:38 /sub /x\\040y rw - cgroup2 cgroup2 rw\n";
        let h = parse_mountinfo(text);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(h[0].mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h[1].controllers, ["name=systemd"]);
        assert!(h[2].v2);
        assert_eq!(unescape("/x\\040y"), "/x y");
    }

    #[test]
    fn limits_per_hierarchy() {
        let l = Limits {
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            cpu_shares: Some(1024),
            pids_max: Some(164),
            memory_bytes: Some(384 << 20),
        };
        let dir = |v2: bool, c: &[&str]| CgroupDir {
            dir: PathBuf::new(),
            v2,
            controllers: c.iter().map(|s| s.to_string()).collect(),
            created: Vec::new(),
        };
        let v2 = l.writes(&dir(true, &[]));
        assert!(v2.contains(&("cpu.max", "50000 100000".into())));
        assert!(v2.contains(&("cpu.weight", "39".into())));
        assert!(v2.contains(&("memory.max", (384u64 << 20).to_string())));
        let cpu = l.writes(&dir(false, &["cpu", "cpuacct"]));
        assert_eq!(
            cpu,
            [
                ("cpu.shares", "1024".to_string()),
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", "50000".into())
            ]
        );
        assert_eq!(
            l.writes(&dir(false, &["pids"])),
            [("pids.max", "164".to_string())]
        );
        assert!(l.writes(&dir(false, &["freezer"])).is_empty());
    }

    #[test]
    fn a_shared_parent_outlives_its_containers() {
        let mount = std::env::temp_dir().join(format!("kiln-cg-unit-{}", std::process::id()));
        fs::create_dir_all(&mount).unwrap();
        let h = [Hierarchy {
            mount: mount.clone(),
            v2: false,
            controllers: vec!["freezer".into()],
        }];
        let a = HostCgroup::setup_in(&h, "/kiln/a", &Limits::default()).unwrap();
        let b = HostCgroup::setup_in(&h, "/kiln/b", &Limits::default()).unwrap();
        assert_eq!(
            a.dirs[0].created,
            [mount.join("kiln"), mount.join("kiln/a")]
        );
        assert_eq!(b.dirs[0].created, [mount.join("kiln/b")]);
        a.remove();
        assert!(!mount.join("kiln/a").exists());
        assert!(mount.join("kiln/b").exists());
        b.remove();
        assert!(!mount.join("kiln/b").exists());
        assert!(mount.join("kiln").exists(), "b did not make the parent");
        fs::remove_dir_all(&mount).unwrap();
    }

    #[test]
    fn limits_from_a_spec() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"resources": {
                "cpu": {"quota": 90000, "period": 100000},
                "pids": {"limit": 36},
                "memory": {"limit": 67108864}
            }}
        }))
        .unwrap();
        let l = Limits::from_spec(&spec, 128);
        assert_eq!(l.cpu_quota, Some(90_000));
        assert_eq!(l.cpu_period, Some(100_000));
        assert_eq!(l.pids_max, Some(36 + HOST_PIDS_OVERHEAD));
        assert_eq!(l.memory_bytes, Some((128 + VMM_MEMORY_OVERHEAD_MIB) << 20));
        let none: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"}
        }))
        .unwrap();
        assert_eq!(Limits::from_spec(&none, 256), Limits::default());
    }
}
