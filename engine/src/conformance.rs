//! The conformance suite (feature `testing`): end-to-end recovery scenarios that any storage +
//! I/O implementation runs through the real driver and executors.
//!
//! An implementation provides a [`Harness`]: a primary whose history the scenarios shape
//! (writes, commits, checkpoints, recycling), replicas at chosen prefixes, I/O between them,
//! pin failure injection, and a data comparison. Each scenario asserts the path it names ran
//! (outcome, source, entries or bytes moved), that no pin is left, and that the replica holds
//! exactly the primary's data at the target. The in-memory reference
//! ([`MemHarness`](crate::testing::MemHarness)) runs it in the engine's tests; the blockvol
//! bridge runs the same scenarios on real volume files.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::adapter::StorageAdapter;
use crate::budget::{BudgetViolation, CatchUpBudget};
use crate::driver::{RecoveryDriver, RecoveryPlan};
use crate::error::{EngineError, PinKind};
use crate::executor::{
    CatchUpExecutor, ExecFailure, ExecutionReport, ExecutorOptions, RebuildExecutor, RebuildIo,
    RecoveryPath, StepInfo,
};
use crate::history::ReplicaHandshake;
use crate::outcome::Outcome;
use crate::rebuild::RebuildSource;
use crate::registry::{AssignmentIntent, ReplicaAssignment};
use crate::types::{Endpoint, Epoch, Lsn, ReplicaId, ReplicaState, SessionId, SessionKind};

/// What a storage + I/O implementation provides to run the suite.
pub trait Harness {
    /// The I/O between the primary and one replica.
    type Io: RebuildIo;

    /// The primary's storage adapter.
    fn storage(&self) -> Arc<dyn StorageAdapter>;
    /// Writes `n` entries on the primary; returns the new head.
    fn primary_write(&mut self, n: u64) -> Result<Lsn, String>;
    /// Sets the primary's committed LSN (the replication layer's, not storage's).
    fn primary_commit(&mut self, lsn: Lsn) -> Result<(), String>;
    /// Makes `checkpoint` the primary's trusted checkpoint and recycles its history through
    /// `tail` (`tail <= checkpoint`).
    fn primary_checkpoint(&mut self, checkpoint: Lsn, tail: Lsn) -> Result<(), String>;
    /// Adds a replica holding the primary's entries `1..=prefix`, durably. Called before the
    /// primary recycles those entries.
    fn add_replica(&mut self, name: &str, prefix: Lsn) -> Result<(), String>;
    /// Appends `n` uncommitted entries the primary never wrote; returns the replica's head.
    fn replica_append_divergent(&mut self, name: &str, n: u64) -> Result<Lsn, String>;
    /// What the replica reports at a handshake: its flushed LSN and the identity of its tip.
    fn replica_handshake(&mut self, name: &str) -> Result<ReplicaHandshake, String>;
    /// I/O from the primary to this replica, for the session `session` at `epoch` (the
    /// replica fences requests from older sessions).
    fn io(&mut self, name: &str, epoch: Epoch, session: SessionId) -> Result<Self::Io, String>;
    /// Makes the next pin of `kind` fail once.
    fn fail_next_pin(&mut self, kind: PinKind);
    /// Pins currently held on the primary.
    fn pins_outstanding(&self) -> usize;
    /// True when the replica holds exactly the primary's data as of `at`.
    fn replica_matches_primary(&mut self, name: &str, at: Lsn) -> Result<bool, String>;
}

/// One scenario's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: &'static str,
    /// How it ended, e.g. `in_sync`, or `fenced -> in_sync` for fault scenarios.
    pub outcome: String,
    /// The recovery paths that ran, in order.
    pub path: String,
    /// WAL entries applied on replicas.
    pub entries_applied: u64,
    /// Bytes moved (WAL plus base).
    pub bytes_transferred: u64,
    /// Pins held on the primary at the end.
    pub pins_outstanding: usize,
    /// Whether every replica matched the primary's data at the target.
    pub digest_match: bool,
    /// Whether every check passed.
    pub passed: bool,
    /// The first failed check, if any.
    pub failure: Option<String>,
}

impl ScenarioReport {
    /// The report of a scenario that failed with `failure` before it could report anything.
    pub fn failed(name: &'static str, failure: String) -> Self {
        ScenarioReport {
            name,
            outcome: "failed".into(),
            path: String::new(),
            entries_applied: 0,
            bytes_transferred: 0,
            pins_outstanding: 0,
            digest_match: false,
            passed: false,
            failure: Some(failure),
        }
    }
}

