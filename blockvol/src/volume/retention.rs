//! Retention and the tail: how far the tail may move (`min(checkpoint, live pins,
//! retention)`), persisting checkpoint and tail together, and what the retained range holds.

use super::{Shared, State, Volume};
use crate::error::{BlockVolError, Result};
use crate::types::{EntryInfo, Epoch, Lsn, RetentionPolicy};

impl Shared {
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
    pub(super) fn announced_mark(&self, st: &State, cp: u64) -> u64 {
        if st.installing || st.install_incomplete {
            return st.flush_mark;
        }
        st.flush_mark.max(cp).max(self.gate_limit(st).min(st.head))
    }

    /// `persist_progress`; with `announce` (the background flusher's final superblock) the
    /// slot also announces the current gate limit as its flush mark, so the next cycle up to it
    /// needs no intent write of its own.
    pub(super) fn persist_progress_with(&self, new_cp: Option<u64>, announce: bool) -> Result<()> {
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
            sb.tail_epoch = tail_info.epoch.0;
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
}

impl Volume {
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

    /// The epochs of the log from the checkpoint (the lowest point a truncation can reach)
    /// to the head: `(checkpoint, [(epoch, first LSN)])`, oldest first, the first pair for the
    /// entry at the checkpoint itself (the origin's epoch 0 at LSN 0). Entries carry their
    /// epoch, so this is read from the index, not stored. A log whose epochs fall somewhere
    /// (which no primary writes) gets an empty list: no epochs, never a wrong one.
    pub fn epoch_starts(&self) -> Result<(Lsn, Vec<(Epoch, Lsn)>)> {
        let st = self.shared.lock_state();
        self.shared.check_installed(&st, "epoch_starts")?;
        let floor = st.checkpoint;
        let mut starts: Vec<(Epoch, Lsn)> = Vec::new();
        for lsn in floor..=st.head {
            let info = if lsn == 0 {
                EntryInfo::ORIGIN
            } else {
                match st.info_of(lsn) {
                    Some(i) => i,
                    None => return Ok((Lsn(floor), Vec::new())),
                }
            };
            match starts.last() {
                Some((e, _)) if *e == info.epoch => {}
                Some((e, _)) if *e > info.epoch => return Ok((Lsn(floor), Vec::new())),
                _ => starts.push((info.epoch, Lsn(lsn))),
            }
        }
        Ok((Lsn(floor), starts))
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
}
