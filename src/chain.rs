//! The chain test: every conformance scenario, run end to end through the real driver and
//! executors, reported one row per scenario (and as JSON for tooling).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use engine::conformance::{self, Harness, ScenarioReport};
use engine::testing::{MemHarness, ModelEntry};
use transport::harness::{NetHarness, replicad_path};
use v2bridge::harness::{BlockVolHarness, HARNESS_BLOCK_SIZE, HARNESS_BLOCKS};

use crate::scenarios::{self, Moved};

/// Which store a row ran on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// The engine's in-memory reference store and model replicas.
    Memory,
    /// The conformance scenarios on real blockvol volume files through v2bridge.
    Blockvol,
    /// The chain-closure scenarios (failure replays, control-plane driven, concurrent writer)
    /// on real volume files.
    Chain,
    /// The conformance scenarios with the primary here and the replicas in a
    /// `swblock-replicad` process, over TCP.
    Net,
    /// The steps of the cluster scenario (`server::scenarios`): a master and three volume
    /// servers as processes, driven through NBD by `qemu-io` and `qemu-img`. `cargo xtask
    /// chain-test` adds these rows (this crate does not depend on the server).
    Cluster,
}

impl Store {
    /// Short name for the table.
    pub const fn as_str(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Blockvol => "blockvol",
            Store::Chain => "chain",
            Store::Net => "net",
            Store::Cluster => "cluster",
        }
    }
}

/// What conformance scenario `name` must move on `store` (memory or blockvol), exactly: each
/// scenario fixes the entries it ships (its replica prefixes, chunk sizes, budget and fault
/// points) and the images it installs (at the checkpoint or at committed), and each store
/// fixes the bytes of an entry and of an image. `None` for the chain store or an unknown name.
///
/// Bytes per store: the in-memory model ships `ModelEntry::WIRE_BYTES` per entry and per
/// image block, and its writer (`MemStorage::write_n`) writes block `lsn % 8`; blockvol ships
/// an entry header plus one block per entry, and an image's non-zero blocks (the harness
/// writes block `lsn % HARNESS_BLOCKS` with a never-all-zero pattern).
pub fn expected_moved(store: Store, name: &str) -> Option<Moved> {
    let (entry, image): (u64, fn(u64) -> u64) = match store {
        Store::Memory => (ModelEntry::WIRE_BYTES, |lsn| {
            lsn.min(8) * ModelEntry::WIRE_BYTES
        }),
        // The network store runs the blockvol harness's volumes: the same entries and images.
        Store::Blockvol | Store::Net => (scenarios::wal_entry_bytes(HARNESS_BLOCK_SIZE), |lsn| {
            scenarios::image_bytes(lsn, HARNESS_BLOCKS, HARNESS_BLOCK_SIZE)
        }),
        Store::Chain | Store::Cluster => return None,
    };
    // (WAL entries applied, LSNs of the base images installed), from the scenario's setup.
    let (entries, images): (u64, &[u64]) = match name {
        // Replica already at committed: nothing moves.
        "zero_gap" => (0, &[]),
        // Replica at 70, committed 100.
        "catch_up" => (30, &[]),
        // Truncation of a divergent tail ships nothing.
        "truncation" => (0, &[]),
        // Checkpoint image at 50, tail (50, 100].
        "rebuild_snapshot_tail" => (50, &[50]),
        // No checkpoint: the image at committed (100), no tail.
        "rebuild_full_base" => (0, &[100]),
        // Replica at 40: 20 entries before the bump, the other 40 after it.
        "epoch_bump_mid_execution" => (60, &[]),
        // Replica at 50: one chunk before the address change, the rest after it.
        "endpoint_change_mid_execution" => (50, &[]),
        // r1 catches up (70, 100]; r2 and r3 are rebuilt from the checkpoint image at 50
        // with the tail (50, 100] each.
        "pin_failure" => (30 + 50 + 50, &[50, 50]),
        // Replica at 10, chunks of 16, budget 20: the second chunk crosses the budget (32
        // applied), then a full base at 100.
        "budget_escalation" => (32, &[100]),
        _ => return None,
    };
    Some(Moved::exact(
        entries,
        entries * entry + images.iter().map(|&lsn| image(lsn)).sum::<u64>(),
    ))
}