type Check = Result<(), String>;

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(what()) }
}

/// The replica ID the suite uses for replica `name`.
pub fn replica_id(name: &str) -> ReplicaId {
    ReplicaId::new(format!("vol1/{name}"))
        .unwrap_or_else(|_| ReplicaId::new("vol1/invalid").expect("a fixed valid id"))
}

fn endpoint(name: &str, version: u64) -> Endpoint {
    Endpoint::new(
        format!("{name}.data:3260/v{version}"),
        format!("{name}.ctrl:3261/v{version}"),
        version,
    )
}

/// Scenario state: the driver plus what moved.
struct Ctx<H: Harness> {
    h: H,
    driver: RecoveryDriver,
    paths: Vec<&'static str>,
    entries: u64,
    bytes: u64,
}

impl<H: Harness> Ctx<H> {
    fn new(h: H) -> Self {
        let driver = RecoveryDriver::new(h.storage());
        Ctx {
            h,
            driver,
            paths: Vec::new(),
            entries: 0,
            bytes: 0,
        }
    }

    fn assign(
        &self,
        epoch: u64,
        replicas: &[(&str, u64)],
        targets: &[(&str, SessionKind)],
        budget: Option<CatchUpBudget>,
    ) -> Check {
        let intent = AssignmentIntent {
            replicas: replicas
                .iter()
                .map(|(n, v)| ReplicaAssignment {
                    replica_id: replica_id(n),
                    endpoint: endpoint(n, *v),
                })
                .collect(),
            epoch: Epoch(epoch),
            recovery_targets: targets
                .iter()
                .map(|(n, k)| (replica_id(n), *k))
                .collect::<BTreeMap<_, _>>(),
            catch_up_budget: budget,
        };
        self.driver
            .orchestrator()
            .process_assignment(&intent)
            .map(|_| ())
            .map_err(|e| format!("assignment at epoch {epoch} refused: {e}"))
    }

    fn state(&self, name: &str) -> Result<ReplicaState, String> {
        self.driver
            .orchestrator()
            .sender(&replica_id(name))
            .map(|s| s.state())
            .map_err(|e| e.to_string())
    }

    fn plan(&mut self, name: &str) -> Result<RecoveryPlan, String> {
        let hs = self.h.replica_handshake(name)?;
        ensure(hs.tip().is_some(), || {
            format!("{name} reported no tip identity")
        })?;
        self.driver
            .plan_recovery(&replica_id(name), hs)
            .map_err(|e| format!("plan_recovery({name}, F={}): {e}", hs.flushed()))
    }

    /// I/O for the plan's session, at the sender's epoch.
    fn io_for(&mut self, name: &str, plan: &RecoveryPlan) -> Result<H::Io, String> {
        let sender = self
            .driver
            .orchestrator()
            .sender(&replica_id(name))
            .map_err(|e| e.to_string())?;
        let session = plan
            .session_id()
            .ok_or_else(|| format!("plan for {name} has no session"))?;
        self.h.io(name, sender.epoch(), session)
    }

    fn record(&mut self, r: &ExecutionReport) {
        self.paths.push(r.path.as_str());
        self.entries += r.entries_applied;
        self.bytes += r.bytes_transferred();
    }

    fn catch_up(
        &mut self,
        name: &str,
        plan: RecoveryPlan,
        opts: ExecutorOptions,
    ) -> Result<ExecutionReport, String> {
        let mut io = self.io_for(name, &plan)?;
        let r = CatchUpExecutor::new(&self.driver, plan)
            .with_options(opts)
            .execute(&mut io)
            .map_err(|e| format!("catch-up of {name}: {e}"))?;
        self.record(&r);
        Ok(r)
    }

    fn rebuild(&mut self, name: &str, opts: ExecutorOptions) -> Result<ExecutionReport, String> {
        let plan = self
            .driver
            .plan_rebuild(&replica_id(name))
            .map_err(|e| format!("plan_rebuild({name}): {e}"))?;
        let mut io = self.io_for(name, &plan)?;
        let r = RebuildExecutor::new(&self.driver, plan)
            .with_options(opts)
            .execute(&mut io)
            .map_err(|e| format!("rebuild of {name}: {e}"))?;
        self.record(&r);
        Ok(r)
    }

