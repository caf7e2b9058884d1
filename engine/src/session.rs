//! Recovery sessions: the unit of authority for one recovery attempt.
//!
//! A session is owned by exactly one [`Sender`](crate::Sender) and never handed out; callers see
//! it only through [`SessionSnapshot`], a copy that shares nothing with the live session.

use std::fmt;
use std::sync::atomic::Ordering;

use crate::sync::AtomicU64;

use crate::budget::{BudgetCheck, BudgetViolation, CatchUpBudget};
use crate::error::{EngineError, Result};
use crate::rebuild::{RebuildPhase, RebuildSource, RebuildState};
use crate::types::{Epoch, Lsn, ReplicaId, SessionId, SessionKind, SessionPhase, Tick};

/// Hands out session IDs. One source per registry, so IDs are unique within a volume and a run
/// is deterministic (the reference used one process-wide counter).
#[derive(Debug, Default)]
pub struct SessionIdSource {
    last: AtomicU64,
}

impl SessionIdSource {
    /// A source whose first ID is 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next ID. IDs start at 1 and do not repeat before the 64-bit counter wraps (which
    /// cannot happen in practice; if it did, zero would be skipped).
    pub fn next_id(&self) -> SessionId {
        let prev = self.last.fetch_add(1, Ordering::Relaxed);
        // 2^64 sessions cannot be created in practice; should the counter ever wrap, zero is
        // skipped rather than handed out.
        SessionId::new(prev.wrapping_add(1)).unwrap_or(SessionId::MIN)
    }
}

/// Why a session stopped being active without completing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidateReason {
    /// The sender's epoch advanced past the session's.
    EpochAdvanced {
        /// The session's epoch.
        from: Epoch,
        /// The new epoch.
        to: Epoch,
    },
    /// The replica's endpoint changed.
    EndpointChanged,
    /// The sender was stopped.
    SenderStopped,
    /// The handshake showed the gap is beyond retention.
    GapExceedsRetention,
    /// The catch-up budget was exceeded.
    Budget(BudgetViolation),
    /// A new assignment replaced the session.
    AssignmentIntent,
    /// `Registry::invalidate_epoch` fenced the session.
    EpochBump,
    /// The WAL retention pin could not be acquired for a catch-up.
    WalPinFailed,
    /// The WAL retention pin could not be acquired for a snapshot + tail rebuild.
    WalPinFailedDuringRebuild,
    /// The snapshot pin could not be acquired.
    SnapshotPinFailed,
    /// The full-base pin could not be acquired.
    FullBasePinFailed,
    /// The handshake could not be recorded.
    HandshakeFailed,
    /// An executor failed; the text is the executor's release reason.
    ExecutionFailed(String),
    /// A plan was cancelled; the text is the caller's reason.
    Cancelled(String),
    /// A plan was dropped without being executed or cancelled.
    PlanDropped,
    /// An executor unwound (a panic in its I/O or hook) before finishing.
    ExecutorAborted,
    /// Any other reason a caller gives.
    Other(String),
}

impl fmt::Display for InvalidateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidateReason::EpochAdvanced { from, to } => {
                write!(f, "epoch_advanced_{from}_to_{to}")
            }
            InvalidateReason::EndpointChanged => f.write_str("endpoint_changed"),
            InvalidateReason::SenderStopped => f.write_str("sender_stopped"),
            InvalidateReason::GapExceedsRetention => f.write_str("gap_exceeds_retention"),
            InvalidateReason::Budget(v) => write!(f, "budget_{v}"),
            InvalidateReason::AssignmentIntent => f.write_str("assignment_intent"),
            InvalidateReason::EpochBump => f.write_str("epoch_bump"),
            InvalidateReason::WalPinFailed => f.write_str("wal_pin_failed"),
            InvalidateReason::WalPinFailedDuringRebuild => {
                f.write_str("wal_pin_failed_during_rebuild")
            }
            InvalidateReason::SnapshotPinFailed => f.write_str("snapshot_pin_failed"),
            InvalidateReason::FullBasePinFailed => f.write_str("full_base_pin_failed"),
            InvalidateReason::HandshakeFailed => f.write_str("handshake_failed"),
            InvalidateReason::ExecutionFailed(r) => write!(f, "execution_failed: {r}"),
            InvalidateReason::Cancelled(r) => write!(f, "cancelled: {r}"),
            InvalidateReason::PlanDropped => f.write_str("plan_dropped"),
            InvalidateReason::ExecutorAborted => f.write_str("executor_aborted"),
            InvalidateReason::Other(r) => f.write_str(r),
        }
    }
}

