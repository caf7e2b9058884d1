//! `cargo xtask bench` (issue 5): not written yet.

use std::process::ExitCode;

/// Runs the benchmark.
pub fn run(_args: &[String]) -> Result<ExitCode, String> {
    Err("bench: not implemented yet".into())
}
