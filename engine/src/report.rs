//! What an execution reports: the path it took, what it moved ([`ExecutionReport`]) and why
//! it stopped ([`ExecFailure`]). Kept apart from the executors so the error type can carry a
//! report without the error module depending on the executors (and through them on the
//! driver, sender and registry).

use std::fmt;

use crate::budget::BudgetViolation;
use crate::error::{EngineError, TransferError};
use crate::history::EntryId;
use crate::types::{Lsn, ReplicaId, ReplicaState, SessionId};

/// The path a recovery took.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RecoveryPath {
    /// Nothing to do.
    ZeroGap,
    /// WAL replay.
    CatchUp,
    /// Truncation of an uncommitted tail, nothing shipped.
    TruncateOnly,
    /// Snapshot image plus WAL tail.
    RebuildSnapshotTail,
    /// Full base image.
    RebuildFullBase,
}

impl RecoveryPath {
    /// A short name for reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecoveryPath::ZeroGap => "zero_gap",
            RecoveryPath::CatchUp => "catchup",
            RecoveryPath::TruncateOnly => "truncate",
            RecoveryPath::RebuildSnapshotTail => "rebuild_snapshot_tail",
            RecoveryPath::RebuildFullBase => "rebuild_full_base",
        }
    }
}

impl fmt::Display for RecoveryPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an execution did (also returned, partially filled, with a failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutionReport {
    /// The replica.
    pub replica_id: ReplicaId,
    /// The session.
    pub session_id: Option<SessionId>,
    /// The path.
    pub path: RecoveryPath,
    /// The frozen target.
    pub target: Lsn,
    /// Steps taken (chunks, truncation).
    pub steps: u64,
    /// WAL entries applied on the replica.
    pub entries_applied: u64,
    /// WAL bytes moved.
    pub wal_bytes: u64,
    /// Base-image bytes covered.
    pub base_bytes: u64,
    /// Base-image bytes actually sent.
    pub base_bytes_sent: u64,
    /// Truncation executed, if any.
    pub truncated_to: Option<Lsn>,
    /// Base LSN installed, if any.
    pub base_lsn: Option<Lsn>,
    /// The replica's durable LSN from the barrier.
    pub durable_lsn: Option<Lsn>,
    /// The replica state at the end.
    pub final_state: ReplicaState,
    /// Pins the plan held when the executor started.
    pub pins_held_at_start: usize,
}

impl ExecutionReport {
    pub(crate) fn new(
        replica_id: ReplicaId,
        session_id: Option<SessionId>,
        path: RecoveryPath,
        target: Lsn,
        pins_held_at_start: usize,
    ) -> Self {
        ExecutionReport {
            replica_id,
            session_id,
            path,
            target,
            steps: 0,
            entries_applied: 0,
            wal_bytes: 0,
            base_bytes: 0,
            base_bytes_sent: 0,
            truncated_to: None,
            base_lsn: None,
            durable_lsn: None,
            final_state: ReplicaState::Disconnected,
            pins_held_at_start,
        }
    }

    /// Total bytes moved (WAL plus base bytes sent).
    pub fn bytes_transferred(&self) -> u64 {
        self.wal_bytes + self.base_bytes_sent
    }
}

/// Why an executor stopped. The `Display` form is the release reason in the
/// `exec_resources_released` event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecFailure {
    /// The plan cannot be executed by this executor.
    PlanNotExecutable(String),
    /// The sender is gone.
    SenderNotFound,
    /// `begin_catch_up` was refused.
    BeginCatchUpFailed(EngineError),
    /// The replica failed to truncate.
    TruncateIoFailed(TransferError),
    /// The replica truncated to a different LSN than asked.
    TruncateMismatch {
        /// Asked for.
        requested: Lsn,
        /// Reported.
        reported: Lsn,
    },
    /// After truncating, the replica's tip is not the primary's entry at that LSN: its log
    /// diverged below the truncation point.
    TruncateDiverged {
        /// The primary's entry at the truncation point, if it could vouch for it.
        expected: Option<EntryId>,
        /// The replica's tip after truncating.
        reported: EntryId,
    },
    /// Recording the truncation was refused.
    TruncationFailed(EngineError),
    /// A WAL chunk failed.
    IoStreamFailed {
        /// Step index.
        step: u64,
        /// What the I/O said.
        error: TransferError,
    },
    /// The I/O reported progress the executor did not ask for.
    IoProtocol {
        /// Step index.
        step: u64,
        /// What was wrong.
        detail: String,
    },
    /// Recording the reported progress was refused.
    ProgressAfterIo {
        /// Step index.
        step: u64,
        /// Why.
        error: EngineError,
    },
    /// The budget check failed.
    BudgetCheckFailed(EngineError),
    /// The budget was exceeded.
    BudgetEscalated(BudgetViolation),
    /// The session lost its authority between steps.
    SessionInvalidatedMidExecution {
        /// Step after which it was caught.
        step: u64,
        /// The authority error.
        error: EngineError,
    },
    /// The barrier failed.
    BarrierFailed(TransferError),
    /// The barrier's durable LSN was refused.
    BarrierRejected(EngineError),
    /// Completion was refused.
    CompletionRejected(EngineError),
    /// Cancelled by the caller.
    Cancelled(String),
    /// Rebuild `begin_connect` was refused.
    ConnectFailed(EngineError),
    /// Rebuild handshake was refused.
    HandshakeFailed(EngineError),
    /// Rebuild source selection was refused.
    SourceSelectFailed(EngineError),
    /// `begin_rebuild_transfer` was refused.
    TransferFailed(EngineError),
    /// The base transfer failed.
    IoBaseFailed(TransferError),
    /// The replica installed a base at a different LSN than planned.
    BaseLsnMismatch {
        /// Planned.
        expected: Lsn,
        /// Reported.
        reported: Lsn,
    },
    /// Recording base progress was refused.
    TransferProgressFailed(EngineError),
    /// `begin_rebuild_tail_replay` was refused.
    TailReplayFailed(EngineError),
    /// A tail chunk failed.
    IoTailReplayFailed {
        /// Step index.
        step: u64,
        /// What the I/O said.
        error: TransferError,
    },
    /// Recording tail progress was refused.
    TailProgressFailed(EngineError),
    /// Rebuild completion was refused.
    RebuildCompletionFailed(EngineError),
}

