//! Recovery through the orchestrator (reference `integration_test.go`, items 49-59):
//! assignments, handshakes from a `MemStorage` primary's history, the manual-drive helpers
//! `complete_catch_up` / `complete_rebuild`, epoch and endpoint changes, status and the event
//! log with its exact details.

mod common;

use engine::ReplicaHandshake;
use engine::testing::SenderProtocol;
use std::sync::Arc;

use common::{
    assign, budget, details, ep, history_of, intent, names_for, only_detail, primary, rid,
};
use engine::{
    BudgetViolation, CatchUpOptions, Demotion, EngineError, Epoch, InvalidateReason, Invalidation,
    Lsn, Outcome, ProofReason, RebuildPhase, RebuildSource, RecoveryOrchestrator, ReplicaState,
    SessionKind, SessionPhase, Tick,
};

fn catch_up_to(target: u64) -> CatchUpOptions {
    CatchUpOptions {
        target_lsn: Lsn(target),
        ..CatchUpOptions::default()
    }
}

#[test]
fn changed_address_via_orchestrator() {
    let p = primary(100, 100, 0, None);
    let h = history_of(&p);
    let orch = RecoveryOrchestrator::new();
    let id = rid("vol1-r1");
    assign(
        &orch,
        1,
        &[("vol1-r1", ep("10.0.0.1", 1))],
        &[("vol1-r1", SessionKind::CatchUp)],
    );
    let before = orch.sender(&id).unwrap();

    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(80)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::CatchUp);
    assert!(r.proof.recoverable);
    assert_eq!(r.final_state, ReplicaState::Connecting);
    orch.complete_catch_up(&id, &catch_up_to(100)).unwrap();
    assert_eq!(before.state(), ReplicaState::InSync);

    // The replica restarts at a new address: same ID, new endpoint version.
    let res = assign(
        &orch,
        1,
        &[("vol1-r1", ep("10.0.0.2", 2))],
        &[("vol1-r1", SessionKind::CatchUp)],
    );
    assert!(res.added.is_empty() && res.removed.is_empty());
    assert!(
        res.invalidated.is_empty(),
        "no session was active to invalidate"
    );
    assert_eq!(res.sessions_created.len(), 1);
    let after = orch.sender(&id).unwrap();
    assert!(
        Arc::ptr_eq(&before, &after),
        "the same sender object survives"
    );
    assert_eq!(after.endpoint(), ep("10.0.0.2", 2));
    // Deliberate difference: nothing is proven about the replica at its new address, so it is
    // no longer reported in sync.
    assert_eq!(after.state(), ReplicaState::Disconnected);

    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(100)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::ZeroGap);
    assert_eq!(r.final_state, ReplicaState::InSync);
    assert_eq!(after.state(), ReplicaState::InSync);

    let log = orch.log();
    assert_eq!(
        names_for(log, "vol1-r1"),
        vec![
            "sender_added",
            "session_created",
            "connected",
            "handshake",
            "catchup_started",
            "completed",
            "session_created",
            "connected",
            "handshake",
            "completed",
        ]
    );
    assert_eq!(
        details(log, "handshake"),
        vec!["outcome=catchup", "outcome=zero_gap"]
    );
    assert_eq!(details(log, "completed"), vec!["in_sync", "zero_gap"]);
    assert_eq!(only_detail(log, "catchup_started"), "target=100");
}

