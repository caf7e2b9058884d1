//! The recovery driver: turns a handshake into a plan, binds every value the executor needs at
//! plan time, and acquires the pins the plan needs. A plan owns its pins.

use std::sync::Arc;

use crate::adapter::{FullBasePin, RetentionPin, SnapshotPin, StorageAdapter};
use crate::error::{EngineError, PinKind, Result, StorageError};
use crate::history::{
    DivergencePoint, EntryId, ProofReason, RebuildReason, RecoverabilityProof, ReplicaHandshake,
    RetainedHistory,
};
use crate::observe::Event;
use crate::orchestrator::RecoveryOrchestrator;
use crate::outcome::Outcome;
use crate::rebuild::RebuildSource;
use crate::session::InvalidateReason;
use crate::types::{Demotion, Lsn, ReplicaId, SessionId, SessionKind, SessionPhase};

/// Everything an executor needs, fixed when the plan is made. The executor never re-derives
/// policy from storage.
///
/// A plan is read through its accessors and consumed by an executor (or
/// [`RecoveryDriver::cancel_plan`]). What it does is one [`PlanStep`], which carries exactly
/// the values that step needs; the pins it holds are private, so a caller can look at them but
/// cannot take one out or swap it for another.
#[derive(Debug)]
pub struct RecoveryPlan {
    replica_id: ReplicaId,
    session_id: Option<SessionId>,
    proof: Option<RecoverabilityProof>,
    step: PlanStep,
    /// Ends the session if the plan is dropped unexecuted (see [`RecoveryPlan`]'s `Drop`).
    guard: PlanGuard,
}

/// What a plan does: one variant per outcome, each with only its own values.
#[derive(Debug)]
pub enum PlanStep {
    /// Zero gap: the replica already held the committed LSN and its session completed when
    /// the plan was made. Holds nothing.
    InSync,
    /// Replay the WAL range `(from, target]`, held by a WAL pin.
    CatchUp(CatchUpStep),
    /// The replica is ahead of the committed LSN: truncate its uncommitted tail back to
    /// committed (no pin: nothing is read from the primary).
    Truncate(TruncateStep),
    /// Rebuild from a pinned base image (and the pinned WAL after a snapshot).
    Rebuild(RebuildStep),
    /// The replica cannot be caught up; a rebuild assignment must come first. Holds nothing.
    NeedsRebuild,
}

/// What the search for a divergence point found.
enum Divergence {
    /// No search: no epochs, or the logs agree where the usual plans look.
    NotSearched,
    /// The last shared entry, below the replica's head and committed.
    Found(DivergencePoint),
    /// The logs differ, but no usable point exists; why.
    Unusable(String),
}

/// A catch-up: the range and the WAL pin that keeps it.
#[derive(Debug)]
pub struct CatchUpStep {
    /// The replica's flushed LSN at the handshake (F).
    pub from: Lsn,
    /// The frozen target: committed at plan time (C).
    pub target: Lsn,
    /// Whether the replica named its tip and it matched the primary's entry at F.
    pub verified: bool,
    /// The replica's log left the primary's after `from`: it is first truncated to `from`,
    /// and its new tip must be this entry (the primary's at `from`).
    pub truncate_first: Option<EntryId>,
    pin: Option<RetentionPin>,
}

impl CatchUpStep {
    /// The WAL pin keeping `(from, target]`, while the plan holds it.
    pub fn pin(&self) -> Option<&RetentionPin> {
        self.pin.as_ref()
    }
}

/// A truncation of an uncommitted tail.
#[derive(Debug)]
pub struct TruncateStep {
    /// The committed LSN the replica is truncated back to (also the plan's target).
    pub to: Lsn,
    /// Whether the replica named its tip, so its tip after truncating is matched against
    /// `anchor`.
    pub verified: bool,
    /// The primary's entry at `to`: the replica's tip after truncating must be this entry.
    pub anchor: Option<EntryId>,
}

/// A rebuild: its source, target, reason and the pins of its image.
#[derive(Debug)]
pub struct RebuildStep {
    /// The rebuild target (committed at plan time).
    pub target: Lsn,
    /// Why the rebuild uses its source.
    pub reason: RebuildReason,
    base: RebuildBase,
}

