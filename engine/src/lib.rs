//! The sans-I/O replica recovery core.
//!
//! When a replica of a block volume falls behind, this crate decides how to bring it back and
//! drives that recovery to completion: a zero gap (nothing to do), a catch-up (replay the
//! missing WAL range, truncating first if the replica is ahead of the committed point), or a
//! rebuild (a full base image, or a trusted checkpoint image plus the WAL tail). Around that it
//! keeps stable replica identity, epoch and session fencing, catch-up budgets, resource pins,
//! and an event log that explains every decision.
//!
//! The crate performs no I/O: no files, sockets, threads or clock. Time arrives as [`Tick`]s.
//! Storage and data transfer are reached through traits the caller implements:
//! [`StorageAdapter`] (retained history and pins), [`CatchUpIo`] and [`RebuildIo`] (moving data
//! to the replica). The `testing` feature adds an in-memory reference implementation of all
//! three ([`testing`]) and an exported conformance suite ([`conformance`]) that any
//! implementation can run.
//!
//! A replica 30 entries behind recovers by catch-up (the in-memory store of the `testing`
//! feature stands in for a volume; `examples/in_memory.rs` prints every step):
//!
//! ```
//! # #[cfg(feature = "testing")] {
//! use std::sync::{Arc, Mutex};
//! use engine::testing::{MemStorage, ModelIo, ModelReplica};
//! use engine::*;
//!
//! let primary = MemStorage::new();
//! let head = primary.write_n(100);
//! primary.commit(head).unwrap();
//! let replica = Arc::new(Mutex::new(ModelReplica::from_primary(&primary, Lsn(70)).unwrap()));
//!
//! let driver = RecoveryDriver::new(Arc::new(primary.clone()));
//! let id = ReplicaId::new("vol1/server-b").unwrap();
//! driver.orchestrator().process_assignment(&AssignmentIntent {
//!     replicas: vec![ReplicaAssignment {
//!         replica_id: id.clone(),
//!         endpoint: Endpoint::new("10.0.0.2:3260", "10.0.0.2:3261", 1),
//!     }],
//!     epoch: Epoch(1),
//!     recovery_targets: [(id.clone(), SessionKind::CatchUp)].into(),
//!     catch_up_budget: None,
//! }).unwrap();
//!
//! let plan = driver.plan_recovery(&id, replica.lock().unwrap().handshake()).unwrap();
//! assert_eq!(plan.outcome, Outcome::CatchUp);
//! let mut io = ModelIo::new(primary.clone(), Arc::clone(&replica));
//! let report = CatchUpExecutor::new(&driver, plan).execute(&mut io).unwrap();
//! assert_eq!((report.entries_applied, report.final_state), (30, ReplicaState::InSync));
//! assert_eq!(primary.pins_outstanding(), 0);
//! # }
//! ```
//!
//! Layers, bottom up:
//! - [`types`]: newtypes (`Lsn`, `Epoch`, `SessionId`, `ReplicaId`, `Tick`) and state enums.
//! - [`budget`], [`rebuild`], [`outcome`], [`history`]: pure decision logic.
//! - [`session`], [`sender`]: one replica's authority and its session.
//! - [`registry`], [`orchestrator`], [`observe`]: one volume's senders, assignments, event log.
//! - [`adapter`], [`driver`], [`executor`]: storage contract, planning with pins, execution
//!   (what an execution reports lives in a private module below the error type, so
//!   [`error`] does not depend on the executors).
#![warn(missing_docs)]

pub mod adapter;
pub mod budget;
pub mod driver;
pub mod error;
pub mod executor;
pub mod history;
pub mod observe;
pub mod orchestrator;
pub mod outcome;
pub mod rebuild;
pub mod registry;
mod report;
pub mod sender;
pub mod session;
mod sync;
pub mod types;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod testing;

pub use adapter::{FullBasePin, PinGuard, PinId, RetentionPin, SnapshotPin, StorageAdapter};
pub use budget::{BudgetCheck, BudgetViolation, CatchUpBudget};
pub use driver::{RecoveryDriver, RecoveryPlan};
pub use error::{EngineError, PinKind, Result, StorageError, TransferError};
pub use executor::{
    BaseChunkProgress, BaseRequest, CatchUpExecutor, CatchUpIo, ExecFailure, ExecutionReport,
    ExecutorOptions, RebuildExecutor, RebuildIo, RecoveryPath, StepInfo, StepKind, WalChunk,
};
pub use history::{
    AnchorCheck, EntryId, LsnRange, ProofReason, RebuildDecision, RebuildReason,
    RecoverabilityProof, ReplicaHandshake, RetainedHistory,
};
pub use observe::{Event, RecoveryEvent, RecoveryLog, RegistryStatus, SenderStatus};
#[cfg(feature = "testing")]
pub use orchestrator::CatchUpOptions;
pub use orchestrator::{RecoveryOrchestrator, RecoveryResult};
pub use outcome::{HandshakeResult, Outcome, classify_outcome};
pub use rebuild::{RebuildPhase, RebuildSource, RebuildState};
pub use registry::{
    AssignmentIntent, AssignmentResult, ReconcileResult, Registry, ReplicaAssignment,
};
pub use sender::{Invalidation, Sender};
pub use session::{InvalidateReason, SessionIdSource, SessionOptions, SessionSnapshot};
pub use types::{
    Demotion, Endpoint, Epoch, Lsn, ReplicaId, ReplicaState, SessionId, SessionKind, SessionPhase,
    Tick,
};
