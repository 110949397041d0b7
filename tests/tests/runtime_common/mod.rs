//! Shared helpers of the `kiln` runtime tests (`runtime_cli.rs`, `runtime_podman.rs`): the
//! `kiln` binary, the environment it needs (kernel, guest-init), busybox bundles, and a `kiln`
//! invocation with its own `--root`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::guests::TempDir;

pub use kiln_tests::runtime::{busybox_bundle, kiln_bin, kiln_env};

/// `kiln` with its own state root.
pub struct Kiln {
    /// Scratch directory (bundles, root, logs).
    pub scratch: TempDir,
    /// `--root`.
    pub root: PathBuf,
}

impl Kiln {
    /// A fresh state root under a scratch directory named after `tag`.
    pub fn new(tag: &str) -> Kiln {
        let scratch = TempDir::new(tag);
        let root = scratch.path().join("root");
        Kiln { scratch, root }
    }

    /// A `kiln --root ROOT args...` command with the test environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kiln_bin());
        c.envs(kiln_env()).arg("--root").arg(&self.root).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs `kiln args...` and returns its output. stdout and stderr go through files, not
    /// pipes: `create` hands them to the shim, which keeps them open as the container's stdio
    /// (as runc's init does), so waiting for a pipe's end would wait for the container.
    pub fn run(&self, args: &[&str]) -> Output {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (o, e) = (
            self.scratch.path().join(format!("out.{n}")),
            self.scratch.path().join(format!("err.{n}")),
        );
        let status = kiln_tests::bounded::status(
            self.cmd(args)
                .stdout(std::fs::File::create(&o).unwrap())
                .stderr(std::fs::File::create(&e).unwrap()),
            kiln_tests::bounded::VM_WAIT,
            &format!("kiln {args:?}"),
        );
        let out = Output {
            status,
            stdout: std::fs::read(&o).unwrap_or_default(),
            stderr: std::fs::read(&e).unwrap_or_default(),
        };
        eprintln!(
            "kiln {args:?} -> {:?}\n  stdout: {}\n  stderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        out
    }

    /// `kiln state ID` parsed, or `None` if it fails.
    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.run(&["state", id]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("state JSON"))
    }

    /// Waits until `state ID` reports `status` (or the timeout passes).
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.state(id).is_some_and(|s| s["status"] == status) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// A bundle directory `name` under the scratch directory running `args`.
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        busybox_bundle(&dir, args)
    }
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Text of stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
