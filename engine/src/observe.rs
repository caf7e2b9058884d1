//! Observability: sender and registry status, and the recovery event log.
//!
//! Every decision the engine makes is returned as data (results, proofs) and also appended to
//! the [`RecoveryLog`] as a typed [`Event`]. Event names are the reference's, so logs from the
//! two implementations can be compared line by line; the payloads are typed.

use std::collections::VecDeque;
use std::fmt;
use std::sync::PoisonError;

use crate::sync::{Mutex, MutexGuard};

use crate::budget::BudgetViolation;
use crate::history::{ProofReason, RebuildReason};
use crate::outcome::Outcome;
use crate::rebuild::RebuildSource;
use crate::session::{InvalidateReason, SessionSnapshot};
use crate::types::{Endpoint, Epoch, Lsn, ReplicaId, ReplicaState, SessionId, SessionKind, Tick};

/// One sender's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderStatus {
    /// Replica ID.
    pub replica_id: ReplicaId,
    /// Current endpoint.
    pub endpoint: Endpoint,
    /// Current epoch.
    pub epoch: Epoch,
    /// Replica state.
    pub state: ReplicaState,
    /// Whether the sender was stopped.
    pub stopped: bool,
    /// The active session, if any.
    pub session: Option<SessionSnapshot>,
}

/// All senders of a registry, with counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryStatus {
    /// Per-sender status, sorted by replica ID.
    pub senders: Vec<SenderStatus>,
    /// Number of senders.
    pub total_count: usize,
    /// Senders in `in_sync`.
    pub in_sync: usize,
    /// Senders in `connecting` or `catching_up`.
    pub recovering: usize,
    /// Senders in `degraded`.
    pub degraded: usize,
    /// Senders in `needs_rebuild` (the reference's name for this count).
    pub rebuilding: usize,
    /// Senders in `disconnected` (the reference counted these nowhere).
    pub disconnected: usize,
}

impl RegistryStatus {
    pub(crate) fn from_senders(senders: Vec<SenderStatus>) -> Self {
        let count =
            |pred: &dyn Fn(ReplicaState) -> bool| senders.iter().filter(|s| pred(s.state)).count();
        RegistryStatus {
            total_count: senders.len(),
            in_sync: count(&|s| s == ReplicaState::InSync),
            recovering: count(&|s| {
                matches!(s, ReplicaState::Connecting | ReplicaState::CatchingUp)
            }),
            degraded: count(&|s| s == ReplicaState::Degraded),
            rebuilding: count(&|s| s == ReplicaState::NeedsRebuild),
            disconnected: count(&|s| s == ReplicaState::Disconnected),
            senders,
        }
    }
}

