//! cgroup v2: one cgroup per container under the agent's base (`/sys/fs/cgroup/kiln`), limits from
//! `linux.resources`, statistics, OOM-kill counting and killing everything inside.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_protocol::{ContainerStats, Resources};
use thiserror::Error;

/// Controllers guest-init enables for containers.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// A cgroup operation failed.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// Writing or creating a cgroup file failed.
    #[error("{path}: {what}")]
    Io {
        /// What was attempted.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The spec asks for a limit whose controller is not enabled here.
    #[error("the {0} controller is not available in {1} (cannot apply the spec's limit)")]
    NoController(&'static str, PathBuf),
}

fn write(path: &Path, what: &str, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Io {
        what: format!("{what} (writing `{value}`)"),
        path: path.to_path_buf(),
        source,
    })
}

/// Enables [`CONTROLLERS`] for the children of `base` (and `base` itself in its parent) as far as
/// the kernel allows; returns the controllers available to containers.
pub fn prepare_base(base: &Path) -> Result<Vec<String>, CgroupError> {
    fs::create_dir_all(base).map_err(|source| CgroupError::Io {
        what: "creating the base cgroup".into(),
        path: base.to_path_buf(),
        source,
    })?;
    for dir in [base.parent(), Some(base)].into_iter().flatten() {
        for c in CONTROLLERS {
            // Missing controllers are reported per container when a limit needs them.
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
    let enabled = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    Ok(enabled.split_whitespace().map(str::to_string).collect())
}

/// The cgroup of one container.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_max(path: &Path) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    s.trim().parse().ok()
}

fn keyed(path: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

impl Cgroup {
    /// Creates `<base>/<name>` (an existing one is reused if empty).
    pub fn create(base: &Path, name: &str) -> Result<Self, CgroupError> {
        let path = base.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Io {
                    what: "creating the container cgroup".into(),
                    path,
                    source,
                })
            }
        }
        Ok(Cgroup { path })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn set(&self, controller: &'static str, name: &str, value: &str) -> Result<(), CgroupError> {
        let f = self.file(name);
        if !f.exists() {
            return Err(CgroupError::NoController(controller, self.path.clone()));
        }
        write(&f, name, value)
    }

    /// Applies the limits of `res`.
    pub fn apply(&self, res: &Resources) -> Result<(), CgroupError> {
        if let Some(m) = res.memory_limit {
            self.set("memory", "memory.max", &m.to_string())?;
        }
        if let Some(s) = res.memory_swap_limit {
            // Guests usually have no swap and then no memory.swap.max: ignore it then.
            if self.file("memory.swap.max").exists() {
                self.set("memory", "memory.swap.max", &s.to_string())?;
            }
        }
        if res.cpu_quota.is_some() || res.cpu_period.is_some() {
            let quota = match res.cpu_quota {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = res.cpu_period.unwrap_or(100_000);
            self.set("cpu", "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(w) = res.cpu_weight {
            self.set("cpu", "cpu.weight", &w.clamp(1, 10_000).to_string())?;
        }
        if let Some(cpus) = &res.cpuset_cpus {
            self.set("cpuset", "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = &res.cpuset_mems {
            self.set("cpuset", "cpuset.mems", mems)?;
        }
        if let Some(p) = res.pids_limit {
            self.set("pids", "pids.max", &p.to_string())?;
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.file("cgroup.procs"), "cgroup.procs", &pid.to_string())
    }

    /// `oom_kill` of `memory.events` (0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        keyed(&self.file("memory.events"), "oom_kill").unwrap_or(0)
    }

    /// Current statistics (missing controllers read as zero / `None`).
    pub fn stats(&self) -> ContainerStats {
        let cpu = self.file("cpu.stat");
        ContainerStats {
            memory_current: read_u64(&self.file("memory.current")).unwrap_or(0),
            memory_max: read_max(&self.file("memory.max")),
            oom_kills: self.oom_kills(),
            cpu_usage_usec: keyed(&cpu, "usage_usec").unwrap_or(0),
            cpu_user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
            cpu_system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
            pids_current: read_u64(&self.file("pids.current")).unwrap_or(0),
            pids_max: read_max(&self.file("pids.max")),
        }
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.file("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process inside (`cgroup.kill`, or one by one on older kernels).
    pub fn kill_all(&self) {
        if fs::write(self.file("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Removes the (empty) cgroup, retrying briefly while the kernel finishes exits.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut last = None;
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(CgroupError::Io {
            what: "removing the container cgroup".into(),
            path: self.path.clone(),
            source: last.unwrap_or_else(|| io::Error::other("busy")),
        })
    }
}
