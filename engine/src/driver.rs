//! The recovery driver: turns a handshake into a plan, binds every value the executor needs at
//! plan time, and acquires the pins the plan needs. A plan owns its pins.

use std::sync::Arc;

use crate::adapter::{FullBasePin, RetentionPin, SnapshotPin, StorageAdapter};
use crate::error::{EngineError, PinKind, Result, StorageError};
use crate::history::{
    EntryId, ProofReason, RebuildReason, RecoverabilityProof, ReplicaHandshake, RetainedHistory,
};
use crate::observe::Event;
use crate::orchestrator::RecoveryOrchestrator;
use crate::outcome::Outcome;
use crate::rebuild::RebuildSource;
use crate::session::InvalidateReason;
use crate::types::{Demotion, Lsn, ReplicaId, SessionId, SessionKind, SessionPhase};

/// Everything an executor needs, fixed when the plan is made. The executor never re-derives
/// policy from storage.
#[derive(Debug)]
pub struct RecoveryPlan {
    /// The replica.
    pub replica_id: ReplicaId,
    /// The session the plan belongs to; `None` when the plan needed no session afterwards
    /// (zero gap completed at once, or escalated to rebuild).
    pub session_id: Option<SessionId>,
    /// The handshake outcome.
    pub outcome: Outcome,
    /// The recoverability proof (catch-up plans).
    pub proof: Option<RecoverabilityProof>,
    /// WAL pin: catch-up from `catch_up_start_lsn`, or the tail of a snapshot + tail rebuild.
    pub retention_pin: Option<RetentionPin>,
    /// Snapshot pin of a snapshot + tail rebuild.
    pub snapshot_pin: Option<SnapshotPin>,
    /// Full-base pin of a full-base rebuild.
    pub full_base_pin: Option<FullBasePin>,
    /// The replica's flushed LSN at the handshake.
    pub catch_up_start_lsn: Option<Lsn>,
    /// The frozen catch-up target (committed at plan time).
    pub catch_up_target: Option<Lsn>,
    /// Truncation point when the replica is ahead of committed.
    pub truncate_lsn: Option<Lsn>,
    /// Whether the replica reported its tip identity, so its log is matched against the
    /// primary's (at the handshake for catch-up, after the truncation for truncate plans).
    pub verified: bool,
    /// The primary's entry at the truncation point: the replica's tip after truncating must
    /// be this entry (checked when `verified`).
    pub truncate_anchor: Option<EntryId>,
    /// The rebuild source.
    pub rebuild_source: Option<RebuildSource>,
    /// The snapshot LSN of a snapshot + tail rebuild.
    pub rebuild_snapshot_lsn: Option<Lsn>,
    /// The rebuild target (committed at plan time).
    pub rebuild_target_lsn: Option<Lsn>,
    /// Why the rebuild uses its source.
    pub rebuild_reason: Option<RebuildReason>,
    /// Ends the session if the plan is dropped unexecuted (see [`RecoveryPlan`]'s `Drop`).
    guard: PlanGuard,
}

/// What a plan does with its session when it is dropped without an executor finishing it or
/// `cancel_plan`: the session is fenced (`plan_dropped`, or `executor_aborted` when an
/// executor owned the plan and unwound), so the replica is left `disconnected` (or
/// `needs_rebuild` for a rebuild) and a re-delivered assignment can start over. Without this
/// the session stayed in `handshake`, was kept by the next assignment, and could never be
/// planned again.
#[derive(Debug, Default)]
struct PlanGuard {
    /// The orchestrator and the plan's session. The session ID is kept here, privately, and
    /// not read from the plan's public `session_id` field, which a caller could overwrite to
    /// make the drop fence someone else's session.
    armed: Option<(std::sync::Arc<RecoveryOrchestrator>, SessionId)>,
    reason: Option<InvalidateReason>,
}

