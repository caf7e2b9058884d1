//! The volume: state, locking protocol, write/read/sync, flusher, retention, recovery, fencing
//! and the replica side. See the crate docs for the architecture and invariants.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::entry::{EntryKind, WalEntry};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, KIND_BARRIER, KIND_PADDING, KIND_TRIM,
    KIND_WRITE, MAX_BLOCK_SIZE, MAX_ENTRY_SIZE, MIN_BLOCK_SIZE, MIN_WAL_SIZE,
    SB_FLAG_INSTALL_INCOMPLETE, SB_FLAG_REPAIRED, SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE,
    Superblock, WAL_OFFSET, WAL_SIZE_ALIGN, choose_superblock, content_crc, entry_size,
};
use crate::medium::{FileMedium, Medium, ReadOnlyFileMedium};
use crate::types::{
    ApplyOutcome, CreateOptions, Digest, EntryInfo, FlushGate, FlusherMode, Geometry, Lsn,
    OpenOptions, RetentionPolicy, Role, Status,
};
use crate::walk::{IndexEntry, WalkParams, wal_stamp, walk};

/// Marks a dirty-map entry that reads as zeros (a trim).
const TRIM_SRC: u64 = u64::MAX;
/// Largest buffer the flusher, digest and zeroing use at once.
const IO_CHUNK: usize = 1 << 20;
/// Longest a writer sleeps between re-checks while it waits for WAL space.
const SPACE_POLL: Duration = Duration::from_millis(20);

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

