//! Base images: a frozen-flusher point in time on the sending side, a verified install on the
//! receiving side.
//!
//! Consistency argument. `pin_base(at)` flushes exactly up to `at` and then registers a flusher
//! fence at `at`: while the fence lives no entry above `at` reaches the extent. The extent is
//! therefore exactly the image at `at` (every entry `<= at` is in it; no later entry is), and it
//! stays that way while writes continue into the WAL, where reads find them through the dirty
//! map. The cost: while a base pin lives the WAL absorbs every write, so a long transfer under a
//! heavy write load can fill the ring; writers then wait (bounded by `wal_full_timeout`) and
//! fail with `WalFull`. `revoke_wal_pins` releases fences too, and a reader whose fence was
//! revoked fails with `Revoked` before it can read a changed block.

use std::sync::Arc;

use crate::error::{BlockVolError, Result};
use crate::format::{
    CHUNK_HEADER_SIZE, CHUNK_MAGIC, CHUNK_OFF_BLOCKS, CHUNK_OFF_CRC, CHUNK_OFF_DATA_LEN,
    CHUNK_OFF_LBA, CHUNK_OFF_MAGIC, get_u32, get_u64, is_zero, put_u32, put_u64,
};
use crate::types::{EntryInfo, Geometry, Lba, Lsn};
use crate::volume::{FenceRec, Shared, Volume};
use crate::walk::wal_stamp;

/// Largest chunk a reader produces.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

/// A run of blocks of a base image, with a CRC32 over its address and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChunk {
    /// First block.
    pub lba: Lba,
    /// Number of blocks.
    pub blocks: u32,
    /// `blocks` blocks of data.
    pub data: Vec<u8>,
    /// CRC32 over lba (u64 LE), blocks (u32 LE) and data.
    pub crc: u32,
}

fn chunk_crc(lba: u64, blocks: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lba.to_le_bytes());
    h.update(&blocks.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// The 24-byte wire header of a chunk (docs/format.md section 6.2).
fn chunk_header(lba: u64, blocks: u32, data_len: u32, crc: u32) -> [u8; CHUNK_HEADER_SIZE] {
    let mut out = [0u8; CHUNK_HEADER_SIZE];
    out[CHUNK_OFF_MAGIC..CHUNK_OFF_MAGIC + 4].copy_from_slice(&CHUNK_MAGIC);
    put_u32(&mut out, CHUNK_OFF_BLOCKS, blocks);
    put_u64(&mut out, CHUNK_OFF_LBA, lba);
    put_u32(&mut out, CHUNK_OFF_DATA_LEN, data_len);
    put_u32(&mut out, CHUNK_OFF_CRC, crc);
    out
}

/// Checks an encoded chunk in place (header, length, CRC) without copying its data; returns
/// `(lba, blocks, data)`.
fn decode_frame(buf: &[u8]) -> Result<(u64, u32, &[u8])> {
    if buf.len() < CHUNK_HEADER_SIZE {
        return Err(BlockVolError::decode(
            "base chunk",
            format!(
                "{} bytes is shorter than the {CHUNK_HEADER_SIZE}-byte header",
                buf.len()
            ),
        ));
    }
    if buf[CHUNK_OFF_MAGIC..CHUNK_OFF_MAGIC + 4] != CHUNK_MAGIC {
        return Err(BlockVolError::decode("base chunk", "bad magic"));
    }
    let len = get_u32(buf, CHUNK_OFF_DATA_LEN) as usize;
    if buf.len() != CHUNK_HEADER_SIZE + len {
        return Err(BlockVolError::decode(
            "base chunk",
            format!(
                "header says {len} data bytes, buffer holds {}",
                buf.len() - CHUNK_HEADER_SIZE
            ),
        ));
    }
    let lba = get_u64(buf, CHUNK_OFF_LBA);
    let blocks = get_u32(buf, CHUNK_OFF_BLOCKS);
    let data = &buf[CHUNK_HEADER_SIZE..];
    let expected = get_u32(buf, CHUNK_OFF_CRC);
    let found = chunk_crc(lba, blocks, data);
    if found != expected {
        return Err(BlockVolError::ChunkChecksum {
            lba: Lba(lba),
            expected,
            found,
        });
    }
    Ok((lba, blocks, data))
}

impl BaseChunk {
    /// A chunk with its CRC computed.
    pub fn new(lba: Lba, blocks: u32, data: Vec<u8>) -> BaseChunk {
        let crc = chunk_crc(lba.0, blocks, &data);
        BaseChunk {
            lba,
            blocks,
            data,
            crc,
        }
    }

    /// Checks the CRC.
    pub fn verify(&self) -> Result<()> {
        let found = chunk_crc(self.lba.0, self.blocks, &self.data);
        if found != self.crc {
            return Err(BlockVolError::ChunkChecksum {
                lba: self.lba,
                expected: self.crc,
                found,
            });
        }
        Ok(())
    }

    /// Wire form: a 24-byte header (see docs/format.md) then the data.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let len = u32::try_from(self.data.len())
            .map_err(|_| BlockVolError::InvalidArgument("chunk data too large".into()))?;
        let mut out = Vec::with_capacity(CHUNK_HEADER_SIZE + self.data.len());
        out.extend_from_slice(&chunk_header(self.lba.0, self.blocks, len, self.crc));
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    /// Decodes exactly one encoded chunk and verifies its CRC.
    pub fn decode(buf: &[u8]) -> Result<BaseChunk> {
        let (lba, blocks, data) = decode_frame(buf)?;
        Ok(BaseChunk {
            lba: Lba(lba),
            blocks,
            data: data.to_vec(),
            crc: get_u32(buf, CHUNK_OFF_CRC),
        })
    }
}

/// A base image held at one LSN: the extent is frozen at `lsn()` while this lives.
///
/// `Send + Sync`; dropping it releases the fence and its WAL pin.
pub struct BasePin {
    shared: Arc<Shared>,
    fence_id: u64,
    pin_id: u64,
    lsn: Lsn,
    info: EntryInfo,
}

impl std::fmt::Debug for BasePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BasePin(at {})", self.lsn)
    }
}

