//! The replica side: applying replicated entries (as `WalEntry`s or in wire form) at exactly
//! `head + 1`, and truncating the log after an LSN, durably.

use super::append::RunProgress;
use super::{AppendMode, IO_CHUNK, Shared, Volume};
use crate::entry::{EntryKind, WalEntry};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, KIND_BARRIER, KIND_TRIM, KIND_WRITE,
    WAL_OFFSET,
};
use crate::types::{ApplyOutcome, EntryInfo, Epoch, Lba, Lsn};
use crate::walk::IndexEntry;

impl Volume {
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
                (KIND_WRITE, lba.0, b, data.as_slice())
            }
            EntryKind::Trim { lba, blocks } => {
                self.check_range(*lba, *blocks)?;
                let b = u32::try_from(*blocks).map_err(|_| {
                    BlockVolError::InvalidArgument(format!("trim of {blocks} blocks is too large"))
                })?;
                (KIND_TRIM, lba.0, b, &[][..])
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
        let e = self.shared.decode_apply(buf)?;
        let (_, outcome) = self.shared.append(
            e.kind,
            e.lba,
            e.blocks,
            e.payload,
            e.info.content_crc,
            AppendMode::Apply {
                lsn: e.info.lsn.0,
                epoch: e.info.epoch,
                info: e.info,
            },
        )?;
        Ok((outcome, e.used))
    }

    /// `apply_encoded` for the `count` entries in wire form that `buf` holds back to back (a
    /// catch-up chunk), with the same outcome as one `apply_encoded` each, in order, and the
    /// same refusals: an error is returned with the entries before it applied. The difference
    /// is the cost: entries are placed under one hold of the state lock and their bytes reach
    /// the ring in positioned vectored writes (`pwritev`, up to 1,024 slices a call) rather
    /// than copies into the map, which on a file system fault every page in for writing one
    /// at a time (D54). An entry that finds the ring full waits for room as `apply_encoded`
    /// does. `count` entries must use `buf` exactly (`TrailingBytes` otherwise, after
    /// applying them).
    pub fn apply_encoded_run(&self, buf: &[u8], count: u64) -> Result<ApplyRun> {
        let mut p = RunProgress::default();
        while p.entries < count {
            let before = p.entries;
            self.shared.apply_run(buf, count, &mut p)?;
            if p.entries == before {
                // The next entry waits for room in the ring, the one-entry way.
                let (outcome, used) = self.apply_encoded(&buf[p.used..])?;
                match outcome {
                    ApplyOutcome::Applied => p.applied += 1,
                    ApplyOutcome::Duplicate => p.duplicates += 1,
                }
                p.entries += 1;
                p.used += used;
            }
        }
        if p.used != buf.len() {
            return Err(BlockVolError::decode(
                "wal entries",
                format!("{} bytes left after {count} entries", buf.len() - p.used),
            ));
        }
        Ok(ApplyRun {
            applied: p.applied,
            duplicates: p.duplicates,
        })
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
}

/// What `Volume::apply_encoded_run` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyRun {
    /// Entries appended.
    pub applied: u64,
    /// Entries the volume already held, identical.
    pub duplicates: u64,
}

/// A replicated entry in wire form, checked against the volume's geometry.
pub(super) struct Decoded<'a> {
    pub(super) kind: u8,
    pub(super) lba: u64,
    pub(super) blocks: u32,
    pub(super) payload: &'a [u8],
    pub(super) info: EntryInfo,
    /// Bytes of the buffer the entry used.
    pub(super) used: usize,
}

impl Shared {
    /// Checks the wire-form entry at the front of `buf` (as `WalEntry::decode_prefix` does)
    /// and its range against the volume.
    pub(super) fn decode_apply<'a>(&self, buf: &'a [u8]) -> Result<Decoded<'a>> {
        let (h, used) = crate::entry::decode_wire(buf)?;
        let payload = &buf[ENTRY_HEADER_SIZE..used];
        let (lba, blocks) = match h.kind {
            KIND_WRITE => {
                let b = self.blocks_of(payload.len())?;
                self.check_range(Lba(h.lba), b)?;
                let b = u32::try_from(b).map_err(|_| {
                    BlockVolError::InvalidArgument(format!("entry of {b} blocks is too large"))
                })?;
                (h.lba, b)
            }
            KIND_TRIM => {
                self.check_range(Lba(h.lba), u64::from(h.blocks))?;
                (h.lba, h.blocks)
            }
            _ => (0, 0),
        };
        Ok(Decoded {
            kind: h.kind,
            lba,
            blocks,
            payload,
            info: EntryInfo {
                lsn: Lsn(h.lsn),
                epoch: Epoch(h.epoch),
                content_crc: h.content_crc,
            },
            used,
        })
    }
}
