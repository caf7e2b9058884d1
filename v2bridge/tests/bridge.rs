//! v2bridge on real volume files: the history reader, the pins, and the catch-up half of
//! `BridgeIo` (WAL chunks, truncation, barrier). Every test asserts the behaviour it names on
//! the volumes themselves (status, entry identities, digests), not only on return values.

mod common;

use engine::ReplicaHandshake;
use std::sync::Arc;

use blockvol::{BaseInstallSpec, EntryInfo, Lba, RetentionPolicy};
use common::*;
use engine::conformance::Harness;
use engine::{
    AnchorCheck, CatchUpExecutor, CatchUpIo, EntryId, Epoch, ExecFailure, LsnRange, Outcome,
    ProofReason, RebuildSource, RecoveryDriver, RecoveryPath, ReplicaState, RetainedHistory,
    SessionKind, StepInfo, StorageAdapter, StorageError, TransferError,
};
use v2bridge::BlockVolStorage;
use v2bridge::convert::{entry_id, to_blockvol};
use v2bridge::harness::block_pattern;

fn keep(entries: u64) -> RetentionPolicy {
    RetentionPolicy {
        keep_entries: entries,
        keep_bytes: 0,
    }
}

// ---- Reader ------------------------------------------------------------------------------

#[test]
fn retained_history_maps_head_tail_committed_checkpoint_and_trust_exactly() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..40, 0);
    commit(&p, lsn(30));
    p.set_retention(keep(5));
    assert_eq!(p.force_flush_to(blsn(20)).expect("flush"), blsn(20));
    let st = p.status();
    assert_eq!(
        (st.head, st.tail, st.checkpoint, st.committed),
        (blsn(40), blsn(15), blsn(20), blsn(30))
    );
    let h = storage.get_retained_history().expect("history");
    assert_eq!(
        h,
        RetainedHistory {
            head_lsn: lsn(40),
            tail_lsn: lsn(15),
            committed_lsn: lsn(30),
            checkpoint_lsn: Some(lsn(20)),
            checkpoint_trusted: true,
            missing: vec![],
        }
    );

    // Committed moves only with set_committed; a flush moves the checkpoint and the tail and
    // leaves committed where the replication layer put it (the reference's interim mapping
    // made committed the flusher checkpoint).
    p.set_committed(blsn(35));
    let h = storage.get_retained_history().expect("history");
    assert_eq!(
        (h.committed_lsn, h.checkpoint_lsn, h.tail_lsn),
        (lsn(35), Some(lsn(20)), lsn(15))
    );
    assert_eq!(p.force_flush_to(blsn(33)).expect("flush"), blsn(33));
    let h = storage.get_retained_history().expect("history");
    assert_eq!(
        (h.committed_lsn, h.checkpoint_lsn, h.tail_lsn, h.head_lsn),
        (lsn(35), Some(lsn(33)), lsn(28), lsn(40))
    );
    // Under the committed gate the flusher never passes committed, however far it is asked.
    assert_eq!(p.force_flush().expect("flush"), blsn(35));
    assert_eq!(
        storage.get_retained_history().unwrap().checkpoint_lsn,
        Some(lsn(35))
    );
}

