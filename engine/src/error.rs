//! The engine's errors. One enum for every refusal the engine itself makes ([`EngineError`]),
//! and two for what its collaborators report: storage ([`StorageError`], from a
//! [`StorageAdapter`](crate::StorageAdapter)) and data transfer ([`TransferError`], from the
//! executors' I/O traits). The engine performs no I/O, so none of them wraps `std::io::Error`.

use crate::rebuild::RebuildPhase;
use crate::report::{ExecFailure, ExecutionReport};
use crate::types::{Epoch, Lsn, ReplicaId, SessionId, SessionKind, SessionPhase};

/// Shorthand for results whose error is [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Which of the three storage pins an error or event is about.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PinKind {
    /// Keeps a WAL range from being recycled.
    WalRetention,
    /// Keeps a checkpoint image (snapshot) alive.
    Snapshot,
    /// Keeps a full base image at a fixed LSN alive.
    FullBase,
}

impl PinKind {
    /// Short name used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            PinKind::WalRetention => "wal",
            PinKind::Snapshot => "snapshot",
            PinKind::FullBase => "full_base",
        }
    }
}

impl std::fmt::Display for PinKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal by the engine. Each variant carries the values that explain it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A replica ID failed validation.
    #[error("invalid replica id {id:?}: {reason}")]
    InvalidReplicaId {
        /// The rejected text.
        id: String,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The sender was stopped (removed from the registry or shut down).
    #[error("sender {replica} stopped")]
    SenderStopped {
        /// The replica.
        replica: ReplicaId,
    },
    /// The sender has no session.
    #[error("sender {replica} has no active session")]
    NoActiveSession {
        /// The replica.
        replica: ReplicaId,
    },
    /// The caller's session ID is not the sender's current session.
    #[error("session id mismatch for {replica}: caller has {given}, current is {current}")]
    SessionIdMismatch {
        /// The replica.
        replica: ReplicaId,
        /// The ID the caller presented.
        given: SessionId,
        /// The sender's current session ID.
        current: SessionId,
    },
    /// The session exists but is in a terminal phase.
    #[error("session {session} of {replica} is not active (phase {phase})")]
    SessionNotActive {
        /// The replica.
        replica: ReplicaId,
        /// The session.
        session: SessionId,
        /// Its phase.
        phase: SessionPhase,
    },
    /// The session was created under an epoch or endpoint version the sender no longer has.
    #[error(
        "session {session} of {replica} belongs to epoch {session_epoch} endpoint v{session_endpoint_version}, sender is at epoch {sender_epoch} endpoint v{sender_endpoint_version}"
    )]
    StaleAuthority {
        /// The replica.
        replica: ReplicaId,
        /// The session.
        session: SessionId,
        /// The epoch the session was created under.
        session_epoch: Epoch,
        /// The sender's epoch now.
        sender_epoch: Epoch,
        /// The endpoint version the session was created under.
        session_endpoint_version: u64,
        /// The sender's endpoint version now.
        sender_endpoint_version: u64,
    },
    /// A session was requested at an epoch other than the sender's.
    #[error("epoch mismatch for {replica}: requested {requested}, sender is at {sender}")]
    EpochMismatch {
        /// The replica.
        replica: ReplicaId,
        /// The epoch asked for.
        requested: Epoch,
        /// The sender's epoch.
        sender: Epoch,
    },
    /// A new session was requested while one is still active.
    #[error("sender {replica} still has active session {session}")]
    SessionStillActive {
        /// The replica.
        replica: ReplicaId,
        /// The active session.
        session: SessionId,
    },
    /// The phase transition table does not allow this edge.
    #[error("session {session}: phase transition {from} -> {to} not allowed")]
    InvalidTransition {
        /// The session.
        session: SessionId,
        /// Current phase.
        from: SessionPhase,
        /// Requested phase.
        to: SessionPhase,
    },
    /// The operation needs a session in a specific phase.
    #[error("session {session}: operation {operation} needs phase {expected}, found {found}")]
    WrongPhase {
        /// The session.
        session: SessionId,
        /// What was attempted.
        operation: &'static str,
        /// The phase it needs.
        expected: SessionPhase,
        /// The phase the session is in.
        found: SessionPhase,
    },
    /// A handshake range with its target below its start.
    #[error("invalid range: target {target} below start {start}")]
    InvalidRange {
        /// Range start (exclusive).
        start: Lsn,
        /// Range end (inclusive).
        target: Lsn,
    },
    /// Progress must strictly increase.
    #[error("progress regression: already at {current}, proposed {proposed}")]
    ProgressRegression {
        /// Progress so far.
        current: Lsn,
        /// The proposed value.
        proposed: Lsn,
    },
    /// Progress past the frozen (or planned) target.
    #[error("progress {proposed} exceeds frozen target {target}")]
    ExceedsFrozenTarget {
        /// The target.
        target: Lsn,
        /// The proposed value.
        proposed: Lsn,
    },
    /// The session's budget has a progress deadline, so each progress report needs a tick.
    #[error("budget has a progress deadline: progress must carry a tick")]
    TickRequired,
    /// Truncation recorded on a session that does not need one.
    #[error("truncation not required for session {session}")]
    TruncationNotRequired {
        /// The session.
        session: SessionId,
    },
    /// Truncation recorded at a different LSN than the one required.
    #[error("truncation mismatch: required {required}, got {proposed}")]
    TruncationMismatch {
        /// The required truncation point.
        required: Lsn,
        /// The point reported.
        proposed: Lsn,
    },
    /// Completion attempted while a required truncation has not been recorded.
    #[error("truncation to {required} required but not recorded")]
    TruncationNotRecorded {
        /// The required truncation point.
        required: Lsn,
    },
    /// Completion attempted before the replica reached the target.
    #[error("not converged: recovered to {recovered_to}, target {target}")]
    NotConverged {
        /// Progress so far.
        recovered_to: Lsn,
        /// The target.
        target: Lsn,
    },
    /// Completion attempted before the replica reported its data durable at the target.
    #[error("durability barrier missing: target {target}, replica durable at {durable:?}")]
    BarrierMissing {
        /// The target.
        target: Lsn,
        /// The durable LSN the replica last reported, if any.
        durable: Option<Lsn>,
    },
    /// A catch-up API was used on a rebuild session or the other way around.
    #[error("session {session} is of kind {kind}; {operation} is not allowed")]
    WrongSessionKind {
        /// The session.
        session: SessionId,
        /// Its kind.
        kind: SessionKind,
        /// What was attempted.
        operation: &'static str,
    },
    /// A rebuild API was used on a session without rebuild state.
    #[error("session {session} has no rebuild state")]
    NoRebuildState {
        /// The session.
        session: SessionId,
    },
    /// The rebuild state machine does not allow this operation in its current phase.
    #[error("rebuild: {operation} needs phase {expected}, found {found}")]
    RebuildPhaseMismatch {
        /// What was attempted.
        operation: &'static str,
        /// The phase it needs.
        expected: RebuildPhase,
        /// The phase the rebuild is in.
        found: RebuildPhase,
    },
    /// Tail replay attempted before the base reached the snapshot LSN.
    #[error("base transfer incomplete: transferred to {transferred:?}, snapshot at {snapshot}")]
    BaseTransferIncomplete {
        /// How far the base got.
        transferred: Option<Lsn>,
        /// Where it must get to.
        snapshot: Lsn,
    },
    /// A snapshot source above the committed LSN (it would carry uncommitted data).
    #[error("snapshot at {snapshot} is above committed {committed}")]
    SnapshotAboveCommitted {
        /// The snapshot LSN.
        snapshot: Lsn,
        /// The committed LSN.
        committed: Lsn,
    },
    /// Rebuild completion before the rebuild is ready.
    #[error("rebuild not ready to complete (phase {phase})")]
    RebuildNotReady {
        /// The rebuild phase.
        phase: RebuildPhase,
    },
    /// The catch-up budget was exceeded; the session was invalidated and the replica needs a
    /// rebuild.
    #[error("catch-up budget of {replica} exceeded: {violation}")]
    BudgetExceeded {
        /// The replica.
        replica: ReplicaId,
        /// Which limit.
        violation: crate::budget::BudgetViolation,
    },
    /// No sender with this ID.
    #[error("sender {replica} not found")]
    SenderNotFound {
        /// The replica.
        replica: ReplicaId,
    },
    /// An intent or epoch older than what the registry has already seen; nothing was changed.
    #[error("stale intent: epoch {intent} is below the registry's epoch {registry}")]
    StaleIntent {
        /// The intent's epoch.
        intent: Epoch,
        /// The registry's epoch.
        registry: Epoch,
    },
    /// An assignment from an epoch older than the sender's own tried to change it; nothing
    /// was changed. A sender can be newer than its registry's fence when it alone
    /// was raised (`RecoveryOrchestrator::update_sender_epoch`).
    #[error(
        "stale assignment for {replica}: epoch {intent_epoch} endpoint v{intent_endpoint_version} is older than the sender's epoch {sender_epoch} endpoint v{sender_endpoint_version}"
    )]
    StaleAssignment {
        /// The replica.
        replica: ReplicaId,
        /// The assignment's epoch.
        intent_epoch: Epoch,
        /// The assignment's endpoint version.
        intent_endpoint_version: u64,
        /// The sender's epoch.
        sender_epoch: Epoch,
        /// The sender's endpoint version.
        sender_endpoint_version: u64,
    },
    /// A session already has a plan (two planners raced for it); the second is refused and
    /// the session is left to the first.
    #[error("session {session} of {replica} already has a plan")]
    AlreadyPlanned {
        /// The replica.
        replica: ReplicaId,
        /// The session.
        session: SessionId,
    },
    /// A recoverability proof that does not follow from the history it came with (a proof
    /// built by hand); the handshake was not recorded.
    #[error("proof for {replica} claims {claimed}, its history gives {history}")]
    ProofMismatch {
        /// The replica.
        replica: ReplicaId,
        /// The outcome the proof claims.
        claimed: crate::outcome::Outcome,
        /// The outcome the history supports.
        history: crate::outcome::Outcome,
    },
    /// Storage reported a retained history that breaks its own invariants; nothing was
    /// planned from it.
    #[error("storage reported an inconsistent history: {0}")]
    InconsistentHistory(String),
    /// Storage answered a question about one LSN with an entry of another.
    #[error("storage asked for the entry at LSN {requested} returned the entry at LSN {returned}")]
    WrongEntry {
        /// The LSN asked for.
        requested: Lsn,
        /// The LSN of the entry returned.
        returned: Lsn,
    },
    /// A plan was requested for a sender without a session.
    #[error("sender {replica} has no session to plan for")]
    NoSession {
        /// The replica.
        replica: ReplicaId,
    },
    /// A storage pin could not be acquired; the session was invalidated.
    #[error("{kind} pin failed: {error}")]
    PinFailed {
        /// Which pin.
        kind: PinKind,
        /// What storage said.
        error: StorageError,
    },
    /// Storage could not report its retained history.
    #[error("retained history unavailable: {0}")]
    HistoryUnavailable(StorageError),
    /// An executor stopped before completion. Its pins are released and its session is
    /// invalidated; `report` says what was done before the failure.
    #[error("execution for {replica} failed: {failure}")]
    ExecutionFailed {
        /// The replica.
        replica: ReplicaId,
        /// Why it stopped (the reason recorded in the release event).
        failure: Box<ExecFailure>,
        /// Work done before the failure.
        report: Box<ExecutionReport>,
    },
}

