//! Builds the bare-metal test guests (`tests/guests`) and the `host-vmm` binary, and runs VMs with
//! a timeout.
//!
//! Both builds happen at most once per process (`OnceLock`):
//! - the guests with `cargo build --release --target x86_64-unknown-none` into
//!   `<target dir>/kiln-guests` (their own crate, outside the workspace);
//! - `host-vmm` with `cargo build -p host-vmm` in the same target dir and profile as the running
//!   test or benchmark binary (so `cargo test --release` tests a release VMM). `KILN_HOST_VMM`
//!   overrides the binary.
//!
//! Guests report through `KILN-TEST key=value` lines on the serial console; [`VmOutput::get`] reads
//! them back.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The two test guest images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// Has a PVH ELF note (32-bit entry); its ELF entry also accepts the Linux 64-bit protocol.
    Pvh,
    /// No PVH note: booted through the Linux 64-bit boot protocol.
    Linux64,
}

impl Guest {
    fn bin_name(self) -> &'static str {
        match self {
            Guest::Pvh => "guest-pvh",
            Guest::Linux64 => "guest-linux64",
        }
    }
}

/// Directory holding the running executable's profile (`target/<profile>`), and the profile name
/// to pass to cargo.
fn own_profile_dir() -> Result<(PathBuf, String)> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile directory name is not UTF-8")?
        .to_string();
    let profile = if name == "debug" {
        "dev".to_string()
    } else {
        name
    };
    Ok((dir, profile))
}

/// The cargo target directory the running executable was built into.
pub fn target_dir() -> Result<PathBuf> {
    let (dir, _) = own_profile_dir()?;
    dir.parent()
        .map(Path::to_path_buf)
        .context("profile directory has no parent")
}

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root());
    cmd
}

fn run_cargo(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running cargo to build {what}"))?;
    if !out.status.success() {
        bail!(
            "building {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn build_guests() -> Result<PathBuf> {
    let target = target_dir()?.join("kiln-guests");
    let manifest = crate::workspace_root().join("tests/guests/Cargo.toml");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--target",
        "x86_64-unknown-none",
        "--manifest-path",
    ])
    .arg(&manifest)
    .arg("--target-dir")
    .arg(&target)
    // Flags meant for the host crates must not leak into the bare-metal build.
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_BUILD_TARGET");
    run_cargo(cmd, "the test guests")?;
    Ok(target.join("x86_64-unknown-none").join("release"))
}

/// Path of a test guest ELF, building the guests on first use. Panics (failing the test) with
/// the build output when the build fails.
pub fn guest(which: Guest) -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| build_guests().map_err(|e| format!("{e:#}")));
    match dir {
        Ok(dir) => dir.join(which.bin_name()),
        Err(e) => panic!("{e}"),
    }
}

/// Builds binary `bin` of workspace package `package` in the running test's own profile and
/// target directory (so it is the code under test) and returns its path; the environment
/// variable `prebuilt`, when set, names a binary to use instead.
pub fn workspace_bin(package: &str, bin: &str, prebuilt: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(prebuilt) {
        return Ok(PathBuf::from(p));
    }
    let (dir, profile) = own_profile_dir()?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", package, "--bin", bin, "--profile", &profile])
        .arg("--target-dir")
        .arg(dir.parent().context("profile directory has no parent")?);
    run_cargo(cmd, bin)?;
    Ok(dir.join(bin))
}

fn build_host_vmm() -> Result<PathBuf> {
    workspace_bin("host-vmm", "host-vmm", "KILN_HOST_VMM")
}

/// Path of the `host-vmm` binary, building it on first use (see the module docs).
pub fn host_vmm() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| build_host_vmm().map_err(|e| format!("{e:#}"))) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Result of one VM (or any child process) run.
#[derive(Debug)]
pub struct VmOutput {
    /// Exit status; `None` if the run timed out and the process was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl VmOutput {
    /// Exit code, if the process exited (not killed by a signal or the timeout).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// All `KILN-TEST key=value` pairs the guest printed (later values win).
    pub fn reports(&self) -> BTreeMap<String, String> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("KILN-TEST "))
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect()
    }

    /// Value of one `KILN-TEST key=value` report.
    pub fn get(&self, key: &str) -> Option<String> {
        self.reports().remove(key)
    }

    /// Value of a report, failing the calling test with the whole output when it is missing.
    pub fn expect(&self, key: &str) -> String {
        self.get(key)
            .unwrap_or_else(|| panic!("guest did not report `{key}`\n{}", self.describe()))
    }

    /// True when the guest printed the given bare `KILN-TEST <word>` line.
    pub fn saw(&self, word: &str) -> bool {
        self.reports().contains_key(word)
    }

    /// Human-readable summary for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Output collected by a reader thread, readable before the pipe ends.
type Drained = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

fn drain<R: Read + Send + 'static>(r: Option<R>) -> (Drained, std::thread::JoinHandle<()>) {
    let buf = Drained::default();
    let acc = buf.clone();
    let thread = std::thread::spawn(move || {
        let Some(mut r) = r else { return };
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            acc.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
    });
    (buf, thread)
}

