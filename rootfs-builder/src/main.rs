//! rootfs-builder: command-line front end of the `rootfs_builder` library.
//!
//! `rootfs-builder build --from PATH --out IMG [...]` builds a block image;
//! `rootfs-builder bundle --image REF --out DIR [...]` builds an OCI runtime bundle.
//! Errors are printed as one line (the whole cause chain) and exit with status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rootfs_builder::{BuildOptions, BundleOptions, Format, InputKind, Layout};

#[derive(Parser)]
#[command(
    name = "rootfs-builder",
    version,
    about = "Build kiln block images from container images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Ext4,
    Erofs,
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// /kiln/guest-init plus the container under /rootfs (needs --guest-init).
    Agent,
    /// The container's files at the image root.
    Plain,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Auto,
    Dir,
    Tarball,
    OciLayout,
    OciArchive,
    DockerArchive,
}

#[derive(clap::Args)]
struct ImageArgs {
    /// Image format.
    #[arg(long, value_enum, default_value = "ext4")]
    format: FormatArg,
    /// ext4 image size (e.g. 512M, 2G); default: content plus headroom.
    #[arg(long)]
    size: Option<String>,
    /// The static guest-init binary, installed as /kiln/guest-init.
    #[arg(long)]
    guest_init: Option<PathBuf>,
    /// Image layout; default: agent with --guest-init, plain without.
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// EROFS compressor (lz4, lz4hc); default uncompressed.
    #[arg(long)]
    erofs_compression: Option<String>,
    /// Input kind; default: detected from the file.
    #[arg(long, value_enum, default_value = "auto")]
    input_type: KindArg,
}

#[derive(Subcommand)]
enum Command {
    /// Build a block image.
    Build {
        /// Input: directory, rootfs tarball, OCI layout, oci-archive or docker-archive.
        #[arg(long)]
        from: PathBuf,
        /// Output image path.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        image: ImageArgs,
        /// Cache directory.
        #[arg(long, default_value = rootfs_builder::DEFAULT_CACHE_DIR, conflicts_with = "no_cache")]
        cache: PathBuf,
        /// Do not use the cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Remove least recently used cached images until the cache fits in SIZE.
    Prune {
        /// Cache directory.
        #[arg(long, default_value = rootfs_builder::DEFAULT_CACHE_DIR)]
        cache: PathBuf,
        /// Disk space the cached images may keep (e.g. 10G, 0 to empty the cache).
        #[arg(long)]
        max_size: String,
    },
    /// Build an OCI runtime bundle (config.json, rootfs/, block image).
    Bundle {
        /// The image: any input `build --from` accepts.
        #[arg(long)]
        image: PathBuf,
        /// Bundle directory (created; must be empty if it exists).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        opts: ImageArgs,
        /// Command replacing the image's Cmd (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

struct Common {
    format: Format,
    size: Option<u64>,
    layout: Layout,
    kind: InputKind,
    erofs_compression: Option<String>,
}

fn common(a: ImageArgs) -> Result<Common> {
    let size = match &a.size {
        Some(s) => Some(rootfs_builder::parse_size(s).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let layout = match (a.layout, a.guest_init) {
        (Some(LayoutArg::Agent) | None, Some(guest_init)) => Layout::Agent { guest_init },
        (Some(LayoutArg::Agent), None) => bail!("--layout agent needs --guest-init PATH"),
        (Some(LayoutArg::Plain), Some(_)) => {
            bail!("--layout plain has no agent: drop --guest-init")
        }
        (Some(LayoutArg::Plain) | None, None) => Layout::Plain,
    };
    Ok(Common {
        format: match a.format {
            FormatArg::Ext4 => Format::Ext4,
            FormatArg::Erofs => Format::Erofs,
        },
        size,
        layout,
        kind: match a.input_type {
            KindArg::Auto => InputKind::Auto,
            KindArg::Dir => InputKind::Dir,
            KindArg::Tarball => InputKind::Tarball,
            KindArg::OciLayout => InputKind::OciLayout,
            KindArg::OciArchive => InputKind::OciArchive,
            KindArg::DockerArchive => InputKind::DockerArchive,
        },
        erofs_compression: a.erofs_compression,
    })
}

fn run(cli: Cli) -> Result<()> {
    let progress = rootfs_builder::progress::for_stderr();
    match cli.command {
        Command::Build {
            from,
            out,
            image,
            cache,
            no_cache,
        } => {
            let c = common(image)?;
            let opts = BuildOptions {
                from,
                input_kind: c.kind,
                out: Some(out),
                format: c.format,
                size: c.size,
                layout: c.layout,
                erofs_compression: c.erofs_compression,
                cache: (!no_cache).then_some(cache),
                progress: Some(progress),
                sync_output: true,
            };
            let built = rootfs_builder::build_image(&opts)?;
            println!(
                "{} ({} bytes{})",
                built.path.display(),
                built.size,
                if built.cache_hit { ", cached" } else { "" }
            );
        }
        Command::Prune { cache, max_size } => {
            let max = rootfs_builder::parse_size(&max_size).map_err(anyhow::Error::msg)?;
            let stats = rootfs_builder::prune_cache(&cache, max)?;
            println!(
                "removed {} images ({} MiB), kept {} ({} MiB)",
                stats.removed,
                stats.freed >> 20,
                stats.kept,
                stats.used >> 20
            );
        }
        Command::Bundle {
            image,
            out,
            opts,
            args,
        } => {
            let c = common(opts)?;
            let bundle = rootfs_builder::build_bundle(&BundleOptions {
                image,
                input_kind: c.kind,
                out_dir: out,
                format: c.format,
                size: c.size,
                layout: c.layout,
                erofs_compression: c.erofs_compression,
                args: (!args.is_empty()).then_some(args),
                progress: Some(progress),
            })?;
            println!("{}", bundle.dir.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rootfs-builder: {e:#}");
            ExitCode::FAILURE
        }
    }
}
