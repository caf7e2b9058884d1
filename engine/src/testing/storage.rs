//! `MemStorage`: the in-memory reference [`StorageAdapter`], over a model [`WalHistory`].
//!
//! Pins are real: a WAL pin stops [`MemStorage::advance_tail`] from recycling what it covers,
//! and snapshot and full-base pins capture an immutable image that the model I/O reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::adapter::{FullBasePin, PinGuard, PinId, RetentionPin, SnapshotPin, StorageAdapter};
use crate::error::{PinKind, StorageError};
use crate::history::{EntryId, RetainedHistory};
use crate::testing::history::{BlockState, ModelEntry, ModelError, WalHistory};
use crate::types::{Epoch, Lsn};

#[derive(Debug)]
struct PinRecord {
    kind: PinKind,
    lsn: Lsn,
    /// The image a snapshot or full-base pin keeps.
    image: Option<Arc<BlockState>>,
}

#[derive(Debug, Default)]
struct Inner {
    history: WalHistory,
    /// Every entry ever appended, never recycled: the oracle tests compare against.
    reference: WalHistory,
    epoch: Epoch,
    checkpoint: Option<Lsn>,
    checkpoint_trusted: bool,
    pins: BTreeMap<PinId, PinRecord>,
    next_pin: u64,
    fail_next: Vec<PinKind>,
    pins_acquired: u64,
}

impl Inner {
    fn min_wal_pin(&self) -> Option<Lsn> {
        self.pins
            .values()
            .filter(|p| p.kind == PinKind::WalRetention)
            .map(|p| p.lsn)
            .min()
    }

    fn take_failure(&mut self, kind: PinKind) -> bool {
        match self.fail_next.iter().position(|k| *k == kind) {
            Some(i) => {
                self.fail_next.remove(i);
                true
            }
            None => false,
        }
    }
}

/// The in-memory primary store. Cheap to clone; clones share state.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<Inner>>,
}

impl MemStorage {
    /// An empty store at epoch 1.
    pub fn new() -> Self {
        let s = Self::default();
        s.lock().epoch = Epoch(1);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the model history.
    pub fn history(&self) -> WalHistory {
        self.lock().history.clone()
    }

    /// Sets the epoch new entries are written under.
    pub fn set_epoch(&self, epoch: Epoch) {
        self.lock().epoch = epoch;
    }

    /// Appends one entry at head + 1 writing `value` into `block`; returns its LSN.
    pub fn write(&self, block: u64, value: u64) -> Lsn {
        let mut g = self.lock();
        let lsn = g.history.head().next();
        let epoch = g.epoch;
        let entry = ModelEntry {
            lsn,
            epoch,
            block,
            value,
        };
        // head + 1 is always above the head, so neither append can be refused.
        let _ = g.history.append(entry);
        let _ = g.reference.append(entry);
        lsn
    }

    /// Appends `n` entries with a deterministic pattern (block = lsn % 8, value = lsn * 1000
    /// + epoch); returns the new head.
    pub fn write_n(&self, n: u64) -> Lsn {
        let mut head = self.lock().history.head();
        for _ in 0..n {
            let lsn = head.next();
            let epoch = self.lock().epoch.get();
            head = self.write(lsn.get() % 8, lsn.get() * 1000 + epoch);
        }
        head
    }

    /// Appends an arbitrary entry (holes allowed).
    pub fn append(&self, entry: ModelEntry) -> Result<(), ModelError> {
        let mut g = self.lock();
        g.history.append(entry)?;
        g.reference.append(entry)
    }

    /// Every entry ever appended (never recycled): the oracle for data checks.
    pub fn reference_history(&self) -> WalHistory {
        self.lock().reference.clone()
    }

    /// Raises the committed LSN.
    pub fn commit(&self, lsn: Lsn) -> Result<(), ModelError> {
        self.lock().history.commit(lsn)
    }

    /// Sets the checkpoint and whether it is trusted.
    pub fn set_checkpoint(&self, checkpoint: Option<Lsn>, trusted: bool) {
        let mut g = self.lock();
        g.checkpoint = checkpoint;
        g.checkpoint_trusted = trusted;
    }

    /// Recycles history up to `lsn`, but never past a live WAL pin: returns the tail reached.
    pub fn advance_tail(&self, lsn: Lsn) -> Lsn {
        let mut g = self.lock();
        let limit = g.min_wal_pin().map_or(lsn, |p| p.min(lsn));
        g.history.advance_tail(limit);
        g.history.tail()
    }

    /// Makes the next pin of `kind` fail once.
    pub fn fail_next_pin(&self, kind: PinKind) {
        self.lock().fail_next.push(kind);
    }

    /// Pins currently held.
    pub fn pins_outstanding(&self) -> usize {
        self.lock().pins.len()
    }

    /// Pins of one kind currently held.
    pub fn pins_of(&self, kind: PinKind) -> usize {
        self.lock().pins.values().filter(|p| p.kind == kind).count()
    }

    /// Pins ever acquired.
    pub fn pins_acquired(&self) -> u64 {
        self.lock().pins_acquired
    }

    /// The primary's block state at `lsn`, from the never-recycled reference history.
    pub fn state_at(&self, lsn: Lsn) -> Option<BlockState> {
        self.lock().reference.state_at(lsn)
    }

    /// The image a snapshot or full-base pin holds, with its LSN; `None` once released.
    pub fn pinned_image(&self, pin: PinId) -> Option<(Lsn, Arc<BlockState>)> {
        let g = self.lock();
        let rec = g.pins.get(&pin)?;
        Some((rec.lsn, Arc::clone(rec.image.as_ref()?)))
    }

    /// Registers a pin while the caller holds the lock, so the validity check and the
    /// registration are one atomic step with respect to `advance_tail`.
    fn add_pin(
        &self,
        g: &mut Inner,
        kind: PinKind,
        lsn: Lsn,
        image: Option<BlockState>,
    ) -> (PinId, PinGuard) {
        g.next_pin += 1;
        g.pins_acquired += 1;
        let id = PinId(g.next_pin);
        g.pins.insert(
            id,
            PinRecord {
                kind,
                lsn,
                image: image.map(Arc::new),
            },
        );
        let inner = Arc::clone(&self.inner);
        let guard = PinGuard::on_release(move || {
            inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pins
                .remove(&id);
        });
        (id, guard)
    }
}

impl StorageAdapter for MemStorage {
    fn get_retained_history(&self) -> Result<RetainedHistory, StorageError> {
        let g = self.lock();
        Ok(RetainedHistory {
            head_lsn: g.history.head(),
            tail_lsn: g.history.tail(),
            committed_lsn: g.history.committed(),
            checkpoint_lsn: g.checkpoint,
            checkpoint_trusted: g.checkpoint_trusted,
            missing: g.history.missing_ranges(),
        })
    }

