//! The sender's session protocol, for tests that drive a session step by step.
//!
//! A caller of the engine drives recovery through [`RecoveryDriver`](crate::RecoveryDriver),
//! the executors and the orchestrator; the steps of a session (connect, handshake, progress,
//! barrier, completion, rebuild phases) are the engine's own protocol and are crate-private on
//! [`Sender`]. Tests that check that protocol one step at a time (the ported reference tests,
//! the simulator's modelled live stream) import this trait, which exists only with the
//! `testing` feature: production code cannot record a barrier or complete a session by ID.

use std::sync::Arc;

use crate::budget::BudgetViolation;
use crate::error::Result;
use crate::history::{RebuildDecision, RecoverabilityProof, RetainedHistory};
use crate::outcome::{HandshakeResult, Outcome};
use crate::sender::{Invalidation, Sender};
use crate::session::{InvalidateReason, SessionIdSource, SessionOptions};
use crate::types::{Demotion, Endpoint, Epoch, Lsn, ReplicaId, SessionId, SessionKind, Tick};

/// The crate-private session protocol of [`Sender`], forwarded for tests (see the module
/// documentation). Each method is the sender's own, with the same checks.
pub trait SenderProtocol {
    /// A sender in `disconnected`, not stopped, with no session and its own session-ID source.
    fn new(replica_id: ReplicaId, endpoint: Endpoint, epoch: Epoch) -> Self;

    /// A sender that draws session IDs from a shared source (the registry's).
    fn with_id_source(
        replica_id: ReplicaId,
        endpoint: Endpoint,
        epoch: Epoch,
        ids: Arc<SessionIdSource>,
    ) -> Self;

    /// Advances the epoch. Ignored when stopped or when `epoch` is not higher. An active
    /// session from an older epoch is invalidated (`epoch_advanced_<old>_to_<new>`) and
    /// dropped, and the state becomes `disconnected` (`needs_rebuild` when the sender needed a
    /// rebuild or the session was one). Without a session, a sender that was
    /// `in_sync` (or connecting / catching up) also becomes `disconnected`: its proof belonged
    /// to the old epoch (the reference left it `in_sync`).
    fn update_epoch(&self, epoch: Epoch) -> Option<Invalidation>;

    /// Applies an assignment's view of this replica, under one lock acquisition: the endpoint
    /// first (an endpoint change invalidates the session and leaves the sender
    /// `disconnected`: nothing is proven about the replica at its new address), then the
    /// epoch (see [`update_epoch`](SenderProtocol::update_epoch)). Returns what it invalidated.
    ///
    /// Fenced: an assignment from an epoch older than the sender's own is refused with
    /// [`StaleAssignment`](crate::EngineError::StaleAssignment) and changes nothing, whatever order concurrent
    /// assignments arrive in and even when this sender alone was raised to a newer epoch.
    /// Within one epoch the last assignment wins (endpoint versions are not ordered: a master
    /// that restarts may number them afresh). A stopped sender ignores it.
    fn reassign(&self, endpoint: &Endpoint, epoch: Epoch) -> Result<Vec<Invalidation>>;

