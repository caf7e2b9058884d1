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
//! - [`harness`] (feature `testing`): the engine's conformance harness on real volume files.
#![warn(missing_docs)]

pub mod convert;
#[cfg(feature = "testing")]
pub mod harness;
mod io;
mod storage;
mod target;

pub use io::{BridgeIo, IoStats};
pub use storage::BlockVolStorage;
pub use target::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, LocalReplica, ReplicaTarget, TargetError, TruncateRequest,
};
