//! Extent checksums (format version 2, docs/format.md section 5.1): one 32-bit checksum per
//! block in the checksum region after the extent.
//!
//! **Writers.** Everything that writes extent blocks (a flush cycle, recovery's redo, a base
//! install's chunks) updates their checksums through a `CsumBatch` *before* the extent
//! fdatasync that makes the blocks durable, and that sync covers the checksum region too
//! (`Shared::sync_data`): a block and its checksum become durable together. A crash before
//! the sync leaves both as they were or partly written, but only for blocks above the
//! checkpoint (which recovery rewrites, with their checksums, when it redoes the flush up to
//! the flush mark) or inside an incomplete install (unreadable until an install finishes,
//! whose resumed chunks rewrite them). Zeroing (a trim, the start of an install) stores 0,
//! the "all zeros" checksum, so the zero-filled region of a new file needs no initialisation.
//!
//! **Readers.** Every block read from the extent (`read`, base image readers, `scrub_range`)
//! is verified under the extent read lock, which the flusher's writes exclude; blocks the
//! flusher is moving are in the dirty map and never read from the extent meanwhile. A
//! mismatch is `ChecksumMismatch` and counts in `checksum_errors`; the bytes are never
//! returned.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::{IO_CHUNK, Shared, Volume};
use crate::error::{BlockVolError, Result};
use crate::format::{CSUM_REGION_ALIGN, CSUM_SIZE, block_csum, get_u32, put_u32, verify_block};
use crate::types::{Lba, RepairOutcome, ScrubReport};

/// Checksums per page of the checksum region.
const PER_PAGE: u64 = CSUM_REGION_ALIGN / CSUM_SIZE;
/// Most blocks one `scrub_range` step verifies under the locks.
const SCRUB_STEP_BLOCKS: u64 = 256;

/// Checksum updates gathered page by page and written with one positioned write per page.
/// Whole pages of zeros (a large trim) are zeroed at once instead of being buffered, so the
/// memory a batch holds is bounded by the pages its written blocks touch.
#[derive(Default)]
pub(crate) struct CsumBatch {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl CsumBatch {
    /// The buffered page `idx`, read from the region the first time it is touched.
    fn page<'a>(&'a mut self, s: &Shared, idx: u64) -> Result<&'a mut Vec<u8>> {
        match self.pages.entry(idx) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                let mut buf = vec![0u8; CSUM_REGION_ALIGN as usize];
                let off = s.csum_offset + idx * CSUM_REGION_ALIGN;
                s.medium.read_at(off, &mut buf).map_err(|err| {
                    BlockVolError::io("read checksums", format!("file offset {off}"), err)
                })?;
                Ok(e.insert(buf))
            }
        }
    }

    fn set(&mut self, s: &Shared, lba: u64, v: u32) -> Result<()> {
        let p = self.page(s, lba / PER_PAGE)?;
        put_u32(p, ((lba % PER_PAGE) * CSUM_SIZE) as usize, v);
        Ok(())
    }

    /// Records the checksums of the blocks `data` holds from `lba` on.
    pub(crate) fn set_blocks(&mut self, s: &Shared, lba: u64, data: &[u8]) -> Result<()> {
        if !s.checksums {
            return Ok(());
        }
        let bs = s.block_size() as usize;
        for (i, b) in data.chunks_exact(bs).enumerate() {
            let l = lba + i as u64;
            self.set(s, l, block_csum(l, b))?;
        }
        Ok(())
    }

    /// Records that `n` blocks from `lba` are zeros (checksum 0). Pages wholly inside the
    /// range are zeroed in the region right away (dropping anything buffered for them);
    /// partial pages are buffered.
    pub(crate) fn zero_blocks(&mut self, s: &Shared, lba: u64, n: u64) -> Result<()> {
        if !s.checksums || n == 0 {
            return Ok(());
        }
        let end = lba + n;
        let first_full = lba.div_ceil(PER_PAGE);
        let end_full = end / PER_PAGE;
        let mut l = lba;
        while l < end.min(first_full * PER_PAGE) {
            self.set(s, l, 0)?;
            l += 1;
        }
        if first_full < end_full {
            self.pages.retain(|p, _| *p < first_full || *p >= end_full);
            let off = s.csum_offset + first_full * CSUM_REGION_ALIGN;
            let len = (end_full - first_full) * CSUM_REGION_ALIGN;
            s.medium.zero_range(off, len).map_err(|e| {
                BlockVolError::io("zero checksums", format!("file offset {off}"), e)
            })?;
        }
        let mut l = (end_full * PER_PAGE).max(lba);
        while l < end {
            self.set(s, l, 0)?;
            l += 1;
        }
        Ok(())
    }

    /// Writes every buffered page (not yet durable: the caller's extent sync covers them).
    pub(crate) fn commit(self, s: &Shared) -> Result<()> {
        for (idx, page) in self.pages {
            let off = s.csum_offset + idx * CSUM_REGION_ALIGN;
            s.medium.write_at(off, &page).map_err(|e| {
                BlockVolError::io("write checksums", format!("file offset {off}"), e)
            })?;
        }
        Ok(())
    }
}

