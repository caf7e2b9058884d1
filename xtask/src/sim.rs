//! `cargo xtask sim --seeds N [--steps M] [--seed S]`: the deterministic simulator over many
//! seeds (`swblock::sim`). Prints one line per seed and the totals; a failing seed prints its
//! violation, its last events and the exact command that replays it. Runs in release mode: a
//! debug build re-runs itself through `cargo run --release`.

use std::process::ExitCode;
use std::time::Instant;

use swblock::sim::{self, SimOptions, Stats};

const DEFAULT_STEPS: u64 = 300;

struct Args {
    first: u64,
    seeds: u64,
    steps: u64,
    heal: Option<u64>,
    replicas: Option<usize>,
    quiet: bool,
    verbose: bool,
    /// `--network`: the network simulator (`swblock::sim::stream`) instead.
    network: bool,
    steps_given: bool,
    /// `--bug NAME` (network simulator): a bug switch, to see a check fire.
    bug: Option<String>,
    /// `--mode NAME` (network simulator): the durability mode of every seed.
    mode: Option<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        first: 1,
        seeds: 0,
        steps: DEFAULT_STEPS,
        heal: None,
        replicas: None,
        quiet: false,
        verbose: false,
        network: false,
        steps_given: false,
        bug: None,
        mode: None,
    };
    let mut seed_given = false;
    let mut it = args.iter();
    let num = |v: Option<&String>, what: &str| -> Result<u64, String> {
        v.ok_or_else(|| format!("{what} needs a number"))?
            .parse::<u64>()
            .map_err(|e| format!("{what}: {e}"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--seeds" => a.seeds = num(it.next(), "--seeds")?,
            "--seed" => {
                a.first = num(it.next(), "--seed")?;
                seed_given = true;
            }
            "--steps" => {
                a.steps = num(it.next(), "--steps")?;
                a.steps_given = true;
            }
            "--network" => a.network = true,
            "--bug" => a.bug = Some(it.next().ok_or("--bug needs a name")?.clone()),
            "--mode" => a.mode = Some(it.next().ok_or("--mode needs a name")?.clone()),
            "--heal-steps" => a.heal = Some(num(it.next(), "--heal-steps")?),
            "--replicas" => a.replicas = Some(num(it.next(), "--replicas")? as usize),
            "--quiet" => a.quiet = true,
            "--verbose" => a.verbose = true,
            other => return Err(format!("sim: unknown option {other}")),
        }
    }
    if a.seeds == 0 {
        a.seeds = if seed_given { 1 } else { 100 };
    }
    Ok(a)
}

fn table(title: &str, m: &std::collections::BTreeMap<&'static str, u64>) -> String {
    let mut out = format!("{title}:");
    if m.is_empty() {
        out.push_str(" none");
    }
    for (k, v) in m {
        out.push_str(&format!(" {k}={v}"));
    }
    out
}

