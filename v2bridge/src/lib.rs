//! `v2bridge`: the engine's storage and I/O traits implemented on real blockvol volumes.
//!
//! - [`BlockVolStorage`]: the engine's [`StorageAdapter`](engine::StorageAdapter) on the
//!   primary volume. Retained history comes from one consistent `Volume::status()` snapshot;
//!   committed is the replication layer's committed LSN (`Volume::set_committed`), never the
//!   flusher checkpoint, so a catch-up after a flush is reachable while retention keeps the
//!   history; the contiguity proof is blockvol's LSN index (`Volume::retained_gaps`). Pins are
//!   blockvol `WalPin`s and `BasePin`s: a pin the engine holds really stops reclamation (or
//!   really freezes the extent at the image's LSN) and is released when the engine drops it.
//! - [`ReplicaTarget`]: the replica side as messages (owned requests and replies; entries and
//!   chunks in their checksummed wire form), the seam for a network transport.
//!   [`LocalReplica`] implements it in process over a replica volume.
//! - [`BridgeIo`]: the engine's [`CatchUpIo`](engine::CatchUpIo) and
//!   [`RebuildIo`](engine::RebuildIo): scans the primary's WAL, ships and applies chunks,
//!   truncates, transfers and installs base images chunk by chunk (each chunk verified on
//!   arrival), and runs the durability barrier. Every call reports what the replica did, and
//!   every WAL chunk and barrier re-checks that the replica's log matches the primary's.
//! - `harness` (feature `testing`): the engine's conformance harness on real volume files.
//!
//! A replica volume behind by 50 writes, brought back by the engine through the bridge: the
//! replica's handshake (its head and the identity of its last entry), a plan, and the
//! executor shipping checksummed WAL chunks over the [`ReplicaTarget`] boundary:
//!
//! ```
//! use std::sync::Arc;
//! use blockvol::{CreateOptions, Lba, OpenOptions, Role, Volume};
//! use engine::*;
//! use v2bridge::{BlockVolStorage, BridgeIo, Lineage, LocalReplica, ReplicaTarget};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let create = CreateOptions { volume_size_bytes: 1 << 20, wal_size_bytes: 1 << 20, block_size: 4096 };
//! let open = OpenOptions::manual();
//! let primary = Arc::new(Volume::create(dir.path().join("p.img"), &create, &open).unwrap());
//! let replica = Arc::new(Volume::create(dir.path().join("r.img"), &create, &open).unwrap());
//! primary.assign(Role::Primary, blockvol::Epoch(1)).unwrap();
//! replica.assign(Role::Replica, blockvol::Epoch(1)).unwrap();
//! for lba in 0..50 {
//!     primary.write(Lba(lba), &[lba as u8 + 1; 4096]).unwrap();
//! }
//! primary.sync().unwrap();
//! primary.set_committed(primary.status().head); // as the replicas' acknowledgements would
//!
//! let storage = Arc::new(BlockVolStorage::new(Arc::clone(&primary)));
//! let driver = RecoveryDriver::new(storage.clone());
//! let id = ReplicaId::new("vol1/vs2").unwrap();
//! let intent = AssignmentIntent {
//!     replicas: vec![ReplicaAssignment { replica_id: id.clone(), endpoint: Endpoint::new("vs2:3260", "vs2:3261", 1) }],
//!     epoch: Epoch(1),
//!     recovery_targets: [(id.clone(), SessionKind::CatchUp)].into(),
//!     catch_up_budget: None,
//! };
//! let session = driver.orchestrator().process_assignment(&intent).unwrap().sessions_created[0].1;
//!
//! let mut target = LocalReplica::new(Arc::clone(&replica));
//! let handshake = v2bridge::convert::handshake(&target.handshake().unwrap());
//! let plan = driver.plan_recovery(&id, handshake).unwrap();
//! let committed = storage.get_retained_history().unwrap().committed_lsn;
//! let lineage = Lineage::new("vs1", v2bridge::convert::epoch_to_blockvol(intent.epoch), session.get());
//! let mut io = BridgeIo::new(storage, target, lineage, committed);
//! let report = CatchUpExecutor::new(&driver, plan).execute(&mut io).unwrap();
//! assert_eq!((report.entries_applied, report.final_state), (50, ReplicaState::InSync));
//! assert_eq!(replica.digest().unwrap(), primary.digest().unwrap());
//! ```
#![warn(missing_docs)]

pub mod convert;
#[cfg(feature = "testing")]
pub mod harness;
mod io;
mod storage;
mod target;

pub use io::{
    BridgeIo, ImageChunk, IoStats, LocalSource, PrimarySource, Progress, ProgressSnapshot,
    transfer_error,
};
pub use storage::{BlockVolStorage, ImageKeeper};
pub use target::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, LocalReplica, MAX_TRACKED_DAMAGE, ReplicaTarget, ScrubStats,
    TargetError, TruncateRequest,
};