type DirtyMap = HashMap<u64, DirtyRef, BuildHasherDefault<LbaHasher>>;

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
    pub epoch: u64,
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
    pub repaired: bool,
    pub poisoned: Option<String>,
    pub closed: bool,
    /// Opened with `Volume::open_read_only`: nothing may write the medium.
    pub read_only: bool,
    pub stop_flusher: bool,
    pub flush_wanted: bool,
    pub syncing: bool,
    pub space_waiters: usize,
    /// Bumped by truncation and base installs; open scans compare it.
    pub lineage: u64,
    /// A tail the flusher is persisting; pins below it are refused.
    pub tail_moving_to: Option<u64>,
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
            epoch: e.epoch,
            content_crc: e.content_crc,
        })
    }

    /// Where entry `t + 1` starts and the identity of entry `t`, for `t` in `[tail, head]`.
    fn tail_position(&self, t: u64) -> (u64, EntryInfo) {
        if t == self.tail {
            return (self.tail_pos, self.tail_info);
        }
        match self.entry(t) {
            Some(e) => (
                e.end,
                EntryInfo {
                    lsn: Lsn(e.lsn),
                    epoch: e.epoch,
                    content_crc: e.content_crc,
                },
            ),
            None => (self.tail_pos, self.tail_info),
        }
    }

    fn live_pins(&self) -> usize {
        self.pins.values().filter(|p| !p.revoked).count()
    }

    fn min_fence(&self) -> Option<u64> {
        self.fences
            .values()
            .filter(|f| !f.revoked)
            .map(|f| f.at)
            .min()
    }

    fn put_dirty(&mut self, e: &IndexEntry, block_size: u32) {
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
    fn clean_dirty(&mut self, old: u64, new: u64) {
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
    fn rebuild_dirty(&mut self, block_size: u32) {
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
    fn set_tail(&mut self, t: u64) {
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

/// Which append is being made.
pub(crate) enum AppendMode {
    /// A client write; `epoch` is the caller's epoch when it asked for a fenced write.
    Client { epoch: Option<u64> },
    /// A replicated entry with its primary's LSN and epoch.
    Apply {
        lsn: u64,
        epoch: u64,
        info: EntryInfo,
    },
}

/// Holds `(seq, slot)` of the last superblock written; its mutex serializes superblock writes.
pub(crate) struct SbWriter {
    seq: u64,
    slot: usize,
}

/// One entry to move into the extent: the runs of its blocks that no newer entry in the same
/// flush rewrites.
struct FlushItem {
    entry: IndexEntry,
    /// `(first block within the entry, block count)`.
    runs: Vec<(u64, u64)>,
}

/// The part of a volume shared with its flusher thread, pins, scans and base handles.
pub(crate) struct Shared {
    pub medium: Arc<dyn Medium>,
    pub geo: Geometry,
    pub extent_offset: u64,
    pub volume_id: [u8; 16],
    pub gate: FlushGate,
    pub wal_full_timeout: Duration,
    pub state: Mutex<State>,
    /// Signalled whenever durable, tail, checkpoint, pins or flags change.
    pub cond: Condvar,
    /// Wakes the background flusher.
    pub flusher_cond: Condvar,
    /// Serializes flush cycles with truncation, base pins and base installs.
    pub flush_lock: Mutex<()>,
    /// Readers of the extent share it; the flusher takes it exclusively per extent write.
    pub extent_rw: RwLock<()>,
    pub sb: Mutex<SbWriter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned std mutex means a panic elsewhere; the data it guards is still consistent
    // because every critical section updates state only after its fallible I/O succeeded.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn extent_read(&self) -> RwLockReadGuard<'_, ()> {
        self.extent_rw.read().unwrap_or_else(|p| p.into_inner())
    }

    fn extent_write(&self) -> RwLockWriteGuard<'_, ()> {
        self.extent_rw.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn flush_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.flush_lock)
    }

    pub(crate) fn wal_size(&self) -> u64 {
        self.geo.wal_size_bytes
    }

    fn block_size(&self) -> u64 {
        u64::from(self.geo.block_size)
    }

    pub(crate) fn extent_len(&self) -> u64 {
        self.geo.volume_bytes()
    }

    /// Refuses an entry with `payload_len` payload bytes that the ring could never place or
    /// whose header could not state its length; returns its size in the ring.
    pub(crate) fn check_entry_len(&self, payload_len: usize) -> Result<u64> {
        check_entry_len(payload_len, self.wal_size())
    }

    /// File offset of a logical WAL position.
    pub(crate) fn wal_file_off(&self, logical: u64) -> u64 {
        WAL_OFFSET + logical % self.wal_size()
    }

    pub(crate) fn read_wal(&self, logical: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.wal_file_off(logical);
        self.medium
            .read_at(off, buf)
            .map_err(|e| BlockVolError::io("read wal", format!("file offset {off}"), e))
    }

    /// Records the first failure; later writes and syncs are refused.
    pub(crate) fn poison(&self, st: &mut State, what: String) {
        if st.poisoned.is_none() {
            log::error!("volume {} poisoned: {what}", self.medium.describe());
            st.poisoned = Some(what);
        }
        self.cond.notify_all();
    }

    pub(crate) fn check_usable(&self, st: &State) -> Result<()> {
        if st.closed {
            return Err(BlockVolError::Closed);
        }
        if let Some(p) = &st.poisoned {
            return Err(BlockVolError::Poisoned {
                first_failure: p.clone(),
            });
        }
        if st.read_only {
            return Err(BlockVolError::ReadOnly);
        }
        Ok(())
    }

    pub(crate) fn check_installed(&self, st: &State, op: &'static str) -> Result<()> {
        if st.installing || st.install_incomplete {
            return Err(BlockVolError::InstallIncomplete {
                op,
                base_lsn: Lsn(st.install_lsn),
            });
        }
        Ok(())
    }

    /// Wakes the background flusher (a no-op with a manual flusher).
    pub(crate) fn wake_flusher(&self, st: &mut State) {
        st.flush_wanted = true;
        self.flusher_cond.notify_all();
    }

    // ---- Superblock ------------------------------------------------------------------------

    /// The superblock describing the persisted state (the in-memory state equals it).
    pub(crate) fn sb_from_state(&self, st: &State) -> Superblock {
        let mut flags = 0;
        if st.install_incomplete {
            flags |= SB_FLAG_INSTALL_INCOMPLETE;
        }
        if st.repaired {
            flags |= SB_FLAG_REPAIRED;
        }
        Superblock {
            flags,
            seq: 0,
            volume_id: self.volume_id,
            block_size: self.geo.block_size,
            volume_blocks: self.geo.volume_blocks,
            wal_offset: WAL_OFFSET,
            wal_size: self.wal_size(),
            extent_offset: self.extent_offset,
            generation: st.generation,
            checkpoint: st.checkpoint,
            tail_lsn: st.tail,
            tail_pos: st.tail_pos,
            tail_epoch: st.tail_info.epoch,
            tail_crc: st.tail_info.content_crc,
            role: st.role,
            epoch: st.epoch,
            head_hint: st.head,
            install_lsn: if st.install_incomplete {
                st.install_lsn
            } else {
                0
            },
            durable_mark: st.durable,
            flush_mark: st.flush_mark,
        }
    }

    /// Writes `sb` into the slot not holding the newest superblock and syncs it.
    pub(crate) fn write_sb(&self, w: &mut SbWriter, mut sb: Superblock) -> Result<()> {
        sb.seq = w.seq + 1;
        let slot = 1 - w.slot;
        let off = if slot == 0 {
            SB_SLOT_A_OFFSET
        } else {
            SB_SLOT_B_OFFSET
        };
        let bytes = sb.encode();
        self.medium.write_at(off, &bytes).map_err(|e| {
            BlockVolError::io("write superblock", format!("slot at offset {off}"), e)
        })?;
        self.medium.sync_range(off, SB_SLOT_SIZE).map_err(|e| {
            BlockVolError::io("sync superblock", format!("slot at offset {off}"), e)
        })?;
        w.seq = sb.seq;
        w.slot = slot;
        Ok(())
    }

    pub(crate) fn sb_writer(&self) -> MutexGuard<'_, SbWriter> {
        lock(&self.sb)
    }

    /// Writes a superblock built from the state by `f`, poisoning the volume on failure.
    pub(crate) fn persist_with(
        &self,
        w: &mut SbWriter,
        f: impl FnOnce(&State) -> Superblock,
    ) -> Result<()> {
        let sb = {
            let st = self.lock_state();
            self.check_usable(&st)?;
            f(&st)
        };
        if let Err(e) = self.write_sb(w, sb) {
            let mut st = self.lock_state();
            self.poison(&mut st, e.to_string());
            return Err(e);
        }
        Ok(())
    }

    // ---- Retention and the tail ------------------------------------------------------------

    fn retention_target(&self, st: &State, cp: u64) -> u64 {
        let by_entries = cp.saturating_sub(st.retention.keep_entries);
        let by_bytes = if st.retention.keep_bytes == 0 {
            cp
        } else {
            let mut acc = 0u64;
            let mut t = st.tail;
            let mut lsn = cp;
            while lsn > st.tail {
                let Some(e) = st.entry(lsn) else { break };
                acc += e.end - e.start;
                if acc >= st.retention.keep_bytes {
                    t = lsn - 1;
                    break;
                }
                lsn -= 1;
            }
            t
        };
        by_entries.min(by_bytes)
    }

    /// `min(checkpoint, live pins, retention)`, never below the current tail.
    fn tail_target(&self, st: &State, cp: u64) -> u64 {
        let mut t = cp.min(st.head);
        for p in st.pins.values().filter(|p| !p.revoked) {
            t = t.min(p.after);
        }
        if st.space_waiters == 0 {
            t = t.min(self.retention_target(st, cp));
        }
        t.max(st.tail)
    }

    /// Persists a new checkpoint (if given) and whatever tail the retention rules now allow,
    /// then applies both in memory. Safe to call from any thread; a no-op when nothing moves.
    pub(crate) fn persist_progress(&self, new_cp: Option<u64>) -> Result<()> {
        self.persist_progress_with(new_cp, false)
    }

    /// The flush mark a superblock written now may announce: the gate limit (every entry up
    /// to it is durable and, under `FlushGate::Committed`, committed, so recovery may redo its
    /// flush), never below the persisted mark or `cp`. Not while an install runs.
    fn announced_mark(&self, st: &State, cp: u64) -> u64 {
        if st.installing || st.install_incomplete {
            return st.flush_mark;
        }
        st.flush_mark.max(cp).max(self.gate_limit(st).min(st.head))
    }

    /// `persist_progress`; with `announce` (the background flusher's final superblock) the
    /// slot also announces the current gate limit as its flush mark, so the next cycle up to it
    /// needs no intent write of its own.
    fn persist_progress_with(&self, new_cp: Option<u64>, announce: bool) -> Result<()> {
        let mut w = self.sb_writer();
        let (sb, cp, t) = {
            let mut st = self.lock_state();
            self.check_usable(&st)?;
            if st.installing || st.install_incomplete {
                return Ok(());
            }
            let cp = new_cp.unwrap_or(st.checkpoint).max(st.checkpoint);
            let t = self.tail_target(&st, cp);
            if t == st.tail && cp == st.checkpoint {
                return Ok(());
            }
            st.tail_moving_to = Some(t);
            let (tail_pos, tail_info) = st.tail_position(t);
            let mut sb = self.sb_from_state(&st);
            sb.checkpoint = cp;
            sb.tail_lsn = t;
            sb.tail_pos = tail_pos;
            sb.tail_epoch = tail_info.epoch;
            sb.tail_crc = tail_info.content_crc;
            sb.flush_mark = if announce {
                self.announced_mark(&st, cp)
            } else {
                st.flush_mark.max(cp)
            };
            (sb, cp, t)
        };
        let sb_mark = sb.flush_mark;
        let r = self.write_sb(&mut w, sb);
        let mut st = self.lock_state();
        st.tail_moving_to = None;
        if let Err(e) = r {
            self.poison(&mut st, e.to_string());
            return Err(e);
        }
        if cp > st.checkpoint {
            let old = st.checkpoint;
            st.clean_dirty(old, cp);
            st.checkpoint = cp;
        }
        st.flush_mark = sb_mark;
        st.set_tail(t);
        self.cond.notify_all();
        Ok(())
    }

    // ---- Append ----------------------------------------------------------------------------

    /// `(bytes skipped or padded before the entry, total bytes needed)` for an entry of
    /// `size` bytes placed at `head_pos`.
    fn placement(&self, head_pos: u64, size: u64) -> (u64, u64) {
        let w = self.wal_size();
        let rem = w - head_pos % w;
        let skip = if rem < ENTRY_HEADER_SIZE as u64 || size > rem {
            rem
        } else {
            0
        };
        (skip, skip + size)
    }

    /// Appends one entry, waiting (bounded) for space. The LSN is assigned only once the space
    /// is reserved, in the same critical section as the copy, so a failed append never
    /// consumes an LSN.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append(
        &self,
        kind: u8,
        lba: u64,
        blocks: u32,
        payload: &[u8],
        crc: u32,
        mode: AppendMode,
    ) -> Result<(u64, ApplyOutcome)> {
        let size = self.check_entry_len(payload.len())?;
        let mut waiting_since: Option<Instant> = None;
        let mut st = self.lock_state();
        loop {
            self.check_usable(&st)?;
            self.check_installed(&st, "append")?;
            let (lsn, epoch) = match &mode {
                AppendMode::Client { epoch } => {
                    if !st.role.is_writable() {
                        return Err(BlockVolError::WrongRole {
                            op: "write",
                            role: st.role,
                            epoch: st.epoch,
                        });
                    }
                    if let Some(e) = epoch
                        && *e != st.epoch
                    {
                        return Err(BlockVolError::StaleEpoch {
                            given: *e,
                            current: st.epoch,
                        });
                    }
                    (st.head + 1, st.epoch)
                }
                AppendMode::Apply { lsn, epoch, info } => {
                    if !st.role.accepts_apply() {
                        return Err(BlockVolError::WrongRole {
                            op: "apply",
                            role: st.role,
                            epoch: st.epoch,
                        });
                    }
                    if *lsn <= st.head {
                        return match st.info_of(*lsn) {
                            Some(local) if local == *info => Ok((*lsn, ApplyOutcome::Duplicate)),
                            Some(local) => Err(BlockVolError::Divergent {
                                lsn: Lsn(*lsn),
                                local,
                                incoming: *info,
                            }),
                            None => Err(BlockVolError::Duplicate {
                                lsn: Lsn(*lsn),
                                retained_start: Lsn(st.tail + 1),
                            }),
                        };
                    }
                    if *lsn != st.head + 1 {
                        return Err(BlockVolError::Gap {
                            expected: Lsn(st.head + 1),
                            found: Lsn(*lsn),
                        });
                    }
                    if *epoch > st.epoch {
                        return Err(BlockVolError::EntryEpochAhead {
                            lsn: Lsn(*lsn),
                            entry_epoch: *epoch,
                            volume_epoch: st.epoch,
                        });
                    }
                    (*lsn, *epoch)
                }
            };
            let (skip, need) = self.placement(st.head_pos, size);
            let free = self.wal_size() - (st.head_pos - st.tail_pos);
            if need <= free {
                self.append_locked(
                    &mut st, kind, lba, blocks, payload, crc, lsn, epoch, skip, size,
                )?;
                return Ok((lsn, ApplyOutcome::Applied));
            }
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited >= self.wal_full_timeout {
                return Err(BlockVolError::WalFull {
                    needed: need,
                    free,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            // Free space by moving the tail (needs no flush when pins or retention were the
            // only reason it stood still), and ask the flusher for a checkpoint.
            st.space_waiters += 1;
            self.wake_flusher(&mut st);
            drop(st);
            let r = self.persist_progress(None);
            st = self.lock_state();
            if r.is_ok() {
                let (_, need) = self.placement(st.head_pos, size);
                let free = self.wal_size() - (st.head_pos - st.tail_pos);
                if need > free {
                    let left = self.wal_full_timeout.saturating_sub(since.elapsed());
                    st = self
                        .cond
                        .wait_timeout(st, left.min(SPACE_POLL))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            st.space_waiters -= 1;
            r?;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn append_locked(
        &self,
        st: &mut State,
        kind: u8,
        lba: u64,
        blocks: u32,
        payload: &[u8],
        crc: u32,
        lsn: u64,
        epoch: u64,
        skip: u64,
        size: u64,
    ) -> Result<()> {
        let header = ENTRY_HEADER_SIZE as u64;
        let start = st.head_pos;
        let mut pos = start;
        let hint = st.durable;
        let mut hdr = [0u8; ENTRY_HEADER_SIZE];
        let r = (|| -> std::io::Result<()> {
            if skip >= header {
                EntryHeader {
                    kind: KIND_PADDING,
                    generation: st.stamp,
                    lsn,
                    epoch,
                    lba: 0,
                    blocks: 0,
                    // Fits: padding is written only before a larger entry.
                    payload_len: (skip - header) as u32,
                    durable_hint: hint,
                    content_crc: 0,
                }
                .encode_into(ENTRY_MAGIC_DISK, &mut hdr);
                self.medium.write_at(self.wal_file_off(pos), &hdr)?;
            }
            pos += skip;
            EntryHeader {
                kind,
                generation: st.stamp,
                lsn,
                epoch,
                lba,
                blocks,
                // Fits: `check_entry_len` capped the entry at `MAX_ENTRY_SIZE`.
                payload_len: payload.len() as u32,
                durable_hint: hint,
                content_crc: crc,
            }
            .encode_into(ENTRY_MAGIC_DISK, &mut hdr);
            self.medium.write_at(self.wal_file_off(pos), &hdr)?;
            if !payload.is_empty() {
                self.medium
                    .write_at(self.wal_file_off(pos + header), payload)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            let err = BlockVolError::io("write wal", format!("logical position {pos}"), e);
            self.poison(st, err.to_string());
            return Err(err);
        }
        let e = IndexEntry {
            start,
            pos,
            end: pos + size,
            lsn,
            kind,
            lba,
            blocks,
            payload_len: payload.len() as u32,
            epoch,
            content_crc: crc,
        };
        st.put_dirty(&e, self.geo.block_size);
        st.index.push_back(e);
        st.head = lsn;
        st.head_pos = pos + size;
        Ok(())
    }

    // ---- Sync ------------------------------------------------------------------------------

    /// msyncs the logical range `[from, to)` of the ring.
    fn sync_wal(&self, from: u64, to: u64) -> std::io::Result<()> {
        if to <= from {
            return Ok(());
        }
        let w = self.wal_size();
        let len = to - from;
        if len >= w {
            return self.medium.sync_range(WAL_OFFSET, w);
        }
        let p = from % w;
        if p + len <= w {
            self.medium.sync_range(WAL_OFFSET + p, len)
        } else {
            self.medium.sync_range(WAL_OFFSET + p, w - p)?;
            self.medium.sync_range(WAL_OFFSET, len - (w - p))
        }
    }

    /// Asks the medium to start writing the logical ring range `[from, to)` (a hint).
    fn start_writeback(&self, from: u64, to: u64) {
        if to <= from {
            return;
        }
        let w = self.wal_size();
        let len = (to - from).min(w);
        let p = from % w;
        if p + len <= w {
            self.medium.start_writeback(WAL_OFFSET + p, len);
        } else {
            self.medium.start_writeback(WAL_OFFSET + p, w - p);
            self.medium.start_writeback(WAL_OFFSET, len - (w - p));
        }
    }

    /// Group commit: one msync covers every waiter; returns the durable LSN.
    pub(crate) fn sync(&self) -> Result<u64> {
        let mut st = self.lock_state();
        self.check_usable(&st)?;
        let target = st.head;
        loop {
            self.check_usable(&st)?;
            if st.durable >= target.min(st.head) {
                return Ok(st.durable);
            }
            if st.syncing {
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.syncing = true;
            let (to_lsn, from, to, lineage) = (st.head, st.synced_pos, st.head_pos, st.lineage);
            drop(st);
            let r = self.sync_wal(from, to);
            st = self.lock_state();
            st.syncing = false;
            match r {
                Ok(()) => {
                    if st.lineage == lineage {
                        st.durable = st.durable.max(to_lsn.min(st.head));
                        st.synced_pos = st.synced_pos.max(to.min(st.head_pos));
                    }
                }
                Err(e) => {
                    let err =
                        BlockVolError::io("msync wal", format!("logical range {from}..{to}"), e);
                    self.poison(&mut st, err.to_string());
                    self.cond.notify_all();
                    return Err(err);
                }
            }
            self.cond.notify_all();
        }
    }

    // ---- Flush -----------------------------------------------------------------------------

    /// The highest LSN the flusher may move now.
    pub(crate) fn gate_limit(&self, st: &State) -> u64 {
        match self.gate {
            FlushGate::Durable => st.durable,
            FlushGate::Committed => st.durable.min(st.committed),
        }
    }

    pub(crate) fn flush_limit(&self, st: &State) -> u64 {
        let mut l = self.gate_limit(st);
        if let Some(f) = st.min_fence() {
            l = l.min(f);
        }
        l
    }

    fn collect_ops(&self, st: &State, limit: u64) -> Vec<FlushItem> {
        let mut items = Vec::new();
        let mut lsn = st.checkpoint + 1;
        while lsn <= limit {
            let Some(e) = st.entry(lsn) else { break };
            if e.kind == KIND_WRITE || e.kind == KIND_TRIM {
                // Write a block unless a newer entry that this flush also covers rewrites it:
                // the extent must end up exactly at the image of `limit`.
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for i in 0..u64::from(e.blocks) {
                    let keep = match st.dirty.get(&(e.lba + i)) {
                        Some(d) => d.lsn == e.lsn || d.lsn > limit,
                        None => true,
                    };
                    if keep {
                        match runs.last_mut() {
                            Some((f, n)) if *f + *n == i => *n += 1,
                            _ => runs.push((i, 1)),
                        }
                    }
                }
                if !runs.is_empty() {
                    items.push(FlushItem { entry: *e, runs });
                }
            }
            lsn += 1;
        }
        items
    }

    /// Reads an entry back from the ring and checks it before anything reaches the extent:
    /// a damaged entry stops the flush with `Corrupt` instead of being skipped or copied.
    fn read_verified(&self, e: &IndexEntry, stamp: u64, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(ENTRY_HEADER_SIZE + e.payload_len as usize, 0);
        self.read_wal(e.pos, buf)?;
        let off = self.wal_file_off(e.pos);
        let corrupt = |detail: String| BlockVolError::Corrupt {
            region: "wal",
            offset: off,
            lsn: Some(Lsn(e.lsn)),
            detail,
        };
        let h = EntryHeader::decode(buf, ENTRY_MAGIC_DISK).map_err(&corrupt)?;
        if h.generation != stamp || h.lsn != e.lsn || h.kind != e.kind || h.lba != e.lba {
            return Err(corrupt("header does not match the index".into()));
        }
        let crc = content_crc(
            h.kind,
            h.lba,
            crate::format::header_count(&h),
            &buf[ENTRY_HEADER_SIZE..],
        );
        if crc != h.content_crc {
            return Err(corrupt(format!(
                "content checksum mismatch: stored {:#010x}, computed {crc:#010x}",
                h.content_crc
            )));
        }
        Ok(())
    }

    fn apply_ops(&self, items: &[FlushItem], stamp: u64) -> Result<()> {
        let bs = self.block_size();
        let mut buf = Vec::new();
        for it in items {
            let e = &it.entry;
            if e.kind == KIND_WRITE {
                // One read per entry, however many of its blocks are written (no N-times
                // amplification for multi-block entries).
                self.read_verified(e, stamp, &mut buf)?;
            }
            let _w = self.extent_write();
            for &(first, n) in &it.runs {
                let off = self.extent_offset + (e.lba + first) * bs;
                if e.kind == KIND_WRITE {
                    let a = ENTRY_HEADER_SIZE + (first * bs) as usize;
                    let b = a + (n * bs) as usize;
                    self.medium.write_at(off, &buf[a..b]).map_err(|err| {
                        BlockVolError::io("write extent", format!("file offset {off}"), err)
                    })?;
                } else {
                    self.medium.zero_range(off, n * bs).map_err(|err| {
                        BlockVolError::io("zero extent", format!("file offset {off}"), err)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// One flush cycle up to `limit_req` (caller holds `flush_lock`). Returns the checkpoint.
    ///
    /// The extent is written only up to the flush mark of a durable superblock: a crash after
    /// the extent writes but before the new checkpoint is durable leaves the extent ahead of
    /// the checkpoint, and the mark is what lets recovery redo the flush up to where the extent
    /// may be, restoring "the extent holds every entry up to the checkpoint and nothing later"
    /// (truncation and base images rely on it). When the limit is above the persisted mark, an
    /// intent superblock raises the mark to the limit first.
    ///
    /// With `announce` (the background flusher) the intent and the final superblock announce
    /// the gate limit of that moment instead, so a next cycle up to it needs no intent write.
    /// Explicit flushes do not announce: a recovery after them redoes nothing beyond the limit
    /// they were asked for, so the checkpoint a dirty reopen finds is the one they returned.
    pub(crate) fn flush_locked(&self, limit_req: u64, announce: bool) -> Result<u64> {
        let (ops, limit, old_cp, stamp, mark) = {
            let st = self.lock_state();
            self.check_usable(&st)?;
            self.check_installed(&st, "flush")?;
            let limit = self.flush_limit(&st).min(limit_req).min(st.head);
            if limit <= st.checkpoint {
                (
                    Vec::new(),
                    st.checkpoint,
                    st.checkpoint,
                    st.stamp,
                    st.flush_mark,
                )
            } else {
                let ops = self.collect_ops(&st, limit);
                (ops, limit, st.checkpoint, st.stamp, st.flush_mark)
            }
        };
        if limit > old_cp {
            if !ops.is_empty() {
                if limit > mark {
                    self.persist_flush_intent(limit, announce)?;
                }
                let r = self.apply_ops(&ops, stamp).and_then(|()| {
                    self.medium
                        .sync_range(self.extent_offset, self.extent_len())
                        .map_err(|e| {
                            BlockVolError::io("fdatasync extent", self.medium.describe(), e)
                        })
                });
                if let Err(e) = r {
                    // Part of the batch may already be in the extent, beyond the checkpoint:
                    // the volume cannot promise truncation any more, so any flush failure
                    // (a failed write or sync, or a damaged WAL entry) poisons it.
                    let mut st = self.lock_state();
                    self.poison(&mut st, e.to_string());
                    return Err(e);
                }
            }
            self.persist_progress_with(Some(limit), announce)?;
        } else {
            // Nothing to move, but pins may have been released or retention changed: the tail
            // must advance anyway, or a full WAL would stay full.
            self.persist_progress(None)?;
        }
        Ok(self.lock_state().checkpoint)
    }

    /// Raises the persisted flush mark to at least `limit` (with `announce`, to the gate limit,
    /// see `announced_mark`) before a flush writes entries up to `limit` into the extent.
    pub(crate) fn persist_flush_intent(&self, limit: u64, announce: bool) -> Result<()> {
        let mut w = self.sb_writer();
        let mut mark = 0;
        self.persist_with(&mut w, |st| {
            let mut sb = self.sb_from_state(st);
            sb.flush_mark = if announce {
                self.announced_mark(st, limit)
            } else {
                st.flush_mark.max(limit)
            };
            mark = sb.flush_mark;
            sb
        })?;
        let mut st = self.lock_state();
        st.flush_mark = st.flush_mark.max(mark);
        Ok(())
    }

    /// Recovery's redo of an interrupted flush: moves every entry in `(checkpoint, to]` into
    /// the extent (whatever the gate now says: those entries were allowed into the extent when
    /// the mark naming them was written), syncs the extent and sets the in-memory checkpoint
    /// to `to`; the caller persists it. Idempotent, so a crash during it changes nothing.
    fn redo_flush(&self, to: u64) -> Result<()> {
        let (ops, old, stamp) = {
            let st = self.lock_state();
            if to <= st.checkpoint {
                return Ok(());
            }
            (self.collect_ops(&st, to), st.checkpoint, st.stamp)
        };
        if !ops.is_empty() {
            self.apply_ops(&ops, stamp)?;
            self.medium
                .sync_range(self.extent_offset, self.extent_len())
                .map_err(|e| BlockVolError::io("fdatasync extent", self.medium.describe(), e))?;
        }
        let mut st = self.lock_state();
        st.clean_dirty(old, to);
        st.checkpoint = to;
        Ok(())
    }

    /// Sync, then flush up to `limit`.
    pub(crate) fn force_flush_to(&self, limit: u64) -> Result<u64> {
        self.sync()?;
        let _f = self.flush_guard();
        self.flush_locked(limit, false)
    }

    // ---- Pins ------------------------------------------------------------------------------

    /// Registers a WAL pin keeping entries `> after` (caller holds the state lock).
    pub(crate) fn add_pin(&self, st: &mut State, after: u64) -> Result<u64> {
        let floor = st.tail.max(st.tail_moving_to.unwrap_or(0));
        if after < floor {
            return Err(BlockVolError::Recycled {
                requested: Lsn(after + 1),
                retained_start: Lsn(floor + 1),
            });
        }
        st.next_pin_id += 1;
        let id = st.next_pin_id;
        st.pins.insert(
            id,
            PinRec {
                after,
                revoked: false,
            },
        );
        Ok(id)
    }

    pub(crate) fn remove_pin(&self, id: u64) {
        let mut st = self.lock_state();
        st.pins.remove(&id);
        self.wake_flusher(&mut st);
        self.cond.notify_all();
    }

    pub(crate) fn pin_revoked(&self, id: u64) -> bool {
        let st = self.lock_state();
        st.pins.get(&id).is_none_or(|p| p.revoked)
    }
}

/// A block volume: WAL ring, extent, flusher, pins and the replica side.
///
/// `Send + Sync`; every method takes `&self`. Share it with `Arc<Volume>`.
pub struct Volume {
    pub(crate) shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({})", self.shared.medium.describe())
    }
}

/// The largest entry a ring of `wal_size` bytes takes: half the ring (so an entry always fits
/// once the ring drains), and never more than a header's u32 payload length can state.
fn max_entry_for(wal_size: u64) -> u64 {
    (wal_size / 2).min(MAX_ENTRY_SIZE)
}

/// `EntryTooLarge` unless an entry with `payload_len` payload bytes fits a ring of `wal_size`
/// bytes; otherwise its size in the ring (its payload length then fits a u32).
fn check_entry_len(payload_len: usize, wal_size: u64) -> Result<u64> {
    let max = max_entry_for(wal_size);
    let size = entry_size(payload_len as u64);
    if size > max {
        return Err(BlockVolError::EntryTooLarge { bytes: size, max });
    }
    Ok(size)
}

/// Checks creation options and derives the geometry.
fn validate_create(o: &CreateOptions) -> Result<Geometry> {
    let bs = o.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(BlockVolError::InvalidArgument(format!(
            "block size {bs} must be a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
        )));
    }
    if o.volume_size_bytes == 0 || !o.volume_size_bytes.is_multiple_of(u64::from(bs)) {
        return Err(BlockVolError::InvalidArgument(format!(
            "volume size {} must be a positive multiple of the block size {bs}",
            o.volume_size_bytes
        )));
    }
    if o.wal_size_bytes < MIN_WAL_SIZE || !o.wal_size_bytes.is_multiple_of(WAL_SIZE_ALIGN) {
        return Err(BlockVolError::InvalidArgument(format!(
            "wal size {} must be a multiple of {WAL_SIZE_ALIGN} and at least {MIN_WAL_SIZE}",
            o.wal_size_bytes
        )));
    }
    if o.wal_size_bytes / 2 < ENTRY_HEADER_SIZE as u64 + u64::from(bs) {
        return Err(BlockVolError::InvalidArgument(format!(
            "wal size {} cannot hold a one-block entry in half the ring",
            o.wal_size_bytes
        )));
    }
    WAL_OFFSET
        .checked_add(o.wal_size_bytes)
        .and_then(|x| x.checked_add(o.volume_size_bytes))
        .ok_or_else(|| BlockVolError::InvalidArgument("volume file size overflows".into()))?;
    Ok(Geometry {
        block_size: bs,
        volume_blocks: o.volume_size_bytes / u64::from(bs),
        wal_size_bytes: o.wal_size_bytes,
    })
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut id).is_ok() {
            return id;
        }
    }
    // No entropy source: the id only needs to differ between volumes on one machine.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = t ^ (u128::from(std::process::id()) << 64);
    xxhash_rust::xxh3::xxh3_128(&seed.to_le_bytes()).to_le_bytes()
}

/// The superblock of a freshly created volume.
fn initial_superblock(geo: &Geometry, volume_id: [u8; 16]) -> Superblock {
    Superblock {
        flags: 0,
        seq: 0,
        volume_id,
        block_size: geo.block_size,
        volume_blocks: geo.volume_blocks,
        wal_offset: WAL_OFFSET,
        wal_size: geo.wal_size_bytes,
        extent_offset: WAL_OFFSET + geo.wal_size_bytes,
        generation: 1,
        checkpoint: 0,
        tail_lsn: 0,
        tail_pos: 0,
        tail_epoch: 0,
        tail_crc: 0,
        role: Role::None,
        epoch: 0,
        head_hint: 0,
        install_lsn: 0,
        durable_mark: 0,
        flush_mark: 0,
    }
}

/// The directory holding `path`'s entry: its parent, or `.` for a bare file name (whose parent
/// is the empty path).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes both slots (seq 1 in A, seq 2 in B) so a new volume has two valid superblocks.
fn format_superblocks(m: &dyn Medium, sb: &Superblock) -> Result<()> {
    for (seq, off) in [(1u64, SB_SLOT_A_OFFSET), (2, SB_SLOT_B_OFFSET)] {
        let mut s = sb.clone();
        s.seq = seq;
        m.write_at(off, &s.encode())
            .map_err(|e| BlockVolError::io("write superblock", m.describe(), e))?;
        m.sync_range(off, SB_SLOT_SIZE)
            .map_err(|e| BlockVolError::io("sync superblock", m.describe(), e))?;
    }
    Ok(())
}

/// Reads both superblock slots of a medium of `len` bytes. A slot the medium is too short to
/// hold is not read (`pick_superblock` rejects it, saying why).
fn read_slots(
    read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    len: u64,
    what: &str,
) -> Result<[Vec<u8>; 2]> {
    let mut slots = [
        vec![0u8; SB_SLOT_SIZE as usize],
        vec![0u8; SB_SLOT_SIZE as usize],
    ];
    for (buf, off) in slots.iter_mut().zip([SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET]) {
        if off + SB_SLOT_SIZE <= len {
            read(off, buf)
                .map_err(|e| BlockVolError::io("read superblock", what.to_string(), e))?;
        }
    }
    Ok(slots)
}

/// Decodes both slots of a medium of `len` bytes and picks the newest valid one; then checks
/// that the medium holds the geometry it describes (`FileTooShort`, naming `what`).
pub(crate) fn pick_superblock(
    slots: &[Vec<u8>; 2],
    len: u64,
    what: &str,
) -> Result<(usize, Superblock)> {
    let decode = |i: usize, off: u64| {
        if off + SB_SLOT_SIZE > len {
            return Err(BlockVolError::Corrupt {
                region: "superblock",
                offset: off,
                lsn: None,
                detail: format!("the file is {len} bytes: too short to hold this slot"),
            });
        }
        Superblock::decode(&slots[i], off)
    };
    let a = decode(0, SB_SLOT_A_OFFSET);
    let b = decode(1, SB_SLOT_B_OFFSET);
    let (slot, sb) = choose_superblock(&a, &b).ok_or_else(|| BlockVolError::NoValidSuperblock {
        slot_a: a.err().map(|e| e.to_string()).unwrap_or_default(),
        slot_b: b.err().map(|e| e.to_string()).unwrap_or_default(),
    })?;
    if len < sb.file_len() {
        return Err(BlockVolError::FileTooShort {
            path: what.to_string(),
            len,
            required: sb.file_len(),
        });
    }
    Ok((slot, sb))
}

impl Volume {
    /// Creates a new volume file (which must not exist), preallocated and locked, and opens it.
    pub fn create(
        path: impl AsRef<Path>,
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Volume> {
        let path = path.as_ref();
        let geo = validate_create(create)?;
        let sb = initial_superblock(&geo, random_id());
        let medium = FileMedium::open(path, true, sb.file_len(), WAL_OFFSET, geo.wal_size_bytes)?;
        let r = (|| {
            format_superblocks(&medium, &sb)?;
            medium
                .sync_file()
                .map_err(|e| BlockVolError::io("fsync", path.display().to_string(), e))?;
            // Make the new directory entry durable too, or a crash could lose the whole file.
            let dir = parent_dir(path);
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| BlockVolError::io("fsync directory", dir.display().to_string(), e))?;
            Ok(())
        })();
        if let Err(e) = r {
            drop(medium);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let slots = read_slots(
            &|o, b| medium.read_at(o, b),
            medium.len(),
            &path.display().to_string(),
        )?;
        Volume::open_medium(Arc::new(medium), &slots, open, false)
    }

    /// Opens an existing volume: recovery replays the WAL from the persisted tail and persists
    /// its result before the volume accepts I/O.
    pub fn open(path: impl AsRef<Path>, open: &OpenOptions) -> Result<Volume> {
        let path = path.as_ref();
        let ctx = path.display().to_string();
        // Read the superblock through a plain handle to learn the geometry, then open the
        // locked, mapped medium and read it again under the lock.
        // A short file is refused here, before the read-write open (which would need write
        // permission to say so) and before anything is mapped.
        let probe = crate::medium::open_volume_file(path, false)?;
        let probe_len = probe
            .metadata()
            .map_err(|e| BlockVolError::io("stat", ctx.clone(), e))?
            .len();
        let slots = {
            use std::os::unix::fs::FileExt;
            read_slots(&|o, b| probe.read_exact_at(b, o), probe_len, &ctx)?
        };
        drop(probe);
        let (_, sb) = pick_superblock(&slots, probe_len, &ctx)?;
        let medium = FileMedium::open(path, false, sb.file_len(), WAL_OFFSET, sb.wal_size)?;
        let slots = read_slots(&|o, b| medium.read_at(o, b), medium.len(), &ctx)?;
        Volume::open_medium(Arc::new(medium), &slots, open, false)
    }

    /// Opens an existing volume for reading only (inspection): the file is opened `O_RDONLY`
    /// under a shared lock and never written, so this works on a read-only file or mount and
    /// leaves every byte as it was, evidence of a crash included.
    ///
    /// Recovery runs in memory only: the walk, the torn-tail and corruption decisions are those
    /// of [`Volume::open`], but no leftover is zeroed, nothing is synced, no interrupted flush
    /// is redone and no superblock is written. Reads, `digest`, `status`, `entry_info` and
    /// scans see exactly what a read-write open would recover (blocks written after the
    /// checkpoint are read from the WAL, whatever an interrupted flush left in the extent). A
    /// log that only a repair could open is refused with `Corrupt`. Everything that would
    /// change the file (writes, `sync`, flushes, truncation, `assign`, base pins and installs)
    /// fails with `ReadOnly`; `close` writes nothing.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Volume> {
        let path = path.as_ref();
        let medium = ReadOnlyFileMedium::open(path)?;
        let slots = read_slots(
            &|o, b| medium.read_at(o, b),
            medium.len(),
            &path.display().to_string(),
        )?;
        let opts = OpenOptions {
            flusher: FlusherMode::Manual,
            repair: false,
            ..OpenOptions::default()
        };
        Volume::open_medium(Arc::new(medium), &slots, &opts, true)
    }

    /// Whether the volume was opened with [`Volume::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.shared.lock_state().read_only
    }

    /// Recovery. With `read_only` it runs in memory only: it decides exactly as a read-write
    /// open does, but writes, zeroes and syncs nothing and redoes no flush.
    pub(crate) fn open_medium(
        medium: Arc<dyn Medium>,
        slots: &[Vec<u8>; 2],
        opts: &OpenOptions,
        read_only: bool,
    ) -> Result<Volume> {
        let (slot, sb) = pick_superblock(slots, medium.len(), &medium.describe())?;
        let geo = Geometry {
            block_size: sb.block_size,
            volume_blocks: sb.volume_blocks,
            wal_size_bytes: sb.wal_size,
        };
        let stamp = wal_stamp(&sb.volume_id, sb.generation);
        let install_incomplete = sb.flags & SB_FLAG_INSTALL_INCOMPLETE != 0;
        let mut repaired = sb.flags & SB_FLAG_REPAIRED != 0;
        let tail_info = EntryInfo {
            lsn: Lsn(sb.tail_lsn),
            epoch: sb.tail_epoch,
            content_crc: sb.tail_crc,
        };
        let mut st = State {
            head: sb.checkpoint,
            head_pos: sb.tail_pos,
            tail: sb.tail_lsn,
            tail_pos: sb.tail_pos,
            tail_info,
            index: VecDeque::new(),
            dirty: DirtyMap::default(),
            checkpoint: sb.checkpoint,
            // An install in progress keeps no log: its mark means nothing.
            flush_mark: if install_incomplete {
                sb.checkpoint
            } else {
                sb.flush_mark
            },
            durable: sb.checkpoint,
            synced_pos: sb.tail_pos,
            committed: 0,
            epoch: sb.epoch,
            // A primary that restarts comes back fenced: another primary may have been
            // promoted meanwhile, so writes wait for a fresh assignment.
            role: if sb.role == Role::Primary {
                Role::Stale
            } else {
                sb.role
            },
            generation: sb.generation,
            stamp,
            pins: HashMap::new(),
            fences: HashMap::new(),
            next_pin_id: 0,
            revoke_reason: String::new(),
            retention: opts.retention,
            installing: false,
            install_incomplete,
            install_lsn: sb.install_lsn,
            repaired,
            poisoned: None,
            closed: false,
            read_only,
            stop_flusher: false,
            flush_wanted: false,
            syncing: false,
            space_waiters: 0,
            lineage: 0,
            tail_moving_to: None,
        };
        let wal_size = sb.wal_size;
        // The slot the next superblock write must avoid, and its sequence number.
        let (mut last_seq, mut last_slot) = (sb.seq, slot);
        if !install_incomplete {
            let params = WalkParams {
                wal_size,
                stamp,
                tail_lsn: sb.tail_lsn,
                tail_pos: sb.tail_pos,
                block_size: sb.block_size,
                volume_blocks: sb.volume_blocks,
            };
            let reader = |phys: u64, buf: &mut [u8]| medium.read_at(WAL_OFFSET + phys, buf);
            let res = walk(&params, &reader)
                .map_err(|e| BlockVolError::io("read wal", medium.describe(), e))?;
            // Everything up to the checkpoint, and up to the durable mark, was synced: a log
            // that ends earlier has lost acknowledged entries.
            let must_reach = sb.checkpoint.max(sb.durable_mark);
            let below_checkpoint = res.head < sb.checkpoint;
            let below_mark = res.head < must_reach;
            if res.evidence.is_some() || below_mark {
                let detail = match (&res.evidence, below_mark) {
                    (Some(ev), _) => format!(
                        "{}; entry {} (durable hint {}) found later proves lsn {} had been synced",
                        res.end_detail,
                        ev.lsn,
                        ev.durable_hint,
                        res.head + 1
                    ),
                    (None, _) => format!(
                        "{}; the log ends at lsn {} below the synced lsn {must_reach} (checkpoint {})",
                        res.end_detail, res.head, sb.checkpoint
                    ),
                };
                if !opts.repair || read_only {
                    return Err(BlockVolError::Corrupt {
                        region: "wal",
                        offset: WAL_OFFSET + res.end_pos % wal_size,
                        lsn: Some(Lsn(res.head + 1)),
                        detail,
                    });
                }
                log::warn!(
                    "repairing {}: truncating the log: {detail}",
                    medium.describe()
                );
                repaired = true;
            }
            // (Reaching here with either means `opts.repair` is set.)
            let repairing = res.evidence.is_some() || below_mark;
            if below_checkpoint {
                // The extent holds everything up to the checkpoint; the log past it is gone.
                st.head = sb.checkpoint;
                st.tail = sb.checkpoint;
                st.tail_pos = res.end_pos;
                st.head_pos = res.end_pos;
                st.tail_info = EntryInfo {
                    lsn: Lsn(sb.checkpoint),
                    epoch: 0,
                    content_crc: 0,
                };
            } else {
                st.head = res.head;
                st.head_pos = res.head_pos;
                st.index = res.entries;
                let entries: Vec<IndexEntry> = st
                    .index
                    .iter()
                    .filter(|e| e.lsn > sb.checkpoint)
                    .copied()
                    .collect();
                for e in &entries {
                    st.put_dirty(e, sb.block_size);
                }
            }
            if repairing {
                // Persist the repair before destroying its evidence: once a leftover is zeroed,
                // a crash must not let the shortened log open as a clean one. The slot marks the
                // checkpoint untrusted, names the new tail when the log ended below the
                // checkpoint, and lowers the durable mark to what the log still holds (only
                // ever lowering it, so nothing unsynced is claimed).
                let mut r = sb.clone();
                r.flags |= SB_FLAG_REPAIRED;
                r.seq = last_seq + 1;
                r.tail_lsn = st.tail;
                r.tail_pos = st.tail_pos;
                r.tail_epoch = st.tail_info.epoch;
                r.tail_crc = st.tail_info.content_crc;
                r.head_hint = st.head;
                r.durable_mark = sb.durable_mark.min(st.head);
                r.flush_mark = sb.flush_mark.min(st.head);
                let off = if last_slot == 0 {
                    SB_SLOT_B_OFFSET
                } else {
                    SB_SLOT_A_OFFSET
                };
                medium
                    .write_at(off, &r.encode())
                    .map_err(|e| BlockVolError::io("write superblock", medium.describe(), e))?;
                medium
                    .sync_range(off, SB_SLOT_SIZE)
                    .map_err(|e| BlockVolError::io("sync superblock", medium.describe(), e))?;
                (last_seq, last_slot) = (r.seq, 1 - last_slot);
            }
            if !read_only {
                // Neutralize leftovers of a torn tail (and, under repair, everything after the
                // corruption) so no later recovery can mistake them for evidence or splice
                // them in.
                let zeros = [0u8; ENTRY_HEADER_SIZE];
                for l in &res.leftovers {
                    medium
                        .write_at(WAL_OFFSET + l.pos % wal_size, &zeros)
                        .map_err(|e| BlockVolError::io("write wal", medium.describe(), e))?;
                }
                // The recovered entries may still be only in the page cache (a process
                // crash): make them, and the zeroed leftovers, durable before acknowledging
                // anything.
                medium
                    .sync_range(WAL_OFFSET, wal_size)
                    .map_err(|e| BlockVolError::io("msync wal", medium.describe(), e))?;
            }
            // (Read-only: the recovered view, as a read-write open would persist it.)
            st.durable = st.head;
            st.synced_pos = st.head_pos;
            st.repaired = repaired;
            // The extent may hold entries up to the mark (a crash interrupted a flush): redo
            // that flush below, up to the recovered head (without repair the durable mark,
            // which is at least the flush mark, guarantees the head reaches it).
            st.flush_mark = st.flush_mark.min(st.head);
        }
        let shared = Arc::new(Shared {
            medium,
            geo,
            extent_offset: sb.extent_offset,
            volume_id: sb.volume_id,
            gate: opts.flush_gate,
            wal_full_timeout: opts.wal_full_timeout,
            state: Mutex::new(st),
            cond: Condvar::new(),
            flusher_cond: Condvar::new(),
            flush_lock: Mutex::new(()),
            extent_rw: RwLock::new(()),
            sb: Mutex::new(SbWriter {
                seq: last_seq,
                slot: last_slot,
            }),
        });
        if read_only {
            // No redo of an interrupted flush: whatever it left in the extent beyond the
            // checkpoint is shadowed by the dirty map, which holds every block written after
            // the checkpoint, so reads are exact without it. Nothing is persisted.
            return Ok(Volume {
                shared,
                flusher: Mutex::new(None),
            });
        }
        if !install_incomplete {
            let to = shared.lock_state().flush_mark;
            shared.redo_flush(to)?;
            let mut st = shared.lock_state();
            st.flush_mark = st.checkpoint;
        }
        {
            let mut w = shared.sb_writer();
            shared.persist_with(&mut w, |st| shared.sb_from_state(st))?;
        }
        let vol = Volume {
            shared,
            flusher: Mutex::new(None),
        };
        if let FlusherMode::Background { interval } = opts.flusher {
            let s = vol.shared.clone();
            let h = std::thread::Builder::new()
                .name("blockvol-flusher".into())
                .spawn(move || flusher_main(s, interval))
                .map_err(|e| BlockVolError::io("spawn flusher", "thread", e))?;
            *lock(&vol.flusher) = Some(h);
        }
        Ok(vol)
    }

    /// The volume's fixed shape.
    pub fn geometry(&self) -> Geometry {
        self.shared.geo
    }

    /// The largest [`write`](Volume::write) one call takes, in bytes (whole blocks): one entry
    /// holds at most half the WAL (and at most what a header's u32 length can state), less
    /// its header. Larger writes are refused with `EntryTooLarge`.
    pub fn max_write_bytes(&self) -> u64 {
        let bs = self.shared.block_size();
        let payload = max_entry_for(self.shared.wal_size()) - ENTRY_HEADER_SIZE as u64;
        payload / bs * bs
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<()> {
        let vb = self.shared.geo.volume_blocks;
        if blocks == 0 || lba.checked_add(blocks).is_none_or(|e| e > vb) {
            return Err(BlockVolError::OutOfRange {
                lba,
                blocks,
                volume_blocks: vb,
            });
        }
        Ok(())
    }

    fn blocks_of(&self, len: usize) -> Result<u64> {
        let bs = self.shared.geo.block_size;
        if len == 0 || !(len as u64).is_multiple_of(u64::from(bs)) {
            return Err(BlockVolError::Misaligned {
                len: len as u64,
                block_size: bs,
            });
        }
        Ok(len as u64 / u64::from(bs))
    }

    fn write_impl(&self, epoch: Option<u64>, lba: u64, data: &[u8]) -> Result<Lsn> {
        let blocks = self.blocks_of(data.len())?;
        self.check_range(lba, blocks)?;
        let blocks32 = u32::try_from(blocks).map_err(|_| {
            BlockVolError::InvalidArgument(format!("write of {blocks} blocks is too large"))
        })?;
        // Refuse an oversized write before spending a checksum pass on it.
        self.shared.check_entry_len(data.len())?;
        // The checksum is computed before taking the lock, so the critical section is only the
        // copy into the map.
        let crc = content_crc(KIND_WRITE, lba, data.len() as u64, data);
        let (lsn, _) = self.shared.append(
            KIND_WRITE,
            lba,
            blocks32,
            data,
            crc,
            AppendMode::Client { epoch },
        )?;
        Ok(Lsn(lsn))
    }

    fn trim_impl(&self, epoch: Option<u64>, lba: u64, blocks: u64) -> Result<Lsn> {
        self.check_range(lba, blocks)?;
        let blocks32 = u32::try_from(blocks).map_err(|_| {
            BlockVolError::InvalidArgument(format!("trim of {blocks} blocks is too large"))
        })?;
        let crc = content_crc(KIND_TRIM, lba, blocks, &[]);
        let (lsn, _) = self.shared.append(
            KIND_TRIM,
            lba,
            blocks32,
            &[],
            crc,
            AppendMode::Client { epoch },
        )?;
        Ok(Lsn(lsn))
    }

    /// Writes one or more whole blocks at `lba`; returns the entry's LSN. Not durable until a
    /// later `sync` returns.
    pub fn write(&self, lba: u64, data: &[u8]) -> Result<Lsn> {
        self.write_impl(None, lba, data)
    }

    /// `write`, refused with `StaleEpoch` unless `epoch` is the volume's current epoch.
    pub fn write_in_epoch(&self, epoch: u64, lba: u64, data: &[u8]) -> Result<Lsn> {
        self.write_impl(Some(epoch), lba, data)
    }

    /// Zeroes `blocks` blocks at `lba` (at least one).
    pub fn trim(&self, lba: u64, blocks: u64) -> Result<Lsn> {
        self.trim_impl(None, lba, blocks)
    }

    /// `trim`, refused with `StaleEpoch` unless `epoch` is the volume's current epoch.
    pub fn trim_in_epoch(&self, epoch: u64, lba: u64, blocks: u64) -> Result<Lsn> {
        self.trim_impl(Some(epoch), lba, blocks)
    }

    /// Appends a no-op entry (for example to open a new epoch in the log).
    pub fn barrier(&self) -> Result<Lsn> {
        let crc = content_crc(KIND_BARRIER, 0, 0, &[]);
        let (lsn, _) = self.shared.append(
            KIND_BARRIER,
            0,
            0,
            &[],
            crc,
            AppendMode::Client { epoch: None },
        )?;
        Ok(Lsn(lsn))
    }

    /// Reads `blocks` blocks at `lba`.
    pub fn read(&self, lba: u64, blocks: u64) -> Result<Vec<u8>> {
        self.check_range(lba, blocks)?;
        let len = blocks
            .checked_mul(self.shared.block_size())
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| {
                BlockVolError::InvalidArgument(format!("read of {blocks} blocks is too large"))
            })?;
        let mut buf = vec![0u8; len];
        self.read_into(lba, &mut buf)?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes (whole blocks) at `lba`: newest data from the dirty map (the
    /// WAL), everything else from the extent.
    pub fn read_into(&self, lba: u64, buf: &mut [u8]) -> Result<()> {
        let blocks = self.blocks_of(buf.len())?;
        self.check_range(lba, blocks)?;
        let s = &self.shared;
        let bs = s.block_size() as usize;
        // Holding the extent read lock across the lookup and the extent read keeps the flusher
        // from rewriting a block between the two.
        let _r = s.extent_read();
        let mut misses: Vec<(usize, usize)> = Vec::new();
        {
            let st = s.lock_state();
            if st.closed {
                return Err(BlockVolError::Closed);
            }
            s.check_installed(&st, "read")?;
            for i in 0..blocks as usize {
                let dst = &mut buf[i * bs..(i + 1) * bs];
                match st.dirty.get(&(lba + i as u64)) {
                    Some(d) if d.src == TRIM_SRC => dst.fill(0),
                    Some(d) => s.read_wal(d.src, dst)?,
                    None => match misses.last_mut() {
                        Some((f, n)) if *f + *n == i => *n += 1,
                        _ => misses.push((i, 1)),
                    },
                }
            }
        }
        for (first, n) in misses {
            let off = s.extent_offset + (lba + first as u64) * bs as u64;
            s.medium
                .read_at(off, &mut buf[first * bs..(first + n) * bs])
                .map_err(|e| BlockVolError::io("read extent", format!("file offset {off}"), e))?;
        }
        Ok(())
    }

    /// Makes every appended entry durable (group commit); returns the durable LSN.
    pub fn sync(&self) -> Result<Lsn> {
        self.shared.sync().map(Lsn)
    }

    /// Syncs, then flushes everything the gate allows; returns the checkpoint.
    pub fn force_flush(&self) -> Result<Lsn> {
        self.shared.force_flush_to(u64::MAX).map(Lsn)
    }

    /// Syncs, then flushes at most up to `lsn`; returns the checkpoint.
    pub fn force_flush_to(&self, lsn: Lsn) -> Result<Lsn> {
        self.shared.force_flush_to(lsn.0).map(Lsn)
    }

    /// Records the replication layer's committed LSN (gates the flusher under
    /// `FlushGate::Committed`).
    ///
    /// Monotonic: a lower value than the current one is ignored. A flush announces (in its
    /// flush mark) entries up to the committed LSN as flushable after a crash, so committed
    /// must never go back below what was announced.
    pub fn set_committed(&self, lsn: Lsn) {
        let mut st = self.shared.lock_state();
        st.committed = st.committed.max(lsn.0);
        self.shared.wake_flusher(&mut st);
    }

    /// Replaces the retention policy and moves the tail if the new policy allows it.
    pub fn set_retention(&self, policy: RetentionPolicy) {
        {
            let mut st = self.shared.lock_state();
            st.retention = policy;
        }
        if let Err(e) = self.shared.persist_progress(None) {
            log::warn!("tail move after a retention change failed: {e}");
        }
    }

    /// Persists a new role and epoch. An epoch below the current one is refused.
    pub fn assign(&self, role: Role, epoch: u64) -> Result<()> {
        let s = &self.shared;
        let mut w = s.sb_writer();
        {
            let st = s.lock_state();
            s.check_usable(&st)?;
            if epoch < st.epoch {
                return Err(BlockVolError::EpochRegression {
                    current: st.epoch,
                    requested: epoch,
                });
            }
        }
        s.persist_with(&mut w, |st| {
            let mut sb = s.sb_from_state(st);
            sb.role = role;
            sb.epoch = epoch;
            sb
        })?;
        let mut st = s.lock_state();
        st.role = role;
        st.epoch = epoch;
        s.cond.notify_all();
        Ok(())
    }

    /// One consistent snapshot of the volume's state.
    pub fn status(&self) -> Status {
        let s = &self.shared;
        let st = s.lock_state();
        Status {
            head: Lsn(st.head),
            durable: Lsn(st.durable),
            retained_start: Lsn(st.tail + 1),
            tail: Lsn(st.tail),
            checkpoint: Lsn(st.checkpoint),
            committed: Lsn(st.committed),
            checkpoint_trusted: !st.repaired && !st.install_incomplete,
            epoch: st.epoch,
            role: st.role,
            generation: st.generation,
            // Every pin kind (WAL pin, scan, base pin) owns exactly one pin record.
            pins_outstanding: st.live_pins(),
            wal_used_bytes: st.head_pos - st.tail_pos,
            wal_size_bytes: s.wal_size(),
            install_incomplete: st.install_incomplete,
            poisoned: st.poisoned.is_some(),
        }
    }

    /// The holes in the retained range `(tail, head]`, as `(after, to]` ranges of missing LSNs.
    ///
    /// This is the contiguity proof recovery decisions rest on, read off the in-memory LSN
    /// index in O(1): the index is appended only at `head + 1` and popped only at its ends, so
    /// it is contiguous exactly when it holds `head - tail` entries starting at `tail + 1`. A
    /// violation (which would be a bug) is reported as one hole covering the whole range, so a
    /// caller can never plan a catch-up across it.
    pub fn retained_gaps(&self) -> Vec<(Lsn, Lsn)> {
        let st = self.shared.lock_state();
        let expected = st.head.saturating_sub(st.tail);
        let first_ok = st.index.front().is_none_or(|e| e.lsn == st.tail + 1);
        let last_ok = st.index.back().is_none_or(|e| e.lsn == st.head);
        if st.index.len() as u64 == expected && first_ok && last_ok {
            Vec::new()
        } else {
            log::error!(
                "LSN index inconsistent: {} entries for ({}, {}]",
                st.index.len(),
                st.tail,
                st.head
            );
            vec![(Lsn(st.tail), Lsn(st.head))]
        }
    }

    /// Identity of entry `lsn`, for `lsn` in `[tail, head]`; `Lsn(0)` is the origin.
    pub fn entry_info(&self, lsn: Lsn) -> Result<EntryInfo> {
        if lsn.0 == 0 {
            return Ok(EntryInfo::ORIGIN);
        }
        let st = self.shared.lock_state();
        self.shared.check_installed(&st, "entry_info")?;
        if lsn.0 > st.head {
            return Err(BlockVolError::BeyondHead {
                requested: lsn,
                head: Lsn(st.head),
            });
        }
        st.info_of(lsn.0).ok_or(BlockVolError::Recycled {
            requested: lsn,
            retained_start: Lsn(st.tail + 1),
        })
    }

    /// xxh3-128 over every block as `read` returns it, in LBA order.
    pub fn digest(&self) -> Result<Digest> {
        let g = self.shared.geo;
        let per = (IO_CHUNK as u64 / u64::from(g.block_size)).max(1);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = Vec::new();
        let mut lba = 0;
        while lba < g.volume_blocks {
            let n = per.min(g.volume_blocks - lba);
            buf.resize((n * u64::from(g.block_size)) as usize, 0);
            self.read_into(lba, &mut buf)?;
            h.update(&buf);
            lba += n;
        }
        Ok(Digest(h.digest128()))
    }

    /// Applies a replicated entry: only `lsn == head + 1` is appended (keeping the entry's LSN
    /// and epoch); an identical duplicate is acknowledged; anything else is a typed error.
    pub fn apply(&self, entry: &WalEntry) -> Result<ApplyOutcome> {
        if entry.lsn.0 == 0 {
            return Err(BlockVolError::InvalidArgument(
                "lsn 0 is never an entry".into(),
            ));
        }
        let info = entry.info();
        let (kind, lba, blocks, payload): (u8, u64, u32, &[u8]) = match &entry.kind {
            EntryKind::Write { lba, data } => {
                let b = self.blocks_of(data.len())?;
                self.check_range(*lba, b)?;
                let b = u32::try_from(b).map_err(|_| {
                    BlockVolError::InvalidArgument(format!("entry of {b} blocks is too large"))
                })?;
                (KIND_WRITE, *lba, b, data.as_slice())
            }
            EntryKind::Trim { lba, blocks } => {
                self.check_range(*lba, *blocks)?;
                let b = u32::try_from(*blocks).map_err(|_| {
                    BlockVolError::InvalidArgument(format!("trim of {blocks} blocks is too large"))
                })?;
                (KIND_TRIM, *lba, b, &[][..])
            }
            EntryKind::Barrier => (KIND_BARRIER, 0, 0, &[][..]),
        };
        let (_, outcome) = self.shared.append(
            kind,
            lba,
            blocks,
            payload,
            info.content_crc,
            AppendMode::Apply {
                lsn: entry.lsn.0,
                epoch: entry.epoch,
                info,
            },
        )?;
        Ok(outcome)
    }

    /// `apply` for one entry in wire form at the front of `buf` (as `WalEntry::encode_into`
    /// writes it), without building a `WalEntry`: the frame is checked exactly as
    /// `WalEntry::decode_prefix` checks it, its verified content CRC is the entry's identity
    /// (no second pass over the payload), and the payload is copied from `buf` straight into
    /// the ring. Returns the outcome and the bytes of `buf` the entry used.
    pub fn apply_encoded(&self, buf: &[u8]) -> Result<(ApplyOutcome, usize)> {
        let (h, used) = crate::entry::decode_wire(buf)?;
        let payload = &buf[ENTRY_HEADER_SIZE..used];
        let (lba, blocks) = match h.kind {
            KIND_WRITE => {
                let b = self.blocks_of(payload.len())?;
                self.check_range(h.lba, b)?;
                let b = u32::try_from(b).map_err(|_| {
                    BlockVolError::InvalidArgument(format!("entry of {b} blocks is too large"))
                })?;
                (h.lba, b)
            }
            KIND_TRIM => {
                self.check_range(h.lba, u64::from(h.blocks))?;
                (h.lba, h.blocks)
            }
            _ => (0, 0),
        };
        let info = EntryInfo {
            lsn: Lsn(h.lsn),
            epoch: h.epoch,
            content_crc: h.content_crc,
        };
        let (_, outcome) = self.shared.append(
            h.kind,
            lba,
            blocks,
            payload,
            h.content_crc,
            AppendMode::Apply {
                lsn: h.lsn,
                epoch: h.epoch,
                info,
            },
        )?;
        Ok((outcome, used))
    }

    /// Starts writing the ring bytes appended since the last sync to the media, without
    /// waiting and without making anything durable (only `sync` does that). A bulk appender
    /// (a replica applying a catch-up) calls it between batches so the final `sync` finds
    /// most of the bytes already written instead of writing them all at once. A hint: a
    /// failure to start writeback changes nothing and is not reported.
    pub fn start_writeback(&self) {
        let s = &self.shared;
        let (from, to) = {
            let st = s.lock_state();
            if st.closed || st.poisoned.is_some() {
                return;
            }
            (st.synced_pos, st.head_pos)
        };
        s.start_writeback(from, to);
    }

    /// Drops every entry above `lsn`, durably. Below the checkpoint it is refused with
    /// `BelowCheckpoint` and nothing changes.
    pub fn truncate_after(&self, lsn: Lsn) -> Result<()> {
        let s = &self.shared;
        let _f = s.flush_guard();
        let mut w = s.sb_writer();
        let mut st = s.lock_state();
        s.check_usable(&st)?;
        s.check_installed(&st, "truncate")?;
        if lsn.0 < st.checkpoint {
            return Err(BlockVolError::BelowCheckpoint {
                requested: lsn,
                checkpoint: Lsn(st.checkpoint),
            });
        }
        if lsn.0 >= st.head {
            return Ok(());
        }
        if let Some(f) = st.min_fence().filter(|f| *f > lsn.0) {
            return Err(BlockVolError::Busy(format!(
                "a base pin at lsn {f} covers entries that truncation after {lsn} would drop"
            )));
        }
        let new_head_pos = if lsn.0 == st.tail {
            st.tail_pos
        } else {
            st.entry(lsn.0).map(|e| e.end).unwrap_or(st.head_pos)
        };
        // First lower the superblock's durable mark (it may name an entry about to be
        // dropped, and recovery would then call the missing suffix lost data), then zero the
        // discarded bytes durably so a crash cannot bring the dropped suffix back. The state
        // lock is held throughout: truncation is rare and must be atomic for appenders.
        // The flush mark goes down with it: no flush is running (the flush lock is held), so
        // the extent holds nothing above the checkpoint, and a mark left above `lsn` would
        // make a later recovery redo the flush of whatever new entries take those LSNs.
        let mut sb = s.sb_from_state(&st);
        sb.durable_mark = st.durable.min(lsn.0);
        sb.flush_mark = st.flush_mark.min(lsn.0);
        if let Err(e) = s.write_sb(&mut w, sb.clone()) {
            s.poison(&mut st, e.to_string());
            return Err(e);
        }
        st.flush_mark = sb.flush_mark;
        let r = (|| -> std::io::Result<()> {
            // Zero the dropped headers first, newest group first, each group durable before
            // the next is touched. A surviving header whose durable hint covers an older
            // dropped entry that the crash left damaged would otherwise make recovery call
            // the truncation corruption. A group is every dropped entry above the durable
            // hint of its newest member: hints never decrease with the LSN, so no header of a
            // group vouches for another member, and every newer group is already gone.
            let dropped: Vec<IndexEntry> =
                st.index.iter().filter(|e| e.lsn > lsn.0).copied().collect();
            let hdr_zeros = [0u8; ENTRY_HEADER_SIZE];
            let mut end = dropped.len();
            while end > 0 {
                let newest = dropped[end - 1];
                let mut hdr = [0u8; ENTRY_HEADER_SIZE];
                s.medium.read_at(s.wal_file_off(newest.pos), &mut hdr)?;
                // A header that does not decode vouches for nothing: a group of one.
                let hint = EntryHeader::decode(&hdr, ENTRY_MAGIC_DISK)
                    .map_or(newest.lsn - 1, |h| h.durable_hint.min(newest.lsn - 1));
                let mut start = end - 1;
                while start > 0 && dropped[start - 1].lsn > hint {
                    start -= 1;
                }
                for e in &dropped[start..end] {
                    s.medium.write_at(s.wal_file_off(e.pos), &hdr_zeros)?;
                    if e.start != e.pos {
                        // The padding header (or a skipped ring end too short for one) before
                        // the entry carries the entry's LSN and hint too.
                        let n = (e.pos - e.start).min(ENTRY_HEADER_SIZE as u64) as usize;
                        s.medium
                            .write_at(s.wal_file_off(e.start), &hdr_zeros[..n])?;
                    }
                }
                s.sync_wal(dropped[start].start, newest.end)?;
                end = start;
            }
            let w = s.wal_size();
            let zeros = vec![0u8; IO_CHUNK];
            let mut p = new_head_pos;
            while p < st.head_pos {
                let phys = p % w;
                let n = (st.head_pos - p).min(w - phys).min(IO_CHUNK as u64);
                s.medium.write_at(WAL_OFFSET + phys, &zeros[..n as usize])?;
                p += n;
            }
            s.sync_wal(new_head_pos, st.head_pos)
        })();
        if let Err(e) = r {
            let err =
                BlockVolError::io("zero truncated wal", format!("logical {new_head_pos}.."), e);
            s.poison(&mut st, err.to_string());
            return Err(err);
        }
        while st.index.back().is_some_and(|e| e.lsn > lsn.0) {
            st.index.pop_back();
        }
        st.head = lsn.0;
        st.head_pos = new_head_pos;
        st.durable = st.durable.min(lsn.0);
        st.synced_pos = st.synced_pos.min(new_head_pos);
        st.lineage += 1;
        st.rebuild_dirty(s.geo.block_size);
        s.cond.notify_all();
        Ok(())
    }

    /// Revokes every live pin (WAL pins, scan pins, base pins): they stop holding the tail and
    /// the flusher. Returns how many were revoked.
    pub fn revoke_wal_pins(&self, reason: &str) -> usize {
        let s = &self.shared;
        let n = {
            let mut st = s.lock_state();
            let mut n = 0;
            for p in st.pins.values_mut().filter(|p| !p.revoked) {
                p.revoked = true;
                n += 1;
            }
            for f in st.fences.values_mut().filter(|f| !f.revoked) {
                f.revoked = true;
                n += 1;
            }
            st.revoke_reason = reason.to_string();
            s.wake_flusher(&mut st);
            s.cond.notify_all();
            n
        };
        log::warn!("revoked {n} pins: {reason}");
        if let Err(e) = s.persist_progress(None) {
            log::warn!("tail move after revoking pins failed: {e}");
        }
        n
    }

    fn stop_flusher(&self) {
        {
            let mut st = self.shared.lock_state();
            st.stop_flusher = true;
            self.shared.flusher_cond.notify_all();
        }
        if let Some(h) = lock(&self.flusher).take()
            && h.join().is_err()
        {
            log::error!("flusher thread panicked");
        }
    }

    /// Stops the flusher, syncs the WAL and writes a final superblock. A read-only volume
    /// writes nothing.
    pub fn close(self) -> Result<()> {
        self.stop_flusher();
        let s = &self.shared;
        {
            let mut st = s.lock_state();
            if st.read_only {
                st.closed = true;
                return Ok(());
            }
        }
        let r = {
            let incomplete = {
                let st = s.lock_state();
                st.installing || st.install_incomplete
            };
            if incomplete { Ok(0) } else { s.sync() }
        };
        let r2 = {
            // No flush runs (the flush lock is held), so the extent holds exactly the entries
            // up to the checkpoint: the clean-close superblock drops the flush mark to the
            // checkpoint, and the next open starts exactly where this one ended instead of
            // redoing the flush of entries the last flush cycle only announced.
            let _f = s.flush_guard();
            let mut w = s.sb_writer();
            let r = s.persist_with(&mut w, |st| {
                let mut sb = s.sb_from_state(st);
                if !st.installing && !st.install_incomplete {
                    sb.flush_mark = st.checkpoint;
                }
                sb
            });
            if r.is_ok() {
                let mut st = s.lock_state();
                if !st.installing && !st.install_incomplete {
                    st.flush_mark = st.checkpoint;
                }
            }
            r
        };
        s.lock_state().closed = true;
        r?;
        r2
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_flusher();
        let mut st = self.shared.lock_state();
        st.closed = true;
        self.shared.cond.notify_all();
    }
}

/// One background cycle: make appended entries durable, then flush what the gate allows.
fn background_cycle(s: &Shared) -> Result<()> {
    let needs_sync = {
        let st = s.lock_state();
        if st.poisoned.is_some() || st.installing || st.install_incomplete {
            return Ok(());
        }
        st.head > st.durable
    };
    if needs_sync {
        s.sync()?;
    }
    let _f = s.flush_guard();
    // Pipelined, one superblock sync per cycle: a cycle flushes exactly up to the flush mark
    // the previous cycle announced (no intent write needed) and its final superblock
    // announces the current gate limit for the next one. A cycle with nothing announced but
    // entries to move only announces them (its one superblock write is the intent). A steady
    // writer so costs what it did before the intent protocol existed, with the checkpoint one
    // cycle behind the gate. A writer waiting for WAL space gets everything the gate allows at
    // once, with an intent write if one is needed.
    let (pressure, mark, cp, limit) = {
        let st = s.lock_state();
        (
            st.space_waiters > 0,
            st.flush_mark,
            st.checkpoint,
            s.flush_limit(&st).min(st.head),
        )
    };
    if !pressure && mark <= cp && limit > cp {
        return s.persist_flush_intent(limit, true);
    }
    // Under pressure, or with nothing to move (the tail may still move: pins released,
    // retention changed): everything the gate allows.
    let to = if !pressure && mark > cp {
        mark
    } else {
        u64::MAX
    };
    s.flush_locked(to, true).map(|_| ())
}

fn flusher_main(s: Arc<Shared>, interval: Duration) {
    loop {
        {
            let mut st = s.lock_state();
            if !st.flush_wanted && !st.stop_flusher && !st.closed {
                st = s
                    .flusher_cond
                    .wait_timeout(st, interval)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if st.stop_flusher || st.closed {
                return;
            }
            st.flush_wanted = false;
        }
        if let Err(e) = background_cycle(&s) {
            log::warn!("flush cycle on {} failed: {e}", s.medium.describe());
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Volume {
    /// Creates a volume on a new simulated disk (feature `testing`).
    pub fn create_sim(
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<(Volume, crate::sim::SimDisk)> {
        let geo = validate_create(create)?;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&geo.volume_blocks.to_le_bytes());
        id[8..12].copy_from_slice(&geo.block_size.to_le_bytes());
        id[12] = 0x5A;
        let sb = initial_superblock(&geo, id);
        let disk = crate::sim::SimDisk::new(sb.file_len());
        {
            if !disk.claim() {
                return Err(BlockVolError::Locked {
                    path: "simulated disk".into(),
                });
            }
            let m = crate::sim::SimMedium::new(disk.clone());
            format_superblocks(&m, &sb)?;
        }
        let v = Volume::open_sim(&disk, open)?;
        Ok((v, disk))
    }

    /// Runs one cycle of the background flusher now, on the caller's thread (feature
    /// `testing`: makes the pipelined background flush deterministic to test).
    pub fn run_flusher_cycle(&self) -> Result<()> {
        background_cycle(&self.shared)
    }

    /// File offset of the header of retained entry `lsn` (feature `testing`, for fault
    /// injection).
    pub fn entry_file_offset(&self, lsn: Lsn) -> Result<u64> {
        let st = self.shared.lock_state();
        st.entry(lsn.0)
            .map(|e| self.shared.wal_file_off(e.pos))
            .ok_or(BlockVolError::Recycled {
                requested: lsn,
                retained_start: Lsn(st.tail + 1),
            })
    }

    /// Opens a volume on a simulated disk (feature `testing`), running recovery.
    pub fn open_sim(disk: &crate::sim::SimDisk, open: &OpenOptions) -> Result<Volume> {
        if !disk.claim() {
            return Err(BlockVolError::Locked {
                path: "simulated disk".into(),
            });
        }
        let m = crate::sim::SimMedium::new(disk.clone());
        let slots = read_slots(&|o, b| m.read_at(o, b), m.len(), "simulated disk")?;
        Volume::open_medium(Arc::new(m), &slots, open, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding 5: a ring of 8 GiB or more took a single write of more than 4 GiB, and
    /// its header's u32 payload length silently wrapped.
    #[test]
    fn entries_never_outgrow_the_header_length_field() {
        let bs = 4096usize;
        // Small rings: half the ring, as before.
        assert_eq!(max_entry_for(1 << 20), 1 << 19);
        assert!(check_entry_len(bs, 1 << 20).is_ok());
        // A 10 GiB ring: half of it would be 5 GiB, more than a u32 can state.
        let wal = 10u64 << 30;
        assert_eq!(max_entry_for(wal), MAX_ENTRY_SIZE);
        let largest = ((u32::MAX as usize) / bs) * bs;
        let size = check_entry_len(largest, wal).expect("the largest whole-block payload fits");
        assert!(size <= MAX_ENTRY_SIZE);
        let over = (4usize << 30) + bs;
        match check_entry_len(over, wal) {
            Err(BlockVolError::EntryTooLarge { bytes, max }) => {
                assert_eq!(bytes, entry_size(over as u64));
                assert_eq!(max, MAX_ENTRY_SIZE);
            }
            other => panic!("a payload of {over} bytes was not refused: {other:?}"),
        }
        // Every accepted payload length fits the header's u32, for any ring.
        for wal in [MIN_WAL_SIZE, 8 << 30, (8 << 30) + 8192, 1 << 40] {
            let max = max_entry_for(wal);
            assert!(
                max - ENTRY_HEADER_SIZE as u64 <= u64::from(u32::MAX),
                "wal {wal}"
            );
            assert!(check_entry_len((max - ENTRY_HEADER_SIZE as u64) as usize, wal).is_ok());
            assert!(check_entry_len((max - ENTRY_HEADER_SIZE as u64) as usize + 1, wal).is_err());
        }
    }

    #[test]
    fn the_directory_of_a_bare_file_name_is_the_current_one() {
        assert_eq!(parent_dir(Path::new("vol.img")), Path::new("."));
        assert_eq!(parent_dir(Path::new("./vol.img")), Path::new("."));
        assert_eq!(parent_dir(Path::new("sub/vol.img")), Path::new("sub"));
        assert_eq!(parent_dir(Path::new("/vol.img")), Path::new("/"));
    }

    #[test]
    fn max_write_bytes_is_the_largest_accepted_write() {
        let o = CreateOptions::new(1 << 20, 64 * 1024);
        let (v, _d) = Volume::create_sim(&o, &OpenOptions::manual()).expect("create");
        let max = v.max_write_bytes();
        assert_eq!(max, 7 * 4096);
        assert!(v.write(0, &vec![1u8; max as usize]).is_ok());
        assert!(matches!(
            v.write(0, &vec![1u8; max as usize + 4096]),
            Err(BlockVolError::EntryTooLarge { .. })
        ));
    }
}
