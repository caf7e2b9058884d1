//! Reads: the newest data of each block from the dirty map (the WAL), everything else from the
//! extent; and the digest over every block.

use super::state::TRIM_SRC;
use super::{IO_CHUNK, Volume};
use crate::error::{BlockVolError, Result};
use crate::types::{Digest, Lba};

impl Volume {
    /// Reads `blocks` blocks at `lba`.
    pub fn read(&self, lba: Lba, blocks: u64) -> Result<Vec<u8>> {
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
    /// WAL), everything else from the extent, verified against its checksums (format version
    /// 2): a damaged block fails the read with `ChecksumMismatch`, counted in
    /// `Status::checksum_errors`, and `buf` is zeroed.
    pub fn read_into(&self, lba: Lba, buf: &mut [u8]) -> Result<()> {
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
                match st.dirty.get(&(lba.0 + i as u64)) {
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
            let off = s.extent_offset + (lba.0 + first as u64) * bs as u64;
            let run = &mut buf[first * bs..(first + n) * bs];
            s.medium
                .read_at(off, run)
                .map_err(|e| BlockVolError::io("read extent", format!("file offset {off}"), e))?;
            if let Err(e) = s.verify_extent(lba.0 + first as u64, run) {
                // Never hand out damaged bytes, not even in the caller's buffer.
                buf.fill(0);
                return Err(e);
            }
        }
        Ok(())
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
            self.read_into(Lba(lba), &mut buf)?;
            h.update(&buf);
            lba += n;
        }
        Ok(Digest(h.digest128()))
    }
}
