//! `keelctl`: the command-line client, kubectl's counterpart. It parses the command line
//! and calls the library (`keel::cli`); nothing else.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    keel::cli::run(keel::cli::args::Cli::parse()).await
}
