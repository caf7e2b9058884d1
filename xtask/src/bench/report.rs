//! The table and the JSON report (written by hand: the workspace keeps its dependency list
//! short).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use super::measure::{Metric, fmt_num};

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
                format!("{} {}", m.target.op(), fmt_num(m.target.value())),
                if m.met() { "yes" } else { "NO" }.to_owned(),
            ]);
        }
        let mut w = [0usize; 7];
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
                "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:>w4$}  {:<w5$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4],
                w5 = w[5],
            );
        }
        let met = self.metrics.iter().filter(|m| m.met()).count();
        let _ = writeln!(out, "{met} of {} targets met", self.metrics.len());
        out.push_str("\nwhat each row measures (value) and what its baseline does:\n");
        for m in &self.metrics {
            let _ = writeln!(out, "- {}: {}", m.name, m.what);
            let _ = writeln!(out, "    baseline: {}", m.baseline_what);
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
                 \"what\": {}, \"baseline_what\": {}, \"detail\": {}}}",
                js(m.name),
                js(m.unit),
                jn(m.value),
                m.baseline.map_or_else(|| "null".to_owned(), jn),
                jn(m.ratio),
                jn(m.target.value()),
                js(m.target.op()),
                m.met(),
                js(&m.what),
                js(&m.baseline_what),
                js(&m.detail),
            );
        }
        out.push_str("\n  ]\n}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_and_numbers_are_escaped() {
        assert_eq!(js("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(js("\u{1}"), "\"\\u0001\"");
        assert_eq!(jn(1.5), "1.5");
        assert_eq!(jn(2.0), "2");
        assert_eq!(jn(0.0), "0");
        assert_eq!(jn(f64::NAN), "null");
    }
}
