//! Durability of the ring: group commit (`sync`) and early writeback hints.

use super::{Shared, Volume};
use crate::error::{BlockVolError, Result};
use crate::format::WAL_OFFSET;
use crate::types::Lsn;

impl Shared {
    /// msyncs the logical range `[from, to)` of the ring.
    pub(super) fn sync_wal(&self, from: u64, to: u64) -> std::io::Result<()> {
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
    pub(super) fn start_writeback(&self, from: u64, to: u64) {
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
}

impl Volume {
    /// Makes every appended entry durable (group commit); returns the durable LSN.
    pub fn sync(&self) -> Result<Lsn> {
        self.shared.sync().map(Lsn)
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
}