/// A recovery event. [`Event::name`] is the reference's event name.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    // Orchestrator.
    /// A sender was created.
    SenderAdded,
    /// A sender was stopped and removed.
    SenderRemoved,
    /// A session lost its authority (the event's session ID is the old session).
    SessionInvalidated {
        /// Why.
        reason: InvalidateReason,
    },
    /// A session was attached.
    SessionCreated {
        /// Its kind.
        kind: SessionKind,
    },
    /// A session replaced another (the event's session ID is the new one).
    SessionSuperseded {
        /// The replaced session.
        old: Option<SessionId>,
        /// The new session's kind.
        kind: SessionKind,
    },
    /// An active session of the requested kind was left running.
    SessionKept {
        /// Its kind.
        kind: SessionKind,
    },
    /// A recovery target got no session.
    SessionFailed {
        /// Why.
        error: String,
    },
    /// `begin_connect` failed.
    ConnectFailed {
        /// Why.
        error: String,
    },
    /// `begin_connect` succeeded.
    Connected,
    /// The handshake could not be recorded.
    HandshakeFailed {
        /// Why.
        error: String,
    },
    /// The handshake was recorded.
    Handshake {
        /// Its outcome.
        outcome: Outcome,
    },
    /// The handshake escalated the replica to rebuild.
    Escalated {
        /// The proof's reason.
        reason: ProofReason,
    },
    /// A session completed; the replica is in sync.
    Completed {
        /// `zero_gap` or `in_sync`.
        how: &'static str,
    },
    /// `begin_catch_up` failed.
    CatchupBeginFailed {
        /// Why.
        error: String,
    },
    /// Catch-up started.
    CatchupStarted {
        /// Frozen target.
        target: Lsn,
        /// Start tick.
        tick: Option<Tick>,
    },
    /// Catch-up progress was refused.
    CatchupProgressFailed {
        /// Why.
        error: String,
    },
    /// The budget was exceeded; the replica needs a rebuild.
    BudgetEscalated {
        /// Which limit.
        violation: BudgetViolation,
    },
    /// Recording the truncation failed.
    TruncationFailed {
        /// Why.
        error: String,
    },
    /// The truncation was recorded.
    TruncationRecorded {
        /// The truncation point.
        truncated_to: Lsn,
    },
    /// Completion was refused.
    CompletionRejected {
        /// Why.
        error: String,
    },
    /// A rebuild's `begin_connect` failed.
    RebuildConnectFailed {
        /// Why.
        error: String,
    },
    /// A rebuild session connected.
    RebuildConnected,
    /// Rebuild source selection failed.
    RebuildSourceFailed {
        /// Why.
        error: String,
    },
    /// The rebuild source was selected.
    RebuildSourceSelected {
        /// The source (the reference logged the session kind here by mistake).
        source: RebuildSource,
        /// The snapshot LSN for snapshot + tail.
        snapshot: Option<Lsn>,
    },
    /// A rebuild failed.
    RebuildFailed {
        /// Why.
        error: String,
    },
    /// A rebuild completed; the replica is in sync.
    RebuildCompleted,

    // Driver.
    /// The replica's log left the primary's below its head and committed: it is truncated
    /// to the last shared entry and caught up from there.
    DivergenceFound {
        /// The replica's head at the handshake.
        replica_head: Lsn,
        /// The last entry both logs share.
        point: Lsn,
    },
    /// The replica's log differs from the primary's and it listed its epochs, but no entry
    /// both share is one it can truncate to and the primary still retains after.
    DivergenceUnusable {
        /// Why.
        detail: String,
    },
    /// The plan only truncates the replica.
    PlanTruncateOnly {
        /// The truncation point.
        truncate_to: Lsn,
    },
    /// A catch-up plan with its replay range and WAL pin.
    PlanCatchup {
        /// The range to replay.
        from: Lsn,
        /// The frozen target.
        to: Lsn,
        /// The WAL pin's ID.
        pin: u64,
    },
    /// The WAL retention pin failed.
    WalPinFailed {
        /// Why.
        error: String,
    },
    /// The snapshot pin failed.
    SnapshotPinFailed {
        /// Why.
        error: String,
    },
    /// A snapshot + tail rebuild plan.
    PlanRebuildSnapshotTail {
        /// The snapshot LSN.
        snapshot: Lsn,
        /// The target.
        target: Lsn,
    },
    /// The full-base pin failed.
    FullBasePinFailed {
        /// Why.
        error: String,
    },
    /// A full-base rebuild plan.
    PlanRebuildFullBase {
        /// Why full base and not snapshot + tail.
        reason: RebuildReason,
        /// The target.
        committed: Lsn,
    },
    /// A plan was cancelled.
    PlanCancelled {
        /// The caller's reason.
        reason: String,
    },

    // Executors.
    /// A catch-up executor started.
    ExecCatchupStarted {
        /// The frozen target.
        target: Lsn,
        /// The start tick.
        tick: Tick,
    },
    /// The executor truncated the replica through its I/O.
    ExecTruncation {
        /// The truncation point.
        truncated_to: Lsn,
    },
    /// The replica reported its data durable.
    ExecBarrier {
        /// The replica's durable LSN.
        durable: Lsn,
    },
    /// A catch-up executor finished; the replica is in sync.
    ExecCompleted,
    /// An executor released its pins before completing.
    ExecResourcesReleased {
        /// The release reason.
        reason: String,
    },
    /// A rebuild executor started.
    ExecRebuildStarted {
        /// The plan's source.
        source: RebuildSource,
        /// The target.
        target: Lsn,
    },
    /// The base image was installed on the replica.
    ExecBaseInstalled {
        /// The base LSN.
        base_lsn: Lsn,
        /// Bytes moved.
        bytes: u64,
    },
    /// A rebuild executor finished; the replica is in sync.
    ExecRebuildCompleted,
}