#[test]
fn committed_above_checkpoint_makes_a_catch_up_from_below_the_checkpoint_recoverable() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(17)).unwrap();
    h.primary_checkpoint(lsn(20), lsn(15)).unwrap();

    let storage = h.storage();
    let hist = storage.get_retained_history().unwrap();
    assert_eq!(hist.committed_lsn, lsn(40));
    assert_eq!(hist.checkpoint_lsn, Some(lsn(20)));
    assert_eq!(hist.tail_lsn, lsn(15));
    assert!(hist.committed_lsn > hist.checkpoint_lsn.unwrap());
    assert!(hist.is_recoverable(lsn(17), lsn(40)));

    let driver = RecoveryDriver::new(storage);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    let hs = h.replica_handshake("r1").unwrap();
    assert_eq!(hs.flushed(), lsn(17));
    let plan = driver.plan_recovery(&rid("r1"), hs).expect("plan");
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    let proof = plan.proof().expect("proof");
    assert_eq!(
        proof.reason,
        ProofReason::GapWithinRetention {
            needed: LsnRange::new(lsn(17), lsn(40)),
            tail: lsn(15),
            head: lsn(40),
        }
    );
    assert!(matches!(proof.anchor, AnchorCheck::Matched(id) if id.lsn == lsn(17)));
    assert_eq!(
        plan.catch_up().and_then(|c| c.pin()).map(|p| p.start_lsn),
        Some(lsn(17))
    );
    assert_eq!(h.pins_outstanding(), 1);

    let mut io = h.io("r1", Epoch(1), session_of(&plan)).unwrap();
    let r = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(8, 64 << 10))
        .execute(&mut io)
        .expect("catch-up");
    assert_eq!(r.path, RecoveryPath::CatchUp);
    assert_eq!(r.entries_applied, 23);
    assert_eq!(r.wal_bytes, 23 * WIRE_ENTRY_BYTES);
    assert_eq!(r.steps, 3);
    assert_eq!(r.durable_lsn, Some(lsn(40)));
    assert_eq!(io.stats.entries_applied, 23);
    assert_eq!(state(&driver, "r1"), ReplicaState::InSync);
    assert_eq!(h.pins_outstanding(), 0);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    assert_eq!(
        digest(&h.replica("r1").unwrap().volume()),
        digest(h.primary())
    );
}

#[test]
fn checkpoint_zero_maps_to_none() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    let empty = storage.get_retained_history().unwrap();
    assert_eq!(
        empty,
        RetainedHistory {
            checkpoint_trusted: true,
            ..RetainedHistory::default()
        }
    );
    write_blocks(&p, 0..5, 0);
    commit(&p, lsn(5));
    let h = storage.get_retained_history().unwrap();
    assert_eq!(p.status().checkpoint, blsn(0));
    assert_eq!(h.checkpoint_lsn, None);
    assert_eq!(h.rebuild_source_decision().source, RebuildSource::FullBase);
    p.force_flush_to(blsn(3)).unwrap();
    assert_eq!(
        storage.get_retained_history().unwrap().checkpoint_lsn,
        Some(lsn(3))
    );
}

#[test]
fn missing_is_empty_for_a_healthy_index_across_recycling_truncation_and_reopen() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, (0..100).map(|i| i % 256), 0);
    commit(&p, lsn(80));
    p.set_retention(keep(20));
    p.force_flush_to(blsn(60)).unwrap();
    p.truncate_after(blsn(90)).unwrap();
    write_blocks(&p, 0..10, 3);
    let h = storage.get_retained_history().unwrap();
    assert_eq!(
        (h.head_lsn, h.tail_lsn, h.checkpoint_lsn),
        (lsn(100), lsn(40), Some(lsn(60)))
    );
    assert!(h.missing.is_empty());
    assert!(p.retained_gaps().is_empty());
    assert!(h.is_recoverable(lsn(40), lsn(100)));
    p.sync().unwrap();
    drop(storage);
    drop(p);

    // Recovery rebuilds the index from the ring: still contiguous over the same range.
    let p = reopen_volume(dir.path(), "primary");
    let storage = BlockVolStorage::new(Arc::clone(&p));
    let h = storage.get_retained_history().unwrap();
    assert_eq!(
        (h.head_lsn, h.tail_lsn, h.checkpoint_lsn),
        (lsn(100), lsn(40), Some(lsn(60)))
    );
    assert!(h.missing.is_empty());
}

#[test]
fn install_incomplete_volume_is_refused_as_a_primary() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..10, 0);
    commit(&p, lsn(10));
    p.force_flush().unwrap();
    assert!(storage.get_retained_history().is_ok());
    let spec = BaseInstallSpec {
        base_lsn: blsn(5),
        base_entry: EntryInfo {
            lsn: blsn(5),
            epoch: blockvol::Epoch(1),
            content_crc: 0xDEAD_BEEF,
        },
        geometry: p.geometry(),
    };
    drop(p.begin_base_install(spec).expect("begin install"));
    assert!(p.status().install_incomplete);

    match storage.get_retained_history() {
        Err(StorageError::Backend(m)) => assert!(m.contains("incomplete"), "{m}"),
        other => panic!("history of an install-incomplete volume: {other:?}"),
    }
    assert!(matches!(
        storage.pin_snapshot(lsn(10)),
        Err(StorageError::SnapshotUnavailable { trusted: false, .. })
    ));
    assert!(storage.pin_wal_retention(lsn(10)).is_err());
    assert!(storage.pin_full_base(lsn(10)).is_err());
    assert!(storage.entry_id(lsn(5)).is_err());
    assert_eq!(p.status().pins_outstanding, 0);

    let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn StorageAdapter>);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    assert!(matches!(
        driver.plan_recovery(&rid("r1"), ReplicaHandshake::unverified(lsn(0))),
        Err(engine::EngineError::HistoryUnavailable(_))
    ));
}