#[test]
fn needs_rebuild_rebuild_via_orchestrator() {
    let p = primary(100, 100, 60, Some((40, true)));
    let h = history_of(&p);
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    let res = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let sid = res.sessions_created[0].1;

    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(30)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::NeedsRebuild);
    assert_eq!(r.final_state, ReplicaState::NeedsRebuild);
    // The proof is checked, not left as an empty block.
    assert!(!r.proof.recoverable);
    assert_eq!(
        (
            r.proof.replica_flushed_lsn,
            r.proof.committed_lsn,
            r.proof.tail_lsn,
            r.proof.head_lsn
        ),
        (Lsn(30), Lsn(100), Lsn(60), Lsn(100))
    );
    assert_eq!(
        r.proof.reason,
        ProofReason::GapBeyondRetention {
            first_needed: Lsn(31),
            tail: Lsn(60),
        }
    );
    let log = orch.log();
    assert_eq!(
        only_detail(log, "escalated"),
        "needs_rebuild: gap_beyond_retention: need LSN 31 but tail=60"
    );
    assert_eq!(log.find("escalated").unwrap().session_id, Some(sid));

    let res = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    assert_eq!(res.sessions_created.len(), 1);
    orch.complete_rebuild(&id, &h).unwrap();
    assert_eq!(orch.sender(&id).unwrap().state(), ReplicaState::InSync);
    assert!(log.contains("escalated"));
    assert!(log.contains("rebuild_connected"));
    // The checkpoint (40) is below the tail (60), so the rebuild took the full base.
    assert_eq!(
        only_detail(log, "rebuild_source_selected"),
        "source=full_base"
    );
    assert_eq!(only_detail(log, "rebuild_completed"), "in_sync");
    assert!(!log.contains("rebuild_failed"));
}

#[test]
fn epoch_bump_via_orchestrator() {
    let p = primary(100, 100, 0, None);
    let h = history_of(&p);
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    let res = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let old = res.sessions_created[0].1;

    assert_eq!(orch.invalidate_epoch(Epoch(2)), 1);
    orch.update_sender_epoch(&id, Epoch(2)).unwrap();
    let s = orch.sender(&id).unwrap();
    assert_eq!(s.epoch(), Epoch(2));
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
    assert_eq!(
        orch.execute_recovery(&id, ReplicaHandshake::unverified(Lsn(100)), &h)
            .unwrap_err(),
        EngineError::NoSession {
            replica: id.clone()
        }
    );
    let log = orch.log();
    assert_eq!(only_detail(log, "session_invalidated"), "epoch_bump");
    assert_eq!(
        log.find("session_invalidated").unwrap().session_id,
        Some(old)
    );

    let res = assign(
        &orch,
        2,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let new = res.sessions_created[0].1;
    assert_ne!(new, old);
    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(100)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::ZeroGap);
    assert_eq!(r.final_state, ReplicaState::InSync);
    assert_eq!(orch.registry().epoch(), Epoch(2));
    // The epoch-1 assignment is now refused whole.
    assert_eq!(
        orch.process_assignment(&intent(
            1,
            &[("r1", ep("10.0.0.1", 1))],
            &[("r1", SessionKind::CatchUp)]
        )),
        Err(EngineError::StaleIntent {
            intent: Epoch(1),
            registry: Epoch(2),
        })
    );
    assert_eq!(s.state(), ReplicaState::InSync);
}

#[test]
fn endpoint_change_logs_invalidation() {
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    let first = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let old = first.sessions_created[0].1;

    let second = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.2", 2))],
        &[("r1", SessionKind::CatchUp)],
    );
    assert_eq!(
        second.invalidated,
        vec![Invalidation {
            replica_id: id.clone(),
            session_id: old,
            reason: InvalidateReason::EndpointChanged,
        }]
    );
    let new = second.sessions_created[0].1;
    let log = orch.log();
    assert_eq!(only_detail(log, "session_invalidated"), "endpoint_changed");
    assert_eq!(
        log.find("session_invalidated").unwrap().session_id,
        Some(old)
    );
    assert_eq!(
        details(log, "session_created"),
        vec!["kind=catchup", "kind=catchup"]
    );
    assert_eq!(
        common::sessions_of(log, "session_created"),
        vec![Some(old), Some(new)]
    );

    // Re-delivering the same assignment keeps the running session (deliberate difference:
    // the reference superseded it) and invalidates nothing.
    let third = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.2", 2))],
        &[("r1", SessionKind::CatchUp)],
    );
    assert_eq!(third.sessions_kept, vec![(id.clone(), new)]);
    assert!(third.invalidated.is_empty());
    assert!(third.sessions_created.is_empty() && third.sessions_superseded.is_empty());
    assert_eq!(details(log, "session_invalidated").len(), 1);
    assert_eq!(only_detail(log, "session_kept"), "kind=catchup");
    assert_eq!(orch.sender(&id).unwrap().session_id(), Some(new));
}