impl BasePin {
    /// The LSN the image represents.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Identity of the entry at `lsn()` (the receiver's new tail entry).
    pub fn entry_info(&self) -> EntryInfo {
        self.info
    }

    /// The geometry of the image.
    pub fn geometry(&self) -> Geometry {
        self.shared.geo
    }

    /// Whether the fence was revoked (reading then fails).
    pub fn is_revoked(&self) -> bool {
        let st = self.shared.lock_state();
        st.fences.get(&self.fence_id).is_none_or(|f| f.revoked)
    }

    /// A chunked reader over the whole image; `chunk_bytes` is rounded to whole blocks.
    pub fn reader(&self, chunk_bytes: usize) -> BaseReader<'_> {
        BaseReader::new(PinRef::Borrowed(self), chunk_bytes)
    }

    /// A reader that owns a share of the pin, so it can outlive the caller's borrow (a
    /// transfer that reads one chunk per call keeps it between calls). The image stays pinned
    /// until both the reader and every other share are dropped.
    pub fn reader_owned(pin: Arc<BasePin>, chunk_bytes: usize) -> BaseReader<'static> {
        BaseReader::new(PinRef::Owned(pin), chunk_bytes)
    }

    /// A spec a receiver can install this image with.
    pub fn install_spec(&self) -> BaseInstallSpec {
        BaseInstallSpec {
            base_lsn: self.lsn,
            base_entry: self.info,
            geometry: self.shared.geo,
        }
    }
}

/// The pin a reader reads through: borrowed, or a shared owner.
enum PinRef<'a> {
    Borrowed(&'a BasePin),
    Owned(Arc<BasePin>),
}

impl std::ops::Deref for PinRef<'_> {
    type Target = BasePin;

    fn deref(&self) -> &BasePin {
        match self {
            PinRef::Borrowed(p) => p,
            PinRef::Owned(p) => p,
        }
    }
}

impl<'a> BaseReader<'a> {
    fn new(pin: PinRef<'a>, chunk_bytes: usize) -> Self {
        let bs = pin.shared.geo.block_size as usize;
        let chunk_blocks = (chunk_bytes.min(MAX_CHUNK_BYTES) / bs).max(1) as u64;
        BaseReader {
            pin,
            next_lba: 0,
            chunk_blocks,
            window: Vec::new(),
            win_lba: 0,
            win_blocks: 0,
            cursor: 0,
            segs: Vec::new(),
            seg: 0,
            bytes_scanned: 0,
            bytes_sent: 0,
            failed: false,
        }
    }
}

