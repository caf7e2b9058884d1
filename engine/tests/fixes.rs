//! One test per fix of the reference's flaws (reference-engine.md 6.3 and 6.5). Each is
//! written so that the reference's behaviour would fail it; the comment on each says how.

use engine::testing::SenderProtocol;
use std::sync::{Arc, Mutex};
use std::thread;

use engine::testing::{MemStorage, ModelEntry, ModelIo, ModelReplica, ScriptedIo};
use engine::*;

mod common;
use common::compact::{ep, failure, intent, primary, replica_at, rid};

// Reference: Reconcile ignored the epoch, so a stale intent removed r2 and re-addressed r1.
#[test]
fn stale_intent_changes_nothing() {
    let reg = Registry::new();
    reg.reconcile(
        &intent(2, &[("r1", "10.0.0.1", 1), ("r2", "10.0.0.2", 1)], &[]).replicas,
        Epoch(2),
    )
    .unwrap();
    let stale = intent(1, &[("r1", "10.9.9.9", 7)], &[("r1", SessionKind::CatchUp)]);
    let err = reg.apply_assignment(&stale).unwrap_err();
    assert_eq!(
        err,
        EngineError::StaleIntent {
            intent: Epoch(1),
            registry: Epoch(2)
        }
    );
    assert_eq!(reg.len(), 2, "a stale intent removed a sender");
    let r1 = reg.sender(&rid("r1")).unwrap();
    assert_eq!(
        r1.endpoint(),
        ep("10.0.0.1", 1),
        "a stale intent re-addressed r1"
    );
    assert!(!r1.has_active_session());
    assert!(!r1.stopped());
}

// Reference: TruncateLSN 0 meant "none" and Converged needed target > 0, so a replica whose
// whole log is uncommitted could never be truncated to 0.
#[test]
fn truncation_to_lsn_zero_works() {
    let storage = MemStorage::new();
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    replica.lock().unwrap().append_divergent(3, Epoch(1));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(3)))
        .unwrap();
    assert_eq!(plan.truncation().map(|t| t.to), Some(Lsn(0)));
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.truncated_to, Some(Lsn(0)));
    assert_eq!(io.stats.truncations, 1);
    assert_eq!(replica.lock().unwrap().head(), Lsn(0));
    assert!(replica.lock().unwrap().state().is_empty());
    assert_eq!(report.final_state, ReplicaState::InSync);
}

// Reference: plan.SessionID 0 matched a sender with no session, so cancelling a finished
// zero-gap plan demoted an in-sync sender to disconnected.
#[test]
fn cancelling_a_finished_zero_gap_plan_keeps_in_sync() {
    let (_storage, driver) = primary(10);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::ZeroGap);
    assert!(!driver.cancel_plan(plan, "late_cancel"));
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(driver.orchestrator().log().contains("plan_cancelled"));
}

// Reference: RecordRebuildTransferProgress(0) was a "regression", so a full base at
// committed 0 could never progress.
#[test]
fn full_base_rebuild_at_committed_zero_completes() {
    let storage = MemStorage::new();
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    assert_eq!(plan.rebuild().map(|r| r.target), Some(Lsn(0)));
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    let mut io = ModelIo::new(storage.clone(), replica);
    let report = RebuildExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.base_lsn, Some(Lsn(0)));
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: stall detection stayed off until a tick > 0 was recorded.
#[test]
fn stall_detected_from_tick_zero() {
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    let budget = CatchUpBudget {
        progress_deadline_ticks: Some(5),
        ..CatchUpBudget::default()
    };
    let sid = s
        .attach_session(
            Epoch(1),
            SessionKind::CatchUp,
            SessionOptions::with_budget(budget),
        )
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(10)).unwrap();
    s.begin_catch_up(sid, Some(Tick(0))).unwrap();
    assert_eq!(
        s.check_budget(sid, Tick(6)).unwrap(),
        Some(BudgetViolation::ProgressStalled)
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

// Reference: unsigned subtraction made a clock going backwards look like a huge duration.
#[test]
fn clock_going_backwards_is_no_violation() {
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    let budget = CatchUpBudget {
        max_duration_ticks: Some(10),
        progress_deadline_ticks: Some(10),
        ..CatchUpBudget::default()
    };
    let sid = s
        .attach_session(
            Epoch(1),
            SessionKind::CatchUp,
            SessionOptions::with_budget(budget),
        )
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(10)).unwrap();
    s.begin_catch_up(sid, Some(Tick(100))).unwrap();
    assert_eq!(s.check_budget(sid, Tick(3)).unwrap(), None);
    assert!(s.has_active_session());
}

