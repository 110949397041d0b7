//! `kiln-bench boot`: host-vmm against QEMU microvm on the bare-metal test guest (issue 2).
//!
//! `kiln-bench boot [--runs N] [--out PATH | --no-write]` boots the PVH test guest
//! (`tests/guests`, `kiln.test=marker`) N times under host-vmm and under QEMU `-M microvm`
//! (same guest, 128 MiB, 1 vCPU), interleaved, and measures:
//! - start -> marker: from just before spawning the VMM until the guest's `KILN-TEST marker` line
//!   arrives on the VMM's stdout pipe;
//! - start -> exit: until the VMM process has exited (host-vmm: i8042 reset; QEMU microvm has no
//!   i8042, so its guest triple-faults with `kiln.exit=triple` and `-no-reboot` makes QEMU exit);
//! - CPU time (user + system) the VMM process used for one boot;
//! - VmRSS / RssAnon of the VMM process while the guest idles (`kiln.test=idle`: marker, then
//!   halt), sampled from /proc/PID/status 100 ms after the marker, then the VMM is killed.
//!
//! Prints a median/min/max table and the host-vmm/QEMU ratio, and writes it (with date and
//! machine) into its section of `docs/benchmarks.md` unless `--no-write`. Build it in release mode:
//! `cargo run --release -p kiln-tests --bin kiln-bench -- boot`; host-vmm is then built in release
//! mode too (see `kiln_tests::guests`).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_tests::guests::{guest, host_vmm, Guest};

const MEM_MIB: u32 = 128;
const VCPUS: u32 = 1;
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_SETTLE: Duration = Duration::from_millis(100);
const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    HostVmm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::HostVmm => "host-vmm",
            Vmm::Qemu => "QEMU microvm",
        }
    }
}

struct Setup {
    host_vmm: PathBuf,
    kernel: PathBuf,
}

impl Setup {
    fn command(&self, vmm: Vmm, mode: &str) -> Command {
        match vmm {
            Vmm::HostVmm => {
                let mut c = Command::new(&self.host_vmm);
                c.arg("--kernel")
                    .arg(&self.kernel)
                    .args(["--mem-mib", &MEM_MIB.to_string()])
                    .args(["--vcpus", &VCPUS.to_string()])
                    .args(["--cmdline", &format!("kiln.test={mode}")]);
                c
            }
            Vmm::Qemu => {
                let mut c = Command::new(QEMU);
                c.args(["-M", "microvm,acpi=off", "-accel", "kvm"])
                    .args(["-cpu", "host,-arch-capabilities"])
                    .args(["-m", &MEM_MIB.to_string(), "-smp", &VCPUS.to_string()])
                    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
                    .args(["-serial", "stdio", "-kernel"])
                    .arg(&self.kernel)
                    .args(["-append", &format!("kiln.test={mode} kiln.exit=triple")]);
                c
            }
        }
    }
}

/// One timed boot.
struct BootSample {
    marker: Duration,
    exit: Duration,
    /// User + system CPU time of the VMM process (all its threads).
    cpu: Duration,
}

/// Total user + system CPU time of all waited-for children of this process so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own; no other effects.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Lines of a child's stdout with the time each arrived.
type Lines = mpsc::Receiver<(Instant, String)>;

/// Spawns `cmd` with stdout piped; returns the child, its start time and its stdout lines.
fn spawn_lines(mut cmd: Command) -> Result<(std::process::Child, Instant, Lines)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Ok((child, start, rx))
}

fn stderr_of(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Waits for the marker line; kills the child on timeout.
fn wait_marker(child: &mut std::process::Child, start: Instant, rx: &Lines) -> Result<Duration> {
    loop {
        let left = RUN_TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok((t, line)) if line.contains("KILN-TEST marker") => return Ok(t - start),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "no marker within {RUN_TIMEOUT:?}: {}",
                    stderr_of(child).trim()
                );
            }
        }
    }
}