impl From<&str> for InvalidateReason {
    fn from(s: &str) -> Self {
        InvalidateReason::Other(s.to_owned())
    }
}

/// Options for a new session.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// The catch-up budget, if any.
    pub budget: Option<CatchUpBudget>,
}

impl SessionOptions {
    /// Options with a budget (the reference's `WithBudget`).
    pub fn with_budget(budget: CatchUpBudget) -> Self {
        SessionOptions {
            budget: Some(budget),
        }
    }
}

/// A live session. Crate-private: only the owning sender mutates it.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) replica_id: ReplicaId,
    pub(crate) epoch: Epoch,
    pub(crate) endpoint_version: u64,
    pub(crate) kind: SessionKind,
    pub(crate) phase: SessionPhase,
    pub(crate) invalidate_reason: Option<InvalidateReason>,
    /// The handshake range `(start, target]`; `None` before the handshake.
    pub(crate) range: Option<(Lsn, Lsn)>,
    /// Set by `begin_catch_up`; progress beyond it is refused.
    pub(crate) frozen_target: Option<Lsn>,
    /// Invariant: `start <= recovered_to`, and it only rises.
    pub(crate) recovered_to: Lsn,
    pub(crate) truncate_to: Option<Lsn>,
    pub(crate) truncate_recorded: bool,
    /// The replica's durable LSN from the last barrier.
    pub(crate) durable: Option<Lsn>,
    pub(crate) budget: Option<CatchUpBudget>,
    pub(crate) tracker: BudgetCheck,
    pub(crate) rebuild: Option<RebuildState>,
    /// The handshake range came from a recoverability proof (not a caller-stated range), so
    /// a zero gap may complete without a barrier.
    pub(crate) proven: bool,
    /// A plan holds this session; a second planner is refused.
    pub(crate) planned: bool,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        replica_id: ReplicaId,
        epoch: Epoch,
        endpoint_version: u64,
        kind: SessionKind,
        opts: SessionOptions,
    ) -> Self {
        Session {
            id,
            replica_id,
            epoch,
            endpoint_version,
            kind,
            phase: SessionPhase::Init,
            invalidate_reason: None,
            range: None,
            frozen_target: None,
            recovered_to: Lsn::ZERO,
            truncate_to: None,
            truncate_recorded: false,
            durable: None,
            budget: opts.budget,
            tracker: BudgetCheck::default(),
            rebuild: (kind == SessionKind::Rebuild).then(RebuildState::new),
            proven: false,
            planned: false,
        }
    }

    pub(crate) fn active(&self) -> bool {
        !self.phase.is_terminal()
    }

    /// The handshake target, once known.
    pub(crate) fn target(&self) -> Option<Lsn> {
        self.range.map(|(_, t)| t)
    }

    /// True once the handshake range is set and progress reached its target. A target of 0
    /// converges like any other (the reference's 0 sentinel could not).
    pub(crate) fn converged(&self) -> bool {
        self.range.is_some_and(|(_, t)| self.recovered_to >= t)
    }

    /// Moves along the transition table.
    pub(crate) fn advance(&mut self, to: SessionPhase) -> Result<()> {
        if !self.active() {
            return Err(EngineError::SessionNotActive {
                replica: self.replica_id.clone(),
                session: self.id,
                phase: self.phase,
            });
        }
        if !self.phase.can_advance_to(to) {
            return Err(EngineError::InvalidTransition {
                session: self.id,
                from: self.phase,
                to,
            });
        }
        self.phase = to;
        Ok(())
    }

    /// Sets the handshake range; progress counting starts at `start`, so the replica's
    /// existing prefix is never counted as replayed work.
    pub(crate) fn set_range(&mut self, start: Lsn, target: Lsn) {
        self.range = Some((start, target));
        self.recovered_to = start;
    }

    /// Invalidates an active session; a terminal session keeps its first outcome.
    pub(crate) fn invalidate(&mut self, reason: InvalidateReason) {
        if !self.active() {
            return;
        }
        if let Some(rebuild) = self.rebuild.as_mut() {
            rebuild.abort(reason.to_string());
        }
        self.phase = SessionPhase::Invalidated;
        self.invalidate_reason = Some(reason);
    }

    pub(crate) fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            id: self.id,
            replica_id: self.replica_id.clone(),
            epoch: self.epoch,
            endpoint_version: self.endpoint_version,
            kind: self.kind,
            phase: self.phase,
            active: self.active(),
            invalidate_reason: self.invalidate_reason.clone(),
            start_lsn: self.range.map(|(s, _)| s),
            target_lsn: self.target(),
            frozen_target_lsn: self.frozen_target,
            recovered_to: self.recovered_to,
            truncate_required: self.truncate_to.is_some(),
            truncate_to_lsn: self.truncate_to,
            truncate_recorded: self.truncate_recorded,
            durable_lsn: self.durable,
            budget: self.budget,
            entries_replayed: self.tracker.entries_replayed,
            start_tick: self.tracker.start_tick,
            last_progress_tick: self.tracker.last_progress_tick,
            rebuild_source: self.rebuild.as_ref().and_then(RebuildState::source),
            rebuild_phase: self.rebuild.as_ref().map(RebuildState::phase),
            rebuild_transferred_to: self.rebuild.as_ref().and_then(RebuildState::transferred_to),
            rebuild_tail_replayed_to: self
                .rebuild
                .as_ref()
                .and_then(RebuildState::tail_replayed_to),
        }
    }
}

