//! Regression tests for the engine defects an adversarial review found (issue 9). Each test is
//! named after its defect and fails on the engine as it was before the fix; the comment above
//! each says how the old engine failed it. The interleavings behind defects 1 and 2 are also
//! explored systematically by the model checker (`modelcheck/`).

use engine::testing::SenderProtocol;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::*;

mod common;
use common::compact::{Tamper, ep, failure, intent, primary, replica_at, rid};

fn catch_up_target(driver: &RecoveryDriver, epoch: u64) {
    driver
        .orchestrator()
        .process_assignment(&intent(
            epoch,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
}

fn sender(driver: &RecoveryDriver, id: &str) -> Arc<Sender> {
    driver.orchestrator().sender(&rid(id)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent assignments let an older epoch win.
// ---------------------------------------------------------------------------------------------

// The losing interleaving, replayed in order: the epoch-3 assignment reached the sender first,
// then the epoch-2 assignment's re-addressing arrived. The old sender took the endpoint without
// comparing epochs (and invalidated the epoch-3 session); now it refuses and changes nothing.
#[test]
fn concurrent_assignments_never_let_an_older_epoch_win() {
    let orch = RecoveryOrchestrator::new();
    orch.process_assignment(&intent(
        3,
        &[("r1", "new", 3)],
        &[("r1", SessionKind::CatchUp)],
    ))
    .unwrap();
    let s = orch.sender(&rid("r1")).unwrap();
    let sid = s.session_id().unwrap();
    let err = s.reassign(&ep("old", 2), Epoch(2)).unwrap_err();
    assert!(
        matches!(err, EngineError::StaleAssignment { .. }),
        "{err:?}"
    );
    assert_eq!(s.endpoint(), ep("new", 3));
    assert_eq!(s.epoch(), Epoch(3));
    assert_eq!(
        s.session_id(),
        Some(sid),
        "the newer intent's session survives"
    );
    // A late supersede from the older intent is refused too.
    assert!(
        s.supersede_session(
            Epoch(2),
            SessionKind::Rebuild,
            InvalidateReason::AssignmentIntent,
            SessionOptions::default()
        )
        .is_err()
    );
    assert_eq!(s.session_id(), Some(sid));
}

// The same race with real threads, bounded: whichever thread wins, every sender ends at epoch 3
// with the epoch-3 endpoint, and no epoch-3 session was invalidated by the epoch-2 intent.
#[test]
fn concurrent_assignments_at_two_epochs_end_at_the_newer_one() {
    let ids = ["r1", "r2", "r3", "r4"];
    for round in 0..300 {
        let orch = Arc::new(RecoveryOrchestrator::new());
        let at = |epoch: u64, host: &str| {
            let list: Vec<(&str, &str, u64)> = ids.iter().map(|id| (*id, host, epoch)).collect();
            let targets: Vec<(&str, SessionKind)> =
                ids.iter().map(|id| (*id, SessionKind::CatchUp)).collect();
            intent(epoch, &list, &targets)
        };
        orch.process_assignment(&at(1, "one")).unwrap();
        let (i2, i3) = (at(2, "two"), at(3, "three"));
        let o2 = Arc::clone(&orch);
        let o3 = Arc::clone(&orch);
        let t2 = std::thread::spawn(move || o2.process_assignment(&i2));
        let t3 = std::thread::spawn(move || o3.process_assignment(&i3));
        let _ = t2.join().unwrap();
        let r3 = t3.join().unwrap().unwrap();
        for id in ids {
            let s = orch.sender(&rid(id)).unwrap();
            assert_eq!(s.epoch(), Epoch(3), "round {round}: {id}");
            assert_eq!(s.endpoint(), ep("three", 3), "round {round}: {id}");
            let snap = s.session_snapshot().expect("a session of the newer intent");
            assert_eq!(snap.epoch, Epoch(3), "round {round}: {id}");
        }
        // Every session the epoch-3 intent created or kept is still the live one.
        for (id, sid) in r3.sessions_created.iter().chain(&r3.sessions_kept) {
            assert_eq!(orch.sender(id).unwrap().session_id(), Some(*sid));
        }
    }
}

// One sender alone raised to a newer epoch (`update_sender_epoch`): an intent the registry
// still accepts must neither re-address nor remove it.
#[test]
fn a_sender_raised_alone_refuses_an_older_intent() {
    let orch = RecoveryOrchestrator::new();
    orch.process_assignment(&intent(1, &[("r1", "a", 1), ("r2", "b", 1)], &[]))
        .unwrap();
    orch.update_sender_epoch(&rid("r1"), Epoch(5)).unwrap();
    // Re-addresses r1 and r2.
    let res = orch
        .process_assignment(&intent(3, &[("r1", "z", 3), ("r2", "y", 3)], &[]))
        .unwrap();
    assert_eq!(res.refused.len(), 1);
    assert_eq!(res.refused[0].0, rid("r1"));
    let r1 = orch.sender(&rid("r1")).unwrap();
    assert_eq!(r1.endpoint(), ep("a", 1), "an older intent re-addressed r1");
    assert_eq!(r1.epoch(), Epoch(5));
    assert_eq!(orch.sender(&rid("r2")).unwrap().endpoint(), ep("y", 3));
    // Omits r1: it stays.
    let res = orch
        .process_assignment(&intent(4, &[("r2", "y", 3)], &[]))
        .unwrap();
    assert!(res.removed.is_empty(), "an older intent removed r1");
    assert!(!orch.sender(&rid("r1")).unwrap().stopped());
}

// ---------------------------------------------------------------------------------------------
// 2. A zero-gap (or needs-rebuild) plan can carry someone else's session.
// ---------------------------------------------------------------------------------------------

// The old driver read the sender's session after the handshake had finished, so a plan named
// whatever session was there by then (none, or another thread's). The plan now names the
// session its handshake ran under, and cancelling it changes nothing.
#[test]
fn zero_gap_plan_carries_its_own_session() {
    let (_storage, driver) = primary(10);
    catch_up_target(&driver, 1);
    let handshake_session = sender(&driver, "r1").session_id().unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::ZeroGap);
    assert_eq!(plan.session_id(), Some(handshake_session));
    // Another thread attaches a session now; cancelling the finished plan must not touch it.
    let s = sender(&driver, "r1");
    let other = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    assert!(!driver.cancel_plan(plan, "late"));
    assert_eq!(s.session_id(), Some(other));
    assert_eq!(s.state(), ReplicaState::InSync);
}

#[test]
fn needs_rebuild_plan_carries_its_own_session() {
    let (storage, driver) = primary(20);
    storage.advance_tail(Lsn(10));
    catch_up_target(&driver, 1);
    let handshake_session = sender(&driver, "r1").session_id().unwrap();
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(5)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert_eq!(plan.session_id(), Some(handshake_session));
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    let rebuild = sender(&driver, "r1").session_id().unwrap();
    assert!(!driver.cancel_plan(plan, "late"));
    assert_eq!(sender(&driver, "r1").session_id(), Some(rebuild));
}

// ---------------------------------------------------------------------------------------------
// 3. The progress deadline never fires on the executor path.
// ---------------------------------------------------------------------------------------------

// Every chunk takes 10 ticks against a progress deadline of 5. The old executor recorded the
// chunk's tick as "last progress" and then checked the budget at that same tick (elapsed 0),
// so the recovery completed in sync.
#[test]
fn progress_deadline_fires_when_every_chunk_is_slow() {
    let (storage, driver) = primary(100);
    let budget = CatchUpBudget {
        progress_deadline_ticks: Some(5),
        ..CatchUpBudget::default()
    };
    let mut i = intent(1, &[("r1", "a", 1)], &[("r1", SessionKind::CatchUp)]);
    i.catch_up_budget = Some(budget);
    driver.orchestrator().process_assignment(&i).unwrap();
    let replica = replica_at(&storage, 10);
    let plan = driver
        .plan_recovery(&rid("r1"), replica.lock().unwrap().handshake())
        .unwrap();
    let mut now = 0u64;
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let (f, report) = failure(
        CatchUpExecutor::new(&driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .with_clock(|| {
                now += 10;
                Tick(now)
            })
            .execute(&mut io),
    );
    assert_eq!(
        f,
        ExecFailure::BudgetEscalated(BudgetViolation::ProgressStalled)
    );
    assert_eq!(report.entries_applied, 10, "the first chunk was applied");
    let s = sender(&driver, "r1");
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
    assert_eq!(storage.pins_outstanding(), 0);
}

// Chunks within the deadline complete (the fix does not stall healthy recoveries).
#[test]
fn progress_deadline_spares_chunks_within_it() {
    let (storage, driver) = primary(100);
    let mut i = intent(1, &[("r1", "a", 1)], &[("r1", SessionKind::CatchUp)]);
    i.catch_up_budget = Some(CatchUpBudget {
        progress_deadline_ticks: Some(5),
        ..CatchUpBudget::default()
    });
    driver.orchestrator().process_assignment(&i).unwrap();
    let replica = replica_at(&storage, 10);
    let plan = driver
        .plan_recovery(&rid("r1"), replica.lock().unwrap().handshake())
        .unwrap();
    let mut now = 0u64;
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
    assert_eq!(report.entries_applied, 90);
    assert_eq!(report.final_state, ReplicaState::InSync);
}

// ---------------------------------------------------------------------------------------------
// 4. Reports from the I/O are trusted.
// ---------------------------------------------------------------------------------------------

fn tamper_wal(
    storage: &MemStorage,
    replica: &Arc<Mutex<ModelReplica>>,
    wal: impl FnMut(WalChunk) -> WalChunk,
) -> impl RebuildIo {
    Tamper {
        inner: ModelIo::new(storage.clone(), Arc::clone(replica)),
        wal,
        base: |c| c,
        announce: None,
    }
}

/// Runs a catch-up from 10 to 100 through `io` and returns the failure, after checking that
/// the failure closed everything.
fn catch_up_fails(
    io: &mut dyn CatchUpIo,
    storage: &MemStorage,
    driver: &RecoveryDriver,
) -> ExecFailure {
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let (f, _) = failure(
        CatchUpExecutor::new(driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .execute(io),
    );
    let s = sender(driver, "r1");
    assert!(!s.has_active_session(), "{f}: session left active");
    assert_ne!(s.state(), ReplicaState::InSync);
    assert_eq!(storage.pins_outstanding(), 0, "{f}: pins left");
    f
}

// The old executor added byte counts unchecked: u64::MAX bytes per chunk panicked (debug) or
// wrapped (release), and after the panic the session stayed active.
#[test]
fn io_byte_count_overflow_fails_closed() {
    let (storage, driver) = primary(100);
    catch_up_target(&driver, 1);
    let replica = replica_at(&storage, 10);
    let mut io = tamper_wal(&storage, &replica, |mut c| {
        c.bytes = u64::MAX;
        c
    });
    let f = catch_up_fails(&mut io, &storage, &driver);
    assert!(matches!(f, ExecFailure::IoProtocol { step: 1, .. }), "{f}");
    assert!(f.to_string().contains("overflow"), "{f}");
}

// The old executor accepted a chunk of more entries than it asked for.
#[test]
fn io_chunk_larger_than_the_maximum_is_refused() {
    let (storage, driver) = primary(100);
    catch_up_target(&driver, 1);
    let replica = replica_at(&storage, 10);
    // An I/O that ignores max_entries and applies 30 entries at once.
    struct Greedy(ModelIo);
    impl CatchUpIo for Greedy {
        fn truncate_after(&mut self, lsn: Lsn) -> std::result::Result<EntryId, TransferError> {
            self.0.truncate_after(lsn)
        }
        fn stream_wal_chunk(
            &mut self,
            after: Lsn,
            up_to: Lsn,
            _max: u64,
        ) -> std::result::Result<WalChunk, TransferError> {
            self.0.stream_wal_chunk(after, up_to, 30)
        }
        fn barrier(&mut self, target: Lsn) -> std::result::Result<Lsn, TransferError> {
            self.0.barrier(target)
        }
    }
    let mut io = Greedy(ModelIo::new(storage.clone(), Arc::clone(&replica)));
    let f = catch_up_fails(&mut io, &storage, &driver);
    assert!(f.to_string().contains("exceeds the maximum of 10"), "{f}");
}

fn rebuild_plan(storage: &MemStorage, driver: &RecoveryDriver) -> RecoveryPlan {
    rebuild_plan_result(storage, driver).unwrap()
}

fn rebuild_fails(
    io: &mut dyn RebuildIo,
    storage: &MemStorage,
    driver: &RecoveryDriver,
) -> ExecFailure {
    let plan = rebuild_plan(storage, driver);
    let (f, _) = failure(
        RebuildExecutor::new(driver, plan)
            .with_options(ExecutorOptions {
                max_base_chunk_bytes: 64,
                ..ExecutorOptions::default()
            })
            .execute(io),
    );
    let s = sender(driver, "r1");
    assert!(!s.has_active_session(), "{f}: session left active");
    assert_eq!(s.state(), ReplicaState::NeedsRebuild, "{f}");
    assert_eq!(storage.pins_outstanding(), 0, "{f}: pins left");
    f
}

// The old executor summed base bytes without comparing them to the size `begin_base`
// announced.
#[test]
fn io_base_transfer_beyond_the_announced_size_is_refused() {
    let (storage, driver) = primary(40);
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    let mut io = Tamper {
        inner: ModelIo::new(storage.clone(), Arc::clone(&replica)),
        wal: |c| c,
        base: |mut c: BaseChunkProgress| {
            c.bytes *= 1000;
            c.bytes_sent = c.bytes;
            c
        },
        announce: None,
    };
    let f = rebuild_fails(&mut io, &storage, &driver);
    assert!(f.to_string().contains("overruns the image"), "{f}");
}

// A base that claims to be done short of the size it announced is incomplete.
#[test]
fn io_base_transfer_ending_short_is_refused() {
    let (storage, driver) = primary(40);
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    let mut io = Tamper {
        inner: ModelIo::new(storage.clone(), Arc::clone(&replica)),
        wal: |c| c,
        base: |c| c,
        announce: Some(1 << 30),
    };
    let f = rebuild_fails(&mut io, &storage, &driver);
    assert!(f.to_string().contains("ended at"), "{f}");
}

// The old executor only refused a chunk that reported nothing at all; one that sent bytes but
// covered none of the image, and was not done, was accepted (and could repeat forever).
#[test]
fn io_base_chunk_sending_bytes_without_progress_is_refused() {
    let (storage, driver) = primary(40);
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    let mut io = Tamper {
        inner: ModelIo::new(storage.clone(), Arc::clone(&replica)),
        wal: |c| c,
        base: |_c| BaseChunkProgress {
            bytes: 0,
            bytes_sent: 16,
            done: false,
        },
        announce: None,
    };
    let f = rebuild_fails(&mut io, &storage, &driver);
    assert!(f.to_string().contains("no progress"), "{f}");
}

// A panic in the I/O unwinds through the executor: the session must not stay active and the
// pins must be released (the plan fences its session as `executor_aborted` when dropped).
#[test]
fn a_panic_in_the_io_leaves_no_session_active() {
    let (storage, driver) = primary(100);
    catch_up_target(&driver, 1);
    let replica = replica_at(&storage, 10);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let sid = plan.session_id().unwrap();
    let mut calls = 0;
    let mut io = tamper_wal(&storage, &replica, move |c| {
        calls += 1;
        assert!(calls < 3, "injected I/O panic");
        c
    });
    let r = catch_unwind(AssertUnwindSafe(|| {
        CatchUpExecutor::new(&driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .execute(&mut io)
    }));
    assert!(r.is_err(), "the injected panic propagates");
    let s = sender(&driver, "r1");
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
    assert_eq!(storage.pins_outstanding(), 0);
    let log = driver.orchestrator().log();
    let inv = log.find("session_invalidated").unwrap();
    assert_eq!(inv.session_id, Some(sid));
    assert_eq!(inv.event.detail(), "executor_aborted");
}

// ---------------------------------------------------------------------------------------------
// 5. Epoch invalidation leaves old proofs standing.
// ---------------------------------------------------------------------------------------------

// The old `invalidate_epoch` fenced sessions but left sender epochs alone: a replica proven in
// sync at epoch 1 stayed in sync, and a session attached at epoch 1 afterwards completed.
#[test]
fn epoch_invalidation_ends_old_proofs() {
    let (_storage, driver) = primary(10);
    catch_up_target(&driver, 1);
    driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let s = sender(&driver, "r1");
    assert_eq!(s.state(), ReplicaState::InSync);
    driver.orchestrator().invalidate_epoch(Epoch(2));
    assert_ne!(s.state(), ReplicaState::InSync, "an epoch-1 proof survived");
    // A session of the old epoch cannot be attached any more, let alone complete.
    assert!(
        s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
            .is_err()
    );
}

// The old fence left the sender at epoch 1, so a session attached at epoch 1 after the fence
// was accepted and completed to in sync.
#[test]
fn epoch_invalidation_stops_a_late_old_epoch_session_from_completing() {
    let (_storage, driver) = primary(10);
    catch_up_target(&driver, 1);
    let s = sender(&driver, "r1");
    driver.orchestrator().invalidate_epoch(Epoch(2));
    let _ = s.invalidate_session("drop the fenced slot".into(), Demotion::Disconnected);
    let late = s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default());
    if let Ok(sid) = late {
        s.begin_connect(sid).unwrap();
        s.record_handshake(sid, Lsn(10), Lsn(10)).unwrap();
        s.record_barrier(sid, Lsn(10)).unwrap();
        let _ = s.complete_session_by_id(sid);
    }
    assert_ne!(
        s.state(),
        ReplicaState::InSync,
        "an epoch-1 session completed"
    );
    assert!(late.is_err());
}

// ---------------------------------------------------------------------------------------------
// 6. State can be set without proof.
// ---------------------------------------------------------------------------------------------

// The old `invalidate_session` took any target state (including in sync) and acted on stopped
// senders. A demotion now names one of three states, and a stopped sender is left alone.
#[test]
fn state_without_proof_demotion_skips_stopped_senders() {
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    s.stop();
    assert!(
        s.invalidate_session("x".into(), Demotion::NeedsRebuild)
            .is_none()
    );
    assert_eq!(s.state(), ReplicaState::Disconnected);
    // A demotion never lifts needs_rebuild.
    let s = Sender::new(rid("r2"), ep("a", 1), Epoch(1));
    s.invalidate_session("x".into(), Demotion::NeedsRebuild);
    s.invalidate_session("y".into(), Demotion::Disconnected);
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

// The old sender let a caller-stated range `(F, F]` complete as a zero gap without any proof
// or barrier: `record_handshake(id, 100, 100)` then `complete_session_by_id` gave in sync.
#[test]
fn state_without_proof_caller_stated_zero_gap_needs_a_barrier() {
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(100), Lsn(100)).unwrap();
    assert!(matches!(
        s.complete_session_by_id(sid),
        Err(EngineError::BarrierMissing { .. })
    ));
    assert_ne!(s.state(), ReplicaState::InSync);
    // A proof from retained history still completes a zero gap at once.
    let h = RetainedHistory {
        head_lsn: Lsn(100),
        committed_lsn: Lsn(100),
        ..RetainedHistory::default()
    };
    let s = Sender::new(rid("r2"), ep("a", 1), Epoch(1));
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake_from_history(sid, Lsn(100), &h).unwrap();
    s.complete_session_by_id(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
}

// ---------------------------------------------------------------------------------------------
// 7. A dropped plan strands its replica.
// ---------------------------------------------------------------------------------------------

// The old plan released its pins when dropped but left the session in `handshake`; the
// re-delivered assignment kept that session and `plan_recovery` then failed for good.
#[test]
fn dropped_plan_leaves_the_replica_recoverable() {
    let (storage, driver) = primary(100);
    catch_up_target(&driver, 1);
    let replica = replica_at(&storage, 10);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    assert_eq!(storage.pins_outstanding(), 1);
    drop(plan);
    assert_eq!(storage.pins_outstanding(), 0);
    let s = sender(&driver, "r1");
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
    // The re-delivered assignment starts over and the replica recovers.
    catch_up_target(&driver, 1);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(replica.lock().unwrap().head(), Lsn(100));
}

// An executor built and dropped without running is a dropped plan too.
#[test]
fn dropped_executor_leaves_the_replica_recoverable() {
    let (storage, driver) = primary(100);
    catch_up_target(&driver, 1);
    let plan = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    drop(CatchUpExecutor::new(&driver, plan));
    assert_eq!(storage.pins_outstanding(), 0);
    assert!(!sender(&driver, "r1").has_active_session());
}

// ---------------------------------------------------------------------------------------------
// The same classes elsewhere.
// ---------------------------------------------------------------------------------------------

// Check-then-act: two planners raced for one rebuild session and both got a plan; the failure
// of the second (its `begin_connect` was refused) invalidated the session the first was
// running. The second planner is now refused before it pins anything.
#[test]
fn two_rebuild_planners_do_not_share_a_session() {
    let (storage, driver) = primary(40);
    let plan = rebuild_plan(&storage, &driver);
    let pins = storage.pins_outstanding();
    let err = driver.plan_rebuild(&rid("r1")).unwrap_err();
    assert!(matches!(err, EngineError::AlreadyPlanned { .. }), "{err:?}");
    assert_eq!(
        storage.pins_outstanding(),
        pins,
        "the refused planner pinned"
    );
    let replica = Arc::new(Mutex::new(ModelReplica::new()));
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
    let report = RebuildExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.final_state, ReplicaState::InSync);
}

// Values from storage: a history that breaks the storage contract is refused before any
// decision, and an entry lookup answered with another LSN's entry is refused.
#[test]
fn inconsistent_history_from_storage_is_refused() {
    struct Liar(MemStorage, RetainedHistory);
    impl StorageAdapter for Liar {
        fn get_retained_history(&self) -> std::result::Result<RetainedHistory, StorageError> {
            Ok(self.1.clone())
        }
        fn entry_id(&self, _lsn: Lsn) -> std::result::Result<Option<EntryId>, StorageError> {
            self.0.entry_id(Lsn(1))
        }
        fn pin_snapshot(&self, lsn: Lsn) -> std::result::Result<SnapshotPin, StorageError> {
            self.0.pin_snapshot(lsn)
        }
        fn pin_wal_retention(&self, after: Lsn) -> std::result::Result<RetentionPin, StorageError> {
            self.0.pin_wal_retention(after)
        }
        fn pin_full_base(&self, lsn: Lsn) -> std::result::Result<FullBasePin, StorageError> {
            self.0.pin_full_base(lsn)
        }
    }
    let storage = MemStorage::new();
    storage.write_n(10);
    storage.commit(Lsn(10)).unwrap();
    let bad = RetainedHistory {
        head_lsn: Lsn(10),
        tail_lsn: Lsn(20),
        committed_lsn: Lsn(10),
        ..RetainedHistory::default()
    };
    let driver = RecoveryDriver::new(Arc::new(Liar(storage.clone(), bad)));
    catch_up_target(&driver, 1);
    let err = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::InconsistentHistory(_)),
        "{err:?}"
    );
    assert_ne!(sender(&driver, "r1").state(), ReplicaState::InSync);

    let good = storage.get_retained_history().unwrap();
    let driver = RecoveryDriver::new(Arc::new(Liar(storage.clone(), good)));
    catch_up_target(&driver, 1);
    let tip = storage.entry_id(Lsn(10)).unwrap().unwrap();
    let err = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::new(Lsn(10), tip))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::WrongEntry {
                requested: Lsn(10),
                returned: Lsn(1)
            }
        ),
        "{err:?}"
    );
    assert_ne!(sender(&driver, "r1").state(), ReplicaState::InSync);
}