    fn entry_id(&self, lsn: Lsn) -> Result<Option<EntryId>, StorageError> {
        let g = self.lock();
        if lsn == Lsn::ZERO {
            return Ok(Some(EntryId::ORIGIN));
        }
        // A real store keeps the identity of its tail entry when recycling it; the model reads
        // it from the never-recycled reference history. Below the tail it cannot vouch.
        if lsn < g.history.tail() || lsn > g.history.head() {
            return Ok(None);
        }
        Ok(g.reference.entry(lsn).map(|e| e.id()))
    }

    fn pin_snapshot(&self, checkpoint_lsn: Lsn) -> Result<SnapshotPin, StorageError> {
        let mut g = self.lock();
        if g.take_failure(PinKind::Snapshot) {
            return Err(StorageError::Backend(
                "injected snapshot pin failure".into(),
            ));
        }
        if !g.checkpoint_trusted || g.checkpoint != Some(checkpoint_lsn) {
            return Err(StorageError::SnapshotUnavailable {
                requested: checkpoint_lsn,
                checkpoint: g.checkpoint,
                trusted: g.checkpoint_trusted,
            });
        }
        let image =
            g.history
                .state_at(checkpoint_lsn)
                .ok_or_else(|| StorageError::BaseUnavailable {
                    requested: checkpoint_lsn,
                    detail: "state before the base snapshot is gone".into(),
                })?;
        let (id, guard) = self.add_pin(&mut g, PinKind::Snapshot, checkpoint_lsn, Some(image));
        Ok(SnapshotPin::new(checkpoint_lsn, id, guard))
    }

    fn pin_wal_retention(&self, after: Lsn) -> Result<RetentionPin, StorageError> {
        let mut g = self.lock();
        if g.take_failure(PinKind::WalRetention) {
            return Err(StorageError::Backend("injected WAL pin failure".into()));
        }
        if after < g.history.tail() {
            return Err(StorageError::Recycled {
                requested: after,
                retained_start: g.history.tail().next(),
            });
        }
        let (id, guard) = self.add_pin(&mut g, PinKind::WalRetention, after, None);
        Ok(RetentionPin::new(after, id, guard))
    }

    fn pin_full_base(&self, committed_lsn: Lsn) -> Result<FullBasePin, StorageError> {
        let mut g = self.lock();
        if g.take_failure(PinKind::FullBase) {
            return Err(StorageError::Backend(
                "injected full-base pin failure".into(),
            ));
        }
        let image =
            g.history
                .state_at(committed_lsn)
                .ok_or_else(|| StorageError::BaseUnavailable {
                    requested: committed_lsn,
                    detail: "state before the base snapshot is gone".into(),
                })?;
        let (id, guard) = self.add_pin(&mut g, PinKind::FullBase, committed_lsn, Some(image));
        Ok(FullBasePin::new(committed_lsn, id, guard))
    }
}
