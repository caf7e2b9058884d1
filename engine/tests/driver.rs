//! The recovery driver (reference `driver_test.go`, items 60-73): plans from a `MemStorage`
//! primary, the pins each plan takes (real pins, counted by the store), pin-failure cleanup,
//! and execution of the plans through the executors with model data transfer.

mod common;

use common::{
    assert_data_matches, assign, chunked, driver, entry_id, ep, handshake, history_of, model_io,
    names_for, only_detail, primary, replica, replica_ahead, rid,
};
use engine::ReplicaHandshake;
use engine::testing::MemStorage;
use engine::testing::SenderProtocol;
use engine::{
    AnchorCheck, CatchUpExecutor, EngineError, Lsn, Outcome, PinKind, ProofReason, RebuildExecutor,
    RebuildReason, RebuildSource, RecoveryDriver, RecoveryPath, ReplicaState, SessionKind,
    SessionPhase, StorageError,
};

fn with_target(p: &MemStorage, kind: SessionKind) -> RecoveryDriver {
    let d = driver(p);
    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", kind)],
    );
    d
}

#[test]
fn plan_recovery_catch_up() {
    let p = primary(100, 100, 30, None);
    let r = replica(&p, 70);
    let d = with_target(&p, SessionKind::CatchUp);
    let sid = d.orchestrator().sender(&rid("r1")).unwrap().session_id();

    // The replica reports its tip, so its log is matched against the primary's at F.
    let plan = d.plan_recovery(&rid("r1"), handshake(&r)).unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(plan.session_id(), sid);
    assert!(plan.catch_up().unwrap().verified);
    assert_eq!(plan.catch_up().map(|c| c.from), Some(Lsn(70)));
    assert_eq!(plan.target(), Some(Lsn(100)));
    assert_eq!(plan.truncation().map(|t| t.to), None);
    let proof = plan.proof().unwrap();
    assert!(proof.recoverable);
    assert_eq!(proof.reason.name(), "gap_within_retention");
    assert_eq!(
        proof.anchor,
        AnchorCheck::Matched(entry_id(&p, 70).unwrap())
    );
    let pin = plan
        .catch_up()
        .and_then(|c| c.pin())
        .expect("catch-up pins the WAL");
    assert_eq!(pin.start_lsn, Lsn(70));
    assert_eq!(plan.pins_held(), 1);
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);
    assert_eq!(p.pins_outstanding(), 1);
    assert_eq!(
        only_detail(d.orchestrator().log(), "plan_catchup"),
        format!("replay=(70, 100] wal_pin={}", pin.pin_id)
    );
    // The pin is real: the primary cannot recycle what the plan still needs.
    assert_eq!(p.advance_tail(Lsn(90)), Lsn(70));

    // Executed by the catch-up executor (not the test-only helper), with data moved.
    let mut io = model_io(&p, &r);
    let report = CatchUpExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::CatchUp);
    assert_eq!(report.entries_applied, 30);
    assert_eq!(report.steps, 3);
    assert_eq!(report.durable_lsn, Some(Lsn(100)));
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
    assert_eq!(
        p.advance_tail(Lsn(90)),
        Lsn(90),
        "released pin no longer holds the tail"
    );
}

#[test]
fn plan_recovery_zero_gap() {
    let p = primary(100, 100, 30, None);
    let d = with_target(&p, SessionKind::CatchUp);
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(100)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::ZeroGap);
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(
        plan.session_id().is_some(),
        "the plan names its handshake's session"
    );
    assert_eq!(
        s.session_id(),
        None,
        "the zero-gap session completed at once"
    );
    assert_eq!(plan.proof().unwrap().reason, ProofReason::ZeroGap);
    assert_eq!(plan.pins_held(), 0);
    assert_eq!(p.pins_acquired(), 0, "nothing was ever pinned");
    assert_eq!(s.state(), ReplicaState::InSync);
    assert_eq!(only_detail(d.orchestrator().log(), "completed"), "zero_gap");

    // Cancelling the finished plan changes nothing: it must not demote the in-sync replica
    // (the reference's session-ID-0 plan did).
    assert!(!d.cancel_plan(plan, "late_cancel"));
    assert_eq!(s.state(), ReplicaState::InSync);
    assert_eq!(
        only_detail(d.orchestrator().log(), "plan_cancelled"),
        "late_cancel"
    );
    assert!(!d.orchestrator().log().contains("session_invalidated"));
}