/// The image a rebuild installs, with its pins (each `None` once released).
#[derive(Debug)]
enum RebuildBase {
    SnapshotTail {
        lsn: Lsn,
        snapshot: Option<SnapshotPin>,
        wal: Option<RetentionPin>,
    },
    FullBase {
        pin: Option<FullBasePin>,
    },
}

impl RebuildStep {
    /// The source: a snapshot plus the WAL tail, or a full base image.
    pub fn source(&self) -> RebuildSource {
        match self.base {
            RebuildBase::SnapshotTail { .. } => RebuildSource::SnapshotTail,
            RebuildBase::FullBase { .. } => RebuildSource::FullBase,
        }
    }

    /// The snapshot's LSN of a snapshot + tail rebuild.
    pub fn snapshot_lsn(&self) -> Option<Lsn> {
        match self.base {
            RebuildBase::SnapshotTail { lsn, .. } => Some(lsn),
            RebuildBase::FullBase { .. } => None,
        }
    }

    /// The LSN the base image represents: the snapshot's, or the target for a full base.
    pub fn base_lsn(&self) -> Lsn {
        self.snapshot_lsn().unwrap_or(self.target)
    }

    /// The snapshot pin of a snapshot + tail rebuild, while held.
    pub fn snapshot_pin(&self) -> Option<&SnapshotPin> {
        match &self.base {
            RebuildBase::SnapshotTail { snapshot, .. } => snapshot.as_ref(),
            RebuildBase::FullBase { .. } => None,
        }
    }

    /// The WAL pin after the snapshot of a snapshot + tail rebuild, while held.
    pub fn retention_pin(&self) -> Option<&RetentionPin> {
        match &self.base {
            RebuildBase::SnapshotTail { wal, .. } => wal.as_ref(),
            RebuildBase::FullBase { .. } => None,
        }
    }

    /// The full-base pin of a full-base rebuild, while held.
    pub fn full_base_pin(&self) -> Option<&FullBasePin> {
        match &self.base {
            RebuildBase::FullBase { pin } => pin.as_ref(),
            RebuildBase::SnapshotTail { .. } => None,
        }
    }

    /// The pin ID of the base image, while held.
    pub(crate) fn image_pin_id(&self) -> Option<crate::adapter::PinId> {
        self.snapshot_pin()
            .map(|p| p.pin_id)
            .or(self.full_base_pin().map(|p| p.pin_id))
    }
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
    fn new(replica_id: ReplicaId, session_id: Option<SessionId>, step: PlanStep) -> Self {
        RecoveryPlan {
            replica_id,
            session_id,
            proof: None,
            step,
            guard: PlanGuard::default(),
        }
    }

    /// The replica.
    pub fn replica_id(&self) -> &ReplicaId {
        &self.replica_id
    }

    /// The session the plan belongs to (the one its handshake ran under); `None` only for
    /// plans that never had one.
    pub fn session_id(&self) -> Option<SessionId> {
        self.session_id
    }

    /// The handshake outcome: zero gap, catch-up (replay or truncation) or needs rebuild.
    pub fn outcome(&self) -> Outcome {
        match self.step {
            PlanStep::InSync => Outcome::ZeroGap,
            PlanStep::CatchUp(_) | PlanStep::Truncate(_) => Outcome::CatchUp,
            PlanStep::Rebuild(_) | PlanStep::NeedsRebuild => Outcome::NeedsRebuild,
        }
    }

    /// The recoverability proof of the handshake (plans from
    /// [`RecoveryDriver::plan_recovery`]).
    pub fn proof(&self) -> Option<&RecoverabilityProof> {
        self.proof.as_ref()
    }

    /// What the plan does.
    pub fn step(&self) -> &PlanStep {
        &self.step
    }

    /// The LSN the plan brings the replica to, when it moves data (catch-up, truncation,
    /// rebuild).
    pub fn target(&self) -> Option<Lsn> {
        match &self.step {
            PlanStep::CatchUp(c) => Some(c.target),
            PlanStep::Truncate(t) => Some(t.to),
            PlanStep::Rebuild(r) => Some(r.target),
            PlanStep::InSync | PlanStep::NeedsRebuild => None,
        }
    }

