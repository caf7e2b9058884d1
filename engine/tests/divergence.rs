//! Truncation at the divergence point (issue 15): a replica whose log left the primary's (an
//! old primary's uncommitted tail after a failover) reports the epochs of its truncatable log;
//! the engine finds the last entry both logs share, truncates there and catches up, instead of
//! rebuilding. Where the point cannot be proven usable it still escalates to a rebuild.

use std::sync::Arc;

use engine::testing::{MemStorage, ModelIo};
use engine::*;

mod common;
use common::compact::{failure, intent, primary, replica_at, rid};

/// A failover: the old primary held `common` entries the new one also holds, plus `tail`
/// entries of its own (epoch 1, never committed); the new primary (epoch 2) then wrote `new`
/// entries of its own. Returns the new primary, its driver and the old primary as a replica.
fn failover(
    common: u64,
    tail: u64,
    new: u64,
) -> (
    MemStorage,
    RecoveryDriver,
    Arc<std::sync::Mutex<engine::testing::ModelReplica>>,
) {
    let (storage, driver) = primary(common);
    let old = replica_at(&storage, common);
    old.lock().unwrap().append_divergent(tail, Epoch(1));
    storage.set_epoch(Epoch(2));
    let head = storage.write_n(new);
    storage.commit(head).unwrap();
    driver
        .orchestrator()
        .process_assignment(&intent(
            2,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    (storage, driver, old)
}

#[test]
fn an_old_primary_truncates_its_uncommitted_tail_and_catches_up() {
    let (storage, driver, old) = failover(10, 5, 10);
    let hs = old.lock().unwrap().handshake_with_log();
    assert_eq!(hs.flushed(), Lsn(15));
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp, "{:?}", plan.proof());
    let proof = plan.proof().unwrap().clone();
    let d = proof
        .divergence
        .expect("the proof names the divergence point");
    assert_eq!(d.replica_head, Lsn(15));
    assert_eq!(d.point.lsn, Lsn(10));
    assert_eq!(proof.replica_flushed_lsn, Lsn(10));
    assert_eq!(proof.anchor, AnchorCheck::AfterTruncation);
    let step = plan.catch_up().expect("a catch-up step");
    assert_eq!((step.from, step.target), (Lsn(10), Lsn(20)));
    assert_eq!(step.truncate_first, Some(d.point));
    assert!(
        driver
            .orchestrator()
            .log()
            .find("divergence_found")
            .is_some()
    );

    let mut io = ModelIo::new(storage.clone(), Arc::clone(&old));
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.path, RecoveryPath::CatchUp);
    assert_eq!(report.truncated_to, Some(Lsn(10)));
    // Only the difference moves: the new primary's 10 entries, no image.
    assert_eq!(report.entries_applied, 10);
    assert_eq!(report.base_bytes, 0);
    assert_eq!(
        old.lock().unwrap().state(),
        storage.state_at(Lsn(20)).unwrap()
    );
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::InSync);
    assert_eq!(storage.pins_outstanding(), 0);
}

#[test]
fn without_its_epochs_the_same_replica_is_rebuilt() {
    let (_storage, driver, old) = failover(10, 5, 10);
    let hs = old.lock().unwrap().handshake();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert_eq!(plan.proof().unwrap().reason.name(), "divergent_history");
    assert!(
        driver
            .orchestrator()
            .log()
            .find("divergence_found")
            .is_none()
    );
}

#[test]
fn an_old_primary_ahead_of_committed_truncates_below_committed() {
    // The old primary wrote more than the new one committed: F (25) > C (20), and the logs
    // parted at 10, below C. Truncating to C would leave an epoch-1 entry the primary does
    // not have (the truncate-only plan fails); the divergence point truncates to 10.
    let (storage, driver, old) = failover(10, 15, 10);
    let hs = old.lock().unwrap().handshake_with_log();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert!(plan.truncation().is_none(), "not the truncate-only plan");
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&old));
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .unwrap();
    assert_eq!(report.truncated_to, Some(Lsn(10)));
    assert_eq!(report.entries_applied, 10);
    assert_eq!(
        old.lock().unwrap().state(),
        storage.state_at(Lsn(20)).unwrap()
    );
}

#[test]
fn a_divergence_below_the_replicas_checkpoint_is_rebuilt() {
    // The old primary flushed its own uncommitted entries into its extent (checkpoint 12,
    // above the point 10): it cannot truncate there.
    let (_storage, driver, old) = failover(10, 5, 10);
    old.lock().unwrap().flush_to(Lsn(12));
    let hs = old.lock().unwrap().handshake_with_log();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert!(plan.proof().unwrap().divergence.is_none());
    let why = driver
        .orchestrator()
        .log()
        .find("divergence_unusable")
        .expect("the log says why the point did not help");
    assert!(
        why.event.detail().contains("already differ at 12"),
        "{}",
        why.event.detail()
    );
    assert_eq!(
        plan.proof().unwrap().divergence_unusable.as_deref(),
        Some(why.event.detail().as_str()),
        "the proof says why too"
    );
}

