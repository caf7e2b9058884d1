//! Durability of the ring: group commit (`sync`) and early writeback hints.

use std::time::{Duration, Instant};

use super::{Shared, Volume};
use crate::error::{BlockVolError, Result};
use crate::format::WAL_OFFSET;
use crate::types::Lsn;

/// Longest a group-commit leader waits for the rest of its group (see `Shared::sync`).
const MAX_GATHER: Duration = Duration::from_micros(500);

/// The page size writeback hints round to (the ring is page-aligned in the file).
const WRITEBACK_PAGE: u64 = 4096;

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
    ///
    /// Callers that find a sync in flight wait for it, and the first of them to find none
    /// leads the next one. A leader that sees fewer callers gathered than the last sync
    /// served waits for the rest of them, at most half the last sync's duration and never
    /// more than `MAX_GATHER`: without that, the writers a sync releases race back, the
    /// first one leads a sync of one or two entries, and every other sync is half empty.
    /// The wait gives way as soon as the group is complete, and a group that does not
    /// complete lowers the expectation for the next one, so a lone writer never waits.
    pub(crate) fn sync(&self) -> Result<u64> {
        let mut st = self.lock_state();
        self.check_usable(&st)?;
        let target = st.head;
        if st.durable >= target {
            return Ok(st.durable);
        }
        if !(st.syncing && st.commit.syncing_to >= target) {
            st.commit.arrivals += 1;
            if st.commit.forming && st.commit.arrivals >= st.commit.expect {
                self.commit_cond.notify_one();
            }
        }
        let mut gathering: Option<Instant> = None;
        loop {
            if let Err(e) = self.check_usable(&st) {
                if gathering.is_some() {
                    st.commit.forming = false;
                }
                return Err(e);
            }
            if st.durable >= target.min(st.head) {
                return Ok(st.durable);
            }
            if st.syncing || (st.commit.forming && gathering.is_none()) {
                st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if st.commit.arrivals < st.commit.expect {
                let budget = (st.commit.last_sync / 2).min(MAX_GATHER);
                let since = *gathering.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited < budget {
                    st.commit.forming = true;
                    st = self
                        .commit_cond
                        .wait_timeout(st, budget - waited)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    continue;
                }
                // The group did not complete: expect only the ones that came next time.
                st.commit.expect = st.commit.arrivals;
            }
            st.commit.forming = false;
            st.syncing = true;
            let group = std::mem::take(&mut st.commit.arrivals);
            st.commit.syncing_to = st.head;
            let (to_lsn, from, to, lineage) = (st.head, st.synced_pos, st.head_pos, st.lineage);
            drop(st);
            let started = Instant::now();
            let r = self.sync_wal(from, to);
            let took = started.elapsed();
            st = self.lock_state();
            st.syncing = false;
            st.commit.last_sync = took;
            st.commit.expect = group;
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
            // Only the leader's own entry may be beyond what it synced (a truncation in
            // between): it loops, and leads or joins again.
            gathering = None;
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
    /// most of the bytes already written instead of writing them all at once. Each call
    /// hands over only the whole pages the previous one did not. A hint: a failure to start writeback
    /// changes nothing and is not reported.
    pub fn start_writeback(&self) {
        let s = &self.shared;
        let (from, to) = {
            let mut st = s.lock_state();
            if st.closed || st.poisoned.is_some() {
                return;
            }
            let from = if (st.synced_pos..=st.head_pos).contains(&st.writeback_pos) {
                st.writeback_pos
            } else {
                st.synced_pos
            };
            // Whole pages only: a page under writeback that the next append stores into
            // makes that store wait for the write to finish (stable pages), so the page the
            // head is in waits for the next hint or the sync.
            let to = st.head_pos - st.head_pos % WRITEBACK_PAGE;
            if to <= from {
                return;
            }
            st.writeback_pos = to;
            (from, to)
        };
        s.start_writeback(from, to);
    }
}
