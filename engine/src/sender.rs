//! The sender: the single authority over one replica and its (at most one) recovery session.
//!
//! Every execution API starts with the same authority check, in this order: the sender is not
//! stopped; it has a session; the caller's session ID is the current one; the session is
//! active; and the session's epoch and endpoint version are the sender's current ones. The last
//! check is defence in depth: epoch and endpoint changes already invalidate and drop the
//! session, but the session records what it was created under, so a result can never outlive
//! its authority even if a future code path forgot to invalidate.
//!
//! Invariant: the session slot only ever holds an active session. Completing or invalidating a
//! session drops it in the same critical section.

use std::sync::{Arc, PoisonError};

use crate::sync::{Mutex, MutexGuard};

use crate::budget::BudgetViolation;
use crate::error::{EngineError, Result};
use crate::history::{RecoverabilityProof, RetainedHistory};
use crate::outcome::{HandshakeResult, Outcome};
use crate::rebuild::RebuildState;
use crate::session::{InvalidateReason, Session, SessionIdSource, SessionOptions, SessionSnapshot};
use crate::types::{
    Demotion, Endpoint, Epoch, Lsn, ReplicaId, ReplicaState, SessionId, SessionKind, SessionPhase,
    Tick,
};

/// A session that lost its authority, reported so callers can log it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// The replica.
    pub replica_id: ReplicaId,
    /// The session that was invalidated.
    pub session_id: SessionId,
    /// Why.
    pub reason: InvalidateReason,
}

#[derive(Debug)]
struct SenderInner {
    endpoint: Endpoint,
    epoch: Epoch,
    state: ReplicaState,
    /// Boxed: most senders have no session most of the time, and a sender without one stays
    /// small (a registry of many replicas stays cache-friendly).
    session: Option<Box<Session>>,
    stopped: bool,
}

/// The authority over one replica. Thread-safe; all methods take `&self`. Each method takes
/// the sender's one lock once and never calls out while holding it.
#[derive(Debug)]
pub struct Sender {
    replica_id: ReplicaId,
    ids: Arc<SessionIdSource>,
    inner: Mutex<SenderInner>,
}

impl Sender {
    #[cfg(any(test, feature = "testing"))]
    /// A sender in `disconnected`, not stopped, with no session and its own session-ID source.
    pub(crate) fn new(replica_id: ReplicaId, endpoint: Endpoint, epoch: Epoch) -> Self {
        Self::with_id_source(
            replica_id,
            endpoint,
            epoch,
            Arc::new(SessionIdSource::new()),
        )
    }

