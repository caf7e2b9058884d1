//! The orchestrator: the registry of one volume plus its event log, and the stepwise tasks that
//! change them (assignments, handshakes, epoch changes), each of which logs what it decided.

use crate::error::{EngineError, Result};
use crate::history::{
    AnchorCheck, DivergencePoint, EntryId, RecoverabilityProof, ReplicaHandshake, RetainedHistory,
};
use crate::observe::{Event, RecoveryLog};
use crate::outcome::Outcome;
use crate::registry::{AssignmentIntent, AssignmentResult, Registry};
use crate::sender::{Invalidation, Sender};
use crate::session::InvalidateReason;
use crate::types::{Demotion, Epoch, ReplicaId, ReplicaState, SessionId, SessionKind};

/// The result of [`RecoveryOrchestrator::execute_recovery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryResult {
    /// The replica.
    pub replica_id: ReplicaId,
    /// The session the handshake ran under (finished already for a zero gap or a
    /// needs-rebuild outcome).
    pub session_id: SessionId,
    /// The handshake outcome.
    pub outcome: Outcome,
    /// The recoverability proof the outcome came from.
    pub proof: RecoverabilityProof,
    /// The replica state afterwards.
    pub final_state: ReplicaState,
}

/// One volume's registry and event log. Thread-safe.
#[derive(Debug, Default)]
pub struct RecoveryOrchestrator {
    registry: Registry,
    log: RecoveryLog,
}

impl RecoveryOrchestrator {
    /// An empty registry and log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The event log.
    pub fn log(&self) -> &RecoveryLog {
        &self.log
    }

    pub(crate) fn log_invalidation(&self, inv: &Invalidation) {
        self.log.record(
            &inv.replica_id,
            Some(inv.session_id),
            Event::SessionInvalidated {
                reason: inv.reason.clone(),
            },
        );
    }

    /// The sender for `id`, or [`EngineError::SenderNotFound`].
    pub fn sender(&self, id: &ReplicaId) -> Result<std::sync::Arc<Sender>> {
        self.registry
            .sender(id)
            .ok_or_else(|| EngineError::SenderNotFound {
                replica: id.clone(),
            })
    }

    /// Applies an assignment and logs everything it changed: `sender_added`,
    /// `sender_removed`, `session_invalidated` for every session that lost its authority
    /// (endpoint change, epoch advance, removal: the reference logged only endpoint changes),
    /// then `session_created` / `session_superseded` (with the new ID) / `session_kept` /
    /// `session_failed`. A stale intent is refused whole and logs nothing.
    pub fn process_assignment(&self, intent: &AssignmentIntent) -> Result<AssignmentResult> {
        let result = self.registry.apply_assignment(intent)?;
        for id in &result.added {
            self.log.record(id, None, Event::SenderAdded);
        }
        for id in &result.removed {
            self.log.record(id, None, Event::SenderRemoved);
        }
        for inv in &result.invalidated {
            self.log_invalidation(inv);
        }
        for (id, sid) in &result.sessions_created {
            let kind = intent.recovery_targets.get(id).copied();
            if let Some(kind) = kind {
                self.log
                    .record(id, Some(*sid), Event::SessionCreated { kind });
            }
        }
        for (id, old, new) in &result.sessions_superseded {
            if let Some(kind) = intent.recovery_targets.get(id).copied() {
                self.log
                    .record(id, Some(*new), Event::SessionSuperseded { old: *old, kind });
            }
        }
        for (id, sid) in &result.sessions_kept {
            if let Some(kind) = intent.recovery_targets.get(id).copied() {
                self.log.record(id, Some(*sid), Event::SessionKept { kind });
            }
        }
        for (id, err) in &result.sessions_failed {
            self.log.record(
                id,
                None,
                Event::SessionFailed {
                    error: err.to_string(),
                },
            );
        }
        Ok(result)
    }

