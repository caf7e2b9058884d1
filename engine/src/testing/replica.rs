//! A model replica and the model I/O that moves real (model) data from a [`MemStorage`]
//! primary into it. End-to-end engine tests compare the replica's state with the primary's
//! `state_at(target)`, so even engine tests check data, not only states.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::TransferError;
use crate::executor::{BaseChunkProgress, BaseRequest, CatchUpIo, RebuildIo, WalChunk};
use crate::history::{EntryId, EpochStart, ReplicaHandshake, ReplicaLog};
use crate::testing::history::{BlockState, ModelEntry};
use crate::testing::storage::MemStorage;
use crate::types::{Epoch, Lsn};

/// A replica: a base image at `base_lsn` plus a contiguous log of entries after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelReplica {
    base: BlockState,
    base_lsn: Lsn,
    /// Identity of the entry at `base_lsn` (the origin for an empty replica).
    base_tip: Option<EntryId>,
    log: Vec<ModelEntry>,
    durable: Lsn,
    /// Entries at or below this LSN are "flushed" into the base and cannot be truncated.
    checkpoint: Lsn,
    installing: Option<(Lsn, BlockState)>,
}

impl ModelReplica {
    /// An empty replica.
    pub fn new() -> Self {
        Self::default()
    }

    /// A replica holding the primary's entries up to `prefix`, durable, rebuilt from the
    /// primary's never-recycled reference history (so it works even when those entries were
    /// recycled on the primary). `None` if the primary never wrote `prefix` contiguously.
    pub fn from_primary(primary: &MemStorage, prefix: Lsn) -> Option<Self> {
        let reference = primary.reference_history();
        let log = reference.entries_in_range(Lsn::ZERO, prefix).ok()?;
        let r = ModelReplica {
            base: BlockState::new(),
            base_lsn: Lsn::ZERO,
            base_tip: Some(EntryId::ORIGIN),
            log,
            durable: prefix,
            checkpoint: Lsn::ZERO,
            installing: None,
        };
        (r.head() == prefix && reference.is_recoverable(Lsn::ZERO, prefix)).then_some(r)
    }

    /// The last LSN held.
    pub fn head(&self) -> Lsn {
        self.log.last().map_or(self.base_lsn, |e| e.lsn)
    }

    /// The identity of the entry at `lsn`, if the replica still knows it (its log, or the
    /// entry its base was installed at).
    pub fn entry_id(&self, lsn: Lsn) -> Option<EntryId> {
        if lsn == self.base_lsn {
            return if lsn == Lsn::ZERO {
                Some(EntryId::ORIGIN)
            } else {
                self.base_tip
            };
        }
        self.entry(lsn).map(|e| e.id())
    }

    /// The identity of the last entry held.
    pub fn tip(&self) -> Option<EntryId> {
        self.entry_id(self.head())
    }

    /// What this replica reports at a handshake: its head and the identity of its tip.
    pub fn handshake(&self) -> ReplicaHandshake {
        if self.installing.is_some() {
            return ReplicaHandshake::incomplete(self.head());
        }
        // An empty log has no tip to name: only its LSN (zero) can be reported.
        match self.tip() {
            Some(tip) => ReplicaHandshake::new(self.head(), tip),
            None => ReplicaHandshake::unverified(self.head()),
        }
    }

    /// [`handshake`](Self::handshake) with the epochs of the log it can still truncate (from
    /// its checkpoint up), so a divergent log can be truncated to where it left the primary's.
    pub fn handshake_with_log(&self) -> ReplicaHandshake {
        let hs = self.handshake();
        let floor = self.checkpoint.max(self.base_lsn);
        let mut starts: Vec<EpochStart> = Vec::new();
        let mut lsn = floor;
        while lsn <= self.head() {
            if let Some(id) = self.entry_id(lsn)
                && starts.last().is_none_or(|s| s.epoch != id.epoch)
            {
                starts.push(EpochStart {
                    epoch: id.epoch,
                    first: lsn,
                });
            }
            lsn = lsn.next();
        }
        match ReplicaLog::new(floor, &starts) {
            Ok(log) => hs.with_log(log),
            Err(_) => hs,
        }
    }

    /// The last LSN made durable by a barrier.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// The LSN below which nothing can be truncated.
    pub fn checkpoint(&self) -> Lsn {
        self.checkpoint
    }

