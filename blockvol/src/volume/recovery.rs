//! Recovery: what every open runs before the volume accepts I/O.
//!
//! `Volume::open_medium` is a sequence of named steps, each establishing one thing:
//!
//! 1. `state_from_superblock`: the newest valid superblock's view, before the log is read;
//! 2. `scan_ring`: the walk over the ring from the persisted tail;
//! 3. `judge_log_end`: whether the walk ended at a clean end, a torn tail or corruption;
//! 4. `adopt_log`: the recovered log as the in-memory index, dirty map and head;
//! 5. `persist_repair`: a repair made durable before its evidence is destroyed;
//! 6. `neutralize_leftovers`: no leftover header of a torn tail survives, and the ring is
//!    durable;
//! 7. `assemble`: the shared part of the volume around the recovered state;
//! 8. `Shared::finish_recovery`: an interrupted flush redone, the recovered state persisted;
//! 9. `Volume::with_flusher`: the handle, with its background flusher if asked for.
//!
//! A read-only open (inspection) runs steps 1 to 4 and 7: it decides exactly as a read-write
//! open does, but writes, zeroes and syncs nothing and redoes no flush.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::flush::flusher_main;
use super::state::DirtyMap;
use super::superblock::SbWriter;
use super::{Shared, State, Volume, lock, pick_superblock};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, SB_FLAG_INSTALL_INCOMPLETE, SB_FLAG_REPAIRED, SB_SLOT_A_OFFSET,
    SB_SLOT_B_OFFSET, SB_SLOT_SIZE, Superblock, WAL_OFFSET,
};
use crate::medium::Medium;
use crate::types::{EntryInfo, Epoch, FlusherMode, Geometry, Lsn, OpenOptions, Role};
use crate::walk::{IndexEntry, Leftover, WalkParams, WalkResult, wal_stamp, walk};

impl Volume {
    /// Recovery. With `read_only` it runs in memory only: it decides exactly as a read-write
    /// open does, but writes, zeroes and syncs nothing and redoes no flush.
    pub(crate) fn open_medium(
        medium: Arc<dyn Medium>,
        slots: &[Vec<u8>; 2],
        opts: &OpenOptions,
        read_only: bool,
    ) -> Result<Volume> {
        let (slot, sb) = pick_superblock(slots, medium.len(), &medium.describe())?;
        if !read_only {
            super::check_writable_version(&sb, &medium.describe())?;
        }
        let mut st = state_from_superblock(&sb, opts, read_only);
        // The slot the next superblock write must avoid, and its sequence number.
        let mut writer = SbWriter { seq: sb.seq, slot };
        if !st.install_incomplete {
            let mut res = scan_ring(&*medium, &sb, st.stamp)?;
            let repairing = judge_log_end(&*medium, &sb, &res, opts, read_only)?;
            adopt_log(&mut st, &sb, &mut res);
            if repairing {
                persist_repair(&*medium, &sb, &st, &mut writer)?;
                st.repaired = true;
            }
            if !read_only {
                neutralize_leftovers(&*medium, &res.leftovers, sb.wal_size)?;
            }
        }
        let shared = Arc::new(assemble(medium, &sb, opts, st, writer));
        if read_only {
            // No redo of an interrupted flush: whatever it left in the extent beyond the
            // checkpoint is shadowed by the dirty map, which holds every block written after
            // the checkpoint, so reads are exact without it. Nothing is persisted.
            return Ok(Volume {
                shared,
                flusher: Mutex::new(None),
            });
        }
        shared.finish_recovery()?;
        Volume::with_flusher(shared, opts.flusher)
    }

    /// The handle on a recovered volume, with its background flusher started when `mode`
    /// asks for one.
    fn with_flusher(shared: Arc<Shared>, mode: FlusherMode) -> Result<Volume> {
        let vol = Volume {
            shared,
            flusher: Mutex::new(None),
        };
        if let FlusherMode::Background { interval } = mode {
            let s = vol.shared.clone();
            let h = std::thread::Builder::new()
                .name("blockvol-flusher".into())
                .spawn(move || flusher_main(s, interval))
                .map_err(|e| BlockVolError::io("spawn flusher", "thread", e))?;
            *lock(&vol.flusher) = Some(h);
        }
        Ok(vol)
    }
}

impl Shared {
    /// The last step of a read-write recovery: redoes the flush of `(checkpoint, flush mark]`
    /// that a crash may have interrupted (so the extent is exactly the checkpoint's image
    /// again, and the mark drops to the checkpoint), then persists the recovered state, so
    /// reopening twice gives the same state.
    fn finish_recovery(&self) -> Result<()> {
        let install_incomplete = self.lock_state().install_incomplete;
        if !install_incomplete {
            let to = self.lock_state().flush_mark;
            self.redo_flush(to)?;
            let mut st = self.lock_state();
            st.flush_mark = st.checkpoint;
        }
        let mut w = self.sb_writer();
        self.persist_with(&mut w, |st| self.sb_from_state(st))
    }
}