    /// Connects the replica's session and records its handshake from `history`.
    ///
    /// Logs `connected` (or `connect_failed`), then `handshake` (or `handshake_failed`). A
    /// failed handshake invalidates the session instead of leaving it in `connecting`. A
    /// needs-rebuild outcome logs `escalated` with the proof's reason; a zero gap completes
    /// at once (`completed zero_gap`, state `in_sync`); a catch-up leaves the session in
    /// `handshake` for the planner.
    pub fn execute_recovery(
        &self,
        id: &ReplicaId,
        replica: ReplicaHandshake,
        history: &RetainedHistory,
    ) -> Result<RecoveryResult> {
        self.execute_recovery_with_anchor(id, &replica, history, None)
    }

    /// [`execute_recovery`](Self::execute_recovery) with the primary's entry at the replica's
    /// flushed LSN, so the handshake also matches the two logs (see
    /// [`RetainedHistory::prove_with_anchor`]).
    pub fn execute_recovery_with_anchor(
        &self,
        id: &ReplicaId,
        replica: &ReplicaHandshake,
        history: &RetainedHistory,
        primary_at_flushed: Option<EntryId>,
    ) -> Result<RecoveryResult> {
        self.execute_recovery_in(id, None, replica, history, primary_at_flushed, None)
    }

    /// [`execute_recovery_with_anchor`](Self::execute_recovery_with_anchor) for the session
    /// `expected` only, when given: any other session (or none) is refused
    /// ([`EngineError::SessionIdMismatch`], [`EngineError::NoSession`]) and left untouched. The
    /// check is atomic with the claim: `begin_connect` re-checks the session's ID, activeness,
    /// epoch and endpoint version under the sender's lock.
    pub(crate) fn execute_recovery_in(
        &self,
        id: &ReplicaId,
        expected: Option<SessionId>,
        replica: &ReplicaHandshake,
        history: &RetainedHistory,
        primary_at_flushed: Option<EntryId>,
        divergence: Option<DivergencePoint>,
    ) -> Result<RecoveryResult> {
        // Values from storage are checked before they decide anything.
        history
            .check_consistent()
            .map_err(EngineError::InconsistentHistory)?;
        if let Some(anchor) = primary_at_flushed
            && anchor.lsn != replica.flushed()
        {
            return Err(EngineError::WrongEntry {
                requested: replica.flushed(),
                returned: anchor.lsn,
            });
        }
        let sender = self.sender(id)?;
        let snap = sender
            .session_snapshot()
            .ok_or_else(|| EngineError::NoSession {
                replica: id.clone(),
            })?;
        let sid = snap.id;
        if let Some(given) = expected
            && given != sid
        {
            return Err(EngineError::SessionIdMismatch {
                replica: id.clone(),
                given,
                current: sid,
            });
        }
        // A rebuild session is driven by `plan_rebuild`, never by a handshake; refuse before
        // touching it so it stays usable.
        if snap.kind == SessionKind::Rebuild {
            return Err(EngineError::WrongSessionKind {
                session: sid,
                kind: snap.kind,
                operation: "execute_recovery",
            });
        }
        if let Err(e) = sender.begin_connect(sid) {
            self.log.record(
                id,
                Some(sid),
                Event::ConnectFailed {
                    error: e.to_string(),
                },
            );
            return Err(e);
        }
        self.log.record(id, Some(sid), Event::Connected);

        let mut proof = history.prove_with_anchor(replica, primary_at_flushed);
        if let Some(d) = divergence {
            // `replica` is the replica as it will be once truncated to the point: its entry
            // there is checked after the truncation, not now.
            proof.anchor = AnchorCheck::AfterTruncation;
            proof.divergence = Some(d);
        }
        let outcome = match sender.record_handshake_with_proof(sid, history, &proof) {
            Ok(v) => v,
            Err(e) => {
                self.log.record(
                    id,
                    Some(sid),
                    Event::HandshakeFailed {
                        error: e.to_string(),
                    },
                );
                if let Some(inv) = sender.invalidate_session_if(
                    sid,
                    InvalidateReason::HandshakeFailed,
                    Demotion::Disconnected,
                ) {
                    self.log_invalidation(&inv);
                }
                return Err(e);
            }
        };
        self.log.record(id, Some(sid), Event::Handshake { outcome });

        match outcome {
            Outcome::NeedsRebuild => {
                self.log.record(
                    id,
                    Some(sid),
                    Event::Escalated {
                        reason: proof.reason.clone(),
                    },
                );
            }
            Outcome::ZeroGap => match sender.complete_session_by_id(sid) {
                Ok(()) => self
                    .log
                    .record(id, Some(sid), Event::Completed { how: "zero_gap" }),
                Err(e) => {
                    self.log.record(
                        id,
                        Some(sid),
                        Event::CompletionRejected {
                            error: e.to_string(),
                        },
                    );
                    return Err(e);
                }
            },
            Outcome::CatchUp => {}
        }
        Ok(RecoveryResult {
            replica_id: id.clone(),
            session_id: sid,
            outcome,
            proof,
            final_state: sender.state(),
        })
    }