// ---- Pinner ------------------------------------------------------------------------------

#[test]
fn an_engine_wal_pin_stops_reclamation_until_it_is_dropped() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..50, 0);
    commit(&p, lsn(50));
    let pin = storage.pin_wal_retention(lsn(20)).expect("pin");
    assert_eq!(pin.start_lsn, lsn(20));
    assert_eq!(p.status().pins_outstanding, 1);

    p.set_retention(keep(0));
    assert_eq!(p.force_flush().unwrap(), blsn(50));
    let st = p.status();
    assert_eq!((st.checkpoint, st.tail), (blsn(50), blsn(20)));
    assert_eq!(storage.get_retained_history().unwrap().tail_lsn, lsn(20));
    // The pinned entries are really still there.
    assert_eq!(scan(&p, 21, 50).len(), 30);
    assert!(storage.entry_id(lsn(21)).unwrap().is_some());

    drop(pin);
    assert_eq!(p.status().pins_outstanding, 0);
    p.force_flush().unwrap();
    let st = p.status();
    assert_eq!((st.checkpoint, st.tail), (blsn(50), blsn(50)));
    assert!(st.tail > blsn(20));
    assert_eq!(storage.entry_id(lsn(21)).unwrap(), None);
    assert!(matches!(
        storage.pin_wal_retention(lsn(20)),
        Err(StorageError::Recycled { .. })
    ));
}

#[test]
fn a_catch_up_plan_pin_holds_the_tail_through_flushes_until_the_plan_is_dropped() {
    let mut h = harness();
    let head = h.primary_write(60).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    let plan = driver
        .plan_recovery(&rid("r1"), h.replica_handshake("r1").unwrap())
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    assert_eq!(plan.pins_held(), 1);
    let p = Arc::clone(h.primary());
    p.set_retention(keep(0));
    p.force_flush().unwrap();
    assert_eq!(
        (p.status().checkpoint, p.status().tail),
        (blsn(60), blsn(10))
    );
    drop(plan);
    assert_eq!(h.pins_outstanding(), 0);
    p.force_flush().unwrap();
    assert_eq!(p.status().tail, blsn(60));
}

#[test]
fn a_wal_pin_on_a_recycled_range_fails_with_recycled() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..40, 0);
    commit(&p, lsn(40));
    p.set_retention(keep(10));
    p.force_flush().unwrap();
    assert_eq!(p.status().tail, blsn(30));
    for after in [0, 10, 29] {
        match storage.pin_wal_retention(lsn(after)) {
            Err(StorageError::Recycled { retained_start, .. }) => {
                assert_eq!(retained_start, lsn(31));
            }
            other => panic!("pin after {after}: {other:?}"),
        }
    }
    assert_eq!(p.status().pins_outstanding, 0);
    // At the tail itself the pin holds (the tail entry's successor is retained).
    let pin = storage.pin_wal_retention(lsn(30)).expect("pin at the tail");
    assert_eq!(p.status().pins_outstanding, 1);
    drop(pin);
}

/// The image `(lba, lsn, salt)` writes produce, over a zero volume.
fn image(blocks: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; VOLUME_BYTES as usize];
    for &(lba, l, salt) in blocks {
        let off = lba as usize * BS;
        img[off..off + BS].copy_from_slice(&block_pattern(l, salt, BS));
    }
    img
}