    /// A sender that draws session IDs from a shared source (the registry's).
    pub(crate) fn with_id_source(
        replica_id: ReplicaId,
        endpoint: Endpoint,
        epoch: Epoch,
        ids: Arc<SessionIdSource>,
    ) -> Self {
        Sender {
            replica_id,
            ids,
            inner: Mutex::new(SenderInner {
                endpoint,
                epoch,
                state: ReplicaState::Disconnected,
                session: None,
                stopped: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SenderInner> {
        // No code path panics while holding this lock, so a poisoned lock still guards
        // consistent state; recover it instead of propagating a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replica's stable ID.
    pub fn replica_id(&self) -> &ReplicaId {
        &self.replica_id
    }
    /// The current endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.lock().endpoint.clone()
    }
    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.lock().epoch
    }
    /// The replica state.
    pub fn state(&self) -> ReplicaState {
        self.lock().state
    }
    /// Whether the sender was stopped.
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }
    /// A copy of the current session, if any.
    pub fn session_snapshot(&self) -> Option<SessionSnapshot> {
        self.lock().session.as_deref().map(Session::snapshot)
    }
    /// The current session's ID, if any.
    pub fn session_id(&self) -> Option<SessionId> {
        self.lock().session.as_ref().map(|s| s.id)
    }
    /// True when a session is present (the slot only holds active sessions).
    pub fn has_active_session(&self) -> bool {
        self.lock().session.as_deref().is_some_and(Session::active)
    }

    /// Everything a status report needs, read under one lock acquisition.
    pub fn status(&self) -> crate::observe::SenderStatus {
        let g = self.lock();
        crate::observe::SenderStatus {
            replica_id: self.replica_id.clone(),
            endpoint: g.endpoint.clone(),
            epoch: g.epoch,
            state: g.state,
            stopped: g.stopped,
            session: g.session.as_deref().map(Session::snapshot),
        }
    }

    /// The state a sender falls to when its session loses its authority: `needs_rebuild` if it
    /// already needed one or the lost session was a rebuild (the replica may hold a partial
    /// image), `disconnected` otherwise.
    fn fenced_state(g: &SenderInner) -> ReplicaState {
        let rebuilding = g
            .session
            .as_ref()
            .is_some_and(|s| s.kind == SessionKind::Rebuild);
        if rebuilding || g.state == ReplicaState::NeedsRebuild {
            ReplicaState::NeedsRebuild
        } else {
            ReplicaState::Disconnected
        }
    }

    fn drop_session(&self, g: &mut SenderInner, reason: InvalidateReason) -> Option<Invalidation> {
        let mut s = g.session.take()?;
        s.invalidate(reason.clone());
        Some(Invalidation {
            replica_id: self.replica_id.clone(),
            session_id: s.id,
            reason,
        })
    }

    #[cfg(any(test, feature = "testing"))]
    /// Advances the epoch. Ignored when stopped or when `epoch` is not higher. An active
    /// session from an older epoch is invalidated (`epoch_advanced_<old>_to_<new>`) and
    /// dropped, and the state becomes `disconnected` (`needs_rebuild` when the sender needed a
    /// rebuild or the session was one). Without a session, a sender that was
    /// `in_sync` (or connecting / catching up) also becomes `disconnected`: its proof belonged
    /// to the old epoch (the reference left it `in_sync`).
    pub(crate) fn update_epoch(&self, epoch: Epoch) -> Option<Invalidation> {
        self.raise_epoch(epoch).ok().flatten()
    }

    /// What `Registry::invalidate_epoch` does to one sender: like
    /// [`update_epoch`](Self::update_epoch), with the reason `epoch_bump`.
    pub(crate) fn fence_epoch(&self, epoch: Epoch) -> Option<Invalidation> {
        let mut g = self.lock();
        self.epoch_locked(&mut g, epoch, true)
    }

    /// Raises the epoch under the lock. A session of an older epoch is invalidated with
    /// `epoch_bump` when `fence` (a volume-wide fence), `epoch_advanced_<old>_to_<new>`
    /// otherwise.
    fn epoch_locked(&self, g: &mut SenderInner, epoch: Epoch, fence: bool) -> Option<Invalidation> {
        if g.stopped || epoch <= g.epoch {
            return None;
        }
        let reason = if fence {
            InvalidateReason::EpochBump
        } else {
            InvalidateReason::EpochAdvanced {
                from: g.epoch,
                to: epoch,
            }
        };
        g.epoch = epoch;
        let stale = g.session.as_ref().is_some_and(|s| s.epoch < epoch);
        if stale {
            let fenced = Self::fenced_state(g);
            let inv = self.drop_session(g, reason);
            g.state = fenced;
            return inv;
        }
        Self::demote_without_session(g);
        None
    }

    /// An in-sync (or connecting, catching-up) sender without a session loses its proof.
    fn demote_without_session(g: &mut SenderInner) {
        if matches!(
            g.state,
            ReplicaState::InSync | ReplicaState::Connecting | ReplicaState::CatchingUp
        ) {
            g.state = ReplicaState::Disconnected;
        }
    }

    fn endpoint_locked(&self, g: &mut SenderInner, endpoint: &Endpoint) -> Option<Invalidation> {
        if g.stopped || !g.endpoint.changed(endpoint) {
            return None;
        }
        g.endpoint = endpoint.clone();
        if g.session.is_some() {
            let fenced = Self::fenced_state(g);
            let inv = self.drop_session(g, InvalidateReason::EndpointChanged);
            g.state = fenced;
            return inv;
        }
        Self::demote_without_session(g);
        None
    }

    #[cfg(any(test, feature = "testing"))]
    /// Applies an assignment's view of this replica, under one lock acquisition: the endpoint
    /// first (an endpoint change invalidates the session and leaves the sender
    /// `disconnected`: nothing is proven about the replica at its new address), then the
    /// epoch (see [`update_epoch`](Self::update_epoch)). Returns what it invalidated.
    ///
    /// Fenced: an assignment from an epoch older than the sender's own is refused with
    /// [`EngineError::StaleAssignment`] and changes nothing, whatever order concurrent
    /// assignments arrive in and even when this sender alone was raised to a newer epoch.
    /// Within one epoch the last assignment wins (endpoint versions are not ordered: a master
    /// that restarts may number them afresh). A stopped sender ignores it.
    pub(crate) fn reassign(&self, endpoint: &Endpoint, epoch: Epoch) -> Result<Vec<Invalidation>> {
        let mut out = Vec::new();
        self.reassign_into(endpoint, epoch, &mut out)?;
        Ok(out)
    }

    pub(crate) fn reassign_into(
        &self,
        endpoint: &Endpoint,
        epoch: Epoch,
        out: &mut Vec<Invalidation>,
    ) -> Result<()> {
        let mut g = self.lock();
        if g.stopped {
            return Ok(());
        }
        if epoch < g.epoch {
            return Err(EngineError::StaleAssignment {
                replica: self.replica_id.clone(),
                intent_epoch: epoch,
                intent_endpoint_version: endpoint.version,
                sender_epoch: g.epoch,
                sender_endpoint_version: g.endpoint.version,
            });
        }
        out.extend(self.endpoint_locked(&mut g, endpoint));
        out.extend(self.epoch_locked(&mut g, epoch, false));
        Ok(())
    }

    /// Refuses a change from an assignment at `epoch` when the sender is newer.
    fn check_assignment_epoch(&self, g: &SenderInner, epoch: Epoch) -> Result<()> {
        if g.stopped {
            return Err(EngineError::SenderStopped {
                replica: self.replica_id.clone(),
            });
        }
        if epoch != g.epoch {
            return Err(EngineError::EpochMismatch {
                replica: self.replica_id.clone(),
                requested: epoch,
                sender: g.epoch,
            });
        }
        Ok(())
    }

    /// Creates a session in `init` at `epoch`, which must be the sender's epoch, when no
    /// session is active. The replica state is unchanged.
    pub(crate) fn attach_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        opts: SessionOptions,
    ) -> Result<SessionId> {
        let mut g = self.lock();
        self.check_assignment_epoch(&g, epoch)?;
        if let Some(s) = g.session.as_ref() {
            return Err(EngineError::SessionStillActive {
                replica: self.replica_id.clone(),
                session: s.id,
            });
        }
        Ok(self.new_session(&mut g, kind, opts))
    }

    /// Puts a new session in `init` into the (empty) slot, at the sender's epoch and endpoint
    /// version.
    fn new_session(
        &self,
        g: &mut SenderInner,
        kind: SessionKind,
        opts: SessionOptions,
    ) -> SessionId {
        let id = self.ids.next_id();
        g.session = Some(Box::new(Session::new(
            id,
            self.replica_id.clone(),
            g.epoch,
            g.endpoint.version,
            kind,
            opts,
        )));
        id
    }

    /// Invalidates the current session (if any) with `reason` and creates a new one, for an
    /// assignment at `epoch`, which must be the sender's epoch (an assignment that raced with
    /// a newer one must not replace the newer one's session). Returns the invalidated session
    /// (if any) and the new ID.
    pub(crate) fn supersede_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        reason: InvalidateReason,
        opts: SessionOptions,
    ) -> Result<(Option<Invalidation>, SessionId)> {
        let mut g = self.lock();
        self.check_assignment_epoch(&g, epoch)?;
        let old = self.drop_session(&mut g, reason);
        let id = self.new_session(&mut g, kind, opts);
        Ok((old, id))
    }

