//! `cargo xtask bench` (issue 5): measures the store, recovery and rebuild against baselines
//! measured in the same run, on the same machine, files and directory, and reports ratios.
//!
//! - `measure`: repetition (warm-up, interleaved baseline/subject rounds, medians), the
//!   metric record.
//! - `store`: the volume file alone: `wal_append`, `durable_1`, `durable_16`, `read_random`,
//!   `scan_independent_of_wal`, `open_recovery`.
//! - `recovery`: through the engine and the bridge: `catchup`, `rebuild_full`,
//!   `rebuild_sparse`, `rebuild_heap`, and the registry's `reconcile_scaling`.
//! - `net`: over TCP through `transport`: `net_catchup`, `net_rebuild_full`,
//!   `replicated_write` (the live stream under `sync_all`), `net_rejoin` (reported).
//! - `nbd`: the NBD frontend: `nbd_write` (qemu-img convert into `server`'s NbdServer
//!   against qemu-nbd).
//! - `report`: the table, `target/bench-report.json` (hand-written JSON), machine facts, and
//!   `--compare OLD.json` (each metric's change against an earlier report).
//! - `raw`, `alloc`: the only `unsafe` (baseline file calls; the counting allocator).
//!
//! Benchmarks run in a release build: a debug xtask re-executes itself through
//! `cargo run --release`.

mod alloc;
mod measure;
mod nbd;
mod net;
mod raw;
mod recovery;
mod report;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use measure::{Metric, Plan};

/// Every metric, in report order.
const ALL: &[&str] = &[
    "wal_append",
    "durable_1",
    "durable_16",
    "read_random",
    "catchup",
    "scan_independent_of_wal",
    "rebuild_full",
    "rebuild_sparse",
    "open_recovery",
    "reconcile_scaling",
    "net_catchup",
    "net_rebuild_full",
    "replicated_write",
    "net_rejoin",
    "rebuild_heap",
    "nbd_write",
    "nbd_write_replicated",
];

const USAGE: &str = "usage: cargo xtask bench [--quick] [--only NAME[,NAME...]] [--json PATH] \
                     [--compare OLD.json] [--keep]";