    fn expect_in_sync_with_data(&mut self, name: &str, at: Lsn) -> Result<bool, String> {
        ensure(self.state(name)? == ReplicaState::InSync, || {
            format!("{name} is not in_sync")
        })?;
        let m = self.h.replica_matches_primary(name, at)?;
        ensure(m, || {
            format!("{name} is in_sync but its data differs from the primary at {at}")
        })?;
        Ok(m)
    }

    fn expect_no_pins(&self) -> Check {
        let n = self.h.pins_outstanding();
        ensure(n == 0, || format!("{n} pins still held"))
    }

    fn expect_logged(&self, name: &str) -> Check {
        ensure(self.driver.orchestrator().log().contains(name), || {
            format!("event {name} not logged")
        })
    }

    fn finish(self, name: &'static str, outcome: &str, digest_match: bool) -> ScenarioReport {
        ScenarioReport {
            name,
            outcome: outcome.to_owned(),
            path: self.paths.join("+"),
            entries_applied: self.entries,
            bytes_transferred: self.bytes,
            pins_outstanding: self.h.pins_outstanding(),
            digest_match,
            passed: true,
            failure: None,
        }
    }
}

fn chunked(entries: u64) -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: entries,
        max_base_chunk_bytes: 64 << 10,
        ..ExecutorOptions::default()
    }
}

/// The failure and partial report of an execution that must fail, or why it did not.
pub fn expect_failure(
    result: Result<ExecutionReport, EngineError>,
) -> Result<(ExecFailure, ExecutionReport), String> {
    match result {
        Ok(r) => Err(format!("execution succeeded but should have failed: {r:?}")),
        Err(EngineError::ExecutionFailed {
            failure, report, ..
        }) => Ok((*failure, *report)),
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}

/// A replica already holding the committed data completes at the handshake.
pub fn zero_gap<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", head)?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    ensure(plan.outcome() == Outcome::ZeroGap, || {
        format!("outcome {} != zero_gap", plan.outcome())
    })?;
    let live = c
        .driver
        .orchestrator()
        .sender(&replica_id("r1"))
        .ok()
        .and_then(|s| s.session_id());
    ensure(
        plan.pins_held() == 0 && plan.session_id().is_some() && live.is_none(),
        || "zero-gap plan holds a pin, names no session, or left its session live".into(),
    )?;
    c.paths.push(RecoveryPath::ZeroGap.as_str());
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    c.expect_logged("completed")?;
    Ok(c.finish("zero_gap", "in_sync", m))
}