    /// The catch-up step, if the plan is one.
    pub fn catch_up(&self) -> Option<&CatchUpStep> {
        match &self.step {
            PlanStep::CatchUp(c) => Some(c),
            _ => None,
        }
    }

    /// The truncation step, if the plan is one.
    pub fn truncation(&self) -> Option<&TruncateStep> {
        match &self.step {
            PlanStep::Truncate(t) => Some(t),
            _ => None,
        }
    }

    /// The rebuild step, if the plan is one.
    pub fn rebuild(&self) -> Option<&RebuildStep> {
        match &self.step {
            PlanStep::Rebuild(r) => Some(r),
            _ => None,
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
        match &self.step {
            PlanStep::CatchUp(c) => usize::from(c.pin.is_some()),
            PlanStep::Rebuild(r) => match &r.base {
                RebuildBase::SnapshotTail { snapshot, wal, .. } => {
                    usize::from(snapshot.is_some()) + usize::from(wal.is_some())
                }
                RebuildBase::FullBase { pin } => usize::from(pin.is_some()),
            },
            PlanStep::InSync | PlanStep::Truncate(_) | PlanStep::NeedsRebuild => 0,
        }
    }

    /// Drops every pin (WAL, then snapshot, then full base). Safe to call more than once.
    pub(crate) fn release_pins(&mut self) {
        match &mut self.step {
            PlanStep::CatchUp(c) => c.pin = None,
            PlanStep::Rebuild(r) => match &mut r.base {
                RebuildBase::SnapshotTail { snapshot, wal, .. } => {
                    *wal = None;
                    *snapshot = None;
                }
                RebuildBase::FullBase { pin } => *pin = None,
            },
            PlanStep::InSync | PlanStep::Truncate(_) | PlanStep::NeedsRebuild => {}
        }
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

    /// The last entry the replica's log shares with the primary's, when the replica's tip
    /// differs and that entry lies below both its head and committed; `None` when the logs
    /// agree where the usual plans look (then those plans apply), or when the point cannot be
    /// found from what the replica reported: no epochs, or no common entry at or above both
    /// the replica's floor (its checkpoint) and the primary's tail (those go to a rebuild as
    /// before).
    ///
    /// Two entries with the same LSN and epoch are the same entry (one primary writes each
    /// LSN once per epoch), and a shared entry means a shared prefix (log matching), so the
    /// point is found by binary search over the LSNs, comparing the replica's epoch there
    /// with the primary's entry. The executor checks the full identity (checksum included)
    /// after truncating, so a wrong guess fails the session, never the data.
    fn divergence_point(
        &self,
        replica: &ReplicaHandshake,
        history: &RetainedHistory,
        primary_at_flushed: Option<EntryId>,
    ) -> Result<Divergence> {
        let (Some(tip), Some(log)) = (replica.tip(), replica.log()) else {
            return Ok(Divergence::NotSearched);
        };
        let f = replica.flushed();
        let c = history.committed_lsn;
        if f <= c && primary_at_flushed == Some(tip) {
            return Ok(Divergence::NotSearched);
        }
        let upper = f.min(c).min(history.head_lsn);
        let lower = log.floor().max(history.tail_lsn);
        if lower > upper {
            return Ok(Divergence::Unusable(format!(
                "the replica can truncate no lower than {} and the primary retains entries only \
                 after {}, above the last LSN both logs could share ({upper})",
                log.floor(),
                history.tail_lsn
            )));
        }
        let shared = |lsn: Lsn| -> Result<Option<EntryId>> {
            if lsn == Lsn::ZERO {
                return Ok(Some(EntryId::ORIGIN));
            }
            let mine = log.epoch_at(lsn);
            Ok(self.entry_at(lsn)?.filter(|p| mine == Some(p.epoch)))
        };
        if f > c && shared(upper)?.is_some() {
            // Ahead of committed and sharing the entry at C: the truncate-only plan.
            return Ok(Divergence::NotSearched);
        }
        let Some(mut point) = shared(lower)? else {
            return Ok(Divergence::Unusable(format!(
                "the logs already differ at {lower}, the lowest LSN the replica's floor ({}) and \
                 the primary's tail ({}) allow",
                log.floor(),
                history.tail_lsn
            )));
        };
        // `lower` is shared; find the highest shared LSN below the first one that is not.
        let mut hi = upper;
        if let Some(p) = shared(hi)? {
            point = p;
        } else {
            let mut lo = lower;
            while hi.0 - lo.0 > 1 {
                let mid = Lsn(lo.0 + (hi.0 - lo.0) / 2);
                match shared(mid)? {
                    Some(p) => {
                        lo = mid;
                        point = p;
                    }
                    None => hi = mid,
                }
            }
        }
        if point.lsn >= upper {
            return Ok(Divergence::Unusable(format!(
                "the entries at {upper} carry the same epoch but are not the same entry"
            )));
        }
        Ok(Divergence::Found(DivergencePoint {
            replica_head: f,
            replica_tip: tip,
            point,
        }))
    }

    /// Plans the recovery of a replica that reports `replica` at its handshake.
    ///
    /// Reads one history snapshot and runs the handshake through the orchestrator. When the
    /// replica reported its tip identity, the primary's entry at F is looked up and the two
    /// logs are matched: a replica whose tip differs is not recoverable by catch-up (even at a
    /// zero gap) and escalates to rebuild. A zero gap is already complete (nothing pinned). A
    /// catch-up binds its range `(F, C]` and pins the WAL after F; a replica ahead of C gets a
    /// truncation-only plan with no pin. A pin failure invalidates the session
    /// (`wal_pin_failed`) so no live session is left without its resources (`needs_rebuild`
    /// when the range was recycled between the history read and the pin, `disconnected`
    /// otherwise). A needs-rebuild plan holds nothing: a rebuild assignment must come first.
    pub fn plan_recovery(&self, id: &ReplicaId, replica: ReplicaHandshake) -> Result<RecoveryPlan> {
        self.plan_recovery_inner(id, None, replica)
    }

    /// [`plan_recovery`](Self::plan_recovery) for the session `session` only. A caller that
    /// was handed a session (by an assignment) and plans later, perhaps on another thread,
    /// uses this: if a newer assignment or an epoch fence replaced or ended that session
    /// meanwhile, the plan is refused ([`EngineError::SessionIdMismatch`],
    /// [`EngineError::NoSession`], [`EngineError::StaleAuthority`], ...) and the sender's
    /// current session is left untouched, instead of the late planner running its handshake
    /// under the newer session. The check and the claim of the session (`init ->
    /// connecting`) happen under the sender's lock, so no assignment slips between them.
    pub fn plan_recovery_in(
        &self,
        id: &ReplicaId,
        session: SessionId,
        replica: ReplicaHandshake,
    ) -> Result<RecoveryPlan> {
        self.plan_recovery_inner(id, Some(session), replica)
    }

    fn plan_recovery_inner(
        &self,
        id: &ReplicaId,
        expected: Option<SessionId>,
        replica: ReplicaHandshake,
    ) -> Result<RecoveryPlan> {
        let replica_flushed = replica.flushed();
        // One history snapshot and the primary's entry at F, both checked by the orchestrator
        // (storage contract, anchor at F) before anything is decided from them.
        let history = self
            .storage
            .get_retained_history()
            .map_err(EngineError::HistoryUnavailable)?;
        let verified = replica.is_verified();
        let primary_at_flushed = if verified && replica_flushed <= history.committed_lsn {
            self.storage
                .entry_id(replica_flushed)
                .map_err(EngineError::HistoryUnavailable)?
        } else {
            None
        };
        // A replica whose log left the primary's below both its head and committed (an old
        // primary's uncommitted tail after a failover) is planned as the replica truncated to
        // the last entry both logs share, when the epochs it reported allow finding it.
        let divergence = if verified && !replica.is_incomplete() {
            self.divergence_point(&replica, &history, primary_at_flushed)?
        } else {
            Divergence::NotSearched
        };
        let mut unusable = None;
        let divergence = match divergence {
            Divergence::Found(d) => Some(d),
            Divergence::NotSearched => None,
            Divergence::Unusable(detail) => {
                // The usual plans follow (a rebuild, as without the epochs); the proof and
                // the log say why the point did not help.
                self.orchestrator.log().record(
                    id,
                    expected,
                    Event::DivergenceUnusable {
                        detail: detail.clone(),
                    },
                );
                unusable = Some(detail);
                None
            }
        };
        let result = match divergence {
            Some(d) => {
                self.orchestrator.log().record(
                    id,
                    expected,
                    Event::DivergenceFound {
                        replica_head: d.replica_head,
                        point: d.point.lsn,
                    },
                );
                self.orchestrator.execute_recovery_in(
                    id,
                    expected,
                    &ReplicaHandshake::new(d.point.lsn, d.point),
                    &history,
                    Some(d.point),
                    Some(d),
                )?
            }
            None => self.orchestrator.execute_recovery_in(
                id,
                expected,
                &replica,
                &history,
                primary_at_flushed,
                None,
            )?,
        };
        // The plan carries the session its handshake ran under, never whatever session the
        // sender holds by now (another thread may have attached one since a zero gap
        // completed, and cancelling this plan must not touch it).
        let sid = result.session_id;
        let mut result = result;
        result.proof.divergence_unusable = unusable;
        let step = match result.outcome {
            Outcome::ZeroGap => PlanStep::InSync,
            Outcome::NeedsRebuild => PlanStep::NeedsRebuild,
            Outcome::CatchUp => return self.plan_catch_up(id, sid, result.proof, verified),
        };
        let mut plan = RecoveryPlan::new(id.clone(), Some(sid), step);
        plan.proof = Some(result.proof);
        Ok(plan)
    }

    /// The catch-up (or truncation) half of [`plan_recovery`](Self::plan_recovery): the
    /// session `sid` is in `handshake` with `proof`.
    fn plan_catch_up(
        &self,
        id: &ReplicaId,
        sid: SessionId,
        proof: RecoverabilityProof,
        verified: bool,
    ) -> Result<RecoveryPlan> {
        let committed = proof.committed_lsn;
        let replica_flushed = proof.replica_flushed_lsn;
        let log = self.orchestrator.log();
        let truncate = matches!(
            proof.reason,
            ProofReason::ReplicaAheadNeedsTruncation { .. }
        );
        let step = if truncate {
            let anchor = if verified {
                match self.entry_at(committed) {
                    Ok(anchor) => anchor,
                    Err(e) => {
                        self.fail_session(
                            id,
                            sid,
                            InvalidateReason::HandshakeFailed,
                            Demotion::Disconnected,
                        );
                        return Err(e);
                    }
                }
            } else {
                None
            };
            log.record(
                id,
                Some(sid),
                Event::PlanTruncateOnly {
                    truncate_to: committed,
                },
            );
            PlanStep::Truncate(TruncateStep {
                to: committed,
                verified,
                anchor,
            })
        } else {
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
                    PlanStep::CatchUp(CatchUpStep {
                        from: replica_flushed,
                        target: committed,
                        verified,
                        truncate_first: proof.divergence.map(|d| d.point),
                        pin: Some(pin),
                    })
                }
                Err(e) => {
                    log.record(
                        id,
                        Some(sid),
                        Event::WalPinFailed {
                            error: e.to_string(),
                        },
                    );
                    // The history said the range was retained, but the storage recycled it
                    // before the pin could be taken (a race with the flusher): the replica is
                    // now beyond retention and only a rebuild can help. Any other pin failure
                    // is transient.
                    let state = if matches!(e, StorageError::Recycled { .. }) {
                        Demotion::NeedsRebuild
                    } else {
                        Demotion::Disconnected
                    };
                    self.fail_session(id, sid, InvalidateReason::WalPinFailed, state);
                    return Err(EngineError::PinFailed {
                        kind: PinKind::WalRetention,
                        error: e,
                    });
                }
            }
        };
        let mut plan = RecoveryPlan::new(id.clone(), Some(sid), step);
        plan.proof = Some(proof);
        plan.arm(&self.orchestrator, sid);
        Ok(plan)
    }