// Reference: IsRecoverable had no contiguity check, so a hole in the retained WAL was
// planned as a catch-up.
#[test]
fn hole_in_retained_wal_is_not_recoverable() {
    let storage = MemStorage::new();
    for lsn in [1u64, 2, 3, 5, 6, 7] {
        storage
            .append(ModelEntry {
                lsn: Lsn(lsn),
                epoch: Epoch(1),
                block: lsn,
                value: lsn,
            })
            .unwrap();
    }
    storage.commit(Lsn(7)).unwrap();
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(2)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    let proof = plan.proof().unwrap();
    assert!(!proof.recoverable);
    assert_eq!(
        proof.reason,
        ProofReason::HoleInRetention {
            needed: LsnRange::new(Lsn(2), Lsn(7)),
            missing: LsnRange::new(Lsn(3), Lsn(4)),
        }
    );
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: the classifier ignored the head while the proof checked it; ExecuteRecovery
// followed the classifier and planned a catch-up the proof called unrecoverable.
#[test]
fn proof_and_outcome_agree_when_committed_is_beyond_head() {
    let history = RetainedHistory {
        head_lsn: Lsn(80),
        tail_lsn: Lsn(0),
        committed_lsn: Lsn(100),
        ..RetainedHistory::default()
    };
    let proof = history.prove_recoverability(Lsn(50));
    assert!(!proof.recoverable);
    assert_eq!(proof.reason.name(), "committed_beyond_head");
    assert_eq!(proof.outcome(), Outcome::NeedsRebuild);
    // The plain classifier, which cannot see the head, would have said catch-up.
    assert_eq!(
        history.make_handshake_result(Lsn(50)).classify(),
        Outcome::CatchUp
    );
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    let (outcome, _) = s
        .record_handshake_from_history(sid, Lsn(50), &history)
        .unwrap();
    assert_eq!(outcome, Outcome::NeedsRebuild);
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

// Reference: an executor failure released the pins but left the session active.
#[test]
fn executor_failure_releases_pins_and_invalidates_session() {
    let (storage, driver) = primary(100);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    assert_eq!(storage.pins_of(PinKind::WalRetention), 1);
    let mut io = ScriptedIo::new([80, 90, 101]);
    let (f, report) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(f, ExecFailure::IoProtocol { step: 2, .. }), "{f}");
    assert_eq!(report.entries_applied, 20);
    assert_eq!(storage.pins_outstanding(), 0);
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert!(
        !s.has_active_session(),
        "session kept running without its pins"
    );
    assert_eq!(s.state(), ReplicaState::Disconnected);
    let released = driver
        .orchestrator()
        .log()
        .find("exec_resources_released")
        .unwrap();
    assert!(released.event.detail().starts_with("io_protocol_step_2"));
}

// Reference: Cancel released pins but did not invalidate the session.
#[test]
fn executor_cancel_invalidates_session() {
    let (storage, driver) = primary(100);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    let exec = CatchUpExecutor::new(&driver, plan);
    assert_eq!(exec.pins_held(), 1);
    let err = exec.cancel("operator");
    assert!(matches!(err, EngineError::ExecutionFailed { .. }));
    assert_eq!(storage.pins_outstanding(), 0);
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    let ev = driver
        .orchestrator()
        .log()
        .find("session_invalidated")
        .unwrap();
    assert_eq!(ev.event.detail(), "execution_failed: cancelled: operator");
}

// Reference: the bump inside OnStep(1) was caught by the same step's CheckBudget; here it is
// caught by the authority re-check that follows the hook, before chunk 3 moves any data.
#[test]
fn epoch_bump_in_on_step_is_caught_before_the_next_chunk() {
    let (storage, driver) = primary(100);
    let replica = replica_at(&storage, 40);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(40)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let orch = Arc::clone(driver.orchestrator());
    let result = CatchUpExecutor::new(&driver, plan)
        .with_options(ExecutorOptions {
            max_entries_per_chunk: 10,
            ..ExecutorOptions::default()
        })
        .with_on_step(|s| {
            if s.step == 1 {
                orch.advance_epoch(Epoch(2));
            }
        })
        .execute(&mut io);
    let (f, report) = failure(result);
    assert!(matches!(
        f,
        ExecFailure::SessionInvalidatedMidExecution { step: 1, .. }
    ));
    assert_eq!(io.stats.stream_calls, 2, "a chunk ran after the epoch bump");
    assert_eq!(report.entries_applied, 20);
    assert_eq!(replica.lock().unwrap().head(), Lsn(60));
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: I/O mode made one call, with no budget check at all.
#[test]
fn io_mode_checks_the_budget_after_every_chunk() {
    let (storage, driver) = primary(100);
    let replica = replica_at(&storage, 10);
    let mut i = intent(1, &[("r1", "a", 1)], &[("r1", SessionKind::CatchUp)]);
    i.catch_up_budget = Some(CatchUpBudget {
        max_duration_ticks: Some(2),
        ..CatchUpBudget::default()
    });
    driver.orchestrator().process_assignment(&i).unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), replica);
    let (f, report) = failure(
        CatchUpExecutor::new(&driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .execute(&mut io),
    );
    // Ticks 1, 2, 3: the third chunk's check sees 3 - 0 > 2.
    assert_eq!(
        f,
        ExecFailure::BudgetEscalated(BudgetViolation::DurationExceeded)
    );
    assert_eq!(report.steps, 2);
    assert_eq!(io.stats.stream_calls, 3);
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: a truncation-only plan in I/O mode streamed (105, 100], got 0 back and failed.
#[test]
fn truncation_is_executed_through_the_io() {
    let (storage, driver) = primary(100);
    let replica = replica_at(&storage, 100);
    replica.lock().unwrap().append_divergent(5, Epoch(1));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(105)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(io.stats.truncations, 1);
    assert_eq!(io.stats.stream_calls, 0);
    assert_eq!(report.truncated_to, Some(Lsn(100)));
    assert_eq!(
        replica.lock().unwrap().state(),
        storage.state_at(Lsn(100)).unwrap()
    );
}

// A replica that cannot truncate (the uncommitted tail reached its extent) needs a rebuild.
#[test]
fn truncation_below_replica_checkpoint_escalates_to_rebuild() {
    let (storage, driver) = primary(100);
    let replica = replica_at(&storage, 100);
    {
        let mut r = replica.lock().unwrap();
        r.append_divergent(5, Epoch(1));
        r.flush_to(Lsn(103));
    }
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(105)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let (f, _) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(
        f,
        ExecFailure::TruncateIoFailed(TransferError::TruncateBelowCheckpoint { .. })
    ));
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

// Reference: nothing waited for a replica barrier before declaring in_sync.
#[test]
fn completion_waits_for_the_replica_barrier() {
    let (storage, driver) = primary(100);
    let replica = replica_at(&storage, 70);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), replica);
    io.faults.barrier_short_by = 1;
    let (f, _) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(
        f,
        ExecFailure::CompletionRejected(EngineError::BarrierMissing { .. })
    ));
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_ne!(s.state(), ReplicaState::InSync);
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: RebuildExecutor discarded what the I/O reported; here a base installed at the
// wrong LSN fails the rebuild instead of being recorded as the planned one.
#[test]
fn rebuild_rejects_a_base_at_the_wrong_lsn() {
    struct WrongBase(ModelIo);
    impl CatchUpIo for WrongBase {
        fn truncate_after(&mut self, l: Lsn) -> std::result::Result<EntryId, TransferError> {
            self.0.truncate_after(l)
        }
        fn stream_wal_chunk(
            &mut self,
            a: Lsn,
            b: Lsn,
            m: u64,
        ) -> std::result::Result<WalChunk, TransferError> {
            self.0.stream_wal_chunk(a, b, m)
        }
        fn barrier(&mut self, t: Lsn) -> std::result::Result<Lsn, TransferError> {
            self.0.barrier(t)
        }
    }
    impl RebuildIo for WrongBase {
        fn begin_base(&mut self, b: &BaseRequest) -> std::result::Result<u64, TransferError> {
            self.0.begin_base(b)
        }
        fn transfer_base_chunk(
            &mut self,
            m: u64,
        ) -> std::result::Result<BaseChunkProgress, TransferError> {
            self.0.transfer_base_chunk(m)
        }
        fn finish_base(&mut self) -> std::result::Result<Lsn, TransferError> {
            self.0.finish_base().map(|l| Lsn(l.get() - 1))
        }
    }
    let (storage, driver) = primary(10);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let mut io = WrongBase(ModelIo::new(
        storage.clone(),
        Arc::new(Mutex::new(ModelReplica::new())),
    ));
    let (f, _) = failure(RebuildExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(f, ExecFailure::BaseLsnMismatch { .. }));
    assert_eq!(storage.pins_outstanding(), 0);
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

// The executor validates what the I/O reports: an entry count that does not match the LSN
// advance means the stream was not contiguous.
#[test]
fn io_reporting_a_non_contiguous_chunk_is_refused() {
    struct Liar;
    impl CatchUpIo for Liar {
        fn truncate_after(&mut self, l: Lsn) -> std::result::Result<EntryId, TransferError> {
            Ok(EntryId {
                lsn: l,
                epoch: Epoch(1),
                checksum: 0,
            })
        }
        fn stream_wal_chunk(
            &mut self,
            _a: Lsn,
            b: Lsn,
            _m: u64,
        ) -> std::result::Result<WalChunk, TransferError> {
            Ok(WalChunk {
                applied_to: b,
                entries: 1,
                bytes: 10,
            })
        }
        fn barrier(&mut self, t: Lsn) -> std::result::Result<Lsn, TransferError> {
            Ok(t)
        }
    }
    let (storage, driver) = primary(100);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    let (f, _) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut Liar));
    assert!(matches!(f, ExecFailure::IoProtocol { step: 0, .. }), "{f}");
    assert_eq!(storage.pins_outstanding(), 0);
}

