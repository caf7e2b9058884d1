//! The executors (reference `executor_test.go`, items 74-84): every failure and cancellation
//! releases the plan's pins and invalidates its session; success releases too; execution is
//! stepwise and logged. Step lists of the reference run on `ScriptedIo`; everything else moves
//! model data with `ModelIo` and compares it with the primary.

mod common;

use engine::ReplicaHandshake;
use engine::testing::SenderProtocol;
use std::cell::RefCell;
use std::sync::Arc;

use common::{
    assert_data_matches, assign, budget, chunked, driver, ep, exec_failure, lock, model_io,
    names_for, only_detail, primary, replica, rid,
};
use engine::testing::{MemStorage, ScriptedIo};
use engine::{
    BudgetViolation, CatchUpExecutor, EngineError, Epoch, ExecFailure, Lsn, Outcome, PinKind,
    RebuildExecutor, RebuildSource, RecoveryDriver, RecoveryPath, RecoveryPlan, ReplicaState,
    SessionKind, StepInfo, StepKind, Tick, TransferError,
};

/// Catch-up fixture: tail 30, committed 100.
fn catch_up_primary() -> MemStorage {
    primary(100, 100, 30, None)
}

/// A catch-up plan for `r1` at `f`, holding its WAL pin.
fn catch_up_plan(d: &RecoveryDriver, f: u64) -> RecoveryPlan {
    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(f)))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(plan.pins_held(), 1);
    plan
}

/// Rebuild fixture: tail 30, trusted checkpoint 50, committed 100.
fn rebuild_primary() -> MemStorage {
    primary(100, 100, 30, Some((50, true)))
}

/// The reference's rebuild plan: F = 10 escalates, a rebuild assignment follows, and the
/// trusted checkpoint gives snapshot + tail with a snapshot pin and a WAL pin.
fn rebuild_plan(d: &RecoveryDriver, epoch: u64) -> RecoveryPlan {
    let orch = d.orchestrator();
    assign(
        orch,
        epoch,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let escalated = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
        .unwrap();
    assert_eq!(escalated.outcome(), Outcome::NeedsRebuild);
    assign(
        orch,
        epoch,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    let plan = d.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::SnapshotTail)
    );
    assert_eq!(plan.rebuild().and_then(|r| r.snapshot_lsn()), Some(Lsn(50)));
    assert_eq!(plan.rebuild().map(|r| r.target), Some(Lsn(100)));
    assert!(
        plan.rebuild().and_then(|r| r.snapshot_pin()).is_some()
            && plan.rebuild().and_then(|r| r.retention_pin()).is_some()
    );
    plan
}

fn state(d: &RecoveryDriver) -> ReplicaState {
    d.orchestrator().sender(&rid("r1")).unwrap().state()
}

fn has_session(d: &RecoveryDriver) -> bool {
    d.orchestrator()
        .sender(&rid("r1"))
        .unwrap()
        .has_active_session()
}

#[test]
fn e1_partial_catch_up_progress_failure_releases_wal() {
    let p = catch_up_primary();
    let d = driver(&p);
    let plan = catch_up_plan(&d, 70);
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);
    let mut io = ScriptedIo::new([80, 90, 101]);
    let (failure, report) = exec_failure(CatchUpExecutor::new(&d, plan).execute(&mut io));
    // The executor refuses the report itself, before recording it (the reference relied on
    // the sender's frozen-target check, which only a catch-up session has).
    let reason = "io_protocol_step_2: applied to 101 past the target: asked for (90, 100]";
    assert_eq!(failure.to_string(), reason);
    assert!(matches!(failure, ExecFailure::IoProtocol { step: 2, .. }));
    assert_eq!(report.steps, 2);
    assert_eq!(report.entries_applied, 20);
    assert_eq!(io.stream_calls, 3);
    assert_eq!(io.barriers, 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(p.pins_outstanding(), 0);
    // The failure also ends the session (the reference left it running without its pin).
    assert!(!has_session(&d));
    assert_eq!(state(&d), ReplicaState::Disconnected);
    let log = d.orchestrator().log();
    assert_eq!(only_detail(log, "exec_resources_released"), reason);
    assert_eq!(
        only_detail(log, "session_invalidated"),
        format!("execution_failed: {reason}")
    );
}

