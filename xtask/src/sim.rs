//! `cargo xtask sim` (issue 6): not written yet.

use std::process::ExitCode;

/// Runs the simulator.
pub fn run(_args: &[String]) -> Result<ExitCode, String> {
    Err("sim: not implemented yet".into())
}
