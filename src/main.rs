//! The `tally` binary: parses flags and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use tally::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Inspect { data_dir, json } => inspect(&data_dir, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: tally::cli::ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = args.resolve()?;
    tally::server::init_logging(settings.log_json, &settings.log_filter)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(tally::server::run(settings, None))?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(data_dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = tally::inspect::inspect(data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