    /// Stops the sender for good (idempotent): the session is invalidated with
    /// `sender_stopped` and dropped. The state is unchanged.
    pub(crate) fn stop(&self) -> Option<Invalidation> {
        let mut g = self.lock();
        g.stopped = true;
        self.drop_session(&mut g, InvalidateReason::SenderStopped)
    }

    /// Stops the sender for an assignment at `epoch` that no longer lists it, unless the
    /// sender is at a newer epoch (then [`EngineError::StaleAssignment`], and nothing
    /// changes). The check and the stop are one critical section.
    pub(crate) fn stop_for_intent(&self, epoch: Epoch) -> Result<Option<Invalidation>> {
        let mut g = self.lock();
        if g.epoch > epoch {
            return Err(EngineError::StaleAssignment {
                replica: self.replica_id.clone(),
                intent_epoch: epoch,
                intent_endpoint_version: g.endpoint.version,
                sender_epoch: g.epoch,
                sender_endpoint_version: g.endpoint.version,
            });
        }
        g.stopped = true;
        Ok(self.drop_session(&mut g, InvalidateReason::SenderStopped))
    }

    /// Raises the epoch like [`update_epoch`](Self::update_epoch), but reports a stopped
    /// sender ([`EngineError::SenderStopped`]) instead of ignoring the raise.
    pub(crate) fn raise_epoch(&self, epoch: Epoch) -> Result<Option<Invalidation>> {
        let mut g = self.lock();
        if g.stopped {
            return Err(EngineError::SenderStopped {
                replica: self.replica_id.clone(),
            });
        }
        Ok(self.epoch_locked(&mut g, epoch, false))
    }

