//! Everything behind the state mutex: the LSN index, the dirty map (block → newest entry not
//! yet in the extent), pin and fence records, and the in-memory bookkeeping of head, tail and
//! checkpoint.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::format::{ENTRY_HEADER_SIZE, KIND_TRIM, KIND_WRITE};
use crate::types::{EntryInfo, Epoch, Lsn, RetentionPolicy, Role};
use crate::walk::IndexEntry;

/// Marks a dirty-map entry that reads as zeros (a trim).
pub(super) const TRIM_SRC: u64 = u64::MAX;

/// A cheap hasher for block addresses: the dirty map is hit on every write and read.
#[derive(Default)]
pub(crate) struct LbaHasher(u64);

impl Hasher for LbaHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
}

pub(super) type DirtyMap = HashMap<u64, DirtyRef, BuildHasherDefault<LbaHasher>>;

/// Where the newest not-yet-checkpointed version of a block lives.
#[derive(Copy, Clone, Debug)]
pub(crate) struct DirtyRef {
    /// LSN of the entry holding it.
    pub lsn: u64,
    /// Logical WAL position of the block's bytes, or `TRIM_SRC` for zeros.
    pub src: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct PinRec {
    /// Entries with LSN > `after` are kept.
    pub after: u64,
    pub revoked: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct FenceRec {
    /// No entry above `at` reaches the extent while the fence lives.
    pub at: u64,
    pub revoked: bool,
}

/// Everything protected by the state mutex.
///
/// Invariants (checked by the tests, relied on everywhere):
/// - `tail <= checkpoint <= durable <= head`, except that `durable` may trail `checkpoint`
///   never: the flusher moves only durable entries.
/// - `index` holds exactly the entries `tail+1 ..= head`, in order, contiguous.
/// - `tail_pos` is where entry `tail+1` starts; `head_pos` is just past entry `head`;
///   `head_pos - tail_pos <= wal_size`.
/// - The in-memory `tail`/`tail_pos` and `checkpoint` equal the persisted ones: they change only
///   after the superblock carrying them is durable, so the ring space they free is never reused
///   before a crash could still need it.
/// - `dirty` maps each block written by an entry in `checkpoint+1 ..= head` to the newest such
///   entry.
pub(crate) struct State {
    pub head: u64,
    pub head_pos: u64,
    pub tail: u64,
    pub tail_pos: u64,
    pub tail_info: EntryInfo,
    pub index: VecDeque<IndexEntry>,
    pub dirty: DirtyMap,
    pub checkpoint: u64,
    /// The flush mark of the newest durable superblock: the extent may hold entries up to it
    /// (see `Shared::flush_locked`). At least the checkpoint once a flush or a recovery ran,
    /// at most the durable LSN; it rises with flushes and is lowered only where no flush can
    /// run (truncation, base install, repair, clean close). Changed only under the superblock
    /// writer lock, after the superblock carrying it is durable.
    pub flush_mark: u64,
    pub durable: u64,
    pub synced_pos: u64,
    pub committed: u64,
    pub epoch: Epoch,
    pub role: Role,
    pub generation: u64,
    pub stamp: u64,
    pub pins: HashMap<u64, PinRec>,
    pub fences: HashMap<u64, FenceRec>,
    pub next_pin_id: u64,
    pub revoke_reason: String,
    pub retention: RetentionPolicy,
    pub installing: bool,
    pub install_incomplete: bool,
    pub install_lsn: u64,
    /// The identity of the image an incomplete install is receiving (the sender's entry at
    /// `install_lsn`).
    pub install_entry: EntryInfo,
    /// Blocks below this LBA hold that image durably.
    pub install_resume: u64,
    pub repaired: bool,
    pub poisoned: Option<String>,
    pub closed: bool,
    /// Opened with `Volume::open_read_only`: nothing may write the medium.
    pub read_only: bool,
    pub stop_flusher: bool,
    pub flush_wanted: bool,
    pub syncing: bool,
    /// Who is gathering for the next group commit (see `sync`).
    pub commit: GroupCommit,
    /// How far `start_writeback` has handed the ring to the disk (logical position).
    pub writeback_pos: u64,
    pub space_waiters: usize,
    /// Bumped by truncation and base installs; open scans compare it.
    pub lineage: u64,
    /// A tail the flusher is persisting; pins below it are refused.
    pub tail_moving_to: Option<u64>,
}

/// Bookkeeping of group commit: how many callers the last sync served and how many have
/// arrived for the next one, so a leader can give the rest of its group a moment to append.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// The head the sync in flight makes durable (meaningful while `syncing`).
    pub syncing_to: u64,
    /// Callers waiting for the next sync (not covered by the one in flight).
    pub arrivals: u32,
    /// How many callers the last sync served: the size the next group is expected to reach.
    pub expect: u32,
    /// A leader is waiting for its group to gather (it has not started the sync).
    pub forming: bool,
    /// How long the last sync took.
    pub last_sync: std::time::Duration,
}

impl State {
    /// The index entry for `lsn` (which must be in `tail+1 ..= head`).
    pub(crate) fn entry(&self, lsn: u64) -> Option<&IndexEntry> {
        if lsn <= self.tail {
            return None;
        }
        self.index.get((lsn - self.tail - 1) as usize)
    }