/// A replica behind the checkpoint but inside retention replays exactly the missing range.
pub fn catch_up<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(70))?;
    c.h.primary_checkpoint(Lsn(80), Lsn(60))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    ensure(plan.outcome() == Outcome::CatchUp, || {
        format!("outcome {} != catchup", plan.outcome())
    })?;
    ensure(plan.catch_up().and_then(|c| c.pin()).is_some(), || {
        "catch-up plan holds no WAL pin".into()
    })?;
    let r = c.catch_up("r1", plan, chunked(8))?;
    ensure(r.entries_applied == 30, || {
        format!("applied {} entries, expected 30", r.entries_applied)
    })?;
    ensure(r.steps == 4, || format!("{} chunks, expected 4", r.steps))?;
    ensure(r.durable_lsn == Some(head), || {
        format!("durable {:?} != {head}", r.durable_lsn)
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    Ok(c.finish("catch_up", "in_sync", m))
}

/// A replica ahead of committed with a divergent tail is truncated through the I/O.
pub fn truncation<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", head)?;
    let f = c.h.replica_append_divergent("r1", 5)?;
    ensure(f == Lsn(105), || format!("replica head {f} != 105"))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    ensure(plan.truncation().map(|t| t.to) == Some(head), || {
        format!("truncate {:?} != {head}", plan.truncation().map(|t| t.to))
    })?;
    ensure(plan.pins_held() == 0, || {
        "truncate-only plan holds a pin".into()
    })?;
    let r = c.catch_up("r1", plan, chunked(8))?;
    ensure(r.truncated_to == Some(head), || {
        format!("truncated_to {:?} != {head}", r.truncated_to)
    })?;
    ensure(r.entries_applied == 0, || {
        "truncation shipped entries".into()
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    c.expect_logged("exec_truncation")?;
    Ok(c.finish("truncation", "in_sync", m))
}

/// A gap beyond retention escalates; a rebuild assignment rebuilds from the trusted
/// checkpoint image plus the WAL tail.
pub fn rebuild_snapshot_tail<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(20))?;
    c.h.primary_checkpoint(Lsn(50), Lsn(50))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    ensure(plan.outcome() == Outcome::NeedsRebuild, || {
        format!("outcome {} != needs_rebuild", plan.outcome())
    })?;
    ensure(c.state("r1")? == ReplicaState::NeedsRebuild, || {
        "r1 not needs_rebuild after escalation".into()
    })?;
    c.expect_logged("escalated")?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)], None)?;
    let r = c.rebuild("r1", chunked(16))?;
    ensure(r.path == RecoveryPath::RebuildSnapshotTail, || {
        format!("path {} != rebuild_snapshot_tail", r.path)
    })?;
    ensure(r.base_lsn == Some(Lsn(50)), || {
        format!("base {:?} != 50", r.base_lsn)
    })?;
    ensure(r.entries_applied == 50, || {
        format!("tail applied {} entries, expected 50", r.entries_applied)
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    Ok(c.finish("rebuild_snapshot_tail", "needs_rebuild -> in_sync", m))
}

/// A rebuild with no checkpoint transfers a full base image at committed.
pub fn rebuild_full_base<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(0))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)], None)?;
    let r = c.rebuild("r1", chunked(16))?;
    ensure(r.path == RecoveryPath::RebuildFullBase, || {
        format!("path {} != rebuild_full_base", r.path)
    })?;
    ensure(r.base_lsn == Some(head), || {
        format!("base {:?} != {head}", r.base_lsn)
    })?;
    ensure(r.base_bytes_sent > 0, || "full base moved no bytes".into())?;
    ensure(r.entries_applied == 0, || {
        "full base replayed a tail".into()
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    c.expect_logged("plan_rebuild_full_base")?;
    Ok(c.finish("rebuild_full_base", "in_sync", m))
}

/// An epoch bump between two chunks stops the catch-up before the next chunk; a new
/// assignment at the new epoch then completes it.
pub fn epoch_bump_mid_execution<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(40))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    let mut io = c.io_for("r1", &plan)?;
    let orch = Arc::clone(c.driver.orchestrator());
    let result = CatchUpExecutor::new(&c.driver, plan)
        .with_options(chunked(10))
        .with_on_step(|s: &StepInfo| {
            if s.step == 1 {
                orch.advance_epoch(Epoch(2));
            }
        })
        .execute(&mut io);
    let (failure, report) = expect_failure(result)?;
    ensure(
        matches!(
            failure,
            ExecFailure::SessionInvalidatedMidExecution { step: 1, .. }
        ),
        || format!("failure {failure} is not an invalidation caught after step 1"),
    )?;
    ensure(report.entries_applied == 20, || {
        format!(
            "{} entries applied; the bump after chunk 2 must stop chunk 3",
            report.entries_applied
        )
    })?;
    c.record(&report);
    c.expect_no_pins()?;
    ensure(c.state("r1")? == ReplicaState::Disconnected, || {
        "r1 not disconnected after the bump".into()
    })?;
    let f = c.h.replica_handshake("r1")?.flushed();
    ensure(f == Lsn(60), || format!("replica at {f}, expected 60"))?;
    c.assign(2, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let plan = c.plan("r1")?;
    let r = c.catch_up("r1", plan, chunked(10))?;
    ensure(r.entries_applied == 40, || {
        format!("follow-up applied {}, expected 40", r.entries_applied)
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    Ok(c.finish("epoch_bump_mid_execution", "fenced -> in_sync", m))
}

/// An endpoint change during a catch-up invalidates the session; recovery resumes at the new
/// address with the same sender.
pub fn endpoint_change_mid_execution<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(50))?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)], None)?;
    let sender_before = c
        .driver
        .orchestrator()
        .sender(&replica_id("r1"))
        .map_err(|e| e.to_string())?;
    let plan = c.plan("r1")?;
    let mut io = c.io_for("r1", &plan)?;
    let driver = &c.driver;
    let mut moved = Ok(());
    let result = CatchUpExecutor::new(driver, plan)
        .with_options(chunked(10))
        .with_on_step(|s: &StepInfo| {
            if s.step == 0 {
                let intent = AssignmentIntent {
                    replicas: vec![ReplicaAssignment {
                        replica_id: replica_id("r1"),
                        endpoint: endpoint("r1", 2),
                    }],
                    epoch: Epoch(1),
                    recovery_targets: BTreeMap::from([(replica_id("r1"), SessionKind::CatchUp)]),
                    catch_up_budget: None,
                };
                moved = driver
                    .orchestrator()
                    .process_assignment(&intent)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
            }
        })
        .execute(&mut io);
    moved?;
    let (failure, report) = expect_failure(result)?;
    ensure(
        matches!(
            failure,
            ExecFailure::SessionInvalidatedMidExecution { step: 0, .. }
        ),
        || format!("failure {failure} is not an invalidation caught after step 0"),
    )?;
    c.record(&report);
    c.expect_no_pins()?;
    let sender_after = c
        .driver
        .orchestrator()
        .sender(&replica_id("r1"))
        .map_err(|e| e.to_string())?;
    ensure(Arc::ptr_eq(&sender_before, &sender_after), || {
        "the address change replaced the sender".into()
    })?;
    ensure(sender_after.endpoint().version == 2, || {
        "endpoint not updated".into()
    })?;
    let plan = c.plan("r1")?;
    c.catch_up("r1", plan, chunked(10))?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    Ok(c.finish("endpoint_change_mid_execution", "invalidated -> in_sync", m))
}

