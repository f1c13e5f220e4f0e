//! `keelctl`: the command-line client, kubectl's counterpart. It parses the command line
//! and calls the library (`keel::cli`); nothing else.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = keel::cli::args::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(keel::cli::run(cli));
    // A read of stdin (exec -i) may still block on its thread; the command is done.
    rt.shutdown_background();
    code
}
