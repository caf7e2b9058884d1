//! A model WAL history, after the prototype's `WALHistory`: entries that write one value into
//! one block, a tail that captures a base snapshot when it advances, and `state_at(lsn)` that
//! reconstructs the block state at any LSN the history can still explain.

use std::collections::BTreeMap;

use crate::history::{EntryId, LsnRange};
use crate::outcome::HandshakeResult;
use crate::types::{Epoch, Lsn};

/// Block number to value.
pub type BlockState = BTreeMap<u64, u64>;

/// One model WAL entry: "at `lsn`, under `epoch`, block `block` became `value`".
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelEntry {
    /// Its LSN.
    pub lsn: Lsn,
    /// The writer's epoch.
    pub epoch: Epoch,
    /// The block written.
    pub block: u64,
    /// The value written.
    pub value: u64,
}

impl ModelEntry {
    /// Bytes one model entry stands for when transfer sizes are reported.
    pub const WIRE_BYTES: u64 = 32;

    /// The entry's identity: LSN, epoch and a checksum of what it writes where.
    pub fn id(&self) -> EntryId {
        let mix = self
            .block
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(17)
            ^ self.value.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        EntryId {
            lsn: self.lsn,
            epoch: self.epoch,
            checksum: (mix ^ (mix >> 32)) as u32,
        }
    }
}

/// A refusal by the model history.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// An append at or below the head.
    #[error("append of LSN {lsn} at or below head {head}")]
    NotAfterHead {
        /// The LSN appended.
        lsn: Lsn,
        /// The head.
        head: Lsn,
    },
    /// A commit beyond the head.
    #[error("commit {lsn} beyond head {head}")]
    CommitBeyondHead {
        /// The LSN committed.
        lsn: Lsn,
        /// The head.
        head: Lsn,
    },
    /// A range starting before the tail.
    #[error("range after {after} starts before tail {tail}")]
    Recycled {
        /// The exclusive start asked for.
        after: Lsn,
        /// The tail.
        tail: Lsn,
    },
}

/// The model history. Entries with LSN > tail are retained; the base snapshot holds the block
/// state at the tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalHistory {
    entries: Vec<ModelEntry>,
    head: Lsn,
    tail: Lsn,
    committed: Lsn,
    base_snapshot: BlockState,
    base_snapshot_lsn: Option<Lsn>,
}