/// What a [`StorageAdapter`](crate::StorageAdapter) reports when it cannot answer or pin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The requested WAL range starts before what is retained.
    #[error("entries after LSN {requested} are recycled (retained from LSN {retained_start})")]
    Recycled {
        /// The exclusive start that was asked for.
        requested: Lsn,
        /// The first LSN still retained.
        retained_start: Lsn,
    },
    /// No trusted snapshot at the requested LSN.
    #[error(
        "no trusted snapshot at LSN {requested} (checkpoint {checkpoint:?}, trusted {trusted})"
    )]
    SnapshotUnavailable {
        /// The LSN asked for.
        requested: Lsn,
        /// The storage's checkpoint.
        checkpoint: Option<Lsn>,
        /// Whether that checkpoint is trusted.
        trusted: bool,
    },
    /// A base image at the requested LSN cannot be provided.
    #[error("no base image at LSN {requested}: {detail}")]
    BaseUnavailable {
        /// The LSN asked for.
        requested: Lsn,
        /// Why not.
        detail: String,
    },
    /// Any other storage failure, described by the backend.
    #[error("storage backend: {0}")]
    Backend(String),
    /// Storage returned a pin for another LSN than the one asked for (the engine released it).
    #[error("asked to pin LSN {requested}, storage pinned LSN {pinned}")]
    WrongPin {
        /// The LSN asked for.
        requested: Lsn,
        /// The LSN the returned pin holds.
        pinned: Lsn,
    },
}

