//! The flusher: moving entries from the ring into the extent up to the gate, the flush intent
//! (flush mark) that makes an interrupted flush redoable, recovery's redo, and the background
//! flusher thread.

use std::sync::Arc;
use std::time::Duration;

use super::csum::CsumBatch;
use super::{Shared, State, Volume};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, KIND_TRIM, KIND_WRITE, content_crc,
};
use crate::types::{FlushGate, Lsn};
use crate::walk::IndexEntry;

/// One entry to move into the extent: the runs of its blocks that no newer entry in the same
/// flush rewrites.
struct FlushItem {
    entry: IndexEntry,
    /// `(first block within the entry, block count)`.
    runs: Vec<(u64, u64)>,
}

impl Shared {
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

    /// Writes the items' blocks into the extent and their checksums into the checksum region
    /// (not yet durable: the caller's `sync_data` covers both).
    fn apply_ops(&self, items: &[FlushItem], stamp: u64) -> Result<()> {
        let bs = self.block_size();
        let mut buf = Vec::new();
        let mut csums = CsumBatch::default();
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
                    csums.set_blocks(self, e.lba + first, &buf[a..b])?;
                } else {
                    self.medium.zero_range(off, n * bs).map_err(|err| {
                        BlockVolError::io("zero extent", format!("file offset {off}"), err)
                    })?;
                    csums.zero_blocks(self, e.lba + first, n)?;
                }
            }
        }
        // The blocks being flushed are in the dirty map until the new checkpoint is durable,
        // so no reader verifies them against the checksums before this write lands.
        let _w = self.extent_write();
        csums.commit(self)
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
                    self.sync_data().map_err(|e| {
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
    pub(super) fn redo_flush(&self, to: u64) -> Result<()> {
        let (ops, old, stamp) = {
            let st = self.lock_state();
            if to <= st.checkpoint {
                return Ok(());
            }
            (self.collect_ops(&st, to), st.checkpoint, st.stamp)
        };
        if !ops.is_empty() {
            self.apply_ops(&ops, stamp)?;
            self.sync_data()
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
}

impl Volume {
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
}

/// One background cycle: make appended entries durable, then flush what the gate allows.
pub(super) fn background_cycle(s: &Shared) -> Result<()> {
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

pub(super) fn flusher_main(s: Arc<Shared>, interval: Duration) {
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