#[test]
fn multi_replica_via_orchestrator() {
    let p = primary(100, 100, 50, None);
    let h = history_of(&p);
    let orch = RecoveryOrchestrator::new();
    assign(
        &orch,
        1,
        &[
            ("r1", ep("10.0.0.1", 1)),
            ("r2", ep("10.0.0.2", 1)),
            ("r3", ep("10.0.0.3", 1)),
        ],
        &[
            ("r1", SessionKind::CatchUp),
            ("r2", SessionKind::CatchUp),
            ("r3", SessionKind::CatchUp),
        ],
    );

    let r1 = orch
        .execute_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(100)), &h)
        .unwrap();
    assert_eq!(r1.outcome, Outcome::ZeroGap);
    assert_eq!(r1.final_state, ReplicaState::InSync);

    let r2 = orch
        .execute_recovery(&rid("r2"), ReplicaHandshake::unverified(Lsn(60)), &h)
        .unwrap();
    assert_eq!(r2.outcome, Outcome::CatchUp);
    assert!(r2.proof.recoverable);
    assert_eq!(r2.proof.reason.name(), "gap_within_retention");
    orch.complete_catch_up(&rid("r2"), &catch_up_to(100))
        .unwrap();

    let r3 = orch
        .execute_recovery(&rid("r3"), ReplicaHandshake::unverified(Lsn(20)), &h)
        .unwrap();
    assert_eq!(r3.outcome, Outcome::NeedsRebuild);
    assert!(!r3.proof.recoverable);

    let status = orch.registry().status();
    assert_eq!(status.total_count, 3);
    assert_eq!(status.in_sync, 2);
    assert_eq!(status.rebuilding, 1);
    assert_eq!(status.recovering, 0);
    assert_eq!(status.degraded, 0);
    assert_eq!(status.disconnected, 0);
    let states: Vec<_> = status
        .senders
        .iter()
        .map(|s| {
            (
                s.replica_id.as_str().to_owned(),
                s.state,
                s.session.is_some(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("r1".to_owned(), ReplicaState::InSync, false),
            ("r2".to_owned(), ReplicaState::InSync, false),
            ("r3".to_owned(), ReplicaState::NeedsRebuild, false),
        ]
    );
}

#[test]
fn replica_ahead_truncate_via_orchestrator() {
    let h = history_of(&primary(100, 100, 0, None));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(105)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::CatchUp);
    assert_eq!(r.proof.reason.name(), "replica_ahead_needs_truncation");

    orch.complete_catch_up(
        &id,
        &CatchUpOptions {
            target_lsn: Lsn(100),
            truncate_lsn: Some(Lsn(100)),
            ..CatchUpOptions::default()
        },
    )
    .unwrap();
    assert_eq!(orch.sender(&id).unwrap().state(), ReplicaState::InSync);
    let log = orch.log();
    assert_eq!(only_detail(log, "truncation_recorded"), "truncated_to=100");
    assert_eq!(only_detail(log, "completed"), "in_sync");
    assert!(
        log.find("truncation_recorded")
            .unwrap()
            .session_id
            .is_some()
    );
}

#[test]
fn replica_ahead_no_truncate_completion_rejected() {
    let h = history_of(&primary(100, 100, 0, None));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    assert_eq!(
        orch.execute_recovery(&id, ReplicaHandshake::unverified(Lsn(105)), &h)
            .unwrap()
            .outcome,
        Outcome::CatchUp
    );

    assert_eq!(
        orch.complete_catch_up(&id, &catch_up_to(100)),
        Err(EngineError::TruncationNotRecorded { required: Lsn(100) })
    );
    let log = orch.log();
    assert_eq!(
        only_detail(log, "completion_rejected"),
        "truncation to 100 required but not recorded"
    );
    assert!(!log.contains("completed"));
    // A refused completion changes nothing.
    let s = orch.sender(&id).unwrap();
    assert!(s.has_active_session());
    assert_eq!(s.state(), ReplicaState::CatchingUp);
    assert!(!s.session_snapshot().unwrap().truncate_recorded);
}

