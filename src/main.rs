use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Streaming content-safety classification for Mistral-powered applications.
#[derive(Parser)]
#[command(name = "mistguard", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gRPC daemon.
    Serve(mistguard::daemon::ServeArgs),
    /// Load-tests a daemon over real gRPC on 127.0.0.1.
    Bench(mistguard::daemon::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => mistguard::daemon::serve_main(args),
        Command::Bench(args) => mistguard::daemon::bench_main(args),
    }
}
