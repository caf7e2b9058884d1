//! v2bridge on real volume files: base-image transfer (full base, snapshot), corruption in
//! transit, a replica crash mid-install, `LocalReplica` fencing, and a check that the
//! conformance harness's data comparison can fail.

mod common;

use std::sync::Arc;

use blockvol::{EntryKind, Role, WalEntry};
use common::*;
use engine::conformance::Harness;
use engine::{
    BaseRequest, CatchUpIo, Epoch, ExecFailure, Outcome, ProofReason, RebuildExecutor, RebuildIo,
    RebuildSource, RecoveryDriver, RecoveryPath, ReplicaState, SessionKind, StorageAdapter,
    TransferError,
};
use v2bridge::convert::to_engine;
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, LocalReplica, ReplicaTarget, TargetError, TruncateRequest,
};

// ---- Base transfer -----------------------------------------------------------------------

#[test]
fn a_full_base_rebuild_installs_byte_exact_and_sends_no_zero_runs() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    // Six distinct non-zero blocks (lba 4 written twice) on a 256-block volume.
    let head = write_blocks(&p, [3, 4, 5, 100, 200, 255, 4], 0);
    commit(&p, head);
    let replica = replica_volume(dir.path(), "r1");
    let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn StorageAdapter>);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    assert_eq!(plan.rebuild().map(|r| r.target), Some(head));
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (1, 1));

    let mut io = io_for(&driver, &storage, &plan, local(&replica));
    let r = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 16 << 10))
        .execute(&mut io)
        .expect("rebuild");
    assert_eq!(r.path, RecoveryPath::RebuildFullBase);
    assert_eq!(r.base_lsn, Some(head));
    assert_eq!(r.durable_lsn, Some(head));
    assert_eq!(r.entries_applied, 0);
    assert_eq!(r.base_bytes, VOLUME_BYTES);
    assert_eq!(r.base_bytes_sent, 6 * BS as u64);
    assert!(r.base_bytes_sent < VOLUME_BYTES);
    assert_eq!(io.stats.base_bytes_sent, 6 * BS as u64);
    assert_eq!(io.stats.base_bytes_scanned, VOLUME_BYTES);
    // Four runs ({3,4,5}, {100}, {200}, {255}); a chunk boundary may split the first.
    assert!((4..=5).contains(&io.stats.base_chunks), "{:?}", io.stats);
    assert_eq!(state(&driver, "r1"), ReplicaState::InSync);

    assert_eq!(digest(&replica), digest(&p));
    assert_eq!(contents(&replica), contents(&p));
    let st = replica.status();
    assert_eq!(
        (st.head, st.checkpoint, st.tail),
        (blsn(7), blsn(7), blsn(7))
    );
    assert!(!st.install_incomplete && st.checkpoint_trusted);
    assert_eq!(
        replica.entry_info(blsn(7)).unwrap(),
        p.entry_info(blsn(7)).unwrap()
    );
    drop(io);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));
}

#[test]
fn a_snapshot_image_installs_byte_exact_and_the_tail_completes_it() {
    let mut h = harness();
    let head = h.primary_write(100).unwrap();
    h.primary_commit(head).unwrap();
    h.primary_checkpoint(lsn(50), lsn(50)).unwrap();
    h.add_replica("r1", lsn(0)).unwrap();
    let storage = Arc::clone(h.storage_adapter());
    let snap = storage.pin_snapshot(lsn(50)).unwrap();
    let wal = storage.pin_wal_retention(lsn(50)).unwrap();
    let vol = h.replica("r1").unwrap().volume();

    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    let total = io
        .begin_base(&BaseRequest {
            source: RebuildSource::SnapshotTail,
            lsn: lsn(50),
            pin_id: snap.pin_id,
        })
        .unwrap();
    assert_eq!(total, VOLUME_BYTES);
    assert!(vol.status().install_incomplete);
    let (mut covered, mut sent) = (0, 0);
    loop {
        let c = io.transfer_base_chunk(32 << 10).unwrap();
        covered += c.bytes;
        sent += c.bytes_sent;
        if c.done {
            break;
        }
    }
    assert_eq!(covered, VOLUME_BYTES);
    // The harness writes LSN n at LBA n: the image at 50 holds 50 non-zero blocks.
    assert_eq!(sent, 50 * BS as u64);
    assert_eq!(io.finish_base().unwrap(), lsn(50));
    let st = vol.status();
    assert!(!st.install_incomplete);
    assert_eq!((st.head, st.checkpoint), (blsn(50), blsn(50)));
    assert_eq!(
        digest(&vol),
        blockvol::Digest::of_image(&h.oracle_image(lsn(50)))
    );
    assert_eq!(
        vol.entry_info(blsn(50)).unwrap(),
        h.primary().entry_info(blsn(50)).unwrap()
    );

    let c = io.stream_wal_chunk(lsn(50), head, 1000).unwrap();
    assert_eq!((c.applied_to, c.entries), (head, 50));
    assert_eq!(io.barrier(head).unwrap(), head);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    drop((io, snap, wal));
    assert_eq!((h.pins_outstanding(), storage.images_held()), (0, 0));
}