    /// True while a base install is in progress (the replica is not a valid copy then).
    pub fn installing(&self) -> bool {
        self.installing.is_some()
    }

    /// The block state the replica holds.
    pub fn state(&self) -> BlockState {
        let mut s = self.base.clone();
        for e in &self.log {
            s.insert(e.block, e.value);
        }
        s
    }

    /// The entry held at `lsn`, if it is in the log.
    pub fn entry(&self, lsn: Lsn) -> Option<ModelEntry> {
        self.log.iter().find(|e| e.lsn == lsn).copied()
    }

    /// Applies the next entry: only `head + 1`. A duplicate with identical content is
    /// accepted idempotently; a different entry at a held LSN is a divergence.
    pub fn apply(&mut self, entry: ModelEntry) -> Result<(), TransferError> {
        if self.installing.is_some() {
            return Err(TransferError::Fenced {
                detail: "base install in progress".into(),
            });
        }
        let head = self.head();
        if entry.lsn == head.next() {
            self.log.push(entry);
            return Ok(());
        }
        if entry.lsn <= head {
            return match self.entry(entry.lsn) {
                Some(held) if held == entry => Ok(()),
                Some(held) => Err(TransferError::Divergent {
                    lsn: entry.lsn,
                    detail: format!("replica holds {held:?}, primary sent {entry:?}"),
                }),
                None => Err(TransferError::Divergent {
                    lsn: entry.lsn,
                    detail: "LSN already in the replica's base".into(),
                }),
            };
        }
        Err(TransferError::Gap {
            expected: head.next(),
            found: entry.lsn,
        })
    }

    /// Appends `n` uncommitted entries that the primary never wrote (a divergent tail, as an
    /// old primary leaves behind). Returns the new head.
    pub fn append_divergent(&mut self, n: u64, epoch: Epoch) -> Lsn {
        for _ in 0..n {
            let lsn = self.head().next();
            self.log.push(ModelEntry {
                lsn,
                epoch,
                block: lsn.get() % 8,
                value: u64::MAX - lsn.get(),
            });
        }
        self.head()
    }

    /// Moves everything up to `lsn` into the base (like a flusher); truncation can no longer
    /// go below it.
    pub fn flush_to(&mut self, lsn: Lsn) {
        let lsn = lsn.min(self.head());
        if lsn > self.base_lsn {
            self.base_tip = self.entry_id(lsn);
        }
        for e in self.log.iter().filter(|e| e.lsn <= lsn) {
            self.base.insert(e.block, e.value);
        }
        self.log.retain(|e| e.lsn > lsn);
        self.base_lsn = self.base_lsn.max(lsn);
        self.checkpoint = self.checkpoint.max(lsn);
    }

    /// Drops entries after `lsn`; refused below the checkpoint. Returns the new tip.
    pub fn truncate_after(&mut self, lsn: Lsn) -> Result<EntryId, TransferError> {
        if lsn < self.checkpoint {
            return Err(TransferError::TruncateBelowCheckpoint {
                requested: lsn,
                checkpoint: self.checkpoint,
            });
        }
        self.log.retain(|e| e.lsn <= lsn);
        self.durable = self.durable.min(self.head());
        self.tip().ok_or_else(|| TransferError::Storage {
            detail: format!("replica lost the identity of its entry at {}", self.head()),
        })
    }
}

/// Faults the model I/O can inject.
#[derive(Clone, Debug, Default)]
pub struct IoFaults {
    /// Fail the WAL chunk with this (0-based) call index.
    pub fail_stream_call: Option<u64>,
    /// The error for that failure (a transport error by default).
    pub stream_error: Option<TransferError>,
    /// Fail the base chunk with this (0-based) call index.
    pub fail_base_call: Option<u64>,
    /// Fail the barrier.
    pub fail_barrier: bool,
    /// Report a durable LSN this much lower than the truth.
    pub barrier_short_by: u64,
}

/// Counters of what the model I/O did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// WAL chunk calls.
    pub stream_calls: u64,
    /// Entries applied.
    pub entries_applied: u64,
    /// Truncations executed.
    pub truncations: u64,
    /// Base chunks transferred.
    pub base_chunks: u64,
    /// Base entries installed.
    pub base_entries: u64,
    /// Barriers.
    pub barriers: u64,
}

