//! The registry: one per volume, keyed by stable replica ID, fenced by epoch as a whole.
//!
//! Locking: one hierarchy, registry map lock before sender lock (before the log's leaf lock),
//! never the reverse; a sender never calls back into its registry. Operations that change the
//! replica set or fence epochs (`reconcile`, `apply_assignment`, `invalidate_epoch`,
//! `stop_all`) hold the map's write lock from their fence check to their last sender change,
//! so two of them never interleave: concurrent assignments at epochs 2 and 3 end as if the
//! epoch-3 one came last, whichever thread wins. Readers (`sender`, `all`, `status`) take the
//! read lock only to clone `Arc`s and read senders after releasing it.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use crate::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::budget::CatchUpBudget;
use crate::error::{EngineError, Result};
use crate::observe::RegistryStatus;
use crate::sender::{Invalidation, Sender};
use crate::session::{InvalidateReason, SessionIdSource, SessionOptions};
use crate::types::{Endpoint, Epoch, ReplicaId, ReplicaState, SessionId, SessionKind};

/// One replica in an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaAssignment {
    /// Stable identity.
    pub replica_id: ReplicaId,
    /// Where it is now.
    pub endpoint: Endpoint,
}

/// What the control plane wants for one volume at one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignmentIntent {
    /// The full replica set.
    pub replicas: Vec<ReplicaAssignment>,
    /// The epoch the intent was issued under.
    pub epoch: Epoch,
    /// Replicas that need a recovery session, and of which kind.
    pub recovery_targets: BTreeMap<ReplicaId, SessionKind>,
    /// Budget for the catch-up sessions this intent creates (rebuild sessions get none).
    pub catch_up_budget: Option<CatchUpBudget>,
}

/// The effect of [`Registry::reconcile`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileResult {
    /// Senders created, sorted.
    pub added: Vec<ReplicaId>,
    /// Senders stopped and removed, sorted.
    pub removed: Vec<ReplicaId>,
    /// Sessions that lost their authority (endpoint change, epoch advance, removal), in
    /// replica order.
    pub invalidated: Vec<Invalidation>,
    /// Senders the intent could not change because they are at a newer epoch than it (raised
    /// alone by `invalidate_epoch`): left as they were, in replica order.
    pub refused: Vec<(ReplicaId, EngineError)>,
}

/// The effect of [`Registry::apply_assignment`]. Every list is in replica-ID order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignmentResult {
    /// Senders created.
    pub added: Vec<ReplicaId>,
    /// Senders removed.
    pub removed: Vec<ReplicaId>,
    /// Sessions that lost their authority during reconcile.
    pub invalidated: Vec<Invalidation>,
    /// Senders newer than the intent, left as they were (see [`ReconcileResult::refused`]).
    pub refused: Vec<(ReplicaId, EngineError)>,
    /// New sessions attached.
    pub sessions_created: Vec<(ReplicaId, SessionId)>,
    /// Sessions replaced: the old session (if one was active) and the new ID.
    pub sessions_superseded: Vec<(ReplicaId, Option<SessionId>, SessionId)>,
    /// Active sessions of the requested kind left running (a re-delivered assignment does not
    /// restart a recovery that is already under way).
    pub sessions_kept: Vec<(ReplicaId, SessionId)>,
    /// Targets that got no session, with the reason.
    pub sessions_failed: Vec<(ReplicaId, EngineError)>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    senders: BTreeMap<ReplicaId, Arc<Sender>>,
    /// Highest epoch any accepted intent carried. Intents below it change nothing.
    epoch: Epoch,
}

/// The set of senders of one volume.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<RegistryInner>,
    ids: Arc<SessionIdSource>,
}

impl Registry {
    /// An empty registry at epoch 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, RegistryInner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, RegistryInner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The highest epoch an accepted intent carried.
    pub fn epoch(&self) -> Epoch {
        self.read().epoch
    }

    /// Makes the sender set match `replicas` at `epoch`.
    ///
    /// The whole call is fenced: an epoch below the registry's is refused with
    /// [`EngineError::StaleIntent`] and nothing changes (the reference let a stale intent add,
    /// remove and re-address senders). Otherwise: an ID listed twice keeps its last endpoint;
    /// senders not listed are stopped and removed; existing senders get the endpoint first and
    /// then the epoch (so an endpoint change leaves them `disconnected`); missing senders are
    /// created. The same sender object survives an address change. A sender newer than the
    /// intent (raised alone by `invalidate_epoch`) is neither changed nor removed and is listed in
    /// [`ReconcileResult::refused`]. Runs under the map's write lock from start to end.
    pub fn reconcile(
        &self,
        replicas: &[ReplicaAssignment],
        epoch: Epoch,
    ) -> Result<ReconcileResult> {
        let mut g = self.write();
        Self::reconcile_locked(&mut g, &self.ids, replicas, epoch)
    }

