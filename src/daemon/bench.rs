//! `mistguard bench`: load generator over real gRPC (written below).
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn bench_main(_args: BenchArgs) -> ExitCode {
    eprintln!("mistguard bench: not implemented yet");
    ExitCode::FAILURE
}
