//! Recovery sessions at the sender level (reference `recovery_test.go`, items 13-30): the
//! three outcomes, fencing during a catch-up, frozen targets, budgets (counting only the
//! catch-up delta), rebuild lifecycles, and an assignment-driven flow.

mod common;

use common::{budget, ep, intent, rid};
use engine::testing::SenderProtocol;
use engine::{
    BudgetViolation, EngineError, Epoch, HandshakeResult, InvalidateReason, Invalidation, Lsn,
    Outcome, RebuildPhase, RebuildSource, Registry, ReplicaState, Sender, SessionId, SessionKind,
    SessionOptions, SessionPhase, Tick,
};

fn sender() -> Sender {
    Sender::new(rid("r1"), ep("10.0.0.1", 1), Epoch(1))
}

fn hr(f: u64, c: u64, s: u64) -> HandshakeResult {
    HandshakeResult {
        replica_flushed_lsn: Lsn(f),
        committed_lsn: Lsn(c),
        retention_start_lsn: Lsn(s),
    }
}

/// Attach + connect.
fn connected(s: &Sender, kind: SessionKind, opts: SessionOptions) -> SessionId {
    let sid = s.attach_session(s.epoch(), kind, opts).unwrap();
    s.begin_connect(sid).unwrap();
    sid
}

/// Attach + connect + handshake `(start, target]` + begin catch-up.
fn catching_up(
    s: &Sender,
    start: u64,
    target: u64,
    opts: SessionOptions,
    tick: Option<Tick>,
) -> SessionId {
    let sid = connected(s, SessionKind::CatchUp, opts);
    s.record_handshake(sid, Lsn(start), Lsn(target)).unwrap();
    s.begin_catch_up(sid, tick).unwrap();
    sid
}

/// Attach + connect + handshake `(0, 100]` for a rebuild session.
fn rebuilding(s: &Sender) -> SessionId {
    let sid = connected(s, SessionKind::Rebuild, SessionOptions::default());
    s.record_handshake(sid, Lsn(0), Lsn(100)).unwrap();
    sid
}

fn no_session() -> EngineError {
    EngineError::NoActiveSession { replica: rid("r1") }
}

#[test]
fn zero_gap_fast_complete() {
    let s = sender();
    let sid = connected(&s, SessionKind::CatchUp, SessionOptions::default());
    assert_eq!(
        s.record_handshake_with_outcome(sid, &hr(100, 100, 50)),
        Ok(Outcome::ZeroGap)
    );
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.phase, SessionPhase::Handshake);
    assert_eq!(
        (snap.start_lsn, snap.target_lsn),
        (Some(Lsn(100)), Some(Lsn(100)))
    );
    // The reference completed a zero gap at once. Here only a zero gap proven from retained
    // history (`record_handshake_with_proof`, what the orchestrator uses) skips the barrier; a
    // caller-stated handshake result needs the replica's durable LSN like any other recovery.
    assert!(matches!(
        s.complete_session_by_id(sid),
        Err(EngineError::BarrierMissing { .. })
    ));
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_session_by_id(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(!s.has_active_session());
}

#[test]
fn catch_up_full_execution() {
    let s = sender();
    let sid = connected(&s, SessionKind::CatchUp, SessionOptions::default());
    assert_eq!(
        s.record_handshake_with_outcome(sid, &hr(70, 100, 50)),
        Ok(Outcome::CatchUp)
    );
    s.begin_catch_up(sid, None).unwrap();
    s.record_catch_up_progress(sid, Lsn(85), None).unwrap();
    assert_eq!(s.session_snapshot().unwrap().entries_replayed, 15);
    s.record_catch_up_progress(sid, Lsn(100), None).unwrap();
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.recovered_to, Lsn(100));
    assert_eq!(snap.entries_replayed, 30);

    // Converged, but not yet durable on the replica: completion is refused and changes
    // nothing.
    assert_eq!(
        s.complete_session_by_id(sid),
        Err(EngineError::BarrierMissing {
            target: Lsn(100),
            durable: None,
        })
    );
    assert_eq!(s.state(), ReplicaState::CatchingUp);
    assert!(s.has_active_session());
    // A barrier short of the target is not enough either; one beyond it is refused.
    s.record_barrier(sid, Lsn(99)).unwrap();
    assert_eq!(
        s.complete_session_by_id(sid),
        Err(EngineError::BarrierMissing {
            target: Lsn(100),
            durable: Some(Lsn(99)),
        })
    );
    assert_eq!(
        s.record_barrier(sid, Lsn(101)),
        Err(EngineError::ExceedsFrozenTarget {
            target: Lsn(100),
            proposed: Lsn(101),
        })
    );
    s.record_barrier(sid, Lsn(100)).unwrap();
    assert_eq!(s.session_snapshot().unwrap().durable_lsn, Some(Lsn(100)));
    s.complete_session_by_id(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(!s.has_active_session());
}