    /// The state a demotion leads to: a sender that needs a rebuild keeps needing one.
    fn demoted(g: &SenderInner, to: Demotion) -> ReplicaState {
        if g.state == ReplicaState::NeedsRebuild {
            ReplicaState::NeedsRebuild
        } else {
            to.into()
        }
    }

    #[cfg(any(test, feature = "testing"))]
    /// Invalidates and drops the session if there is one and demotes the replica to `to` (a
    /// replica that needs a rebuild keeps needing one). A stopped sender is left as it is.
    /// Demotion is the only state a caller can set: `in_sync` needs a proof.
    pub(crate) fn invalidate_session(
        &self,
        reason: InvalidateReason,
        to: Demotion,
    ) -> Option<Invalidation> {
        let mut g = self.lock();
        if g.stopped {
            return None;
        }
        let next = Self::demoted(&g, to);
        let inv = self.drop_session(&mut g, reason);
        g.state = next;
        inv
    }

    /// Invalidates the session only if it is `id`, and then demotes the replica to `to`; used
    /// by cancellation so a finished or replaced session (and the replica it proved) is never
    /// touched.
    pub(crate) fn invalidate_session_if(
        &self,
        id: SessionId,
        reason: InvalidateReason,
        to: Demotion,
    ) -> Option<Invalidation> {
        self.drop_if(id, reason, |g| Self::demoted(g, to))
    }

    /// Fences the session `id` (if it is still current) with `reason`; the state becomes
    /// `disconnected`, or `needs_rebuild` when the sender needed a rebuild or the session was
    /// one.
    pub(crate) fn fence_session_if(
        &self,
        id: SessionId,
        reason: InvalidateReason,
    ) -> Option<Invalidation> {
        self.drop_if(id, reason, Self::fenced_state)
    }

    fn drop_if(
        &self,
        id: SessionId,
        reason: InvalidateReason,
        state: impl FnOnce(&SenderInner) -> ReplicaState,
    ) -> Option<Invalidation> {
        let mut g = self.lock();
        if g.stopped || g.session.as_ref().map(|s| s.id) != Some(id) {
            return None;
        }
        let next = state(&g);
        let inv = self.drop_session(&mut g, reason);
        g.state = next;
        inv
    }