// Reference: an epoch bump or endpoint change with no session left an in-sync sender in sync.
#[test]
fn epoch_or_endpoint_change_without_a_session_demotes_in_sync() {
    let (_storage, driver) = primary(10);
    let orch = driver.orchestrator();
    orch.process_assignment(&intent(
        1,
        &[("r1", "a", 1), ("r2", "b", 1)],
        &[("r1", SessionKind::CatchUp), ("r2", SessionKind::CatchUp)],
    ))
    .unwrap();
    for r in ["r1", "r2"] {
        driver
            .plan_recovery(&rid(r), ReplicaHandshake::unverified(Lsn(10)))
            .unwrap();
        assert_eq!(orch.sender(&rid(r)).unwrap().state(), ReplicaState::InSync);
    }
    orch.sender(&rid("r1")).unwrap().update_epoch(Epoch(2));
    let r2 = orch.sender(&rid("r2")).unwrap();
    r2.reassign(&ep("b2", 2), r2.epoch()).unwrap();
    assert_eq!(
        orch.sender(&rid("r1")).unwrap().state(),
        ReplicaState::Disconnected
    );
    assert_eq!(
        orch.sender(&rid("r2")).unwrap().state(),
        ReplicaState::Disconnected
    );
}

// Reference: invalidations caused by an epoch change inside Reconcile, and sessions lost on
// removed senders, were not logged; session_superseded did not name the replaced session.
#[test]
fn every_invalidation_in_an_assignment_is_logged() {
    let orch = RecoveryOrchestrator::new();
    let r1 = orch
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1), ("r2", "b", 1)],
            &[("r1", SessionKind::CatchUp), ("r2", SessionKind::CatchUp)],
        ))
        .unwrap();
    let old_r1 = r1.sessions_created[0].1;
    let old_r2 = r1.sessions_created[1].1;
    // Epoch 2, r2 removed, r1 now needs a rebuild.
    orch.process_assignment(&intent(
        2,
        &[("r1", "a", 1)],
        &[("r1", SessionKind::Rebuild)],
    ))
    .unwrap();
    let invalidated: Vec<(String, Option<SessionId>, String)> = orch
        .log()
        .events()
        .into_iter()
        .filter(|e| e.name() == "session_invalidated")
        .map(|e| (e.replica_id.to_string(), e.session_id, e.event.detail()))
        .collect();
    assert_eq!(
        invalidated,
        vec![
            ("r1".into(), Some(old_r1), "epoch_advanced_1_to_2".into()),
            ("r2".into(), Some(old_r2), "sender_stopped".into()),
        ]
    );
    // A kind change supersedes and names the replaced session.
    let r = orch
        .process_assignment(&intent(
            2,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let (_, old, new) = r.sessions_superseded[0].clone();
    let ev = orch.log().find("session_superseded").unwrap();
    assert_eq!(ev.session_id, Some(new));
    assert_eq!(
        ev.event,
        Event::SessionSuperseded {
            old,
            kind: SessionKind::CatchUp
        }
    );
}

// Reference: a re-delivered assignment superseded every active session again.
#[test]
fn redelivered_assignment_keeps_the_running_session() {
    let orch = RecoveryOrchestrator::new();
    let i = intent(1, &[("r1", "a", 1)], &[("r1", SessionKind::CatchUp)]);
    let first = orch.process_assignment(&i).unwrap();
    let sid = first.sessions_created[0].1;
    let again = orch.process_assignment(&i).unwrap();
    assert_eq!(again.sessions_kept, vec![(rid("r1"), sid)]);
    assert!(again.sessions_superseded.is_empty());
    assert_eq!(orch.sender(&rid("r1")).unwrap().session_id(), Some(sid));
}

// Reference: PlanRebuild did not check the session was still in init.
#[test]
fn plan_rebuild_requires_a_fresh_session() {
    let (_storage, driver) = primary(10);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    s.begin_connect(s.session_id().unwrap()).unwrap();
    let err = driver.plan_rebuild(&rid("r1")).unwrap_err();
    assert!(matches!(err, EngineError::WrongPhase { .. }));
}

// The authority check compares the session's epoch and endpoint version explicitly.
#[test]
fn session_records_the_authority_it_was_created_under() {
    let s = Sender::new(rid("r1"), ep("a", 3), Epoch(4));
    let sid = s
        .attach_session(Epoch(4), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    let snap = s.session_snapshot().unwrap();
    assert_eq!((snap.epoch, snap.endpoint_version), (Epoch(4), 3));
    s.reassign(&ep("a", 4), Epoch(4)).unwrap();
    assert!(s.begin_connect(sid).is_err());
}

// Reference: the log had no lock and Registry.Status nested read locks. Both types are
// Send + Sync here and survive concurrent use.
#[test]
fn registry_and_log_are_thread_safe() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
    assert_send_sync::<RecoveryLog>();
    assert_send_sync::<RecoveryOrchestrator>();
    assert_send_sync::<RecoveryDriver>();
    let orch = Arc::new(RecoveryOrchestrator::new());
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let orch = Arc::clone(&orch);
            thread::spawn(move || {
                for i in 0..200u64 {
                    let name = format!("r{}", (t * 7 + i) % 5);
                    let _ = orch.process_assignment(&intent(
                        1,
                        &[(name.as_str(), "a", i)],
                        &[(name.as_str(), SessionKind::CatchUp)],
                    ));
                }
            })
        })
        .collect();
    let reader = {
        let orch = Arc::clone(&orch);
        thread::spawn(move || {
            for _ in 0..500 {
                let st = orch.registry().status();
                assert_eq!(st.total_count, st.senders.len());
                let _ = orch.log().events();
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    assert_eq!(orch.registry().len(), 1);
}

// One orchestrator per volume: two volumes never touch each other's senders.
#[test]
fn volumes_have_independent_registries() {
    let v1 = RecoveryOrchestrator::new();
    let v2 = RecoveryOrchestrator::new();
    v1.process_assignment(&intent(1, &[("v1/s1", "a", 1)], &[]))
        .unwrap();
    v2.process_assignment(&intent(5, &[("v2/s1", "b", 1)], &[]))
        .unwrap();
    // An empty intent for v2 (for example a stale or draining role) leaves v1 alone.
    v2.process_assignment(&intent(5, &[], &[])).unwrap();
    assert_eq!(v1.registry().len(), 1);
    assert_eq!(v2.registry().len(), 0);
    assert_eq!(v1.registry().epoch(), Epoch(1));
}

// A failed rebuild pin leaves the replica needing a rebuild, with the reason recorded.
#[test]
fn rebuild_wal_pin_failure_releases_the_snapshot_pin() {
    let (storage, driver) = primary(100);
    storage.set_checkpoint(Some(Lsn(50)), true);
    storage.advance_tail(Lsn(50));
    storage.fail_next_pin(PinKind::WalRetention);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    assert!(driver.plan_rebuild(&rid("r1")).is_err());
    assert_eq!(storage.pins_outstanding(), 0);
    assert_eq!(
        storage.pins_acquired(),
        1,
        "the snapshot pin was acquired then released"
    );
    let ev = driver
        .orchestrator()
        .log()
        .find("session_invalidated")
        .unwrap();
    assert_eq!(ev.event.detail(), "wal_pin_failed_during_rebuild");
}

// Found by `no_pin_outstanding_after_any_executor_run`: a replica holding entries 9 and 10
// from an old primary (epoch 9) reported F = 10 = C and was declared in sync with different
// bytes. The reference compares LSNs only and has the same flaw. With the replica's tip
// identity, the handshake sees the divergence and escalates to rebuild.
#[test]
fn divergent_replica_at_committed_lsn_is_not_declared_in_sync() {
    let (storage, driver) = primary(10);
    let replica = replica_at(&storage, 8);
    replica.lock().unwrap().append_divergent(2, Epoch(9));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let hs = replica.lock().unwrap().handshake();
    assert_eq!(hs.flushed(), Lsn(10));
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    let proof = plan.proof().unwrap();
    assert_eq!(proof.reason.name(), "divergent_history");
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    // The rebuild that follows makes the bytes equal.
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    RebuildExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(
        replica.lock().unwrap().state(),
        storage.state_at(Lsn(10)).unwrap()
    );
    assert_eq!(s.state(), ReplicaState::InSync);
}

// A replica ahead of committed whose divergence reaches below the committed point: truncating
// to C leaves a tip that is not the primary's entry at C, so the executor refuses to declare
// it in sync and escalates.
#[test]
fn divergence_below_the_truncation_point_escalates() {
    let (storage, driver) = primary(10);
    let replica = replica_at(&storage, 8);
    replica.lock().unwrap().append_divergent(4, Epoch(9));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let hs = replica.lock().unwrap().handshake();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.truncation().map(|t| t.to), Some(Lsn(10)));
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let (f, _) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(f, ExecFailure::TruncateDiverged { .. }), "{f}");
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert_eq!(storage.pins_outstanding(), 0);
}

// Found by the port of the reference tests: after a failover bump (`advance_epoch`) the
// registry's fence stayed at the old epoch, so a late intent from that epoch could still remove
// and re-address senders.
#[test]
fn late_intent_after_an_epoch_bump_is_refused() {
    let orch = RecoveryOrchestrator::new();
    orch.process_assignment(&intent(1, &[("r1", "a", 1), ("r2", "b", 1)], &[]))
        .unwrap();
    orch.advance_epoch(Epoch(2));
    let late = intent(1, &[("r1", "z", 9)], &[]);
    assert!(matches!(
        orch.process_assignment(&late),
        Err(EngineError::StaleIntent { .. })
    ));
    assert_eq!(orch.registry().len(), 2);
    assert_eq!(orch.sender(&rid("r1")).unwrap().endpoint(), ep("a", 1));
    // The same holds after `invalidate_epoch` alone.
    let orch = RecoveryOrchestrator::new();
    orch.process_assignment(&intent(1, &[("r1", "a", 1)], &[]))
        .unwrap();
    orch.invalidate_epoch(Epoch(3));
    assert!(orch.process_assignment(&intent(2, &[], &[])).is_err());
    assert_eq!(orch.registry().len(), 1);
}

// Found by the port: a handshake on a rebuild session failed only after connecting it, leaving
// it stuck in `handshake`, so `plan_rebuild` then refused it.
#[test]
fn handshake_on_a_rebuild_session_is_refused_without_touching_it() {
    let (_storage, driver) = primary(10);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let err = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongSessionKind { .. }));
    let snap = driver
        .orchestrator()
        .sender(&rid("r1"))
        .unwrap()
        .session_snapshot()
        .unwrap();
    assert_eq!(snap.phase, SessionPhase::Init);
    assert!(driver.plan_rebuild(&rid("r1")).is_ok());
}