/// The state the superblock `sb` describes, before the log is read: head and durable at the
/// checkpoint, an empty index and dirty map, a restarted primary fenced as `Stale`, and no
/// pins (pins and fences do not survive a restart; retention comes from `opts`).
fn state_from_superblock(sb: &Superblock, opts: &OpenOptions, read_only: bool) -> State {
    let install_incomplete = sb.flags & SB_FLAG_INSTALL_INCOMPLETE != 0;
    let tail_info = EntryInfo {
        lsn: Lsn(sb.tail_lsn),
        epoch: Epoch(sb.tail_epoch),
        content_crc: sb.tail_crc,
    };
    State {
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
        // What is in the extent was committed when it was flushed (the flusher moves only
        // committed entries when gated, and nothing there can be truncated): the committed
        // point restarts there, not at zero, so a restarted primary's history never names a
        // committed point below its own checkpoint.
        committed: sb.checkpoint,
        epoch: Epoch(sb.epoch),
        // A primary that restarts comes back fenced: another primary may have been
        // promoted meanwhile, so writes wait for a fresh assignment.
        role: if sb.role == Role::Primary {
            Role::Stale
        } else {
            sb.role
        },
        generation: sb.generation,
        stamp: wal_stamp(&sb.volume_id, sb.generation),
        pins: HashMap::new(),
        fences: HashMap::new(),
        next_pin_id: 0,
        revoke_reason: String::new(),
        retention: opts.retention,
        installing: false,
        install_incomplete,
        install_lsn: sb.install_lsn,
        install_entry: EntryInfo {
            lsn: Lsn(sb.install_lsn),
            epoch: Epoch(sb.install_epoch),
            content_crc: sb.install_crc,
        },
        install_resume: sb.install_resume,
        repaired: sb.flags & SB_FLAG_REPAIRED != 0,
        poisoned: None,
        closed: false,
        read_only,
        stop_flusher: false,
        flush_wanted: false,
        syncing: false,
        commit: Default::default(),
        writeback_pos: 0,
        space_waiters: 0,
        lineage: 0,
        tail_moving_to: None,
    }
}

/// Walks the ring from the persisted tail position, expecting `tail + 1`, and returns what it
/// found: the valid entries, where and why it stopped, and the leftovers beyond.
fn scan_ring(medium: &dyn Medium, sb: &Superblock, stamp: u64) -> Result<WalkResult> {
    let params = WalkParams {
        wal_size: sb.wal_size,
        stamp,
        tail_lsn: sb.tail_lsn,
        tail_pos: sb.tail_pos,
        block_size: sb.block_size,
        volume_blocks: sb.volume_blocks,
    };
    let reader = |phys: u64, buf: &mut [u8]| medium.read_at(WAL_OFFSET + phys, buf);
    walk(&params, &reader).map_err(|e| BlockVolError::io("read wal", medium.describe(), e))
}

/// Tells a torn tail from corruption. Everything up to the checkpoint, and up to the durable
/// mark, was synced, so a log that ends earlier has lost acknowledged entries, and so has one
/// whose end a later synced header vouches for. Such a log is refused with `Corrupt`, unless
/// `opts.repair` is set (and the open is not read-only): then `Ok(true)`, the log is to be
/// truncated at its end. `Ok(false)`: a clean end or a torn tail.
fn judge_log_end(
    medium: &dyn Medium,
    sb: &Superblock,
    res: &WalkResult,
    opts: &OpenOptions,
    read_only: bool,
) -> Result<bool> {
    let must_reach = sb.checkpoint.max(sb.durable_mark);
    let below_mark = res.head < must_reach;
    if res.evidence.is_none() && !below_mark {
        return Ok(false);
    }
    let detail = match &res.evidence {
        Some(ev) => format!(
            "{}; entry {} (durable hint {}) found later proves lsn {} had been synced",
            res.end_detail,
            ev.lsn,
            ev.durable_hint,
            res.head + 1
        ),
        None => format!(
            "{}; the log ends at lsn {} below the synced lsn {must_reach} (checkpoint {})",
            res.end_detail, res.head, sb.checkpoint
        ),
    };
    if !opts.repair || read_only {
        return Err(BlockVolError::Corrupt {
            region: "wal",
            offset: WAL_OFFSET + res.end_pos % sb.wal_size,
            lsn: Some(Lsn(res.head + 1)),
            detail,
        });
    }
    log::warn!(
        "repairing {}: truncating the log: {detail}",
        medium.describe()
    );
    Ok(true)
}