#[test]
fn e1_budget_escalation_releases_wal() {
    let p = primary(1000, 1000, 30, None);
    let d = driver(&p);
    assign(
        d.orchestrator(),
        1,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    // Re-attach the session with a duration budget of 3 ticks.
    let s = d.orchestrator().sender(&rid("r1")).unwrap();
    s.invalidate_session(
        "reattach_with_budget".into(),
        engine::Demotion::Disconnected,
    )
    .unwrap();
    s.attach_session(Epoch(1), SessionKind::CatchUp, budget(Some(3), None, None))
        .unwrap();
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(500)))
        .unwrap();
    assert_eq!(plan.target(), Some(Lsn(1000)));
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);

    let steps = RefCell::new(Vec::new());
    let mut io = ScriptedIo::new([600, 700, 800, 900]);
    let (failure, report) = exec_failure(
        CatchUpExecutor::new(&d, plan)
            .with_on_step(|i: &StepInfo| steps.borrow_mut().push((i.step, i.lsn, i.tick)))
            .execute(&mut io),
    );
    assert_eq!(
        failure,
        ExecFailure::BudgetEscalated(BudgetViolation::DurationExceeded)
    );
    // Ticks 1, 2, 3 are within the budget; the fourth chunk at tick 4 breaks it.
    assert_eq!(
        steps.into_inner(),
        vec![
            (0, Lsn(600), Tick(1)),
            (1, Lsn(700), Tick(2)),
            (2, Lsn(800), Tick(3)),
        ]
    );
    assert_eq!(io.stream_calls, 4);
    assert_eq!(report.steps, 3);
    assert_eq!(report.entries_applied, 400);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(state(&d), ReplicaState::NeedsRebuild);
    assert!(!has_session(&d));
    let log = d.orchestrator().log();
    assert_eq!(only_detail(log, "budget_escalated"), "duration_exceeded");
    assert_eq!(
        only_detail(log, "exec_resources_released"),
        "budget_escalated: duration_exceeded"
    );
}

#[test]
fn e2_partial_rebuild_transfer_failure_releases_all() {
    let p = rebuild_primary();
    let r = replica(&p, 10);
    let d = driver(&p);

    // The reference's case: the epoch moves before execution, so the rebuild fails at connect.
    let plan = rebuild_plan(&d, 1);
    assert_eq!(p.pins_of(PinKind::Snapshot), 1);
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);
    d.orchestrator()
        .update_sender_epoch(&rid("r1"), Epoch(2))
        .unwrap();
    let mut io = model_io(&p, &r);
    let (failure, _) = exec_failure(RebuildExecutor::new(&d, plan).execute(&mut io));
    assert_eq!(
        failure,
        ExecFailure::ConnectFailed(EngineError::NoActiveSession { replica: rid("r1") })
    );
    assert_eq!(io.stats.base_chunks, 0);
    assert_eq!(p.pins_of(PinKind::Snapshot), 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);

    // A real partial transfer: the second base chunk fails after the first was installed.
    assign(
        d.orchestrator(),
        2,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::Rebuild)],
    );
    let plan = d.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(p.pins_outstanding(), 2);
    let mut io = model_io(&p, &r);
    io.faults.fail_base_call = Some(1);
    let (failure, report) = exec_failure(
        RebuildExecutor::new(&d, plan)
            .with_options(chunked(10))
            .execute(&mut io),
    );
    assert_eq!(
        failure,
        ExecFailure::IoBaseFailed(TransferError::Transport {
            detail: "injected failure on base chunk 1".into(),
        })
    );
    assert_eq!(io.stats.base_chunks, 2);
    assert_eq!(report.base_bytes, 128, "one chunk of the base arrived");
    assert_eq!(report.base_lsn, None);
    assert_eq!(report.entries_applied, 0);
    assert_eq!(p.pins_of(PinKind::Snapshot), 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert!(!has_session(&d));
    assert_eq!(state(&d), ReplicaState::NeedsRebuild);
    assert!(
        lock(&r).installing(),
        "the replica never completed the install"
    );
}