struct BaseTransfer {
    lsn: Lsn,
    image: Vec<(u64, u64)>,
    cursor: usize,
}

/// Moves model data from a [`MemStorage`] primary to a [`ModelReplica`].
pub struct ModelIo {
    primary: MemStorage,
    replica: Arc<Mutex<ModelReplica>>,
    base: Option<BaseTransfer>,
    /// Faults to inject.
    pub faults: IoFaults,
    /// What happened.
    pub stats: IoStats,
}

impl ModelIo {
    /// I/O from `primary` to `replica`.
    pub fn new(primary: MemStorage, replica: Arc<Mutex<ModelReplica>>) -> Self {
        ModelIo {
            primary,
            replica,
            base: None,
            faults: IoFaults::default(),
            stats: IoStats::default(),
        }
    }

    fn replica(&self) -> MutexGuard<'_, ModelReplica> {
        self.replica.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CatchUpIo for ModelIo {
    fn truncate_after(&mut self, lsn: Lsn) -> Result<EntryId, TransferError> {
        let tip = self.replica().truncate_after(lsn)?;
        self.stats.truncations += 1;
        Ok(tip)
    }

    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        up_to: Lsn,
        max_entries: u64,
    ) -> Result<WalChunk, TransferError> {
        let call = self.stats.stream_calls;
        self.stats.stream_calls += 1;
        if self.faults.fail_stream_call == Some(call) {
            return Err(self
                .faults
                .stream_error
                .clone()
                .unwrap_or(TransferError::Transport {
                    detail: format!("injected failure on WAL chunk {call}"),
                }));
        }
        let history = self.primary.history();
        // The entry the replica ends on must be the primary's entry at that LSN (log
        // matching), or shipping more would build on a divergent prefix.
        if let (Some(primary_entry), Some(replica_entry)) =
            (history.entry(after), self.replica().entry(after))
            && primary_entry != replica_entry
        {
            return Err(TransferError::Divergent {
                lsn: after,
                detail: format!("replica holds {replica_entry:?}, primary {primary_entry:?}"),
            });
        }
        let end = Lsn(after.get().saturating_add(max_entries)).min(up_to);
        let entries =
            history
                .entries_in_range(after, end)
                .map_err(|_| TransferError::Recycled {
                    from: after,
                    retained_start: history.tail().next(),
                })?;
        let mut expected = after.next();
        let mut replica = self.replica.lock().unwrap_or_else(PoisonError::into_inner);
        for e in &entries {
            if e.lsn != expected {
                return Err(TransferError::Gap {
                    expected,
                    found: e.lsn,
                });
            }
            replica.apply(*e)?;
            expected = expected.next();
        }
        if expected <= end {
            return Err(TransferError::Gap {
                expected,
                found: history.head().next(),
            });
        }
        let n = entries.len() as u64;
        drop(replica);
        self.stats.entries_applied += n;
        Ok(WalChunk {
            applied_to: end,
            entries: n,
            bytes: n * ModelEntry::WIRE_BYTES,
        })
    }

    fn barrier(&mut self, _target: Lsn) -> Result<Lsn, TransferError> {
        self.stats.barriers += 1;
        if self.faults.fail_barrier {
            return Err(TransferError::Transport {
                detail: "injected barrier failure".into(),
            });
        }
        let mut r = self.replica();
        r.durable = r.head();
        Ok(Lsn(r
            .durable
            .get()
            .saturating_sub(self.faults.barrier_short_by)))
    }
}

impl RebuildIo for ModelIo {
    fn begin_base(&mut self, base: &BaseRequest) -> Result<u64, TransferError> {
        let (lsn, image) = self.primary.pinned_image(base.pin_id).ok_or_else(|| {
            TransferError::BaseUnavailable {
                detail: format!("pin {} holds no image", base.pin_id),
            }
        })?;
        if lsn != base.lsn {
            return Err(TransferError::BaseUnavailable {
                detail: format!(
                    "pin {} holds an image at {lsn}, not {}",
                    base.pin_id, base.lsn
                ),
            });
        }
        let image: Vec<(u64, u64)> = image.iter().map(|(b, v)| (*b, *v)).collect();
        let total = image.len() as u64 * ModelEntry::WIRE_BYTES;
        self.replica().installing = Some((lsn, BlockState::new()));
        self.base = Some(BaseTransfer {
            lsn,
            image,
            cursor: 0,
        });
        Ok(total)
    }

