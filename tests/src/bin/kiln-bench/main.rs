//! kiln-bench: kiln's benchmarks, each side by side with its peer in one run (absolute times on
//! these shared machines are noisy, ratios are not).
//!
//! - `kiln-bench boot`: host-vmm vs QEMU microvm booting the bare-metal test guest ([`boot`]).
//! - `kiln-bench runtime`: `kiln` create/start/delete of `/bin/true` vs runc and crun, split
//!   into its phases, plus the host memory of an idle container ([`runtime`]).
//!
//! Each writes its own section of `docs/benchmarks.md` (between `<!-- kiln-bench NAME -->`
//! markers; the rest of the page is left alone) unless `--no-write`. Build in release mode:
//! `cargo run --release -p kiln-tests --bin kiln-bench -- boot|runtime [--runs N]`.

mod boot;
mod runtime;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

fn usage() -> ! {
    eprintln!(
        "usage: kiln-bench boot|runtime [--runs N (>= 1)] [--out PATH | --no-write]\n\
         runtime also takes [--vmm NAME[,NAME...]] (kiln backends; default: what kiln picks)"
    );
    std::process::exit(1);
}

/// The options every benchmark takes.
struct CommonArgs {
    /// `--runs N` (at least 1).
    runs: usize,
    /// Where to write the section: docs/benchmarks.md, `--out PATH`, or none with `--no-write`.
    out: Option<PathBuf>,
}

/// Parses `--runs`, `--out` and `--no-write`; any other flag goes to `extra` with the remaining
/// arguments, which returns false for a flag it does not know either (then: usage).
fn parse_args(
    mut args: impl Iterator<Item = String>,
    default_runs: usize,
    mut extra: impl FnMut(&str, &mut dyn Iterator<Item = String>) -> bool,
) -> CommonArgs {
    let mut common = CommonArgs {
        runs: default_runs,
        out: Some(kiln_tests::workspace_root().join("docs/benchmarks.md")),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                common.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n >= 1)
                    .unwrap_or_else(|| usage())
            }
            "--out" => common.out = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "--no-write" => common.out = None,
            flag => {
                if !extra(flag, &mut args) {
                    usage()
                }
            }
        }
    }
    common
}

/// median, min, max
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn cmd_output(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (PVM, software KVM)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "unknown KVM"
    };
    format!("{cpu}, {cores} CPUs, Linux {}, {kvm}", kernel.trim())
}

/// Replaces (or appends) the section `name` of the markdown file `path`: the text between
/// `<!-- kiln-bench NAME -->` and `<!-- /kiln-bench NAME -->`. Other sections stay as they are.
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let (open, close) = (
        format!("<!-- kiln-bench {name} -->"),
        format!("<!-- /kiln-bench {name} -->"),
    );
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &old[..a], &old[b + close.len()..])
        }
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    eprintln!("kiln-bench: wrote the {name} section of {}", path.display());
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("boot") => boot::main(args),
        Some("runtime") => runtime::main(args),
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let dir = std::env::temp_dir().join(format!("kiln-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.md");
        std::fs::write(&p, "# B\n\nhand-written\n").unwrap();
        write_section(&p, "boot", "one").unwrap();
        write_section(&p, "runtime", "two").unwrap();
        write_section(&p, "boot", "three\n").unwrap();
        let got = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            got,
            "# B\n\nhand-written\n<!-- kiln-bench boot -->\nthree\n<!-- /kiln-bench boot -->\n\
             <!-- kiln-bench runtime -->\ntwo\n<!-- /kiln-bench runtime -->\n"
        );
        let (m, lo, hi) = stats(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((m, lo, hi), (2.5, 1.0, 10.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