#[test]
fn a_snapshot_pin_is_only_taken_at_the_trusted_checkpoint_and_holds_that_image() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..30, 0);
    commit(&p, lsn(30));
    p.force_flush_to(blsn(20)).unwrap();
    for bad in [0, 19, 21, 30] {
        match storage.pin_snapshot(lsn(bad)) {
            Err(StorageError::SnapshotUnavailable {
                requested,
                checkpoint,
                trusted,
            }) => {
                assert_eq!(
                    (requested, checkpoint, trusted),
                    (lsn(bad), Some(lsn(20)), true)
                );
            }
            other => panic!("snapshot pin at {bad}: {other:?}"),
        }
    }
    assert_eq!(storage.images_held(), 0);
    assert_eq!(p.status().pins_outstanding, 0);

    let pin = storage.pin_snapshot(lsn(20)).expect("snapshot pin");
    assert_eq!(pin.lsn, lsn(20));
    assert_eq!(storage.images_held(), 1);
    let img = storage.image(pin.pin_id).expect("registered image");
    assert_eq!(img.lsn(), blsn(20));
    let want: Vec<_> = (0..20).map(|i| (i, i + 1, 0)).collect();
    assert_eq!(image_of(&img), image(&want));
    // The image is fenced: committed is 30, yet the flusher stays at the snapshot.
    assert_eq!(p.force_flush().unwrap(), blsn(20));
    assert_eq!(image_of(&img), image(&want));
    drop(img);
    drop(pin);
    assert_eq!((storage.images_held(), p.status().pins_outstanding), (0, 0));
    assert_eq!(p.force_flush().unwrap(), blsn(30));
}

#[test]
fn a_full_base_pin_freezes_the_extent_at_its_lsn_while_writes_continue() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..8, 0);
    commit(&p, lsn(8));
    let pin = storage.pin_full_base(lsn(8)).expect("full base pin");
    assert_eq!(pin.committed_lsn, lsn(8));
    assert_eq!(p.status().checkpoint, blsn(8));
    assert_eq!(storage.images_held(), 1);

    // Overwrite the same blocks after the pin.
    write_blocks(&p, 0..8, 7);
    commit(&p, lsn(16));
    assert_eq!(p.force_flush().unwrap(), blsn(8), "the fence must hold");
    for lba in 0..8 {
        assert_eq!(
            p.read(Lba(lba), 1).unwrap(),
            block_pattern(9 + lba, 7, BS),
            "reads see the new write at lba {lba}"
        );
    }
    let img = storage.image(pin.pin_id).expect("image");
    assert_eq!(img.lsn(), blsn(8));
    let pinned: Vec<_> = (0..8).map(|i| (i, i + 1, 0)).collect();
    assert_eq!(
        image_of(&img),
        image(&pinned),
        "the image holds the pinned data"
    );

    // Other full-base pins the image cannot serve are refused.
    for bad in [5, 12, 17] {
        assert!(
            matches!(
                storage.pin_full_base(lsn(bad)),
                Err(StorageError::BaseUnavailable { requested, .. }) if requested == lsn(bad)
            ),
            "full base at {bad}"
        );
    }
    assert_eq!(storage.images_held(), 1);
    drop(img);
    drop(pin);
    assert_eq!((storage.images_held(), p.status().pins_outstanding), (0, 0));
    assert_eq!(p.force_flush().unwrap(), blsn(16));
    let newer: Vec<_> = (0..8).map(|i| (i, 9 + i, 7)).collect();
    assert_eq!(contents(&p), image(&newer));
}

#[test]
fn every_pin_kind_is_released_when_the_engine_drops_it() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..30, 0);
    commit(&p, lsn(30));
    let base = storage.pin_full_base(lsn(30)).unwrap();
    let snap = storage.pin_snapshot(lsn(30)).unwrap();
    let wal = storage.pin_wal_retention(lsn(30)).unwrap();
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (3, 2));
    drop(wal);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (2, 2));
    drop(snap);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (1, 1));
    drop(base);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));

    // The same through plans: a snapshot + tail plan holds two pins and one image, a
    // full-base plan one of each; dropping or cancelling the plan releases them.
    let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn StorageAdapter>);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::SnapshotTail)
    );
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (2, 1));
    drop(plan);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));

    let dir2 = tempdir();
    let (p2, storage2) = primary(dir2.path());
    write_blocks(&p2, 0..5, 0);
    commit(&p2, lsn(5));
    let driver2 = RecoveryDriver::new(Arc::clone(&storage2) as Arc<dyn StorageAdapter>);
    assign(&driver2, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver2.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    assert_eq!(
        (p2.status().pins_outstanding, storage2.images_held()),
        (1, 1)
    );
    assert_eq!(plan.pins_held(), 1);
    driver2.cancel_plan(plan, "test");
    assert_eq!(
        (p2.status().pins_outstanding, storage2.images_held()),
        (0, 0)
    );
}