#[test]
fn needs_rebuild_escalation() {
    let s = sender();
    let sid = connected(&s, SessionKind::CatchUp, SessionOptions::default());
    assert_eq!(
        s.record_handshake_with_outcome(sid, &hr(10, 100, 50)),
        Ok(Outcome::NeedsRebuild)
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
    assert_eq!(s.session_id(), None);
    assert_eq!(s.begin_catch_up(sid, None), Err(no_session()));
}

#[test]
fn stale_id_during_catch_up() {
    let s = sender();
    let old = catching_up(&s, 0, 100, SessionOptions::default(), None);
    s.record_catch_up_progress(old, Lsn(30), None).unwrap();

    let inv = s.update_epoch(Epoch(2)).expect("the session is fenced");
    assert_eq!(
        inv,
        Invalidation {
            replica_id: rid("r1"),
            session_id: old,
            reason: InvalidateReason::EpochAdvanced {
                from: Epoch(1),
                to: Epoch(2),
            },
        }
    );
    assert_eq!(s.state(), ReplicaState::Disconnected);
    assert_eq!(
        s.record_catch_up_progress(old, Lsn(40), None),
        Err(no_session())
    );
    assert_eq!(s.complete_session_by_id(old), Err(no_session()));

    // An old-epoch session cannot be attached; a new one at epoch 2 connects.
    assert_eq!(
        s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default()),
        Err(EngineError::EpochMismatch {
            replica: rid("r1"),
            requested: Epoch(1),
            sender: Epoch(2),
        })
    );
    let new = s
        .attach_session(Epoch(2), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(new).unwrap();
    assert_eq!(s.state(), ReplicaState::Connecting);
    assert_eq!(
        s.record_catch_up_progress(old, Lsn(40), None),
        Err(EngineError::SessionIdMismatch {
            replica: rid("r1"),
            given: old,
            current: new,
        })
    );
}

#[test]
fn endpoint_change_during_catch_up() {
    let s = sender();
    let sid = catching_up(&s, 0, 100, SessionOptions::default(), None);
    s.record_catch_up_progress(sid, Lsn(30), None).unwrap();

    let inv = s
        .reassign(&ep("10.0.0.2", 2), s.epoch())
        .unwrap()
        .pop()
        .expect("session invalidated");
    assert_eq!(inv.session_id, sid);
    assert_eq!(inv.reason, InvalidateReason::EndpointChanged);
    assert_eq!(
        s.record_catch_up_progress(sid, Lsn(40), None),
        Err(no_session())
    );
    assert_eq!(s.state(), ReplicaState::Disconnected);
    assert_eq!(s.endpoint(), ep("10.0.0.2", 2));
}

#[test]
fn frozen_target_exact_boundary() {
    let s = sender();
    let sid = catching_up(&s, 0, 50, SessionOptions::default(), None);
    let beyond = Err(EngineError::ExceedsFrozenTarget {
        target: Lsn(50),
        proposed: Lsn(51),
    });
    assert_eq!(s.record_catch_up_progress(sid, Lsn(51), None), beyond);
    s.record_catch_up_progress(sid, Lsn(50), None).unwrap();
    // 51 is above the progress so far, so only the frozen target refuses it.
    assert_eq!(s.record_catch_up_progress(sid, Lsn(51), None), beyond);
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.recovered_to, Lsn(50));
    assert_eq!(snap.frozen_target_lsn, Some(Lsn(50)));
    assert!(snap.active);
}