#[test]
fn a_divergence_below_the_primarys_retention_is_rebuilt() {
    let (storage, driver, old) = failover(10, 5, 10);
    // The new primary recycled its WAL up to 12: the entries after the point are gone.
    assert_eq!(storage.advance_tail(Lsn(12)), Lsn(12));
    let hs = old.lock().unwrap().handshake_with_log();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    let why = driver
        .orchestrator()
        .log()
        .find("divergence_unusable")
        .unwrap();
    assert!(
        why.event.detail().contains("already differ at 12"),
        "{}",
        why.event.detail()
    );
    assert_eq!(
        plan.proof().unwrap().divergence_unusable.as_deref(),
        Some(why.event.detail().as_str()),
        "the proof says why too"
    );
}

#[test]
fn epochs_that_lie_fail_the_truncation_check_and_change_no_data_silently() {
    // The replica's extra entries claim the new primary's epoch (2) but hold other bytes:
    // matching by epoch alone overestimates the shared prefix, and the executor's check of
    // the full identity (checksum included) after truncating must catch it.
    let (storage, driver) = primary(10);
    let old = replica_at(&storage, 10);
    storage.set_epoch(Epoch(2));
    let head = storage.write_n(10);
    storage.commit(head).unwrap();
    // 11..=13 claim epoch 2 with other bytes, 14..=15 an epoch the primary never had.
    old.lock().unwrap().append_divergent(3, Epoch(2));
    old.lock().unwrap().append_divergent(2, Epoch(3));
    driver
        .orchestrator()
        .process_assignment(&intent(
            2,
            &[("r1", "a", 1)],
            &[("r1", SessionKind::CatchUp)],
        ))
        .unwrap();
    let hs = old.lock().unwrap().handshake_with_log();
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(
        plan.proof().unwrap().divergence.map(|d| d.point.lsn),
        Some(Lsn(13)),
        "by epochs alone the logs look shared up to 13"
    );
    let mut io = ModelIo::new(storage.clone(), Arc::clone(&old));
    let (f, report) = failure(CatchUpExecutor::new(&driver, plan).execute(&mut io));
    assert!(matches!(f, ExecFailure::TruncateDiverged { .. }), "{f}");
    assert_eq!(
        report.entries_applied, 0,
        "nothing was applied on the unproven tip"
    );
    let s = driver.orchestrator().sender(&rid("r1")).unwrap();
    assert_eq!(s.state(), ReplicaState::NeedsRebuild);
    assert_eq!(storage.pins_outstanding(), 0);
}

#[test]
fn replica_logs_are_validated() {
    let e = |epoch, first| EpochStart {
        epoch: Epoch(epoch),
        first: Lsn(first),
    };
    assert_eq!(ReplicaLog::new(Lsn(5), &[]), Err(ReplicaLogError::Empty));
    assert!(matches!(
        ReplicaLog::new(Lsn(5), &[e(1, 6)]),
        Err(ReplicaLogError::FloorUncovered { .. })
    ));
    assert!(matches!(
        ReplicaLog::new(Lsn(5), &[e(1, 1), e(1, 7)]),
        Err(ReplicaLogError::NotAscending { index: 1 })
    ));
    assert!(matches!(
        ReplicaLog::new(Lsn(5), &[e(1, 1), e(2, 7), e(3, 7)]),
        Err(ReplicaLogError::NotAscending { index: 2 })
    ));
    let log = ReplicaLog::new(Lsn(5), &[e(1, 1), e(3, 8)]).unwrap();
    assert_eq!(log.epoch_at(Lsn(4)), None, "below the floor");
    assert_eq!(log.epoch_at(Lsn(5)), Some(Epoch(1)));
    assert_eq!(log.epoch_at(Lsn(8)), Some(Epoch(3)));
    // More than the cap keeps the newest and raises the floor to the first kept.
    let many: Vec<EpochStart> = (0..20).map(|i| e(i + 1, i * 10)).collect();
    let log = ReplicaLog::new(Lsn(0), &many).unwrap();
    assert_eq!(log.starts().len(), MAX_EPOCH_STARTS);
    assert_eq!(log.floor(), Lsn(40));
    assert_eq!(log.epoch_at(Lsn(39)), None);
    assert_eq!(log.epoch_at(Lsn(45)), Some(Epoch(5)));
}