impl Shared {
    /// Makes the extent and the checksum region durable (one fdatasync of the file; the range
    /// names both regions, which the simulated disk syncs by range).
    pub(crate) fn sync_data(&self) -> std::io::Result<()> {
        let end = if self.checksums {
            self.csum_offset + self.csum_len
        } else {
            self.extent_offset + self.extent_len()
        };
        self.medium
            .sync_range(self.extent_offset, end - self.extent_offset)
    }

    /// Zeroes the extent and its checksums (a base install's start), not yet durable.
    pub(crate) fn zero_data(&self) -> std::io::Result<()> {
        let end = if self.checksums {
            self.csum_offset + self.csum_len
        } else {
            self.extent_offset + self.extent_len()
        };
        self.medium
            .zero_range(self.extent_offset, end - self.extent_offset)
    }

    /// Reads the stored checksums of `raw.len() / 4` blocks from `lba` into `raw`.
    fn read_csum_bytes(&self, lba: u64, raw: &mut [u8]) -> Result<()> {
        let off = self.csum_offset + lba * CSUM_SIZE;
        self.medium
            .read_at(off, raw)
            .map_err(|e| BlockVolError::io("read checksums", format!("file offset {off}"), e))
    }

    /// The stored checksums of `out.len()` blocks from `lba`.
    fn read_csums(&self, lba: u64, out: &mut [u32]) -> Result<()> {
        let mut raw = vec![0u8; out.len() * CSUM_SIZE as usize];
        self.read_csum_bytes(lba, &mut raw)?;
        for (i, c) in out.iter_mut().enumerate() {
            *c = get_u32(&raw, i * CSUM_SIZE as usize);
        }
        Ok(())
    }

    /// Verifies blocks `data` holds, read from the extent at `lba`: every damaged block as
    /// `(lba, stored, computed)`, each counted in `checksum_errors`. Nothing for a file
    /// without checksums. No allocation for reads of up to 64 blocks (the common read path).
    pub(crate) fn damaged_blocks(&self, lba: u64, data: &[u8]) -> Result<Vec<(u64, u32, u32)>> {
        if !self.checksums {
            return Ok(Vec::new());
        }
        let bs = self.block_size() as usize;
        let n = data.len() / bs;
        let mut small = [0u8; 64 * CSUM_SIZE as usize];
        let mut big = Vec::new();
        let raw: &mut [u8] = if n * CSUM_SIZE as usize <= small.len() {
            &mut small[..n * CSUM_SIZE as usize]
        } else {
            big.resize(n * CSUM_SIZE as usize, 0);
            &mut big
        };
        self.read_csum_bytes(lba, raw)?;
        let mut bad = Vec::new();
        for (i, b) in data.chunks_exact(bs).enumerate() {
            let l = lba + i as u64;
            let c = get_u32(raw, i * CSUM_SIZE as usize);
            if let Err(found) = verify_block(l, b, c) {
                bad.push((l, c, found));
            }
        }
        if !bad.is_empty() {
            self.checksum_errors
                .fetch_add(bad.len() as u64, Ordering::Relaxed);
            log::error!(
                "{}: {} extent block(s) failed their checksum, first lba {}",
                self.medium.describe(),
                bad.len(),
                bad[0].0
            );
        }
        Ok(bad)
    }