/// A transport that flips one byte of the n-th base chunk frame (counting from 0).
struct FlipByte {
    inner: LocalReplica,
    corrupt: u64,
    chunks: u64,
}

impl ReplicaTarget for FlipByte {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        self.inner.handshake()
    }
    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        self.inner.apply(req)
    }
    fn truncate(&mut self, req: TruncateRequest) -> Result<blockvol::EntryInfo, TargetError> {
        self.inner.truncate(req)
    }
    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<blockvol::Lba, TargetError> {
        self.inner.begin_base(req)
    }
    fn base_chunk(&mut self, mut req: BaseChunkRequest) -> Result<(), TargetError> {
        if self.chunks == self.corrupt {
            // A data byte, past the 24-byte chunk header.
            let i = req.frame.len() - 1;
            req.frame[i] ^= 0x10;
        }
        self.chunks += 1;
        self.inner.base_chunk(req)
    }
    fn finish_base(&mut self, lineage: Lineage) -> Result<blockvol::Lsn, TargetError> {
        self.inner.finish_base(lineage)
    }
    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        self.inner.barrier(req)
    }
}

#[test]
fn a_chunk_corrupted_in_transit_fails_with_checksum_and_leaves_the_replica_incomplete() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    let head = write_blocks(&p, 0..64, 0);
    commit(&p, head);
    let replica = replica_volume(dir.path(), "r1");
    seed_replica(&p, &replica, 20);
    let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn StorageAdapter>);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    assert_eq!(
        plan.rebuild().map(|r| r.source()),
        Some(RebuildSource::FullBase)
    );
    let target = FlipByte {
        inner: local(&replica),
        corrupt: 1,
        chunks: 0,
    };
    let mut io = io_for(&driver, &storage, &plan, target);
    let result = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 16 << 10))
        .execute(&mut io);
    let (failure, report) = expect_failure(result);
    assert!(
        matches!(
            failure,
            ExecFailure::IoBaseFailed(TransferError::Checksum { .. })
        ),
        "{failure}"
    );
    assert_eq!(
        io.target().chunks,
        2,
        "the corrupt chunk was the last one sent"
    );
    // Only the first (intact) chunk of four blocks counts as sent.
    assert_eq!(report.base_bytes_sent, 4 * BS as u64);
    assert_eq!(report.base_lsn, None);
    assert_eq!(state(&driver, "r1"), ReplicaState::NeedsRebuild);
    assert_eq!(
        storage.images_held(),
        0,
        "the engine released its image pin"
    );

    let st = replica.status();
    assert!(st.install_incomplete);
    assert!(!st.checkpoint_trusted);
    let mut lr = local(&replica);
    let reply = lr.handshake().unwrap();
    assert!(reply.install_incomplete);
    drop(io);
    assert_eq!(p.status().pins_outstanding, 0);

    // The engine sees an incomplete replica: a catch-up handshake escalates it.
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    let plan = driver
        .plan_recovery(&rid("r1"), to_handshake(reply))
        .unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    assert_eq!(plan.proof().unwrap().reason, ProofReason::ReplicaIncomplete);

    // A clean rebuild over the same replica then succeeds.
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let mut io = io_for(&driver, &storage, &plan, local(&replica));
    let r = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 16 << 10))
        .execute(&mut io)
        .expect("rebuild after the failed one");
    assert_eq!(r.base_lsn, Some(head));
    assert!(!replica.status().install_incomplete);
    assert_eq!(digest(&replica), digest(&p));
    assert_eq!(state(&driver, "r1"), ReplicaState::InSync);
    drop(io);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));
}