#[test]
fn entry_id_covers_the_tail_and_head_and_refuses_recycled_and_beyond_head() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..30, 0);
    commit(&p, lsn(30));
    let before: Vec<EntryId> = (0..=30)
        .map(|l| storage.entry_id(lsn(l)).unwrap().expect("retained"))
        .collect();
    assert_eq!(before[0], EntryId::ORIGIN);
    for e in scan(&p, 1, 30) {
        let id = before[e.lsn.0 as usize];
        assert_eq!(id, entry_id(e.info()));
        assert_eq!(
            (id.lsn, id.epoch, id.checksum),
            (lsn(e.lsn.0), Epoch(1), e.info().content_crc)
        );
    }

    p.set_retention(keep(10));
    p.force_flush().unwrap();
    assert_eq!(p.status().tail, blsn(20));
    let check = |storage: &BlockVolStorage| {
        assert_eq!(storage.entry_id(lsn(0)).unwrap(), Some(EntryId::ORIGIN));
        assert_eq!(storage.entry_id(lsn(1)).unwrap(), None, "recycled");
        assert_eq!(storage.entry_id(lsn(19)).unwrap(), None, "recycled");
        assert_eq!(
            storage.entry_id(lsn(20)).unwrap(),
            Some(before[20]),
            "tail identity survives recycling"
        );
        for l in 21..=30 {
            assert_eq!(storage.entry_id(lsn(l)).unwrap(), Some(before[l as usize]));
        }
        assert_eq!(storage.entry_id(lsn(31)).unwrap(), None, "beyond head");
    };
    check(&storage);
    p.sync().unwrap();
    drop(storage);
    drop(p);
    // The tail identity is persisted: it survives a restart too.
    let p = reopen_volume(dir.path(), "primary");
    check(&BlockVolStorage::new(p));
}

// ---- BridgeIo: WAL chunks, truncation, barrier -------------------------------------------

#[test]
fn streaming_real_entries_in_chunks_of_1_7_and_all_leaves_the_replica_equal_to_the_primary() {
    for k in [1u64, 7, u64::MAX] {
        let mut h = harness();
        let head = h.primary_write(40).unwrap();
        h.primary_commit(head).unwrap();
        h.add_replica("r1", lsn(10)).unwrap();
        let vol = h.replica("r1").unwrap().volume();
        assert!(
            scan(h.primary(), 11, 40)
                .iter()
                .all(|e| e.encoded_len() as u64 == WIRE_ENTRY_BYTES)
        );
        let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
        let (mut at, mut chunks) = (lsn(10), 0u64);
        while at < head {
            let c = io.stream_wal_chunk(at, head, k).expect("chunk");
            let want = k.min(at.distance_to(head));
            assert_eq!(c.entries, want, "chunk size {k}");
            assert_eq!(c.applied_to, lsn(at.get() + want));
            assert_eq!(c.bytes, want * WIRE_ENTRY_BYTES);
            assert_eq!(vol.status().head, to_blockvol(c.applied_to));
            at = c.applied_to;
            chunks += 1;
        }
        assert_eq!(chunks, 30u64.div_ceil(k.min(30)));
        assert_eq!(io.stats.wal_chunks, chunks);
        assert_eq!(io.stats.entries_applied, 30);
        assert_eq!(io.stats.duplicates, 0);
        assert_eq!(io.stats.wal_bytes, 30 * WIRE_ENTRY_BYTES);
        // Applied but not yet durable: the barrier makes it so and reports it.
        assert_eq!(vol.status().durable, blsn(10));
        assert_eq!(io.barrier(head).expect("barrier"), head);
        assert_eq!(vol.status().durable, blsn(40));
        assert_eq!(digest(&vol), digest(h.primary()));
        assert!(h.replica_matches_primary("r1", head).unwrap());
        // Each shipped entry kept its identity.
        for l in 11..=40 {
            assert_eq!(
                vol.entry_info(blsn(l)).unwrap(),
                h.primary().entry_info(blsn(l)).unwrap()
            );
        }
    }
}

