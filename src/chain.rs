//! The chain test: every conformance scenario, run end to end through the real driver and
//! executors, reported one row per scenario (and as JSON for tooling).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use engine::conformance::{self, Harness, ScenarioReport};
use engine::testing::MemHarness;
use v2bridge::harness::BlockVolHarness;

use crate::scenarios;

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
}

impl Store {
    /// Short name for the table.
    pub const fn as_str(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Blockvol => "blockvol",
            Store::Chain => "chain",
        }
    }
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

fn selected(opts: &ChainOptions, store: Store, name: &str) -> bool {
    match opts.scenario.as_deref() {
        None => true,
        Some(s) => s == name || s == format!("{}/{name}", store.as_str()),
    }
}

fn run_store<H: Harness>(
    opts: &ChainOptions,
    store: Store,
    mut make: impl FnMut(&str) -> H,
    rows: &mut Vec<ChainRow>,
) {
    for (name, _) in conformance::scenarios::<H>() {
        if !selected(opts, store, name) {
            continue;
        }
        let start = Instant::now();
        let Some(report) = conformance::run_scenario(name, make(name)) else {
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
    run_store(opts, Store::Memory, |_| MemHarness::new(), &mut rows);
    for (name, _) in conformance::scenarios::<BlockVolHarness>() {
        if !selected(opts, Store::Blockvol, name) {
            continue;
        }
        let start = Instant::now();
        let report = match scenarios::harness() {
            Ok(h) => conformance::run_scenario(name, h)
                .unwrap_or_else(|| ScenarioReport::failed(name, "unknown scenario".into())),
            Err(e) => ScenarioReport::failed(name, e),
        };
        rows.push(ChainRow {
            store: Store::Blockvol,
            report,
            elapsed: start.elapsed(),
        });
    }
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
            if rep.digest_match { "match" } else { "DIFFER" },
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
