#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::Parser;
use trainer::cli::{Cli, Command};

fn main() -> ExitCode {
    if std::env::var_os("TRAINER_DEFAULT_MALLOC").is_none() && !trainer::runtime::tune_allocator() {
        trainer::errln!(
            "warning: the C library refused the allocator settings; expect a slower CPU run"
        );
    }
    let cli = Cli::parse();
    trainer::data::decode::set_max_pixels(cli.max_pixels);
    trainer::progress::install_signal_handlers();
    let result = match cli.command {
        Command::Infer(args) => trainer::commands::infer(args),
        Command::Fit(args) => trainer::commands::fit(*args),
        Command::Eval(args) => trainer::commands::eval(args),
        Command::Fetch(args) => trainer::commands::fetch(args),
        Command::Export(args) => trainer::commands::export(args),
        Command::Doctor => {
            trainer::out!("{}", trainer::doctor::report());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            trainer::errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