#[test]
fn resending_an_applied_chunk_is_acknowledged_as_duplicates() {
    let mut h = harness();
    let head = h.primary_write(20).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    let first = io.stream_wal_chunk(lsn(10), head, 7).unwrap();
    let d = digest(&vol);
    let again = io.stream_wal_chunk(lsn(10), head, 7).unwrap();
    assert_eq!((first.applied_to, first.entries), (lsn(17), 7));
    assert_eq!((again.applied_to, again.entries), (lsn(17), 7));
    assert_eq!((io.stats.entries_applied, io.stats.duplicates), (7, 7));
    assert_eq!(vol.status().head, blsn(17));
    assert_eq!(digest(&vol), d);
}

#[test]
fn a_divergent_replica_fails_the_first_chunk_with_divergent_and_applies_nothing() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    // LSNs 11..=13 on the replica hold other content than the primary's 11..=13.
    assert_eq!(h.replica_append_divergent("r1", 3).unwrap(), lsn(13));
    let vol = h.replica("r1").unwrap().volume();
    let (d0, head0) = (digest(&vol), vol.status().head);
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();

    // Anchored at the common entry 10: the first shipped entry collides with 11.
    match io.stream_wal_chunk(lsn(10), head, 7) {
        Err(TransferError::Divergent { lsn: at, .. }) => assert_eq!(at, lsn(11)),
        other => panic!("divergent entry: {other:?}"),
    }
    // Anchored at the replica's own (divergent) tip: refused before anything ships.
    match io.stream_wal_chunk(lsn(13), head, 7) {
        Err(TransferError::Divergent { lsn: at, .. }) => assert_eq!(at, lsn(13)),
        other => panic!("divergent anchor: {other:?}"),
    }
    assert_eq!(vol.status().head, head0);
    assert_eq!(digest(&vol), d0);
    assert_eq!((io.stats.entries_applied, io.stats.wal_chunks), (0, 0));
    assert!(
        TransferError::Divergent {
            lsn: lsn(11),
            detail: String::new()
        }
        .requires_rebuild()
    );
}

#[test]
fn truncation_through_the_io_drops_a_divergent_uncommitted_tail_and_returns_the_tip() {
    let mut h = harness();
    let head = h.primary_write(30).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", head).unwrap();
    assert_eq!(h.replica_append_divergent("r1", 5).unwrap(), lsn(35));
    let vol = h.replica("r1").unwrap().volume();
    assert_ne!(digest(&vol), digest(h.primary()));
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    let tip = io.truncate_after(head).expect("truncate");
    assert_eq!(Some(tip), h.storage().entry_id(head).unwrap());
    assert_eq!(io.stats.truncations, 1);
    assert_eq!(vol.status().head, blsn(30));
    assert!(vol.entry_info(blsn(31)).is_err());
    assert_eq!(digest(&vol), digest(h.primary()));
    assert!(h.replica_matches_primary("r1", head).unwrap());

    // The primary's own next entries now apply on top of the truncated log.
    let head = h.primary_write(10).unwrap();
    h.primary_commit(head).unwrap();
    let mut io = h.io("r1", Epoch(1), sid(2)).unwrap();
    let c = io.stream_wal_chunk(lsn(30), head, 100).unwrap();
    assert_eq!((c.applied_to, c.entries), (head, 10));
    assert_eq!(io.barrier(head).unwrap(), head);
    assert!(h.replica_matches_primary("r1", head).unwrap());
}

#[test]
fn truncation_below_the_replica_checkpoint_maps_to_truncate_below_checkpoint() {
    let mut h = harness();
    let head = h.primary_write(30).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", head).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    assert_eq!(vol.force_flush().unwrap(), blsn(30));
    let d = digest(&vol);
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    match io.truncate_after(lsn(20)) {
        Err(e @ TransferError::TruncateBelowCheckpoint { .. }) => {
            assert_eq!(
                e,
                TransferError::TruncateBelowCheckpoint {
                    requested: lsn(20),
                    checkpoint: lsn(30)
                }
            );
            assert!(e.requires_rebuild());
        }
        other => panic!("truncate below checkpoint: {other:?}"),
    }
    assert_eq!(io.stats.truncations, 0);
    assert_eq!(vol.status().head, blsn(30));
    assert_eq!(digest(&vol), d);
}