impl Drop for RecoveryPlan {
    fn drop(&mut self) {
        self.release_pins();
        let Some((orch, sid)) = self.guard.armed.take() else {
            return;
        };
        let reason = self
            .guard
            .reason
            .take()
            .unwrap_or(InvalidateReason::PlanDropped);
        if let Some(sender) = orch.registry().sender(&self.replica_id)
            && let Some(inv) = sender.fence_session_if(sid, reason.clone())
        {
            orch.log_invalidation(&inv);
            orch.log().record(
                &self.replica_id,
                Some(sid),
                Event::PlanCancelled {
                    reason: reason.to_string(),
                },
            );
        }
    }
}

impl RecoveryPlan {
    fn new(replica_id: ReplicaId, session_id: Option<SessionId>, outcome: Outcome) -> Self {
        RecoveryPlan {
            replica_id,
            session_id,
            outcome,
            proof: None,
            retention_pin: None,
            snapshot_pin: None,
            full_base_pin: None,
            catch_up_start_lsn: None,
            catch_up_target: None,
            truncate_lsn: None,
            verified: false,
            truncate_anchor: None,
            rebuild_source: None,
            rebuild_snapshot_lsn: None,
            rebuild_target_lsn: None,
            rebuild_reason: None,
            guard: PlanGuard::default(),
        }
    }

    /// Makes the plan end its session if it is dropped unfinished.
    fn arm(&mut self, orch: &Arc<RecoveryOrchestrator>, sid: SessionId) {
        self.guard.armed = Some((Arc::clone(orch), sid));
    }

    /// The executor that owns the plan now ends the session itself (or finished it).
    pub(crate) fn disarm(&mut self) {
        self.guard.armed = None;
    }

    /// The reason a drop gives: an executor that owns the plan and unwinds aborted it.
    pub(crate) fn set_drop_reason(&mut self, reason: InvalidateReason) {
        self.guard.reason = Some(reason);
    }

    /// How many pins the plan still holds.
    pub fn pins_held(&self) -> usize {
        usize::from(self.retention_pin.is_some())
            + usize::from(self.snapshot_pin.is_some())
            + usize::from(self.full_base_pin.is_some())
    }

    /// Drops every pin (WAL, then snapshot, then full base). Safe to call more than once.
    pub fn release_pins(&mut self) {
        self.retention_pin = None;
        self.snapshot_pin = None;
        self.full_base_pin = None;
    }
}

/// Plans recoveries for one volume against its storage.
pub struct RecoveryDriver {
    orchestrator: Arc<RecoveryOrchestrator>,
    storage: Arc<dyn StorageAdapter>,
}

impl std::fmt::Debug for RecoveryDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryDriver")
            .field("orchestrator", &self.orchestrator)
            .finish_non_exhaustive()
    }
}

impl RecoveryDriver {
    /// A driver with a fresh orchestrator.
    pub fn new(storage: Arc<dyn StorageAdapter>) -> Self {
        Self::with_orchestrator(Arc::new(RecoveryOrchestrator::new()), storage)
    }

    /// A driver over an existing orchestrator (one orchestrator per volume).
    pub fn with_orchestrator(
        orchestrator: Arc<RecoveryOrchestrator>,
        storage: Arc<dyn StorageAdapter>,
    ) -> Self {
        RecoveryDriver {
            orchestrator,
            storage,
        }
    }

    /// The orchestrator.
    pub fn orchestrator(&self) -> &Arc<RecoveryOrchestrator> {
        &self.orchestrator
    }

    /// The storage adapter.
    pub fn storage(&self) -> &Arc<dyn StorageAdapter> {
        &self.storage
    }

    /// Invalidates the session `sid` if it is still current, demotes the replica and logs
    /// it; returns whether it did.
    fn fail_session(
        &self,
        id: &ReplicaId,
        sid: SessionId,
        reason: InvalidateReason,
        to: Demotion,
    ) -> bool {
        let inv = self
            .orchestrator
            .registry()
            .sender(id)
            .and_then(|sender| sender.invalidate_session_if(sid, reason, to));
        if let Some(inv) = &inv {
            self.orchestrator.log_invalidation(inv);
        }
        inv.is_some()
    }

    /// One history snapshot, refused when it breaks the storage contract (for rebuild plans,
    /// which do not go through the orchestrator's handshake).
    fn history(&self) -> Result<RetainedHistory> {
        let history = self
            .storage
            .get_retained_history()
            .map_err(EngineError::HistoryUnavailable)?;
        history
            .check_consistent()
            .map_err(EngineError::InconsistentHistory)?;
        Ok(history)
    }

