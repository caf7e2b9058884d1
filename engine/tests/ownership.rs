//! Ownership and fencing (reference `ownership_test.go`, items 1-12): a sender is identified by
//! its replica ID and never by its address; every API refuses a stale session ID; epochs fence
//! sessions and whole assignments; rebuild sessions are kept out of the catch-up APIs; frozen
//! targets and budgets hold; snapshots are copies.

mod common;

use engine::testing::SenderProtocol;
use std::sync::Arc;

use common::{budget, ep, intent, replicas, rid};
use engine::{
    BudgetViolation, Endpoint, EngineError, Epoch, HandshakeResult, InvalidateReason, Invalidation,
    Lsn, Outcome, RebuildPhase, RebuildSource, Registry, ReplicaState, Sender, SessionId,
    SessionKind, SessionOptions, SessionPhase, Tick,
};

fn sender(id: &str, epoch: u64) -> Sender {
    Sender::new(rid(id), ep("10.0.0.1", 1), Epoch(epoch))
}

fn mismatch(id: &str, given: SessionId, current: SessionId) -> EngineError {
    EngineError::SessionIdMismatch {
        replica: rid(id),
        given,
        current,
    }
}

#[test]
fn changed_data_addr_preserves_sender_identity() {
    let reg = Registry::new();
    let id = rid("replica-1");
    let v1 = Endpoint::new("10.0.0.1:9333", "10.0.0.1:9334", 1);
    let first = reg
        .apply_assignment(&intent(
            1,
            &[("replica-1", v1)],
            &[("replica-1", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(first.added, vec![id.clone()]);
    assert_eq!(first.sessions_created.len(), 1);
    let old_sid = first.sessions_created[0].1;
    let before = reg.sender(&id).unwrap();
    before.begin_connect(old_sid).unwrap();
    assert_eq!(before.state(), ReplicaState::Connecting);

    // Same ID, same epoch, new data address and version.
    let v2 = Endpoint::new("10.0.0.2:9333", "10.0.0.1:9334", 2);
    let rec = reg
        .reconcile(&replicas(&[("replica-1", v2.clone())]), Epoch(1))
        .unwrap();
    assert!(rec.added.is_empty(), "no new sender for a moved replica");
    assert!(rec.removed.is_empty(), "the moved replica was not removed");
    assert_eq!(
        rec.invalidated,
        vec![Invalidation {
            replica_id: id.clone(),
            session_id: old_sid,
            reason: InvalidateReason::EndpointChanged,
        }]
    );

    let after = reg.sender(&id).unwrap();
    assert!(
        Arc::ptr_eq(&before, &after),
        "the same sender object survives"
    );
    assert_eq!(reg.len(), 1);
    assert!(!after.has_active_session());
    assert_eq!(after.session_id(), None);
    assert_eq!(after.endpoint(), v2);
    assert_eq!(after.endpoint().data_addr, "10.0.0.2:9333");
    assert_eq!(after.state(), ReplicaState::Disconnected);
    assert_eq!(
        after.begin_connect(old_sid),
        Err(EngineError::NoActiveSession {
            replica: id.clone()
        })
    );

    // A new assignment gives exactly one new session with a new ID, on the same sender.
    let second = reg
        .apply_assignment(&intent(
            1,
            &[("replica-1", v2)],
            &[("replica-1", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(second.sessions_created.len(), 1);
    assert!(second.sessions_superseded.is_empty());
    assert!(second.sessions_kept.is_empty());
    assert!(second.sessions_failed.is_empty());
    let (owner, new_sid) = second.sessions_created[0].clone();
    assert_eq!(owner, id);
    assert_ne!(new_sid, old_sid);
    assert_eq!(after.session_id(), Some(new_sid));
    assert!(Arc::ptr_eq(&after, &reg.sender(&id).unwrap()));
}

#[test]
fn changed_ctrl_addr_invalidates_session() {
    let reg = Registry::new();
    let id = rid("replica-1");
    let v1 = Endpoint::new("10.0.0.1:9333", "10.0.0.1:9334", 1);
    let res = reg
        .apply_assignment(&intent(
            1,
            &[("replica-1", v1.clone())],
            &[("replica-1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let sid = res.sessions_created[0].1;
    let s = reg.sender(&id).unwrap();
    s.begin_connect(sid).unwrap();

    // Only the control address changes (and the version goes up).
    let v2 = Endpoint {
        ctrl_addr: "10.0.0.9:9334".into(),
        version: 2,
        ..v1.clone()
    };
    assert_eq!(v2.data_addr, v1.data_addr);
    let rec = reg
        .reconcile(&replicas(&[("replica-1", v2.clone())]), Epoch(1))
        .unwrap();
    assert_eq!(
        rec.invalidated,
        vec![Invalidation {
            replica_id: id.clone(),
            session_id: sid,
            reason: InvalidateReason::EndpointChanged,
        }]
    );
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::Disconnected);
    assert_eq!(s.endpoint(), v2);
}

#[test]
fn stale_session_id_rejected_at_all_apis() {
    let s = sender("r1", 1);
    let old = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    let inv = s
        .update_epoch(Epoch(2))
        .expect("the epoch-1 session is fenced");
    assert_eq!(inv.session_id, old);
    assert_eq!(
        inv.reason,
        InvalidateReason::EpochAdvanced {
            from: Epoch(1),
            to: Epoch(2)
        }
    );
    let new = s
        .attach_session(Epoch(2), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    assert_ne!(old, new);

    // Every API refuses the old ID with the ID check (the first authority check that fails),
    // whatever phase the call would otherwise need.
    let stale = mismatch("r1", old, new);
    assert_eq!(s.begin_connect(old), Err(stale.clone()));
    assert_eq!(
        s.record_handshake(old, Lsn(0), Lsn(100)),
        Err(stale.clone())
    );
    let hr = HandshakeResult {
        replica_flushed_lsn: Lsn(70),
        committed_lsn: Lsn(100),
        retention_start_lsn: Lsn(0),
    };
    assert_eq!(
        s.record_handshake_with_outcome(old, &hr),
        Err(stale.clone())
    );
    assert_eq!(s.begin_catch_up(old, None), Err(stale.clone()));
    assert_eq!(
        s.record_catch_up_progress(old, Lsn(10), None),
        Err(stale.clone())
    );
    assert_eq!(s.record_truncation(old, Lsn(100)), Err(stale.clone()));
    assert_eq!(s.record_barrier(old, Lsn(100)), Err(stale.clone()));
    assert_eq!(s.complete_session_by_id(old), Err(stale.clone()));
    assert_eq!(s.check_budget(old, Tick(1)), Err(stale.clone()));
    assert_eq!(
        s.select_rebuild_source(old, None, false, Lsn(100)),
        Err(stale.clone())
    );
    assert_eq!(s.complete_rebuild(old), Err(stale));

    // The new session was not touched by any of it.
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.id, new);
    assert_eq!(snap.phase, SessionPhase::Init);
    assert_eq!(snap.epoch, Epoch(2));
    assert_eq!(s.state(), ReplicaState::Disconnected);
    s.begin_connect(new).unwrap();
}

#[test]
fn stale_completion_after_supersede() {
    let s = sender("r1", 1);
    let old = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(old).unwrap();
    s.record_handshake(old, Lsn(100), Lsn(100)).unwrap();
    s.update_epoch(Epoch(2)).unwrap();
    let new = s
        .attach_session(Epoch(2), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();

    // The old session had converged (zero gap); its completion must still be refused.
    assert_eq!(s.complete_session_by_id(old), Err(mismatch("r1", old, new)));
    assert!(s.has_active_session());
    assert_eq!(s.session_id(), Some(new));
    assert_ne!(s.state(), ReplicaState::InSync);

    // The same through an explicit supersede at the same epoch.
    s.begin_connect(new).unwrap();
    s.record_handshake(new, Lsn(100), Lsn(100)).unwrap();
    let (replaced, newer) = s
        .supersede_session(
            s.epoch(),
            SessionKind::Reassign,
            InvalidateReason::AssignmentIntent,
            SessionOptions::default(),
        )
        .expect("sender not stopped");
    let replaced = replaced.expect("an active session was replaced");
    assert_eq!(replaced.session_id, new);
    assert_eq!(replaced.reason, InvalidateReason::AssignmentIntent);
    assert_eq!(
        s.complete_session_by_id(new),
        Err(mismatch("r1", new, newer))
    );
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.id, newer);
    assert_eq!(snap.kind, SessionKind::Reassign);
    assert!(snap.active);
    assert_eq!(snap.epoch, Epoch(2));
}

#[test]
fn epoch_bump_invalidates_all_sessions() {
    let reg = Registry::new();
    let res = reg
        .apply_assignment(&intent(
            1,
            &[("r1", ep("10.0.0.1", 1)), ("r2", ep("10.0.0.2", 1))],
            &[("r1", SessionKind::CatchUp), ("r2", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(res.sessions_created.len(), 2);

    let invs = reg.invalidate_epoch(Epoch(2));
    assert_eq!(invs.len(), 2);
    for ((id, sid), inv) in res.sessions_created.iter().zip(&invs) {
        assert_eq!(&inv.replica_id, id);
        assert_eq!(inv.session_id, *sid);
        assert_eq!(inv.reason, InvalidateReason::EpochBump);
        let s = reg.sender(id).unwrap();
        assert!(!s.has_active_session());
        assert_eq!(s.state(), ReplicaState::Disconnected);
        // Unlike the reference, invalidate_epoch also raises every sender, so no proof or
        // session from the old epoch survives it.
        assert_eq!(s.epoch(), Epoch(2));
    }
    // Nothing left to fence.
    assert!(reg.invalidate_epoch(Epoch(2)).is_empty());
}

#[test]
fn epoch_bump_stale_assignment_rejected() {
    let reg = Registry::new();
    let id = rid("r1");
    reg.apply_assignment(&intent(1, &[("r1", ep("10.0.0.1", 1))], &[]))
        .unwrap();
    let s = reg.sender(&id).unwrap();

    // Sender-epoch path: the sender moved to epoch 2 on its own; the registry is still at 1,
    // so the intent passes the registry fence but its session is refused.
    assert_eq!(s.update_epoch(Epoch(2)), None);
    assert_eq!(reg.epoch(), Epoch(1));
    let res = reg
        .apply_assignment(&intent(
            1,
            &[("r1", ep("10.0.0.1", 1))],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(
        res.sessions_failed,
        vec![(
            id.clone(),
            EngineError::StaleIntent {
                intent: Epoch(1),
                registry: Epoch(2),
            }
        )]
    );
    assert!(res.sessions_created.is_empty());
    assert!(res.sessions_superseded.is_empty());
    assert!(res.sessions_kept.is_empty());
    assert!(!s.has_active_session());
    assert_eq!(s.epoch(), Epoch(2));

    // Registry fence: once an epoch-2 intent was accepted, an epoch-1 intent is refused whole
    // and changes nothing: no sender removed or added, no endpoint changed, no session.
    let at2 = reg
        .apply_assignment(&intent(
            2,
            &[("r1", ep("10.0.0.1", 1)), ("r2", ep("10.0.0.2", 1))],
            &[("r2", SessionKind::CatchUp)],
        ))
        .unwrap();
    assert_eq!(at2.added, vec![rid("r2")]);
    let r2_sid = at2.sessions_created[0].1;
    assert_eq!(reg.epoch(), Epoch(2));

    let stale = intent(
        1,
        &[("r1", ep("10.9.9.9", 7)), ("r3", ep("10.0.0.3", 1))],
        &[("r1", SessionKind::CatchUp), ("r3", SessionKind::CatchUp)],
    );
    assert_eq!(
        reg.apply_assignment(&stale),
        Err(EngineError::StaleIntent {
            intent: Epoch(1),
            registry: Epoch(2),
        })
    );
    assert_eq!(
        reg.reconcile(&stale.replicas, Epoch(1)),
        Err(EngineError::StaleIntent {
            intent: Epoch(1),
            registry: Epoch(2),
        })
    );
    assert_eq!(reg.len(), 2);
    assert!(reg.sender(&rid("r3")).is_none());
    let r2 = reg
        .sender(&rid("r2"))
        .expect("r2 not removed by the stale intent");
    assert!(!r2.stopped());
    assert_eq!(r2.session_id(), Some(r2_sid));
    assert_eq!(s.endpoint(), ep("10.0.0.1", 1));
    assert!(!s.has_active_session());
    assert_eq!(reg.epoch(), Epoch(2));
}

#[test]
fn rebuild_catch_up_apis_rejected() {
    let s = sender("r1", 1);
    let sid = s
        .attach_session(Epoch(1), SessionKind::Rebuild, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(100)).unwrap();

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
    // The refusals changed nothing.
    let snap = s.session_snapshot().unwrap();
    assert!(snap.active);
    assert_eq!(snap.phase, SessionPhase::Handshake);
    assert_eq!(snap.frozen_target_lsn, None);
    assert_eq!(snap.rebuild_phase, Some(RebuildPhase::Init));
    assert_eq!(s.state(), ReplicaState::Connecting);
}

#[test]
fn rebuild_full_lifecycle() {
    let s = sender("r1", 1);
    let sid = s
        .attach_session(Epoch(1), SessionKind::Rebuild, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(100)).unwrap();
    s.select_rebuild_source(sid, Some(Lsn(50)), true, Lsn(100))
        .unwrap();
    s.begin_rebuild_transfer(sid).unwrap();
    s.record_rebuild_transfer_progress(sid, Lsn(50)).unwrap();
    s.begin_rebuild_tail_replay(sid).unwrap();
    s.record_rebuild_tail_progress(sid, Lsn(100)).unwrap();

    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.rebuild_source, Some(RebuildSource::SnapshotTail));
    assert_eq!(snap.rebuild_phase, Some(RebuildPhase::TailReplay));
    assert_eq!(snap.rebuild_transferred_to, Some(Lsn(50)));
    assert_eq!(snap.rebuild_tail_replayed_to, Some(Lsn(100)));
    // Rebuild sessions stay `connecting` for the whole transfer.
    assert_eq!(s.state(), ReplicaState::Connecting);

    // Completion waits for the replica's durability barrier at the target.
    assert_eq!(
        s.complete_rebuild(sid),
        Err(EngineError::BarrierMissing {
            target: Lsn(100),
            durable: None,
        })
    );
    assert!(s.has_active_session());
    s.record_barrier(sid, Lsn(100)).unwrap();
    s.complete_rebuild(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert!(!s.has_active_session());
    assert_eq!(s.session_id(), None);
}

#[test]
fn frozen_target_rejects_chase() {
    let s = sender("r1", 1);
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(50)).unwrap();
    s.begin_catch_up(sid, None).unwrap();
    let snap = s.session_snapshot().unwrap();
    assert_eq!(snap.frozen_target_lsn, Some(Lsn(50)));
    assert_eq!(snap.budget, None, "the target is frozen without any budget");

    assert_eq!(
        s.record_catch_up_progress(sid, Lsn(51), None),
        Err(EngineError::ExceedsFrozenTarget {
            target: Lsn(50),
            proposed: Lsn(51),
        })
    );
    let snap = s.session_snapshot().unwrap();
    assert_eq!(
        snap.recovered_to,
        Lsn(0),
        "a refused report changes nothing"
    );
    assert_eq!(snap.entries_replayed, 0);
    assert!(snap.active, "a refused report does not invalidate");
    assert_eq!(s.state(), ReplicaState::CatchingUp);
}

#[test]
fn budget_violation_escalates() {
    let s = sender("r1", 1);
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, budget(Some(5), None, None))
        .unwrap();
    s.begin_connect(sid).unwrap();
    s.record_handshake(sid, Lsn(0), Lsn(100)).unwrap();
    s.begin_catch_up(sid, Some(Tick(0))).unwrap();
    s.record_catch_up_progress(sid, Lsn(10), Some(Tick(1)))
        .unwrap();
    // Exactly at the limit is not a violation.
    assert_eq!(s.check_budget(sid, Tick(5)), Ok(None));
    assert!(s.has_active_session());

    assert_eq!(
        s.check_budget(sid, Tick(10)),
        Ok(Some(BudgetViolation::DurationExceeded))
    );
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert!(!s.has_active_session());
    assert_eq!(
        s.check_budget(sid, Tick(11)),
        Err(EngineError::NoActiveSession { replica: rid("r1") })
    );
}

#[test]
fn encapsulation_snapshot_is_read_only() {
    let s = sender("r1", 1);
    let sid = s
        .attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
        .unwrap();
    let original = s.session_snapshot().unwrap();
    let mut snap = original.clone();
    snap.phase = SessionPhase::Completed;
    snap.active = false;
    snap.recovered_to = Lsn(999);
    snap.invalidate_reason = Some(InvalidateReason::EpochBump);

    let fresh = s.session_snapshot().unwrap();
    assert_eq!(fresh, original);
    assert_ne!(fresh, snap);
    assert!(s.has_active_session());
    assert_eq!(fresh.phase, SessionPhase::Init);
    assert!(fresh.active);
    s.begin_connect(sid).unwrap();
    assert_eq!(s.state(), ReplicaState::Connecting);
    assert_eq!(
        s.session_snapshot().unwrap().phase,
        SessionPhase::Connecting
    );
}

#[test]
fn e2e_three_replicas_three_outcomes() {
    let reg = Registry::new();
    let res = reg
        .apply_assignment(&intent(
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
        ))
        .unwrap();
    assert_eq!(res.sessions_created.len(), 3);
    let hr = |f| HandshakeResult {
        replica_flushed_lsn: Lsn(f),
        committed_lsn: Lsn(100),
        retention_start_lsn: Lsn(50),
    };
    let connect = |id: &str| {
        let s = reg.sender(&rid(id)).unwrap();
        let sid = s.session_id().unwrap();
        s.begin_connect(sid).unwrap();
        (s, sid)
    };

    // r1: zero gap. The handshake result is caller-stated (no recoverability proof), so the
    // replica confirms its durable LSN before it is declared in sync (the reference completed
    // it at once).
    let (r1, s1) = connect("r1");
    assert_eq!(
        r1.record_handshake_with_outcome(s1, &hr(100)),
        Ok(Outcome::ZeroGap)
    );
    assert!(matches!(
        r1.complete_session_by_id(s1),
        Err(EngineError::BarrierMissing { .. })
    ));
    r1.record_barrier(s1, Lsn(100)).unwrap();
    r1.complete_session_by_id(s1).unwrap();
    assert_eq!(r1.state(), ReplicaState::InSync);

    // r2: catch-up (70, 100], then barrier and completion.
    let (r2, s2) = connect("r2");
    assert_eq!(
        r2.record_handshake_with_outcome(s2, &hr(70)),
        Ok(Outcome::CatchUp)
    );
    let snap = r2.session_snapshot().unwrap();
    assert_eq!(
        (snap.start_lsn, snap.target_lsn),
        (Some(Lsn(70)), Some(Lsn(100)))
    );
    r2.begin_catch_up(s2, None).unwrap();
    assert_eq!(r2.state(), ReplicaState::CatchingUp);
    r2.record_catch_up_progress(s2, Lsn(100), None).unwrap();
    assert_eq!(r2.session_snapshot().unwrap().entries_replayed, 30);
    r2.record_barrier(s2, Lsn(100)).unwrap();
    r2.complete_session_by_id(s2).unwrap();
    assert_eq!(r2.state(), ReplicaState::InSync);

    // r3: beyond retention, escalated.
    let (r3, s3) = connect("r3");
    assert_eq!(
        r3.record_handshake_with_outcome(s3, &hr(10)),
        Ok(Outcome::NeedsRebuild)
    );
    assert_eq!(r3.state(), ReplicaState::NeedsRebuild);
    assert!(!r3.has_active_session());

    assert_eq!(reg.in_sync_count(), 2);
    let status = reg.status();
    assert_eq!(status.in_sync, 2);
    assert_eq!(status.rebuilding, 1);
    assert_eq!(status.total_count, 3);
}
