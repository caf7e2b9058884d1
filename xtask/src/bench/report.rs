//! The table and the JSON report (written by hand: the workspace keeps its dependency list
//! short), and the comparison with an earlier report (`--compare`, read with `serde_json`).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use super::measure::{Latency, Metric, fmt_num};

/// The machine the numbers were taken on.
pub struct Machine {
    pub cpus: usize,
    pub memory_bytes: u64,
}

impl Machine {
    fn probe() -> Machine {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        Machine { cpus, memory_bytes }
    }
}

/// The commit measured, with `+dirty` when the work tree differs from it.
fn revision() -> String {
    let root = crate::workspace_root();
    let out = Command::new("git")
        .current_dir(&root)
        .args(["rev-parse", "HEAD"])
        .output();
    let Ok(out) = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()) else {
        return "unknown".into();
    };
    if out.is_empty() {
        return "unknown".into();
    }
    let clean = Command::new("git")
        .current_dir(&root)
        .args(["diff", "--quiet", "HEAD", "--"])
        .status()
        .is_ok_and(|s| s.success());
    if clean { out } else { format!("{out}+dirty") }
}

/// Everything one run produced.
pub struct Report {
    pub rev: String,
    pub machine: Machine,
    pub quick: bool,
    pub wall: Duration,
    pub metrics: Vec<Metric>,
}

/// A JSON string literal.
fn js(s: &str) -> String {
    swblock::chain::json_str(s)
}

/// A JSON number (`null` for NaN and infinities, which JSON cannot carry).
fn jn(x: f64) -> String {
    if x.is_finite() {
        // Six significant decimals are plenty and keep the file readable.
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() || s == "-" {
            "0".into()
        } else {
            s.to_owned()
        }
    } else {
        "null".into()
    }
}

impl Report {
    pub fn new(metrics: Vec<Metric>, quick: bool, wall: Duration) -> Report {
        Report {
            rev: revision(),
            machine: Machine::probe(),
            quick,
            wall,
            metrics,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "name".to_owned(),
            "value".to_owned(),
            "baseline".to_owned(),
            "unit".to_owned(),
            "ratio".to_owned(),
            "ceiling".to_owned(),
            "target".to_owned(),
            "met".to_owned(),
        ]];
        for m in &self.metrics {
            rows.push([
                m.name.to_owned(),
                fmt_num(m.value),
                m.baseline.map_or_else(|| "-".to_owned(), fmt_num),
                m.unit.to_owned(),
                fmt_num(m.ratio),
                m.ceiling_ratio().map_or_else(|| "-".to_owned(), fmt_num),
                format!("{} {}", m.target.op(), fmt_num(m.target.value())),
                if m.met() { "yes" } else { "NO" }.to_owned(),
            ]);
        }
        let mut w = [0usize; 8];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "bench at {} ({} cpus, {:.1} GiB){}",
            self.rev,
            self.machine.cpus,
            self.machine.memory_bytes as f64 / (1u64 << 30) as f64,
            if self.quick {
                " -- QUICK: small sizes, one unwarmed run each; the numbers say nothing about speed"
            } else {
                ""
            }
        );
        for r in &rows {
            let _ = writeln!(
                out,
                "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:>w4$}  {:>w5$}  {:<w6$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4],
                w5 = w[5],
                w6 = w[6],
            );
        }
        let met = self.metrics.iter().filter(|m| m.met()).count();
        let _ = writeln!(out, "{met} of {} targets met", self.metrics.len());
        out.push_str(
            "ceiling: value / the physical reference measured in this run (plain file, disk, \
             socket), '-' where there is none; for a rate the fraction of the ceiling reached, \
             for a time how many times the reference's time\n",
        );
        out.push_str("\nwhat each row measures (value) and what its baseline does:\n");
        for m in &self.metrics {
            let _ = writeln!(out, "- {}: {}", m.name, m.what);
            let _ = writeln!(out, "    baseline: {}", m.baseline_what);
            if let Some(c) = m.ceiling {
                let _ = writeln!(
                    out,
                    "    ceiling {} {}: {}",
                    fmt_num(c),
                    m.unit,
                    m.ceiling_what
                );
            }
            let _ = writeln!(out, "    detail: {}", m.detail);
        }
        out
    }

    /// The JSON report.
    pub fn json(&self) -> String {
        let mut out = String::new();
        out.push_str("{\n");
        let _ = writeln!(out, "  \"rev\": {},", js(&self.rev));
        let _ = writeln!(
            out,
            "  \"machine\": {{\"cpus\": {}, \"memory_bytes\": {}}},",
            self.machine.cpus, self.machine.memory_bytes
        );
        let _ = writeln!(out, "  \"quick\": {},", self.quick);
        let _ = writeln!(out, "  \"wall_seconds\": {},", jn(self.wall.as_secs_f64()));
        out.push_str("  \"metrics\": [");
        for (i, m) in self.metrics.iter().enumerate() {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            let _ = write!(
                out,
                "    {{\"name\": {}, \"unit\": {}, \"value\": {}, \"baseline\": {}, \
                 \"ratio\": {}, \"target\": {}, \"target_op\": {}, \"met\": {}, \
                 \"ceiling\": {}, \"ceiling_ratio\": {}, \"ceiling_what\": {}, \
                 \"latency_us\": {}, \
                 \"what\": {}, \"baseline_what\": {}, \"detail\": {}}}",
                js(m.name),
                js(m.unit),
                jn(m.value),
                m.baseline.map_or_else(|| "null".to_owned(), jn),
                jn(m.ratio),
                jn(m.target.value()),
                js(m.target.op()),
                m.met(),
                m.ceiling.map_or_else(|| "null".to_owned(), jn),
                m.ceiling_ratio().map_or_else(|| "null".to_owned(), jn),
                if m.ceiling.is_some() {
                    js(&m.ceiling_what)
                } else {
                    "null".to_owned()
                },
                m.latency_us.map_or_else(|| "null".to_owned(), latency_json),
                js(&m.what),
                js(&m.baseline_what),
                js(&m.detail),
            );
        }
        out.push_str("\n  ]\n}\n");
        out
    }
}