/// Runs conformance scenario `name` on `store`'s harness and checks what it moved against
/// [`expected_moved`]: the report fails when the entries or bytes differ. `None` for an
/// unknown scenario or the chain store.
pub fn run_conformance(store: Store, name: &str) -> Option<ScenarioReport> {
    let report = match store {
        Store::Memory => conformance::run_scenario(name, MemHarness::new())?,
        Store::Blockvol => {
            let (known, _) = conformance::scenarios::<BlockVolHarness>()
                .into_iter()
                .find(|(n, _)| *n == name)?;
            match scenarios::harness() {
                Ok(h) => conformance::run_scenario(name, h)?,
                Err(e) => ScenarioReport::failed(known, e),
            }
        }
        Store::Net => {
            let (known, _) = conformance::scenarios::<NetHarness>()
                .into_iter()
                .find(|(n, _)| *n == name)?;
            match replicad_path().and_then(|bin| NetHarness::new(&bin)) {
                Ok(h) => conformance::run_scenario(name, h)?,
                Err(e) => ScenarioReport::failed(known, e),
            }
        }
        Store::Chain | Store::Cluster => return None,
    };
    Some(match expected_moved(store, name) {
        Some(moved) => moved.check_report(report),
        None => {
            let mut report = report;
            report.passed = false;
            report.failure = Some(format!(
                "no expected entries and bytes for {}/{name}",
                store.as_str()
            ));
            report
        }
    })
}

/// One scenario's row.
#[derive(Clone, Debug)]
pub struct ChainRow {
    /// The store it ran on.
    pub store: Store,
    /// The scenario's report.
    pub report: ScenarioReport,
    /// Wall time of the scenario.
    pub elapsed: Duration,
}

impl ChainRow {
    /// Throughput of the bytes the scenario moved, in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.report.bytes_transferred as f64 / 1e6 / secs
    }

    /// The row's name as printed and selected by `--scenario`: `<store>/<scenario>`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.store.as_str(), self.report.name)
    }
}

/// Options of a chain run.
#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// Run only scenarios whose name (`store/scenario` or `scenario`) equals this.
    pub scenario: Option<String>,
    /// Keep the volume files (see [`scenarios::kept_dirs`]).
    pub keep: bool,
}

/// Whether the run selects scenario `name` of `store`.
pub fn selected(opts: &ChainOptions, store: Store, name: &str) -> bool {
    match opts.scenario.as_deref() {
        None => true,
        Some(s) => s == name || s == format!("{}/{name}", store.as_str()),
    }
}

fn run_conformance_store<H: Harness>(opts: &ChainOptions, store: Store, rows: &mut Vec<ChainRow>) {
    for (name, _) in conformance::scenarios::<H>() {
        if !selected(opts, store, name) {
            continue;
        }
        let start = Instant::now();
        let Some(report) = run_conformance(store, name) else {
            continue;
        };
        rows.push(ChainRow {
            store,
            report,
            elapsed: start.elapsed(),
        });
    }
}

/// Runs the selected scenarios on every store.
pub fn run(opts: &ChainOptions) -> Vec<ChainRow> {
    scenarios::set_keep(opts.keep);
    let mut rows = Vec::new();
    run_conformance_store::<MemHarness>(opts, Store::Memory, &mut rows);
    run_conformance_store::<BlockVolHarness>(opts, Store::Blockvol, &mut rows);
    run_conformance_store::<NetHarness>(opts, Store::Net, &mut rows);
    for (name, _) in scenarios::all() {
        if !selected(opts, Store::Chain, name) {
            continue;
        }
        let start = Instant::now();
        if let Some(report) = scenarios::run(name) {
            rows.push(ChainRow {
                store: Store::Chain,
                report,
                elapsed: start.elapsed(),
            });
        }
    }
    rows
}

/// The table the chain test prints.
pub fn table(rows: &[ChainRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<48} {:<44} {:<56} {:>8} {:>10} {:>8} {:>4} {:<6} result",
        "scenario", "outcome", "path", "entries", "bytes", "MB/s", "pins", "data"
    );
    for r in rows {
        let rep = &r.report;
        let _ = writeln!(
            out,
            "{:<48} {:<44} {:<56} {:>8} {:>10} {:>8.1} {:>4} {:<6} {}",
            r.name(),
            rep.outcome,
            rep.path,
            rep.entries_applied,
            rep.bytes_transferred,
            r.mb_per_s(),
            rep.pins_outstanding,
            match (rep.digest_match, r.store) {
                (true, _) => "match",
                // A cluster step that checks a start or a refusal compares no bytes.
                (false, Store::Cluster) if rep.passed => "-",
                (false, _) => "DIFFER",
            },
            if rep.passed { "ok" } else { "FAILED" },
        );
        if let Some(f) = &rep.failure {
            let _ = writeln!(out, "    failure: {f}");
        }
    }
    let passed = rows.iter().filter(|r| r.report.passed).count();
    let _ = writeln!(
        out,
        "MB/s: bytes moved over the scenario's wall time, including volume creation and \
         fsyncs; `cargo xtask bench` measures throughput."
    );
    let _ = writeln!(out, "{} scenarios, {passed} passed", rows.len());
    out
}