/// Each pin kind failing: the plan fails, the session is invalidated, nothing stays pinned,
/// and a retry recovers.
pub fn pin_failure<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(70))?;
    c.h.add_replica("r2", Lsn(0))?;
    c.h.add_replica("r3", Lsn(0))?;
    let all = [("r1", 1), ("r2", 1), ("r3", 1)];

    // WAL pin of a catch-up.
    c.h.fail_next_pin(PinKind::WalRetention);
    c.assign(1, &all, &[("r1", SessionKind::CatchUp)], None)?;
    let err = c.plan("r1").err().unwrap_or_default();
    ensure(err.contains("wal pin failed"), || {
        format!("WAL pin failure not reported: {err:?}")
    })?;
    ensure(c.state("r1")? == ReplicaState::Disconnected, || {
        "r1 not disconnected after WAL pin failure".into()
    })?;
    c.expect_logged("wal_pin_failed")?;
    c.expect_no_pins()?;

    // Full-base pin of a rebuild (no checkpoint yet).
    c.h.fail_next_pin(PinKind::FullBase);
    c.assign(1, &all, &[("r2", SessionKind::Rebuild)], None)?;
    let err = c
        .driver
        .plan_rebuild(&replica_id("r2"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure(err.contains("full_base pin failed"), || {
        format!("full-base pin failure not reported: {err:?}")
    })?;
    ensure(c.state("r2")? == ReplicaState::NeedsRebuild, || {
        "r2 not needs_rebuild after full-base pin failure".into()
    })?;
    c.expect_no_pins()?;

    // Snapshot pin, then the WAL pin of a snapshot + tail rebuild.
    c.h.primary_checkpoint(Lsn(50), Lsn(50))?;
    c.h.fail_next_pin(PinKind::Snapshot);
    c.assign(1, &all, &[("r3", SessionKind::Rebuild)], None)?;
    ensure(c.driver.plan_rebuild(&replica_id("r3")).is_err(), || {
        "snapshot pin failure not reported".into()
    })?;
    c.expect_logged("snapshot_pin_failed")?;
    c.expect_no_pins()?;
    c.h.fail_next_pin(PinKind::WalRetention);
    c.assign(1, &all, &[("r3", SessionKind::Rebuild)], None)?;
    ensure(c.driver.plan_rebuild(&replica_id("r3")).is_err(), || {
        "WAL pin failure during rebuild not reported".into()
    })?;
    ensure(c.state("r3")? == ReplicaState::NeedsRebuild, || {
        "r3 not needs_rebuild".into()
    })?;
    c.expect_no_pins()?;

    // Retries recover all three.
    c.assign(
        1,
        &all,
        &[
            ("r1", SessionKind::CatchUp),
            ("r2", SessionKind::Rebuild),
            ("r3", SessionKind::Rebuild),
        ],
        None,
    )?;
    let plan = c.plan("r1")?;
    c.catch_up("r1", plan, chunked(16))?;
    c.rebuild("r2", chunked(16))?;
    c.rebuild("r3", chunked(16))?;
    c.expect_no_pins()?;
    let mut m = true;
    for r in ["r1", "r2", "r3"] {
        m &= c.expect_in_sync_with_data(r, head)?;
    }
    Ok(c.finish("pin_failure", "failed closed -> in_sync", m))
}

/// A catch-up over its entry budget escalates to rebuild, and the rebuild completes.
pub fn budget_escalation<H: Harness>(h: H) -> Result<ScenarioReport, String> {
    let mut c = Ctx::new(h);
    let head = c.h.primary_write(100)?;
    c.h.primary_commit(head)?;
    c.h.add_replica("r1", Lsn(10))?;
    let budget = CatchUpBudget {
        max_entries: Some(20),
        ..CatchUpBudget::default()
    };
    c.assign(
        1,
        &[("r1", 1)],
        &[("r1", SessionKind::CatchUp)],
        Some(budget),
    )?;
    let plan = c.plan("r1")?;
    let mut io = c.io_for("r1", &plan)?;
    let result = CatchUpExecutor::new(&c.driver, plan)
        .with_options(chunked(16))
        .execute(&mut io);
    let (failure, report) = expect_failure(result)?;
    ensure(
        failure == ExecFailure::BudgetEscalated(BudgetViolation::EntriesExceeded),
        || format!("failure {failure} is not an entries budget escalation"),
    )?;
    c.record(&report);
    ensure(c.state("r1")? == ReplicaState::NeedsRebuild, || {
        "r1 not needs_rebuild after budget escalation".into()
    })?;
    c.expect_no_pins()?;
    c.assign(1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)], None)?;
    let r = c.rebuild("r1", chunked(16))?;
    ensure(r.path == RecoveryPath::RebuildFullBase, || {
        format!("path {} != rebuild_full_base", r.path)
    })?;
    c.expect_no_pins()?;
    let m = c.expect_in_sync_with_data("r1", head)?;
    Ok(c.finish("budget_escalation", "needs_rebuild -> in_sync", m))
}

