//! `controlbridge`: the master's block-volume assignments, converted into engine intents with
//! replica identity from stable server IDs (`<volume>/<server_id>`, never an address), and the
//! [`BlockService`] that applies them with one orchestrator per volume.
//!
//! - [`ControlBridge::convert_assignment`]: one assignment to one [`Conversion`]; missing or
//!   malformed identity fails closed with a typed reason the caller can see.
//! - [`BlockService`]: applies assignments in order and returns the recoveries they call for
//!   as [`PendingRecovery`]s, each bound to its engine session, to run on any thread through a
//!   [`VolumeBackend`] (blockvol + v2bridge in this workspace); or runs them inline.
//! - Refusals and failures are typed: [`AssignmentError`] (stale, invalid, backend),
//!   [`BackendError`] (unavailable, I/O, refused), [`RecoveryFailure`] (fenced, plan,
//!   transfer, backend).
//!
//! This crate depends on the engine only.
//!
//! A primary assignment with two replicas, one of them without a server ID: identity comes
//! from the stable server ID, so the replica without one is left out with a reason, never
//! keyed by its address.
//!
//! ```
//! use controlbridge::{BlockRole, BlockVolumeAssignment, ControlBridge, ReplicaAddr};
//!
//! let replica = |data: &str, id: &str| ReplicaAddr {
//!     data_addr: data.into(),
//!     ctrl_addr: format!("{data}-ctrl"),
//!     server_id: id.into(),
//! };
//! let a = BlockVolumeAssignment {
//!     path: "vol1".into(),
//!     epoch: 3,
//!     role: BlockRole::Primary.to_wire(),
//!     lease_ttl_ms: 30_000,
//!     replica_addrs: vec![replica("10.0.0.2:3260", "vs2"), replica("10.0.0.3:3260", "")],
//!     ..BlockVolumeAssignment::default()
//! };
//! let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
//! assert_eq!(c.role, BlockRole::Primary);
//! assert_eq!(c.intent.epoch, engine::Epoch(3));
//! let ids: Vec<&str> = c.intent.replicas.iter().map(|r| r.replica_id.as_str()).collect();
//! assert_eq!(ids, ["vol1/vs2"]);
//! assert_eq!(c.skipped.len(), 1);
//! ```
#![warn(missing_docs)]

mod assignment;
mod error;
mod service;

pub use assignment::{
    BlockRole, BlockVolumeAssignment, ControlBridge, ControlError, Conversion, MAX_NAME_BYTES,
    NameError, ReplicaAddr, SkippedReplica, make_replica_id, validate_name,
};
pub use error::{AssignmentError, BackendError, RecoveryFailure, StaleAssignment};
pub use service::{
    AssignmentOutcome, BlockService, PendingRecovery, RecoveryRecord, RecoveryRoute, Route,
    VolumeBackend,
};