/// `{"p50": .., "p99": .., "p999": .., "count": ..}`.
fn latency_json(l: Latency) -> String {
    format!(
        "{{\"p50\": {}, \"p99\": {}, \"p999\": {}, \"count\": {}}}",
        l.p50, l.p99, l.p999, l.count
    )
}

/// One metric of a report, as `--compare` reads it.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    name: String,
    unit: String,
    value: Option<f64>,
    ratio: Option<f64>,
    met: Option<bool>,
    ceiling_ratio: Option<f64>,
    p99: Option<f64>,
}

/// The rev, the quick flag and the metrics of a JSON report.
fn rows(json: &str) -> Result<(String, bool, Vec<Row>), String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let rev = v
        .get("rev")
        .and_then(|r| r.as_str())
        .unwrap_or("unknown")
        .to_owned();
    let quick = v
        .get("quick")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let metrics = v
        .get("metrics")
        .and_then(|m| m.as_array())
        .ok_or("no \"metrics\" array")?;
    let mut out = Vec::new();
    for m in metrics {
        let name = m
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or("a metric without a name")?;
        let num = |k: &str| m.get(k).and_then(serde_json::Value::as_f64);
        out.push(Row {
            name: name.to_owned(),
            unit: m
                .get("unit")
                .and_then(|u| u.as_str())
                .unwrap_or("")
                .to_owned(),
            value: num("value"),
            ratio: num("ratio"),
            met: m.get("met").and_then(serde_json::Value::as_bool),
            ceiling_ratio: num("ceiling_ratio"),
            p99: m
                .get("latency_us")
                .and_then(|l| l.get("p99"))
                .and_then(serde_json::Value::as_f64),
        });
    }
    Ok((rev, quick, out))
}

fn opt_num(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), fmt_num)
}

