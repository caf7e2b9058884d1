//! The service's typed refusals and failures: why an assignment was refused
//! ([`AssignmentError`]), what a backend reports ([`BackendError`]), and why a recovery failed
//! ([`RecoveryFailure`]). A caller tells them apart by variant, never by parsing text; the
//! `Display` forms are for logs.

use engine::{EngineError, Epoch, ReplicaState};

use crate::assignment::ControlError;

/// A backend failure: what kind of failure it was, with the backend's description.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// What the request needs cannot be reached now: an address that is down or answers
    /// nothing, a peer that is not listening, a server process that has crashed. Retrying
    /// later may succeed.
    #[error("backend unavailable: {message}")]
    Unavailable {
        /// The backend's description.
        message: String,
    },
    /// Storage failed: opening, creating or fencing a volume file, reading it, or a replica's
    /// storage reporting an error.
    #[error("backend i/o error: {message}")]
    Io {
        /// The backend's description.
        message: String,
    },
    /// The backend refuses the request in the volume's current state: not a primary (or not a
    /// replica) here, a route it does not serve, an epoch its volume fences.
    #[error("backend refused: {message}")]
    Refused {
        /// The backend's description.
        message: String,
    },
}

impl BackendError {
    /// [`BackendError::Unavailable`] with `message`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        BackendError::Unavailable {
            message: message.into(),
        }
    }

    /// [`BackendError::Io`] with `message`.
    pub fn io(message: impl Into<String>) -> Self {
        BackendError::Io {
            message: message.into(),
        }
    }

    /// [`BackendError::Refused`] with `message`.
    pub fn refused(message: impl Into<String>) -> Self {
        BackendError::Refused {
            message: message.into(),
        }
    }

    /// The backend's description.
    pub fn message(&self) -> &str {
        match self {
            BackendError::Unavailable { message }
            | BackendError::Io { message }
            | BackendError::Refused { message } => message,
        }
    }
}

/// Why an assignment is stale.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StaleAssignment {
    /// Its epoch is below the one the volume's registry has accepted (or been fenced at).
    #[error("epoch {assignment} is below the volume's epoch {accepted}")]
    Epoch {
        /// The assignment's epoch.
        assignment: Epoch,
        /// The volume's epoch.
        accepted: Epoch,
    },
    /// Within the epoch already accepted, its address version is older than one accepted: a
    /// late delivery that would move replicas back to addresses the master has replaced.
    #[error("address version {assignment} at epoch {epoch}, version {accepted} already accepted")]
    AddressVersion {
        /// The epoch (the assignment's and the accepted one).
        epoch: Epoch,
        /// The assignment's address version.
        assignment: u64,
        /// The newest address version accepted at that epoch.
        accepted: u64,
    },
}

/// Why the service refused an assignment. A refused assignment changed nothing the volume's
/// registry holds; only [`AssignmentError::Engine`] and a registry fence that lands after the
/// role was applied (reported as [`AssignmentError::Stale`]) can follow a role change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignmentError {
    /// The assignment is malformed: an unknown role, a volume name or local server ID that
    /// cannot be part of an identity. Nothing was touched.
    #[error("invalid assignment: {0}")]
    Invalid(#[from] ControlError),
    /// Older than what the volume already accepted (see [`StaleAssignment`]). Nothing was
    /// touched, unless the registry was fenced between the service's check and the intent (a
    /// concurrent epoch bump), when the backend has already applied the role.
    #[error("stale assignment: {0}")]
    Stale(StaleAssignment),
    /// The backend could not apply the role to the local volume. The registry was not
    /// changed.
    #[error("applying the role: {0}")]
    Backend(#[from] BackendError),
    /// The volume's registry refused the intent for a reason other than its epoch.
    #[error("the registry refused the intent: {0}")]
    Engine(EngineError),
}

impl AssignmentError {
    /// Whether the assignment was refused as stale.
    pub fn is_stale(&self) -> bool {
        matches!(self, AssignmentError::Stale(_))
    }
}

/// Why a recovery failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryFailure {
    /// The session the recovery was returned for lost its authority before the recovery could
    /// claim it: a newer assignment replaced it, an epoch fence or a cancel ended it, or the
    /// sender was removed. The engine refused it; nothing was moved and the sender's current
    /// session (if any) was left alone.
    #[error("fenced before it ran: {0}")]
    Fenced(EngineError),
    /// The replica has no session to recover under and is neither in sync nor waiting for a
    /// rebuild (the assignment could not attach one).
    #[error("no session (state {state})")]
    NoSession {
        /// The replica's state.
        state: ReplicaState,
    },
    /// A rebuilding assignment that names no rebuild address to pull from.
    #[error("rebuilding assignment without a rebuild address")]
    NoRebuildAddress,
    /// The backend failed: the primary's storage, the replica's handshake, or the transport
    /// for the transfer.
    #[error("{0}")]
    Backend(BackendError),
    /// Planning failed: the history, the recoverability proof, or a pin.
    #[error("plan failed: {0}")]
    Plan(EngineError),
    /// The transfer failed: the executor stopped (I/O failure, budget, lost authority
    /// mid-transfer) and released its pins.
    #[error("transfer failed: {0}")]
    Transfer(EngineError),
}

impl RecoveryFailure {
    /// A planning error, as [`RecoveryFailure::Fenced`] when it says the session lost its
    /// authority and as [`RecoveryFailure::Plan`] otherwise.
    pub(crate) fn from_plan(e: EngineError) -> Self {
        if is_authority_error(&e) {
            RecoveryFailure::Fenced(e)
        } else {
            RecoveryFailure::Plan(e)
        }
    }
}

/// The engine's refusals that mean "this session is no longer the one with authority".
fn is_authority_error(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::SenderNotFound { .. }
            | EngineError::SenderStopped { .. }
            | EngineError::NoSession { .. }
            | EngineError::NoActiveSession { .. }
            | EngineError::SessionIdMismatch { .. }
            | EngineError::SessionNotActive { .. }
            | EngineError::StaleAuthority { .. }
            | EngineError::EpochMismatch { .. }
    )
}