/// A read-only copy of a session. Changing it changes nothing in the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// Session ID.
    pub id: SessionId,
    /// The replica it belongs to.
    pub replica_id: ReplicaId,
    /// The epoch it was created under.
    pub epoch: Epoch,
    /// The endpoint version it was created under.
    pub endpoint_version: u64,
    /// Kind.
    pub kind: SessionKind,
    /// Phase.
    pub phase: SessionPhase,
    /// Whether the phase is non-terminal.
    pub active: bool,
    /// Why it was invalidated, if it was.
    pub invalidate_reason: Option<InvalidateReason>,
    /// Handshake range start (exclusive).
    pub start_lsn: Option<Lsn>,
    /// Handshake range end (inclusive).
    pub target_lsn: Option<Lsn>,
    /// The frozen catch-up target.
    pub frozen_target_lsn: Option<Lsn>,
    /// Progress so far (starts at `start_lsn`).
    pub recovered_to: Lsn,
    /// Whether the replica must truncate.
    pub truncate_required: bool,
    /// Where it must truncate to.
    pub truncate_to_lsn: Option<Lsn>,
    /// Whether the truncation was executed and recorded.
    pub truncate_recorded: bool,
    /// The replica's durable LSN from the last barrier.
    pub durable_lsn: Option<Lsn>,
    /// The session's budget.
    pub budget: Option<CatchUpBudget>,
    /// Entries replayed by this session (the catch-up delta only).
    pub entries_replayed: u64,
    /// Catch-up start tick.
    pub start_tick: Option<Tick>,
    /// Tick of the last progress report.
    pub last_progress_tick: Option<Tick>,
    /// Rebuild source, for rebuild sessions past source selection.
    pub rebuild_source: Option<RebuildSource>,
    /// Rebuild phase, for rebuild sessions.
    pub rebuild_phase: Option<RebuildPhase>,
    /// Base progress of a rebuild.
    pub rebuild_transferred_to: Option<Lsn>,
    /// Tail progress of a rebuild.
    pub rebuild_tail_replayed_to: Option<Lsn>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_increase() {
        let src = SessionIdSource::new();
        assert_eq!(src.next_id().get(), 1);
        assert_eq!(src.next_id().get(), 2);
    }

    #[test]
    fn invalidate_keeps_first_reason() {
        let mut s = Session::new(
            SessionId::new(1).unwrap(),
            ReplicaId::new("r1").unwrap(),
            Epoch(1),
            0,
            SessionKind::Rebuild,
            SessionOptions::default(),
        );
        s.invalidate(InvalidateReason::EpochBump);
        s.invalidate(InvalidateReason::SenderStopped);
        assert_eq!(s.invalidate_reason, Some(InvalidateReason::EpochBump));
        assert_eq!(
            s.rebuild.as_ref().map(RebuildState::phase),
            Some(RebuildPhase::Aborted)
        );
        assert!(s.advance(SessionPhase::Connecting).is_err());
    }

    #[test]
    fn reason_names_match_reference() {
        assert_eq!(
            InvalidateReason::EpochAdvanced {
                from: Epoch(1),
                to: Epoch(2)
            }
            .to_string(),
            "epoch_advanced_1_to_2"
        );
        assert_eq!(
            InvalidateReason::Budget(BudgetViolation::DurationExceeded).to_string(),
            "budget_duration_exceeded"
        );
    }
}