/// Makes the recovered log the in-memory state: the index, the dirty map (every block written
/// after the checkpoint) and the head; or, when the log ended below the checkpoint (a repair),
/// an empty log at the checkpoint, whose image the extent holds. The recovered entries count
/// as durable (the caller makes them so before accepting I/O), and the flush mark is capped at
/// the head: the flush up to it is redone later (without repair the durable mark, which is at
/// least the flush mark, guarantees the head reaches it).
fn adopt_log(st: &mut State, sb: &Superblock, res: &mut WalkResult) {
    if res.head < sb.checkpoint {
        // The extent holds everything up to the checkpoint; the log past it is gone.
        st.head = sb.checkpoint;
        st.tail = sb.checkpoint;
        st.tail_pos = res.end_pos;
        st.head_pos = res.end_pos;
        st.tail_info = EntryInfo {
            lsn: Lsn(sb.checkpoint),
            epoch: Epoch(0),
            content_crc: 0,
        };
    } else {
        st.head = res.head;
        st.head_pos = res.head_pos;
        st.index = std::mem::take(&mut res.entries);
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
    // (Read-only: the recovered view, as a read-write open would persist it.)
    st.durable = st.head;
    st.synced_pos = st.head_pos;
    st.flush_mark = st.flush_mark.min(st.head);
}

/// Persists a repair before its evidence is destroyed: once a leftover is zeroed, a crash
/// must not let the shortened log open as a clean one. The slot not holding the newest
/// superblock gets `sb` marked repaired (the checkpoint untrusted), naming the recovered tail
/// (new when the log ended below the checkpoint) and head, with the durable and flush marks
/// lowered to what the log still holds (only ever lowered, so nothing unsynced is claimed).
fn persist_repair(
    medium: &dyn Medium,
    sb: &Superblock,
    st: &State,
    w: &mut SbWriter,
) -> Result<()> {
    let mut r = sb.clone();
    r.flags |= SB_FLAG_REPAIRED;
    r.seq = w.seq + 1;
    r.tail_lsn = st.tail;
    r.tail_pos = st.tail_pos;
    r.tail_epoch = st.tail_info.epoch.0;
    r.tail_crc = st.tail_info.content_crc;
    r.head_hint = st.head;
    r.durable_mark = sb.durable_mark.min(st.head);
    r.flush_mark = sb.flush_mark.min(st.head);
    let off = if w.slot == 0 {
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
    (w.seq, w.slot) = (r.seq, 1 - w.slot);
    Ok(())
}

/// Zeroes the header of every leftover of a torn tail (and, under repair, everything after
/// the corruption) so no later recovery can mistake one for evidence or splice it in, then
/// msyncs the whole ring: the recovered entries may still be only in the page cache (a
/// process crash), and must be durable, with the zeroed leftovers, before anything is
/// acknowledged.
fn neutralize_leftovers(medium: &dyn Medium, leftovers: &[Leftover], wal_size: u64) -> Result<()> {
    let zeros = [0u8; ENTRY_HEADER_SIZE];
    for l in leftovers {
        medium
            .write_at(WAL_OFFSET + l.pos % wal_size, &zeros)
            .map_err(|e| BlockVolError::io("write wal", medium.describe(), e))?;
    }
    medium
        .sync_range(WAL_OFFSET, wal_size)
        .map_err(|e| BlockVolError::io("msync wal", medium.describe(), e))
}

/// The shared part of the volume around the recovered state `st`: geometry and identity from
/// `sb`, gate and WAL-full timeout from `opts`, and the superblock writer `w` that knows which
/// slot holds the newest superblock.
fn assemble(
    medium: Arc<dyn Medium>,
    sb: &Superblock,
    opts: &OpenOptions,
    st: State,
    w: SbWriter,
) -> Shared {
    Shared {
        medium,
        geo: Geometry {
            block_size: sb.block_size,
            volume_blocks: sb.volume_blocks,
            wal_size_bytes: sb.wal_size,
        },
        extent_offset: sb.extent_offset,
        csum_offset: sb.csum_offset(),
        csum_len: sb.csum_len(),
        checksums: sb.has_checksums(),
        checksum_errors: std::sync::atomic::AtomicU64::new(0),
        blocks_repaired: std::sync::atomic::AtomicU64::new(0),
        volume_id: sb.volume_id,
        gate: opts.flush_gate,
        wal_full_timeout: opts.wal_full_timeout,
        state: Mutex::new(st),
        cond: Condvar::new(),
        flusher_cond: Condvar::new(),
        commit_cond: Condvar::new(),
        flush_lock: Mutex::new(()),
        extent_rw: RwLock::new(()),
        sb: Mutex::new(w),
        install_stride: std::sync::atomic::AtomicU64::new(0),
    }
}