#[test]
fn plan_recovery_needs_rebuild_then_rebuild() {
    let p = primary(100, 100, 60, Some((50, true)));
    let r = replica(&p, 30);
    let d = with_target(&p, SessionKind::CatchUp);

    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(30)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert_eq!(
        d.orchestrator().sender(&rid("r1")).unwrap().session_id(),
        None,
        "the handshake's session ended with the escalation"
    );
    assert_eq!(plan.pins_held(), 0);
    assert!(!plan.proof().unwrap().recoverable);
    assert_eq!(p.pins_acquired(), 0);
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);

    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    let plan = d.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    assert_eq!(plan.rebuild().and_then(|r| r.snapshot_lsn()), None);
    assert_eq!(plan.rebuild().map(|r| r.target), Some(Lsn(100)));
    assert_eq!(
        plan.rebuild().map(|r| r.reason.clone()),
        Some(RebuildReason::TrustedCheckpointUnreplayableTail {
            checkpoint: Lsn(50),
            tail: Lsn(60),
        })
    );
    assert_eq!(
        plan.rebuild()
            .and_then(|r| r.full_base_pin())
            .unwrap()
            .committed_lsn,
        Lsn(100)
    );
    assert!(
        plan.rebuild().and_then(|r| r.snapshot_pin()).is_none()
            && plan.rebuild().and_then(|r| r.retention_pin()).is_none()
    );
    assert_eq!(p.pins_of(PinKind::FullBase), 1);

    let mut io = model_io(&p, &r);
    let report = RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::RebuildFullBase);
    assert_eq!(report.base_lsn, Some(Lsn(100)));
    assert_eq!(report.entries_applied, 0);
    assert!(report.base_bytes_sent > 0);
    assert_eq!(s.state(), ReplicaState::InSync);
    // The full-base pin is released (the reference leaked it).
    assert_eq!(p.pins_of(PinKind::FullBase), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
}

#[test]
fn plan_recovery_wal_pin_failure() {
    let p = primary(100, 100, 30, None);
    let d = with_target(&p, SessionKind::CatchUp);
    p.fail_next_pin(PinKind::WalRetention);
    assert_eq!(
        d.plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
            .unwrap_err(),
        EngineError::PinFailed {
            kind: PinKind::WalRetention,
            error: StorageError::Backend("injected WAL pin failure".into()),
        }
    );
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "wal_pin_failed"),
        "storage backend: injected WAL pin failure"
    );
    assert_eq!(
        names_for(log, "r1"),
        vec![
            "sender_added",
            "session_created",
            "connected",
            "handshake",
            "wal_pin_failed",
            "session_invalidated",
        ]
    );
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(p.pins_acquired(), 0);
}

#[test]
fn plan_rebuild_snapshot_pin_failure() {
    let p = primary(100, 100, 30, Some((50, true)));
    let d = with_target(&p, SessionKind::Rebuild);
    p.fail_next_pin(PinKind::Snapshot);
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::PinFailed {
            kind: PinKind::Snapshot,
            error: StorageError::Backend("injected snapshot pin failure".into()),
        }
    );
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "snapshot_pin_failed"),
        "storage backend: injected snapshot pin failure"
    );
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "snapshot_pin_failed"
    );
    // No fallback to a full base: nothing else was pinned, no full-base plan was made.
    assert_eq!(p.pins_acquired(), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert!(!log.contains("plan_rebuild_full_base"));
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
}

#[test]
fn plan_recovery_replica_ahead_truncation() {
    let p = primary(100, 100, 30, None);
    let r = replica_ahead(&p, 100, 5);
    let d = with_target(&p, SessionKind::CatchUp);
    let plan = d.plan_recovery(&rid("r1"), handshake(&r)).unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(plan.truncation().map(|t| t.to), Some(Lsn(100)));
    // The replica's log is checked after the truncation, against the primary's entry at 100.
    assert!(plan.truncation().unwrap().verified);
    assert_eq!(plan.proof().unwrap().anchor, AnchorCheck::AfterTruncation);
    assert_eq!(plan.truncation().and_then(|t| t.anchor), entry_id(&p, 100));
    assert!(plan.truncation().and_then(|t| t.anchor).is_some());
    assert_eq!(plan.proof().unwrap().replica_flushed_lsn, Lsn(105));
    assert!(plan.catch_up().is_none());
    assert_eq!(plan.target(), Some(Lsn(100)));

    let mut io = model_io(&p, &r);
    let report = CatchUpExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::TruncateOnly);
    assert_eq!(report.truncated_to, Some(Lsn(100)));
    assert_eq!(report.entries_applied, 0);
    assert_eq!(report.durable_lsn, Some(Lsn(100)));
    assert_eq!(io.stats.truncations, 1);
    assert_eq!(io.stats.stream_calls, 0);
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(
        only_detail(d.orchestrator().log(), "exec_truncation"),
        "truncated_to=100"
    );
    assert_eq!(
        common::lock(&r).entry(Lsn(101)),
        None,
        "divergent tail dropped"
    );
    assert_data_matches(&p, &r, 100);
}

