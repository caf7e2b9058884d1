//! Chain-closure scenarios on real volume files, beyond the engine's conformance suite:
//! failure replays at every chunk boundary, recycling under a catch-up, cancellation, a replica
//! crash mid-install, control-plane driven recoveries across servers, and recovery while a
//! writer keeps writing. Each returns a [`ScenarioReport`] and asserts, as it goes, that the
//! path it names ran, that no pin is left, that a replica is never in sync with different
//! bytes, and that the replica's digest equals the primary's at the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use blockvol::{Digest, Volume};
use engine::conformance::{ScenarioReport, replica_id};
use engine::{
    AssignmentIntent, Endpoint, Epoch, ExecutionReport, ExecutorOptions, RecoveryDriver,
    ReplicaAssignment, ReplicaState, SessionKind,
};

mod faults;
mod service;
mod writer;

pub use faults::{
    cancel_mid_execution, epoch_bump_every_chunk_catch_up, epoch_bump_every_chunk_rebuild,
    replica_crash_mid_base_install, wal_recycled_under_catch_up,
};
pub use service::{gap_beyond_retention_rebuild_assignment, three_replicas_three_outcomes};
pub use writer::recovery_with_concurrent_writer;

/// A chain scenario: a name and the function that runs it.
pub type ChainScenario = (&'static str, fn() -> Result<ScenarioReport, String>);

/// Every chain scenario, in the order the chain test prints them.
pub fn all() -> Vec<ChainScenario> {
    vec![
        (
            "epoch_bump_every_chunk_catch_up",
            epoch_bump_every_chunk_catch_up,
        ),
        (
            "epoch_bump_every_chunk_rebuild",
            epoch_bump_every_chunk_rebuild,
        ),
        ("wal_recycled_under_catch_up", wal_recycled_under_catch_up),
        ("cancel_mid_execution", cancel_mid_execution),
        (
            "replica_crash_mid_base_install",
            replica_crash_mid_base_install,
        ),
        (
            "gap_beyond_retention_rebuild_assignment",
            gap_beyond_retention_rebuild_assignment,
        ),
        (
            "three_replicas_three_outcomes",
            three_replicas_three_outcomes,
        ),
        (
            "recovery_with_concurrent_writer",
            recovery_with_concurrent_writer,
        ),
    ]
}

/// Runs one chain scenario by name; a failure becomes a failed report.
pub fn run(name: &str) -> Option<ScenarioReport> {
    let (n, f) = all().into_iter().find(|(n, _)| *n == name)?;
    Some(f().unwrap_or_else(|failure| ScenarioReport::failed(n, failure)))
}

static KEEP: AtomicBool = AtomicBool::new(false);
static KEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keep the volume files of every scenario that runs from now on (`chain-test --keep`).
pub fn set_keep(keep: bool) {
    KEEP.store(keep, Ordering::Relaxed);
}

/// Directories kept so far.
pub fn kept_dirs() -> Vec<PathBuf> {
    KEPT.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

fn note_kept(path: &Path) {
    KEPT.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// A scratch directory, kept at the end when `--keep` asked for it.
pub(crate) struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    pub(crate) fn new(prefix: &str) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        Ok(Scratch(Some(dir)))
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new("."), |d| d.path())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if KEEP.load(Ordering::Relaxed)
            && let Some(d) = self.0.take()
        {
            note_kept(&d.keep());
        }
    }
}

/// A fresh real-volume harness, kept at the end when `--keep` asked for it.
pub(crate) fn harness() -> Result<v2bridge::harness::BlockVolHarness, String> {
    let mut h = v2bridge::harness::BlockVolHarness::new()?;
    if KEEP.load(Ordering::Relaxed) {
        note_kept(&h.keep_files());
    }
    Ok(h)
}

pub(crate) type Check = Result<(), String>;

pub(crate) fn ensure(cond: bool, what: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(what()) }
}

