//! `cargo xtask fuzz` (issue 6): not written yet.

use std::process::ExitCode;

/// Runs a fuzz target.
pub fn run(_args: &[String]) -> Result<ExitCode, String> {
    Err("fuzz: not implemented yet".into())
}
