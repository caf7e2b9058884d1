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
            "--steps" => a.steps = num(it.next(), "--steps")?,
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