/// How long the output pipes may stay open after the child is gone (a grandchild that kept
/// them open must not hang the test).
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Everything `drained` read, waiting at most until `deadline` for the pipe to end.
fn drained_text(
    (buf, thread): (Drained, std::thread::JoinHandle<()>),
    deadline: Instant,
) -> String {
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let bytes = buf.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `cmd` to completion, killing it after `timeout`. Stdin is closed; stdout and stderr are
/// captured.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<VmOutput> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for child")? {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    let grace = Instant::now() + DRAIN_GRACE;
    let stdout = drained_text(out, grace);
    let stderr = drained_text(err, grace);
    Ok(VmOutput {
        status,
        stdout,
        stderr,
        elapsed,
    })
}

/// Default timeout of one test VM run: generous, these guests finish in milliseconds.
pub const VM_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `host-vmm` with `args`, with [`VM_TIMEOUT`].
pub fn run_vmm<I, S>(args: I) -> VmOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(host_vmm());
    cmd.args(args);
    run_with_timeout(cmd, VM_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Boots `guest` under host-vmm with `kiln.test=<mode>` plus `extra` arguments.
pub fn boot_guest(guest: Guest, mode: &str, extra: &[&str]) -> VmOutput {
    let kernel = self::guest(guest);
    let mut args: Vec<std::ffi::OsString> = vec!["--kernel".into(), kernel.into()];
    let mut cmdline = format!("kiln.test={mode}");
    let mut rest = extra.iter();
    while let Some(a) = rest.next() {
        if *a == "--cmdline" {
            if let Some(v) = rest.next() {
                cmdline.push(' ');
                cmdline.push_str(v);
            }
        } else {
            args.push(a.into());
        }
    }
    args.push("--cmdline".into());
    args.push(cmdline.into());
    run_vmm(args)
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir, named after `tag`.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// Path of the directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// FNV-1a 64-bit hash, as the guest computes it in `blk-read` mode.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Byte at absolute disk offset `offset` of the pattern the guest writes in `blk-write` mode.
pub fn pattern_byte(offset: u64) -> u8 {
    ((offset.wrapping_mul(0x9e37_79b1) >> 11) as u8) ^ 0xa5
}

/// Deterministic pseudo-random bytes (xorshift64*), for disk images with recognisable content.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A host-vmm booting the PVH test guest in `kiln.test=<mode>`, its stdout read line by line and
/// its stderr collected; killed and reaped on drop. For tests that talk to a guest while it runs.
pub struct RunningVm {
    child: std::process::Child,
    /// Kills host-vmm after [`Self::LIFETIME`], so nothing waiting on this VM blocks forever.
    _watchdog: crate::bounded::Watchdog,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl RunningVm {
    /// How long [`RunningVm::wait_line`] waits for a line.
    pub const WAIT: Duration = Duration::from_secs(60);
    /// How long the VM may run at all before it is killed (these guests need seconds).
    pub const LIFETIME: Duration = Duration::from_secs(300);

    /// Starts host-vmm with `args` (before `--cmdline`) on the PVH guest.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S], mode: &str) -> RunningVm {
        use std::io::BufRead;
        let mut child = Command::new(host_vmm())
            .arg("--kernel")
            .arg(guest(Guest::Pvh))
            .args(args)
            .arg("--cmdline")
            .arg(format!("kiln.test={mode}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning host-vmm");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let acc = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            acc.lock().unwrap().push_str(&text);
        });
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.trim_end_matches('\r').to_string());
            }
        });
        RunningVm {
            _watchdog: crate::bounded::Watchdog::kill_after(&child, Self::LIFETIME, "host-vmm"),
            child,
            lines,
            stderr,
        }
    }

    /// The rest of the first stdout line starting with `prefix`; panics after [`Self::WAIT`].
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Self::WAIT;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
        }
        panic!(
            "no `{prefix}` line from the guest; stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }

    /// The host-vmm process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most [`Self::WAIT`], then kills it and panics) for the exit status (code, or
    /// 128 + signal as a shell shows it) and the stderr.
    pub fn wait(&mut self) -> (i32, String) {
        use std::os::unix::process::ExitStatusExt;
        let status = crate::bounded::wait_child(&mut self.child, Self::WAIT, "host-vmm");
        std::thread::sleep(Duration::from_millis(100));
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        (code, self.stderr.lock().unwrap().clone())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stdout: &str) -> VmOutput {
        VmOutput {
            status: None,
            stdout: stdout.to_string(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn reports_parse_serial_lines() {
        let out = output("noise\r\nKILN-TEST marker\r\nKILN-TEST a=1\r\nKILN-TEST cmdline=x=y z\nKILN-TEST a=2\n");
        assert!(out.saw("marker"));
        assert_eq!(out.get("a").as_deref(), Some("2"), "later values win");
        assert_eq!(
            out.get("cmdline").as_deref(),
            Some("x=y z"),
            "split at the first '='"
        );
        assert_eq!(out.get("noise"), None);
        assert!(!out.saw("done"));
    }

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn pseudo_random_is_deterministic_and_varied() {
        let a = pseudo_random(4096, 1);
        assert_eq!(a, pseudo_random(4096, 1));
        assert_ne!(a, pseudo_random(4096, 2));
        let distinct: std::collections::BTreeSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200, "bytes should cover most values");
    }

    #[test]
    fn run_with_timeout_kills_a_hanging_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let out = run_with_timeout(cmd, Duration::from_millis(200)).expect("spawn sleep");
        assert!(out.status.is_none(), "should have timed out");
        assert!(out.elapsed < Duration::from_secs(10));
    }
}