#[test]
fn a_recycled_start_maps_to_recycled() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(5)).unwrap();
    h.primary_checkpoint(lsn(30), lsn(30)).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    let e = io.stream_wal_chunk(lsn(5), head, 8).unwrap_err();
    assert_eq!(
        e,
        TransferError::Recycled {
            from: lsn(5),
            retained_start: lsn(31)
        }
    );
    assert!(e.requires_rebuild());
    assert_eq!(vol.status().head, blsn(5));
    assert_eq!(io.stats.wal_chunks, 0);
}

#[test]
fn a_pin_revoked_on_the_primary_turns_the_next_chunk_into_recycled() {
    let mut h = harness();
    let head = h.primary_write(60).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    let plan = driver
        .plan_recovery(&rid("r1"), h.replica_handshake("r1").unwrap())
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::CatchUp);
    let p = Arc::clone(h.primary());
    p.force_flush().unwrap();
    assert_eq!(
        (p.status().checkpoint, p.status().tail),
        (blsn(60), blsn(10)),
        "the plan's pin holds the tail"
    );
    let mut io = h.io("r1", Epoch(1), session_of(&plan)).unwrap();
    let mut revoked = 0;
    let result = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(7, 64 << 10))
        .with_on_step(|s: &StepInfo| {
            if s.step == 0 {
                revoked = p.revoke_wal_pins("test: the primary reclaimed its WAL");
            }
        })
        .execute(&mut io);
    let (failure, report) = expect_failure(result);
    assert_eq!(revoked, 1);
    assert_eq!(p.status().tail, blsn(60), "revocation let the tail move");
    assert_eq!(
        failure,
        ExecFailure::IoStreamFailed {
            step: 1,
            error: TransferError::Recycled {
                from: lsn(17),
                retained_start: lsn(61)
            }
        }
    );
    assert_eq!(report.entries_applied, 7);
    assert_eq!(h.replica("r1").unwrap().volume().status().head, blsn(17));
    assert_eq!(state(&driver, "r1"), ReplicaState::NeedsRebuild);
    assert_eq!(h.pins_outstanding(), 0);
    let reason = event_detail(&driver, "r1", "exec_resources_released").unwrap();
    assert!(reason.starts_with("io_stream_failed_step_1"), "{reason}");
}

#[test]
fn the_barrier_returns_the_replica_durable_lsn_and_refuses_a_mismatched_tip() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(30)).unwrap();
    h.add_replica("r2", lsn(29)).unwrap();
    h.add_replica("r3", lsn(35)).unwrap();
    // r2 holds 30 entries, the last one not the primary's.
    assert_eq!(h.replica_append_divergent("r2", 1).unwrap(), lsn(30));

    let v1 = h.replica("r1").unwrap().volume();
    let mut io1 = h.io("r1", Epoch(1), sid(1)).unwrap();
    io1.stream_wal_chunk(lsn(30), head, 100).unwrap();
    assert_eq!(
        (v1.status().head, v1.status().durable),
        (blsn(40), blsn(30))
    );
    assert_eq!(io1.barrier(head).unwrap(), head);
    assert_eq!(v1.status().durable, blsn(40));
    assert_eq!(io1.stats.barriers, 1);

    // Short of the target: it reports where it is durable, not the target.
    let mut io3 = h.io("r3", Epoch(1), sid(1)).unwrap();
    assert_eq!(io3.barrier(head).unwrap(), lsn(35));

    let mut io2 = h.io("r2", Epoch(1), sid(1)).unwrap();
    match io2.barrier(head) {
        Err(TransferError::Divergent { lsn: at, .. }) => assert_eq!(at, lsn(30)),
        other => panic!("barrier on a mismatched tip: {other:?}"),
    }
    match io2.barrier(lsn(30)) {
        Err(TransferError::Divergent { lsn: at, .. }) => assert_eq!(at, lsn(30)),
        other => panic!("barrier on a mismatched tip at the target: {other:?}"),
    }
}
