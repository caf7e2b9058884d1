//! Recovery: what every open runs before the volume accepts I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::flush::flusher_main;
use super::state::DirtyMap;
use super::superblock::SbWriter;
use super::{Shared, State, Volume, lock, pick_superblock};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, SB_FLAG_INSTALL_INCOMPLETE, SB_FLAG_REPAIRED, SB_SLOT_A_OFFSET,
    SB_SLOT_B_OFFSET, SB_SLOT_SIZE, WAL_OFFSET,
};
use crate::medium::Medium;
use crate::types::{EntryInfo, FlusherMode, Geometry, Lsn, OpenOptions, Role};
use crate::walk::{IndexEntry, WalkParams, wal_stamp, walk};

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
}