#[test]
fn budget_escalation_via_orchestrator() {
    let h = history_of(&primary(1000, 1000, 0, None));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    let res = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let first = res.sessions_created[0].1;
    // Re-attach the session directly with a duration budget.
    let s = orch.sender(&id).unwrap();
    let inv = s
        .invalidate_session("reattach_with_budget".into(), Demotion::Disconnected)
        .unwrap();
    assert_eq!(inv.session_id, first);
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, budget(Some(5), None, None))
        .unwrap();

    let r = orch
        .execute_recovery(&id, ReplicaHandshake::unverified(Lsn(500)), &h)
        .unwrap();
    assert_eq!(r.outcome, Outcome::CatchUp);
    assert_eq!(
        orch.complete_catch_up(
            &id,
            &CatchUpOptions {
                target_lsn: Lsn(1000),
                start_tick: Some(Tick(0)),
                complete_tick: Some(Tick(10)),
                truncate_lsn: None,
            },
        ),
        Err(EngineError::BudgetExceeded {
            replica: id.clone(),
            violation: BudgetViolation::DurationExceeded,
        })
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
    let log = orch.log();
    assert_eq!(only_detail(log, "budget_escalated"), "duration_exceeded");
    assert_eq!(log.find("budget_escalated").unwrap().session_id, Some(sid));
    assert_eq!(only_detail(log, "catchup_started"), "target=1000 tick=0");
    assert!(!log.contains("completed"));
}

#[test]
fn sender_observability_session_snapshot() {
    let h = history_of(&primary(100, 100, 0, None));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    orch.execute_recovery(&id, ReplicaHandshake::unverified(Lsn(105)), &h)
        .unwrap();
    let snap = orch.sender(&id).unwrap().session_snapshot().unwrap();
    assert!(snap.truncate_required);
    assert_eq!(snap.truncate_to_lsn, Some(Lsn(100)));
    assert!(!snap.truncate_recorded);
    assert_eq!(
        (snap.start_lsn, snap.target_lsn),
        (Some(Lsn(100)), Some(Lsn(100)))
    );
    assert_eq!(snap.phase, SessionPhase::Handshake);
    assert_eq!(snap.kind, SessionKind::CatchUp);
    assert_eq!(snap.epoch, Epoch(1));
    assert!(snap.active);
    assert_eq!(snap.rebuild_source, None);
}

#[test]
fn sender_observability_rebuild_snapshot() {
    let h = history_of(&primary(100, 100, 30, Some((50, true))));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    let s = orch.sender(&id).unwrap();
    let sid = s.session_id().unwrap();
    assert_eq!(
        s.session_snapshot().unwrap().rebuild_phase,
        Some(RebuildPhase::Init)
    );
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), h.committed_lsn).unwrap();
    s.select_rebuild_from_history(sid, &h).unwrap();

    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.kind, SessionKind::Rebuild);
    assert_eq!(snap.rebuild_source, Some(RebuildSource::SnapshotTail));
    assert_eq!(snap.rebuild_phase, Some(RebuildPhase::SourceSelect));
    assert_eq!(snap.phase, SessionPhase::Handshake);
    assert_eq!(snap.target_lsn, Some(Lsn(100)));
    assert_eq!(snap.rebuild_transferred_to, None);
}

#[test]
fn recovery_log_auto_populated() {
    let h = history_of(&primary(100, 100, 0, None));
    let orch = RecoveryOrchestrator::new();
    let id = rid("r1");
    let res = assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let sid = res.sessions_created[0].1;
    assert_eq!(
        orch.execute_recovery(&id, ReplicaHandshake::unverified(Lsn(80)), &h)
            .unwrap()
            .outcome,
        Outcome::CatchUp
    );
    orch.complete_catch_up(&id, &catch_up_to(100)).unwrap();

    let events = orch.log().events();
    assert!(events.len() >= 5);
    let got: Vec<(&str, Option<_>, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e.replica_id, id);
            assert!(!e.name().is_empty());
            (e.name(), e.session_id, e.event.detail())
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("sender_added", None, String::new()),
            ("session_created", Some(sid), "kind=catchup".to_owned()),
            ("connected", Some(sid), String::new()),
            ("handshake", Some(sid), "outcome=catchup".to_owned()),
            ("catchup_started", Some(sid), "target=100".to_owned()),
            ("completed", Some(sid), "in_sync".to_owned()),
        ]
    );
}