    /// Creates a session in `init` at `epoch`, which must be the sender's epoch, when no
    /// session is active. The replica state is unchanged.
    fn attach_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        opts: SessionOptions,
    ) -> Result<SessionId>;

    /// Invalidates the current session (if any) with `reason` and creates a new one, for an
    /// assignment at `epoch`, which must be the sender's epoch (an assignment that raced with
    /// a newer one must not replace the newer one's session). Returns the invalidated session
    /// (if any) and the new ID.
    fn supersede_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        reason: InvalidateReason,
        opts: SessionOptions,
    ) -> Result<(Option<Invalidation>, SessionId)>;

    /// Stops the sender for good (idempotent): the session is invalidated with
    /// `sender_stopped` and dropped. The state is unchanged.
    fn stop(&self) -> Option<Invalidation>;

    /// Invalidates and drops the session if there is one and demotes the replica to `to` (a
    /// replica that needs a rebuild keeps needing one). A stopped sender is left as it is.
    /// Demotion is the only state a caller can set: `in_sync` needs a proof.
    fn invalidate_session(&self, reason: InvalidateReason, to: Demotion) -> Option<Invalidation>;

    /// Invalidates the session only if it is `id`, and then demotes the replica to `to`; used
    /// by cancellation so a finished or replaced session (and the replica it proved) is never
    /// touched.
    fn invalidate_session_if(
        &self,
        id: SessionId,
        reason: InvalidateReason,
        to: Demotion,
    ) -> Option<Invalidation>;

    /// Fences the session `id` (if it is still current) with `reason`; the state becomes
    /// `disconnected`, or `needs_rebuild` when the sender needed a rebuild or the session was
    /// one.
    fn fence_session_if(&self, id: SessionId, reason: InvalidateReason) -> Option<Invalidation>;

    /// `init -> connecting`; the state becomes `connecting`.
    fn begin_connect(&self, id: SessionId) -> Result<()>;

    /// `connecting -> handshake` with the range `(start, target]`.
    fn record_handshake(&self, id: SessionId, start: Lsn, target: Lsn) -> Result<()>;

    /// Records a handshake and classifies it (see [`HandshakeResult::classify`]).
    ///
    /// - `needs_rebuild`: the session is invalidated (`gap_exceeds_retention`) and dropped and
    ///   the state becomes `needs_rebuild`; returns `Ok(NeedsRebuild)`.
    /// - `zero_gap`: handshake with the range `(F, F]`.
    /// - `catchup`: handshake with `(F, C]`, or, when the replica is ahead (`F > C`), a
    ///   required truncation to C and the range `(C, C]`.
    fn record_handshake_with_outcome(&self, id: SessionId, hr: &HandshakeResult)
    -> Result<Outcome>;

    /// Records a handshake from retained history: builds the proof and the handshake result,
    /// and takes the outcome from the proof, so holes and a committed LSN beyond the head send
    /// the replica to rebuild even where the plain classifier would say catch-up.
    fn record_handshake_from_history(
        &self,
        id: SessionId,
        replica_flushed: Lsn,
        history: &RetainedHistory,
    ) -> Result<(Outcome, RecoverabilityProof)>;

    /// Records a handshake whose proof the caller built (for example with
    /// [`RetainedHistory::prove_with_anchor`], which also matches the replica's log). The
    /// outcome is the proof's.
    fn record_handshake_with_proof(
        &self,
        id: SessionId,
        history: &RetainedHistory,
        proof: &RecoverabilityProof,
    ) -> Result<Outcome>;

    /// `handshake -> catchup` for non-rebuild sessions; the state becomes `catching_up` and
    /// the target is frozen (always, budget or not). A start tick, if given, starts the
    /// budget clock.
    fn begin_catch_up(&self, id: SessionId, start_tick: Option<Tick>) -> Result<()>;

    /// Records catch-up progress to `lsn`: strictly above the progress so far and at most the
    /// frozen target. The entries counted are `lsn - recovered_to`, so the budget sees only
    /// this session's work. A budget with a progress deadline requires a tick. A refusal
    /// changes nothing and does not invalidate the session.
    fn record_catch_up_progress(&self, id: SessionId, lsn: Lsn, tick: Option<Tick>) -> Result<()>;

    /// Records that the replica executed the required truncation to `lsn`. Idempotent; any
    /// phase.
    fn record_truncation(&self, id: SessionId, lsn: Lsn) -> Result<()>;

    /// Records the durable LSN a replica reported from a barrier. It must not exceed the
    /// session's target: a replica durable beyond the target holds data the recovery did not
    /// put there, and must not be declared in sync with the target.
    fn record_barrier(&self, id: SessionId, durable: Lsn) -> Result<()>;

    /// Completes a non-rebuild session and marks the replica `in_sync`. Refused (changing
    /// nothing) when: the authority check fails; the session is a rebuild; a required
    /// truncation was not recorded; the session has not converged (in `catchup` progress must
    /// reach the target, in `handshake` the range must be empty); or the replica did not
    /// report its data durable at the target. A zero-gap handshake needs no barrier: the
    /// replica's flushed LSN already is the target.
    fn complete_session_by_id(&self, id: SessionId) -> Result<()>;

    /// Checks the session's budget at `now`. A violation invalidates the session
    /// (`budget_<violation>`), drops it and sets `needs_rebuild`. Works in any phase.
    fn check_budget(&self, id: SessionId, now: Tick) -> Result<Option<BudgetViolation>>;

    /// Selects the rebuild source (rebuild sessions in `handshake` only).
    fn select_rebuild_source(
        &self,
        id: SessionId,
        snapshot_lsn: Option<Lsn>,
        snapshot_valid: bool,
        committed: Lsn,
    ) -> Result<()>;

    /// Selects the rebuild source from retained history and returns the decision.
    fn select_rebuild_from_history(
        &self,
        id: SessionId,
        history: &RetainedHistory,
    ) -> Result<RebuildDecision>;

    /// Starts the base transfer.
    fn begin_rebuild_transfer(&self, id: SessionId) -> Result<()>;

    /// Records base progress.
    fn record_rebuild_transfer_progress(&self, id: SessionId, lsn: Lsn) -> Result<()>;

    /// Starts the tail replay (snapshot + tail, after the base reached the snapshot).
    fn begin_rebuild_tail_replay(&self, id: SessionId) -> Result<()>;

    /// Records tail progress.
    fn record_rebuild_tail_progress(&self, id: SessionId, lsn: Lsn) -> Result<()>;

    /// Completes a rebuild session and marks the replica `in_sync`: the rebuild must be ready
    /// and the replica must have reported its data durable at the target.
    fn complete_rebuild(&self, id: SessionId) -> Result<()>;
}

impl SenderProtocol for Sender {
    fn new(replica_id: ReplicaId, endpoint: Endpoint, epoch: Epoch) -> Self {
        Sender::new(replica_id, endpoint, epoch)
    }