impl Drop for BasePin {
    fn drop(&mut self) {
        let mut st = self.shared.lock_state();
        st.fences.remove(&self.fence_id);
        st.pins.remove(&self.pin_id);
        self.shared.wake_flusher(&mut st);
        self.shared.cond.notify_all();
    }
}

/// Reads a base image in chunks, skipping runs of all-zero blocks.
///
/// Memory is bounded by two chunk buffers regardless of the volume size.
pub struct BaseReader<'a> {
    pin: PinRef<'a>,
    next_lba: u64,
    chunk_blocks: u64,
    window: Vec<u8>,
    win_lba: u64,
    win_blocks: u64,
    cursor: u64,
    /// The window's data segments, `[first, end)` block indices in the window, in order and
    /// apart; the blocks between them are holes.
    segs: Vec<(u64, u64)>,
    /// The segment `cursor` is in.
    seg: usize,
    bytes_scanned: u64,
    bytes_sent: u64,
    failed: bool,
}

impl std::fmt::Debug for BaseReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BaseReader(next lba {})", self.next_lba)
    }
}

impl BaseReader<'_> {
    /// Starts the reader at `lba` instead of 0 (an install resuming there): the blocks below
    /// are neither read nor counted. Only before the first chunk; past the end it yields
    /// nothing.
    pub fn starting_at(mut self, lba: Lba) -> Self {
        if self.next_lba == 0 && self.win_blocks == 0 {
            self.next_lba = lba.0.min(self.pin.shared.geo.volume_blocks);
        }
        self
    }

    /// Extent bytes read so far.
    pub fn bytes_scanned(&self) -> u64 {
        self.bytes_scanned
    }

    /// Data bytes emitted in chunks so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    fn load_window(&mut self) -> Result<bool> {
        let s = &self.pin.shared;
        let vb = s.geo.volume_blocks;
        if self.next_lba >= vb {
            return Ok(false);
        }
        let bs = u64::from(s.geo.block_size);
        // The extent lock keeps the flusher out from the fence check to the end of the read, so
        // a revoked fence is noticed before any block past the image can be read, and before
        // the zero-skip below can take a region the flusher just zeroed (a trim past the image)
        // for the image's end: a revoked reader never ends "successfully" with a short image.
        let _r = s.extent_read();
        {
            let st = s.lock_state();
            if st.closed {
                return Err(BlockVolError::Closed);
            }
            match st.fences.get(&self.pin.fence_id) {
                Some(f) if !f.revoked => {}
                _ => {
                    return Err(BlockVolError::Revoked {
                        reason: st.revoke_reason.clone(),
                    });
                }
            }
        }
        // Skip regions the file system knows to be holes (for example a freshly zeroed extent):
        // they read as zeros, so a sparse volume costs a few syscalls instead of a full read.
        let here = s.extent_offset + self.next_lba * bs;
        let next = s
            .medium
            .next_data(here)
            .map_err(|e| BlockVolError::io("seek data", format!("file offset {here}"), e))?;
        let data_lba = match next {
            None => vb,
            Some(off) if off > here => ((off - s.extent_offset) / bs).min(vb),
            Some(_) => self.next_lba,
        };
        if data_lba > self.next_lba {
            // A hole reads as zeros: its checksums must say so, or data was lost.
            s.verify_zero_run(self.next_lba, data_lba - self.next_lba)?;
            self.bytes_scanned += (data_lba - self.next_lba) * bs;
            self.next_lba = data_lba;
            if self.next_lba >= vb {
                return Ok(false);
            }
        }
        let n = self.chunk_blocks.min(vb - self.next_lba);
        self.window.resize((n * bs) as usize, 0);
        // Read only the blocks the file system holds data for: each data segment, widened to
        // whole blocks. The blocks between segments are holes, known to read as zeros: they
        // are neither filled, nor hashed, nor scanned for runs (D55), only their stored
        // checksums checked.
        let start = s.extent_offset + self.next_lba * bs;
        let end = start + n * bs;
        self.segs.clear();
        let mut pos = start;
        while pos < end {
            let seek = |e| BlockVolError::io("seek data", format!("file offset {pos}"), e);
            let data = match s.medium.next_data(pos).map_err(seek)? {
                Some(d) if d < end => d.max(pos),
                _ => break,
            };
            let hole = s.medium.next_hole(data).map_err(seek)?.clamp(data + 1, end);
            let a = (data - start) / bs;
            let b = (hole - start).div_ceil(bs);
            match self.segs.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => self.segs.push((a, b)),
            }
            pos = start + b * bs;
        }
        let mut gap_from = 0;
        for &(a, b) in &self.segs {
            let buf = &mut self.window[(a * bs) as usize..(b * bs) as usize];
            let off = start + a * bs;
            s.medium
                .read_at(off, buf)
                .map_err(|e| BlockVolError::io("read extent", format!("file offset {off}"), e))?;
            // Never ship a damaged block to a replica as good data.
            s.verify_extent(self.next_lba + a, buf)?;
            if a > gap_from {
                s.verify_zero_run(self.next_lba + gap_from, a - gap_from)?;
            }
            gap_from = b;
        }
        if n > gap_from {
            s.verify_zero_run(self.next_lba + gap_from, n - gap_from)?;
        }
        self.win_lba = self.next_lba;
        self.win_blocks = n;
        self.cursor = 0;
        self.seg = 0;
        self.next_lba += n;
        self.bytes_scanned += n * bs;
        Ok(true)
    }

    /// The next run of non-zero blocks: `(lba, blocks, byte range in the window)`.
    fn next_run(&mut self) -> Result<Option<(u64, u32, std::ops::Range<usize>)>> {
        let bs = self.pin.shared.geo.block_size as usize;
        loop {
            let block = |w: &Vec<u8>, i: u64| -> bool {
                is_zero(&w[i as usize * bs..(i as usize + 1) * bs])
            };
            // Runs lie inside the window's data segments (the blocks between are holes).
            while self.seg < self.segs.len() {
                let (a, b) = self.segs[self.seg];
                self.cursor = self.cursor.max(a);
                while self.cursor < b && block(&self.window, self.cursor) {
                    self.cursor += 1;
                }
                if self.cursor < b {
                    let first = self.cursor;
                    while self.cursor < b && !block(&self.window, self.cursor) {
                        self.cursor += 1;
                    }
                    let run = first as usize * bs..self.cursor as usize * bs;
                    self.bytes_sent += run.len() as u64;
                    return Ok(Some((
                        self.win_lba + first,
                        (self.cursor - first) as u32,
                        run,
                    )));
                }
                self.seg += 1;
            }
            if !self.load_window()? {
                return Ok(None);
            }
        }
    }

    fn next_chunk(&mut self) -> Result<Option<BaseChunk>> {
        Ok(self
            .next_run()?
            .map(|(lba, blocks, run)| BaseChunk::new(Lba(lba), blocks, self.window[run].to_vec())))
    }

    /// The next chunk in wire form: exactly the bytes `BaseChunk::encode` would produce for the
    /// chunk `next` yields, built straight from the read window (one copy, one CRC pass, one
    /// allocation of the frame's size). `None` at the end; an error ends the reader.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>>> {
        if self.failed {
            return None;
        }
        match self.next_run() {
            Ok(None) => None,
            Ok(Some((lba, blocks, run))) => {
                let data = &self.window[run];
                let Ok(len) = u32::try_from(data.len()) else {
                    self.failed = true;
                    return Some(Err(BlockVolError::InvalidArgument(
                        "chunk data too large".into(),
                    )));
                };
                let mut out = Vec::with_capacity(CHUNK_HEADER_SIZE + data.len());
                out.extend_from_slice(&chunk_header(
                    lba,
                    blocks,
                    len,
                    chunk_crc(lba, blocks, data),
                ));
                out.extend_from_slice(data);
                Some(Ok(out))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl Iterator for BaseReader<'_> {
    type Item = Result<BaseChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_chunk() {
            Ok(c) => c.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// What a receiver needs to install a base image.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BaseInstallSpec {
    /// The LSN the image represents.
    pub base_lsn: Lsn,
    /// Identity of the sender's entry at `base_lsn` (becomes the receiver's tail entry).
    pub base_entry: EntryInfo,
    /// The sender's geometry; must equal the receiver's.
    pub geometry: Geometry,
}

/// A verified chunk's fields, borrowed.
struct ChunkRef<'a> {
    lba: u64,
    blocks: u32,
    data: &'a [u8],
}

/// An install in progress. `finish` makes it the volume's state; dropping it without
/// finishing leaves the volume marked incomplete.
pub struct BaseInstall {
    shared: Arc<Shared>,
    spec: BaseInstallSpec,
    finished: bool,
    bytes_written: u64,
    /// Where this attempt started: blocks below it were already durable from an earlier one.
    resume_from: u64,
    /// The end of the highest chunk written; with `ordered`, every image block below it has
    /// been written (zero runs were zeroed at the start).
    high: u64,
    /// Chunks have arrived in ascending order so far (only then can `high` be a resume point).
    ordered: bool,
    /// The resume point last made durable.
    durable_to: u64,
    /// Data bytes written since then.
    since_durable: u64,
    /// Data bytes between two durable resume points.
    stride: u64,
}

/// Data bytes between two resume points of an install: a sixteenth of the extent, at least
/// 4 MiB and at most 1 GiB (each point costs one fdatasync and one superblock write).
fn progress_stride(extent_bytes: u64) -> u64 {
    (extent_bytes / 16).clamp(4 << 20, 1 << 30)
}

impl std::fmt::Debug for BaseInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BaseInstall(at {})", self.spec.base_lsn)
    }
}