    /// Advances one sender's epoch; logs `session_invalidated` if its session was fenced.
    /// A sender that an assignment stopped meanwhile is [`EngineError::SenderStopped`]: the
    /// raise did not take effect.
    pub fn update_sender_epoch(&self, id: &ReplicaId, epoch: Epoch) -> Result<()> {
        let sender = self.sender(id)?;
        if let Some(inv) = sender.raise_epoch(epoch)? {
            self.log_invalidation(&inv);
        }
        Ok(())
    }

    /// Fences the volume at `epoch` (see [`Registry::invalidate_epoch`]): every session below
    /// it is invalidated and every sender raised to it, logging one `session_invalidated` per
    /// session. Returns how many sessions were fenced.
    pub fn invalidate_epoch(&self, epoch: Epoch) -> usize {
        let invs = self.registry.invalidate_epoch(epoch);
        for inv in &invs {
            self.log_invalidation(inv);
        }
        invs.len()
    }

    /// Bumps the whole volume to `epoch`: what a failover or epoch change does before the new
    /// assignment arrives. The same as [`invalidate_epoch`](Self::invalidate_epoch), which
    /// since the fix of old proofs left standing also raises every sender.
    pub fn advance_epoch(&self, epoch: Epoch) -> usize {
        self.invalidate_epoch(epoch)
    }
}

/// Manual drivers for tests: they push a session through the sender APIs with progress the
/// caller states, without any I/O. Production recovery goes through the executors.
#[cfg(feature = "testing")]
mod manual {
    use super::*;
    use crate::types::{Lsn, Tick};

    /// Options for [`RecoveryOrchestrator::complete_catch_up`].
    #[derive(Clone, Debug, Default)]
    pub struct CatchUpOptions {
        /// Progress to report (the frozen target).
        pub target_lsn: Lsn,
        /// Tick passed to `begin_catch_up`.
        pub start_tick: Option<Tick>,
        /// Tick for the progress report and the budget check.
        pub complete_tick: Option<Tick>,
        /// Truncation to record, when the plan requires one.
        pub truncate_lsn: Option<Lsn>,
    }