// Values from storage: a pin for another LSN than the one asked for is released and refused
// (the old driver put whatever pin storage returned into the plan, and the executor then
// shipped the wrong image or range).
#[test]
fn a_pin_for_another_lsn_is_refused() {
    struct WrongPins(MemStorage);
    impl StorageAdapter for WrongPins {
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
            self.0.pin_wal_retention(after.next())
        }
        fn pin_full_base(&self, lsn: Lsn) -> std::result::Result<FullBasePin, StorageError> {
            self.0.pin_full_base(Lsn(lsn.0 - 1))
        }
    }
    let storage = MemStorage::new();
    storage.write_n(40);
    storage.commit(Lsn(40)).unwrap();
    let driver = RecoveryDriver::new(Arc::new(WrongPins(storage.clone())));
    catch_up_target(&driver, 1);
    let err = driver
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PinFailed {
                error: StorageError::WrongPin {
                    requested: Lsn(10),
                    pinned: Lsn(11)
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(storage.pins_outstanding(), 0);
    assert!(!sender(&driver, "r1").has_active_session());
    let err = rebuild_plan_result(&storage, &driver).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PinFailed {
                error: StorageError::WrongPin { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(storage.pins_outstanding(), 0);
    assert_eq!(sender(&driver, "r1").state(), ReplicaState::NeedsRebuild);
}

fn rebuild_plan_result(storage: &MemStorage, driver: &RecoveryDriver) -> Result<RecoveryPlan> {
    storage.set_checkpoint(None, false);
    driver
        .orchestrator()
        .process_assignment(&intent(
            1,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::Rebuild)],
        ))
        .unwrap();
    driver.plan_rebuild(&rid("r1"))
}

// State without proof: a proof built by hand that claims a zero gap its history does not
// support is refused (the old sender took the proof's outcome as given).
#[test]
fn state_without_proof_a_forged_proof_is_refused() {
    let h = RetainedHistory {
        head_lsn: Lsn(100),
        committed_lsn: Lsn(100),
        ..RetainedHistory::default()
    };
    let mut forged = h.prove_recoverability(Lsn(40));
    forged.reason = ProofReason::ZeroGap;
    forged.recoverable = true;
    let s = Sender::new(rid("r1"), ep("a", 1), Epoch(1));
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    let err = s.record_handshake_with_proof(sid, &h, &forged).unwrap_err();
    assert!(matches!(err, EngineError::ProofMismatch { .. }), "{err:?}");
    assert!(s.complete_session_by_id(sid).is_err());
    assert_ne!(s.state(), ReplicaState::InSync);
    // The orchestrator refuses an anchor entry for another LSN than the replica's.
    let orch = RecoveryOrchestrator::new();
    orch.process_assignment(&intent(
        1,
        &[("r1", "a", 1)],
        &[("r1", SessionKind::CatchUp)],
    ))
    .unwrap();
    let tip = EntryId {
        lsn: Lsn(100),
        epoch: Epoch(1),
        checksum: 7,
    };
    let wrong = EntryId {
        lsn: Lsn(99),
        ..tip
    };
    let err = orch
        .execute_recovery_with_anchor(
            &rid("r1"),
            &ReplicaHandshake::new(Lsn(100), tip),
            &h,
            Some(wrong),
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongEntry { .. }), "{err:?}");
    assert_ne!(
        orch.sender(&rid("r1")).unwrap().state(),
        ReplicaState::InSync
    );
}