impl BaseInstall {
    /// Data bytes written so far (by this attempt).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Where this attempt resumes: every block below this LBA already holds the image durably
    /// (an earlier attempt at the same image got that far), so the sender starts here. 0 when
    /// the install started over.
    pub fn resume_from(&self) -> Lba {
        Lba(self.resume_from)
    }

    /// The resume point made durable so far: an attempt interrupted now (connection lost,
    /// process killed, machine crashed) resumes here.
    pub fn durable_to(&self) -> Lba {
        Lba(self.durable_to)
    }

    /// Sets the data bytes between two durable resume points (default: a sixteenth of the
    /// extent, 4 MiB to 1 GiB).
    pub fn set_progress_stride(&mut self, bytes: u64) {
        self.stride = bytes.max(1);
    }

    /// Makes every chunk written so far durable and records the resume point in the
    /// superblock: an fdatasync, then a superblock write. Runs by itself every stride; a
    /// no-op when chunks arrived out of order (no prefix is known complete) or nothing new
    /// was written.
    pub fn make_progress_durable(&mut self) -> Result<()> {
        if !self.ordered || self.high <= self.durable_to {
            return Ok(());
        }
        let s = self.shared.clone();
        if let Err(e) = s.sync_data() {
            let err = BlockVolError::io("fdatasync extent", s.medium.describe(), e);
            let mut st = s.lock_state();
            s.poison(&mut st, err.to_string());
            return Err(err);
        }
        let high = self.high;
        let mut w = s.sb_writer();
        s.persist_with(&mut w, |st| {
            let mut sb = s.sb_from_state(st);
            sb.install_resume = high;
            sb
        })?;
        s.lock_state().install_resume = high;
        self.durable_to = high;
        self.since_durable = 0;
        Ok(())
    }