impl Event {
    /// The reference's event name.
    pub const fn name(&self) -> &'static str {
        match self {
            Event::SenderAdded => "sender_added",
            Event::SenderRemoved => "sender_removed",
            Event::SessionInvalidated { .. } => "session_invalidated",
            Event::SessionCreated { .. } => "session_created",
            Event::SessionSuperseded { .. } => "session_superseded",
            Event::SessionKept { .. } => "session_kept",
            Event::SessionFailed { .. } => "session_failed",
            Event::ConnectFailed { .. } => "connect_failed",
            Event::Connected => "connected",
            Event::HandshakeFailed { .. } => "handshake_failed",
            Event::Handshake { .. } => "handshake",
            Event::Escalated { .. } => "escalated",
            Event::Completed { .. } => "completed",
            Event::CatchupBeginFailed { .. } => "catchup_begin_failed",
            Event::CatchupStarted { .. } => "catchup_started",
            Event::CatchupProgressFailed { .. } => "catchup_progress_failed",
            Event::BudgetEscalated { .. } => "budget_escalated",
            Event::TruncationFailed { .. } => "truncation_failed",
            Event::TruncationRecorded { .. } => "truncation_recorded",
            Event::CompletionRejected { .. } => "completion_rejected",
            Event::RebuildConnectFailed { .. } => "rebuild_connect_failed",
            Event::RebuildConnected => "rebuild_connected",
            Event::RebuildSourceFailed { .. } => "rebuild_source_failed",
            Event::RebuildSourceSelected { .. } => "rebuild_source_selected",
            Event::RebuildFailed { .. } => "rebuild_failed",
            Event::RebuildCompleted => "rebuild_completed",
            Event::DivergenceFound { .. } => "divergence_found",
            Event::DivergenceUnusable { .. } => "divergence_unusable",
            Event::PlanTruncateOnly { .. } => "plan_truncate_only",
            Event::PlanCatchup { .. } => "plan_catchup",
            Event::WalPinFailed { .. } => "wal_pin_failed",
            Event::SnapshotPinFailed { .. } => "snapshot_pin_failed",
            Event::PlanRebuildSnapshotTail { .. } => "plan_rebuild_snapshot_tail",
            Event::FullBasePinFailed { .. } => "full_base_pin_failed",
            Event::PlanRebuildFullBase { .. } => "plan_rebuild_full_base",
            Event::PlanCancelled { .. } => "plan_cancelled",
            Event::ExecCatchupStarted { .. } => "exec_catchup_started",
            Event::ExecTruncation { .. } => "exec_truncation",
            Event::ExecBarrier { .. } => "exec_barrier",
            Event::ExecCompleted => "exec_completed",
            Event::ExecResourcesReleased { .. } => "exec_resources_released",
            Event::ExecRebuildStarted { .. } => "exec_rebuild_started",
            Event::ExecBaseInstalled { .. } => "exec_base_installed",
            Event::ExecRebuildCompleted => "exec_rebuild_completed",
        }
    }

    /// The event's detail text, in the reference's format where it had one.
    pub fn detail(&self) -> String {
        match self {
            Event::SenderAdded
            | Event::SenderRemoved
            | Event::Connected
            | Event::RebuildConnected => String::new(),
            Event::SessionInvalidated { reason } => reason.to_string(),
            Event::SessionCreated { kind } | Event::SessionKept { kind } => {
                format!("kind={kind}")
            }
            Event::SessionSuperseded { old, kind } => match old {
                Some(o) => format!("kind={kind} replaced={o}"),
                None => format!("kind={kind}"),
            },
            Event::SessionFailed { error }
            | Event::ConnectFailed { error }
            | Event::HandshakeFailed { error }
            | Event::CatchupBeginFailed { error }
            | Event::CatchupProgressFailed { error }
            | Event::TruncationFailed { error }
            | Event::CompletionRejected { error }
            | Event::RebuildConnectFailed { error }
            | Event::RebuildSourceFailed { error }
            | Event::RebuildFailed { error }
            | Event::WalPinFailed { error }
            | Event::SnapshotPinFailed { error }
            | Event::FullBasePinFailed { error } => error.clone(),
            Event::Handshake { outcome } => format!("outcome={outcome}"),
            Event::Escalated { reason } => format!("needs_rebuild: {reason}"),
            Event::Completed { how } => (*how).to_owned(),
            Event::CatchupStarted { target, tick } => match tick {
                Some(t) => format!("target={target} tick={t}"),
                None => format!("target={target}"),
            },
            Event::BudgetEscalated { violation } => violation.to_string(),
            Event::TruncationRecorded { truncated_to } | Event::ExecTruncation { truncated_to } => {
                format!("truncated_to={truncated_to}")
            }
            Event::RebuildSourceSelected { source, snapshot } => match snapshot {
                Some(s) => format!("source={source} snapshot={s}"),
                None => format!("source={source}"),
            },
            Event::RebuildCompleted | Event::ExecCompleted | Event::ExecRebuildCompleted => {
                "in_sync".to_owned()
            }
            Event::DivergenceFound {
                replica_head,
                point,
            } => format!("replica_head={replica_head} shared_up_to={point}"),
            Event::DivergenceUnusable { detail } => detail.clone(),
            Event::PlanTruncateOnly { truncate_to } => format!("truncate_to={truncate_to}"),
            Event::PlanCatchup { from, to, pin } => {
                format!("replay=({from}, {to}] wal_pin={pin}")
            }
            Event::PlanRebuildSnapshotTail { snapshot, target } => {
                format!("snapshot={snapshot} target={target}")
            }
            Event::PlanRebuildFullBase { reason, committed } => {
                format!("reason={reason} committed={committed}")
            }
            Event::PlanCancelled { reason } | Event::ExecResourcesReleased { reason } => {
                reason.clone()
            }
            Event::ExecCatchupStarted { target, tick } => {
                format!("target={target} tick={tick}")
            }
            Event::ExecBarrier { durable } => format!("durable={durable}"),
            Event::ExecRebuildStarted { source, target } => {
                format!("source={source} target={target}")
            }
            Event::ExecBaseInstalled { base_lsn, bytes } => {
                format!("base_lsn={base_lsn} bytes={bytes}")
            }
        }
    }
}