/// A scenario: a name and the function that runs it on a fresh harness.
pub type Scenario<H> = (&'static str, fn(H) -> Result<ScenarioReport, String>);

/// Every scenario, in the order the chain test prints them.
pub fn scenarios<H: Harness>() -> Vec<Scenario<H>> {
    vec![
        ("zero_gap", zero_gap::<H>),
        ("catch_up", catch_up::<H>),
        ("truncation", truncation::<H>),
        ("rebuild_snapshot_tail", rebuild_snapshot_tail::<H>),
        ("rebuild_full_base", rebuild_full_base::<H>),
        ("epoch_bump_mid_execution", epoch_bump_mid_execution::<H>),
        (
            "endpoint_change_mid_execution",
            endpoint_change_mid_execution::<H>,
        ),
        ("pin_failure", pin_failure::<H>),
        ("budget_escalation", budget_escalation::<H>),
    ]
}

/// Runs one scenario by name on a harness; `None` for an unknown name.
pub fn run_scenario<H: Harness>(name: &str, h: H) -> Option<ScenarioReport> {
    let (n, f) = scenarios::<H>().into_iter().find(|(n, _)| *n == name)?;
    Some(f(h).unwrap_or_else(|failure| ScenarioReport::failed(n, failure)))
}

/// Runs every scenario, each on a fresh harness from `make`.
pub fn run_all<H: Harness>(mut make: impl FnMut(&str) -> H) -> Vec<ScenarioReport> {
    scenarios::<H>()
        .into_iter()
        .filter_map(|(name, _)| run_scenario(name, make(name)))
        .collect()
}

/// Runs every scenario and panics with every failure if any fails: for `#[test]` functions
/// of implementations.
pub fn assert_all_pass<H: Harness>(make: impl FnMut(&str) -> H) {
    let reports = run_all(make);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {}", r.name, r.failure.as_deref().unwrap_or("?")))
        .collect();
    assert!(
        failed.is_empty(),
        "conformance failures:\n{}",
        failed.join("\n")
    );
    assert_eq!(reports.len(), scenarios::<H>().len());
}

/// Checks the rebuild source a storage would choose, for implementations' own tests.
pub fn expect_source(plan: &RecoveryPlan, source: RebuildSource) -> Check {
    ensure(plan.rebuild().map(|r| r.source()) == Some(source), || {
        format!(
            "source {:?} != {source}",
            plan.rebuild().map(|r| r.source())
        )
    })
}