    /// Verifies the chunk's CRC, then writes it straight into the extent.
    pub fn write_chunk(&mut self, chunk: &BaseChunk) -> Result<()> {
        chunk.verify()?;
        self.write_verified(chunk.lba.0, chunk.blocks, &chunk.data)
    }

    /// `write_chunk` for a chunk in wire form (`BaseChunk::encode`): the frame is checked in
    /// place (header, length, CRC, one pass) and its data written into the extent straight
    /// from `frame`, with no decoded copy.
    pub fn write_frame(&mut self, frame: &[u8]) -> Result<()> {
        let (lba, blocks, data) = decode_frame(frame)?;
        self.write_verified(lba, blocks, data)
    }

    fn write_verified(&mut self, lba: u64, blocks: u32, data: &[u8]) -> Result<()> {
        let chunk = ChunkRef { lba, blocks, data };
        let s = &self.shared;
        let g = s.geo;
        let bs = u64::from(g.block_size);
        if chunk.blocks == 0
            || chunk
                .lba
                .checked_add(u64::from(chunk.blocks))
                .is_none_or(|e| e > g.volume_blocks)
        {
            return Err(BlockVolError::OutOfRange {
                lba: Lba(chunk.lba),
                blocks: u64::from(chunk.blocks),
                volume_blocks: g.volume_blocks,
            });
        }
        if chunk.data.len() as u64 != u64::from(chunk.blocks) * bs {
            return Err(BlockVolError::InvalidArgument(format!(
                "chunk at lba {} has {} bytes for {} blocks of {bs}",
                chunk.lba,
                chunk.data.len(),
                chunk.blocks
            )));
        }
        {
            let st = s.lock_state();
            s.check_usable(&st)?;
        }
        let off = s.extent_offset + chunk.lba * bs;
        s.medium
            .write_at(off, chunk.data)
            .map_err(|e| BlockVolError::io("write extent", format!("file offset {off}"), e))?;
        // The checksums go with the blocks; the next resume point's (or finish's) extent sync
        // makes both durable, and chunks after the last resume point are resent on a resume.
        let mut csums = crate::volume::CsumBatch::default();
        csums.set_blocks(s, chunk.lba, chunk.data)?;
        csums.commit(s)?;
        self.bytes_written += chunk.data.len() as u64;
        let end = chunk.lba + u64::from(chunk.blocks);
        if chunk.lba < self.high {
            // Out of order (or a rewrite below the resume point): no prefix is known complete
            // from here on; the install still works, it just cannot resume.
            self.ordered = false;
        }
        self.high = self.high.max(end);
        self.since_durable += chunk.data.len() as u64;
        if self.ordered && self.since_durable >= self.stride {
            self.make_progress_durable()?;
        }
        Ok(())
    }