    /// `damaged_blocks` as an error: `ChecksumMismatch` for the first damaged block.
    pub(crate) fn verify_extent(&self, lba: u64, data: &[u8]) -> Result<()> {
        match self.damaged_blocks(lba, data)?.first() {
            None => Ok(()),
            Some(&(l, expected, found)) => Err(BlockVolError::ChecksumMismatch {
                lba: Lba(l),
                expected,
                found,
            }),
        }
    }

    /// Verifies `n` blocks from `lba` that read as zeros without being read (holes a base
    /// reader skips): each stored checksum must be 0 or the checksum of a zero block.
    pub(crate) fn verify_zero_run(&self, lba: u64, n: u64) -> Result<()> {
        if !self.checksums {
            return Ok(());
        }
        let zero = vec![0u8; self.block_size() as usize];
        let mut stored = vec![0u32; PER_PAGE as usize];
        let mut l = lba;
        while l < lba + n {
            let k = PER_PAGE.min(lba + n - l) as usize;
            self.read_csums(l, &mut stored[..k])?;
            for (i, c) in stored[..k].iter().enumerate() {
                let b = l + i as u64;
                // 0 says "a zero block", which a hole is: nothing to compute.
                if *c == 0 {
                    continue;
                }
                if let Err(found) = verify_block(b, &zero, *c) {
                    self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(BlockVolError::ChecksumMismatch {
                        lba: Lba(b),
                        expected: *c,
                        found,
                    });
                }
            }
            l += k as u64;
        }
        Ok(())
    }
}

impl Volume {
    /// Verifies the flushed blocks of `[from, from + count)` against their checksums and
    /// reports every damaged one (and counts it in `checksum_errors`); a damaged block is not
    /// an error here, an I/O failure is.
    ///
    /// For an online scrub: it works in steps of at most 256 blocks (and 1 MiB), each under the
    /// extent read lock and, briefly, the state lock (to skip blocks whose newest data is in
    /// the WAL, which carries its own checksums); between steps nothing is held, so writes
    /// and flushes proceed. A caller limits its rate by calling it for small ranges and
    /// pausing between calls. Refused with `NeedsUpgrade` on a version 1 file (no checksums),
    /// `InstallIncomplete` during a base install, `OutOfRange` beyond the volume.
    pub fn scrub_range(&self, from: Lba, count: u64) -> Result<ScrubReport> {
        let s = &self.shared;
        if !s.checksums {
            return Err(BlockVolError::NeedsUpgrade {
                path: s.medium.describe(),
                version: self.format_version(),
            });
        }
        self.check_range(from, count)?;
        let bs = s.block_size() as usize;
        let step = SCRUB_STEP_BLOCKS.min((IO_CHUNK / bs).max(1) as u64);
        let mut report = ScrubReport::default();
        let mut buf = Vec::new();
        let mut lba = from.0;
        let end = from.0 + count;
        while lba < end {
            let n = step.min(end - lba);
            let _r = s.extent_read();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            {
                let st = s.lock_state();
                if st.closed {
                    return Err(BlockVolError::Closed);
                }
                s.check_installed(&st, "scrub")?;
                for l in lba..lba + n {
                    if st.dirty.contains_key(&l) {
                        report.skipped += 1;
                        continue;
                    }
                    match runs.last_mut() {
                        Some((f, k)) if *f + *k == l => *k += 1,
                        _ => runs.push((l, 1)),
                    }
                }
            }
            for (first, k) in runs {
                buf.resize(k as usize * bs, 0);
                let off = s.extent_offset + first * bs as u64;
                s.medium.read_at(off, &mut buf).map_err(|e| {
                    BlockVolError::io("read extent", format!("file offset {off}"), e)
                })?;
                for (l, _, _) in s.damaged_blocks(first, &buf)? {
                    report.damaged.push(Lba(l));
                }
                report.checked += k;
            }
            lba += n;
        }
        Ok(report)
    }

