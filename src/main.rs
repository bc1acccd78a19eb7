//! The `turnpike` binary: parse the command line and hand over.

fn main() -> std::process::ExitCode {
    turnpike::cli::main()
}
