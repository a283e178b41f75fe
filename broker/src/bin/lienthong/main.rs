//! The `lienthong` binary: parses the command line and hands over to the library, which sets
//! up logging once it knows the configuration. It also chooses the process's memory allocator.

mod allocator;

use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: allocator::SizeSplitAllocator = allocator::SizeSplitAllocator;

#[tokio::main]
async fn main() -> ExitCode {
    lienthong::cli::run(lienthong::cli::Cli::parse()).await
}
