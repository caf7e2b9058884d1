//! `cargo xtask fuzz TARGET [--secs N]`: runs a cargo-fuzz target from `fuzz/` (a separate
//! Cargo project outside the workspace) for N seconds and reports how many inputs it executed.
//!
//! Only the stable toolchain exists here, so the targets are built with `--sanitizer none`
//! (libFuzzer's coverage instrumentation uses stable `-C` flags; the address sanitizer needs
//! `-Z`, which `--sanitizer address` enables through `RUSTC_BOOTSTRAP=1`), with debug
//! assertions on (`-a`, so integer overflow panics instead of wrapping) and optimizations on
//! (`-O`). `fuzz all` runs every target in turn; `fuzz list` names them. A crash leaves its
//! input under `fuzz/artifacts/TARGET/` and makes the task exit non-zero.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const USAGE: &str = "usage: cargo xtask fuzz TARGET|all|list [--secs N] [--sanitizer none|address]";

/// What one run reported.
struct RunStats {
    target: String,
    executions: Option<u64>,
    per_sec: Option<u64>,
    new_units: Option<u64>,
    secs: u64,
    ok: bool,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
fn targets(dir: &Path) -> Result<Vec<String>, String> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| format!("read {}: {e}", manifest.display()))?;
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name = ") {
            out.push(v.trim_matches('"').to_string());
        }
    }
    Ok(out)
}

fn check_cargo_fuzz() -> Result<(), String> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(
            "cargo-fuzz is not installed: run `cargo install cargo-fuzz` (it works on the \
             stable toolchain; this task passes --sanitizer none)"
                .into(),
        )
    }
}

fn stat(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs one target for `secs` seconds, streaming libFuzzer's output and collecting its final
/// statistics.
fn run_one(target: &str, secs: u64, sanitizer: &str) -> Result<RunStats, String> {
    let root = crate::workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args([
            "fuzz",
            "run",
            "--sanitizer",
            sanitizer,
            "-a",
            "-O",
            target,
            "--",
        ])
        .arg(format!("-max_total_time={secs}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    if sanitizer != "none" {
        // Sanitizers need `-Z` flags; the stable compiler accepts them only with this.
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    println!("fuzz: {} (in {})", format_command(&cmd), root.display());
    let mut child = cmd.spawn().map_err(|e| format!("spawn cargo fuzz: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut stats = RunStats {
        target: target.to_string(),
        executions: None,
        per_sec: None,
        new_units: None,
        secs,
        ok: false,
    };
    let mut err = std::io::stderr();
    for line in BufReader::new(stderr).lines() {
        let line = line.map_err(|e| format!("read cargo fuzz output: {e}"))?;
        let _ = writeln!(err, "{line}");
        if let Some(v) = stat(&line, "stat::number_of_executed_units:") {
            stats.executions = Some(v);
        } else if let Some(v) = stat(&line, "stat::average_exec_per_sec:") {
            stats.per_sec = Some(v);
        } else if let Some(v) = stat(&line, "stat::new_units_added:") {
            stats.new_units = Some(v);
        } else if let Some(rest) = line.strip_prefix("Done ")
            && stats.executions.is_none()
        {
            stats.executions = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("wait for cargo fuzz: {e}"))?;
    stats.ok = status.success();
    Ok(stats)
}

fn format_command(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn summary(s: &RunStats) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    format!(
        "fuzz {}: {} executions in {} s ({}/s), {} new corpus units, {}",
        s.target,
        opt(s.executions),
        s.secs,
        opt(s.per_sec),
        opt(s.new_units),
        if s.ok {
            "no crash".to_string()
        } else {
            format!("FAILED (see fuzz/artifacts/{}/)", s.target)
        }
    )
}

/// Runs a fuzz target (`cargo xtask fuzz TARGET [--secs N]`).
pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut target = None;
    let mut secs = 60u64;
    let mut sanitizer = "none".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--secs needs a number of seconds")?;
            }
            "--sanitizer" => {
                sanitizer = it.next().ok_or("--sanitizer needs a name")?.clone();
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            t if target.is_none() && !t.starts_with('-') => target = Some(t.to_string()),
            other => return Err(format!("fuzz: unexpected argument {other}\n{USAGE}")),
        }
    }
    let dir = fuzz_dir();
    let all = targets(&dir)?;
    let target = target.ok_or(USAGE)?;
    if target == "list" {
        for t in &all {
            println!("{t}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<String> = if target == "all" {
        all.clone()
    } else if all.contains(&target) {
        vec![target]
    } else {
        return Err(format!(
            "fuzz: no target {target}; targets: {}",
            all.join(", ")
        ));
    };
    check_cargo_fuzz()?;
    let mut results = Vec::new();
    for t in &chosen {
        let s = run_one(t, secs, &sanitizer)?;
        println!("{}", summary(&s));
        let failed = !s.ok;
        results.push(s);
        if failed {
            break;
        }
    }
    if results.len() > 1 {
        println!("\nsummary:");
        for s in &results {
            println!("  {}", summary(s));
        }
    }
    Ok(if results.iter().all(|s| s.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_is_listed_and_has_a_source_file() {
        let dir = fuzz_dir();
        let names = targets(&dir).expect("fuzz/Cargo.toml");
        for expected in [
            "wal_entry",
            "superblock",
            "base_chunk",
            "volume_open",
            "replica_frames",
            "assignment",
            "wire_frames",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing");
            assert!(
                dir.join("fuzz_targets")
                    .join(format!("{expected}.rs"))
                    .exists(),
                "{expected}.rs missing"
            );
        }
    }

    #[test]
    fn libfuzzer_statistics_are_parsed() {
        assert_eq!(
            stat(
                "stat::number_of_executed_units: 2565807",
                "stat::number_of_executed_units:"
            ),
            Some(2_565_807)
        );
        assert_eq!(
            stat("stat::other: 1", "stat::number_of_executed_units:"),
            None
        );
    }
}