    /// A WAL pin that keeps at least `(after, ..]`; a pin starting later is released and
    /// refused.
    fn pin_wal(&self, after: Lsn) -> std::result::Result<RetentionPin, StorageError> {
        let pin = self.storage.pin_wal_retention(after)?;
        if pin.start_lsn > after {
            return Err(StorageError::WrongPin {
                requested: after,
                pinned: pin.start_lsn,
            });
        }
        Ok(pin)
    }

    /// A snapshot pin at exactly `lsn`.
    fn pin_snapshot(&self, lsn: Lsn) -> std::result::Result<SnapshotPin, StorageError> {
        let pin = self.storage.pin_snapshot(lsn)?;
        if pin.lsn != lsn {
            return Err(StorageError::WrongPin {
                requested: lsn,
                pinned: pin.lsn,
            });
        }
        Ok(pin)
    }

    /// A full-base pin at exactly `lsn`.
    fn pin_full_base(&self, lsn: Lsn) -> std::result::Result<FullBasePin, StorageError> {
        let pin = self.storage.pin_full_base(lsn)?;
        if pin.committed_lsn != lsn {
            return Err(StorageError::WrongPin {
                requested: lsn,
                pinned: pin.committed_lsn,
            });
        }
        Ok(pin)
    }

    /// The primary's entry at `lsn`, refused when storage answers with another LSN's entry.
    fn entry_at(&self, lsn: Lsn) -> Result<Option<EntryId>> {
        let entry = self
            .storage
            .entry_id(lsn)
            .map_err(EngineError::HistoryUnavailable)?;
        match entry {
            Some(e) if e.lsn != lsn => Err(EngineError::WrongEntry {
                requested: lsn,
                returned: e.lsn,
            }),
            other => Ok(other),
        }
    }

    /// Plans the recovery of a replica that reports `replica` at its handshake (a plain `Lsn`
    /// converts to an unverified handshake).
    ///
    /// Reads one history snapshot and runs the handshake through the orchestrator. When the
    /// replica reported its tip identity, the primary's entry at F is looked up and the two
    /// logs are matched: a replica whose tip differs is not recoverable by catch-up (even at a
    /// zero gap) and escalates to rebuild. A zero gap
    /// is already complete (nothing pinned). A catch-up binds its range `(F, C]` and pins the
    /// WAL after F; a replica ahead of C gets a truncation-only plan with no pin. A pin failure
    /// invalidates the session (`wal_pin_failed`, state `disconnected`) so no live session is
    /// left without its resources (`needs_rebuild` when the range was recycled between the history
    /// read and the pin, `disconnected` otherwise). A needs-rebuild plan holds nothing: a rebuild assignment
    /// must come first.
    pub fn plan_recovery(
        &self,
        id: &ReplicaId,
        replica: impl Into<ReplicaHandshake>,
    ) -> Result<RecoveryPlan> {
        let replica = replica.into();
        let replica_flushed = replica.flushed;
        // One history snapshot and the primary's entry at F, both checked by the orchestrator
        // (storage contract, anchor at F) before anything is decided from them.
        let history = self
            .storage
            .get_retained_history()
            .map_err(EngineError::HistoryUnavailable)?;
        let verified = replica.tip.is_some();
        let primary_at_flushed = if verified && replica_flushed <= history.committed_lsn {
            self.storage
                .entry_id(replica_flushed)
                .map_err(EngineError::HistoryUnavailable)?
        } else {
            None
        };
        let result = self.orchestrator.execute_recovery_with_anchor(
            id,
            &replica,
            &history,
            primary_at_flushed,
        )?;
        // The plan carries the session its handshake ran under, never whatever session the
        // sender holds by now (another thread may have attached one since a zero gap
        // completed, and cancelling this plan must not touch it).
        let sid = result.session_id;
        let mut plan = RecoveryPlan::new(id.clone(), Some(sid), result.outcome);
        plan.proof = Some(result.proof.clone());
        plan.verified = verified;
        if result.outcome != Outcome::CatchUp {
            return Ok(plan);
        }
        plan.arm(&self.orchestrator, sid);
        let committed = history.committed_lsn;
        plan.catch_up_start_lsn = Some(replica_flushed);
        plan.catch_up_target = Some(committed);
        let log = self.orchestrator.log();
        if matches!(
            result.proof.reason,
            ProofReason::ReplicaAheadNeedsTruncation { .. }
        ) {
            plan.truncate_lsn = Some(committed);
            if verified {
                match self.entry_at(committed) {
                    Ok(anchor) => plan.truncate_anchor = anchor,
                    Err(e) => {
                        plan.disarm();
                        self.fail_session(
                            id,
                            sid,
                            InvalidateReason::HandshakeFailed,
                            Demotion::Disconnected,
                        );
                        return Err(e);
                    }
                }
            }
            log.record(
                id,
                Some(sid),
                Event::PlanTruncateOnly {
                    truncate_to: committed,
                },
            );
            return Ok(plan);
        }
        match self.pin_wal(replica_flushed) {
            Ok(pin) => {
                log.record(
                    id,
                    Some(sid),
                    Event::PlanCatchup {
                        from: replica_flushed,
                        to: committed,
                        pin: pin.pin_id.0,
                    },
                );
                plan.retention_pin = Some(pin);
                Ok(plan)
            }
            Err(e) => {
                log.record(
                    id,
                    Some(sid),
                    Event::WalPinFailed {
                        error: e.to_string(),
                    },
                );
                // The history said the range was retained, but the storage recycled it before
                // the pin could be taken (a race with the flusher): the replica is now beyond
                // retention and only a rebuild can help. Any other pin failure is transient.
                let state = if matches!(e, StorageError::Recycled { .. }) {
                    Demotion::NeedsRebuild
                } else {
                    Demotion::Disconnected
                };
                plan.disarm();
                self.fail_session(id, sid, InvalidateReason::WalPinFailed, state);
                Err(EngineError::PinFailed {
                    kind: PinKind::WalRetention,
                    error: e,
                })
            }
        }
    }