#[test]
fn finish_base_before_the_whole_image_is_refused() {
    let mut h = harness();
    let head = h.primary_write(20).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(0)).unwrap();
    let storage = Arc::clone(h.storage_adapter());
    let pin = storage.pin_full_base(head).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    io.begin_base(&BaseRequest {
        source: RebuildSource::FullBase,
        lsn: head,
        pin_id: pin.pin_id,
    })
    .unwrap();
    let c = io.transfer_base_chunk(BS as u64).unwrap();
    assert!(!c.done);
    assert_eq!(c.bytes_sent, BS as u64);
    match io.finish_base() {
        Err(TransferError::BaseUnavailable { detail }) => {
            assert!(detail.contains("before the whole image"), "{detail}");
        }
        other => panic!("early finish: {other:?}"),
    }
    assert!(vol.status().install_incomplete);
    let mut lr = h.replica("r1").unwrap().clone();
    assert!(lr.handshake().unwrap().install_incomplete);
}

#[test]
fn begin_base_refuses_an_image_the_plan_does_not_hold() {
    let mut h = harness();
    let head = h.primary_write(20).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(0)).unwrap();
    let storage = Arc::clone(h.storage_adapter());
    let vol = h.replica("r1").unwrap().volume();
    let pin = storage.pin_full_base(head).unwrap();
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    // An LSN other than the pinned image's.
    let wrong = io.begin_base(&BaseRequest {
        source: RebuildSource::FullBase,
        lsn: lsn(10),
        pin_id: pin.pin_id,
    });
    assert!(matches!(wrong, Err(TransferError::BaseUnavailable { .. })));
    // A pin the engine already released.
    let id = pin.pin_id;
    drop(pin);
    let gone = io.begin_base(&BaseRequest {
        source: RebuildSource::FullBase,
        lsn: head,
        pin_id: id,
    });
    assert!(matches!(gone, Err(TransferError::BaseUnavailable { .. })));
    // Neither touched the replica.
    assert!(!vol.status().install_incomplete);
    assert!(matches!(
        io.transfer_base_chunk(1 << 20),
        Err(TransferError::BaseUnavailable { .. })
    ));
}

#[test]
fn a_base_fence_revoked_on_the_primary_fails_the_transfer() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(0)).unwrap();
    let storage = Arc::clone(h.storage_adapter());
    let pin = storage.pin_full_base(head).unwrap();
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    io.begin_base(&BaseRequest {
        source: RebuildSource::FullBase,
        lsn: head,
        pin_id: pin.pin_id,
    })
    .unwrap();
    assert!(!io.transfer_base_chunk(4 * BS as u64).unwrap().done);
    assert!(h.primary().revoke_wal_pins("test") >= 1);
    assert!(matches!(
        io.transfer_base_chunk(4 * BS as u64),
        Err(TransferError::BaseUnavailable { .. })
    ));
    assert!(
        h.replica("r1")
            .unwrap()
            .volume()
            .status()
            .install_incomplete
    );
}

// ---- A replica crash mid-install ----------------------------------------------------------