    /// Syncs the extent, resets the WAL with a new generation, sets checkpoint = head = tail =
    /// base LSN and clears the incomplete mark, all durably.
    pub fn finish(mut self) -> Result<()> {
        let s = self.shared.clone();
        if let Err(e) = s.sync_data() {
            let err = BlockVolError::io("fdatasync extent", s.medium.describe(), e);
            let mut st = s.lock_state();
            s.poison(&mut st, err.to_string());
            return Err(err);
        }
        let base = self.spec.base_lsn.0;
        let info = self.spec.base_entry;
        let mut w = s.sb_writer();
        let generation = s.lock_state().generation + 1;
        s.persist_with(&mut w, |st| {
            let mut sb = s.sb_from_state(st);
            sb.flags = 0;
            sb.install_lsn = 0;
            sb.install_epoch = 0;
            sb.install_crc = 0;
            sb.install_resume = 0;
            sb.generation = generation;
            sb.checkpoint = base;
            sb.tail_lsn = base;
            sb.tail_pos = 0;
            sb.tail_epoch = info.epoch.0;
            sb.tail_crc = info.content_crc;
            sb.head_hint = base;
            sb.durable_mark = base;
            sb.flush_mark = base;
            sb
        })?;
        let mut st = s.lock_state();
        st.generation = generation;
        st.stamp = wal_stamp(&s.volume_id, generation);
        st.head = base;
        st.tail = base;
        st.checkpoint = base;
        st.flush_mark = base;
        st.durable = base;
        // The committed point it was told belonged to the log the image replaced: the image
        // is the whole history now. Left above the head, it outlived the log it described,
        // and a copy promoted later planned its replicas against entries it never held (found
        // by the network simulator, D52).
        st.committed = base;
        st.head_pos = 0;
        st.tail_pos = 0;
        st.synced_pos = 0;
        st.tail_info = info;
        st.index.clear();
        st.dirty.clear();
        st.installing = false;
        st.install_incomplete = false;
        st.install_lsn = 0;
        st.install_entry = EntryInfo::default();
        st.install_resume = 0;
        st.repaired = false;
        st.lineage += 1;
        s.cond.notify_all();
        self.finished = true;
        Ok(())
    }
}

impl Drop for BaseInstall {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = self.shared.lock_state();
            st.installing = false;
            self.shared.cond.notify_all();
        }
    }
}

