//! Phase-3 validation scenarios (reference `validation_test.go`, items 85-91): a changed
//! address cancels the old plan, an epoch bump is caught at an exact point of the executor
//! loop, rebuild pin failures leave no session and no pin, full-base rebuilds state why they
//! are full base and really transfer the base, and the whole chain is logged.

mod common;

use engine::ReplicaHandshake;
use std::cell::Cell;
use std::sync::Arc;

use common::{
    assert_data_matches, assign, chunked, details, driver, ep, exec_failure, handshake, model_io,
    names_for, only_detail, position, primary, replica, rid,
};
use engine::testing::ScriptedIo;
use engine::{
    CatchUpExecutor, EngineError, Epoch, ExecFailure, Lsn, Outcome, PinKind, RebuildExecutor,
    RebuildReason, RebuildSource, RecoveryPath, ReplicaState, SessionKind, StepInfo, StorageError,
};

#[test]
fn p3_e1_changed_address_old_plan_cancelled_by_driver() {
    let p = primary(100, 100, 30, None);
    let d = driver(&p);
    let orch = d.orchestrator();
    let first = assign(
        orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let old = first.sessions_created[0].1;
    let before = orch.sender(&rid("r1")).unwrap();

    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    assert_eq!(plan.session_id(), Some(old));
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);
    assert_eq!(plan.pins_held(), 1);
    d.cancel_plan(plan, "address_change");
    assert_eq!(p.pins_outstanding(), 0);
    // The cancel really cancelled a live session (the reference's plan had none).
    assert!(!before.has_active_session());
    assert_eq!(before.state(), ReplicaState::Disconnected);
    let log = orch.log();
    assert_eq!(only_detail(log, "plan_cancelled"), "address_change");
    assert_eq!(log.find("plan_cancelled").unwrap().session_id, Some(old));
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "cancelled: address_change"
    );

    let second = assign(
        orch,
        1,
        &[("r1", ep("10.0.0.2", 2))],
        &[("r1", SessionKind::CatchUp)],
    );
    assert!(second.invalidated.is_empty());
    let new = second.sessions_created[0].1;
    assert_ne!(new, old);
    let after = orch.sender(&rid("r1")).unwrap();
    assert!(Arc::ptr_eq(&before, &after));
    assert_eq!(after.endpoint(), ep("10.0.0.2", 2));

    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(100)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::ZeroGap);
    assert_eq!(plan.pins_held(), 0);
    assert_eq!(after.state(), ReplicaState::InSync);
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(
        details(log, "session_created"),
        vec!["kind=catchup", "kind=catchup"]
    );
    assert_eq!(
        common::sessions_of(log, "session_created"),
        vec![Some(old), Some(new)]
    );
}

#[test]
fn p3_e2_epoch_bump_mid_executor_loop() {
    let p = primary(100, 100, 30, None);
    let d = driver(&p);
    let orch = Arc::clone(d.orchestrator());
    assign(
        &orch,
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(50)))
        .unwrap();
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);

    let hook_calls = Cell::new(0u64);
    let mut io = ScriptedIo::new([60, 70, 80, 90, 100]);
    let hook_orch = Arc::clone(&orch);
    let (failure, report) = exec_failure(
        CatchUpExecutor::new(&d, plan)
            .with_on_step(|i: &StepInfo| {
                hook_calls.set(hook_calls.get() + 1);
                if i.step == 1 {
                    assert_eq!(i.lsn, Lsn(70));
                    hook_orch.update_sender_epoch(&rid("r1"), Epoch(2)).unwrap();
                }
            })
            .execute(&mut io),
    );

    // Where it was caught: the authority re-check right after on_step(1), before chunk 2 was
    // requested; not by the budget check, and not by a later step.
    assert_eq!(
        failure,
        ExecFailure::SessionInvalidatedMidExecution {
            step: 1,
            error: EngineError::NoActiveSession { replica: rid("r1") },
        }
    );
    assert_eq!(hook_calls.get(), 2);
    assert_eq!(io.stream_calls, 2, "chunk 2 was never requested");
    assert_eq!(io.barriers, 0);
    assert_eq!(report.steps, 2);
    assert_eq!(report.entries_applied, 20);
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(
        orch.sender(&rid("r1")).unwrap().state(),
        ReplicaState::Disconnected
    );

    let log = orch.log();
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "epoch_advanced_1_to_2"
    );
    assert_eq!(
        only_detail(log, "exec_resources_released"),
        "session_invalidated_mid_execution_after_step_1: sender r1 has no active session"
    );
    assert!(position(log, "session_invalidated") < position(log, "exec_resources_released"));
    assert!(!log.contains("budget_escalated"));
    assert!(!log.contains("exec_completed"));
}

#[test]
fn p3_e2_rebuild_wal_pin_failure_session_cleaned() {
    let p = primary(100, 100, 30, Some((50, true)));
    let d = driver(&p);
    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    p.fail_next_pin(PinKind::WalRetention);
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::PinFailed {
            kind: PinKind::WalRetention,
            error: StorageError::Backend("injected WAL pin failure".into()),
        }
    );
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    // The snapshot pin was taken (the WAL pin came second) and released.
    assert_eq!(p.pins_acquired(), 1);
    assert_eq!(p.pins_of(PinKind::Snapshot), 0);
    assert_eq!(p.pins_outstanding(), 0);
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "wal_pin_failed"),
        "storage backend: injected WAL pin failure"
    );
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "wal_pin_failed_during_rebuild"
    );
    assert!(!log.contains("plan_rebuild_snapshot_tail"));
}

