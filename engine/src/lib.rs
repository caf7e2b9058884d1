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
//! Layers, bottom up:
//! - [`types`]: newtypes (`Lsn`, `Epoch`, `SessionId`, `ReplicaId`, `Tick`) and state enums.
//! - [`budget`], [`rebuild`], [`outcome`], [`history`]: pure decision logic.
//! - [`session`], [`sender`]: one replica's authority and its session.
//! - [`registry`], [`orchestrator`], [`observe`]: one volume's senders, assignments, event log.
//! - [`adapter`], [`driver`], [`executor`]: storage contract, planning with pins, execution.
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
