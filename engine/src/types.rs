//! Units that must never be mixed: LSNs, epochs, session IDs, replica IDs and ticks, plus the
//! small enums (replica state, session kind, session phase) every other module speaks in.

use std::fmt;
use std::num::NonZeroU64;

use crate::error::EngineError;

/// A log sequence number.
///
/// `Lsn(0)` is a real position, "before the first entry": a replica that holds nothing has
/// flushed LSN 0, and truncating to LSN 0 drops every entry. It is never used to mean "none";
/// the engine uses `Option<Lsn>` for that.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position before the first entry.
    pub const ZERO: Lsn = Lsn(0);

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next LSN, saturating at `u64::MAX` (an LSN that large is never reached in practice,
    /// and saturating keeps the arithmetic total).
    pub const fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }

    /// The number of LSNs in the range `(self, to]`, zero when `to <= self`.
    pub const fn distance_to(self, to: Lsn) -> u64 {
        to.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A fencing epoch. A higher epoch always wins; anything stamped with a lower one is stale.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A recovery session's identity. Never zero: "no session" is `Option<SessionId>::None`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(NonZeroU64);

impl SessionId {
    /// The smallest session ID, 1.
    pub const MIN: SessionId = SessionId(NonZeroU64::MIN);

    /// Builds an ID from a raw value; `None` for zero.
    pub const fn new(raw: u64) -> Option<SessionId> {
        match NonZeroU64::new(raw) {
            Some(v) => Some(SessionId(v)),
            None => None,
        }
    }

    /// The raw value (never zero).
    pub const fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Engine time. The engine has no clock: callers pass ticks in, and the engine only compares
/// them. Elapsed time is computed with saturating subtraction, so a clock that goes backwards
/// reads as "no time passed" rather than as a huge duration.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(pub u64);

impl Tick {
    /// Ticks elapsed from `earlier` to `self`; zero if `earlier` is later.
    pub const fn since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The tick `n` ticks after this one (saturating).
    pub const fn plus(self, n: u64) -> Tick {
        Tick(self.0.saturating_add(n))
    }
}

impl fmt::Display for Tick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The longest replica ID accepted: `<volume>/<server_id>` with each part at most 255 bytes.
pub const MAX_REPLICA_ID_BYTES: usize = 511;

/// A replica's stable identity. It is never derived from an address: the control bridge builds
/// it as `<volume>/<server_id>` from the master's stable server IDs.
///
/// IDs are shared, not copied: they key the registry, name every event and invalidation, and a
/// clone is a reference-count increment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(std::sync::Arc<str>);

impl ReplicaId {
    /// Validates and builds an ID: non-empty, at most [`MAX_REPLICA_ID_BYTES`] bytes, and free
    /// of control characters (IDs end up in logs and file names).
    pub fn new(id: impl Into<String>) -> Result<ReplicaId, EngineError> {
        let id = id.into();
        if id.is_empty() {
            return Err(EngineError::InvalidReplicaId {
                id,
                reason: "empty",
            });
        }
        if id.len() > MAX_REPLICA_ID_BYTES {
            return Err(EngineError::InvalidReplicaId {
                id,
                reason: "longer than 511 bytes",
            });
        }
        if id.chars().any(char::is_control) {
            return Err(EngineError::InvalidReplicaId {
                id,
                reason: "contains a control character",
            });
        }
        Ok(ReplicaId(id.into()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for ReplicaId {
    type Error = EngineError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        ReplicaId::new(s)
    }
}

/// Where a replica can be reached. An endpoint is a mutable location, never an identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Address of the replica's data channel.
    pub data_addr: String,
    /// Address of the replica's control channel.
    pub ctrl_addr: String,
    /// Version of this address assignment; a bump alone counts as a change.
    pub version: u64,
}

impl Endpoint {
    /// Builds an endpoint.
    pub fn new(data_addr: impl Into<String>, ctrl_addr: impl Into<String>, version: u64) -> Self {
        Endpoint {
            data_addr: data_addr.into(),
            ctrl_addr: ctrl_addr.into(),
            version,
        }
    }

    /// True when any of the three fields differs.
    pub fn changed(&self, other: &Endpoint) -> bool {
        self != other
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data={} ctrl={} v{}",
            self.data_addr, self.ctrl_addr, self.version
        )
    }
}

/// A sender's view of its replica.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// No proven relationship at the current epoch and endpoint.
    Disconnected,
    /// A session has connected and is handshaking (rebuild sessions stay here until done).
    Connecting,
    /// Replaying a WAL range.
    CatchingUp,
    /// Holds exactly the committed data, proven by a handshake or a completed recovery.
    InSync,
    /// Set only by callers through `invalidate_session` ([`Demotion::Degraded`]).
    Degraded,
    /// Only a rebuild can bring it back.
    NeedsRebuild,
}

impl ReplicaState {
    /// The reference's name for this state.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::Connecting => "connecting",
            ReplicaState::CatchingUp => "catching_up",
            ReplicaState::InSync => "in_sync",
            ReplicaState::Degraded => "degraded",
            ReplicaState::NeedsRebuild => "needs_rebuild",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states a caller may demote a replica to. `in_sync` (and the states a session moves
/// through) are not among them: only a proof reaches `in_sync`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Demotion {
    /// Nothing is proven any more; the next handshake decides.
    Disconnected,
    /// The replica fell out of the live stream (the replication layer's own judgement).
    Degraded,
    /// Only a rebuild can bring the replica back.
    NeedsRebuild,
}

impl From<Demotion> for ReplicaState {
    fn from(d: Demotion) -> Self {
        match d {
            Demotion::Disconnected => ReplicaState::Disconnected,
            Demotion::Degraded => ReplicaState::Degraded,
            Demotion::NeedsRebuild => ReplicaState::NeedsRebuild,
        }
    }
}

/// Why a session exists. Only `Rebuild` behaves differently from the others.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionKind {
    /// First contact with a new replica.
    Bootstrap,
    /// Replay of a missing WAL range.
    CatchUp,
    /// Base image (full, or snapshot plus WAL tail).
    Rebuild,
    /// Re-established after a reassignment.
    Reassign,
}

impl SessionKind {
    /// The reference's name for this kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionKind::Bootstrap => "bootstrap",
            SessionKind::CatchUp => "catchup",
            SessionKind::Rebuild => "rebuild",
            SessionKind::Reassign => "reassign",
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session's lifecycle phase. `Completed` and `Invalidated` are terminal.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SessionPhase {
    /// Attached, not yet connected.
    Init,
    /// Connected, before the handshake.
    Connecting,
    /// Handshake recorded; the range is known.
    Handshake,
    /// Replaying the range.
    CatchUp,
    /// Finished; the replica was proven in sync.
    Completed,
    /// Lost its authority or failed.
    Invalidated,
}

impl SessionPhase {
    /// The reference's name for this phase.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionPhase::Init => "init",
            SessionPhase::Connecting => "connecting",
            SessionPhase::Handshake => "handshake",
            SessionPhase::CatchUp => "catchup",
            SessionPhase::Completed => "completed",
            SessionPhase::Invalidated => "invalidated",
        }
    }

    /// True for `Completed` and `Invalidated`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, SessionPhase::Completed | SessionPhase::Invalidated)
    }

    /// The transition table. Every edge that any code path takes is listed here, including
    /// completion (which the reference let bypass the table):
    ///
    /// | from       | to                                  |
    /// |------------|-------------------------------------|
    /// | init       | connecting, invalidated             |
    /// | connecting | handshake, invalidated              |
    /// | handshake  | catchup, completed, invalidated     |
    /// | catchup    | completed, invalidated              |
    /// | completed  | (terminal)                          |
    /// | invalidated| (terminal)                          |
    pub const fn can_advance_to(self, to: SessionPhase) -> bool {
        use SessionPhase::*;
        matches!(
            (self, to),
            (Init, Connecting)
                | (Init, Invalidated)
                | (Connecting, Handshake)
                | (Connecting, Invalidated)
                | (Handshake, CatchUp)
                | (Handshake, Completed)
                | (Handshake, Invalidated)
                | (CatchUp, Completed)
                | (CatchUp, Invalidated)
        )
    }
}