#[test]
fn p3_e3_cross_layer_trusted_base_unreplayable_tail() {
    let p = primary(100, 100, 80, Some((50, true)));
    let r = replica(&p, 10);
    let d = driver(&p);
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
    assert_eq!(
        plan.rebuild().map(|r| r.reason.clone()),
        Some(RebuildReason::TrustedCheckpointUnreplayableTail {
            checkpoint: Lsn(50),
            tail: Lsn(80),
        })
    );
    assert!(plan.rebuild().and_then(|r| r.full_base_pin()).is_some());
    assert!(plan.rebuild().and_then(|r| r.snapshot_pin()).is_none());
    assert!(plan.catch_up().and_then(|c| c.pin()).is_none());
    assert_eq!(p.pins_of(PinKind::FullBase), 1);
    assert_eq!(p.pins_of(PinKind::Snapshot), 0);
    assert_eq!(
        only_detail(d.orchestrator().log(), "plan_rebuild_full_base"),
        "reason=trusted_checkpoint_unreplayable_tail: checkpoint=50 tail=80 committed=100"
    );

    let mut io = model_io(&p, &r);
    let report = RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    // Full base really ran: a base image at committed, no tail.
    assert_eq!(report.path, RecoveryPath::RebuildFullBase);
    assert_eq!(report.base_lsn, Some(Lsn(100)));
    assert_eq!(report.base_bytes_sent, 256);
    assert_eq!(report.entries_applied, 0);
    assert!(io.stats.base_chunks > 0);
    assert_eq!(io.stats.stream_calls, 0);
    assert_eq!(
        only_detail(d.orchestrator().log(), "exec_rebuild_started"),
        "source=full_base target=100"
    );
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(p.pins_of(PinKind::FullBase), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
}

#[test]
fn p3_e4_full_base_pin_fails_session_cleaned() {
    let p = primary(100, 100, 80, Some((50, true)));
    let d = driver(&p);
    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    p.fail_next_pin(PinKind::FullBase);
    assert_eq!(
        d.plan_rebuild(&rid("r1")).unwrap_err(),
        EngineError::PinFailed {
            kind: PinKind::FullBase,
            error: StorageError::Backend("injected full-base pin failure".into()),
        }
    );
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    assert!(!s.has_active_session());
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "full_base_pin_failed"),
        "storage backend: injected full-base pin failure"
    );
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "full_base_pin_failed"
    );
    assert_eq!(p.pins_outstanding(), 0);
}

#[test]
fn p3_e4_untrusted_checkpoint_full_base_success() {
    let p = primary(100, 100, 30, Some((50, false)));
    let r = replica(&p, 10);
    let d = driver(&p);
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
    assert_eq!(
        plan.rebuild().map(|r| r.reason.clone()),
        Some(RebuildReason::UntrustedCheckpoint {
            checkpoint: Lsn(50)
        })
    );
    assert_eq!(
        only_detail(d.orchestrator().log(), "plan_rebuild_full_base"),
        "reason=untrusted_checkpoint: checkpoint=50 committed=100"
    );

    let mut io = model_io(&p, &r);
    let report = RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::RebuildFullBase);
    assert_eq!(report.base_lsn, Some(Lsn(100)));
    assert_eq!(report.entries_applied, 0);
    assert!(report.base_bytes_sent > 0);
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
}

#[test]
fn p3_e5_full_recovery_chain_logged() {
    let p = primary(100, 100, 30, None);
    let r = replica(&p, 70);
    let d = driver(&p);
    let res = assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let sid = res.sessions_created[0].1;
    let plan = d.plan_recovery(&rid("r1"), handshake(&r)).unwrap();
    assert!(plan.catch_up().unwrap().verified);
    let pin = plan.catch_up().and_then(|c| c.pin()).unwrap().pin_id;
    let mut io = model_io(&p, &r);
    CatchUpExecutor::new(&d, plan)
        .with_options(chunked(15))
        .execute(&mut io)
        .unwrap();

    let log = d.orchestrator().log();
    let chain: Vec<(&str, Option<_>, String)> = log
        .events()
        .iter()
        .map(|e| (e.name(), e.session_id, e.event.detail()))
        .collect();
    assert_eq!(
        chain,
        vec![
            ("sender_added", None, String::new()),
            ("session_created", Some(sid), "kind=catchup".to_owned()),
            ("connected", Some(sid), String::new()),
            ("handshake", Some(sid), "outcome=catchup".to_owned()),
            (
                "plan_catchup",
                Some(sid),
                format!("replay=(70, 100] wal_pin={pin}")
            ),
            (
                "exec_catchup_started",
                Some(sid),
                "target=100 tick=0".to_owned()
            ),
            ("exec_barrier", Some(sid), "durable=100".to_owned()),
            ("exec_completed", Some(sid), "in_sync".to_owned()),
        ]
    );
    assert_eq!(names_for(log, "r1").len(), 8);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
}