#[test]
fn e3_epoch_bump_mid_catch_up_releases_wal() {
    let p = catch_up_primary();
    let r = replica(&p, 70);
    let d = driver(&p);

    // Bumped while the catch-up runs: after the first chunk.
    let plan = catch_up_plan(&d, 70);
    let orch = Arc::clone(d.orchestrator());
    let mut io = model_io(&p, &r);
    let (failure, report) = exec_failure(
        CatchUpExecutor::new(&d, plan)
            .with_options(chunked(10))
            .with_on_step(move |i: &StepInfo| {
                if i.step == 0 {
                    orch.update_sender_epoch(&rid("r1"), Epoch(2)).unwrap();
                }
            })
            .execute(&mut io),
    );
    assert_eq!(
        failure,
        ExecFailure::SessionInvalidatedMidExecution {
            step: 0,
            error: EngineError::NoActiveSession { replica: rid("r1") },
        }
    );
    assert_eq!(report.entries_applied, 10);
    assert_eq!(io.stats.stream_calls, 1, "no chunk after the bump");
    assert_eq!(lock(&r).head(), Lsn(80));
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(state(&d), ReplicaState::Disconnected);
    assert_eq!(
        only_detail(d.orchestrator().log(), "session_invalidated"),
        "epoch_advanced_1_to_2"
    );

    // Bumped before execution (the reference's case): refused at begin, nothing moves.
    assign(
        d.orchestrator(),
        2,
        &[("r1", ep("10.0.0.1", 1))],
        &[("r1", SessionKind::CatchUp)],
    );
    let plan = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(80)))
        .unwrap();
    assert_eq!(p.pins_of(PinKind::WalRetention), 1);
    d.orchestrator()
        .update_sender_epoch(&rid("r1"), Epoch(3))
        .unwrap();
    let mut io = model_io(&p, &r);
    let (failure, _) = exec_failure(CatchUpExecutor::new(&d, plan).execute(&mut io));
    assert_eq!(
        failure,
        ExecFailure::BeginCatchUpFailed(EngineError::NoActiveSession { replica: rid("r1") })
    );
    assert_eq!(io.stats.stream_calls, 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(lock(&r).head(), Lsn(80));
}

#[test]
fn e3_cancel_releases_resources() {
    let p = catch_up_primary();
    let d = driver(&p);
    let plan = catch_up_plan(&d, 70);
    let sid = plan.session_id();
    let exec = CatchUpExecutor::new(&d, plan);
    assert_eq!(exec.pins_held(), 1);
    let (failure, report) = exec_failure(Err(exec.cancel("operator_abort")));
    assert_eq!(failure, ExecFailure::Cancelled("operator_abort".into()));
    assert_eq!(report.steps, 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert!(!has_session(&d));
    assert_eq!(state(&d), ReplicaState::Disconnected);
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "exec_resources_released"),
        "cancelled: operator_abort"
    );
    assert_eq!(
        only_detail(log, "session_invalidated"),
        "execution_failed: cancelled: operator_abort"
    );
    assert_eq!(log.find("session_invalidated").unwrap().session_id, sid);
}

#[test]
fn e3_rebuild_cancel_releases_all() {
    let p = rebuild_primary();
    let d = driver(&p);
    let plan = rebuild_plan(&d, 1);
    let exec = RebuildExecutor::new(&d, plan);
    assert_eq!(exec.pins_held(), 2);
    assert_eq!(p.pins_outstanding(), 2);
    let (failure, _) = exec_failure(Err(exec.cancel("operator_abort")));
    assert_eq!(failure, ExecFailure::Cancelled("operator_abort".into()));
    assert_eq!(p.pins_of(PinKind::Snapshot), 0);
    assert_eq!(p.pins_of(PinKind::WalRetention), 0);
    assert_eq!(p.pins_outstanding(), 0);
    assert!(!has_session(&d));
    assert_eq!(state(&d), ReplicaState::NeedsRebuild);
    assert_eq!(
        only_detail(d.orchestrator().log(), "exec_resources_released"),
        "cancelled: operator_abort"
    );
}

