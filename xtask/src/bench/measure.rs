//! Repetition, medians and the metric record every measurement produces.

use std::time::{Duration, Instant};

/// How a ratio is compared with its target.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Target {
    /// The ratio must be at least this.
    AtLeast(f64),
    /// The ratio must be at most this.
    AtMost(f64),
    /// The fraction of the physical ceiling reached (`value / ceiling`) must be at least
    /// this: for a metric whose only honest yardstick is the disk or the network itself.
    CeilingAtLeast(f64),
}

impl Target {
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(t) | Target::CeilingAtLeast(t) => ratio >= t,
            Target::AtMost(t) => ratio <= t,
        }
    }

    pub fn op(self) -> &'static str {
        match self {
            Target::AtLeast(_) => ">=",
            Target::AtMost(_) => "<=",
            Target::CeilingAtLeast(_) => "ceiling >=",
        }
    }

    pub fn value(self) -> f64 {
        match self {
            Target::AtLeast(t) | Target::AtMost(t) | Target::CeilingAtLeast(t) => t,
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub value: f64,
    /// `None` when the metric has no baseline (rebuild_heap).
    pub baseline: Option<f64>,
    /// The quantity compared with the target (value / baseline, or the value itself).
    pub ratio: f64,
    pub target: Target,
    /// What was measured.
    pub what: String,
    /// What the baseline does.
    pub baseline_what: String,
    /// Sizes, repetitions, spread and anything else a reader needs.
    pub detail: String,
    /// The physical reference measured in the same run (a plain file, the disk, a socket;
    /// never another of our own paths nor memory speed), in `unit`; `None` when the metric
    /// has none. It may be the baseline itself.
    pub ceiling: Option<f64>,
    /// What the ceiling is (empty without one).
    pub ceiling_what: String,
    /// Per-operation latency percentiles, where the metric records them.
    pub latency_us: Option<Latency>,
}

impl Metric {
    pub fn met(&self) -> bool {
        let compared = match self.target {
            Target::CeilingAtLeast(_) => self.ceiling_ratio().unwrap_or(f64::NAN),
            Target::AtLeast(_) | Target::AtMost(_) => self.ratio,
        };
        compared.is_finite() && self.target.met(compared)
    }

    /// `value / ceiling`: for a rate, the fraction of the physical ceiling reached; for a
    /// time, how many times the physical reference's time it took.
    pub fn ceiling_ratio(&self) -> Option<f64> {
        self.ceiling.map(|c| self.value / c)
    }
}

/// Latency percentiles of one operation, in microseconds.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    /// Operations recorded.
    pub count: u64,
}

/// A latency histogram in microseconds: 1 us to 10 minutes, three significant digits.
pub fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// Records `d` in microseconds (at least 1; longer than the bound counts as the bound).
pub fn record(h: &mut hdrhistogram::Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// Merges per-thread (or per-round) histograms and takes p50, p99 and p99.9; `None` when
/// nothing was recorded.
pub fn latency<'a>(
    hs: impl IntoIterator<Item = &'a hdrhistogram::Histogram<u64>>,
) -> Option<Latency> {
    let mut all = histogram();
    for h in hs {
        // Same bounds everywhere, so adding cannot fail; a failure would only lose samples.
        let _ = all.add(h);
    }
    if all.is_empty() {
        return None;
    }
    Some(Latency {
        p50: all.value_at_quantile(0.5),
        p99: all.value_at_quantile(0.99),
        p999: all.value_at_quantile(0.999),
        count: all.len(),
    })
}

impl Latency {
    /// For the detail line.
    pub fn describe(&self, op: &str) -> String {
        format!(
            "latency per {op} p50 {} us, p99 {} us, p99.9 {} us ({} ops)",
            self.p50, self.p99, self.p999, self.count
        )
    }
}

/// The median of `xs` (the mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `min..max` of the samples, for the detail column.
pub fn spread(xs: &[f64]) -> String {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}..{}", fmt_num(lo), fmt_num(hi))
}

/// A number with three significant digits or so.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Runs a timed closure.
pub fn timed<T>(f: impl FnOnce() -> Result<T, String>) -> Result<(Duration, T), String> {
    let t = Instant::now();
    let r = f()?;
    Ok((t.elapsed(), r))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub const MIB: u64 = 1 << 20;

/// MiB per second for `bytes` moved in `d`.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// Warm-up and repetition counts.
#[derive(Copy, Clone, Debug)]
pub struct Plan {
    pub warmup: usize,
    pub reps: usize,
}

/// Runs `base` and `subject` alternately (`warmup` unrecorded rounds, then `reps` recorded
/// ones), so drift in the machine affects both sides alike. Each closure returns its own
/// sample (a time or a rate); returns `(baseline samples, subject samples)`.
pub fn interleaved(
    plan: Plan,
    mut base: impl FnMut() -> Result<f64, String>,
    mut subject: impl FnMut() -> Result<f64, String>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    for _ in 0..plan.warmup {
        base()?;
        subject()?;
    }
    let mut b = Vec::with_capacity(plan.reps);
    let mut s = Vec::with_capacity(plan.reps);
    for _ in 0..plan.reps {
        b.push(base()?);
        s.push(subject()?);
    }
    Ok((b, s))
}

/// Runs one closure `warmup` times unrecorded, then `reps` times recorded.
pub fn repeated(
    plan: Plan,
    mut f: impl FnMut() -> Result<f64, String>,
) -> Result<Vec<f64>, String> {
    for _ in 0..plan.warmup {
        f()?;
    }
    (0..plan.reps).map(|_| f()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn targets_compare_in_their_direction() {
        assert!(Target::AtLeast(0.5).met(0.5));
        assert!(!Target::AtLeast(0.5).met(0.49));
        assert!(Target::AtMost(1.2).met(1.0));
        assert!(!Target::AtMost(1.2).met(1.3));
        let mut m = Metric {
            name: "m",
            unit: "ops/s",
            value: 70.0,
            baseline: Some(10.0),
            ratio: 7.0,
            target: Target::CeilingAtLeast(0.6),
            what: String::new(),
            baseline_what: String::new(),
            detail: String::new(),
            ceiling: Some(100.0),
            ceiling_what: String::new(),
            latency_us: None,
        };
        // A ceiling target compares value / ceiling (0.7), not the ratio to the baseline.
        assert!(m.met());
        m.value = 50.0;
        assert!(!m.met());
        m.ceiling = None;
        assert!(!m.met(), "no ceiling measured: the target cannot be met");
    }

    #[test]
    fn latency_merges_histograms() {
        let mut a = histogram();
        let mut b = histogram();
        for us in 1..=900u64 {
            record(&mut a, Duration::from_micros(us));
        }
        for us in 901..=1000u64 {
            record(&mut b, Duration::from_micros(us));
        }
        record(&mut b, Duration::ZERO); // counted as 1 us
        let l = latency([&a, &b]).unwrap_or_else(|| unreachable!());
        assert_eq!(l.count, 1001);
        assert!((499..=502).contains(&l.p50), "{l:?}");
        assert!((989..=992).contains(&l.p99), "{l:?}");
        assert!((998..=1000).contains(&l.p999), "{l:?}");
        assert!(latency(std::iter::empty()).is_none());
    }
}