/// `s` as a JSON string literal (quoted and escaped); shared with the bench report.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON report: `{"scenarios": [{"name", "outcome", "path", "entries_applied",
/// "bytes_transferred", "pins_outstanding", "digest_match", "passed", ...}]}`.
pub fn json(rows: &[ChainRow]) -> String {
    let mut out = String::from("{\"scenarios\": [");
    for (i, r) in rows.iter().enumerate() {
        let rep = &r.report;
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "\n  {{\"name\": {}, \"store\": {}, \"outcome\": {}, \"path\": {}, \
             \"entries_applied\": {}, \"bytes_transferred\": {}, \"mb_per_s\": {:.3}, \
             \"pins_outstanding\": {}, \"digest_match\": {}, \"passed\": {}, \"failure\": {}}}",
            json_str(&r.name()),
            json_str(r.store.as_str()),
            json_str(&rep.outcome),
            json_str(&rep.path),
            rep.entries_applied,
            rep.bytes_transferred,
            r.mb_per_s(),
            rep.pins_outstanding,
            rep.digest_match,
            rep.passed,
            rep.failure.as_deref().map_or("null".to_owned(), json_str),
        );
    }
    out.push_str("\n]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_control_characters() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn every_conformance_scenario_has_expected_entries_and_bytes_on_both_stores() {
        for (name, _) in conformance::scenarios::<MemHarness>() {
            for store in [Store::Memory, Store::Blockvol, Store::Net] {
                assert!(
                    expected_moved(store, name).is_some(),
                    "{}/{name}",
                    store.as_str()
                );
            }
        }
        assert_eq!(expected_moved(Store::Chain, "catch_up"), None);
        // One catch-up of 30 single-block entries on blockvol: 30 * (64 + 4096).
        assert_eq!(
            expected_moved(Store::Blockvol, "catch_up"),
            Some(Moved::exact(30, 30 * 4160))
        );
    }

    #[test]
    fn a_report_that_moved_other_counts_fails_with_the_difference() {
        let ok = |entries, bytes| ScenarioReport {
            name: "catch_up",
            outcome: "in_sync".into(),
            path: "catchup".into(),
            entries_applied: entries,
            bytes_transferred: bytes,
            pins_outstanding: 0,
            digest_match: true,
            passed: true,
            failure: None,
        };
        let want = expected_moved(Store::Memory, "catch_up").unwrap();
        assert!(want.check_report(ok(30, 960)).passed);
        for (entries, bytes) in [(30, 0), (30, 1), (29, 960), (0, 0)] {
            let r = want.check_report(ok(entries, bytes));
            assert!(!r.passed, "{entries} entries, {bytes} bytes passed");
            assert!(r.failure.unwrap().contains("catch_up"));
        }
        let bounded = scenarios::Bound::Between {
            min: 10,
            max: 20,
            why: "because".into(),
        };
        assert!(bounded.check("x", 10).is_ok() && bounded.check("x", 20).is_ok());
        assert!(
            bounded
                .check("x", 9)
                .unwrap_err()
                .contains("10..=20 (because)")
        );
        assert!(bounded.check("x", 21).is_err());
        assert_eq!(
            scenarios::Bound::Exact(5).plus(&bounded),
            scenarios::Bound::Between {
                min: 15,
                max: 25,
                why: "because".into()
            }
        );
    }

    #[test]
    fn scenario_filter_accepts_bare_and_qualified_names() {
        let opts = ChainOptions {
            scenario: Some("catch_up".into()),
            keep: false,
        };
        assert!(selected(&opts, Store::Memory, "catch_up"));
        assert!(!selected(&opts, Store::Memory, "zero_gap"));
        let opts = ChainOptions {
            scenario: Some("memory/zero_gap".into()),
            keep: false,
        };
        assert!(selected(&opts, Store::Memory, "zero_gap"));
    }
}
