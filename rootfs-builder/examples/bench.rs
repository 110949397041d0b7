//! Build-time benchmark: `cargo run --release -p rootfs-builder --example bench -- INPUT
//! [GUEST_INIT] [RUNS]` prints a table of build time and image size for ext4, EROFS and EROFS
//! with LZ4HC, and the time of cached rebuilds (copy to an output path, or the cache path
//! itself). Times are medians of RUNS (default 5) runs.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rootfs_builder::{build_image, BuildOptions, Format, Layout};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: bench INPUT [GUEST_INIT] [RUNS]"))?,
    );
    let guest_init = args.next().map(PathBuf::from);
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(5);
    let work = tempfile::tempdir()?;
    let layout = match guest_init {
        Some(g) => Layout::Agent { guest_init: g },
        None => Layout::Plain,
    };
    println!("input: {}  ({runs} runs, median)", input.display());
    println!(
        "{:<22} {:>10} {:>14} {:>14}",
        "format", "build ms", "size bytes", "allocated KiB"
    );
    for (name, format, compression) in [
        ("ext4", Format::Ext4, None),
        ("erofs", Format::Erofs, None),
        ("erofs lz4hc", Format::Erofs, Some("lz4hc")),
    ] {
        let mut times = Vec::new();
        let mut last = None;
        for i in 0..runs {
            let out = work.path().join(format!("{i}.{}", format.extension()));
            let mut o = BuildOptions::new(&input, Some(out.clone()));
            o.format = format;
            o.layout = layout.clone();
            o.erofs_compression = compression.map(str::to_string);
            o.cache = None;
            let t = Instant::now();
            let built = build_image(&o)?;
            times.push(t.elapsed());
            let allocated = std::fs::metadata(&out)?.blocks() / 2;
            last = Some((built.size, allocated));
            std::fs::remove_file(&out)?;
        }
        let (size, allocated) = last.unwrap_or_default();
        println!(
            "{name:<22} {:>10.1} {size:>14} {allocated:>14}",
            median(times).as_secs_f64() * 1e3
        );
    }
    let cache = work.path().join("cache");
    let mut o = BuildOptions::new(&input, Some(work.path().join("first.ext4")));
    o.layout = layout;
    o.cache = Some(cache);
    let t = Instant::now();
    build_image(&o)?;
    let first = t.elapsed();
    let mut copy = Vec::new();
    let mut path_only = Vec::new();
    for i in 0..runs {
        o.out = Some(work.path().join(format!("cached{i}.ext4")));
        let t = Instant::now();
        let b = build_image(&o)?;
        copy.push(t.elapsed());
        anyhow::ensure!(b.cache_hit, "expected a cache hit");
        o.out = None;
        let t = Instant::now();
        let b = build_image(&o)?;
        path_only.push(t.elapsed());
        anyhow::ensure!(b.cache_hit, "expected a cache hit");
    }
    println!("ext4 via cache: first build {:.1} ms, cached rebuild {:.1} ms (copy to --out), {:.1} ms (cache path)",
        first.as_secs_f64() * 1e3,
        median(copy).as_secs_f64() * 1e3,
        median(path_only).as_secs_f64() * 1e3);
    Ok(())
}