    fn transfer_base_chunk(&mut self, max_bytes: u64) -> Result<BaseChunkProgress, TransferError> {
        let call = self.stats.base_chunks;
        self.stats.base_chunks += 1;
        if self.faults.fail_base_call == Some(call) {
            return Err(TransferError::Transport {
                detail: format!("injected failure on base chunk {call}"),
            });
        }
        let replica = Arc::clone(&self.replica);
        let Some(base) = self.base.as_mut() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no base transfer in progress".into(),
            });
        };
        let per_chunk =
            usize::try_from((max_bytes / ModelEntry::WIRE_BYTES).max(1)).unwrap_or(usize::MAX);
        let end = base.cursor.saturating_add(per_chunk).min(base.image.len());
        let mut r = replica.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, partial)) = r.installing.as_mut() else {
            return Err(TransferError::BaseUnavailable {
                detail: "replica is not installing a base".into(),
            });
        };
        for (b, v) in &base.image[base.cursor..end] {
            partial.insert(*b, *v);
        }
        let n = (end - base.cursor) as u64;
        base.cursor = end;
        self.stats.base_entries += n;
        Ok(BaseChunkProgress {
            bytes: n * ModelEntry::WIRE_BYTES,
            bytes_sent: n * ModelEntry::WIRE_BYTES,
            done: base.cursor == base.image.len(),
        })
    }

    fn finish_base(&mut self) -> Result<Lsn, TransferError> {
        let Some(base) = self.base.take() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no base transfer in progress".into(),
            });
        };
        if base.cursor != base.image.len() {
            return Err(TransferError::BaseUnavailable {
                detail: "base transfer incomplete".into(),
            });
        }
        let mut r = self.replica();
        let Some((lsn, image)) = r.installing.take() else {
            return Err(TransferError::BaseUnavailable {
                detail: "replica is not installing a base".into(),
            });
        };
        r.base = image;
        r.base_lsn = lsn;
        r.base_tip = self
            .primary
            .reference_history()
            .entry(lsn)
            .map(|e| e.id())
            .or((lsn == Lsn::ZERO).then_some(EntryId::ORIGIN));
        r.log.clear();
        r.checkpoint = lsn;
        r.durable = lsn;
        debug_assert_eq!(lsn, base.lsn);
        Ok(lsn)
    }
}

/// An I/O that reports a scripted sequence of progress values and moves no data: for tests of
/// executor mechanics at exact LSNs (the reference's step lists). Data-checking tests use
/// [`ModelIo`].
#[derive(Clone, Debug, Default)]
pub struct ScriptedIo {
    /// Progress values to report, one per WAL chunk call.
    pub steps: Vec<Lsn>,
    next: usize,
    last: Lsn,
    /// Calls made.
    pub stream_calls: u64,
    /// Truncations requested.
    pub truncations: Vec<Lsn>,
    /// Barriers requested.
    pub barriers: u64,
}

impl ScriptedIo {
    /// An I/O that reports `steps` in order.
    pub fn new(steps: impl IntoIterator<Item = u64>) -> Self {
        ScriptedIo {
            steps: steps.into_iter().map(Lsn).collect(),
            ..Self::default()
        }
    }
}

impl CatchUpIo for ScriptedIo {
    fn truncate_after(&mut self, lsn: Lsn) -> Result<EntryId, TransferError> {
        self.truncations.push(lsn);
        self.last = lsn;
        Ok(EntryId {
            lsn,
            epoch: Epoch(0),
            checksum: 0,
        })
    }

    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        _up_to: Lsn,
        _max_entries: u64,
    ) -> Result<WalChunk, TransferError> {
        self.stream_calls += 1;
        let Some(step) = self.steps.get(self.next).copied() else {
            return Err(TransferError::Transport {
                detail: "script exhausted".into(),
            });
        };
        self.next += 1;
        self.last = step;
        let n = after.distance_to(step);
        Ok(WalChunk {
            applied_to: step,
            entries: n,
            bytes: n * ModelEntry::WIRE_BYTES,
        })
    }

    fn barrier(&mut self, _target: Lsn) -> Result<Lsn, TransferError> {
        self.barriers += 1;
        Ok(self.last)
    }
}
