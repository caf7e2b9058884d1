//! Appending entries to the ring: placement, waiting (bounded) for space, assigning the LSN in
//! the same critical section as the copy; and the client writes built on it.

use std::time::{Duration, Instant};

use super::{Shared, State, Volume};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, KIND_BARRIER, KIND_PADDING, KIND_TRIM,
    KIND_WRITE, MAX_ENTRY_SIZE, content_crc, entry_size,
};
use crate::types::{ApplyOutcome, EntryInfo, Epoch, Lba, Lsn};
use crate::walk::IndexEntry;

/// Longest a writer sleeps between re-checks while it waits for WAL space.
const SPACE_POLL: Duration = Duration::from_millis(20);

/// Which append is being made.
pub(crate) enum AppendMode {
    /// A client write; `epoch` is the caller's epoch when it asked for a fenced write.
    Client { epoch: Option<Epoch> },
    /// A replicated entry with its primary's LSN and epoch.
    Apply {
        lsn: u64,
        epoch: Epoch,
        info: EntryInfo,
    },
}

/// The largest entry a ring of `wal_size` bytes takes: half the ring (so an entry always fits
/// once the ring drains), and never more than a header's u32 payload length can state.
pub(super) fn max_entry_for(wal_size: u64) -> u64 {
    (wal_size / 2).min(MAX_ENTRY_SIZE)
}

/// `EntryTooLarge` unless an entry with `payload_len` payload bytes fits a ring of `wal_size`
/// bytes; otherwise its size in the ring (its payload length then fits a u32).
pub(super) fn check_entry_len(payload_len: usize, wal_size: u64) -> Result<u64> {
    let max = max_entry_for(wal_size);
    let size = entry_size(payload_len as u64);
    if size > max {
        return Err(BlockVolError::EntryTooLarge { bytes: size, max });
    }
    Ok(size)
}

/// What one attempt to append found.
enum Placed {
    /// Appended (or an identical duplicate) at this LSN.
    Done(u64, ApplyOutcome),
    /// The ring lacks room: `need` bytes, `free` free.
    NoSpace { need: u64, free: u64 },
}