/// Runs the simulator.
pub fn run(args: &[String]) -> Result<ExitCode, String> {
    if cfg!(debug_assertions) && std::env::var_os("SWBLOCK_SIM_DEBUG").is_none() {
        return crate::reexec_release("sim", args);
    }
    let a = parse(args)?;
    if a.network {
        return run_network(&a);
    }
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    println!(
        "sim: seeds {}..={} ({} seeds), {} faulty steps each",
        a.first,
        a.first + a.seeds - 1,
        a.seeds,
        a.steps
    );
    for seed in a.first..a.first + a.seeds {
        let mut o = SimOptions::new(seed, a.steps);
        o.replicas = a.replicas;
        if let Some(h) = a.heal {
            o.heal_steps = h;
        }
        let t = Instant::now();
        // `seed=N` goes out before the run starts, so even a run that never returns names its
        // seed; in quiet mode a progress line every 250 seeds does.
        if !a.quiet {
            print!("seed={seed} ");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if (seed - a.first) % 250 == 0 {
            eprintln!("sim: seeds from {seed} ...");
        }
        let r = sim::run(&o);
        let s = &r.stats;
        if a.quiet && !r.passed() {
            print!("seed={seed} ");
        }
        if !a.quiet || !r.passed() {
            println!(
                "{} steps={} faults={} writes={} commits={} committed={} epoch={} recoveries={} violations={} {:.2}s  [{}]",
                if r.passed() { "ok" } else { "FAIL" },
                s.steps,
                s.total_faults(),
                s.writes,
                s.commits,
                s.committed,
                s.epoch,
                s.recoveries.values().sum::<u64>(),
                r.violations.len(),
                t.elapsed().as_secs_f64(),
                r.config
            );
        }
        if !r.passed() {
            for v in &r.violations {
                println!("  VIOLATION {v}");
            }
            println!("  last events:");
            for line in r.trace.iter().rev().take(40).rev() {
                println!("    {line}");
            }
            let mut rerun = r.rerun_command();
            if let Some(n) = a.replicas {
                rerun.push_str(&format!(" --replicas {n}"));
            }
            if let Some(h) = a.heal {
                rerun.push_str(&format!(" --heal-steps {h}"));
            }
            println!("  rerun: {rerun}");
            failed.push(rerun);
        }
        total.merge(&r.stats);
    }
    println!("---");
    println!(
        "totals: seeds={} steps={} writes={} commits={} commits_refused={} wal_full={} demotions={} stale_checks={} recovery_steps={} interleaved={} checks={} violations={} time={:.1}s",
        a.seeds,
        total.steps,
        total.writes,
        total.commits,
        total.commits_refused,
        total.wal_full,
        total.demotions,
        total.stale_checks,
        total.recovery_steps,
        total.interleaved,
        total.checks,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        table(
            &format!("faults injected ({})", total.total_faults()),
            &total.faults
        )
    );
    println!(
        "{}",
        table(
            &format!(
                "recoveries by path ({})",
                total.recoveries.values().sum::<u64>()
            ),
            &total.recoveries
        )
    );
    let mut causes: Vec<(&String, &u64)> = total.failures.iter().collect();
    causes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("recovery failures by cause:");
    for (k, v) in causes {
        println!("  {v:>8}  {k}");
        if a.verbose
            && let Some(e) = total.failure_examples.get(k)
        {
            println!("            e.g. {e}");
        }
    }
    println!("{}", table("operations", &total.ops));
    if failed.is_empty() {
        println!("all {} seeds passed", a.seeds);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} seeds failed:", failed.len());
        for c in &failed {
            println!("  {c}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// `--network`: the transport's stream, codec and replica handler over the simulated network
/// (`swblock::sim::stream`), one seed after another.
fn run_network(a: &Args) -> Result<ExitCode, String> {
    use swblock::sim::stream::{StreamBug, StreamSimOptions, run_stream_seed};
    use transport::stream::DurabilityMode;
    let bug = match a.bug.as_deref() {
        None => None,
        Some("ack_on_apply") => Some(StreamBug::AckOnApply),
        Some("ignore_lease") => Some(StreamBug::IgnoreLease),
        Some("promote_shortest") => Some(StreamBug::PromoteShortest),
        Some("promote_by_head_only") => Some(StreamBug::PromoteByHeadOnly),
        Some("never_rejoin") => Some(StreamBug::NeverRejoin),
        Some("no_fence") => Some(StreamBug::NoFence),
        Some("committed_from_checkpoint") => Some(StreamBug::CommittedFromCheckpoint),
        Some("same_epoch_after_restart") => Some(StreamBug::SameEpochAfterRestart),
        Some(other) => return Err(format!("sim: unknown bug {other}")),
    };
    let mode = match a.mode.as_deref() {
        None => None,
        Some("best_effort") => Some(DurabilityMode::BestEffort),
        Some("sync_all") => Some(DurabilityMode::SyncAll),
        Some("sync_quorum") => Some(DurabilityMode::SyncQuorum),
        Some(other) => return Err(format!("sim: unknown mode {other}")),
    };
    let started = Instant::now();
    let steps = if a.steps_given {
        a.steps
    } else {
        StreamSimOptions::new(0).steps
    };
    println!(
        "sim --network: seeds {}..={} ({} seeds), {steps} faulty steps each",
        a.first,
        a.first + a.seeds - 1,
        a.seeds
    );
    let mut failed = Vec::new();
    let mut totals: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut joins: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut modes: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for seed in a.first..a.first + a.seeds {
        if a.quiet && (seed - a.first).is_multiple_of(1000) {
            eprintln!("sim --network: seeds from {seed} ...");
        }
        let mut o = StreamSimOptions::new(seed);
        o.steps = steps;
        o.bug = bug;
        o.mode = mode;
        let t = Instant::now();
        let r = run_stream_seed(o).map_err(|e| format!("seed {seed}: {e}"))?;
        let ok = r.violations.is_empty();
        if !a.quiet || !ok {
            println!(
                "seed={seed} {} mode={} sim_ms={} writes={} acked={} failed_flushes={} frames={} \
                 corrupted={} replayed={} failovers={} crashes={} cuts={} joins={:?} {:.3}s",
                if ok { "ok" } else { "FAIL" },
                r.mode,
                r.sim_ms,
                r.writes,
                r.acked,
                r.flush_failed,
                r.frames,
                r.corrupted,
                r.replayed,
                r.failovers,
                r.crashes,
                r.cuts,
                r.joins,
                t.elapsed().as_secs_f64()
            );
        }
        if !ok {
            for v in &r.violations {
                println!("  VIOLATION {v}");
            }
            let mut rerun = format!("cargo xtask sim --network --seed {seed} --steps {steps}");
            for (flag, v) in [("--bug", &a.bug), ("--mode", &a.mode)] {
                if let Some(v) = v {
                    rerun.push_str(&format!(" {flag} {v}"));
                }
            }
            println!("  rerun: {rerun}");
            failed.push(rerun);
        }
        *modes.entry(r.mode).or_default() += 1;
        for (k, v) in [
            ("sim_ms", r.sim_ms),
            ("writes", r.writes),
            ("acked", r.acked),
            ("failed_flushes", r.flush_failed),
            ("frames", r.frames),
            ("corrupted", r.corrupted),
            ("replayed", r.replayed),
            ("dropped", r.dropped),
            ("failovers", r.failovers),
            ("crashes", r.crashes),
            ("cuts", r.cuts),
            ("join_failures", r.join_failures),
            ("durability_checks", r.durability_checks),
            ("superseded_writes", r.superseded_writes),
        ] {
            *totals.entry(k).or_default() += v;
        }
        for (k, v) in r.joins {
            *joins.entry(k).or_default() += v;
        }
    }
    println!("---");
    println!(
        "{} (seeds={}, time={:.1}s)",
        table("totals", &totals),
        a.seeds,
        started.elapsed().as_secs_f64()
    );
    println!("{}", table("modes", &modes));
    println!("{}", table("joins by path", &joins));
    if failed.is_empty() {
        println!("all {} seeds passed", a.seeds);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} seeds failed:", failed.len());
        for c in &failed {
            println!("  {c}");
        }
        Ok(ExitCode::FAILURE)
    }
}