#[test]
fn plan_recovery_replica_ahead_no_wal_pin() {
    let p = primary(100, 100, 30, None);
    let d = with_target(&p, SessionKind::CatchUp);
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(105)))
        .unwrap();
    assert_eq!(plan.truncation().map(|t| t.to), Some(Lsn(100)));
    assert!(plan.catch_up().and_then(|c| c.pin()).is_none());
    assert_eq!(plan.pins_held(), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(p.pins_acquired(), 0);
    let log = d.orchestrator().log();
    assert_eq!(only_detail(log, "plan_truncate_only"), "truncate_to=100");
    assert!(!log.contains("plan_catchup"));
}

#[test]
fn plan_rebuild_missing_sender() {
    let p = primary(100, 100, 0, None);
    let d = driver(&p);
    assert_eq!(
        d.plan_rebuild(&rid("ghost")).unwrap_err(),
        EngineError::SenderNotFound {
            replica: rid("ghost")
        }
    );
    assert_eq!(p.pins_acquired(), 0);
    assert!(d.orchestrator().log().is_empty());
}

#[test]
fn plan_rebuild_no_session() {
    let p = primary(100, 100, 0, None);
    let d = driver(&p);
    assign(d.orchestrator(), 1, &[("r1", ep("10.0.0.1", 1))], &[]);
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::NoSession { replica: rid("r1") }
    );
    assert_eq!(p.pins_acquired(), 0);
}

#[test]
fn plan_rebuild_non_rebuild_session() {
    let p = primary(100, 100, 0, None);
    let d = with_target(&p, SessionKind::CatchUp);
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    let sid = s.session_id().unwrap();
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::WrongSessionKind {
            session: sid,
            kind: SessionKind::CatchUp,
            operation: "plan_rebuild",
        }
    );
    assert_eq!(p.pins_acquired(), 0);
    // The refusal left the catch-up session alone.
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.id, sid);
    assert_eq!(snap.phase, SessionPhase::Init);
}

#[test]
fn plan_rebuild_full_base_pins_base_image() {
    let p = primary(100, 100, 60, Some((40, true)));
    let d = with_target(&p, SessionKind::Rebuild);
    let plan = d.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    assert_eq!(plan.rebuild().map(|r| r.target), Some(Lsn(100)));
    let pin = plan
        .rebuild()
        .and_then(|r| r.full_base_pin())
        .expect("full base pinned");
    assert_eq!(pin.committed_lsn, Lsn(100));
    let pin_id = pin.pin_id;
    assert!(
        plan.rebuild().and_then(|r| r.snapshot_pin()).is_none()
            && plan.rebuild().and_then(|r| r.retention_pin()).is_none()
    );
    assert_eq!(plan.pins_held(), 1);
    assert_eq!(p.pins_outstanding(), 1);
    assert_eq!(p.pins_of(PinKind::FullBase), 1);
    // The pin holds the primary's image at committed.
    let (lsn, image) = p.pinned_image(pin_id).expect("image held");
    assert_eq!(lsn, Lsn(100));
    assert_eq!(*image, p.state_at(Lsn(100)).unwrap());
    assert_eq!(
        only_detail(d.orchestrator().log(), "plan_rebuild_full_base"),
        "reason=trusted_checkpoint_unreplayable_tail: checkpoint=40 tail=60 committed=100"
    );

    d.cancel_plan(plan, "test");
    assert_eq!(p.pins_outstanding(), 0);
    assert!(p.pinned_image(pin_id).is_none());
}

#[test]
fn plan_rebuild_full_base_pin_failure() {
    let p = primary(100, 100, 0, None);
    let d = with_target(&p, SessionKind::Rebuild);
    p.fail_next_pin(PinKind::FullBase);
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::PinFailed {
            kind: PinKind::FullBase,
            error: StorageError::Backend("injected full-base pin failure".into()),
        }
    );
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "full_base_pin_failed"),
        "storage backend: injected full-base pin failure"
    );
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "full_base_pin_failed"
    );
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert_eq!(p.pins_outstanding(), 0);
}

#[test]
fn plan_recovery_wal_pin_failure_cleans_up_session() {
    let p = primary(100, 100, 30, None);
    let d = with_target(&p, SessionKind::CatchUp);
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    let sid = s.session_id().unwrap();
    p.fail_next_pin(PinKind::WalRetention);
    assert!(matches!(
        d.plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70))),
        Err(EngineError::PinFailed {
            kind: PinKind::WalRetention,
            ..
        })
    ));
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
    let log = d.orchestrator().log();
    assert_eq!(only_detail(log, "session_invalidated"), "wal_pin_failed");
    assert_eq!(
        log.find("session_invalidated").unwrap().session_id,
        Some(sid)
    );
    assert_eq!(
        s.begin_catch_up(sid, None),
        Err(EngineError::NoActiveSession { replica: rid("r1") })
    );
}

