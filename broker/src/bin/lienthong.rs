//! The `lienthong` binary: parses the command line and hands over to the library, which sets
//! up logging once it knows the configuration.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    lienthong::cli::run(lienthong::cli::Cli::parse()).await
}