    fn with_id_source(
        replica_id: ReplicaId,
        endpoint: Endpoint,
        epoch: Epoch,
        ids: Arc<SessionIdSource>,
    ) -> Self {
        Sender::with_id_source(replica_id, endpoint, epoch, ids)
    }

    fn update_epoch(&self, epoch: Epoch) -> Option<Invalidation> {
        Sender::update_epoch(self, epoch)
    }

    fn reassign(&self, endpoint: &Endpoint, epoch: Epoch) -> Result<Vec<Invalidation>> {
        Sender::reassign(self, endpoint, epoch)
    }

    fn attach_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        opts: SessionOptions,
    ) -> Result<SessionId> {
        Sender::attach_session(self, epoch, kind, opts)
    }

    fn supersede_session(
        &self,
        epoch: Epoch,
        kind: SessionKind,
        reason: InvalidateReason,
        opts: SessionOptions,
    ) -> Result<(Option<Invalidation>, SessionId)> {
        Sender::supersede_session(self, epoch, kind, reason, opts)
    }

    fn stop(&self) -> Option<Invalidation> {
        Sender::stop(self)
    }

    fn invalidate_session(&self, reason: InvalidateReason, to: Demotion) -> Option<Invalidation> {
        Sender::invalidate_session(self, reason, to)
    }

    fn invalidate_session_if(
        &self,
        id: SessionId,
        reason: InvalidateReason,
        to: Demotion,
    ) -> Option<Invalidation> {
        Sender::invalidate_session_if(self, id, reason, to)
    }

    fn fence_session_if(&self, id: SessionId, reason: InvalidateReason) -> Option<Invalidation> {
        Sender::fence_session_if(self, id, reason)
    }

    fn begin_connect(&self, id: SessionId) -> Result<()> {
        Sender::begin_connect(self, id)
    }

    fn record_handshake(&self, id: SessionId, start: Lsn, target: Lsn) -> Result<()> {
        Sender::record_handshake(self, id, start, target)
    }

    fn record_handshake_with_outcome(
        &self,
        id: SessionId,
        hr: &HandshakeResult,
    ) -> Result<Outcome> {
        Sender::record_handshake_with_outcome(self, id, hr)
    }

    fn record_handshake_from_history(
        &self,
        id: SessionId,
        replica_flushed: Lsn,
        history: &RetainedHistory,
    ) -> Result<(Outcome, RecoverabilityProof)> {
        Sender::record_handshake_from_history(self, id, replica_flushed, history)
    }

    fn record_handshake_with_proof(
        &self,
        id: SessionId,
        history: &RetainedHistory,
        proof: &RecoverabilityProof,
    ) -> Result<Outcome> {
        Sender::record_handshake_with_proof(self, id, history, proof)
    }

    fn begin_catch_up(&self, id: SessionId, start_tick: Option<Tick>) -> Result<()> {
        Sender::begin_catch_up(self, id, start_tick)
    }

    fn record_catch_up_progress(&self, id: SessionId, lsn: Lsn, tick: Option<Tick>) -> Result<()> {
        Sender::record_catch_up_progress(self, id, lsn, tick)
    }

    fn record_truncation(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        Sender::record_truncation(self, id, lsn)
    }

    fn record_barrier(&self, id: SessionId, durable: Lsn) -> Result<()> {
        Sender::record_barrier(self, id, durable)
    }

    fn complete_session_by_id(&self, id: SessionId) -> Result<()> {
        Sender::complete_session_by_id(self, id)
    }

    fn check_budget(&self, id: SessionId, now: Tick) -> Result<Option<BudgetViolation>> {
        Sender::check_budget(self, id, now)
    }

    fn select_rebuild_source(
        &self,
        id: SessionId,
        snapshot_lsn: Option<Lsn>,
        snapshot_valid: bool,
        committed: Lsn,
    ) -> Result<()> {
        Sender::select_rebuild_source(self, id, snapshot_lsn, snapshot_valid, committed)
    }

    fn select_rebuild_from_history(
        &self,
        id: SessionId,
        history: &RetainedHistory,
    ) -> Result<RebuildDecision> {
        Sender::select_rebuild_from_history(self, id, history)
    }

    fn begin_rebuild_transfer(&self, id: SessionId) -> Result<()> {
        Sender::begin_rebuild_transfer(self, id)
    }

    fn record_rebuild_transfer_progress(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        Sender::record_rebuild_transfer_progress(self, id, lsn)
    }

    fn begin_rebuild_tail_replay(&self, id: SessionId) -> Result<()> {
        Sender::begin_rebuild_tail_replay(self, id)
    }

    fn record_rebuild_tail_progress(&self, id: SessionId, lsn: Lsn) -> Result<()> {
        Sender::record_rebuild_tail_progress(self, id, lsn)
    }

    fn complete_rebuild(&self, id: SessionId) -> Result<()> {
        Sender::complete_rebuild(self, id)
    }
}