    /// Identity of entry `lsn`, for `lsn` in `[tail, head]`.
    pub(crate) fn info_of(&self, lsn: u64) -> Option<EntryInfo> {
        if lsn == self.tail {
            return Some(self.tail_info);
        }
        self.entry(lsn).map(|e| EntryInfo {
            lsn: Lsn(e.lsn),
            epoch: Epoch(e.epoch),
            content_crc: e.content_crc,
        })
    }

    /// Where entry `t + 1` starts and the identity of entry `t`, for `t` in `[tail, head]`.
    pub(super) fn tail_position(&self, t: u64) -> (u64, EntryInfo) {
        if t == self.tail {
            return (self.tail_pos, self.tail_info);
        }
        match self.entry(t) {
            Some(e) => (
                e.end,
                EntryInfo {
                    lsn: Lsn(e.lsn),
                    epoch: Epoch(e.epoch),
                    content_crc: e.content_crc,
                },
            ),
            None => (self.tail_pos, self.tail_info),
        }
    }

    pub(super) fn live_pins(&self) -> usize {
        self.pins.values().filter(|p| !p.revoked).count()
    }

    pub(super) fn min_fence(&self) -> Option<u64> {
        self.fences
            .values()
            .filter(|f| !f.revoked)
            .map(|f| f.at)
            .min()
    }

    pub(super) fn put_dirty(&mut self, e: &IndexEntry, block_size: u32) {
        let bs = u64::from(block_size);
        match e.kind {
            KIND_WRITE => {
                let data = e.pos + ENTRY_HEADER_SIZE as u64;
                for i in 0..u64::from(e.blocks) {
                    self.dirty.insert(
                        e.lba + i,
                        DirtyRef {
                            lsn: e.lsn,
                            src: data + i * bs,
                        },
                    );
                }
            }
            KIND_TRIM => {
                for i in 0..u64::from(e.blocks) {
                    self.dirty.insert(
                        e.lba + i,
                        DirtyRef {
                            lsn: e.lsn,
                            src: TRIM_SRC,
                        },
                    );
                }
            }
            _ => {}
        }
    }

    /// Drops dirty references made redundant by a checkpoint move from `old` to `new`.
    pub(super) fn clean_dirty(&mut self, old: u64, new: u64) {
        let mut lsn = old + 1;
        while lsn <= new {
            let Some(e) = self.entry(lsn).copied() else {
                break;
            };
            if e.kind == KIND_WRITE || e.kind == KIND_TRIM {
                for i in 0..u64::from(e.blocks) {
                    if self.dirty.get(&(e.lba + i)).is_some_and(|d| d.lsn <= new) {
                        self.dirty.remove(&(e.lba + i));
                    }
                }
            }
            lsn += 1;
        }
    }

    /// Rebuilds the dirty map from the index (after a truncation).
    pub(super) fn rebuild_dirty(&mut self, block_size: u32) {
        self.dirty.clear();
        let from = self.checkpoint;
        let entries: Vec<IndexEntry> = self
            .index
            .iter()
            .filter(|e| e.lsn > from)
            .copied()
            .collect();
        for e in &entries {
            self.put_dirty(e, block_size);
        }
    }

    /// Moves the in-memory tail to `t` (already persisted).
    pub(super) fn set_tail(&mut self, t: u64) {
        if t <= self.tail {
            return;
        }
        let (pos, info) = self.tail_position(t);
        while self.index.front().is_some_and(|e| e.lsn <= t) {
            self.index.pop_front();
        }
        self.tail = t;
        self.tail_pos = pos;
        self.tail_info = info;
    }
}