    /// Plans a rebuild for a replica whose current session is a rebuild session still in
    /// `init`. Chooses the source from one history snapshot and pins what it needs:
    /// snapshot + tail pins the snapshot and the WAL after it (releasing the snapshot pin if
    /// the WAL pin fails); full base pins a base image at committed. Any pin failure
    /// invalidates the session with the pin's reason and leaves the replica `needs_rebuild`.
    pub fn plan_rebuild(&self, id: &ReplicaId) -> Result<RecoveryPlan> {
        let sender = self.orchestrator.sender(id)?;
        let snap = sender
            .session_snapshot()
            .ok_or_else(|| EngineError::NoSession {
                replica: id.clone(),
            })?;
        if snap.kind != SessionKind::Rebuild {
            return Err(EngineError::WrongSessionKind {
                session: snap.id,
                kind: snap.kind,
                operation: "plan_rebuild",
            });
        }
        if snap.phase != SessionPhase::Init {
            return Err(EngineError::WrongPhase {
                session: snap.id,
                operation: "plan_rebuild",
                expected: SessionPhase::Init,
                found: snap.phase,
            });
        }
        let sid = snap.id;
        // Claim the session before anything else: of two planners racing for it, the second
        // is refused here and leaves it alone.
        sender.claim_plan(sid)?;
        let mut plan = RecoveryPlan::new(id.clone(), Some(sid), Outcome::NeedsRebuild);
        plan.arm(&self.orchestrator, sid);
        let history = self.history()?;
        let decision = history.rebuild_source_decision();
        let committed = history.committed_lsn;
        plan.rebuild_source = Some(decision.source);
        plan.rebuild_snapshot_lsn = decision.snapshot_lsn;
        plan.rebuild_target_lsn = Some(committed);
        plan.rebuild_reason = Some(decision.reason.clone());
        let log = self.orchestrator.log();

        match (decision.source, decision.snapshot_lsn) {
            (RebuildSource::SnapshotTail, Some(snap_lsn)) => {
                let snapshot_pin = match self.pin_snapshot(snap_lsn) {
                    Ok(p) => p,
                    Err(e) => {
                        log.record(
                            id,
                            Some(sid),
                            Event::SnapshotPinFailed {
                                error: e.to_string(),
                            },
                        );
                        plan.disarm();
                        self.fail_session(
                            id,
                            sid,
                            InvalidateReason::SnapshotPinFailed,
                            Demotion::NeedsRebuild,
                        );
                        return Err(EngineError::PinFailed {
                            kind: PinKind::Snapshot,
                            error: e,
                        });
                    }
                };
                let wal_pin = match self.pin_wal(snap_lsn) {
                    Ok(p) => p,
                    Err(e) => {
                        drop(snapshot_pin);
                        log.record(
                            id,
                            Some(sid),
                            Event::WalPinFailed {
                                error: e.to_string(),
                            },
                        );
                        plan.disarm();
                        self.fail_session(
                            id,
                            sid,
                            InvalidateReason::WalPinFailedDuringRebuild,
                            Demotion::NeedsRebuild,
                        );
                        return Err(EngineError::PinFailed {
                            kind: PinKind::WalRetention,
                            error: e,
                        });
                    }
                };
                plan.snapshot_pin = Some(snapshot_pin);
                plan.retention_pin = Some(wal_pin);
                log.record(
                    id,
                    Some(sid),
                    Event::PlanRebuildSnapshotTail {
                        snapshot: snap_lsn,
                        target: committed,
                    },
                );
            }
            _ => match self.pin_full_base(committed) {
                Ok(p) => {
                    plan.full_base_pin = Some(p);
                    log.record(
                        id,
                        Some(sid),
                        Event::PlanRebuildFullBase {
                            reason: decision.reason,
                            committed,
                        },
                    );
                }
                Err(e) => {
                    log.record(
                        id,
                        Some(sid),
                        Event::FullBasePinFailed {
                            error: e.to_string(),
                        },
                    );
                    plan.disarm();
                    self.fail_session(
                        id,
                        sid,
                        InvalidateReason::FullBasePinFailed,
                        Demotion::NeedsRebuild,
                    );
                    return Err(EngineError::PinFailed {
                        kind: PinKind::FullBase,
                        error: e,
                    });
                }
            },
        }
        Ok(plan)
    }