#[test]
fn cross_layer_storage_proves_recoverability() {
    let p = primary(100, 100, 50, Some((40, true)));
    let h = history_of(&p);
    let proof = h.prove_recoverability(Lsn(60));
    assert!(proof.recoverable);
    let decision = h.rebuild_source_decision();
    assert_eq!(decision.source, RebuildSource::FullBase);
    assert_eq!(
        decision.reason,
        RebuildReason::TrustedCheckpointUnreplayableTail {
            checkpoint: Lsn(40),
            tail: Lsn(50),
        }
    );

    let d = with_target(&p, SessionKind::CatchUp);
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(60)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(plan.proof(), Some(&proof));
    assert_eq!(
        plan.catch_up().and_then(|c| c.pin()).unwrap().start_lsn,
        Lsn(60)
    );
    d.cancel_plan(plan, "test_done");
    assert_eq!(p.pins_outstanding(), 0);
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
}

/// A planner handed session S1 (by an epoch-1 assignment) that plans only after an epoch-2
/// assignment replaced S1 with S2 is refused, and S2 is left exactly as the assignment made it:
/// the late planner's handshake must not run under the newer session. S2's own planner then
/// plans normally.
#[test]
fn plan_recovery_in_refuses_a_session_a_newer_assignment_replaced() {
    let p = primary(100, 100, 30, None);
    let r = replica(&p, 70);
    let d = with_target(&p, SessionKind::CatchUp);
    let sender = d.orchestrator().sender(&rid("r1")).unwrap();
    let s1 = sender.session_id().unwrap();
    assign(
        d.orchestrator(),
        2,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let s2 = sender.session_id().unwrap();
    assert_ne!(s1, s2);
    assert_eq!(
        d.plan_recovery_in(&rid("r1"), s1, handshake(&r))
            .unwrap_err(),
        EngineError::SessionIdMismatch {
            replica: rid("r1"),
            given: s1,
            current: s2
        }
    );
    let snap = sender.session_snapshot().unwrap();
    assert_eq!((snap.id, snap.phase), (s2, SessionPhase::Init));
    assert_eq!(p.pins_acquired(), 0);
    let plan = d.plan_recovery_in(&rid("r1"), s2, handshake(&r)).unwrap();
    assert_eq!(plan.session_id(), Some(s2));
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    d.cancel_plan(plan, "test done");
    assert_eq!(p.pins_outstanding(), 0);
}

/// An epoch fence that ends the session without attaching another: the late planner is refused
/// (no session) and nothing changes.
#[test]
fn plan_recovery_in_refuses_a_fenced_session() {
    let p = primary(100, 100, 30, None);
    let r = replica(&p, 70);
    let d = with_target(&p, SessionKind::CatchUp);
    let sender = d.orchestrator().sender(&rid("r1")).unwrap();
    let s1 = sender.session_id().unwrap();
    d.orchestrator().advance_epoch(engine::Epoch(2));
    assert!(matches!(
        d.plan_recovery_in(&rid("r1"), s1, handshake(&r)),
        Err(EngineError::NoSession { .. })
    ));
    assert_eq!(sender.state(), ReplicaState::Disconnected);
    assert_eq!(p.pins_acquired(), 0);
}

/// The rebuild planner, likewise: a session replaced by a newer rebuild assignment is refused
/// and the newer one is neither claimed nor ended.
#[test]
fn plan_rebuild_in_refuses_a_session_a_newer_assignment_replaced() {
    let p = primary(100, 100, 30, Some((50, true)));
    let d = with_target(&p, SessionKind::Rebuild);
    let sender = d.orchestrator().sender(&rid("r1")).unwrap();
    let s1 = sender.session_id().unwrap();
    assign(
        d.orchestrator(),
        2,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    let s2 = sender.session_id().unwrap();
    assert_ne!(s1, s2);
    assert_eq!(
        d.plan_rebuild_in(&rid("r1"), s1).unwrap_err(),
        EngineError::SessionIdMismatch {
            replica: rid("r1"),
            given: s1,
            current: s2
        }
    );
    assert_eq!(p.pins_acquired(), 0);
    let plan = d.plan_rebuild_in(&rid("r1"), s2).unwrap();
    assert_eq!(plan.session_id(), Some(s2));
    d.cancel_plan(plan, "test done");
    assert_eq!(p.pins_outstanding(), 0);
}