    /// Repairs extent block `lba` from `copy`, a peer's verified copy of it.
    ///
    /// The stored checksum decides, so no peer can change what the block holds: a copy whose
    /// checksum equals the stored one replaces the damaged extent block; a copy equal to the
    /// extent block byte for byte shows that the stored checksum was the damaged part, and the
    /// checksum is rewritten; any other copy (another version of the block, or damaged too) is
    /// `RepairMismatch` and nothing is written. A block that verifies is left alone
    /// (`NotDamaged`), and one whose newest data is in the WAL too (`NewerInWal`): the flusher
    /// rewrites it and its checksum from there. The write is synced before this returns; a
    /// crash before that leaves the block as damaged as it was (a torn block still fails).
    ///
    /// Holds the flush lock and the extent write lock, so neither the flusher nor a reader
    /// sees the block mid-repair.
    pub fn repair_block(&self, lba: Lba, copy: &[u8]) -> Result<RepairOutcome> {
        let s = &self.shared;
        if !s.checksums {
            return Err(BlockVolError::NeedsUpgrade {
                path: s.medium.describe(),
                version: self.format_version(),
            });
        }
        self.check_range(lba, 1)?;
        let bs = s.block_size() as usize;
        if copy.len() != bs {
            return Err(BlockVolError::InvalidArgument(format!(
                "a repair copy of {} bytes; one block is {bs}",
                copy.len()
            )));
        }
        let _f = s.flush_guard();
        let _w = s.extent_write();
        {
            let st = s.lock_state();
            s.check_usable(&st)?;
            s.check_installed(&st, "repair")?;
            if st.dirty.contains_key(&lba.0) {
                return Ok(RepairOutcome::NewerInWal);
            }
        }
        let off = s.extent_offset + lba.0 * bs as u64;
        let mut local = vec![0u8; bs];
        s.medium
            .read_at(off, &mut local)
            .map_err(|e| BlockVolError::io("read extent", format!("file offset {off}"), e))?;
        let mut stored = [0u32; 1];
        s.read_csums(lba.0, &mut stored)?;
        let stored = stored[0];
        if verify_block(lba.0, &local, stored).is_ok() {
            return Ok(RepairOutcome::NotDamaged);
        }
        let outcome = if verify_block(lba.0, copy, stored).is_ok() {
            s.medium
                .write_at(off, copy)
                .map_err(|e| BlockVolError::io("write extent", format!("file offset {off}"), e))?;
            RepairOutcome::ExtentRewritten
        } else if local == copy {
            let mut batch = CsumBatch::default();
            batch.set_blocks(s, lba.0, copy)?;
            batch.commit(s)?;
            RepairOutcome::ChecksumRewritten
        } else {
            return Err(BlockVolError::RepairMismatch {
                lba,
                stored,
                offered: block_csum(lba.0, copy),
            });
        };
        s.sync_data()
            .map_err(|e| BlockVolError::io("sync repaired block", s.medium.describe(), e))?;
        s.blocks_repaired.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "{}: extent block lba {} repaired from a peer's copy ({outcome:?})",
            s.medium.describe(),
            lba.0
        );
        Ok(outcome)
    }
}
