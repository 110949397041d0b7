//! Container state under `--root`: one directory per container holding `state.json`, the lock
//! file, the VM's sockets and logs, and the container's private disk image.
//!
//! `state.json` is written atomically (temporary file + rename). Commands that change a
//! container hold an exclusive `flock` on `<root>/<id>/lock`; creating the directory itself is
//! the atomic "id is taken" test. Whether a container is still alive is decided from its shim's
//! pid and start time (so a reused pid is not mistaken for the shim).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of the state store. Messages follow runc's where runc has one.
#[derive(Debug, Error)]
pub enum StateError {
    /// No such container.
    #[error("container does not exist")]
    NotFound,
    /// `create` with an id in use.
    #[error("container with given ID already exists")]
    AlreadyExists,
    /// An id with characters runc refuses.
    #[error("invalid container id {0:?}: use letters, digits, '_', '-', '.', '+', '@', ':'")]
    InvalidId(String),
    /// Reading or writing the state directory failed.
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
    /// `state.json` does not parse.
    #[error("{path}: corrupt container state")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { path, op, source }
}

/// Lifecycle status as stored. `status()` turns a dead shim into `Stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is still running (or died half way).
    Creating,
    /// The VM runs and the process is created, not started.
    Created,
    /// Started.
    Running,
    /// Frozen (`pause`).
    Paused,
    /// The main process exited (or the shim is gone).
    Stopped,
}

impl Status {
    /// The word runc uses in `state` and `list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// Everything kiln keeps about one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute host path of the root filesystem directory.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Stored status.
    pub status: Status,
    /// The shim's pid (what the pid file holds).
    pub shim_pid: Option<i32>,
    /// The shim's start time (field 22 of /proc/PID/stat), against pid reuse.
    pub shim_start: Option<u64>,
    /// The VMM process's pid.
    pub vmm_pid: Option<i32>,
    /// The main process's pid inside the guest.
    pub guest_pid: Option<u32>,
    /// The hybrid vsock unix socket of the VM.
    pub vsock_uds: Option<PathBuf>,
    /// The backend that runs the VM (for `state` annotations and the logs).
    pub backend: Option<String>,
    /// Shell-style exit code of the main process once known.
    pub exit_code: Option<i32>,
    /// The bundle's annotations.
    pub annotations: BTreeMap<String, String>,
    /// Whether the main process has a terminal.
    pub terminal: bool,
}

impl ContainerState {
    /// The effective status: `Created`/`Running`/`Paused` with a dead shim is `Stopped`.
    pub fn status(&self) -> Status {
        match self.status {
            Status::Created | Status::Running | Status::Paused | Status::Creating => {
                match (self.shim_pid, self.shim_start) {
                    (Some(pid), start) if process_alive(pid, start) => self.status,
                    (None, _) if self.status == Status::Creating => Status::Creating,
                    _ => Status::Stopped,
                }
            }
            Status::Stopped => Status::Stopped,
        }
    }

    /// The runtime-spec state JSON (`kiln state`).
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.status();
        let pid = match status {
            Status::Stopped => 0,
            _ => self.shim_pid.unwrap_or(0),
        };
        let mut annotations = self.annotations.clone();
        if let Some(b) = &self.backend {
            annotations.insert("io.kiln.backend".into(), b.clone());
        }
        serde_json::json!({
            "ociVersion": "1.0.2",
            "id": self.id,
            "status": status.as_str(),
            "pid": pid,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": annotations,
        })
    }
}

/// True if `pid` exists and (when given) started at `start`.
pub fn process_alive(pid: i32, start: Option<u64>) -> bool {
    match (process_start_time(pid), start) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(now), Some(then)) => now == then,
    }
}

/// Field 22 (starttime) of `/proc/PID/stat`; `None` if the process is gone or a zombie.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Checks an id like runc does (`^[\w+\-\.@:]+$`, not `.` or `..`).
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.@:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// The state directory `--root`.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// An exclusive lock on one container; released on drop.
pub struct ContainerLock {
    _lock: Flock<File>,
}

impl StateStore {
    /// The store at `root` (created on first use).
    pub fn new(root: &Path) -> Self {
        StateStore {
            root: root.to_path_buf(),
        }
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates the directory for a new container; fails with `AlreadyExists` if it is taken.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        fs::create_dir_all(&self.root).map_err(io_err(&self.root, "create state root"))?;
        let dir = self.dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(StateError::AlreadyExists),
            Err(e) => Err(io_err(&dir, "create container state directory")(e)),
        }
    }

    /// Takes the container's lock (blocking).
    pub fn lock(&self, id: &str) -> Result<ContainerLock, StateError> {
        validate_id(id).map_err(|_| StateError::NotFound)?;
        let path = self.dir(id).join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    StateError::NotFound
                } else {
                    io_err(&path, "open lock")(e)
                }
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(&path, "flock")(e.into()))?;
        Ok(ContainerLock { _lock: lock })
    }

    /// Loads `state.json` of `id`.
    pub fn load(&self, id: &str) -> Result<ContainerState, StateError> {
        validate_id(id).map_err(|_| StateError::NotFound)?;
        let path = self.dir(id).join("state.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StateError::NotFound),
            Err(e) => return Err(io_err(&path, "read")(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Writes `state.json` atomically.
    pub fn save(&self, state: &ContainerState) -> Result<(), StateError> {
        let dir = self.dir(&state.id);
        let tmp = dir.join(format!(".state.json.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: tmp.clone(),
            source,
        })?;
        fs::write(&tmp, json).map_err(io_err(&tmp, "write"))?;
        let path = dir.join("state.json");
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path, "rename into place")(e)
        })
    }

    /// Removes the container's directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir, "remove")(e)),
        }
    }

    /// Ids of every container directory (sorted).
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root, "read state root")(e)),
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> ContainerState {
        ContainerState {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00Z".into(),
            status: Status::Created,
            shim_pid: Some(std::process::id() as i32),
            shim_start: process_start_time(std::process::id() as i32),
            vmm_pid: None,
            guest_pid: Some(1),
            vsock_uds: None,
            backend: Some("qemu-tcg".into()),
            exit_code: None,
            annotations: BTreeMap::new(),
            terminal: false,
        }
    }

    #[test]
    fn create_save_load_and_duplicate() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        store.create_dir("c1").unwrap();
        assert!(matches!(
            store.create_dir("c1"),
            Err(StateError::AlreadyExists)
        ));
        assert!(matches!(store.load("c1"), Err(StateError::NotFound)));
        store.save(&sample("c1")).unwrap();
        let s = store.load("c1").unwrap();
        assert_eq!(s.status(), Status::Created);
        assert_eq!(s.oci_state()["status"], "created");
        assert_eq!(s.oci_state()["annotations"]["io.kiln.backend"], "qemu-tcg");
        let _l = store.lock("c1").unwrap();
        assert_eq!(store.ids().unwrap(), vec!["c1".to_string()]);
        store.remove("c1").unwrap();
        assert!(matches!(store.load("c1"), Err(StateError::NotFound)));
    }

    #[test]
    fn dead_shim_means_stopped_and_ids_are_checked() {
        let mut s = sample("c2");
        s.shim_start = Some(1); // not our start time: a reused pid
        assert_eq!(s.status(), Status::Stopped);
        assert_eq!(s.oci_state()["pid"], 0);
        assert!(validate_id("a-b_c.d+e@f:g").is_ok());
        assert!(validate_id("../x").is_err());
        assert!(validate_id("..").is_err());
        assert!(validate_id("").is_err());
    }
}