#[test]
fn e4_successful_catch_up_releases_wal() {
    let p = catch_up_primary();
    let d = driver(&p);
    let orch = d.orchestrator();
    assign(
        orch,
        1,
        &[("r1", ep("10.0.0.1", 1)), ("r2", ep("10.0.0.2", 1))],
        &[("r1", SessionKind::CatchUp), ("r2", SessionKind::CatchUp)],
    );
    let plan1 = d
        .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    let plan2 = d
        .plan_recovery(&rid("r2"), ReplicaHandshake::unverified(Lsn(70)))
        .unwrap();
    assert_eq!(p.pins_of(PinKind::WalRetention), 2);

    // r1: the reference's step list.
    let mut io = ScriptedIo::new([80, 90, 100]);
    let report = CatchUpExecutor::new(&d, plan1).execute(&mut io).unwrap();
    assert_eq!(report.path, RecoveryPath::CatchUp);
    assert_eq!(report.steps, 3);
    assert_eq!(report.entries_applied, 30);
    assert_eq!(report.durable_lsn, Some(Lsn(100)));
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!((io.stream_calls, io.barriers), (3, 1));
    assert_eq!(p.pins_of(PinKind::WalRetention), 1, "only r2's pin is left");

    // r2: the same steps with real data.
    let r2 = replica(&p, 70);
    let lsns = RefCell::new(Vec::new());
    let mut io = model_io(&p, &r2);
    let report = CatchUpExecutor::new(&d, plan2)
        .with_options(chunked(10))
        .with_on_step(|i: &StepInfo| lsns.borrow_mut().push(i.lsn))
        .execute(&mut io)
        .unwrap();
    assert_eq!(lsns.into_inner(), vec![Lsn(80), Lsn(90), Lsn(100)]);
    assert_eq!(report.entries_applied, 30);
    assert_eq!(io.stats.entries_applied, 30);
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(orch.registry().in_sync_count(), 2);
    assert_data_matches(&p, &r2, 100);
}

#[test]
fn e4_successful_rebuild_releases_all() {
    let p = rebuild_primary();
    let r = replica(&p, 10);
    let d = driver(&p);
    let plan = rebuild_plan(&d, 1);
    let mut io = model_io(&p, &r);
    let report = RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::RebuildSnapshotTail);
    assert_eq!(report.base_lsn, Some(Lsn(50)));
    assert_eq!(report.entries_applied, 50);
    assert_eq!(report.durable_lsn, Some(Lsn(100)));
    assert_eq!(report.pins_held_at_start, 2);
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert_eq!(state(&d), ReplicaState::InSync);
    assert_eq!(p.pins_outstanding(), 0);
    assert_data_matches(&p, &r, 100);
}

#[test]
fn plan_execute_consistency_rebuild_cannot_switch_source() {
    let p = rebuild_primary();
    let r = replica(&p, 10);
    let d = driver(&p);
    let plan = rebuild_plan(&d, 1);

    // After planning, storage changes: the checkpoint is no longer trusted, it tries to recycle
    // through 80, and the primary moves on to 110.
    p.set_checkpoint(Some(Lsn(50)), false);
    assert_eq!(
        p.advance_tail(Lsn(80)),
        Lsn(50),
        "the plan's WAL pin keeps the tail it needs"
    );
    p.write_n(10);
    p.commit(Lsn(110)).unwrap();
    let now = common::history_of(&p).rebuild_source_decision();
    assert_eq!(
        now.source,
        RebuildSource::FullBase,
        "a fresh plan would switch"
    );

    let mut io = model_io(&p, &r);
    let report = RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .execute(&mut io)
        .unwrap();
    // The plan-bound source, snapshot and target won.
    assert_eq!(report.path, RecoveryPath::RebuildSnapshotTail);
    assert_eq!(report.base_lsn, Some(Lsn(50)));
    assert_eq!(report.target, Lsn(100));
    assert_eq!(report.entries_applied, 50);
    assert_eq!(state(&d), ReplicaState::InSync);
    assert_eq!(
        only_detail(d.orchestrator().log(), "exec_rebuild_started"),
        "source=snapshot_tail target=100"
    );
    assert_data_matches(&p, &r, 100);
    assert_eq!(p.pins_outstanding(), 0);
    assert_eq!(p.advance_tail(Lsn(80)), Lsn(80));
}

