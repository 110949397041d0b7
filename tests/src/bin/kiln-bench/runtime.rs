//! `kiln-bench runtime`: the OCI runtime end to end (issue 5, "Performance").
//!
//! `/bin/true` on a busybox bundle, N times, interleaved: `runc run` and `crun run` (Debian's),
//! then `kiln` for each backend asked for (`--vmm`, default: the one kiln picks on this host) as
//! a container engine drives it: `create --pid-file`, `start`, wait for the shim (the pid-file
//! process, which becomes our child because we are a child subreaper, as conmon is), `delete`.
//! Each CLI call is timed here; kiln's log adds the split inside `create` (image, VMM spawn,
//! agent ready, CreateContainer, stdio attach).
//!
//! - guest time: agent ready (VM boot) + CreateContainer + start -> shim exit (the process runs,
//!   its exit is reported, the VM is stopped). Under QEMU TCG all of it is emulated guest work.
//! - kiln's own overhead: the total minus guest time (CLI starts, image packing, shim, stdio
//!   attach, `start` and `delete`). Target (issue 5): under 30 ms; image packing of a cached
//!   image under 20 ms.
//!
//! Then, per backend, the host memory of an idle `sleep` container: VmRSS of the shim and every
//! process under it (VMM, vsock bridge), which includes the guest memory the VM touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_tests::guests::TempDir;
use kiln_tests::runtime::{busybox_bundle, kiln_bin, kiln_env};

/// How long one container may take before the run is abandoned.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// [`STEP_TIMEOUT`] for host-vmm on a PVM host (the agent is ready after about a minute, the
/// shim itself waits up to 300 s).
const PVM_STEP_TIMEOUT: Duration = Duration::from_secs(400);
/// How long an idle container settles before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

struct Bench {
    kiln: PathBuf,
    env: Vec<(String, PathBuf)>,
    /// On a PVM host: the PVM kernel flavour, the only one host-vmm runs there.
    pvm_kernel: Option<PathBuf>,
    scratch: TempDir,
    true_bundle: PathBuf,
    sleep_bundle: PathBuf,
    /// runc and crun get their own copy: they create mount points in the rootfs they run.
    peer_bundle: PathBuf,
}

/// One `kiln` container's phases, in ms.
#[derive(Default)]
struct KilnSample {
    create: f64,
    start: f64,
    run: f64,
    delete: f64,
    image: f64,
    spawned: f64,
    agent_ready: f64,
    create_rpc: f64,
    attach: f64,
}

