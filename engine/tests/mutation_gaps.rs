//! Tests that close the gaps mutation testing found (`cargo mutants`, see docs/TESTING.md):
//! each pins down a behaviour that a surviving mutant changed without any test noticing.

use engine::testing::SenderProtocol;
use std::sync::{Arc, Mutex};

use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::*;

mod common;
use common::compact::{Tamper, intent, rid};

fn catch_up_driver(storage: &MemStorage) -> RecoveryDriver {
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    assign(&driver, None);
    driver
}

fn assign(driver: &RecoveryDriver, budget: Option<CatchUpBudget>) {
    assign_kind(driver, SessionKind::CatchUp, budget);
}

/// Assigns `r1` at epoch 1 with a session of `kind`.
fn assign_kind(driver: &RecoveryDriver, kind: SessionKind, budget: Option<CatchUpBudget>) {
    let mut i = intent(1, &[("r1", "a", 1)], &[("r1", kind)]);
    i.catch_up_budget = budget;
    driver.orchestrator().process_assignment(&i).unwrap();
}

fn primary(n: u64) -> MemStorage {
    let storage = MemStorage::new();
    storage.write_n(n);
    storage.commit(Lsn(n)).unwrap();
    storage
}

/// Storage whose entry lookups answer with the entry at LSN 1, or fail.
struct Lookups {
    inner: MemStorage,
    fail: bool,
}

impl StorageAdapter for Lookups {
    fn get_retained_history(&self) -> Result<RetainedHistory, StorageError> {
        self.inner.get_retained_history()
    }
    fn entry_id(&self, _lsn: Lsn) -> Result<Option<EntryId>, StorageError> {
        if self.fail {
            return Err(StorageError::Backend("entry lookups are down".into()));
        }
        self.inner.entry_id(Lsn(1))
    }
    fn pin_snapshot(&self, lsn: Lsn) -> Result<SnapshotPin, StorageError> {
        self.inner.pin_snapshot(lsn)
    }
    fn pin_wal_retention(&self, after: Lsn) -> Result<RetentionPin, StorageError> {
        self.inner.pin_wal_retention(after)
    }
    fn pin_full_base(&self, lsn: Lsn) -> Result<FullBasePin, StorageError> {
        self.inner.pin_full_base(lsn)
    }
}

// The truncation anchor of a replica ahead of committed is looked up at committed; an entry
// of another LSN is refused at plan time (not left to fail the truncation later).
#[test]
fn truncation_anchor_of_another_lsn_is_refused_at_plan_time() {
    let storage = primary(10);
    let driver = RecoveryDriver::new(Arc::new(Lookups {
        inner: storage.clone(),
        fail: false,
    }));
    assign(&driver, None);
    let replica = ModelReplica::from_primary(&storage, Lsn(10)).unwrap();
    let mut ahead = replica;
    ahead.append_divergent(3, Epoch(1));
    let err = driver
        .plan_recovery(&rid("r1"), ahead.handshake())
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::WrongEntry {
            requested: Lsn(10),
            returned: Lsn(1)
        }
    );
    assert!(
        !driver
            .orchestrator()
            .sender(&rid("r1"))
            .unwrap()
            .has_active_session()
    );
}

// An unverified handshake (no tip) never consults the primary's entries: log matching has
// nothing to match, so a failing lookup must not fail the plan.
#[test]
fn unverified_handshake_does_not_look_up_entries() {
    let storage = primary(10);
    let driver = RecoveryDriver::new(Arc::new(Lookups {
        inner: storage,
        fail: true,
    }));
    assign(&driver, None);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::ZeroGap);
}

// `cancel_session` says whether it ended the session.
#[test]
fn cancel_session_reports_whether_it_cancelled() {
    let storage = primary(40);
    let driver = catch_up_driver(&storage);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let sid = plan.session_id().unwrap();
    assert!(driver.cancel_session(&rid("r1"), sid, "operator"));
    assert!(!driver.cancel_session(&rid("r1"), sid, "again"));
    assert!(!driver.cancel_session(&rid("nobody"), sid, "unknown"));
    drop(plan);
}

// With a clock, the budget's start tick is the clock's reading, not the configured start tick
// (a clock far from 0 would otherwise exceed any duration budget at the first chunk).
#[test]
fn budget_clock_starts_at_the_clocks_reading() {
    let storage = primary(40);
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    assign(
        &driver,
        Some(CatchUpBudget {
            max_duration_ticks: Some(50),
            ..CatchUpBudget::default()
        }),
    );
    let replica = Arc::new(Mutex::new(
        ModelReplica::from_primary(&storage, Lsn(10)).unwrap(),
    ));
    let plan = driver
        .plan_recovery(&rid("r1"), replica.lock().unwrap().handshake())
        .unwrap();
    let mut now = 1_000_000u64;
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let report = CatchUpExecutor::new(&driver, plan)
        .with_options(ExecutorOptions {
            max_entries_per_chunk: 10,
            ..ExecutorOptions::default()
        })
        .with_clock(|| {
            now += 4;
            Tick(now)
        })
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(report.bytes_transferred(), report.wal_bytes);
    assert!(report.wal_bytes > 0);
}

