//! host-vmm binary: parse the CLI, run the VM, map the outcome to the exit status
//! (0 clean guest shutdown, 1 host-side or user error, 2 guest crash). With `-- CMD` the
//! command's status instead (module `run`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use host_vmm::cli::Cli;
use host_vmm::exit::VmOutcome;
use host_vmm::vmm::run_vm;

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        source = e.source();
    }
    msg
}

fn main() -> ExitCode {
    let start = Instant::now();
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message spans several lines (the problem, then usage); keep the problem
            // part on one line.
            let rendered = e.render().to_string();
            let problem: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("host-vmm: {} (see --help)", problem.join(" "));
            return ExitCode::from(1);
        }
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level())
        .parse_default_env()
        .format(|f, rec| {
            writeln!(
                f,
                "host-vmm: {}: {}",
                rec.level().as_str().to_lowercase(),
                rec.args()
            )
        })
        .init();

    let facts = host_vmm::kernel_pick::HostFacts::system();
    match host_vmm::kernel_pick::resolve(&cli.kernel, &facts) {
        Ok(kernel) => cli.kernel = kernel,
        Err(e) => {
            eprintln!("host-vmm: error: {e}");
            return ExitCode::from(1);
        }
    }
    if !cli.command.is_empty() {
        return ExitCode::from(host_vmm::run::run_command(&cli, start));
    }
    let mut config = cli.vm_config();
    if let Some(jail) = cli.jail_config() {
        // User errors name the host path before anything is created.
        if let Err(e) = config.validate() {
            eprintln!("host-vmm: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
        match host_vmm::jail::enter(&jail, &mut config) {
            Ok(host_vmm::jail::Entered::Monitor(code)) => return ExitCode::from(code),
            Ok(host_vmm::jail::Entered::Jailed) => {}
            Err(e) => {
                eprintln!("host-vmm: error: {}", error_chain(&e));
                return ExitCode::from(1);
            }
        }
    }
    match run_vm(&config, start) {
        Ok(outcome) => {
            match &outcome {
                VmOutcome::GuestShutdown(why) => log::debug!("guest shut down ({why})"),
                VmOutcome::GuestCrash(why) => eprintln!("host-vmm: guest crashed: {why}"),
                VmOutcome::HostError(why) => eprintln!("host-vmm: error: {why}"),
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("host-vmm: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}
