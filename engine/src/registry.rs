//! The registry: one per volume, keyed by stable replica ID, fenced by epoch as a whole.
//!
//! Locking: the registry's map lock is never held while a sender's lock is taken. Each
//! operation reads or edits the map, releases it, and then talks to the senders it collected.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
    /// created. The same sender object survives an address change.
    pub fn reconcile(
        &self,
        replicas: &[ReplicaAssignment],
        epoch: Epoch,
    ) -> Result<ReconcileResult> {
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

        let mut removed_senders = Vec::new();
        let mut existing: Vec<(Arc<Sender>, &Endpoint)> = Vec::with_capacity(deduped.len());
        let mut added = Vec::new();
        {
            let mut g = self.write();
            if epoch < g.epoch {
                return Err(EngineError::StaleIntent {
                    intent: epoch,
                    registry: g.epoch,
                });
            }
            g.epoch = epoch;
            let mut gone = Vec::new();
            let mut new = Vec::new();
            {
                let mut have = g.senders.iter().peekable();
                let mut want = deduped.iter().peekable();
                loop {
                    match (have.peek(), want.peek()) {
                        (None, None) => break,
                        (Some((id, _)), None) => {
                            gone.push((*id).clone());
                            have.next();
                        }
                        (None, Some(_)) => {
                            new.extend(want.next().copied());
                        }
                        (Some((hid, sender)), Some(w)) => match (*hid).cmp(&w.replica_id) {
                            std::cmp::Ordering::Less => {
                                gone.push((*hid).clone());
                                have.next();
                            }
                            std::cmp::Ordering::Greater => {
                                new.extend(want.next().copied());
                            }
                            std::cmp::Ordering::Equal => {
                                existing.push((Arc::clone(sender), &w.endpoint));
                                have.next();
                                want.next();
                            }
                        },
                    }
                }
            }
            for id in gone {
                if let Some(s) = g.senders.remove(&id) {
                    removed_senders.push(s);
                }
            }
            let created: Vec<(ReplicaId, Arc<Sender>)> = new
                .into_iter()
                .map(|r| {
                    added.push(r.replica_id.clone());
                    let s = Sender::with_id_source(
                        r.replica_id.clone(),
                        r.endpoint.clone(),
                        epoch,
                        Arc::clone(&self.ids),
                    );
                    (r.replica_id.clone(), Arc::new(s))
                })
                .collect();
            if created.len() * 8 > g.senders.len() {
                // Many new senders (a new volume, a big assignment): rebuild the map from one
                // sorted sequence, which the standard library bulk-builds in linear time,
                // instead of one logarithmic insert each.
                let old = std::mem::take(&mut g.senders);
                let mut merged = Vec::with_capacity(old.len() + created.len());
                let mut fresh = created.into_iter().peekable();
                for (id, sender) in old {
                    while let Some(next) = fresh.next_if(|(nid, _)| *nid < id) {
                        merged.push(next);
                    }
                    merged.push((id, sender));
                }
                merged.extend(fresh);
                g.senders = merged.into_iter().collect();
            } else {
                for (id, sender) in created {
                    g.senders.insert(id, sender);
                }
            }
        }

        let mut result = ReconcileResult {
            added,
            ..ReconcileResult::default()
        };
        for s in removed_senders {
            result.removed.push(s.replica_id().clone());
            result.invalidated.extend(s.stop());
        }
        for (s, ep) in existing {
            s.reassign(ep, epoch, &mut result.invalidated);
        }
        result
            .invalidated
            .sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        Ok(result)
    }

    /// Reconciles, then attaches a session for each recovery target, in replica-ID order:
    /// - the sender is missing, or its epoch is above the intent's: failed;
    /// - no active session: a new session (created);
    /// - an active session of the same kind: kept as is (a duplicate or late re-delivery of
    ///   the same assignment must not restart a recovery under way);
    /// - an active session of another kind: superseded with `assignment_intent`.
    pub fn apply_assignment(&self, intent: &AssignmentIntent) -> Result<AssignmentResult> {
        let rec = self.reconcile(&intent.replicas, intent.epoch)?;
        let mut result = AssignmentResult {
            added: rec.added,
            removed: rec.removed,
            invalidated: rec.invalidated,
            ..AssignmentResult::default()
        };
        for (id, kind) in &intent.recovery_targets {
            let opts = match (kind, intent.catch_up_budget) {
                (SessionKind::Rebuild, _) | (_, None) => SessionOptions::default(),
                (_, Some(b)) => SessionOptions::with_budget(b),
            };
            let Some(sender) = self.sender(id) else {
                result.sessions_failed.push((
                    id.clone(),
                    EngineError::SenderNotFound {
                        replica: id.clone(),
                    },
                ));
                continue;
            };
            if intent.epoch < sender.epoch() {
                result.sessions_failed.push((
                    id.clone(),
                    EngineError::StaleIntent {
                        intent: intent.epoch,
                        registry: sender.epoch(),
                    },
                ));
                continue;
            }
            if let Some(snap) = sender.session_snapshot()
                && snap.kind == *kind
            {
                result.sessions_kept.push((id.clone(), snap.id));
                continue;
            }
            match sender.attach_session(intent.epoch, *kind, opts) {
                Ok(sid) => result.sessions_created.push((id.clone(), sid)),
                Err(EngineError::SessionStillActive { .. }) => {
                    match sender.supersede_session(*kind, InvalidateReason::AssignmentIntent, opts)
                    {
                        Some((old, new)) => result.sessions_superseded.push((
                            id.clone(),
                            old.map(|o| o.session_id),
                            new,
                        )),
                        None => result.sessions_failed.push((
                            id.clone(),
                            EngineError::SenderStopped {
                                replica: id.clone(),
                            },
                        )),
                    }
                }
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
    pub fn stop_all(&self) -> Vec<Invalidation> {
        self.all().iter().filter_map(|s| s.stop()).collect()
    }

    /// Number of senders in `in_sync`.
    pub fn in_sync_count(&self) -> usize {
        self.all()
            .iter()
            .filter(|s| s.state() == ReplicaState::InSync)
            .count()
    }

    /// Raises the registry's fence epoch (never lowers it): intents below it are refused.
    pub fn raise_epoch(&self, epoch: Epoch) {
        let mut g = self.write();
        g.epoch = g.epoch.max(epoch);
    }

    /// Fences every active session whose epoch is below `current` (`epoch_bump`; the sender
    /// becomes `disconnected`, or stays `needs_rebuild`), and raises the registry's fence to
    /// `current` so a late intent from an older epoch can no longer change anything. Sender
    /// epochs are not raised. Returns the sessions invalidated, in replica order.
    pub fn invalidate_epoch(&self, current: Epoch) -> Vec<Invalidation> {
        self.raise_epoch(current);
        self.all()
            .iter()
            .filter_map(|s| {
                let snap = s.session_snapshot()?;
                if snap.epoch >= current {
                    return None;
                }
                s.fence_session_if(snap.id, InvalidateReason::EpochBump)
            })
            .collect()
    }

    /// A consistent per-sender status plus counts. Each sender is read under its own lock,
    /// once; the registry lock is released before any sender is read.
    pub fn status(&self) -> RegistryStatus {
        RegistryStatus::from_senders(self.all().iter().map(|s| s.status()).collect())
    }
}