/// One log record: `(replica, session, event)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryEvent {
    /// The replica.
    pub replica_id: ReplicaId,
    /// The session the event is about, if any.
    pub session_id: Option<SessionId>,
    /// What happened.
    pub event: Event,
}

impl RecoveryEvent {
    /// The event's name.
    pub fn name(&self) -> &'static str {
        self.event.name()
    }
}

impl fmt::Display for RecoveryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sid = self.session_id.map_or(0, SessionId::get);
        write!(
            f,
            "{} session={} {} {}",
            self.replica_id,
            sid,
            self.event.name(),
            self.event.detail()
        )
    }
}

/// The default number of events kept before the oldest are dropped.
pub const DEFAULT_LOG_CAPACITY: usize = 100_000;

#[derive(Debug)]
struct LogInner {
    events: VecDeque<RecoveryEvent>,
    dropped: u64,
}

/// A bounded, thread-safe, append-only event log. Readers get copies. The lock is a leaf:
/// nothing else is locked while it is held.
#[derive(Debug)]
pub struct RecoveryLog {
    capacity: usize,
    inner: Mutex<LogInner>,
}

impl Default for RecoveryLog {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_LOG_CAPACITY)
    }
}

impl RecoveryLog {
    /// An empty log with the default capacity.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty log that keeps at most `capacity` events (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        RecoveryLog {
            capacity: capacity.max(1),
            inner: Mutex::new(LogInner {
                events: VecDeque::new(),
                dropped: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event (and mirrors it to the `log` crate at debug level).
    pub fn record(&self, replica_id: &ReplicaId, session_id: Option<SessionId>, event: Event) {
        let ev = RecoveryEvent {
            replica_id: replica_id.clone(),
            session_id,
            event,
        };
        log::debug!("recovery: {ev}");
        let mut g = self.lock();
        if g.events.len() == self.capacity {
            g.events.pop_front();
            g.dropped += 1;
        }
        g.events.push_back(ev);
    }

    /// A copy of every retained event, oldest first.
    pub fn events(&self) -> Vec<RecoveryEvent> {
        self.lock().events.iter().cloned().collect()
    }

    /// A copy of the events of one replica.
    pub fn events_for(&self, replica_id: &ReplicaId) -> Vec<RecoveryEvent> {
        self.lock()
            .events
            .iter()
            .filter(|e| &e.replica_id == replica_id)
            .cloned()
            .collect()
    }

    /// Names of every retained event, oldest first.
    pub fn names(&self) -> Vec<&'static str> {
        self.lock().events.iter().map(RecoveryEvent::name).collect()
    }

    /// True when an event with this name was recorded.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().events.iter().any(|e| e.name() == name)
    }

    /// The first event with this name, if any.
    pub fn find(&self, name: &str) -> Option<RecoveryEvent> {
        self.lock()
            .events
            .iter()
            .find(|e| e.name() == name)
            .cloned()
    }

    /// Number of retained events.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// True when no event is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_log_drops_oldest() {
        let log = RecoveryLog::with_capacity(2);
        let r = ReplicaId::new("r").unwrap();
        log.record(&r, None, Event::SenderAdded);
        log.record(&r, None, Event::Connected);
        log.record(&r, None, Event::SenderRemoved);
        assert_eq!(log.names(), vec!["connected", "sender_removed"]);
        assert_eq!(log.dropped(), 1);
    }

    #[test]
    fn events_returns_a_copy() {
        let log = RecoveryLog::new();
        let r = ReplicaId::new("r").unwrap();
        log.record(&r, None, Event::SenderAdded);
        let mut copy = log.events();
        copy.clear();
        assert_eq!(log.len(), 1);
    }
}