impl WalHistory {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest LSN written.
    pub fn head(&self) -> Lsn {
        self.head
    }
    /// Entries at or below the tail are recycled.
    pub fn tail(&self) -> Lsn {
        self.tail
    }
    /// Committed LSN.
    pub fn committed(&self) -> Lsn {
        self.committed
    }
    /// Retained entries, in LSN order.
    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }
    /// LSN of the base snapshot, if the tail ever advanced.
    pub fn base_snapshot_lsn(&self) -> Option<Lsn> {
        self.base_snapshot_lsn
    }

    /// Appends an entry; its LSN must be above the head (holes are allowed, as in the
    /// prototype, so tests can build histories the engine must refuse to trust).
    pub fn append(&mut self, entry: ModelEntry) -> Result<(), ModelError> {
        if entry.lsn <= self.head {
            return Err(ModelError::NotAfterHead {
                lsn: entry.lsn,
                head: self.head,
            });
        }
        self.head = entry.lsn;
        self.entries.push(entry);
        Ok(())
    }

    /// Raises the committed LSN (never lowers it); refuses an LSN beyond the head.
    pub fn commit(&mut self, lsn: Lsn) -> Result<(), ModelError> {
        if lsn > self.head {
            return Err(ModelError::CommitBeyondHead {
                lsn,
                head: self.head,
            });
        }
        self.committed = self.committed.max(lsn);
        Ok(())
    }

    /// Recycles every entry at or below `lsn`, first folding them into the base snapshot so
    /// the state they produced stays reconstructible. Ignored when `lsn <= tail`.
    pub fn advance_tail(&mut self, lsn: Lsn) {
        if lsn <= self.tail {
            return;
        }
        for e in self.entries.iter().filter(|e| e.lsn <= lsn) {
            self.base_snapshot.insert(e.block, e.value);
        }
        self.entries.retain(|e| e.lsn > lsn);
        self.base_snapshot_lsn = Some(lsn);
        self.tail = lsn;
    }

    /// Drops entries above `after` and lowers the head to it if it was higher.
    pub fn truncate(&mut self, after: Lsn) {
        self.entries.retain(|e| e.lsn <= after);
        self.head = self.head.min(after);
    }

    /// The retained entries in `(after, to]`; an error if `after` is below the tail.
    pub fn entries_in_range(&self, after: Lsn, to: Lsn) -> Result<Vec<ModelEntry>, ModelError> {
        if after < self.tail {
            return Err(ModelError::Recycled {
                after,
                tail: self.tail,
            });
        }
        Ok(self
            .entries
            .iter()
            .filter(|e| e.lsn > after && e.lsn <= to)
            .copied()
            .collect())
    }

    /// The prototype's three conditions: not recycled, not beyond the head, and contiguous.
    pub fn is_recoverable(&self, after: Lsn, to: Lsn) -> bool {
        if after < self.tail {
            return false;
        }
        if to <= after {
            return true;
        }
        if to > self.head {
            return false;
        }
        let mut expected = after.next();
        for e in self.entries.iter().filter(|e| e.lsn > after && e.lsn <= to) {
            if e.lsn != expected {
                return false;
            }
            expected = expected.next();
        }
        expected > to
    }

    /// The handshake result for a replica at `flushed`.
    pub fn make_handshake_result(&self, flushed: Lsn) -> HandshakeResult {
        HandshakeResult {
            replica_flushed_lsn: flushed,
            committed_lsn: self.committed,
            retention_start_lsn: self.tail.next(),
        }
    }

    /// The holes in `(tail, head]`: ranges of LSNs with no entry.
    pub fn missing_ranges(&self) -> Vec<LsnRange> {
        let mut out = Vec::new();
        let mut expected = self.tail.next();
        for e in &self.entries {
            if e.lsn > expected {
                out.push(LsnRange::new(Lsn(expected.0 - 1), Lsn(e.lsn.0 - 1)));
            }
            expected = e.lsn.next();
        }
        out
    }

    /// The block state at `lsn`: the base snapshot plus retained entries up to `lsn`. `None`
    /// when `lsn` is before the snapshot (that state is gone).
    pub fn state_at(&self, lsn: Lsn) -> Option<BlockState> {
        if let Some(snap) = self.base_snapshot_lsn
            && lsn < snap
        {
            return None;
        }
        let mut state = self.base_snapshot.clone();
        for e in self.entries.iter().filter(|e| e.lsn <= lsn) {
            state.insert(e.block, e.value);
        }
        Some(state)
    }

    /// The retained entry at `lsn`, if any.
    pub fn entry(&self, lsn: Lsn) -> Option<ModelEntry> {
        let idx = self.entries.binary_search_by_key(&lsn, |e| e.lsn).ok()?;
        self.entries.get(idx).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(lsn: u64, block: u64, value: u64) -> ModelEntry {
        ModelEntry {
            lsn: Lsn(lsn),
            epoch: Epoch(1),
            block,
            value,
        }
    }

    fn history(n: u64) -> WalHistory {
        let mut h = WalHistory::new();
        for i in 1..=n {
            h.append(e(i, i % 4, i * 10)).unwrap();
        }
        h
    }

    #[test]
    fn retention_after_tail() {
        let mut h = history(10);
        h.advance_tail(Lsn(5));
        assert_eq!(h.entries().len(), 5);
        assert!(h.entries_in_range(Lsn(0), Lsn(5)).is_err());
        assert_eq!(h.entries_in_range(Lsn(5), Lsn(10)).unwrap().len(), 5);
    }

    #[test]
    fn hole_breaks_recoverability() {
        let mut h = WalHistory::new();
        for i in [1, 2, 3, 5, 6] {
            h.append(e(i, 0, i)).unwrap();
        }
        assert!(!h.is_recoverable(Lsn(0), Lsn(6)));
        assert!(h.is_recoverable(Lsn(0), Lsn(3)));
        assert_eq!(h.missing_ranges(), vec![LsnRange::new(Lsn(3), Lsn(4))]);
    }

    #[test]
    fn state_after_tail_advance() {
        let mut h = WalHistory::new();
        h.append(e(1, 1, 100)).unwrap();
        h.append(e(2, 2, 200)).unwrap();
        h.append(e(3, 1, 300)).unwrap();
        h.append(e(4, 3, 400)).unwrap();
        h.append(e(5, 2, 500)).unwrap();
        h.advance_tail(Lsn(3));
        let s = h.state_at(Lsn(5)).unwrap();
        assert_eq!(s, BlockState::from([(1, 300), (2, 500), (3, 400)]));
    }

    #[test]
    fn state_before_snapshot_is_gone() {
        let mut h = history(10);
        h.advance_tail(Lsn(5));
        assert!(h.state_at(Lsn(3)).is_none());
        assert!(h.state_at(Lsn(5)).is_some());
    }

    #[test]
    fn block_last_written_before_tail_keeps_value() {
        let mut h = WalHistory::new();
        h.append(e(1, 99, 42)).unwrap();
        for i in 2..=10 {
            h.append(e(i, 1, i)).unwrap();
        }
        h.advance_tail(Lsn(5));
        assert_eq!(h.state_at(Lsn(10)).unwrap().get(&99), Some(&42));
    }
}
