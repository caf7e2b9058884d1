//! Project tasks: `cargo xtask chain-test` (the main job). Run `cargo xtask help` for the list.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use engine::conformance::ScenarioReport;
use swblock::chain::{self, ChainOptions, ChainRow, Store};

mod bench;
mod fuzz;
mod nemesis;
mod sim;

const HELP: &str = "\
usage: cargo xtask <task> [options]

tasks:
  chain-test [--scenario NAME] [--keep] [--json PATH]
      Run every recovery scenario end to end (assignment -> plan -> executor -> store ->
      verified replica): the conformance scenarios on the in-memory reference store and on
      real volume files, over TCP to a replica process (net/), the chain scenarios on real
      volume files, and the cluster scenario's steps (cluster/: a master and three volume
      servers as processes, driven through NBD by qemu-io and qemu-img; needs qemu-utils).
      Prints one row per scenario and writes the same as JSON to target/chain-report.json
      (or PATH). NAME is `store/scenario`, a bare scenario name, or `cluster` (any cluster/
      name runs the whole cluster scenario, whose steps build on each other). --keep keeps
      the volume files and prints where. Exits 1 if any scenario fails.
  bench [--quick] [--only NAME[,NAME]] [--json PATH] [--compare OLD.json] [--keep]
      Measure the store, recovery and rebuild against baselines measured in the same run
      (release build); prints a table (ratio to the baseline, and to the physical ceiling
      where there is one) and writes target/bench-report.json (or PATH). --compare prints,
      after the table, each metric's change against an earlier report (value, ratio, met;
      metrics only one side has are listed): save one first, e.g.
      `cp target/bench-report.json /tmp/before.json`.
  sim [--network] [--seeds N] [--steps M] [--seed S] [--replicas R] [--heal-steps H] [--quiet] [--verbose]
      Deterministic simulation of a primary, two or three replicas and faults on the real
      crates (release build): N seeds from S (default 100 from 1; --seed alone runs one),
      M faulty steps each (default 300) then a healed phase. Prints one line per seed (only
      failures with --quiet), the totals, faults by kind, recoveries by path and failure
      causes (--verbose adds an example of each); a failing seed prints its violation, its
      last events and the command that replays it. Exits 1 if any seed fails.
  nemesis [--quick] [--seed S] [--rounds N] [--minutes M] [--faults F[,F]] [--loopback]
          [--json PATH]
      A master and three volume servers as processes (as root each in a network namespace
      of its own, otherwise or with --loopback on loopback), a workload writing
      self-describing blocks through NBD, and seeded faults (kill -9 and restart of a primary
      or replica, a primary paused past its lease, the master killed and restarted, a
      primary killed and then the replica promoted in its place; in namespaces also a host
      isolated, the primary cut from the master, the cluster split in halves), each followed
      by a check: every acknowledged write reads back (or a newer one), copies equal, no pin
      left, no flush acknowledged by a superseded primary, convergence within 90 s. N rounds
      (default 12, --quick 6) or M minutes; --faults keeps only the named faults. Writes
      target/nemesis-report.json; exits 1 on any violation.
  fuzz TARGET|all|list [--secs N] [--sanitizer none|address]
      Run cargo-fuzz targets from fuzz/ (outside the workspace; needs `cargo install
      cargo-fuzz`) and report executions per target.
  help
      Print this text.
";

/// Re-runs `cargo xtask TASK ARGS` as a release build (benchmarks and long simulations are
/// meaningless in the dev profile) and returns its exit status.
pub(crate) fn reexec_release(task: &str, args: &[String]) -> Result<ExitCode, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("{task}: debug build; re-running as `cargo run --release -p xtask -- {task}`");
    let status = std::process::Command::new(cargo)
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--release", "-p", "xtask", "--", task])
        .args(args)
        .status()
        .map_err(|e| format!("run cargo: {e}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

pub(crate) fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds binary `bin` of package `package` in this task's profile, next to this executable,
/// where the harnesses look for it: `swblock-replicad` (the `net/` rows put their replicas in
/// that process) and `swblock` (the `cluster/` rows' processes).
pub(crate) fn build_bin(package: &str, bin: &str) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cargo build {bin}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build {bin}: {status}"));
    }
    Ok(())
}

/// The `cluster/` rows: the cluster scenario's steps (the whole scenario runs whichever step
/// is selected, since each step needs the ones before it).
fn cluster_rows(opts: &ChainOptions) -> Result<Vec<ChainRow>, String> {
    let wanted: Vec<&str> = server::scenarios::STEPS
        .iter()
        .copied()
        .filter(|s| {
            chain::selected(opts, Store::Cluster, s) || opts.scenario.as_deref() == Some("cluster")
        })
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    build_bin("server", "swblock")?;
    let bin = server::scenarios::swblock_path()?;
    let work = workspace_root().join("target").join("chain-cluster");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let steps = match server::scenarios::clients_missing() {
        Some(missing) => server::scenarios::STEPS
            .iter()
            .map(|name| server::scenarios::StepReport {
                name,
                outcome: "failed".into(),
                path: String::new(),
                bytes: 0,
                digest_match: false,
                passed: false,
                failure: Some(missing.clone()),
                elapsed: std::time::Duration::ZERO,
            })
            .collect(),
        None => server::scenarios::run(&bin, &work),
    };
    let all_passed = steps.iter().all(|s| s.passed);
    let rows = steps
        .into_iter()
        .filter(|s| wanted.contains(&s.name))
        .map(|s| ChainRow {
            store: Store::Cluster,
            elapsed: s.elapsed,
            report: ScenarioReport {
                name: s.name,
                outcome: s.outcome,
                path: s.path,
                entries_applied: 0,
                bytes_transferred: s.bytes,
                pins_outstanding: 0,
                digest_match: s.digest_match,
                passed: s.passed,
                failure: s.failure,
            },
        })
        .collect();
    if all_passed && !opts.keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("cluster logs: {}", work.join("cluster").display());
    }
    Ok(rows)
}

fn chain_test(args: &[String]) -> Result<ExitCode, String> {
    let mut opts = ChainOptions::default();
    let mut json_path = workspace_root().join("target").join("chain-report.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scenario" => {
                opts.scenario = Some(it.next().ok_or("--scenario needs a name")?.clone());
            }
            "--keep" => opts.keep = true,
            "--json" => {
                json_path = PathBuf::from(it.next().ok_or("--json needs a path")?);
            }
            other => return Err(format!("chain-test: unknown option {other}")),
        }
    }
    build_bin("transport", "swblock-replicad")?;
    let mut rows = chain::run(&opts);
    rows.extend(cluster_rows(&opts)?);
    if rows.is_empty() {
        return Err(format!(
            "no scenario matches {}",
            opts.scenario.as_deref().unwrap_or("(all)")
        ));
    }
    print!("{}", chain::table(&rows));
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    std::fs::write(&json_path, chain::json(&rows))
        .map_err(|e| format!("write {}: {e}", json_path.display()))?;
    println!("report: {}", json_path.display());
    if opts.keep {
        for d in swblock::scenarios::kept_dirs() {
            println!("kept: {}", d.display());
        }
    }
    let failed = rows.iter().filter(|r| !r.report.passed).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        eprint!("{HELP}");
        return ExitCode::from(2);
    };
    let result = match task.as_str() {
        "chain-test" => chain_test(rest),
        "bench" => bench::run(rest),
        "sim" => sim::run(rest),
        "fuzz" => fuzz::run(rest),
        "nemesis" => nemesis::nemesis(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown task {other}\n{HELP}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::from(2)
        }
    }
}