/// Parsed options.
#[derive(Clone, Debug)]
struct Options {
    quick: bool,
    only: Option<Vec<String>>,
    json: Option<PathBuf>,
    /// An earlier report to compare this run with.
    compare: Option<PathBuf>,
    keep: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        only: None,
        json: None,
        compare: None,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--only" => {
                let list = it.next().ok_or("--only needs metric names")?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                for n in &names {
                    if !ALL.contains(&n.as_str()) {
                        return Err(format!("unknown metric {n}; metrics: {}", ALL.join(", ")));
                    }
                }
                o.only = Some(names);
            }
            "--json" => o.json = Some(PathBuf::from(it.next().ok_or("--json needs a path")?)),
            "--compare" => {
                o.compare = Some(PathBuf::from(
                    it.next()
                        .ok_or("--compare needs an earlier report's path")?,
                ));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("bench: unknown option {other}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// The scratch directory under the workspace's `target/` (the same file system as the
/// checkout, unlike /tmp), removed when dropped.
pub struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> Result<Scratch, String> {
        let dir = crate::workspace_root()
            .join("target")
            .join(format!("bench-tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        Ok(Scratch { dir, keep })
    }

    /// A path in the scratch directory; any file already there is removed.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("bench: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// What every measurement gets.
pub struct Ctx {
    pub quick: bool,
    pub scratch: Scratch,
}

impl Ctx {
    /// Warm-up and repetitions: once, unwarmed, in quick mode; otherwise one warm-up round
    /// and at least five recorded ones.
    pub fn plan(&self) -> Plan {
        if self.quick {
            Plan { warmup: 0, reps: 1 }
        } else {
            Plan { warmup: 1, reps: 5 }
        }
    }

    /// `full` normally, `quick` under `--quick`.
    pub fn size<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// Results shared between metrics whose baselines are other metrics.
#[derive(Default)]
pub struct Shared {
    /// wal_append throughput, MiB/s.
    pub wal_append_mib_s: Option<f64>,
    /// rebuild_full's median time (ms) and peak heap (bytes).
    pub rebuild_full: Option<recovery::RebuildFull>,
    /// nbd_write's baseline (qemu-nbd on a raw file), MiB/s: nbd_write_replicated's ceiling.
    pub qemu_nbd_mib_s: Option<f64>,
}

/// `args` with the paths after `--json` and `--compare` made absolute: the release re-run
/// starts in the workspace root, not where the user typed them.
fn absolute_paths(args: &[String]) -> Vec<String> {
    let cwd = std::env::current_dir().unwrap_or_default();
    let mut out = Vec::with_capacity(args.len());
    let mut path_next = false;
    for a in args {
        if path_next && std::path::Path::new(a).is_relative() {
            out.push(cwd.join(a).to_string_lossy().into_owned());
        } else {
            out.push(a.clone());
        }
        path_next = a == "--json" || a == "--compare";
    }
    out
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<ExitCode, String> {
    if cfg!(debug_assertions) {
        // Options are checked before the (slow) release build.
        parse(args)?;
        return crate::reexec_release("bench", &absolute_paths(args));
    }
    let opts = parse(args)?;
    // Read the earlier report up front, so a wrong path fails before the measurements.
    let old = match &opts.compare {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--compare {}: {e}", p.display()))?;
            report::check(&text).map_err(|e| format!("--compare {}: {e}", p.display()))?;
            Some(text)
        }
        None => None,
    };
    let started = Instant::now();
    let ctx = Ctx {
        quick: opts.quick,
        scratch: Scratch::new(opts.keep)?,
    };
    let wanted = |n: &str| opts.only.as_ref().is_none_or(|o| o.iter().any(|x| x == n));
    let mut shared = Shared::default();
    let mut metrics: Vec<Metric> = Vec::new();
    for &name in ALL {
        if !wanted(name) {
            continue;
        }
        let t = Instant::now();
        eprintln!("bench: {name} ...");
        let m = match name {
            "wal_append" => store::wal_append(&ctx, &mut shared)?,
            "durable_1" => store::durable_1(&ctx)?,
            "durable_16" => store::durable_16(&ctx)?,
            "read_random" => store::read_random(&ctx)?,
            "catchup" => recovery::catchup(&ctx, &mut shared)?,
            "scan_independent_of_wal" => store::scan_independent_of_wal(&ctx)?,
            "rebuild_full" => recovery::rebuild_full(&ctx, &mut shared)?,
            "rebuild_sparse" => recovery::rebuild_sparse(&ctx, &mut shared)?,
            "open_recovery" => store::open_recovery(&ctx)?,
            "reconcile_scaling" => recovery::reconcile_scaling(&ctx)?,
            "rebuild_heap" => recovery::rebuild_heap(&ctx, &mut shared)?,
            "net_catchup" => net::net_catchup(&ctx)?,
            "net_rebuild_full" => net::net_rebuild_full(&ctx)?,
            "replicated_write" => net::replicated_write(&ctx)?,
            "net_rejoin" => net::net_rejoin(&ctx)?,
            "nbd_write" => nbd::nbd_write(&ctx, &mut shared)?,
            "nbd_write_replicated" => nbd::nbd_write_replicated(&ctx, &mut shared)?,
            other => return Err(format!("no measurement for {other}")),
        };
        eprintln!(
            "bench: {name}: {} {} (ratio {}) in {:.1}s",
            measure::fmt_num(m.value),
            m.unit,
            measure::fmt_num(m.ratio),
            t.elapsed().as_secs_f64()
        );
        metrics.push(m);
    }
    let wall = started.elapsed();
    let rep = report::Report::new(metrics, ctx.quick, wall);
    print!("{}", rep.table());
    let path = opts.json.clone().unwrap_or_else(|| {
        crate::workspace_root()
            .join("target")
            .join("bench-report.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let json = rep.json();
    if let Some(old) = &old {
        print!("\n{}", report::compare(old, &json)?);
    }
    std::fs::write(&path, &json).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("report: {} ({:.1}s)", path.display(), wall.as_secs_f64());
    // The benchmark measures; it does not fail on a missed target (CI runs --quick to keep the
    // harness working, and quick numbers say nothing about speed).
    Ok(ExitCode::SUCCESS)
}