    fn reconcile_locked(
        g: &mut RegistryInner,
        ids: &Arc<SessionIdSource>,
        replicas: &[ReplicaAssignment],
        epoch: Epoch,
    ) -> Result<ReconcileResult> {
        if epoch < g.epoch {
            return Err(EngineError::StaleIntent {
                intent: epoch,
                registry: g.epoch,
            });
        }
        // The wanted set, sorted by ID with the last entry of a repeated ID kept. A stable sort
        // of an already sorted list (the usual case) is linear, and walking it beside the
        // registry's sorted map is a merge: no per-replica map lookups, no string clones for
        // senders that already exist.
        let mut wanted: Vec<&ReplicaAssignment> = replicas.iter().collect();
        wanted.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        let mut deduped: Vec<&ReplicaAssignment> = Vec::with_capacity(wanted.len());
        for r in wanted {
            match deduped.last_mut() {
                Some(last) if last.replica_id == r.replica_id => *last = r,
                _ => deduped.push(r),
            }
        }

        g.epoch = epoch;
        let mut result = ReconcileResult::default();
        let mut gone = Vec::new();
        let mut new = Vec::new();
        {
            let mut have = g.senders.iter().peekable();
            let mut want = deduped.iter().peekable();
            loop {
                match (have.peek(), want.peek()) {
                    (None, None) => break,
                    (Some((_, sender)), None) => {
                        gone.push(Arc::clone(sender));
                        have.next();
                    }
                    (None, Some(_)) => {
                        new.extend(want.next().copied());
                    }
                    (Some((hid, sender)), Some(w)) => match (*hid).cmp(&w.replica_id) {
                        std::cmp::Ordering::Less => {
                            gone.push(Arc::clone(sender));
                            have.next();
                        }
                        std::cmp::Ordering::Greater => {
                            new.extend(want.next().copied());
                        }
                        std::cmp::Ordering::Equal => {
                            if let Err(e) =
                                sender.reassign_into(&w.endpoint, epoch, &mut result.invalidated)
                            {
                                result.refused.push((w.replica_id.clone(), e));
                            }
                            have.next();
                            want.next();
                        }
                    },
                }
            }
        }
        for s in gone {
            // A sender raised alone past the intent is newer than it: the intent cannot
            // remove it. Checked and stopped under the sender's one lock, so a concurrent
            // raise (which takes no map lock) lands either before (refused) or after (on a
            // stopped sender, which reports it).
            match s.stop_for_intent(epoch) {
                Ok(inv) => {
                    g.senders.remove(s.replica_id());
                    result.removed.push(s.replica_id().clone());
                    result.invalidated.extend(inv);
                }
                Err(e) => result.refused.push((s.replica_id().clone(), e)),
            }
        }
        let created: Vec<(ReplicaId, Arc<Sender>)> = new
            .into_iter()
            .map(|r| {
                result.added.push(r.replica_id.clone());
                let s = Sender::with_id_source(
                    r.replica_id.clone(),
                    r.endpoint.clone(),
                    epoch,
                    Arc::clone(ids),
                );
                (r.replica_id.clone(), Arc::new(s))
            })
            .collect();
        if created.len() * 8 > g.senders.len() {
            // Many new senders (a new volume, a big assignment): rebuild the map from one
            // sequence. `BTreeMap`'s `FromIterator` sorts its input (a merge of two sorted
            // runs here, linear) and bulk-builds the tree, instead of one logarithmic insert
            // each.
            let old = std::mem::take(&mut g.senders);
            g.senders = old.into_iter().chain(created).collect();
        } else {
            for (id, sender) in created {
                g.senders.insert(id, sender);
            }
        }
        result
            .invalidated
            .sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        Ok(result)
    }