impl ExecFailure {
    /// True when the failure means the replica can only come back through a rebuild.
    pub fn requires_rebuild(&self) -> bool {
        match self {
            ExecFailure::BudgetEscalated(_) | ExecFailure::TruncateDiverged { .. } => true,
            ExecFailure::TruncateIoFailed(e)
            | ExecFailure::IoStreamFailed { error: e, .. }
            | ExecFailure::IoTailReplayFailed { error: e, .. }
            | ExecFailure::IoBaseFailed(e)
            | ExecFailure::BarrierFailed(e) => e.requires_rebuild(),
            _ => false,
        }
    }
}

impl fmt::Display for ExecFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecFailure::PlanNotExecutable(d) => write!(f, "plan_not_executable: {d}"),
            ExecFailure::SenderNotFound => f.write_str("sender_not_found"),
            ExecFailure::BeginCatchUpFailed(e) => write!(f, "begin_catchup_failed: {e}"),
            ExecFailure::TruncateIoFailed(e) => write!(f, "io_truncate_failed: {e}"),
            ExecFailure::TruncateMismatch {
                requested,
                reported,
            } => write!(
                f,
                "io_truncate_mismatch: requested {requested}, replica reports {reported}"
            ),
            ExecFailure::TruncateDiverged { expected, reported } => match expected {
                Some(x) => write!(f, "truncate_diverged: replica tip {reported}, primary {x}"),
                None => write!(
                    f,
                    "truncate_diverged: replica tip {reported}, primary cannot vouch for it"
                ),
            },
            ExecFailure::TruncationFailed(e) => write!(f, "truncation_failed: {e}"),
            ExecFailure::IoStreamFailed { step, error } => {
                write!(f, "io_stream_failed_step_{step}: {error}")
            }
            ExecFailure::IoProtocol { step, detail } => {
                write!(f, "io_protocol_step_{step}: {detail}")
            }
            ExecFailure::ProgressAfterIo { step, error } => {
                write!(f, "progress_after_io_step_{step}: {error}")
            }
            ExecFailure::BudgetCheckFailed(e) => write!(f, "budget_check_failed: {e}"),
            ExecFailure::BudgetEscalated(v) => write!(f, "budget_escalated: {v}"),
            ExecFailure::SessionInvalidatedMidExecution { step, error } => {
                write!(
                    f,
                    "session_invalidated_mid_execution_after_step_{step}: {error}"
                )
            }
            ExecFailure::BarrierFailed(e) => write!(f, "io_barrier_failed: {e}"),
            ExecFailure::BarrierRejected(e) => write!(f, "barrier_rejected: {e}"),
            ExecFailure::CompletionRejected(e) => write!(f, "completion_rejected: {e}"),
            ExecFailure::Cancelled(r) => write!(f, "cancelled: {r}"),
            ExecFailure::ConnectFailed(e) => write!(f, "connect_failed: {e}"),
            ExecFailure::HandshakeFailed(e) => write!(f, "handshake_failed: {e}"),
            ExecFailure::SourceSelectFailed(e) => write!(f, "source_select_failed: {e}"),
            ExecFailure::TransferFailed(e) => write!(f, "transfer_failed: {e}"),
            ExecFailure::IoBaseFailed(e) => write!(f, "io_base_transfer_failed: {e}"),
            ExecFailure::BaseLsnMismatch { expected, reported } => write!(
                f,
                "base_lsn_mismatch: planned {expected}, replica reports {reported}"
            ),
            ExecFailure::TransferProgressFailed(e) => {
                write!(f, "transfer_progress_failed: {e}")
            }
            ExecFailure::TailReplayFailed(e) => write!(f, "tail_replay_failed: {e}"),
            ExecFailure::IoTailReplayFailed { step, error } => {
                write!(f, "io_tail_replay_failed_step_{step}: {error}")
            }
            ExecFailure::TailProgressFailed(e) => write!(f, "tail_progress_failed: {e}"),
            ExecFailure::RebuildCompletionFailed(e) => {
                write!(f, "rebuild_completion_failed: {e}")
            }
        }
    }
}