impl Volume {
    fn register_base(&self, at: u64) -> Result<(u64, u64)> {
        let s = &self.shared;
        let mut st = s.lock_state();
        let pin_id = s.add_pin(&mut st, at)?;
        st.next_pin_id += 1;
        let fence_id = st.next_pin_id;
        st.fences.insert(fence_id, FenceRec { at, revoked: false });
        Ok((fence_id, pin_id))
    }

    fn drop_base(&self, fence_id: u64, pin_id: u64) {
        let mut st = self.shared.lock_state();
        st.fences.remove(&fence_id);
        st.pins.remove(&pin_id);
        self.shared.cond.notify_all();
    }

    /// Holds a full base image exactly at `at` while writes continue.
    ///
    /// Requires `checkpoint <= at <= head` and `at` within the flush gate; flushes up to exactly
    /// `at`, then fences the flusher there. `BaseUnavailable` when the checkpoint has already
    /// passed `at` (the extent cannot be rewound) or another base pin holds the flusher lower.
    pub fn pin_base(&self, at: Lsn) -> Result<BasePin> {
        let s = &self.shared;
        let unavailable =
            |st: &crate::volume::State, reason: String| BlockVolError::BaseUnavailable {
                requested: at,
                checkpoint: Lsn(st.checkpoint),
                head: Lsn(st.head),
                reason,
            };
        let needs_sync = {
            let st = s.lock_state();
            s.check_usable(&st)?;
            s.check_installed(&st, "pin_base")?;
            if at.0 > st.head {
                return Err(BlockVolError::BeyondHead {
                    requested: at,
                    head: Lsn(st.head),
                });
            }
            at.0 > st.durable
        };
        if needs_sync {
            s.sync()?;
        }
        let _f = s.flush_guard();
        {
            let st = s.lock_state();
            s.check_usable(&st)?;
            s.check_installed(&st, "pin_base")?;
            if at.0 < st.checkpoint {
                return Err(unavailable(
                    &st,
                    "the checkpoint has already passed it".into(),
                ));
            }
            let gate = s.gate_limit(&st);
            if at.0 > gate {
                return Err(unavailable(
                    &st,
                    format!("it is beyond the flush gate limit {gate}"),
                ));
            }
            if let Some(f) = st
                .fences
                .values()
                .filter(|f| !f.revoked)
                .map(|f| f.at)
                .min()
                && f < at.0
            {
                return Err(unavailable(
                    &st,
                    format!("another base pin holds the flusher at {f}"),
                ));
            }
        }
        let (fence_id, pin_id) = self.register_base(at.0)?;
        let cp = match s.flush_locked(at.0, false) {
            Ok(cp) => cp,
            Err(e) => {
                self.drop_base(fence_id, pin_id);
                return Err(e);
            }
        };
        if cp != at.0 {
            self.drop_base(fence_id, pin_id);
            let st = s.lock_state();
            return Err(unavailable(&st, format!("the flush stopped at {cp}")));
        }
        self.base_pin(fence_id, pin_id, at)
    }

    /// The pin over a registered image at `at`, with the identity of its entry; the
    /// registration is dropped when that entry cannot be read.
    fn base_pin(&self, fence_id: u64, pin_id: u64, at: Lsn) -> Result<BasePin> {
        let info = match self.entry_info(at) {
            Ok(i) => i,
            Err(e) => {
                self.drop_base(fence_id, pin_id);
                return Err(e);
            }
        };
        Ok(BasePin {
            shared: self.shared.clone(),
            fence_id,
            pin_id,
            lsn: at,
            info,
        })
    }

    /// Holds the image at the current checkpoint (no flush), and pins the WAL after it, for a
    /// snapshot + tail rebuild.
    pub fn pin_snapshot(&self) -> Result<BasePin> {
        let s = &self.shared;
        let _f = s.flush_guard();
        let at = {
            let st = s.lock_state();
            s.check_usable(&st)?;
            s.check_installed(&st, "pin_snapshot")?;
            st.checkpoint
        };
        let (fence_id, pin_id) = self.register_base(at)?;
        self.base_pin(fence_id, pin_id, Lsn(at))
    }