impl fmt::Display for SessionPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_since_saturates_when_clock_goes_backwards() {
        assert_eq!(Tick(5).since(Tick(10)), 0);
        assert_eq!(Tick(15).since(Tick(10)), 5);
    }

    #[test]
    fn session_id_zero_is_none() {
        assert!(SessionId::new(0).is_none());
        assert_eq!(SessionId::new(7).map(SessionId::get), Some(7));
    }

    #[test]
    fn replica_id_validation() {
        assert!(ReplicaId::new("vol1/vs2").is_ok());
        assert!(ReplicaId::new("").is_err());
        assert!(ReplicaId::new("a\nb").is_err());
        assert!(ReplicaId::new("x".repeat(MAX_REPLICA_ID_BYTES + 1)).is_err());
        assert!(ReplicaId::new("x".repeat(MAX_REPLICA_ID_BYTES)).is_ok());
    }

    #[test]
    fn endpoint_version_alone_is_a_change() {
        let a = Endpoint::new("10.0.0.1:1", "10.0.0.1:2", 1);
        let mut b = a.clone();
        b.version = 2;
        assert!(a.changed(&b));
        assert!(!a.changed(&a.clone()));
    }

    #[test]
    fn terminal_phases_have_no_edges() {
        use SessionPhase::*;
        for to in [Init, Connecting, Handshake, CatchUp, Completed, Invalidated] {
            assert!(!Completed.can_advance_to(to));
            assert!(!Invalidated.can_advance_to(to));
        }
    }
}