/// Wire bytes of one single-block write entry (the entry header plus the block), as a WAL
/// chunk ships it: every writer in these scenarios and in the blockvol harness writes one block
/// per entry.
pub fn wal_entry_bytes(block_size: u32) -> u64 {
    blockvol::format::ENTRY_HEADER_SIZE as u64 + u64::from(block_size)
}

/// Bytes a base transfer sends for an image after the writes `1..=lsn` when write `lsn` puts a
/// never-all-zero block into block `lsn % blocks` (the scenarios' and the harness's writers):
/// every written block is sent once, zero runs are skipped.
pub fn image_bytes(lsn: u64, blocks: u64, block_size: u32) -> u64 {
    lsn.min(blocks) * u64::from(block_size)
}

/// An expected count: exact, or bounded with the reason the scenario cannot pin it down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Exactly this.
    Exact(u64),
    /// Within `min..=max`.
    Between {
        /// Least allowed.
        min: u64,
        /// Most allowed.
        max: u64,
        /// Why the scenario does not determine the exact count.
        why: String,
    },
}

impl Bound {
    fn range(&self) -> (u64, u64) {
        match self {
            Bound::Exact(n) => (*n, *n),
            Bound::Between { min, max, .. } => (*min, *max),
        }
    }

    /// The bound of a sum of two counts.
    pub fn plus(&self, other: &Bound) -> Bound {
        match (self, other) {
            (Bound::Exact(a), Bound::Exact(b)) => Bound::Exact(a + b),
            (a, b) => {
                let why = match (a, b) {
                    (Bound::Between { why: x, .. }, Bound::Between { why: y, .. }) if x != y => {
                        format!("{x}; {y}")
                    }
                    (Bound::Between { why, .. }, _) | (_, Bound::Between { why, .. }) => {
                        why.clone()
                    }
                    (Bound::Exact(_), Bound::Exact(_)) => String::new(),
                };
                let ((a0, a1), (b0, b1)) = (a.range(), b.range());
                Bound::Between {
                    min: a0 + b0,
                    max: a1 + b1,
                    why,
                }
            }
        }
    }

    /// `Ok` when `got` satisfies the bound; otherwise what differed (`what` names the count).
    pub fn check(&self, what: &str, got: u64) -> Result<(), String> {
        match self {
            Bound::Exact(want) if got == *want => Ok(()),
            Bound::Exact(want) => Err(format!("{what}: moved {got}, expected exactly {want}")),
            Bound::Between { min, max, .. } if (*min..=*max).contains(&got) => Ok(()),
            Bound::Between { min, max, why } => Err(format!(
                "{what}: moved {got}, expected {min}..={max} ({why})"
            )),
        }
    }
}

/// What a scenario must have moved: WAL entries applied on replicas and bytes transferred
/// (WAL plus base), as its report prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    /// WAL entries applied.
    pub entries: Bound,
    /// Bytes transferred.
    pub bytes: Bound,
}

impl Moved {
    /// Exactly `entries` entries and `bytes` bytes.
    pub fn exact(entries: u64, bytes: u64) -> Self {
        Moved {
            entries: Bound::Exact(entries),
            bytes: Bound::Exact(bytes),
        }
    }

    /// What two runs move together: exact when both are, otherwise the sum of their bounds.
    pub fn plus(&self, other: &Moved) -> Moved {
        Moved {
            entries: self.entries.plus(&other.entries),
            bytes: self.bytes.plus(&other.bytes),
        }
    }

    /// Checks a scenario's totals.
    pub fn check(&self, scenario: &str, entries: u64, bytes: u64) -> Result<(), String> {
        self.entries
            .check(&format!("{scenario} WAL entries applied"), entries)?;
        self.bytes
            .check(&format!("{scenario} bytes transferred"), bytes)
    }

    /// Checks a report; a report that already failed is returned as it is, one whose counts
    /// differ is marked failed with the difference.
    pub fn check_report(&self, mut report: ScenarioReport) -> ScenarioReport {
        if report.passed
            && let Err(e) = self.check(
                report.name,
                report.entries_applied,
                report.bytes_transferred,
            )
        {
            report.passed = false;
            report.failure = Some(e);
        }
        report
    }
}