    /// Plans a rebuild for a replica whose current session is a rebuild session still in
    /// `init`. Chooses the source from one history snapshot and pins what it needs:
    /// snapshot + tail pins the snapshot and the WAL after it (releasing the snapshot pin if
    /// the WAL pin fails); full base pins a base image at committed. Any pin failure
    /// invalidates the session with the pin's reason and leaves the replica `needs_rebuild`.
    pub fn plan_rebuild(&self, id: &ReplicaId) -> Result<RecoveryPlan> {
        self.plan_rebuild_inner(id, None)
    }

    /// [`plan_rebuild`](Self::plan_rebuild) for the session `session` only: if it is no longer
    /// the sender's current, active session with its authority intact (a newer assignment or
    /// an epoch fence replaced or ended it), the plan is refused and the current session left
    /// untouched. The check and the claim happen under the sender's lock (see
    /// [`plan_recovery_in`](Self::plan_recovery_in)).
    pub fn plan_rebuild_in(&self, id: &ReplicaId, session: SessionId) -> Result<RecoveryPlan> {
        self.plan_rebuild_inner(id, Some(session))
    }

    fn plan_rebuild_inner(
        &self,
        id: &ReplicaId,
        expected: Option<SessionId>,
    ) -> Result<RecoveryPlan> {
        let sender = self.orchestrator.sender(id)?;
        let snap = sender
            .session_snapshot()
            .ok_or_else(|| EngineError::NoSession {
                replica: id.clone(),
            })?;
        if let Some(given) = expected
            && given != snap.id
        {
            return Err(EngineError::SessionIdMismatch {
                replica: id.clone(),
                given,
                current: snap.id,
            });
        }
        if snap.kind != SessionKind::Rebuild {
            return Err(EngineError::WrongSessionKind {
                session: snap.id,
                kind: snap.kind,
                operation: "plan_rebuild",
            });
        }
        EngineError::require_phase(snap.id, "plan_rebuild", SessionPhase::Init, snap.phase)?;
        let sid = snap.id;
        // Claim the session before anything else: of two planners racing for it, the second
        // is refused here and leaves it alone.
        sender.claim_plan(sid)?;
        let history = match self.history() {
            Ok(h) => h,
            Err(e) => {
                // The claimed session ends as a dropped plan's would (`plan_dropped`).
                let mut unplanned =
                    RecoveryPlan::new(id.clone(), Some(sid), PlanStep::NeedsRebuild);
                unplanned.arm(&self.orchestrator, sid);
                drop(unplanned);
                return Err(e);
            }
        };
        let decision = history.rebuild_source_decision();
        let committed = history.committed_lsn;
        let log = self.orchestrator.log();

        let base = match (decision.source, decision.snapshot_lsn) {
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
                log.record(
                    id,
                    Some(sid),
                    Event::PlanRebuildSnapshotTail {
                        snapshot: snap_lsn,
                        target: committed,
                    },
                );
                RebuildBase::SnapshotTail {
                    lsn: snap_lsn,
                    snapshot: Some(snapshot_pin),
                    wal: Some(wal_pin),
                }
            }
            _ => match self.pin_full_base(committed) {
                Ok(p) => {
                    log.record(
                        id,
                        Some(sid),
                        Event::PlanRebuildFullBase {
                            reason: decision.reason.clone(),
                            committed,
                        },
                    );
                    RebuildBase::FullBase { pin: Some(p) }
                }
                Err(e) => {
                    log.record(
                        id,
                        Some(sid),
                        Event::FullBasePinFailed {
                            error: e.to_string(),
                        },
                    );
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
        };
        let step = PlanStep::Rebuild(RebuildStep {
            target: committed,
            reason: decision.reason,
            base,
        });
        let mut plan = RecoveryPlan::new(id.clone(), Some(sid), step);
        plan.arm(&self.orchestrator, sid);
        Ok(plan)
    }

    /// Releases the plan's pins and, if the plan's session is still the sender's current
    /// session, invalidates it (`cancelled: <reason>`, state `disconnected`). A finished plan (a
    /// zero gap that completed, or a needs-rebuild outcome) names a session that is no longer
    /// current, so cancelling it changes no state: it cannot end a session another thread
    /// attached since, nor demote an in-sync replica. Always logs `plan_cancelled`. Returns
    /// whether a session was invalidated. The plan is consumed: a cancelled plan cannot be
    /// executed.
    pub fn cancel_plan(&self, mut plan: RecoveryPlan, reason: &str) -> bool {
        plan.release_pins();
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
}