#[test]
fn e5_catch_up_stepwise_not_convenience() {
    let p = catch_up_primary();
    let r = replica(&p, 70);
    let d = driver(&p);
    let plan = catch_up_plan(&d, 70);
    let steps = RefCell::new(Vec::new());
    let mut io = model_io(&p, &r);
    CatchUpExecutor::new(&d, plan)
        .with_options(chunked(10))
        .with_on_step(|i: &StepInfo| steps.borrow_mut().push((i.step, i.kind, i.lsn, i.tick)))
        .execute(&mut io)
        .unwrap();
    assert_eq!(
        steps.into_inner(),
        vec![
            (0, StepKind::CatchUpChunk, Lsn(80), Tick(1)),
            (1, StepKind::CatchUpChunk, Lsn(90), Tick(2)),
            (2, StepKind::CatchUpChunk, Lsn(100), Tick(3)),
        ]
    );
    let log = d.orchestrator().log();
    assert_eq!(
        names_for(log, "r1"),
        vec![
            "sender_added",
            "session_created",
            "connected",
            "handshake",
            "plan_catchup",
            "exec_catchup_started",
            "exec_barrier",
            "exec_completed",
        ]
    );
    assert_eq!(
        only_detail(log, "exec_catchup_started"),
        "target=100 tick=0"
    );
    assert_eq!(only_detail(log, "exec_barrier"), "durable=100");
    assert_eq!(only_detail(log, "exec_completed"), "in_sync");
    // Not the convenience helper.
    assert!(!log.contains("catchup_started") && !log.contains("completed"));
    assert_data_matches(&p, &r, 100);
}

#[test]
fn e5_rebuild_stepwise_not_convenience() {
    let p = rebuild_primary();
    let r = replica(&p, 10);
    let d = driver(&p);
    let plan = rebuild_plan(&d, 1);
    let kinds = RefCell::new(Vec::new());
    let mut io = model_io(&p, &r);
    RebuildExecutor::new(&d, plan)
        .with_options(chunked(10))
        .with_on_step(|i: &StepInfo| kinds.borrow_mut().push((i.kind, i.lsn)))
        .execute(&mut io)
        .unwrap();
    assert_eq!(
        kinds.into_inner(),
        vec![
            (StepKind::BaseChunk, Lsn(50)),
            (StepKind::BaseChunk, Lsn(50)),
            (StepKind::BaseInstalled, Lsn(50)),
            (StepKind::TailChunk, Lsn(60)),
            (StepKind::TailChunk, Lsn(70)),
            (StepKind::TailChunk, Lsn(80)),
            (StepKind::TailChunk, Lsn(90)),
            (StepKind::TailChunk, Lsn(100)),
        ]
    );
    let log = d.orchestrator().log();
    assert_eq!(
        only_detail(log, "exec_rebuild_started"),
        "source=snapshot_tail target=100"
    );
    assert_eq!(
        only_detail(log, "exec_base_installed"),
        "base_lsn=50 bytes=256"
    );
    assert_eq!(only_detail(log, "exec_barrier"), "durable=100");
    assert_eq!(only_detail(log, "exec_rebuild_completed"), "in_sync");
    let started = common::position(log, "exec_rebuild_started");
    assert!(started < common::position(log, "exec_base_installed"));
    assert!(
        common::position(log, "exec_barrier") < common::position(log, "exec_rebuild_completed")
    );
    // Not the convenience helper.
    assert!(!log.contains("rebuild_connected") && !log.contains("rebuild_completed"));
    assert_data_matches(&p, &r, 100);
}