    /// Marks the session `id` as taken by a plan. A second planner for the same session is
    /// refused ([`EngineError::AlreadyPlanned`]) without touching the session, so a plan never
    /// shares its session with another (whose failure or drop would end it).
    pub(crate) fn claim_plan(&self, id: SessionId) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            if s.planned {
                return Err(EngineError::AlreadyPlanned {
                    replica: s.replica_id.clone(),
                    session: s.id,
                });
            }
            s.planned = true;
            Ok(())
        })
    }

    /// Runs `f` on the session after the authority check.
    fn with_session<T>(
        &self,
        id: SessionId,
        f: impl FnOnce(&mut SenderInner) -> Result<T>,
    ) -> Result<T> {
        let mut g = self.lock();
        self.authorize(&g, id)?;
        f(&mut g)
    }

    fn authorize(&self, g: &SenderInner, id: SessionId) -> Result<()> {
        if g.stopped {
            return Err(EngineError::SenderStopped {
                replica: self.replica_id.clone(),
            });
        }
        let Some(s) = g.session.as_ref() else {
            return Err(EngineError::NoActiveSession {
                replica: self.replica_id.clone(),
            });
        };
        if s.id != id {
            return Err(EngineError::SessionIdMismatch {
                replica: self.replica_id.clone(),
                given: id,
                current: s.id,
            });
        }
        if !s.active() {
            return Err(EngineError::SessionNotActive {
                replica: self.replica_id.clone(),
                session: s.id,
                phase: s.phase,
            });
        }
        if s.epoch != g.epoch || s.endpoint_version != g.endpoint.version {
            return Err(EngineError::StaleAuthority {
                replica: self.replica_id.clone(),
                session: s.id,
                session_epoch: s.epoch,
                sender_epoch: g.epoch,
                session_endpoint_version: s.endpoint_version,
                sender_endpoint_version: g.endpoint.version,
            });
        }
        Ok(())
    }

    /// Checks that `id` is the current, active, fresh session without changing anything.
    pub fn check_authority(&self, id: SessionId) -> Result<()> {
        let g = self.lock();
        self.authorize(&g, id)
    }

    // ---------------------------------------------------------------------------------------
    // Catch-up APIs
    // ---------------------------------------------------------------------------------------

    /// `init -> connecting`; the state becomes `connecting`.
    pub(crate) fn begin_connect(&self, id: SessionId) -> Result<()> {
        self.with_session(id, |g| {
            session_mut(g).advance(SessionPhase::Connecting)?;
            g.state = ReplicaState::Connecting;
            Ok(())
        })
    }

    /// `connecting -> handshake` with the range `(start, target]`.
    pub(crate) fn record_handshake(&self, id: SessionId, start: Lsn, target: Lsn) -> Result<()> {
        self.with_session(id, |g| {
            if target < start {
                return Err(EngineError::InvalidRange { start, target });
            }
            let s = session_mut(g);
            s.advance(SessionPhase::Handshake)?;
            s.set_range(start, target);
            Ok(())
        })
    }

    #[cfg(any(test, feature = "testing"))]
    /// Records a handshake and classifies it (see [`HandshakeResult::classify`]).
    ///
    /// - `needs_rebuild`: the session is invalidated (`gap_exceeds_retention`) and dropped and
    ///   the state becomes `needs_rebuild`; returns `Ok(NeedsRebuild)`.
    /// - `zero_gap`: handshake with the range `(F, F]`.
    /// - `catchup`: handshake with `(F, C]`, or, when the replica is ahead (`F > C`), a
    ///   required truncation to C and the range `(C, C]`.
    pub(crate) fn record_handshake_with_outcome(
        &self,
        id: SessionId,
        hr: &HandshakeResult,
    ) -> Result<Outcome> {
        self.apply_handshake(id, hr, hr.classify(), false, None)
    }

    fn apply_handshake(
        &self,
        id: SessionId,
        hr: &HandshakeResult,
        outcome: Outcome,
        proven: bool,
        truncate_first: Option<Lsn>,
    ) -> Result<Outcome> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            EngineError::require_phase(
                s.id,
                "record_handshake_with_outcome",
                SessionPhase::Connecting,
                s.phase,
            )?;
            let f = hr.replica_flushed_lsn;
            let c = hr.committed_lsn;
            match outcome {
                Outcome::NeedsRebuild => {
                    self.drop_session(g, InvalidateReason::GapExceedsRetention);
                    g.state = ReplicaState::NeedsRebuild;
                }
                Outcome::ZeroGap => {
                    s.advance(SessionPhase::Handshake)?;
                    s.set_range(f, f);
                    s.proven = proven;
                }
                Outcome::CatchUp => {
                    s.advance(SessionPhase::Handshake)?;
                    if f > c {
                        s.truncate_to = Some(c);
                        s.set_range(c, c);
                    } else {
                        s.truncate_to = truncate_first;
                        s.set_range(f, c);
                    }
                }
            }
            Ok(outcome)
        })
    }

    #[cfg(any(test, feature = "testing"))]
    /// Records a handshake from retained history: builds the proof and the handshake result,
    /// and takes the outcome from the proof, so holes and a committed LSN beyond the head send
    /// the replica to rebuild even where the plain classifier would say catch-up.
    pub(crate) fn record_handshake_from_history(
        &self,
        id: SessionId,
        replica_flushed: Lsn,
        history: &RetainedHistory,
    ) -> Result<(Outcome, RecoverabilityProof)> {
        let proof = history.prove_recoverability(replica_flushed);
        let outcome = self.record_handshake_with_proof(id, history, &proof)?;
        Ok((outcome, proof))
    }

    /// Records a handshake whose proof the caller built (for example with
    /// [`RetainedHistory::prove_with_anchor`], which also matches the replica's log). The
    /// outcome is the proof's.
    pub(crate) fn record_handshake_with_proof(
        &self,
        id: SessionId,
        history: &RetainedHistory,
        proof: &RecoverabilityProof,
    ) -> Result<Outcome> {
        // A proof is data a caller could build by hand: it must describe `history`, and it
        // may only be more cautious than the LSN-only proof from that history (log matching
        // can only turn a recoverable replica into a rebuild), never less.
        let plain = history.prove_recoverability(proof.replica_flushed_lsn);
        let describes = (proof.committed_lsn, proof.tail_lsn, proof.head_lsn)
            == (plain.committed_lsn, plain.tail_lsn, plain.head_lsn);
        let outcome = proof.outcome();
        if !describes || (outcome != plain.outcome() && outcome != Outcome::NeedsRebuild) {
            return Err(EngineError::ProofMismatch {
                replica: self.replica_id.clone(),
                claimed: outcome,
                history: plain.outcome(),
            });
        }
        // A divergence point is a truncation the catch-up must start with: below both F and
        // C, at the LSN the rest of the proof treats as the replica's head.
        let truncate_first = match proof.divergence {
            Some(d)
                if d.point.lsn != proof.replica_flushed_lsn
                    || d.point.lsn >= d.replica_head
                    || outcome != Outcome::CatchUp =>
            {
                return Err(EngineError::ProofMismatch {
                    replica: self.replica_id.clone(),
                    claimed: outcome,
                    history: plain.outcome(),
                });
            }
            Some(d) => Some(d.point.lsn),
            None => None,
        };
        let hr = history.make_handshake_result(proof.replica_flushed_lsn);
        self.apply_handshake(id, &hr, outcome, true, truncate_first)
    }

    /// `handshake -> catchup` for non-rebuild sessions; the state becomes `catching_up` and
    /// the target is frozen (always, budget or not). A start tick, if given, starts the
    /// budget clock.
    pub(crate) fn begin_catch_up(&self, id: SessionId, start_tick: Option<Tick>) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            reject_rebuild(s, "begin_catch_up")?;
            s.advance(SessionPhase::CatchUp)?;
            s.frozen_target = s.target();
            if let Some(t) = start_tick {
                s.tracker.start_tick = Some(t);
                s.tracker.last_progress_tick = Some(t);
            }
            g.state = ReplicaState::CatchingUp;
            Ok(())
        })
    }

    /// Records catch-up progress to `lsn`: strictly above the progress so far and at most the
    /// frozen target. The entries counted are `lsn - recovered_to`, so the budget sees only
    /// this session's work. A budget with a progress deadline requires a tick. A refusal
    /// changes nothing and does not invalidate the session.
    pub(crate) fn record_catch_up_progress(
        &self,
        id: SessionId,
        lsn: Lsn,
        tick: Option<Tick>,
    ) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            reject_rebuild(s, "record_catch_up_progress")?;
            EngineError::require_phase(
                s.id,
                "record_catch_up_progress",
                SessionPhase::CatchUp,
                s.phase,
            )?;
            if lsn <= s.recovered_to {
                return Err(EngineError::ProgressRegression {
                    current: s.recovered_to,
                    proposed: lsn,
                });
            }
            if let Some(frozen) = s.frozen_target
                && lsn > frozen
            {
                return Err(EngineError::ExceedsFrozenTarget {
                    target: frozen,
                    proposed: lsn,
                });
            }
            let needs_tick = s
                .budget
                .is_some_and(|b| b.progress_deadline_ticks.is_some());
            if needs_tick && tick.is_none() {
                return Err(EngineError::TickRequired);
            }
            s.tracker.entries_replayed = s
                .tracker
                .entries_replayed
                .saturating_add(s.recovered_to.distance_to(lsn));
            s.recovered_to = lsn;
            if let Some(t) = tick {
                s.tracker.last_progress_tick = Some(t);
            }
            Ok(())
        })
    }

    /// Records that the replica executed the required truncation to `lsn`. Idempotent; any
    /// phase.
    pub(crate) fn record_truncation(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            let Some(required) = s.truncate_to else {
                return Err(EngineError::TruncationNotRequired { session: s.id });
            };
            if lsn != required {
                return Err(EngineError::TruncationMismatch {
                    required,
                    proposed: lsn,
                });
            }
            s.truncate_recorded = true;
            Ok(())
        })
    }

    /// Records the durable LSN a replica reported from a barrier. It must not exceed the
    /// session's target: a replica durable beyond the target holds data the recovery did not
    /// put there, and must not be declared in sync with the target.
    pub(crate) fn record_barrier(&self, id: SessionId, durable: Lsn) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            let target = barrier_target(s);
            if let Some(target) = target
                && durable > target
            {
                return Err(EngineError::ExceedsFrozenTarget {
                    target,
                    proposed: durable,
                });
            }
            s.durable = Some(s.durable.map_or(durable, |d| d.max(durable)));
            Ok(())
        })
    }

    /// Completes a non-rebuild session and marks the replica `in_sync`. Refused (changing
    /// nothing) when: the authority check fails; the session is a rebuild; a required
    /// truncation was not recorded; the session has not converged (in `catchup` progress must
    /// reach the target, in `handshake` the range must be empty); or the replica did not
    /// report its data durable at the target. A zero-gap handshake needs no barrier: the
    /// replica's flushed LSN already is the target.
    pub(crate) fn complete_session_by_id(&self, id: SessionId) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            reject_rebuild(s, "complete_session_by_id")?;
            if let Some(required) = s.truncate_to
                && !s.truncate_recorded
            {
                return Err(EngineError::TruncationNotRecorded { required });
            }
            let (start, target) = match (s.phase, s.range) {
                (SessionPhase::CatchUp | SessionPhase::Handshake, Some(r)) => r,
                (phase, _) => {
                    return Err(EngineError::WrongPhase {
                        session: s.id,
                        operation: "complete_session_by_id",
                        expected: SessionPhase::CatchUp,
                        found: phase,
                    });
                }
            };
            let converged = match s.phase {
                SessionPhase::CatchUp => s.converged(),
                _ => start == target,
            };
            if !converged {
                return Err(EngineError::NotConverged {
                    recovered_to: s.recovered_to,
                    target,
                });
            }
            // Only a zero gap that a recoverability proof established is complete without a
            // barrier; a caller-stated range (`record_handshake`, `record_handshake_with_outcome`)
            // must be confirmed by the replica's durable LSN like any other recovery.
            let zero_gap =
                s.phase == SessionPhase::Handshake && s.truncate_to.is_none() && s.proven;
            if !zero_gap && s.durable.is_none_or(|d| d < target) {
                return Err(EngineError::BarrierMissing {
                    target,
                    durable: s.durable,
                });
            }
            s.advance(SessionPhase::Completed)?;
            g.session = None;
            g.state = ReplicaState::InSync;
            Ok(())
        })
    }

    /// Checks the session's budget at `now`. A violation invalidates the session
    /// (`budget_<violation>`), drops it and sets `needs_rebuild`. Works in any phase.
    pub(crate) fn check_budget(&self, id: SessionId, now: Tick) -> Result<Option<BudgetViolation>> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            let Some(budget) = s.budget else {
                return Ok(None);
            };
            let Some(v) = budget.check(&s.tracker, now) else {
                return Ok(None);
            };
            self.drop_session(g, InvalidateReason::Budget(v));
            g.state = ReplicaState::NeedsRebuild;
            Ok(Some(v))
        })
    }

    // ---------------------------------------------------------------------------------------
    // Rebuild APIs. A rebuild session stays in phase `handshake` from source selection until
    // completion; its progress lives in the rebuild state machine.
    // ---------------------------------------------------------------------------------------

    fn with_rebuild<T>(
        &self,
        id: SessionId,
        operation: &'static str,
        f: impl FnOnce(&mut RebuildState) -> Result<T>,
    ) -> Result<T> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            EngineError::require_phase(s.id, operation, SessionPhase::Handshake, s.phase)?;
            let sid = s.id;
            let rebuild = s
                .rebuild
                .as_mut()
                .ok_or(EngineError::NoRebuildState { session: sid })?;
            f(rebuild)
        })
    }

    /// Selects the rebuild source (rebuild sessions in `handshake` only).
    pub(crate) fn select_rebuild_source(
        &self,
        id: SessionId,
        snapshot_lsn: Option<Lsn>,
        snapshot_valid: bool,
        committed: Lsn,
    ) -> Result<()> {
        self.with_rebuild(id, "select_rebuild_source", |r| {
            r.select_source(snapshot_lsn, snapshot_valid, committed)
        })
    }

    #[cfg(any(test, feature = "testing"))]
    /// Selects the rebuild source from retained history and returns the decision.
    pub(crate) fn select_rebuild_from_history(
        &self,
        id: SessionId,
        history: &RetainedHistory,
    ) -> Result<crate::history::RebuildDecision> {
        let decision = history.rebuild_source_decision();
        self.select_rebuild_source(
            id,
            decision.snapshot_lsn,
            decision.source == crate::rebuild::RebuildSource::SnapshotTail,
            history.committed_lsn,
        )?;
        Ok(decision)
    }

    /// Starts the base transfer.
    pub(crate) fn begin_rebuild_transfer(&self, id: SessionId) -> Result<()> {
        self.with_rebuild(id, "begin_rebuild_transfer", RebuildState::begin_transfer)
    }

    /// Records base progress.
    pub(crate) fn record_rebuild_transfer_progress(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        self.with_rebuild(id, "record_rebuild_transfer_progress", |r| {
            r.record_transfer_progress(lsn)
        })
    }

    /// Starts the tail replay (snapshot + tail, after the base reached the snapshot).
    pub(crate) fn begin_rebuild_tail_replay(&self, id: SessionId) -> Result<()> {
        self.with_rebuild(
            id,
            "begin_rebuild_tail_replay",
            RebuildState::begin_tail_replay,
        )
    }

    /// Records tail progress.
    pub(crate) fn record_rebuild_tail_progress(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        self.with_rebuild(id, "record_rebuild_tail_progress", |r| {
            r.record_tail_replay_progress(lsn)
        })
    }

    /// Completes a rebuild session and marks the replica `in_sync`: the rebuild must be ready
    /// and the replica must have reported its data durable at the target.
    pub(crate) fn complete_rebuild(&self, id: SessionId) -> Result<()> {
        self.with_session(id, |g| {
            let s = session_mut(g);
            let sid = s.id;
            let durable = s.durable;
            let rebuild = s
                .rebuild
                .as_mut()
                .ok_or(EngineError::NoRebuildState { session: sid })?;
            if !rebuild.ready_to_complete() {
                return Err(EngineError::RebuildNotReady {
                    phase: rebuild.phase(),
                });
            }
            let target = rebuild.tail_target().unwrap_or(Lsn::ZERO);
            if durable.is_none_or(|d| d < target) {
                return Err(EngineError::BarrierMissing { target, durable });
            }
            EngineError::require_phase(sid, "complete_rebuild", SessionPhase::Handshake, s.phase)?;
            // Both checks passed, so neither of these can fail now; the state only changes
            // after both succeed.
            if let Some(r) = s.rebuild.as_mut() {
                r.complete()?;
            }
            s.advance(SessionPhase::Completed)?;
            g.session = None;
            g.state = ReplicaState::InSync;
            Ok(())
        })
    }
}

/// The session in the slot. Only called after `authorize`, which proved it is there.
fn session_mut(g: &mut SenderInner) -> &mut Session {
    g.session
        .as_mut()
        .expect("authorize checked that the session slot is occupied")
}

fn reject_rebuild(s: &Session, operation: &'static str) -> Result<()> {
    if s.kind == SessionKind::Rebuild {
        return Err(EngineError::WrongSessionKind {
            session: s.id,
            kind: s.kind,
            operation,
        });
    }
    Ok(())
}

/// The LSN a barrier must reach: the rebuild target for rebuild sessions, the handshake
/// target otherwise.
fn barrier_target(s: &Session) -> Option<Lsn> {
    match s.rebuild.as_ref() {
        Some(r) => r.tail_target(),
        None => s.target(),
    }
}
