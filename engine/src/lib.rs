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
//! three (module `testing`) and an exported conformance suite (module `conformance`) that any
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
//! assert_eq!(plan.outcome(), Outcome::CatchUp);
//! let mut io = ModelIo::new(primary.clone(), Arc::clone(&replica));
//! let report = CatchUpExecutor::new(&driver, plan).execute(&mut io).unwrap();
//! assert_eq!((report.entries_applied, report.final_state), (30, ReplicaState::InSync));
//! assert_eq!(primary.pins_outstanding(), 0);
//! # }
//! ```
//!
//! The API is shaped so the unsafe calls do not compile. Each block below is checked by
//! `cargo test` to fail with the error code it names. An LSN is not a handshake: a replica
//! that cannot name its tip says so with `ReplicaHandshake::unverified`.
//!
//! ```compile_fail,E0308
//! # use engine::*;
//! # fn f(driver: &RecoveryDriver, id: &ReplicaId) {
//! let plan = driver.plan_recovery(id, Lsn(70));
//! # }
//! ```
//!
//! Nor can an unverified handshake be built field by field:
//!
//! ```compile_fail,E0451
//! # use engine::*;
//! let hs = ReplicaHandshake { flushed: Lsn(70), tip: None, incomplete: false };
//! ```
//!
//! A plan's pins stay in the plan: no field or pattern reaches them.
//!
//! ```compile_fail,E0451
//! # use engine::*;
//! # fn f(plan: RecoveryPlan) {
//! if let PlanStep::CatchUp(CatchUpStep { pin, .. }) = plan.step() {}
//! # }
//! ```
//!
//! A cancelled plan is gone, so it cannot be executed after its pins were released:
//!
//! ```compile_fail,E0382
//! # use engine::*;
//! # fn f(driver: &RecoveryDriver, plan: RecoveryPlan) {
//! driver.cancel_plan(plan, "operator");
//! let exec = CatchUpExecutor::new(driver, plan);
//! # }
//! ```
//!
//! A sender's session protocol (barriers, completion by session ID) is the engine's own; a
//! caller reads a sender's state but cannot advance it:
//!
//! ```compile_fail,E0624
//! # use engine::*;
//! # fn f(sender: &Sender, sid: SessionId) {
//! sender.record_barrier(sid, Lsn(100));
//! # }
//! ```
//!
//! Each item has one path, at the crate root:
//!
//! ```compile_fail,E0603
//! use engine::types::Lsn;
//! ```
//!
//! Every public item is at the crate root (the modules are private, so each item has one
//! path). The source is layered, bottom up:
//! - `types`: newtypes (`Lsn`, `Epoch`, `SessionId`, `ReplicaId`, `Tick`) and state enums.
//! - `budget`, `rebuild`, `outcome`, `history`: pure decision logic.
//! - `session`, `sender`: one replica's authority and its session (the session protocol is
//!   crate-private; tests reach it through `testing::SenderProtocol`).
//! - `registry`, `orchestrator`, `observe`: one volume's senders, assignments, event log.
//! - `adapter`, `driver`, `executor`: storage contract, planning with pins, execution (what
//!   an execution reports lives in a private module below the error type, so `error` does not
//!   depend on the executors).
#![warn(missing_docs)]

mod adapter;
mod budget;
mod driver;
mod error;
mod executor;
mod history;
mod observe;
mod orchestrator;
mod outcome;
mod rebuild;
mod registry;
mod report;
mod sender;
mod session;
mod sync;
mod types;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod testing;

pub use adapter::{FullBasePin, PinGuard, PinId, RetentionPin, SnapshotPin, StorageAdapter};
pub use budget::{BudgetCheck, BudgetViolation, CatchUpBudget};
pub use driver::{CatchUpStep, PlanStep, RebuildStep, RecoveryDriver, RecoveryPlan, TruncateStep};
pub use error::{EngineError, PinKind, Result, StorageError, TransferError};
pub use executor::{
    BaseChunkProgress, BaseRequest, CatchUpExecutor, CatchUpIo, ExecFailure, ExecutionReport,
    ExecutorOptions, RebuildExecutor, RebuildIo, RecoveryPath, StepInfo, StepKind, WalChunk,
};
pub use history::{
    AnchorCheck, DivergencePoint, EntryId, EpochStart, LsnRange, MAX_EPOCH_STARTS, ProofReason,
    RebuildDecision, RebuildReason, RecoverabilityProof, ReplicaHandshake, ReplicaLog,
    ReplicaLogError, RetainedHistory,
};
pub use observe::{
    DEFAULT_LOG_CAPACITY, Event, RecoveryEvent, RecoveryLog, RegistryStatus, SenderStatus,
};
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
    Demotion, Endpoint, Epoch, Lsn, MAX_REPLICA_ID_BYTES, ReplicaId, ReplicaState, SessionId,
    SessionKind, SessionPhase, Tick,
};