/// Bytes of an entry for the ring: its header (copied, built on the stack) or its payload
/// (borrowed from the caller).
enum Chunk<'h, 'a> {
    Header(&'h [u8; ENTRY_HEADER_SIZE]),
    Payload(&'a [u8]),
}

/// A run's progress through `Shared::apply_run`.
#[derive(Default)]
pub(crate) struct RunProgress {
    /// Entries done (applied or duplicates).
    pub(crate) entries: u64,
    pub(crate) applied: u64,
    pub(crate) duplicates: u64,
    /// Bytes of the buffer they used.
    pub(crate) used: usize,
}

/// Entry bytes placed in the ring but not yet written: `(logical position, slice)` in
/// position order, headers kept here, payloads borrowed.
#[derive(Default)]
pub(crate) struct Staged<'a> {
    headers: Vec<[u8; ENTRY_HEADER_SIZE]>,
    /// `(logical position, where the bytes are)`.
    parts: Vec<(u64, Part<'a>)>,
}

enum Part<'a> {
    /// Index into `Staged::headers`.
    Header(usize),
    Payload(&'a [u8]),
}

impl<'a> Staged<'a> {
    fn header(&mut self, pos: u64, h: &[u8; ENTRY_HEADER_SIZE]) {
        self.parts.push((pos, Part::Header(self.headers.len())));
        self.headers.push(*h);
    }

    fn payload(&mut self, pos: u64, p: &'a [u8]) {
        self.parts.push((pos, Part::Payload(p)));
    }

    /// Writes the staged bytes into `s`'s ring: one vectored write per stretch that is
    /// contiguous in the file (a padding's unwritten body or the ring's end breaks one).
    fn write(&self, s: &Shared) -> std::io::Result<()> {
        let mut bufs: Vec<&[u8]> = Vec::new();
        let (mut start, mut end) = (0u64, 0u64);
        for (pos, part) in &self.parts {
            let b: &[u8] = match part {
                Part::Header(i) => &self.headers[*i],
                Part::Payload(p) => p,
            };
            let off = s.wal_file_off(*pos);
            if bufs.is_empty() || off != end {
                if !bufs.is_empty() {
                    s.medium.write_vectored_at(start, &bufs)?;
                    bufs.clear();
                }
                start = off;
                end = off;
            }
            bufs.push(b);
            end += b.len() as u64;
        }
        if !bufs.is_empty() {
            s.medium.write_vectored_at(start, &bufs)?;
        }
        Ok(())
    }
}

impl Shared {
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
            let (need, free) = match self
                .try_append(&mut st, kind, lba, blocks, payload, crc, size, &mode, None)?
            {
                Placed::Done(lsn, outcome) => return Ok((lsn, outcome)),
                Placed::NoSpace { need, free } => (need, free),
            };
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

    /// One attempt to append an entry of `size` ring bytes with the state lock held: checks
    /// the role, epoch and (for `Apply`) the LSN, then places and copies it if the ring has
    /// room. With `staged`, the entry's bytes are added to it instead of written: the caller
    /// writes them before it releases the lock (`Staged::write`).
    #[allow(clippy::too_many_arguments)]
    fn try_append<'a>(
        &self,
        st: &mut State,
        kind: u8,
        lba: u64,
        blocks: u32,
        payload: &'a [u8],
        crc: u32,
        size: u64,
        mode: &AppendMode,
        staged: Option<&mut Staged<'a>>,
    ) -> Result<Placed> {
        self.check_usable(st)?;
        self.check_installed(st, "append")?;
        let (lsn, epoch) = match mode {
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
                        Some(local) if local == *info => {
                            Ok(Placed::Done(*lsn, ApplyOutcome::Duplicate))
                        }
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
        if need > free {
            return Ok(Placed::NoSpace { need, free });
        }
        self.append_locked(
            st, kind, lba, blocks, payload, crc, lsn, epoch.0, skip, size, staged,
        )?;
        Ok(Placed::Done(lsn, ApplyOutcome::Applied))
    }

    /// Applies up to `count` replicated entries in wire form from the front of `buf` (see
    /// `Volume::apply_encoded_run`) under one hold of the state lock, their bytes written to
    /// the ring with vectored positioned writes before the lock is released, so no reader sees
    /// the new head before its bytes. Stops early, after writing what it placed, at an entry
    /// that does not fit the free ring (the caller then appends it the waiting way) or at an
    /// error (returned with the entries before it applied, as one `apply` each would leave
    /// them).
    pub(crate) fn apply_run(&self, buf: &[u8], count: u64, out: &mut RunProgress) -> Result<()> {
        let mut staged = Staged::default();
        let mut st = self.lock_state();
        let mut rest = &buf[out.used..];
        let mut r = Ok(());
        while out.entries < count {
            let e = match self.decode_apply(rest) {
                Ok(e) => e,
                Err(err) => {
                    r = Err(err);
                    break;
                }
            };
            let size = match self.check_entry_len(e.payload.len()) {
                Ok(size) => size,
                Err(err) => {
                    r = Err(err);
                    break;
                }
            };
            let mode = AppendMode::Apply {
                lsn: e.info.lsn.0,
                epoch: e.info.epoch,
                info: e.info,
            };
            match self.try_append(
                &mut st,
                e.kind,
                e.lba,
                e.blocks,
                e.payload,
                e.info.content_crc,
                size,
                &mode,
                Some(&mut staged),
            ) {
                Ok(Placed::Done(_, outcome)) => {
                    match outcome {
                        ApplyOutcome::Applied => out.applied += 1,
                        ApplyOutcome::Duplicate => out.duplicates += 1,
                    }
                    out.entries += 1;
                    out.used += e.used;
                    rest = &rest[e.used..];
                }
                Ok(Placed::NoSpace { .. }) => break,
                Err(err) => {
                    r = Err(err);
                    break;
                }
            }
        }
        if let Err(e) = staged.write(self) {
            // Entries are in the index whose bytes did not reach the ring: the volume cannot
            // go on (the next open rebuilds the index from what the ring holds).
            let err = BlockVolError::io("write wal", "a run of applied entries".to_owned(), e);
            self.poison(&mut st, err.to_string());
            return Err(err);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn append_locked<'a>(
        &self,
        st: &mut State,
        kind: u8,
        lba: u64,
        blocks: u32,
        payload: &'a [u8],
        crc: u32,
        lsn: u64,
        epoch: u64,
        skip: u64,
        size: u64,
        mut staged: Option<&mut Staged<'a>>,
    ) -> Result<()> {
        let header = ENTRY_HEADER_SIZE as u64;
        let start = st.head_pos;
        let mut pos = start;
        let hint = st.durable;
        let mut hdr = [0u8; ENTRY_HEADER_SIZE];
        let mut put = |pos: u64, c: Chunk<'_, 'a>| -> std::io::Result<()> {
            match (staged.as_deref_mut(), c) {
                (Some(s), Chunk::Header(h)) => s.header(pos, h),
                (Some(s), Chunk::Payload(p)) => s.payload(pos, p),
                (None, Chunk::Header(h)) => self.medium.write_at(self.wal_file_off(pos), h)?,
                (None, Chunk::Payload(p)) => self.medium.write_at(self.wal_file_off(pos), p)?,
            }
            Ok(())
        };
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
                put(pos, Chunk::Header(&hdr))?;
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
            put(pos, Chunk::Header(&hdr))?;
            if !payload.is_empty() {
                put(pos + header, Chunk::Payload(payload))?;
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
}

impl Volume {
    fn write_impl(&self, epoch: Option<Epoch>, lba: Lba, data: &[u8]) -> Result<Lsn> {
        let blocks = self.blocks_of(data.len())?;
        self.check_range(lba, blocks)?;
        let blocks32 = u32::try_from(blocks).map_err(|_| {
            BlockVolError::InvalidArgument(format!("write of {blocks} blocks is too large"))
        })?;
        // Refuse an oversized write before spending a checksum pass on it.
        self.shared.check_entry_len(data.len())?;
        // The checksum is computed before taking the lock, so the critical section is only the
        // copy into the map.
        let crc = content_crc(KIND_WRITE, lba.0, data.len() as u64, data);
        let (lsn, _) = self.shared.append(
            KIND_WRITE,
            lba.0,
            blocks32,
            data,
            crc,
            AppendMode::Client { epoch },
        )?;
        Ok(Lsn(lsn))
    }

    fn trim_impl(&self, epoch: Option<Epoch>, lba: Lba, blocks: u64) -> Result<Lsn> {
        self.check_range(lba, blocks)?;
        let blocks32 = u32::try_from(blocks).map_err(|_| {
            BlockVolError::InvalidArgument(format!("trim of {blocks} blocks is too large"))
        })?;
        let crc = content_crc(KIND_TRIM, lba.0, blocks, &[]);
        let (lsn, _) = self.shared.append(
            KIND_TRIM,
            lba.0,
            blocks32,
            &[],
            crc,
            AppendMode::Client { epoch },
        )?;
        Ok(Lsn(lsn))
    }

    /// Writes one or more whole blocks at `lba`; returns the entry's LSN. Not durable until a
    /// later `sync` returns.
    pub fn write(&self, lba: Lba, data: &[u8]) -> Result<Lsn> {
        self.write_impl(None, lba, data)
    }

    /// `write`, refused with `StaleEpoch` unless `epoch` is the volume's current epoch.
    pub fn write_in_epoch(&self, epoch: Epoch, lba: Lba, data: &[u8]) -> Result<Lsn> {
        self.write_impl(Some(epoch), lba, data)
    }

    /// Zeroes `blocks` blocks at `lba` (at least one).
    pub fn trim(&self, lba: Lba, blocks: u64) -> Result<Lsn> {
        self.trim_impl(None, lba, blocks)
    }

    /// `trim`, refused with `StaleEpoch` unless `epoch` is the volume's current epoch.
    pub fn trim_in_epoch(&self, epoch: Epoch, lba: Lba, blocks: u64) -> Result<Lsn> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::MIN_WAL_SIZE;

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
}