    /// Sets the data bytes between two durable resume points of the base installs this
    /// volume receives from now on (0: the default, a sixteenth of the extent, 4 MiB to
    /// 1 GiB). Smaller strides lose less to an interruption and cost one fdatasync and one
    /// superblock write each.
    pub fn set_install_stride(&self, bytes: u64) {
        self.shared
            .install_stride
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts installing a base image: persists an "install in progress" mark first, pauses
    /// this volume's flusher, refuses I/O, and zeroes the extent.
    ///
    /// **Resume.** When the volume holds an incomplete install of the very same image (the
    /// same base LSN and sender's entry identity at it) with a durable resume point, the
    /// extent is kept: blocks below the point already hold the image, and blocks above it hold
    /// zeros or chunks of that same image. `BaseInstall::resume_from` says where the sender
    /// starts. Any other image starts over from a zeroed extent.
    pub fn begin_base_install(&self, spec: BaseInstallSpec) -> Result<BaseInstall> {
        let s = &self.shared;
        if spec.geometry != s.geo {
            return Err(BlockVolError::GeometryMismatch {
                expected: s.geo.to_string(),
                found: spec.geometry.to_string(),
            });
        }
        if spec.base_entry.lsn != spec.base_lsn {
            return Err(BlockVolError::InvalidArgument(format!(
                "base entry names lsn {}, base is at {}",
                spec.base_entry.lsn, spec.base_lsn
            )));
        }
        if spec.base_lsn.0 >= crate::format::SB_COUNTER_LIMIT {
            // The superblock could not hold it (and the next LSN would have no room).
            return Err(BlockVolError::InvalidArgument(format!(
                "base lsn {} is beyond the superblock counter limit",
                spec.base_lsn
            )));
        }
        let _f = s.flush_guard();
        let mut w = s.sb_writer();
        let resume;
        {
            let mut st = s.lock_state();
            s.check_usable(&st)?;
            if st.installing {
                return Err(BlockVolError::InstallInProgress);
            }
            if st.fences.values().any(|f| !f.revoked) {
                return Err(BlockVolError::Busy(
                    "base pins are outstanding on this volume".into(),
                ));
            }
            st.installing = true;
            resume = if st.install_incomplete
                && st.install_lsn == spec.base_lsn.0
                && st.install_entry == spec.base_entry
            {
                st.install_resume.min(s.geo.volume_blocks)
            } else {
                0
            };
        }
        let r = s.persist_with(&mut w, |st| {
            let mut sb = s.sb_from_state(st);
            sb.flags |= crate::format::SB_FLAG_INSTALL_INCOMPLETE;
            sb.install_lsn = spec.base_lsn.0;
            sb.install_epoch = spec.base_entry.epoch.0;
            sb.install_crc = spec.base_entry.content_crc;
            sb.install_resume = resume;
            sb
        });
        {
            let mut st = s.lock_state();
            if let Err(e) = r {
                st.installing = false;
                return Err(e);
            }
            st.install_incomplete = true;
            st.install_lsn = spec.base_lsn.0;
            st.install_entry = spec.base_entry;
            st.install_resume = resume;
            st.lineage += 1;
            st.index.clear();
            st.dirty.clear();
            // The old lineage's pins can no longer be honoured.
            for p in st.pins.values_mut() {
                p.revoked = true;
            }
            st.revoke_reason = "base install started".into();
            s.cond.notify_all();
        }
        drop(w);
        let install = BaseInstall {
            shared: s.clone(),
            spec,
            finished: false,
            bytes_written: 0,
            resume_from: resume,
            high: resume,
            ordered: true,
            durable_to: resume,
            since_durable: 0,
            stride: match s.install_stride.load(std::sync::atomic::Ordering::Relaxed) {
                0 => progress_stride(s.extent_len()),
                n => n,
            },
        };
        if resume == 0 {
            // The first resume point's fdatasync makes this zeroing durable before any point
            // is recorded, so a resumed install never finds stale data in an elided zero run.
            s.zero_data()
                .map_err(|e| BlockVolError::io("zero extent", s.medium.describe(), e))?;
        } else {
            log::info!(
                "resuming the install of the image at lsn {} from lba {resume}",
                spec.base_lsn
            );
        }
        Ok(install)
    }
}