#[test]
fn budget_duration_escalates() {
    let s = sender();
    let sid = catching_up(&s, 0, 100, budget(Some(10), None, None), Some(Tick(0)));
    assert_eq!(s.check_budget(sid, Tick(10)), Ok(None));
    assert_eq!(
        s.check_budget(sid, Tick(15)),
        Ok(Some(BudgetViolation::DurationExceeded))
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
}

#[test]
fn budget_entries_escalates() {
    let s = sender();
    let sid = catching_up(&s, 0, 100, budget(None, Some(20), None), None);
    s.record_catch_up_progress(sid, Lsn(20), None).unwrap();
    assert_eq!(
        s.check_budget(sid, Tick(1)),
        Ok(None),
        "20 entries is within 20"
    );
    s.record_catch_up_progress(sid, Lsn(21), None).unwrap();
    assert_eq!(s.session_snapshot().unwrap().entries_replayed, 21);
    assert_eq!(
        s.check_budget(sid, Tick(2)),
        Ok(Some(BudgetViolation::EntriesExceeded))
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
}

#[test]
fn budget_stall_escalates() {
    let s = sender();
    let sid = catching_up(&s, 0, 100, budget(None, None, Some(5)), Some(Tick(10)));
    // A progress deadline makes a tick mandatory on every report.
    assert_eq!(
        s.record_catch_up_progress(sid, Lsn(5), None),
        Err(EngineError::TickRequired)
    );
    s.record_catch_up_progress(sid, Lsn(5), Some(Tick(12)))
        .unwrap();
    assert_eq!(
        s.session_snapshot().unwrap().last_progress_tick,
        Some(Tick(12))
    );
    assert_eq!(s.check_budget(sid, Tick(17)), Ok(None));
    assert_eq!(
        s.check_budget(sid, Tick(18)),
        Ok(Some(BudgetViolation::ProgressStalled))
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
}

#[test]
fn budget_entries_non_zero_start_counts_only_delta() {
    let s = sender();
    let sid = connected(&s, SessionKind::CatchUp, budget(None, Some(50), None));
    assert_eq!(
        s.record_handshake_with_outcome(sid, &hr(70, 100, 0)),
        Ok(Outcome::CatchUp)
    );
    let snap = s.session_snapshot().unwrap();
    assert_eq!(
        snap.recovered_to,
        Lsn(70),
        "counting starts at the replica's F"
    );
    assert_eq!(snap.entries_replayed, 0);
    s.begin_catch_up(sid, Some(Tick(0))).unwrap();
    s.record_catch_up_progress(sid, Lsn(100), Some(Tick(1)))
        .unwrap();
    assert_eq!(
        s.session_snapshot().unwrap().entries_replayed,
        30,
        "only the delta (70, 100] counts, not the replica's prefix of 70"
    );
    assert_eq!(s.check_budget(sid, Tick(1)), Ok(None));
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_session_by_id(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
}

#[test]
fn budget_entries_non_zero_start_exceeds_budget() {
    let s = sender();
    let sid = connected(&s, SessionKind::CatchUp, budget(None, Some(20), None));
    assert_eq!(
        s.record_handshake_with_outcome(sid, &hr(70, 100, 0)),
        Ok(Outcome::CatchUp)
    );
    s.begin_catch_up(sid, Some(Tick(0))).unwrap();
    s.record_catch_up_progress(sid, Lsn(100), Some(Tick(1)))
        .unwrap();
    assert_eq!(s.session_snapshot().unwrap().entries_replayed, 30);
    assert_eq!(
        s.check_budget(sid, Tick(1)),
        Ok(Some(BudgetViolation::EntriesExceeded))
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
}

#[test]
fn rebuild_partial_transfer_blocks_tail_replay() {
    let s = sender();
    let sid = rebuilding(&s);
    s.select_rebuild_source(sid, Some(Lsn(50)), true, Lsn(100))
        .unwrap();
    s.begin_rebuild_transfer(sid).unwrap();
    s.record_rebuild_transfer_progress(sid, Lsn(30)).unwrap();
    assert_eq!(
        s.begin_rebuild_tail_replay(sid),
        Err(EngineError::BaseTransferIncomplete {
            transferred: Some(Lsn(30)),
            snapshot: Lsn(50),
        })
    );
    assert_eq!(
        s.session_snapshot().unwrap().rebuild_phase,
        Some(RebuildPhase::Transfer)
    );
    s.record_rebuild_transfer_progress(sid, Lsn(50)).unwrap();
    s.begin_rebuild_tail_replay(sid).unwrap();
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.rebuild_phase, Some(RebuildPhase::TailReplay));
    assert_eq!(snap.rebuild_tail_replayed_to, Some(Lsn(50)));
}

#[test]
fn completion_before_convergence_rejected() {
    let s = sender();
    let sid = catching_up(&s, 0, 100, SessionOptions::default(), None);
    s.record_catch_up_progress(sid, Lsn(50), None).unwrap();
    s.record_barrier(sid, Lsn(50)).unwrap();
    assert_eq!(
        s.complete_session_by_id(sid),
        Err(EngineError::NotConverged {
            recovered_to: Lsn(50),
            target: Lsn(100),
        })
    );
    assert_eq!(s.state(), ReplicaState::CatchingUp);
    let snap = s.session_snapshot().unwrap();
    assert!(snap.active);
    assert_eq!(snap.phase, SessionPhase::CatchUp);
}

#[test]
fn rebuild_catch_up_apis_excluded() {
    let s = sender();
    let sid = rebuilding(&s);
    let kind_err = |operation| EngineError::WrongSessionKind {
        session: sid,
        kind: SessionKind::Rebuild,
        operation,
    };
    assert_eq!(s.begin_catch_up(sid, None), Err(kind_err("begin_catch_up")));
    assert_eq!(
        s.record_catch_up_progress(sid, Lsn(10), None),
        Err(kind_err("record_catch_up_progress"))
    );
    assert_eq!(
        s.complete_session_by_id(sid),
        Err(kind_err("complete_session_by_id"))
    );
    assert!(s.has_active_session());

    // And the other way round: a catch-up session has no rebuild state.
    let c = Sender::new(rid("r2"), ep("10.0.0.2", 1), Epoch(1));
    let csid = connected(&c, SessionKind::CatchUp, SessionOptions::default());
    c.record_handshake(csid, Lsn(0), Lsn(100)).unwrap();
    assert_eq!(
        c.select_rebuild_source(csid, Some(Lsn(50)), true, Lsn(100)),
        Err(EngineError::NoRebuildState { session: csid })
    );
    assert_eq!(
        c.complete_rebuild(csid),
        Err(EngineError::NoRebuildState { session: csid })
    );
}

#[test]
fn rebuild_snapshot_tail_lifecycle() {
    let s = sender();
    let sid = rebuilding(&s);
    s.select_rebuild_source(sid, Some(Lsn(50)), true, Lsn(100))
        .unwrap();
    assert_eq!(
        s.session_snapshot().unwrap().rebuild_source,
        Some(RebuildSource::SnapshotTail)
    );
    s.begin_rebuild_transfer(sid).unwrap();
    s.record_rebuild_transfer_progress(sid, Lsn(50)).unwrap();
    s.begin_rebuild_tail_replay(sid).unwrap();
    s.record_rebuild_tail_progress(sid, Lsn(100)).unwrap();
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_rebuild(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(!s.has_active_session());
}

#[test]
fn rebuild_full_base_lifecycle() {
    let s = sender();
    let sid = rebuilding(&s);
    s.select_rebuild_source(sid, None, false, Lsn(100)).unwrap();
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.rebuild_source, Some(RebuildSource::FullBase));
    assert_eq!(snap.rebuild_phase, Some(RebuildPhase::SourceSelect));
    s.begin_rebuild_transfer(sid).unwrap();
    s.record_rebuild_transfer_progress(sid, Lsn(100)).unwrap();
    // A full base has no tail to replay.
    assert!(matches!(
        s.begin_rebuild_tail_replay(sid),
        Err(EngineError::RebuildPhaseMismatch { .. })
    ));
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_rebuild(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(!s.has_active_session());
}

#[test]
fn rebuild_stale_id_rejected() {
    let s = sender();
    let old = rebuilding(&s);
    s.update_epoch(Epoch(2))
        .expect("the rebuild session is fenced");
    assert_eq!(
        s.select_rebuild_source(old, Some(Lsn(50)), true, Lsn(100)),
        Err(no_session())
    );
    let new = connected(&s, SessionKind::Rebuild, SessionOptions::default());
    s.record_handshake(new, Lsn(0), Lsn(100)).unwrap();
    assert_eq!(
        s.select_rebuild_source(old, Some(Lsn(50)), true, Lsn(100)),
        Err(EngineError::SessionIdMismatch {
            replica: rid("r1"),
            given: old,
            current: new,
        })
    );
    assert_eq!(
        s.session_snapshot().unwrap().rebuild_phase,
        Some(RebuildPhase::Init),
        "the stale call did not select a source on the new session"
    );
}

#[test]
fn assignment_driven_flow() {
    let reg = Registry::new();
    let res = reg
        .apply_assignment(&intent(
            1,
            &[("r1", ep("10.0.0.1", 1)), ("r2", ep("10.0.0.2", 1))],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(res.added, vec![rid("r1"), rid("r2")]);
    assert_eq!(res.sessions_created.len(), 1);
    assert_eq!(res.sessions_created[0].0, rid("r1"));
    let r1 = reg.sender(&rid("r1")).unwrap();
    let r2 = reg.sender(&rid("r2")).unwrap();
    assert!(r1.has_active_session());
    assert!(!r2.has_active_session());

    let sid = r1.session_id().unwrap();
    assert_eq!(res.sessions_created[0].1, sid);
    r1.begin_connect(sid).unwrap();
    assert_eq!(
        r1.record_handshake_with_outcome(sid, &hr(80, 100, 0)),
        Ok(Outcome::CatchUp)
    );
    r1.begin_catch_up(sid, None).unwrap();
    r1.record_catch_up_progress(sid, Lsn(100), None).unwrap();
    assert_eq!(r1.session_snapshot().unwrap().entries_replayed, 20);
    r1.record_barrier(sid, Lsn(100)).unwrap();
    r1.complete_session_by_id(sid).unwrap();
    assert_eq!(r1.state(), ReplicaState::InSync);
    assert_eq!(r2.state(), ReplicaState::Disconnected);
    assert_eq!(reg.in_sync_count(), 1);
}