fn boot_once(setup: &Setup, vmm: Vmm) -> Result<BootSample> {
    // Children are run one at a time, so the growth of RUSAGE_CHILDREN is this VMM's CPU time.
    let cpu_before = children_cpu();
    let (mut child, start, rx) = spawn_lines(setup.command(vmm, "marker"))?;
    let marker = wait_marker(&mut child, start, &rx)?;
    loop {
        if let Some(status) = child.try_wait()? {
            let exit = start.elapsed();
            ensure!(
                status.success(),
                "{} exited with {status}: {}",
                vmm.name(),
                stderr_of(&mut child).trim()
            );
            let cpu = children_cpu().saturating_sub(cpu_before);
            return Ok(BootSample { marker, exit, cpu });
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not exit within {RUN_TIMEOUT:?}", vmm.name());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Memory of the VMM process while the guest idles, in KiB: (VmRSS, RssAnon).
fn idle_rss(setup: &Setup, vmm: Vmm) -> Result<(u64, u64)> {
    let (mut child, start, rx) = spawn_lines(setup.command(vmm, "idle"))?;
    wait_marker(&mut child, start, &rx)?;
    std::thread::sleep(IDLE_SETTLE);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let status = status.context("reading /proc/PID/status of the idle VMM")?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/PID/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

#[derive(Default)]
struct Series {
    marker_ms: Vec<f64>,
    exit_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    rss_kib: Vec<f64>,
    anon_kib: Vec<f64>,
}

fn row(label: &str, unit: &str, a: &[f64], b: &[f64], digits: usize) -> String {
    let (am, amin, amax) = super::stats(a.to_vec());
    let (bm, bmin, bmax) = super::stats(b.to_vec());
    format!(
        "| {label} ({unit}) | {am:.d$} | {amin:.d$} | {amax:.d$} | {bm:.d$} | {bmin:.d$} | {bmax:.d$} | {:.2}x |",
        am / bm,
        d = digits
    )
}

/// Runs `kiln-bench boot ARGS`.
pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let super::CommonArgs { runs, out } = super::parse_args(args, 30, |_, _| false);
    let setup = Setup {
        host_vmm: host_vmm(),
        kernel: guest(Guest::Pvh),
    };
    let qemu_version = super::cmd_output(QEMU, &["--version"]);
    ensure!(!qemu_version.is_empty(), "{QEMU} not found or not runnable");
    let qemu_version = qemu_version.lines().next().unwrap_or_default().to_string();

    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut host = Series::default();
    let mut qemu = Series::default();
    eprintln!("kiln-bench: {runs} interleaved boots per VMM ...");
    for i in 0..runs {
        // Alternate which VMM goes first, so neither always runs on a warmer cache.
        let order = if i % 2 == 0 {
            [Vmm::HostVmm, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::HostVmm]
        };
        for vmm in order {
            let s = boot_once(&setup, vmm).with_context(|| format!("{} boot {i}", vmm.name()))?;
            let series = if vmm == Vmm::HostVmm {
                &mut host
            } else {
                &mut qemu
            };
            series.marker_ms.push(s.marker.as_secs_f64() * 1e3);
            series.exit_ms.push(s.exit.as_secs_f64() * 1e3);
            series.cpu_ms.push(s.cpu.as_secs_f64() * 1e3);
        }
    }
    eprintln!("kiln-bench: {runs} idle runs per VMM for memory ...");
    for i in 0..runs {
        for vmm in [Vmm::HostVmm, Vmm::Qemu] {
            let (rss, anon) =
                idle_rss(&setup, vmm).with_context(|| format!("{} idle {i}", vmm.name()))?;
            let series = if vmm == Vmm::HostVmm {
                &mut host
            } else {
                &mut qemu
            };
            series.rss_kib.push(rss as f64);
            series.anon_kib.push(anon as f64);
        }
    }

    let table = [
        "| metric | host-vmm median | min | max | QEMU median | min | max | host-vmm / QEMU |"
            .to_string(),
        "|---|---:|---:|---:|---:|---:|---:|---:|".to_string(),
        row("start -> marker", "ms", &host.marker_ms, &qemu.marker_ms, 2),
        row("start -> exit", "ms", &host.exit_ms, &qemu.exit_ms, 2),
        row("VMM CPU per boot", "ms", &host.cpu_ms, &qemu.cpu_ms, 2),
        row("VmRSS idle", "KiB", &host.rss_kib, &qemu.rss_kib, 0),
        row("RssAnon idle", "KiB", &host.anon_kib, &qemu.anon_kib, 0),
    ]
    .join("\n");
    let (hm, _, _) = super::stats(host.marker_ms.clone());
    let (qm, _, _) = super::stats(qemu.marker_ms.clone());
    let (hrss, _, hrss_max) = super::stats(host.rss_kib.clone());
    let ratio_ok = hm <= 0.25 * qm;
    let rss_ok = hrss_max < 4096.0;
    let verdict = format!(
        "- start -> marker: host-vmm median {hm:.2} ms = {:.2}x QEMU's {qm:.2} ms (target <= 0.25x): {}\n\
         - host-vmm VmRSS while idle: median {hrss:.0} KiB, max {hrss_max:.0} KiB (target < 4096 KiB): {}",
        hm / qm,
        if ratio_ok { "met" } else { "NOT met" },
        if rss_ok { "met" } else { "NOT met" },
    );
    println!("{table}\n\n{verdict}");

    if let Some(path) = out {
        let date = super::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let root = kiln_tests::workspace_root().to_string_lossy().into_owned();
        let commit = super::cmd_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
        let doc = format!(
            "## Boot: host-vmm vs QEMU microvm, bare-metal test guest\n\n\
             Written by `cargo run --release -p kiln-tests --bin kiln-bench -- boot --runs {runs}` \
             (source: `tests/src/bin/kiln-bench/boot.rs`).\n\n\
             - Date: {date}; commit {commit}{dirty}\n\
             - Load average before the run: {load} (this machine's 2 cores are shared; the spread \
             between min and max is mostly other work)\n\
             - Machine: {machine}\n\
             - QEMU: {qemu_version}\n\
             - Guest: `tests/guests` `guest-pvh` (PVH entry), `kiln.test=marker`; {MEM_MIB} MiB, \
             {VCPUS} vCPU, no disk, for both VMMs; {runs} runs each, interleaved.\n\
             - host-vmm: `host-vmm --kernel guest-pvh --mem-mib {MEM_MIB} --vcpus {VCPUS} \
             --cmdline kiln.test=marker`; the guest exits with the i8042 reset.\n\
             - QEMU: `{QEMU} -M microvm,acpi=off -accel kvm -cpu host,-arch-capabilities -m {MEM_MIB} \
             -smp {VCPUS} -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel \
             guest-pvh -append \"kiln.test=marker kiln.exit=triple\"` (microvm has no i8042: the guest \
             triple-faults and `-no-reboot` ends QEMU).\n\
             - start -> marker: spawn until the `KILN-TEST marker` line is read from the VMM's stdout \
             pipe (the guest prints it first thing). start -> exit: until the process has exited. VMM CPU per boot: user + system \
             CPU time of the VMM process and all its threads (getrusage of the waited child), which \
             on PVM includes the vCPU threads' time in the instruction emulator.\n\
             - Memory: VmRSS and RssAnon from /proc/PID/status of the VMM, {} ms after the marker of \
             an idle guest (`kiln.test=idle`: marker, then `hlt`); guest pages the guest touched count.\n\n\
             {table}\n\n\
             Targets (issue 2):\n\n{verdict}\n\n\
             Notes: most of host-vmm's marker -> exit time is not the VMM's own work: `strace -f -tt` \
             shows the guest's remaining checks (emulated ring-0 code on PVM) and then the host \
             kernel tearing the VM down when host-vmm closes the KVM VM fd (tens of ms on PVM). \
             QEMU pays the same teardown at exit.\n",
            IDLE_SETTLE.as_millis(),
            machine = super::machine(),
            load = load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            dirty = if super::cmd_output("git", &["-C", &root, "status", "--porcelain", "host-vmm"]).is_empty() {
                ""
            } else {
                " (host-vmm with uncommitted changes)"
            },
        );
        super::write_section(&path, "boot", &doc)?;
    }
    Ok(())
}