#[test]
fn a_replica_dropped_mid_base_install_reopens_incomplete_and_is_rebuilt() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    let head = write_blocks(&p, 0..64, 0);
    commit(&p, head);
    let replica = replica_volume(dir.path(), "r1");
    seed_replica(&p, &replica, 30);
    let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn StorageAdapter>);
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let pin_id = plan
        .rebuild()
        .and_then(|r| r.full_base_pin())
        .expect("full base pin")
        .pin_id;

    let mut io = io_for(&driver, &storage, &plan, local(&replica));
    io.begin_base(&BaseRequest {
        source: RebuildSource::FullBase,
        lsn: head,
        pin_id,
    })
    .unwrap();
    for _ in 0..2 {
        assert!(!io.transfer_base_chunk(8 * BS as u64).unwrap().done);
    }
    // Crash: every handle on the replica volume goes away without finishing or closing.
    drop(io);
    drop(replica);
    driver.cancel_plan(plan, "replica lost mid-install");
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));

    let replica = reopen_volume(dir.path(), "r1");
    let st = replica.status();
    assert!(st.install_incomplete);
    assert!(!st.checkpoint_trusted);
    assert_eq!(st.role, Role::Replica);
    let mut lr = local(&replica);
    let reply = lr.handshake().unwrap();
    assert!(reply.install_incomplete);
    let hs = to_handshake(reply);
    assert!(hs.is_incomplete() && hs.tip().is_none());

    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::CatchUp)]);
    let plan = driver.plan_recovery(&rid("r1"), hs).unwrap();
    assert_eq!(plan.outcome(), Outcome::NeedsRebuild);
    let proof = plan.proof().unwrap();
    assert!(!proof.recoverable);
    assert_eq!(proof.reason.name(), "replica_incomplete");
    assert_eq!(plan.pins_held(), 0);
    assert_eq!(state(&driver, "r1"), ReplicaState::NeedsRebuild);
    let escalated = event_detail(&driver, "r1", "escalated").unwrap();
    assert!(escalated.contains("replica_incomplete"), "{escalated}");

    // The rebuild completes over the reopened volume.
    assign(&driver, 1, &[("r1", 1)], &[("r1", SessionKind::Rebuild)]);
    let plan = driver.plan_rebuild(&rid("r1")).unwrap();
    let mut io = io_for(&driver, &storage, &plan, lr);
    let r = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 16 << 10))
        .execute(&mut io)
        .expect("rebuild");
    assert_eq!(r.durable_lsn, Some(head));
    assert_eq!(state(&driver, "r1"), ReplicaState::InSync);
    assert!(!replica.status().install_incomplete);
    assert_eq!(digest(&replica), digest(&p));
    drop(io);
    assert_eq!((p.status().pins_outstanding, storage.images_held()), (0, 0));
}

// ---- LocalReplica fencing ------------------------------------------------------------------

fn apply_req(p: &blockvol::Volume, lineage: Lineage, from: u64, to: u64) -> ApplyRequest {
    let mut frames = Vec::new();
    let entries = scan(p, from, to);
    for e in &entries {
        e.encode_into(&mut frames).unwrap();
    }
    ApplyRequest {
        lineage,
        committed: p.status().committed,
        anchor: p.entry_info(blsn(from - 1)).unwrap(),
        count: entries.len() as u32,
        frames,
    }
}

fn fenced<T: std::fmt::Debug>(r: Result<T, TargetError>) -> bool {
    matches!(r, Err(TargetError::Fenced(_)))
}

