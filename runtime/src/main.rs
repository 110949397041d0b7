//! kiln: runc-compatible OCI runtime that runs each container in its own microVM.
//!
//! Parses the command line, sets up the log, runs one subcommand and turns its error into one
//! line on stderr (and in the log), exit code 1.

use clap::Parser;

use kiln_runtime::cli::{Cli, Command};
use kiln_runtime::commands::{self, Context};
use kiln_runtime::config::RuntimeConfig;

fn main() {
    let cli = Cli::parse();
    let g = &cli.global;
    // The shims' stderr is the container's: without --log they log into the state directory.
    let shim_id = match &cli.command {
        Some(Command::Shim(a)) => Some(&a.id),
        Some(Command::ExecShim(a)) => Some(&a.id),
        _ => None,
    };
    let shim_log = shim_id
        .filter(|_| g.log.is_none())
        .map(|id| g.root.join(id).join("shim.log"));
    kiln_runtime::logging::init(
        g.log.as_deref().or(shim_log.as_deref()),
        g.log_format,
        g.debug,
    );
    let ctx = Context::new(g);
    let Some(command) = &cli.command else {
        if g.version {
            exit(commands::version::run(&ctx));
        }
        eprintln!("kiln: no command given (see kiln --help)");
        std::process::exit(1);
    };
    let result = match command {
        Command::Create(a) => commands::create::run(&ctx, a),
        Command::Start(a) => commands::start::run(&ctx, &a.id),
        Command::State(a) => commands::state::run(&ctx, &a.id),
        Command::Kill(a) => commands::kill::run(&ctx, a),
        Command::Delete(a) => commands::delete::run(&ctx, a),
        Command::Run(a) => commands::run::run(&ctx, a),
        Command::Exec(a) => commands::exec::run(&ctx, a),
        Command::List(a) => commands::list::run(&ctx, a),
        Command::Ps(a) => commands::ps::run(&ctx, a),
        Command::Pause(a) => commands::pause::run(&ctx, &a.id, false),
        Command::Resume(a) => commands::pause::run(&ctx, &a.id, true),
        Command::Features => commands::features::run(&ctx),
        Command::Spec(a) => commands::spec::run(&ctx, a),
        Command::Update(_) => Err(commands::CommandError::Unsupported(
            "update is not supported by kiln: the VM's limits are fixed at create".into(),
        )),
        Command::Shim(a) => {
            mark_ready_fd_cloexec();
            let code = match RuntimeConfig::load() {
                Ok(cfg) => kiln_runtime::shim::run(&g.root, &a.id, &cfg),
                Err(e) => {
                    kiln_runtime::shim::report_ready(Err(e.to_string()));
                    1
                }
            };
            std::process::exit(code);
        }
        Command::ExecShim(a) => {
            mark_ready_fd_cloexec();
            std::process::exit(kiln_runtime::shim::exec::run_shim(&a.request));
        }
    };
    exit(result);
}

/// Keeps the ready pipe out of the VMM and other children the shims start.
fn mark_ready_fd_cloexec() {
    // SAFETY: fcntl with integer arguments on a descriptor number; harmless if it is not open.
    unsafe {
        libc::fcntl(
            kiln_runtime::shim::READY_FD,
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        )
    };
}

fn exit(result: Result<i32, commands::CommandError>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = kiln_protocol::error_chain(&e);
            log::error!("{msg}");
            if kiln_runtime_logs_to_stderr() {
                // The logger already printed the line on stderr.
            } else {
                eprintln!("kiln: {msg}");
            }
            std::process::exit(1);
        }
    }
}

fn kiln_runtime_logs_to_stderr() -> bool {
    std::env::args().all(|a| a != "--log" && !a.starts_with("--log="))
}
