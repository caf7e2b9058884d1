//! `controlbridge`: the master's block-volume assignments, converted into engine intents with
//! replica identity from stable server IDs (`<volume>/<server_id>`, never an address), and the
//! [`BlockService`] that applies them with one orchestrator per volume.
//!
//! - [`ControlBridge::convert_assignment`]: one assignment to one [`Conversion`]; missing or
//!   malformed identity fails closed with a typed reason the caller can see.
//! - [`BlockService`]: applies assignments in order and drives the recoveries they call for,
//!   through a [`VolumeBackend`] (blockvol + v2bridge in this workspace).
//!
//! This crate depends on the engine only.
#![warn(missing_docs)]

mod assignment;
mod service;

pub use assignment::{
    BlockRole, BlockVolumeAssignment, ControlBridge, ControlError, Conversion, MAX_NAME_BYTES,
    NameError, ReplicaAddr, SkippedReplica, make_replica_id, validate_name,
};
pub use service::{
    AssignmentOutcome, BackendError, BlockService, RecoveryRecord, Route, VolumeBackend,
};
