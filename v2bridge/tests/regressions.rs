//! Regression tests for bugs the bridge tests found (each fixed in v2bridge/src).

mod common;

use common::*;
use engine::conformance::Harness;
use engine::{CatchUpIo, Epoch, StorageAdapter, StorageError, TransferError};

/// A chunk refused as divergent used to raise the replica's committed point first, so its
/// committed-gated flusher could move the divergent entries into the extent, after which the
/// replica could no longer truncate to the common point.
#[test]
fn a_divergent_chunk_does_not_raise_the_replica_committed_lsn() {
    let mut h = harness();
    let head = h.primary_write(40).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    h.replica_append_divergent("r1", 3).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    let before = vol.status().committed;
    let mut io = h.io("r1", Epoch(1), sid(1)).unwrap();
    assert!(matches!(
        io.stream_wal_chunk(lsn(10), head, 7),
        Err(TransferError::Divergent { .. })
    ));
    assert_eq!(vol.status().committed, before);
    vol.force_flush().unwrap();
    assert!(
        vol.truncate_after(blsn(10)).is_ok(),
        "the divergent tail became permanent"
    );
}

/// A WAL pin below the tail reported the first lost LSN instead of the exclusive start the
/// engine asked for.
#[test]
fn recycled_pin_reports_the_requested_exclusive_start() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..40, 0);
    commit(&p, lsn(40));
    p.set_retention(blockvol::RetentionPolicy {
        keep_entries: 10,
        keep_bytes: 0,
    });
    p.force_flush().unwrap();
    assert_eq!(
        storage.pin_wal_retention(lsn(10)).unwrap_err(),
        StorageError::Recycled {
            requested: lsn(10),
            retained_start: lsn(31)
        }
    );
}

/// With nothing ever flushed there is no checkpoint, and so no snapshot to pin at LSN 0.
#[test]
fn no_snapshot_pin_without_a_checkpoint() {
    let dir = tempdir();
    let (p, storage) = primary(dir.path());
    write_blocks(&p, 0..5, 0);
    commit(&p, lsn(5));
    assert_eq!(storage.get_retained_history().unwrap().checkpoint_lsn, None);
    assert_eq!(
        storage.pin_snapshot(lsn(0)).unwrap_err(),
        StorageError::SnapshotUnavailable {
            requested: lsn(0),
            checkpoint: None,
            trusted: true
        }
    );
}

/// Two sessions (a primary pushing and the replica pulling) at the same epoch both install a
/// base: the second abandons the first's install, and the first session's later chunks and
/// finish are refused instead of landing in the second's image (which left blocks zeroed
/// behind a replica declared in sync).
#[test]
fn a_base_install_belongs_to_the_session_that_began_it() {
    use blockvol::EntryInfo;
    use v2bridge::{
        BaseBeginRequest, BaseChunkRequest, Lineage, LocalReplica, ReplicaTarget, TargetError,
    };
    let dir = tempfile::tempdir().unwrap();
    let vol = std::sync::Arc::new(
        blockvol::Volume::create(
            dir.path().join("r.vol"),
            &blockvol::CreateOptions::new(64 * 4096, 1 << 20),
            &blockvol::OpenOptions::manual(),
        )
        .unwrap(),
    );
    vol.assign(blockvol::Role::Replica, blockvol::Epoch(1))
        .unwrap();
    let mut replica = LocalReplica::new(std::sync::Arc::clone(&vol));
    let base = EntryInfo {
        lsn: blockvol::Lsn(10),
        epoch: blockvol::Epoch(1),
        content_crc: 7,
    };
    let begin = |l: Lineage| BaseBeginRequest {
        lineage: l,
        base_lsn: base.lsn,
        base_entry: base,
        geometry: vol.geometry(),
    };
    let pusher = Lineage::new("server-a", blockvol::Epoch(1), 4);
    let puller = Lineage::new("server-b", blockvol::Epoch(1), 1);
    replica.begin_base(begin(pusher)).unwrap();
    replica.begin_base(begin(puller)).unwrap();
    let chunk = blockvol::BaseChunk::new(blockvol::Lba(0), 1, vec![9u8; 4096])
        .encode()
        .unwrap();
    let err = replica
        .base_chunk(BaseChunkRequest {
            lineage: pusher,
            frame: chunk.clone(),
        })
        .expect_err("the abandoned session's chunk");
    assert!(matches!(err, TargetError::Fenced(_)), "{err}");
    let err = replica
        .finish_base(pusher)
        .expect_err("the abandoned session's finish");
    assert!(matches!(err, TargetError::Fenced(_)), "{err}");
    // The owner finishes its own install.
    replica
        .base_chunk(BaseChunkRequest {
            lineage: puller,
            frame: chunk,
        })
        .unwrap();
    assert_eq!(replica.finish_base(puller).unwrap(), blockvol::Lsn(10));
}

/// Found by the network simulator (D52): a request arriving twice (a duplicated frame, a
/// retransmission on a connection given up on) must not be carried out again once its session
/// moved on. A truncation repeated after the session applied entries would drop them, and a
/// primary may have counted them durable. Refused, and nothing changes.
#[test]
fn a_truncation_repeated_after_its_session_applied_entries_is_refused() {
    use v2bridge::{ApplyRequest, Lineage, ReplicaTarget, TruncateRequest};
    let dir = tempdir();
    let (p, _storage) = primary(dir.path());
    write_blocks(&p, 0..20, 0);
    commit(&p, lsn(20));
    let replica = replica_volume(dir.path(), "r1");
    seed_replica(&p, &replica, 10);
    let mut target = local(&replica);
    let l = Lineage::new(DRIVER, blockvol::Epoch(1), 1);
    let truncate = TruncateRequest {
        lineage: l,
        after: blsn(10),
        committed: blsn(10),
    };
    target.truncate(truncate).expect("the truncation");
    let mut frames = Vec::new();
    let entries = scan(&p, 11, 20);
    for e in &entries {
        e.encode_into(&mut frames).unwrap();
    }
    target
        .apply(ApplyRequest {
            lineage: l,
            committed: blsn(10),
            anchor: p.entry_info(blsn(10)).unwrap(),
            count: entries.len() as u32,
            frames,
        })
        .expect("the apply");
    assert_eq!(replica.status().head, blsn(20));
    let again = target.truncate(truncate);
    assert!(
        matches!(again, Err(v2bridge::TargetError::Fenced(_))),
        "{again:?}"
    );
    assert_eq!(replica.status().head, blsn(20));
}