    /// Releases the plan's pins and, if the plan's session is still the sender's current
    /// session, invalidates it (`cancelled: <reason>`, state `disconnected`). A finished plan (a
    /// zero gap that completed, or a needs-rebuild outcome) names a session that is no longer
    /// current, so cancelling it changes no state: it cannot end a session another thread
    /// attached since, nor demote an in-sync replica. Always logs `plan_cancelled`. Returns
    /// whether a session was invalidated.
    pub fn cancel_plan(&self, plan: &mut RecoveryPlan, reason: &str) -> bool {
        self.release_plan(plan);
        plan.disarm();
        let invalidated = plan.session_id.is_some_and(|sid| {
            self.fail_session(
                &plan.replica_id,
                sid,
                InvalidateReason::Cancelled(reason.to_owned()),
                Demotion::Disconnected,
            )
        });
        self.orchestrator.log().record(
            &plan.replica_id,
            plan.session_id,
            Event::PlanCancelled {
                reason: reason.to_owned(),
            },
        );
        invalidated
    }

    /// Cancels a recovery that an executor is running: invalidates the session if it is still
    /// `session_id`, so the executor stops at its next authority check and releases its pins.
    /// Returns whether the session was invalidated.
    pub fn cancel_session(&self, id: &ReplicaId, session_id: SessionId, reason: &str) -> bool {
        let reason_of = InvalidateReason::Cancelled(reason.to_owned());
        if !self.fail_session(id, session_id, reason_of, Demotion::Disconnected) {
            return false;
        }
        self.orchestrator.log().record(
            id,
            Some(session_id),
            Event::PlanCancelled {
                reason: reason.to_owned(),
            },
        );
        true
    }

    /// Releases every pin of the plan (WAL, snapshot, full base). Safe to call more than once.
    pub fn release_plan(&self, plan: &mut RecoveryPlan) {
        plan.release_pins();
    }
}