// A replica that needs a rebuild keeps needing one when the epoch or endpoint changes under
// its rebuild session: the session is fenced, but the replica may hold a partial image.
#[test]
fn fencing_a_rebuild_session_keeps_needs_rebuild() {
    let (_storage, driver) = primary(10);
    let orch = driver.orchestrator();
    orch.process_assignment(&intent(
        1,
        &[("r1", "a", 1), ("r2", "b", 1)],
        &[("r1", SessionKind::Rebuild), ("r2", SessionKind::Rebuild)],
    ))
    .unwrap();
    let r1 = orch.sender(&rid("r1")).unwrap();
    let r2 = orch.sender(&rid("r2")).unwrap();
    r1.begin_connect(r1.session_id().unwrap()).unwrap();
    assert_eq!(r1.state(), ReplicaState::Connecting);
    orch.advance_epoch(Epoch(2));
    r2.reassign(&ep("b2", 2), Epoch(2)).unwrap();
    assert_eq!(r1.state(), ReplicaState::NeedsRebuild);
    assert_eq!(r2.state(), ReplicaState::NeedsRebuild);
    assert!(!r1.has_active_session() && !r2.has_active_session());
    assert_eq!(orch.registry().status().rebuilding, 2);
}

// Found by the concurrent-writer chain scenario: the primary's flusher recycled the replica's
// range between the history snapshot and the WAL pin. The plan fails closed, and the replica,
// now beyond retention, is marked as needing a rebuild rather than merely disconnected.
#[test]
fn wal_recycled_between_history_and_pin_escalates() {
    struct RacingStorage(MemStorage);
    impl StorageAdapter for RacingStorage {
        fn get_retained_history(&self) -> std::result::Result<RetainedHistory, StorageError> {
            self.0.get_retained_history()
        }
        fn entry_id(&self, lsn: Lsn) -> std::result::Result<Option<EntryId>, StorageError> {
            self.0.entry_id(lsn)
        }
        fn pin_snapshot(&self, lsn: Lsn) -> std::result::Result<SnapshotPin, StorageError> {
            self.0.pin_snapshot(lsn)
        }
        fn pin_wal_retention(&self, after: Lsn) -> std::result::Result<RetentionPin, StorageError> {
            // The flusher wins the race.
            self.0.advance_tail(Lsn(90));
            self.0.pin_wal_retention(after)
        }
        fn pin_full_base(&self, lsn: Lsn) -> std::result::Result<FullBasePin, StorageError> {
            self.0.pin_full_base(lsn)
        }
    }
    let storage = MemStorage::new();
    let head = storage.write_n(100);
    storage.commit(head).unwrap();
    let driver = RecoveryDriver::new(Arc::new(RacingStorage(storage.clone())));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let err = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(50)))
        .unwrap_err();
    assert!(matches!(
        err,
        EngineError::PinFailed {
            kind: PinKind::WalRetention,
            error: StorageError::Recycled { .. }
        }
    ));
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
    assert_eq!(storage.pins_outstanding(), 0);
}