#[test]
fn local_replica_refuses_older_lineages_and_persists_a_newer_epoch() {
    let dir = tempdir();
    let (p, _storage) = primary(dir.path());
    write_blocks(&p, 0..20, 0);
    commit(&p, lsn(20));
    let replica = replica_volume(dir.path(), "r1");
    seed_replica(&p, &replica, 10);
    let mut lr = local(&replica);
    let current = Lineage::new(DRIVER, blockvol::Epoch(1), 5);
    let r = lr.apply(apply_req(&p, current, 11, 12)).unwrap();
    assert_eq!((r.applied_to, r.applied), (blsn(12), 2));

    let base_spec = BaseBeginRequest {
        lineage: current,
        base_lsn: blsn(20),
        base_entry: p.entry_info(blsn(20)).unwrap(),
        geometry: p.geometry(),
    };
    for stale in [
        Lineage::new(DRIVER, blockvol::Epoch(1), 4),
        Lineage::new(DRIVER, blockvol::Epoch(0), 99),
    ] {
        let before = (replica.status(), digest(&replica));
        assert!(fenced(lr.apply(apply_req(&p, stale, 13, 14))));
        assert!(fenced(lr.truncate(TruncateRequest {
            lineage: stale,
            after: blsn(10),
            committed: blsn(10),
        })));
        assert!(fenced(lr.begin_base(BaseBeginRequest {
            lineage: stale,
            ..base_spec
        })));
        assert!(fenced(lr.base_chunk(BaseChunkRequest {
            lineage: stale,
            frame: Vec::new(),
        })));
        assert!(fenced(lr.finish_base(stale)));
        assert!(fenced(lr.barrier(BarrierRequest {
            lineage: stale,
            target: blsn(20),
            expected_tip: p.entry_info(blsn(20)).ok(),
            committed: blsn(20),
        })));
        assert_eq!(
            (replica.status(), digest(&replica)),
            before,
            "{stale:?} changed the replica"
        );
    }

    // Session IDs are ordered only within one driver: another engine's session 1 at the
    // current epoch is admitted, but an epoch below the volume's is refused from any driver.
    let before = (replica.status(), digest(&replica));
    assert!(fenced(lr.apply(apply_req(
        &p,
        Lineage::new("other", blockvol::Epoch(0), 1),
        13,
        14
    ))));
    assert_eq!((replica.status(), digest(&replica)), before);
    let b = lr
        .barrier(BarrierRequest {
            lineage: Lineage::new("other", blockvol::Epoch(1), 1),
            target: blsn(12),
            expected_tip: p.entry_info(blsn(12)).ok(),
            committed: p.status().committed,
        })
        .unwrap();
    assert_eq!(b.durable, blsn(12));

    // The accepted lineage still works; a newer epoch wins over a higher session number.
    lr.apply(apply_req(&p, current, 13, 14)).unwrap();
    let newer = Lineage::new(DRIVER, blockvol::Epoch(2), 1);
    lr.apply(apply_req(&p, newer, 15, 15)).unwrap();
    assert_eq!(replica.status().epoch, blockvol::Epoch(2));
    assert_eq!(replica.status().role, Role::Replica);
    assert!(fenced(lr.apply(apply_req(
        &p,
        Lineage::new(DRIVER, blockvol::Epoch(1), 100),
        16,
        16
    ))));
    assert_eq!(replica.status().head, blsn(15));
    assert_eq!(lr.handshake().unwrap().epoch, blockvol::Epoch(2));

    // The epoch is on disk: a fresh replica process over the reopened volume still fences
    // epoch 1, whatever session it names.
    drop(lr);
    drop(replica);
    let replica = reopen_volume(dir.path(), "r1");
    assert_eq!(replica.status().epoch, blockvol::Epoch(2));
    assert_eq!(replica.status().head, blsn(15));
    let mut lr = local(&replica);
    assert!(fenced(lr.apply(apply_req(
        &p,
        Lineage::new(DRIVER, blockvol::Epoch(1), 1000),
        16,
        16
    ))));
    assert_eq!(replica.status().head, blsn(15));
    lr.apply(apply_req(
        &p,
        Lineage::new(DRIVER, blockvol::Epoch(2), 1),
        16,
        16,
    ))
    .unwrap();
    assert_eq!(replica.status().head, blsn(16));
}

// ---- The harness's own data check ----------------------------------------------------------

#[test]
fn replica_matches_primary_returns_false_after_one_replica_byte_changes() {
    let mut h = harness();
    let head = h.primary_write(20).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("good", head).unwrap();
    h.add_replica("bad", lsn(19)).unwrap();
    h.add_replica("extra", head).unwrap();
    // "bad" gets the primary's entry 20 with one data byte changed: same LSN, same epoch,
    // same head, one byte different.
    let mut e: WalEntry = scan(h.primary(), 20, 20).remove(0);
    match &mut e.kind {
        EntryKind::Write { data, .. } => data[100] ^= 0x01,
        other => panic!("unexpected entry {other:?}"),
    }
    let bad = h.replica("bad").unwrap().volume();
    bad.apply(&e).unwrap();
    bad.sync().unwrap();
    h.replica_append_divergent("extra", 1).unwrap();

    let good = h.replica("good").unwrap().volume();
    let differing = contents(&good)
        .iter()
        .zip(contents(&bad).iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 1);
    assert_eq!(bad.status().head, good.status().head);

    assert!(h.replica_matches_primary("good", head).unwrap());
    assert!(!h.replica_matches_primary("bad", head).unwrap());
    assert!(!h.replica_matches_primary("extra", head).unwrap());
    assert_eq!(to_engine(bad.status().head), head);
}