#[test]
fn report_and_path_formatting() {
    for p in [
        RecoveryPath::ZeroGap,
        RecoveryPath::CatchUp,
        RecoveryPath::TruncateOnly,
        RecoveryPath::RebuildSnapshotTail,
        RecoveryPath::RebuildFullBase,
    ] {
        assert_eq!(p.to_string(), p.as_str());
    }
    let storage = primary(1);
    let driver = RecoveryDriver::new(Arc::new(storage));
    assert!(format!("{driver:?}").starts_with("RecoveryDriver"));
}

fn full_base_rebuild(
    f: impl FnMut(BaseChunkProgress) -> BaseChunkProgress,
) -> (Result<ExecutionReport, EngineError>, MemStorage) {
    let storage = primary(40);
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    assign_kind(&driver, SessionKind::Rebuild, None);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let mut io = Tamper {
        inner: ModelIo::new(storage.clone(), Arc::new(Mutex::new(ModelReplica::new()))),
        wal: |c| c,
        base: f,
        announce: None,
    };
    let r = RebuildExecutor::new(&driver, plan)
        .with_options(ExecutorOptions {
            max_base_chunk_bytes: 64,
            ..ExecutorOptions::default()
        })
        .execute(&mut io);
    (r, storage)
}

// A chunk that covers bytes without sending any (a run of zeros the I/O skipped) is progress.
#[test]
fn base_chunk_covering_zeros_without_sending_is_progress() {
    let (r, storage) = full_base_rebuild(|mut c| {
        c.bytes_sent = 0;
        c
    });
    let report = r.unwrap();
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(report.base_bytes_sent, 0);
    assert!(report.base_bytes > 0);
    assert_eq!(storage.pins_outstanding(), 0);
}

// A chunk that reports nothing at all and is not the last is refused.
#[test]
fn base_chunk_reporting_nothing_is_refused() {
    let (r, storage) = full_base_rebuild(|_| BaseChunkProgress::default());
    match r {
        Err(EngineError::ExecutionFailed { failure, .. }) => {
            assert!(
                failure.to_string().contains("made no progress"),
                "{failure}"
            )
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(storage.pins_outstanding(), 0);
}

// The registry's reporting: removals are listed, emptiness and stop_all say what they did.
#[test]
fn registry_reports_removals_emptiness_and_stops() {
    let reg = Registry::new();
    assert!(reg.is_empty());
    let one = |ids: &[&str], targets: &[&str]| AssignmentIntent {
        replicas: ids
            .iter()
            .map(|id| ReplicaAssignment {
                replica_id: rid(id),
                endpoint: Endpoint::new("a:1", "a:2", 1),
            })
            .collect(),
        epoch: Epoch(1),
        recovery_targets: targets
            .iter()
            .map(|id| (rid(id), SessionKind::CatchUp))
            .collect(),
        catch_up_budget: None,
    };
    reg.apply_assignment(&one(&["r1", "r2"], &["r1", "r2"]))
        .unwrap();
    assert!(!reg.is_empty());
    let r2 = reg.sender(&rid("r2")).unwrap();
    let res = reg.apply_assignment(&one(&["r1"], &[])).unwrap();
    assert_eq!(res.removed, vec![rid("r2")]);
    assert!(r2.stopped(), "a removed sender is stopped");
    let r1 = reg.sender(&rid("r1")).unwrap();
    let sid = r1.session_id().unwrap();
    let stopped = reg.stop_all();
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0].session_id, sid);
    assert!(r1.stopped());
    assert_eq!(reg.len(), 1, "stopped senders stay registered");
}

// A rebuild completes only once the replica reported its data durable at the target: a
// barrier below it is not enough.
#[test]
fn rebuild_needs_a_barrier_at_its_target() {
    let s = Sender::new(rid("r1"), Endpoint::new("a:1", "a:2", 1), Epoch(1));
    let sid = s
        .attach_session(Epoch(1), SessionKind::Rebuild, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(100)).unwrap();
    s.select_rebuild_source(sid, None, false, Lsn(100)).unwrap();
    s.begin_rebuild_transfer(sid).unwrap();
    s.record_rebuild_transfer_progress(sid, Lsn(100)).unwrap();
    s.record_barrier(sid, Lsn(99)).unwrap();
    assert!(matches!(
        s.complete_rebuild(sid),
        Err(EngineError::BarrierMissing { .. })
    ));
    assert_ne!(s.state(), ReplicaState::InSync);
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_rebuild(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
}