    /// Reconciles, then attaches a session for each recovery target, in replica-ID order:
    /// - the sender is missing, or its epoch is not the intent's: failed;
    /// - no active session: a new session (created);
    /// - an active session of the same kind: kept as is (a duplicate or late re-delivery of
    ///   the same assignment must not restart a recovery under way);
    /// - an active session of another kind: superseded with `assignment_intent`.
    ///
    /// The whole call holds the map's write lock, so no other assignment or epoch fence
    /// interleaves with it; each sender still re-checks the intent's epoch under its own lock.
    pub fn apply_assignment(&self, intent: &AssignmentIntent) -> Result<AssignmentResult> {
        let mut g = self.write();
        let rec = Self::reconcile_locked(&mut g, &self.ids, &intent.replicas, intent.epoch)?;
        let mut result = AssignmentResult {
            added: rec.added,
            removed: rec.removed,
            invalidated: rec.invalidated,
            refused: rec.refused,
            ..AssignmentResult::default()
        };
        for (id, kind) in &intent.recovery_targets {
            let opts = match (kind, intent.catch_up_budget) {
                (SessionKind::Rebuild, _) | (_, None) => SessionOptions::default(),
                (_, Some(b)) => SessionOptions::with_budget(b),
            };
            let Some(sender) = g.senders.get(id) else {
                result.sessions_failed.push((
                    id.clone(),
                    EngineError::SenderNotFound {
                        replica: id.clone(),
                    },
                ));
                continue;
            };
            if let Some(snap) = sender.session_snapshot()
                && snap.kind == *kind
                && snap.epoch == intent.epoch
            {
                result.sessions_kept.push((id.clone(), snap.id));
                continue;
            }
            match sender.attach_session(intent.epoch, *kind, opts) {
                Ok(sid) => result.sessions_created.push((id.clone(), sid)),
                Err(EngineError::SessionStillActive { .. }) => {
                    match sender.supersede_session(
                        intent.epoch,
                        *kind,
                        InvalidateReason::AssignmentIntent,
                        opts,
                    ) {
                        Ok((old, new)) => result.sessions_superseded.push((
                            id.clone(),
                            old.map(|o| o.session_id),
                            new,
                        )),
                        Err(e) => result.sessions_failed.push((id.clone(), e)),
                    }
                }
                Err(EngineError::EpochMismatch {
                    requested, sender, ..
                }) if requested < sender => result.sessions_failed.push((
                    id.clone(),
                    EngineError::StaleIntent {
                        intent: requested,
                        registry: sender,
                    },
                )),
                Err(e) => result.sessions_failed.push((id.clone(), e)),
            }
        }
        Ok(result)
    }

    /// The sender for `id`.
    pub fn sender(&self, id: &ReplicaId) -> Option<Arc<Sender>> {
        self.read().senders.get(id).cloned()
    }

    /// All senders, sorted by replica ID.
    pub fn all(&self) -> Vec<Arc<Sender>> {
        self.read().senders.values().cloned().collect()
    }

    /// Number of senders.
    pub fn len(&self) -> usize {
        self.read().senders.len()
    }

    /// True when there are no senders.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every sender; stopped senders stay registered. Returns the sessions invalidated.
    /// Holds the map lock, so no sender is added half-way.
    pub fn stop_all(&self) -> Vec<Invalidation> {
        let g = self.write();
        g.senders.values().filter_map(|s| s.stop()).collect()
    }

    /// Number of senders in `in_sync`.
    pub fn in_sync_count(&self) -> usize {
        self.all()
            .iter()
            .filter(|s| s.state() == ReplicaState::InSync)
            .count()
    }

    /// Fences the volume at `current`: raises the registry's fence (never lowers it), so a
    /// late intent from an older epoch can no longer change anything, and raises every sender
    /// to `current`. A session from an older epoch is invalidated (`epoch_bump`) and dropped
    /// (the sender becomes `disconnected`, or stays `needs_rebuild`), and a sender that was
    /// `in_sync` at the old epoch loses that proof: the reference left old proofs standing and
    /// let a session attached at the old epoch complete. Returns the sessions invalidated, in
    /// replica order. Holds the map lock throughout.
    pub fn invalidate_epoch(&self, current: Epoch) -> Vec<Invalidation> {
        let mut g = self.write();
        g.epoch = g.epoch.max(current);
        g.senders
            .values()
            .filter_map(|s| s.fence_epoch(current))
            .collect()
    }

    /// A consistent per-sender status plus counts. Each sender is read under its own lock,
    /// once; the registry lock is released before any sender is read.
    pub fn status(&self) -> RegistryStatus {
        RegistryStatus::from_senders(self.all().iter().map(|s| s.status()).collect())
    }
}