impl KilnSample {
    fn total(&self) -> f64 {
        self.create + self.start + self.run + self.delete
    }
    fn guest(&self) -> f64 {
        self.agent_ready + self.create_rpc + self.run
    }
    fn overhead(&self) -> f64 {
        self.total() - self.guest()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bench {
    fn kiln(&self, vmm: Option<&str>, log: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kiln);
        c.envs(self.env.iter().cloned())
            .arg("--root")
            .arg(self.scratch.path().join("kiln-root"))
            .arg("--log")
            .arg(log)
            .arg("--debug");
        if let Some(v) = vmm {
            c.args(["--vmm", v]);
        }
        if let (Some(k), Some("host-vmm")) = (&self.pvm_kernel, vmm) {
            c.env("KILN_KERNEL", k);
        }
        c.args(args);
        c
    }

    /// Runs a kiln command to completion (bounded); fails with its stderr.
    fn kiln_ok(&self, vmm: Option<&str>, log: &Path, args: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        let err = self.scratch.path().join("kiln.stderr");
        let limit = match (&self.pvm_kernel, vmm) {
            (Some(_), Some("host-vmm")) => PVM_STEP_TIMEOUT,
            _ => STEP_TIMEOUT,
        };
        let (status, stderr) = run_bounded(self.kiln(vmm, log, args), &err, limit)
            .with_context(|| format!("kiln {args:?}"))?;
        ensure!(
            status.success(),
            "kiln {args:?} failed ({status}): {}",
            stderr.trim()
        );
        Ok(started.elapsed())
    }

    fn kiln_once(&self, vmm: Option<&str>, n: usize) -> Result<KilnSample> {
        let id = format!("bench-{n}");
        let log = self.scratch.path().join(format!("{id}.log"));
        let pid_file = self.scratch.path().join(format!("{id}.pid"));
        let bundle = self.true_bundle.to_str().context("bundle path")?;
        let pid_arg = pid_file.to_str().context("pid file path")?;
        let mut s = KilnSample {
            create: millis(self.kiln_ok(
                vmm,
                &log,
                &["create", "--bundle", bundle, "--pid-file", pid_arg, &id],
            )?),
            ..KilnSample::default()
        };
        let shim: i32 = std::fs::read_to_string(&pid_file)
            .context("reading the pid file")?
            .trim()
            .parse()
            .context("parsing the pid file")?;
        s.start = millis(self.kiln_ok(vmm, &log, &["start", &id])?);
        let t = Instant::now();
        let status = wait_pid(shim, STEP_TIMEOUT)?;
        s.run = millis(t.elapsed());
        ensure!(status == 0, "the shim exited with status {status}");
        s.delete = millis(self.kiln_ok(vmm, &log, &["delete", &id])?);
        let text = std::fs::read_to_string(&log).context("reading kiln's log")?;
        let t = parse_timings(&text, &id);
        let get = |k: &str| {
            t.get(k)
                .copied()
                .with_context(|| format!("no `{k}` timing for {id} in {}", log.display()))
        };
        s.image = get("image")?;
        s.spawned = get("VMM spawned")?;
        s.agent_ready = get("agent ready")?;
        s.create_rpc = get("CreateContainer")?;
        s.attach = get("stdio attach")?;
        Ok(s)
    }

    /// Host memory (KiB of VmRSS) of one idle `sleep` container and the backend kiln used.
    fn idle_memory(&self, vmm: Option<&str>) -> Result<(u64, String)> {
        let id = "bench-idle";
        let log = self.scratch.path().join("idle.log");
        let pid_file = self.scratch.path().join("idle.pid");
        let bundle = self.sleep_bundle.to_str().context("bundle path")?;
        let pid_arg = pid_file.to_str().context("pid file path")?;
        self.kiln_ok(
            vmm,
            &log,
            &["create", "--bundle", bundle, "--pid-file", pid_arg, id],
        )?;
        let measured = (|| {
            self.kiln_ok(vmm, &log, &["start", id])?;
            std::thread::sleep(IDLE_SETTLE);
            let shim: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
            let rss = tree_rss_kib(shim);
            let backend = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    l.split(" created in a ")
                        .nth(1)
                        .and_then(|r| r.split(" VM").next())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "?".into());
            anyhow::Ok((rss, backend))
        })();
        let _ = self.kiln_ok(vmm, &log, &["delete", "--force", id]);
        let _ = wait_pid_quiet(&pid_file);
        measured
    }
}

/// Reaps the idle container's shim if it is our child (after `delete --force`).
fn wait_pid_quiet(pid_file: &Path) -> Result<()> {
    let pid: i32 = std::fs::read_to_string(pid_file)?.trim().parse()?;
    let _ = wait_pid(pid, Duration::from_secs(10));
    Ok(())
}

/// `timing` numbers of container `id` in kiln's log: `"image" -> ms`, ...
fn parse_timings(log: &str, id: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(id)) {
        // Lines look like `... msg="timing ID: image 7 ms (cache hit)"` or
        // `... timing: VMM spawned 11 ms, agent ready 1048 ms"`.
        let Some(rest) = line
            .split_once(&format!("timing {id}: "))
            .or_else(|| line.split_once("timing: "))
            .map(|(_, r)| r)
        else {
            continue;
        };
        for part in rest.split(", ") {
            let words: Vec<&str> = part
                .split_whitespace()
                .map(|w| w.trim_end_matches('"'))
                .collect();
            if let Some(ms) = words.iter().position(|w| *w == "ms") {
                if ms >= 1 {
                    if let Ok(v) = words[ms - 1].parse::<f64>() {
                        let key = words[..ms - 1].join(" ");
                        out.insert(key, v);
                    }
                }
            }
        }
    }
    out
}

