//! Truncation at the divergence point on real volume files (issue 15): after a failover, the
//! old primary comes back with an uncommitted tail of its own; it is truncated to the last
//! entry both logs share and caught up with the new primary's entries, moving bytes in
//! proportion to the difference, not to the volume.

mod common;

use std::sync::Arc;

use blockvol::Role;
use common::*;
use engine::{CatchUpExecutor, Epoch, Outcome, RecoveryDriver, RecoveryPath, SessionKind};
use v2bridge::{BlockVolStorage, ReplicaTarget};

/// Entries both copies hold, the old primary's own uncommitted tail, and the entries the new
/// primary writes after the failover.
const COMMON: u64 = 100;
const TAIL: u64 = 20;
const NEW: u64 = 30;

#[test]
fn a_returning_old_primary_truncates_its_tail_and_replays_only_the_difference() {
    let dir = tempdir();
    // Epoch 1: `a` is the primary, `b` its replica; both hold 1..=100, committed.
    let (a, _a_storage) = primary(dir.path());
    let b = replica_volume(dir.path(), "b");
    let head = write_blocks(&a, 0..COMMON, 1);
    commit(&a, head);
    seed_replica(&a, &b, COMMON);
    // `a` writes 20 more it never ships (its committed point stays at 100), then dies.
    let a_tail = write_blocks(&a, 0..TAIL, 2);
    a.sync().expect("sync the tail");
    assert_eq!(a_tail, lsn(COMMON + TAIL));

    // Epoch 2: `b` is promoted and writes 30 entries of its own over other blocks.
    b.assign(Role::Primary, blockvol::Epoch(2))
        .expect("promote b");
    let b_head = write_blocks(&b, 50..50 + NEW, 3);
    commit(&b, b_head);
    assert_eq!(b_head, lsn(COMMON + NEW));
    let b_storage = Arc::new(BlockVolStorage::new(Arc::clone(&b)));
    let driver = RecoveryDriver::new(b_storage.clone());

    // `a` returns as `b`'s replica.
    a.assign(Role::Replica, blockvol::Epoch(2))
        .expect("demote a");
    assign(&driver, 2, &[("a", 1)], &[("a", SessionKind::CatchUp)]);
    let mut target = local(&a);
    let reply = target.handshake().expect("handshake");
    let log = reply
        .log
        .as_deref()
        .expect("a real volume lists its epochs");
    assert_eq!(
        log.floor(),
        lsn(0),
        "nothing of a's was flushed past committed"
    );
    let hs = v2bridge::convert::handshake(&reply);
    assert_eq!(hs.flushed(), lsn(COMMON + TAIL));

    let plan = driver.plan_recovery(&rid("a"), hs).expect("plan");
    assert_eq!(plan.outcome(), Outcome::CatchUp, "{:?}", plan.proof());
    let d = plan
        .proof()
        .and_then(|p| p.divergence)
        .expect("the proof names the divergence point");
    assert_eq!(d.point.lsn, lsn(COMMON));
    assert_eq!(d.replica_head, lsn(COMMON + TAIL));
    assert_eq!(d.point.epoch, Epoch(1));

    let mut io = io_for(&driver, &b_storage, &plan, target);
    let report = CatchUpExecutor::new(&driver, plan)
        .execute(&mut io)
        .expect("catch-up");
    assert_eq!(report.path, RecoveryPath::CatchUp);
    assert_eq!(report.truncated_to, Some(lsn(COMMON)));
    assert_eq!(report.entries_applied, NEW);
    assert_eq!(report.base_bytes, 0, "no image moved");
    // The bytes moved are the new primary's 30 entries, not the volume.
    assert_eq!(io.stats.wal_bytes, NEW * WIRE_ENTRY_BYTES);
    assert_eq!(io.stats.truncations, 1);
    // A rebuild would have sent the 1 MiB image (256 blocks) instead of 30 entries.
    assert!(io.stats.wal_bytes * 8 < VOLUME_BYTES);

    // The old primary now holds exactly the new primary's volume, tail gone.
    assert_eq!(a.status().head, blsn(COMMON + NEW));
    assert_eq!(contents(&a), contents(&b));
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(state(&driver, "a"), engine::ReplicaState::InSync);
    assert_eq!(
        a.entry_info(blsn(COMMON + 1)).unwrap().epoch,
        blockvol::Epoch(2)
    );
}

#[test]
fn a_divergence_below_the_old_primarys_checkpoint_is_rebuilt() {
    let dir = tempdir();
    let (a, _a_storage) = primary(dir.path());
    let b = replica_volume(dir.path(), "b");
    let head = write_blocks(&a, 0..COMMON, 1);
    commit(&a, head);
    seed_replica(&a, &b, COMMON);
    let a_tail = write_blocks(&a, 0..TAIL, 2);
    // An ungated old primary: its own tail was committed locally and flushed into its extent
    // (as a primary without replicas would), so it cannot truncate below 120.
    commit(&a, a_tail);
    a.force_flush().expect("flush");
    b.assign(Role::Primary, blockvol::Epoch(2))
        .expect("promote b");
    let b_head = write_blocks(&b, 50..50 + NEW, 3);
    commit(&b, b_head);
    let b_storage = Arc::new(BlockVolStorage::new(Arc::clone(&b)));
    let driver = RecoveryDriver::new(b_storage.clone());
    a.assign(Role::Replica, blockvol::Epoch(2))
        .expect("demote a");
    assign(&driver, 2, &[("a", 1)], &[("a", SessionKind::CatchUp)]);
    let reply = local(&a).handshake().expect("handshake");
    assert_eq!(
        reply.log.as_ref().map(|l| l.floor()),
        Some(lsn(COMMON + TAIL))
    );
    let plan = driver
        .plan_recovery(&rid("a"), v2bridge::convert::handshake(&reply))
        .expect("plan");
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert!(plan.proof().unwrap().divergence.is_none());
}