/// What an executor's I/O reports when a transfer step fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The WAL range needed was recycled on the primary.
    #[error("WAL after {from} recycled on the primary (retained from {retained_start})")]
    Recycled {
        /// The exclusive start requested.
        from: Lsn,
        /// The first LSN the primary still has.
        retained_start: Lsn,
    },
    /// The primary's WAL or the shipped stream skipped an LSN.
    #[error("gap in WAL stream: expected LSN {expected}, found {found}")]
    Gap {
        /// The LSN that should have come next.
        expected: Lsn,
        /// The LSN that came.
        found: Lsn,
    },
    /// The primary's WAL is damaged.
    #[error("corrupt WAL data at {lsn:?}: {detail}")]
    Corrupt {
        /// The LSN involved, when known.
        lsn: Option<Lsn>,
        /// What was wrong.
        detail: String,
    },
    /// The replica holds an entry that differs from the primary's at the same LSN.
    #[error("replica diverges from the primary at LSN {lsn}: {detail}")]
    Divergent {
        /// The LSN where the histories differ.
        lsn: Lsn,
        /// What differed.
        detail: String,
    },
    /// The replica cannot drop entries already moved into its extent.
    #[error("cannot truncate replica to {requested}: its checkpoint is {checkpoint}")]
    TruncateBelowCheckpoint {
        /// The truncation point requested.
        requested: Lsn,
        /// The replica's checkpoint.
        checkpoint: Lsn,
    },
    /// A chunk failed its checksum on arrival.
    #[error("checksum mismatch: {detail}")]
    Checksum {
        /// What failed.
        detail: String,
    },
    /// The base image is gone or does not match the plan.
    #[error("base image unavailable: {detail}")]
    BaseUnavailable {
        /// Why.
        detail: String,
    },
    /// The replica refused the request as stale (epoch or session fencing).
    #[error("replica refused the request: {detail}")]
    Fenced {
        /// Why.
        detail: String,
    },
    /// The connection to the replica failed.
    #[error("transport: {detail}")]
    Transport {
        /// What failed.
        detail: String,
    },
    /// The replica's or primary's storage failed.
    #[error("storage: {detail}")]
    Storage {
        /// What failed.
        detail: String,
    },
}

impl EngineError {
    /// `Ok` when a session's phase is the one `operation` needs, `WrongPhase` otherwise.
    pub(crate) fn require_phase(
        session: SessionId,
        operation: &'static str,
        expected: SessionPhase,
        found: SessionPhase,
    ) -> Result<()> {
        if found == expected {
            return Ok(());
        }
        Err(EngineError::WrongPhase {
            session,
            operation,
            expected,
            found,
        })
    }
}

impl TransferError {
    /// True when the failure means catch-up cannot succeed on this lineage and only a rebuild
    /// can restore the replica (as opposed to a transient failure that a new session at the
    /// same epoch may overcome).
    pub fn requires_rebuild(&self) -> bool {
        matches!(
            self,
            TransferError::Recycled { .. }
                | TransferError::Gap { .. }
                | TransferError::Corrupt { .. }
                | TransferError::Divergent { .. }
                | TransferError::TruncateBelowCheckpoint { .. }
        )
    }
}
