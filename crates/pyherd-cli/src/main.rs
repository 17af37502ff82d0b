//! `pyherd`: run a pool of Python workers as an HTTP service (`serve`), for one call
//! (`exec`), or under load (`bench`); `status` shows a running server's workers; `setup`
//! makes the Python environment they use; `cleanup` ends what crashed runs left behind.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod bench;
mod bench_start;
mod cleanup;
mod completions;
mod config_cmd;
mod exec;
mod http;
mod serve;
mod server_settings;
mod settings;
mod setup;
mod status;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pyherd::Category;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pyherd",
    version,
    about = "A supervised herd of Python workers, callable over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API until SIGTERM/SIGINT, then drain gracefully; SIGHUP reloads
    /// the handler code with no failed call
    Serve(serve::ServeArgs),
    /// Start a pool, run one call, print its result (or its error on stderr)
    Exec(exec::ExecArgs),
    /// Start a pool and measure throughput and latency of one command
    Bench(bench::BenchArgs),
    /// Show the workers and stats of a running server (once, or live with --watch)
    Status(status::StatusArgs),
    /// Create the Python environment (in the state directory) with the requirements
    Setup(setup::SetupArgs),
    /// Kill what runs whose host died left behind (the sweep a pool runs at start)
    Cleanup(cleanup::CleanupArgs),
    /// Print the effective configuration: each setting, its value and where it came from
    Config(config_cmd::ConfigArgs),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell)
    Completions(completions::CompletionsArgs),
}

/// Exit codes: 0 success, 1 other failure, 2 invalid request or usage, 3 workers could
/// not start, 4 Python exception, 5 timeout, 6 worker crashed, 7 pool saturated.
pub(crate) fn exit_code(category: Category) -> u8 {
    match category {
        Category::InvalidRequest => 2,
        Category::Initialization => 3,
        Category::Python => 4,
        Category::Timeout => 5,
        Category::Communication => 6,
        Category::Resource => 7,
        _ => 1,
    }
}

/// Writes `text` and a newline to stdout and flushes it. A stdout that is closed (`pyherd
/// exec … | true`) is an error to report, not a panic as with `println!`.
pub(crate) fn print_line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("PYHERD_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    if matches!(
        cli.command,
        Command::Serve(_) | Command::Exec(_) | Command::Bench(_)
    ) {
        config_cmd::warn_unknown_env();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pyherd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Exec(args) => exec::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Setup(args) => setup::run(args).await,
            Command::Cleanup(args) => cleanup::run(&args),
            Command::Config(args) => {
                let sub = matches.subcommand_matches("config").unwrap_or(&matches);
                config_cmd::run(&args, sub)
            }
            Command::Completions(args) => completions::run(&args, Cli::command()),
        }
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .downcast_ref::<pyherd::Error>()
                .map_or(1, |pe| exit_code(pe.category()));
            eprintln!("pyherd: {e:#}");
            ExitCode::from(code)
        }
    }
}