/// Waits for a child process (the shim, adopted as a subreaper) and returns its exit code.
fn wait_pid(pid: i32, timeout: Duration) -> Result<i32> {
    let started = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a pid with a valid pointer to a local int.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status));
            }
            return Ok(128 + libc::WTERMSIG(status));
        }
        if rc < 0 {
            bail!(
                "waitpid({pid}): {} (is it our child?)",
                std::io::Error::last_os_error()
            );
        }
        if started.elapsed() > timeout {
            bail!("process {pid} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs `cmd` with stdin and stdout on /dev/null and stderr in the file `err`, kills it after
/// `timeout`, and returns its status and stderr. Files, not pipes: `kiln create` hands its stdio
/// to the shim, which keeps it open as the container's, so a pipe would not end with `create`.
fn run_bounded(
    mut cmd: Command,
    err: &Path,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    let file = std::fs::File::create(err).with_context(|| format!("creating {}", err.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    Ok((status, std::fs::read_to_string(err).unwrap_or_default()))
}

/// Sum of VmRSS (KiB) of `root` and all its descendants.
fn tree_rss_kib(root: u32) -> u64 {
    let mut parent = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may contain spaces: fields start after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let in_tree = |mut p: u32| {
        for _ in 0..64 {
            if p == root {
                return true;
            }
            match parent.get(&p) {
                Some(&pp) if pp != 0 => p = pp,
                _ => return false,
            }
        }
        false
    };
    parent
        .keys()
        .filter(|&&p| in_tree(p))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// `runc`/`crun` `run` of the same bundle; `Err` with the runtime's own words if it fails.
fn oci_run(bin: &str, root: &Path, bundle: &Path, id: &str) -> Result<f64> {
    let started = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id);
    let (status, stderr) = run_bounded(cmd, &root.with_extension("stderr"), STEP_TIMEOUT)?;
    let ms = millis(started.elapsed());
    if !status.success() {
        bail!(
            "{}",
            stderr
                .lines()
                .last()
                .unwrap_or("failed without a message")
                .trim()
        );
    }
    let _ = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(["delete", "--force", id])
        .output();
    Ok(ms)
}

fn med(v: &[f64]) -> f64 {
    super::stats(v.to_vec()).0
}

/// Runs `kiln-bench runtime ARGS`.
pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let mut vmms: Vec<Option<String>> = vec![None];
    let super::CommonArgs { runs, out } = super::parse_args(args, 10, |flag, rest| {
        if flag != "--vmm" {
            return false;
        }
        let list = rest.next().unwrap_or_else(|| super::usage());
        vmms = list.split(',').map(|v| Some(v.to_string())).collect();
        true
    });
    // The shim is started by `kiln create` in a new session and outlives it; as a subreaper we
    // adopt it and can wait for it, as conmon and containerd's shim do.
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    ensure!(rc == 0, "PR_SET_CHILD_SUBREAPER failed");

    let scratch = TempDir::new("kiln-bench-runtime");
    let true_bundle = scratch.path().join("true");
    let sleep_bundle = scratch.path().join("sleep");
    let peer_bundle = scratch.path().join("peer");
    for (dir, args) in [
        (&true_bundle, &["/bin/true"][..]),
        (&sleep_bundle, &["sleep", "1000"][..]),
        (&peer_bundle, &["/bin/true"][..]),
    ] {
        std::fs::create_dir_all(dir)?;
        busybox_bundle(dir, args);
    }
    let bench = Bench {
        kiln: kiln_bin(),
        env: kiln_env(),
        pvm_kernel: (Path::new("/sys/module/kvm_pvm").exists()
            && vmms.iter().any(|v| v.as_deref() == Some("host-vmm")))
        .then(kiln_tests::kernel::vmlinux_pvm),
        scratch,
        true_bundle,
        sleep_bundle,
        peer_bundle,
    };

    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut peers: Vec<(&str, Vec<f64>, Option<String>)> =
        vec![("runc", Vec::new(), None), ("crun", Vec::new(), None)];
    let mut kiln: Vec<Vec<KilnSample>> = vmms.iter().map(|_| Vec::new()).collect();
    // One warm-up container per backend fills the image cache (the benchmark measures a hit).
    for vmm in &vmms {
        bench
            .kiln_once(vmm.as_deref(), 1_000_000)
            .context("warm-up container")?;
    }
    eprintln!("kiln-bench: {runs} interleaved runs ...");
    for i in 0..runs {
        for (name, samples, failed) in peers.iter_mut() {
            if failed.is_some() {
                continue;
            }
            let root = bench.scratch.path().join(format!("{name}-root"));
            match oci_run(
                name,
                &root,
                &bench.peer_bundle,
                &format!("bench-{name}-{i}"),
            ) {
                Ok(ms) => samples.push(ms),
                Err(e) => *failed = Some(format!("{e:#}")),
            }
        }
        for (j, vmm) in vmms.iter().enumerate() {
            let s = bench
                .kiln_once(vmm.as_deref(), i)
                .with_context(|| format!("kiln run {i} ({})", vmm.as_deref().unwrap_or("auto")))?;
            kiln[j].push(s);
        }
    }
    let mut idle = Vec::new();
    for vmm in &vmms {
        idle.push(
            bench
                .idle_memory(vmm.as_deref())
                .context("idle container")?,
        );
    }

    let mut lines = vec![
        "| | median ms | min ms | max ms |".to_string(),
        "|---|---:|---:|---:|".to_string(),
    ];
    let row = |label: &str, v: &[f64]| {
        let (m, lo, hi) = super::stats(v.to_vec());
        format!("| {label} | {m:.1} | {lo:.1} | {hi:.1} |")
    };
    for (name, samples, failed) in &peers {
        match failed {
            Some(why) if samples.is_empty() => {
                lines.push(format!("| {name} `run` | fails here: {why} | | |"))
            }
            _ => lines.push(row(&format!("{name} `run`"), samples)),
        }
    }
    let mut verdicts = Vec::new();
    for ((vmm, samples), (rss, backend)) in vmms.iter().zip(&kiln).zip(&idle) {
        let col = |f: fn(&KilnSample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
        let tag = format!("kiln ({backend})");
        lines.push(row(
            &format!("**{tag} total** (create + start + run + delete)"),
            &col(KilnSample::total),
        ));
        for (label, f) in [
            ("create (CLI)", (|s| s.create) as fn(&KilnSample) -> f64),
            ("  image (cache hit)", |s| s.image),
            ("  VMM spawned", |s| s.spawned),
            ("  agent ready (guest boot, from VMM launch)", |s| {
                s.agent_ready
            }),
            ("  CreateContainer (agent round trip)", |s| s.create_rpc),
            ("  stdio attach", |s| s.attach),
            ("start (CLI)", |s| s.start),
            ("start -> shim exit (process, exit report, VM stop)", |s| {
                s.run
            }),
            ("delete (CLI)", |s| s.delete),
            ("guest time (agent ready + CreateContainer + run)", |s| {
                s.guest()
            }),
            ("**kiln's own overhead** (total - guest time)", |s| {
                s.overhead()
            }),
        ] {
            lines.push(row(&format!("{tag}: {label}"), &col(f)));
        }
        let overhead = med(&col(KilnSample::overhead));
        let image = med(&col(|s| s.image));
        verdicts.push(format!(
            "- {tag}: own overhead median {overhead:.1} ms (target < 30 ms): {}; cached image \
             {image:.1} ms (target < 20 ms): {}; idle container {:.1} MiB of host memory \
             (VmRSS of the shim and everything under it){}",
            if overhead < 30.0 { "met" } else { "NOT met" },
            if image < 20.0 { "met" } else { "NOT met" },
            *rss as f64 / 1024.0,
            if vmm.as_deref() == Some("host-vmm") || backend == "host-vmm" {
                format!(
                    " (target < 64 MiB: {})",
                    if *rss < 64 * 1024 { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            }
        ));
    }
    let table = lines.join("\n");
    let verdict = verdicts.join("\n");
    println!("{table}\n\n{verdict}");
    if let Some(path) = out {
        let date = super::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let root = kiln_tests::workspace_root().to_string_lossy().into_owned();
        let commit = super::cmd_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
        let doc = format!(
            "## Runtime: kiln vs runc and crun, `/bin/true` on busybox\n\n\
             Written by `cargo run --release -p kiln-tests --bin kiln-bench -- runtime --runs \
             {runs}` (source: `tests/src/bin/kiln-bench/runtime.rs`).\n\n\
             - Date: {date}; commit {commit}; load average before: {load}\n\
             - Machine: {machine}\n\
             - {runs} runs per runtime, interleaved, after one warm-up per backend (the image \
             cache then hits). kiln is driven as an engine drives it: `create --pid-file`, \
             `start`, wait for the shim (as its subreaper), `delete`; the split inside `create` \
             comes from kiln's `--debug` log. Guest time is emulated guest work under QEMU TCG.\n\
             - Idle memory: one `sleep 1000` container, {} s after start.\n\n\
             {table}\n\n{verdict}\n",
            IDLE_SETTLE.as_secs(),
            load = load_before
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            machine = super::machine(),
        );
        super::write_section(&path, "runtime", &doc)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_read_from_kiln_log_lines() {
        let log = r#"time="t" level=info msg="timing c1: image 7 ms (cache hit)"
time="t" level=info msg="timing c1: CreateContainer 96 ms (mostly guest work), stdio attach 12 ms"
time="t" level=info msg="container c1 created in a qemu-tcg VM (256 MiB, 1 vCPU), guest pid 33; timing: VMM spawned 11 ms, agent ready 1048 ms"
time="t" level=info msg="timing c2: image 99 ms (built)"
"#;
        let t = parse_timings(log, "c1");
        assert_eq!(t["image"], 7.0);
        assert_eq!(t["CreateContainer"], 96.0);
        assert_eq!(t["stdio attach"], 12.0);
        assert_eq!(t["VMM spawned"], 11.0);
        assert_eq!(t["agent ready"], 1048.0);
        assert_eq!(t.len(), 5);
        let s = KilnSample {
            create: 1200.0,
            start: 10.0,
            run: 50.0,
            delete: 5.0,
            agent_ready: 1000.0,
            create_rpc: 100.0,
            ..KilnSample::default()
        };
        assert_eq!(s.total(), 1265.0);
        assert_eq!(s.guest(), 1150.0);
        assert_eq!(s.overhead(), 115.0);
    }
}