fn opt_met(x: Option<bool>) -> &'static str {
    match x {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// Checks that `json` reads as a report `compare` can use.
pub fn check(json: &str) -> Result<(), String> {
    rows(json).map(|_| ())
}

/// The change of every metric from report `old` to report `new` (both JSON text): value old ->
/// new with the change in percent, ratio old -> new, met old -> new (and the ceiling ratio and
/// p99 latency where either side has them), then the metrics only one side has.
pub fn compare(old: &str, new: &str) -> Result<String, String> {
    let (old_rev, old_quick, old) = rows(old).map_err(|e| format!("the old report: {e}"))?;
    let (new_rev, new_quick, new) = rows(new).map_err(|e| format!("the new report: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compared with {old_rev} (old -> new, this run {new_rev}):"
    );
    if old_quick != new_quick {
        let _ = writeln!(
            out,
            "  note: the {} report is --quick (small sizes): the two do not compare",
            if old_quick { "old" } else { "new" }
        );
    }
    let mut lines = Vec::new();
    for n in &new {
        let Some(o) = old.iter().find(|o| o.name == n.name) else {
            continue;
        };
        let pct = match (o.value, n.value) {
            (Some(a), Some(b)) if a != 0.0 => format!("{:+.1}%", (b - a) / a.abs() * 100.0),
            _ => "-".to_owned(),
        };
        let mut extra = String::new();
        if o.ceiling_ratio.is_some() || n.ceiling_ratio.is_some() {
            let _ = write!(
                extra,
                "  ceiling {} -> {}",
                opt_num(o.ceiling_ratio),
                opt_num(n.ceiling_ratio)
            );
        }
        if o.p99.is_some() || n.p99.is_some() {
            let us = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
            let _ = write!(extra, "  p99 {} -> {} us", us(o.p99), us(n.p99));
        }
        lines.push([
            n.name.clone(),
            format!("{} -> {} {}", opt_num(o.value), opt_num(n.value), n.unit),
            pct,
            format!("ratio {} -> {}", opt_num(o.ratio), opt_num(n.ratio)),
            format!("met {} -> {}", opt_met(o.met), opt_met(n.met)),
            extra,
        ]);
    }
    let mut w = [0usize; 5];
    for l in &lines {
        for (i, c) in l.iter().take(5).enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    for l in &lines {
        let line = format!(
            "  {:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:<w4$}{}",
            l[0],
            l[1],
            l[2],
            l[3],
            l[4],
            l[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let names = |rs: &[Row], others: &[Row]| {
        rs.iter()
            .filter(|r| !others.iter().any(|o| o.name == r.name))
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let only_old = names(&old, &new);
    let only_new = names(&new, &old);
    if !only_old.is_empty() {
        let _ = writeln!(out, "  only in the old report: {only_old}");
    }
    if !only_new.is_empty() {
        let _ = writeln!(out, "  only in this run: {only_new}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::Target;

    #[test]
    fn json_strings_and_numbers_are_escaped() {
        assert_eq!(js("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(js("\u{1}"), "\"\\u0001\"");
        assert_eq!(jn(1.5), "1.5");
        assert_eq!(jn(2.0), "2");
        assert_eq!(jn(0.0), "0");
        assert_eq!(jn(f64::NAN), "null");
    }

    fn metric(name: &'static str, value: f64, ceiling: Option<f64>) -> Metric {
        Metric {
            name,
            unit: "ops/s",
            value,
            baseline: Some(100.0),
            ratio: value / 100.0,
            target: Target::AtLeast(0.8),
            what: "w".into(),
            baseline_what: "b".into(),
            detail: "d".into(),
            ceiling,
            ceiling_what: "the disk".into(),
            latency_us: None,
        }
    }

    #[test]
    fn the_report_carries_ceiling_and_latency() {
        let mut with = metric("durable_1", 90.0, Some(120.0));
        with.latency_us = Some(Latency {
            p50: 10,
            p99: 20,
            p999: 30,
            count: 7,
        });
        let rep = Report {
            rev: "abc".into(),
            machine: Machine {
                cpus: 2,
                memory_bytes: 1,
            },
            quick: true,
            wall: Duration::from_secs(1),
            metrics: vec![with, metric("wal_append", 50.0, None)],
        };
        let v: serde_json::Value = serde_json::from_str(&rep.json()).unwrap_or_default();
        let m = &v["metrics"];
        assert_eq!(m[0]["ceiling"], 120.0);
        assert_eq!(m[0]["ceiling_ratio"], 0.75);
        assert_eq!(m[0]["ceiling_what"], "the disk");
        assert_eq!(m[0]["latency_us"]["p999"], 30);
        assert!(m[1]["ceiling"].is_null());
        assert!(m[1]["ceiling_ratio"].is_null());
        assert!(m[1]["latency_us"].is_null());
        let t = rep.table();
        let header = t.lines().nth(1).unwrap_or_default();
        assert!(header.contains("ceiling"), "{t}");
        let row = t
            .lines()
            .find(|l| l.starts_with("durable_1"))
            .unwrap_or_default();
        assert!(row.contains("0.750"), "{row}");
        let row = t
            .lines()
            .find(|l| l.starts_with("wal_append"))
            .unwrap_or_default();
        assert!(row.contains(" - "), "{row}");
    }

    #[test]
    fn compare_lists_changes_and_missing_metrics() {
        let old = r#"{"rev": "old1", "metrics": [
            {"name": "durable_1", "unit": "ops/s", "value": 100, "ratio": 0.5, "met": false},
            {"name": "gone", "unit": "ms", "value": 1, "ratio": 1, "met": true},
            {"name": "catchup", "unit": "MiB/s", "value": null, "ratio": null, "met": false}
        ]}"#;
        let new = r#"{"rev": "new2", "quick": true, "metrics": [
            {"name": "durable_1", "unit": "ops/s", "value": 150, "ratio": 0.9, "met": true,
             "ceiling_ratio": 0.8, "latency_us": {"p50": 1, "p99": 250, "p999": 900}},
            {"name": "catchup", "unit": "MiB/s", "value": 20, "ratio": 0.3, "met": false},
            {"name": "added", "unit": "ms", "value": 2, "ratio": 2, "met": true}
        ]}"#;
        let out = compare(old, new).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.starts_with("compared with old1"), "{out}");
        let d1 = out
            .lines()
            .find(|l| l.contains("durable_1"))
            .unwrap_or_default();
        assert!(d1.contains("100.0 -> 150.0 ops/s"), "{d1}");
        assert!(d1.contains("+50.0%"), "{d1}");
        assert!(d1.contains("ratio 0.500 -> 0.900"), "{d1}");
        assert!(d1.contains("met NO -> yes"), "{d1}");
        assert!(d1.contains("ceiling - -> 0.800"), "{d1}");
        assert!(d1.contains("p99 - -> 250 us"), "{d1}");
        let c = out
            .lines()
            .find(|l| l.contains("catchup"))
            .unwrap_or_default();
        assert!(c.contains("- -> 20.00 MiB/s"), "{c}");
        assert!(c.contains("met NO -> NO"), "{c}");
        assert!(out.contains("only in the old report: gone"), "{out}");
        assert!(out.contains("only in this run: added"), "{out}");
        assert!(out.contains("the new report is --quick"), "{out}");
        assert!(compare("{", new).is_err());
        assert!(compare("{}", new).is_err());
    }
}