/// What a scenario moved, accumulated over its executions.
#[derive(Default)]
pub(crate) struct Tally {
    paths: Vec<String>,
    entries: u64,
    bytes: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, r: &ExecutionReport) {
        self.paths.push(r.path.as_str().to_owned());
        self.entries += r.entries_applied;
        self.bytes += r.bytes_transferred();
    }

    /// Entries and bytes so far.
    pub(crate) fn totals(&self) -> (u64, u64) {
        (self.entries, self.bytes)
    }

    pub(crate) fn add_path(&mut self, p: &str) {
        self.paths.push(p.to_owned());
    }

    /// The paths in order, or, when there are many, each distinct path with its count in
    /// first-seen order (`catchup x11, zero_gap x1`).
    fn path(&self) -> String {
        if self.paths.len() <= 4 {
            return self.paths.join("+");
        }
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for p in &self.paths {
            match counts.iter_mut().find(|(q, _)| *q == p.as_str()) {
                Some((_, n)) => *n += 1,
                None => counts.push((p.as_str(), 1)),
            }
        }
        counts
            .iter()
            .map(|(p, n)| format!("{p} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The scenario's report, failed when what it moved differs from `moved` (the row keeps
    /// the counts it did move).
    pub(crate) fn report(
        &self,
        name: &'static str,
        outcome: &str,
        pins: usize,
        digest_match: bool,
        moved: &Moved,
    ) -> ScenarioReport {
        moved.check_report(ScenarioReport {
            name,
            outcome: outcome.to_owned(),
            path: self.path(),
            entries_applied: self.entries,
            bytes_transferred: self.bytes,
            pins_outstanding: pins,
            digest_match,
            passed: true,
            failure: None,
        })
    }
}

pub(crate) use engine::conformance::expect_failure;

/// Applies an intent at `epoch` giving each replica `name` (endpoint version 1) a target.
pub(crate) fn assign(
    driver: &RecoveryDriver,
    epoch: u64,
    targets: &[(&str, SessionKind)],
) -> Check {
    let intent = AssignmentIntent {
        replicas: targets
            .iter()
            .map(|(n, _)| ReplicaAssignment {
                replica_id: replica_id(n),
                endpoint: Endpoint::new(format!("{n}:3260"), format!("{n}:3261"), 1),
            })
            .collect(),
        epoch: Epoch(epoch),
        recovery_targets: targets
            .iter()
            .map(|(n, k)| (replica_id(n), *k))
            .collect::<BTreeMap<_, _>>(),
        catch_up_budget: None,
    };
    driver
        .orchestrator()
        .process_assignment(&intent)
        .map(|_| ())
        .map_err(|e| format!("assignment at epoch {epoch}: {e}"))
}

pub(crate) fn state_of(driver: &RecoveryDriver, name: &str) -> Result<ReplicaState, String> {
    driver
        .orchestrator()
        .sender(&replica_id(name))
        .map(|s| s.state())
        .map_err(|e| e.to_string())
}

pub(crate) fn chunked(entries: u64, base_bytes: u64) -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: entries,
        max_base_chunk_bytes: base_bytes,
        ..ExecutorOptions::default()
    }
}

/// The digest of the image a volume of `blocks` blocks holds after the writes `1..=at`, where
/// write `lsn` put `block_pattern(lsn)` into block `lsn % blocks` (the scenarios' writers).
pub(crate) fn oracle_digest(at: u64, blocks: u64, block_size: u32) -> Digest {
    let bs = block_size as usize;
    let mut image = vec![0u8; blocks as usize * bs];
    for lsn in 1..=at {
        let off = (lsn % blocks) as usize * bs;
        image[off..off + bs].copy_from_slice(&v2bridge::harness::block_pattern(lsn, 0, bs));
    }
    Digest::of_image(&image)
}

/// A volume's digest, as a scenario error on failure.
pub(crate) fn digest(vol: &Arc<Volume>, what: &str) -> Result<Digest, String> {
    vol.digest().map_err(|e| format!("digest of {what}: {e}"))
}