    impl RecoveryOrchestrator {
        /// Drives a catch-up session to completion with caller-stated progress: begin,
        /// progress to the target, budget check, truncation, a barrier at the target (the
        /// caller vouches for durability), completion. Each step logs like the reference.
        pub fn complete_catch_up(&self, id: &ReplicaId, opts: &CatchUpOptions) -> Result<()> {
            let sender = self.sender(id)?;
            let sid = sender.session_id().ok_or_else(|| EngineError::NoSession {
                replica: id.clone(),
            })?;
            let fail = |event: Event, e: EngineError| {
                self.log.record(id, Some(sid), event);
                Err(e)
            };
            if let Err(e) = sender.begin_catch_up(sid, opts.start_tick) {
                return fail(
                    Event::CatchupBeginFailed {
                        error: e.to_string(),
                    },
                    e,
                );
            }
            self.log.record(
                id,
                Some(sid),
                Event::CatchupStarted {
                    target: opts.target_lsn,
                    tick: opts.start_tick,
                },
            );
            let recovered = sender
                .session_snapshot()
                .map_or(Lsn::ZERO, |s| s.recovered_to);
            if recovered < opts.target_lsn
                && let Err(e) =
                    sender.record_catch_up_progress(sid, opts.target_lsn, opts.complete_tick)
            {
                return fail(
                    Event::CatchupProgressFailed {
                        error: e.to_string(),
                    },
                    e,
                );
            }
            if let Some(tick) = opts.complete_tick
                && let Some(v) = sender.check_budget(sid, tick)?
            {
                self.log
                    .record(id, Some(sid), Event::BudgetEscalated { violation: v });
                return Err(EngineError::BudgetExceeded {
                    replica: id.clone(),
                    violation: v,
                });
            }
            if let Some(t) = opts.truncate_lsn {
                if let Err(e) = sender.record_truncation(sid, t) {
                    return fail(
                        Event::TruncationFailed {
                            error: e.to_string(),
                        },
                        e,
                    );
                }
                self.log
                    .record(id, Some(sid), Event::TruncationRecorded { truncated_to: t });
            }
            let target = sender
                .session_snapshot()
                .and_then(|s| s.target_lsn)
                .unwrap_or(opts.target_lsn);
            sender.record_barrier(sid, target)?;
            if let Err(e) = sender.complete_session_by_id(sid) {
                return fail(
                    Event::CompletionRejected {
                        error: e.to_string(),
                    },
                    e,
                );
            }
            self.log
                .record(id, Some(sid), Event::Completed { how: "in_sync" });
            Ok(())
        }

        /// Drives a rebuild session to completion with caller-stated progress, choosing the
        /// source from `history`: connect, handshake `(0, committed]`, select the source,
        /// transfer, tail replay (snapshot + tail), barrier, completion. Errors are logged and
        /// returned, never ignored.
        pub fn complete_rebuild(&self, id: &ReplicaId, history: &RetainedHistory) -> Result<()> {
            let sender = self.sender(id)?;
            let sid = sender.session_id().ok_or_else(|| EngineError::NoSession {
                replica: id.clone(),
            })?;
            if let Err(e) = sender.begin_connect(sid) {
                self.log.record(
                    id,
                    Some(sid),
                    Event::RebuildConnectFailed {
                        error: e.to_string(),
                    },
                );
                return Err(e);
            }
            self.log.record(id, Some(sid), Event::RebuildConnected);
            let committed = history.committed_lsn;
            let step = |r: Result<()>| -> Result<()> {
                r.inspect_err(|e| {
                    self.log.record(
                        id,
                        Some(sid),
                        Event::RebuildFailed {
                            error: e.to_string(),
                        },
                    )
                })
            };
            step(sender.record_handshake(sid, Lsn::ZERO, committed))?;
            let decision = match sender.select_rebuild_from_history(sid, history) {
                Ok(d) => d,
                Err(e) => {
                    self.log.record(
                        id,
                        Some(sid),
                        Event::RebuildSourceFailed {
                            error: e.to_string(),
                        },
                    );
                    return Err(e);
                }
            };
            self.log.record(
                id,
                Some(sid),
                Event::RebuildSourceSelected {
                    source: decision.source,
                    snapshot: decision.snapshot_lsn,
                },
            );
            step(sender.begin_rebuild_transfer(sid))?;
            match decision.snapshot_lsn {
                Some(snap) => {
                    step(sender.record_rebuild_transfer_progress(sid, snap))?;
                    step(sender.begin_rebuild_tail_replay(sid))?;
                    if committed > snap {
                        step(sender.record_rebuild_tail_progress(sid, committed))?;
                    }
                }
                None => step(sender.record_rebuild_transfer_progress(sid, committed))?,
            }
            step(sender.record_barrier(sid, committed))?;
            step(sender.complete_rebuild(sid))?;
            self.log.record(id, Some(sid), Event::RebuildCompleted);
            Ok(())
        }
    }
}

#[cfg(feature = "testing")]
pub use manual::CatchUpOptions;
