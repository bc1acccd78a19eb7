//! The `turnpike` binary: parse the command line and hand over.
#![cfg_attr(not(test), deny(clippy::as_conversions))]

fn main() -> std::process::ExitCode {
    turnpike::cli::main()
}
