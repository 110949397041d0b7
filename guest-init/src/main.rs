//! guest-init: PID 1 of a kiln microVM.
//!
//! As PID 1 (started by the kernel with `init=/kiln/guest-init`) it mounts the standard
//! filesystems and cgroup2 ([`boot`]), serves the kiln protocol on vsock ([`transport`],
//! [`server`]), runs containers ([`container`], [`spawn`]) and reaps every child ([`agent`]). It
//! never exits: fatal errors are logged to the console and the VM is powered off ([`power`]).
//!
//! For tests it runs as a normal process: `guest-init --root DIR --listen-unix SOCK
//! [--cgroup-base DIR] [--vsock-port N]`, where DIR stands for the guest's `/` (containers'
//! `root.path` is looked up under it).

mod agent;
mod boot;
mod cgroup;
mod container;
mod logger;
mod net;
mod power;
mod pty;
mod server;
mod spawn;
mod stdio;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use agent::{Agent, Options};

const USAGE: &str = "usage: guest-init [--root DIR] [--listen-unix PATH] [--vsock-port N] \
                     [--cgroup-base DIR] [--log-level LEVEL]";

/// Command line.
struct Args {
    root: Option<PathBuf>,
    listen_unix: Option<PathBuf>,
    vsock_port: Option<u32>,
    cgroup_base: Option<PathBuf>,
    log_level: log::LevelFilter,
}

fn parse_args(strict: bool) -> Result<Args> {
    let mut args = Args {
        root: None,
        listen_unix: None,
        vsock_port: None,
        cgroup_base: None,
        log_level: log::LevelFilter::Info,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .map(|v| v.to_string_lossy().into_owned())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--root" => args.root = Some(value("--root")?.into()),
            "--listen-unix" => args.listen_unix = Some(value("--listen-unix")?.into()),
            "--cgroup-base" => args.cgroup_base = Some(value("--cgroup-base")?.into()),
            "--vsock-port" => {
                let v = value("--vsock-port")?;
                args.vsock_port = Some(v.parse().with_context(|| format!("--vsock-port `{v}`"))?);
            }
            "--log-level" => {
                let v = value("--log-level")?;
                args.log_level = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--log-level `{v}`: not a log level"))?;
            }
            "-h" | "--help" if strict => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown command-line words to init: ignore them as PID 1.
            other if strict => bail!("unknown argument `{other}`\n{USAGE}"),
            _ => {}
        }
    }
    Ok(args)
}

fn run(pid1: bool, args: Args) -> Result<()> {
    agent::block_sigchld().context("blocking SIGCHLD")?;
    if pid1 {
        boot::setup().context("mounting the standard filesystems")?;
    } else {
        // Orphans of our children come to us, as they would to PID 1.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let opts = Options {
        image_root: args.root.unwrap_or_else(|| PathBuf::from("/")),
        cgroup_base: args
            .cgroup_base
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/kiln")),
        pid1,
    };
    match cgroup::prepare_base(&opts.cgroup_base) {
        Ok(c) => log::info!(
            "cgroup base {} controllers: {c:?}",
            opts.cgroup_base.display()
        ),
        Err(e) => log::warn!("cgroups unavailable: {e}"),
    }
    let agent = Agent::new(opts);
    let vsock_port = match (pid1, args.vsock_port) {
        (_, Some(p)) => Some(p),
        (true, None) => Some(kiln_protocol::AGENT_VSOCK_PORT),
        (false, None) => None,
    };
    if let Some(port) = vsock_port {
        transport::listen_vsock(&agent, port)?;
        // The runtime waits for this console line before its first vsock CONNECT: keep it.
        log::info!("listening on vsock port {port}");
        if pid1 {
            boot::log_ready_cost();
        }
    }
    if let Some(path) = &args.listen_unix {
        transport::listen_unix(&agent, path)?;
        log::info!("listening on {}", path.display());
    }
    if vsock_port.is_none() && args.listen_unix.is_none() {
        bail!("nothing to listen on: give --listen-unix or --vsock-port\n{USAGE}");
    }
    let poller = agent.clone();
    std::thread::Builder::new()
        .name("oom-poll".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            poller.poll_oom();
        })
        .context("starting the OOM poller")?;
    agent::reap_forever(&agent).context("reaping children")
}

fn main() {
    // As PID 1 of a VM (not PID 1 of a test's pid namespace, which passes --root).
    let pid1 = std::process::id() == 1 && !std::env::args().any(|a| a == "--root");
    if pid1 {
        boot::mark_boot_timer();
        std::panic::set_hook(Box::new(|info| {
            eprintln!("guest-init: fatal: {info}");
            power::power_off();
        }));
    }
    let args = match parse_args(!pid1) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("guest-init: {e:#}");
            std::process::exit(2);
        }
    };
    logger::init(args.log_level);
    if let Err(e) = run(pid1, args) {
        eprintln!("guest-init: fatal: {e:#}");
        if pid1 {
            power::power_off();
        }
        std::process::exit(1);
    }
    // reap_forever only returns with an error.
    if pid1 {
        power::power_off();
    }
}
