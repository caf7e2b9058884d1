//! On-disk and wire layouts: every offset, size and magic number, and the codecs that use them.
//!
//! `docs/format.md` documents these structures byte by byte; `tests/format_doc.rs` parses the
//! tables in that document and compares them with the constants here, so the two cannot drift.
//! All integers are little-endian. Decoders never panic: every input yields a value or a typed
//! error.

use crate::error::{BlockVolError, Result};
use crate::types::Role;

/// Current format version, stored in each superblock slot. Version 2 added the extent
/// checksum region (docs/format.md section 5.1).
pub const FORMAT_VERSION: u32 = 2;
/// Oldest format version this code reads. A version 1 file (no extent checksums) opens
/// read-only; `blockvol upgrade` converts it.
pub const MIN_FORMAT_VERSION: u32 = 1;

// ---- File regions -------------------------------------------------------------------------

/// Size of one superblock slot.
pub const SB_SLOT_SIZE: u64 = 4096;
/// File offset of superblock slot A (slot B follows it).
pub const SB_SLOT_A_OFFSET: u64 = 0;
/// File offset of superblock slot B.
pub const SB_SLOT_B_OFFSET: u64 = 4096;
/// File offset of the WAL ring.
pub const WAL_OFFSET: u64 = 8192;
/// The WAL size must be a multiple of this (the page size, so the ring maps cleanly).
pub const WAL_SIZE_ALIGN: u64 = 4096;
/// Smallest WAL accepted at creation.
pub const MIN_WAL_SIZE: u64 = 64 * 1024;
/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Bytes of one extent block's checksum in the checksum region (version 2).
pub const CSUM_SIZE: u64 = 4;
/// The checksum region starts on, and its length is a multiple of, this alignment.
pub const CSUM_REGION_ALIGN: u64 = 4096;

// ---- Superblock slot ----------------------------------------------------------------------

/// Magic at the start of each superblock slot.
pub const SB_MAGIC: [u8; 8] = *b"BLKVOLSB";
/// Offset of the 8-byte magic.
pub const SB_OFF_MAGIC: usize = 0;
/// Offset of the u32 format version.
pub const SB_OFF_VERSION: usize = 8;
/// Offset of the u32 flags.
pub const SB_OFF_FLAGS: usize = 12;
/// Offset of the u64 sequence number (the newest valid slot wins).
pub const SB_OFF_SEQ: usize = 16;
/// Offset of the 16-byte volume id (random at creation).
pub const SB_OFF_VOLUME_ID: usize = 24;
/// Offset of the u32 block size.
pub const SB_OFF_BLOCK_SIZE: usize = 40;
/// Offset of a reserved u32 (zero).
pub const SB_OFF_RESERVED: usize = 44;
/// Offset of the u64 number of extent blocks.
pub const SB_OFF_VOLUME_BLOCKS: usize = 48;
/// Offset of the u64 WAL file offset.
pub const SB_OFF_WAL_OFFSET: usize = 56;
/// Offset of the u64 WAL size.
pub const SB_OFF_WAL_SIZE: usize = 64;
/// Offset of the u64 extent file offset.
pub const SB_OFF_EXTENT_OFFSET: usize = 72;
/// Offset of the u64 WAL generation.
pub const SB_OFF_GENERATION: usize = 80;
/// Offset of the u64 checkpoint LSN.
pub const SB_OFF_CHECKPOINT: usize = 88;
/// Offset of the u64 tail LSN (last recycled entry).
pub const SB_OFF_TAIL_LSN: usize = 96;
/// Offset of the u64 logical WAL position where entry `tail + 1` starts.
pub const SB_OFF_TAIL_POS: usize = 104;
/// Offset of the u64 epoch of the tail entry.
pub const SB_OFF_TAIL_EPOCH: usize = 112;
/// Offset of the u32 content CRC of the tail entry.
pub const SB_OFF_TAIL_CRC: usize = 120;
/// Offset of the u32 role code.
pub const SB_OFF_ROLE: usize = 124;
/// Offset of the u64 fencing epoch.
pub const SB_OFF_EPOCH: usize = 128;
/// Offset of the u64 advisory head LSN (never trusted by recovery).
pub const SB_OFF_HEAD_HINT: usize = 136;
/// Offset of the u64 base LSN of an install in progress (0 otherwise).
pub const SB_OFF_INSTALL_LSN: usize = 144;
/// Offset of the u64 durable mark: an LSN known durable when the slot was written. Recovery
/// that ends below it has lost synced entries (corruption, not a torn tail).
pub const SB_OFF_DURABLE_MARK: usize = 152;
/// Offset of the u64 flush mark: the extent may hold entries up to this LSN (a flush's intent,
/// persisted before the flush touches the extent). Recovery redoes the flush of
/// `(checkpoint, flush_mark]`; zero (files written before the field existed) means no intent.
pub const SB_OFF_FLUSH_MARK: usize = 160;
/// Offset of the u64 epoch of the sender's entry at `install_lsn` (0 when no install).
pub const SB_OFF_INSTALL_EPOCH: usize = 168;
/// Offset of the u32 content CRC of the sender's entry at `install_lsn` (0 when no install).
pub const SB_OFF_INSTALL_CRC: usize = 176;
/// Offset of four zero bytes after `install_crc`.
pub const SB_OFF_INSTALL_PAD: usize = 180;
/// Offset of the u64 resume point of an install: every block below it holds the image
/// `(install_lsn, install_epoch, install_crc)` durably (0: nothing is known durable).
pub const SB_OFF_INSTALL_RESUME: usize = 184;
/// First byte after the fields; bytes up to the CRC must be zero.
pub const SB_FIELDS_END: usize = 192;
/// Offset of the u32 CRC32 over bytes `[0, SB_OFF_CRC)` of the slot.
pub const SB_OFF_CRC: usize = 4092;

/// Superblock flag: a base install started and has not finished.
pub const SB_FLAG_INSTALL_INCOMPLETE: u32 = 1 << 0;
/// Superblock flag: recovery repaired mid-log corruption; the checkpoint is untrusted.
pub const SB_FLAG_REPAIRED: u32 = 1 << 1;
/// Every flag this version understands.
pub const SB_KNOWN_FLAGS: u32 = SB_FLAG_INSTALL_INCOMPLETE | SB_FLAG_REPAIRED;
/// Every counter a superblock stores (sequence number, generation, LSNs, logical WAL
/// positions) is below this. Counters grow by one per write or by bytes of log, so no real
/// volume comes near it, and the arithmetic on them (`seq + 1`, `tail_lsn + 1`,
/// `tail_pos + wal_size`) cannot overflow for a slot that decodes.
pub const SB_COUNTER_LIMIT: u64 = 1 << 63;

// ---- WAL entry header ---------------------------------------------------------------------

/// Magic of an entry stored in the WAL ring.
pub const ENTRY_MAGIC_DISK: [u8; 4] = *b"BVWE";
/// Magic of an entry in its wire form (`WalEntry::encode`).
pub const ENTRY_MAGIC_WIRE: [u8; 4] = *b"BVWX";
/// Size of an entry header.
pub const ENTRY_HEADER_SIZE: usize = 64;
/// Entries start and end on this alignment.
pub const ENTRY_ALIGN: u64 = 8;
/// Largest entry (header, payload and alignment) in any ring: the header's payload length is a
/// u32, so the payload is at most `u32::MAX` rounded down to the alignment. A ring of 8 GiB or
/// more could otherwise place an entry whose length the header cannot state.
pub const MAX_ENTRY_SIZE: u64 =
    ENTRY_HEADER_SIZE as u64 + (u32::MAX as u64 / ENTRY_ALIGN) * ENTRY_ALIGN;
/// Offset of the 4-byte magic.
pub const ENTRY_OFF_MAGIC: usize = 0;
/// Offset of the u8 kind.
pub const ENTRY_OFF_KIND: usize = 4;
/// Offset of the u8 flags (zero).
pub const ENTRY_OFF_FLAGS: usize = 5;
/// Offset of a reserved u16 (zero).
pub const ENTRY_OFF_RESERVED: usize = 6;
/// Offset of the u64 WAL generation (zero in the wire form).
pub const ENTRY_OFF_GENERATION: usize = 8;
/// Offset of the u64 LSN.
pub const ENTRY_OFF_LSN: usize = 16;
/// Offset of the u64 epoch.
pub const ENTRY_OFF_EPOCH: usize = 24;
/// Offset of the u64 first block.
pub const ENTRY_OFF_LBA: usize = 32;
/// Offset of the u32 block count.
pub const ENTRY_OFF_BLOCKS: usize = 40;
/// Offset of the u32 payload length in bytes.
pub const ENTRY_OFF_PAYLOAD_LEN: usize = 44;
/// Offset of the u64 durable hint (the writer's durable LSN at append; zero in the wire form).
pub const ENTRY_OFF_DURABLE_HINT: usize = 48;
/// Offset of the u32 content CRC.
pub const ENTRY_OFF_CONTENT_CRC: usize = 56;
/// Offset of the u32 header CRC over bytes `[0, 60)`.
pub const ENTRY_OFF_HEADER_CRC: usize = 60;

/// Entry kind: write `blocks` blocks of payload at `lba`.
pub const KIND_WRITE: u8 = 1;
/// Entry kind: zero `blocks` blocks at `lba`.
pub const KIND_TRIM: u8 = 2;
/// Entry kind: a no-op that consumes an LSN (for example to open an epoch).
pub const KIND_BARRIER: u8 = 3;
/// Entry kind: filler up to the end of the ring; consumes no LSN.
pub const KIND_PADDING: u8 = 0xFE;

// ---- Base chunk wire form -----------------------------------------------------------------

/// Magic of an encoded base chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"BVBC";
/// Size of a base chunk header.
pub const CHUNK_HEADER_SIZE: usize = 24;
/// Offset of the 4-byte magic.
pub const CHUNK_OFF_MAGIC: usize = 0;
/// Offset of the u32 block count.
pub const CHUNK_OFF_BLOCKS: usize = 4;
/// Offset of the u64 first block.
pub const CHUNK_OFF_LBA: usize = 8;
/// Offset of the u32 data length.
pub const CHUNK_OFF_DATA_LEN: usize = 16;
/// Offset of the u32 CRC over lba, blocks and data.
pub const CHUNK_OFF_CRC: usize = 20;

// ---- Little-endian helpers ----------------------------------------------------------------

pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Rounds `n` up to the entry alignment.
pub(crate) fn align_up(n: u64) -> u64 {
    n.div_ceil(ENTRY_ALIGN) * ENTRY_ALIGN
}

/// Bytes an entry with `payload_len` bytes of payload occupies in the ring.
pub fn entry_size(payload_len: u64) -> u64 {
    align_up(ENTRY_HEADER_SIZE as u64 + payload_len)
}

/// CRC32 identifying an entry's content, independent of block size and WAL placement:
/// kind (u8), lba (u64), `count` (u64: payload bytes for a write, blocks for a trim, zero for a
/// barrier), then the payload.
pub fn content_crc(kind: u8, lba: u64, count: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&lba.to_le_bytes());
    h.update(&count.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The `count` field of [`content_crc`] for a header.
pub(crate) fn header_count(h: &EntryHeader) -> u64 {
    if h.kind == KIND_WRITE {
        u64::from(h.payload_len)
    } else {
        u64::from(h.blocks)
    }
}

// ---- Superblock ---------------------------------------------------------------------------

/// The decoded contents of one superblock slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Format version (`MIN_FORMAT_VERSION..=FORMAT_VERSION`); 2 has extent checksums.
    pub version: u32,
    /// Flags (`SB_FLAG_*`).
    pub flags: u32,
    /// Sequence number; the newest valid slot wins.
    pub seq: u64,
    /// Random identity chosen at creation.
    pub volume_id: [u8; 16],
    /// Bytes per block.
    pub block_size: u32,
    /// Blocks in the extent.
    pub volume_blocks: u64,
    /// File offset of the WAL ring.
    pub wal_offset: u64,
    /// Size of the WAL ring.
    pub wal_size: u64,
    /// File offset of the extent.
    pub extent_offset: u64,
    /// WAL generation: only entries stamped with it are replayed.
    pub generation: u64,
    /// Every entry `<= checkpoint` is in the extent.
    pub checkpoint: u64,
    /// Last recycled LSN.
    pub tail_lsn: u64,
    /// Logical ring position where entry `tail_lsn + 1` starts.
    pub tail_pos: u64,
    /// Epoch of entry `tail_lsn`.
    pub tail_epoch: u64,
    /// Content CRC of entry `tail_lsn`.
    pub tail_crc: u32,
    /// Persisted role.
    pub role: Role,
    /// Persisted epoch.
    pub epoch: u64,
    /// Advisory head at the time of writing.
    pub head_hint: u64,
    /// Base LSN of an install in progress.
    pub install_lsn: u64,
    /// Epoch of the sender's entry at `install_lsn` (the image's identity, with the CRC).
    pub install_epoch: u64,
    /// Content CRC of the sender's entry at `install_lsn`.
    pub install_crc: u32,
    /// Blocks below this LBA hold the image durably (an interrupted install resumes here).
    pub install_resume: u64,
    /// An LSN known durable when the slot was written.
    pub durable_mark: u64,
    /// The extent may hold entries up to this LSN (0: no more than the checkpoint). When it is
    /// above the checkpoint, recovery redoes the flush of `(checkpoint, flush_mark]`.
    pub flush_mark: u64,
}

impl Superblock {
    /// Encodes the slot, including its CRC.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_SLOT_SIZE as usize];
        b[SB_OFF_MAGIC..SB_OFF_MAGIC + 8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, SB_OFF_VERSION, self.version);
        put_u32(&mut b, SB_OFF_FLAGS, self.flags);
        put_u64(&mut b, SB_OFF_SEQ, self.seq);
        b[SB_OFF_VOLUME_ID..SB_OFF_VOLUME_ID + 16].copy_from_slice(&self.volume_id);
        put_u32(&mut b, SB_OFF_BLOCK_SIZE, self.block_size);
        put_u64(&mut b, SB_OFF_VOLUME_BLOCKS, self.volume_blocks);
        put_u64(&mut b, SB_OFF_WAL_OFFSET, self.wal_offset);
        put_u64(&mut b, SB_OFF_WAL_SIZE, self.wal_size);
        put_u64(&mut b, SB_OFF_EXTENT_OFFSET, self.extent_offset);
        put_u64(&mut b, SB_OFF_GENERATION, self.generation);
        put_u64(&mut b, SB_OFF_CHECKPOINT, self.checkpoint);
        put_u64(&mut b, SB_OFF_TAIL_LSN, self.tail_lsn);
        put_u64(&mut b, SB_OFF_TAIL_POS, self.tail_pos);
        put_u64(&mut b, SB_OFF_TAIL_EPOCH, self.tail_epoch);
        put_u32(&mut b, SB_OFF_TAIL_CRC, self.tail_crc);
        put_u32(&mut b, SB_OFF_ROLE, self.role.code());
        put_u64(&mut b, SB_OFF_EPOCH, self.epoch);
        put_u64(&mut b, SB_OFF_HEAD_HINT, self.head_hint);
        put_u64(&mut b, SB_OFF_INSTALL_LSN, self.install_lsn);
        put_u64(&mut b, SB_OFF_DURABLE_MARK, self.durable_mark);
        put_u64(&mut b, SB_OFF_FLUSH_MARK, self.flush_mark);
        put_u64(&mut b, SB_OFF_INSTALL_EPOCH, self.install_epoch);
        put_u32(&mut b, SB_OFF_INSTALL_CRC, self.install_crc);
        put_u64(&mut b, SB_OFF_INSTALL_RESUME, self.install_resume);
        let crc = crc32fast::hash(&b[..SB_OFF_CRC]);
        put_u32(&mut b, SB_OFF_CRC, crc);
        b
    }

    /// Decodes and validates one slot. `offset` only labels errors.
    pub fn decode(buf: &[u8], offset: u64) -> Result<Superblock> {
        let bad = |detail: String| BlockVolError::Corrupt {
            region: "superblock",
            offset,
            lsn: None,
            detail,
        };
        if buf.len() != SB_SLOT_SIZE as usize {
            return Err(bad(format!(
                "slot is {} bytes, expected {SB_SLOT_SIZE}",
                buf.len()
            )));
        }
        if buf[SB_OFF_MAGIC..SB_OFF_MAGIC + 8] != SB_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let stored = get_u32(buf, SB_OFF_CRC);
        let computed = crc32fast::hash(&buf[..SB_OFF_CRC]);
        if stored != computed {
            return Err(bad(format!(
                "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let version = get_u32(buf, SB_OFF_VERSION);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(bad(format!("unsupported format version {version}")));
        }
        let flags = get_u32(buf, SB_OFF_FLAGS);
        if flags & !SB_KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let role_code = get_u32(buf, SB_OFF_ROLE);
        let role = Role::from_code(role_code)
            .ok_or_else(|| bad(format!("unknown role code {role_code}")))?;
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&buf[SB_OFF_VOLUME_ID..SB_OFF_VOLUME_ID + 16]);
        let sb = Superblock {
            version,
            flags,
            seq: get_u64(buf, SB_OFF_SEQ),
            volume_id,
            block_size: get_u32(buf, SB_OFF_BLOCK_SIZE),
            volume_blocks: get_u64(buf, SB_OFF_VOLUME_BLOCKS),
            wal_offset: get_u64(buf, SB_OFF_WAL_OFFSET),
            wal_size: get_u64(buf, SB_OFF_WAL_SIZE),
            extent_offset: get_u64(buf, SB_OFF_EXTENT_OFFSET),
            generation: get_u64(buf, SB_OFF_GENERATION),
            checkpoint: get_u64(buf, SB_OFF_CHECKPOINT),
            tail_lsn: get_u64(buf, SB_OFF_TAIL_LSN),
            tail_pos: get_u64(buf, SB_OFF_TAIL_POS),
            tail_epoch: get_u64(buf, SB_OFF_TAIL_EPOCH),
            tail_crc: get_u32(buf, SB_OFF_TAIL_CRC),
            role,
            epoch: get_u64(buf, SB_OFF_EPOCH),
            head_hint: get_u64(buf, SB_OFF_HEAD_HINT),
            install_lsn: get_u64(buf, SB_OFF_INSTALL_LSN),
            durable_mark: get_u64(buf, SB_OFF_DURABLE_MARK),
            flush_mark: get_u64(buf, SB_OFF_FLUSH_MARK),
            install_epoch: get_u64(buf, SB_OFF_INSTALL_EPOCH),
            install_crc: get_u32(buf, SB_OFF_INSTALL_CRC),
            install_resume: get_u64(buf, SB_OFF_INSTALL_RESUME),
        };
        if get_u32(buf, SB_OFF_INSTALL_PAD) != 0 {
            return Err(bad("nonzero padding after the install crc".into()));
        }
        if buf[SB_FIELDS_END..SB_OFF_CRC].iter().any(|b| *b != 0) {
            return Err(bad("nonzero bytes after the fields".into()));
        }
        sb.validate().map_err(bad)?;
        Ok(sb)
    }

    /// Structural checks that hold for every superblock this version writes.
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(format!("invalid block size {}", self.block_size));
        }
        if self.volume_blocks == 0 {
            return Err("volume has zero blocks".into());
        }
        if self.wal_offset != WAL_OFFSET {
            return Err(format!(
                "wal offset {} is not {WAL_OFFSET}",
                self.wal_offset
            ));
        }
        if self.wal_size < MIN_WAL_SIZE || !self.wal_size.is_multiple_of(WAL_SIZE_ALIGN) {
            return Err(format!("invalid wal size {}", self.wal_size));
        }
        if self.extent_offset
            != self
                .wal_offset
                .checked_add(self.wal_size)
                .ok_or("wal end overflows")?
        {
            return Err(format!(
                "extent offset {} is not wal offset + wal size",
                self.extent_offset
            ));
        }
        self.checked_file_len().ok_or("volume size overflows")?;
        if self.tail_lsn > self.checkpoint {
            return Err(format!(
                "tail lsn {} is beyond the checkpoint {}",
                self.tail_lsn, self.checkpoint
            ));
        }
        if !self.tail_pos.is_multiple_of(ENTRY_ALIGN) {
            return Err(format!("tail position {} is not aligned", self.tail_pos));
        }
        if self.durable_mark < self.checkpoint && self.durable_mark != 0 {
            return Err(format!(
                "durable mark {} is below the checkpoint {}",
                self.durable_mark, self.checkpoint
            ));
        }
        if self.flush_mark != 0
            && (self.flush_mark < self.checkpoint || self.flush_mark > self.durable_mark)
        {
            return Err(format!(
                "flush mark {} is outside [checkpoint {}, durable mark {}]",
                self.flush_mark, self.checkpoint, self.durable_mark
            ));
        }
        if self.generation == 0 {
            return Err("generation 0 is never written".into());
        }
        if self.flags & SB_FLAG_INSTALL_INCOMPLETE == 0
            && (
                self.install_lsn,
                self.install_epoch,
                self.install_crc,
                self.install_resume,
            ) != (0, 0, 0, 0)
        {
            return Err("install fields are set with no install in progress".into());
        }
        if self.install_resume > self.volume_blocks {
            return Err(format!(
                "install resume point {} is beyond the volume's {} blocks",
                self.install_resume, self.volume_blocks
            ));
        }
        for (name, v) in [
            ("seq", self.seq),
            ("generation", self.generation),
            ("checkpoint", self.checkpoint),
            ("tail lsn", self.tail_lsn),
            ("tail position", self.tail_pos),
            ("head hint", self.head_hint),
            ("install lsn", self.install_lsn),
            ("durable mark", self.durable_mark),
            ("flush mark", self.flush_mark),
        ] {
            if v >= SB_COUNTER_LIMIT {
                return Err(format!("{name} {v} is beyond the counter limit"));
            }
        }
        Ok(())
    }

    /// Whether the file has an extent checksum region (version 2 and later).
    pub fn has_checksums(&self) -> bool {
        self.version >= 2
    }

    /// File offset of the checksum region: the first `CSUM_REGION_ALIGN` boundary at or after
    /// the end of the extent (meaningful for version 2).
    pub fn csum_offset(&self) -> u64 {
        let end = self.extent_offset.saturating_add(
            self.volume_blocks
                .saturating_mul(u64::from(self.block_size)),
        );
        end.div_ceil(CSUM_REGION_ALIGN)
            .saturating_mul(CSUM_REGION_ALIGN)
    }

    /// Length of the checksum region (0 for version 1).
    pub fn csum_len(&self) -> u64 {
        if self.has_checksums() {
            csum_region_len(self.volume_blocks)
        } else {
            0
        }
    }

    fn checked_file_len(&self) -> Option<u64> {
        let end = self
            .volume_blocks
            .checked_mul(u64::from(self.block_size))?
            .checked_add(self.extent_offset)?;
        if !self.has_checksums() {
            return Some(end);
        }
        end.checked_next_multiple_of(CSUM_REGION_ALIGN)?
            .checked_add(self.volume_blocks.checked_mul(CSUM_SIZE)?)?
            .checked_next_multiple_of(CSUM_REGION_ALIGN)
    }

    /// Total file length this superblock describes: superblock slots, WAL, extent and (version
    /// 2) the checksum region.
    pub fn file_len(&self) -> u64 {
        self.checked_file_len().unwrap_or(u64::MAX)
    }
}

/// Bytes of the checksum region of a volume of `volume_blocks` blocks: `CSUM_SIZE` per block,
/// rounded up to `CSUM_REGION_ALIGN`.
pub fn csum_region_len(volume_blocks: u64) -> u64 {
    (volume_blocks.saturating_mul(CSUM_SIZE))
        .div_ceil(CSUM_REGION_ALIGN)
        .saturating_mul(CSUM_REGION_ALIGN)
}

/// The checksum stored for block `lba` holding `data`: XXH3-64 of the block seeded with the
/// LBA (so a block written to the wrong address fails), folded to 32 bits; never 0, which is
/// reserved for "the block is all zeros" (what a fresh, trimmed or zeroed block reads as, so a
/// new volume's zero-filled region needs no initialisation).
pub fn block_csum(lba: u64, data: &[u8]) -> u32 {
    // XXH3-64 (twox-hash picks its AVX2 or SSE2 form at run time; the value is the same).
    let h = twox_hash::XxHash3_64::oneshot_with_seed(lba, data);
    match (h ^ (h >> 32)) as u32 {
        0 => 1,
        c => c,
    }
}

/// Whether `data`, read from block `lba`, matches the stored checksum `stored`: 0 requires an
/// all-zero block, anything else must equal [`block_csum`]. `Err(computed)` on a mismatch.
pub fn verify_block(lba: u64, data: &[u8], stored: u32) -> std::result::Result<(), u32> {
    if stored == 0 {
        if is_zero(data) {
            return Ok(());
        }
        return Err(block_csum(lba, data));
    }
    let c = block_csum(lba, data);
    if c == stored { Ok(()) } else { Err(c) }
}

/// Whether every byte of `b` is zero (eight bytes at a time).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let body = words
        .by_ref()
        .all(|c| u64::from_ne_bytes(<[u8; 8]>::try_from(c).unwrap_or([1; 8])) == 0);
    body && words.remainder().iter().all(|x| *x == 0)
}

/// Which slot to use, given the decode results of slots A and B: the valid one with the
/// highest sequence number.
pub fn choose_superblock(
    a: &Result<Superblock>,
    b: &Result<Superblock>,
) -> Option<(usize, Superblock)> {
    match (a, b) {
        (Ok(x), Ok(y)) => {
            if y.seq > x.seq {
                Some((1, y.clone()))
            } else {
                Some((0, x.clone()))
            }
        }
        (Ok(x), Err(_)) => Some((0, x.clone())),
        (Err(_), Ok(y)) => Some((1, y.clone())),
        (Err(_), Err(_)) => None,
    }
}

// ---- Entry header -------------------------------------------------------------------------

/// A decoded entry header (the on-disk and the wire forms share this layout).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    /// `KIND_*`.
    pub kind: u8,
    /// WAL generation (zero on the wire).
    pub generation: u64,
    /// The entry's LSN (for padding: the LSN of the entry that follows it).
    pub lsn: u64,
    /// Epoch under which the entry was written.
    pub epoch: u64,
    /// First block.
    pub lba: u64,
    /// Block count.
    pub blocks: u32,
    /// Payload bytes following the header.
    pub payload_len: u32,
    /// Writer's durable LSN at append time (zero on the wire).
    pub durable_hint: u64,
    /// CRC of kind, lba, blocks and payload (zero for padding).
    pub content_crc: u32,
}

impl EntryHeader {
    /// Writes the header, with its CRC, into `out[..64]`.
    pub fn encode_into(&self, magic: [u8; 4], out: &mut [u8]) {
        let b = &mut out[..ENTRY_HEADER_SIZE];
        b[ENTRY_OFF_MAGIC..ENTRY_OFF_MAGIC + 4].copy_from_slice(&magic);
        b[ENTRY_OFF_KIND] = self.kind;
        b[ENTRY_OFF_FLAGS] = 0;
        b[ENTRY_OFF_RESERVED] = 0;
        b[ENTRY_OFF_RESERVED + 1] = 0;
        put_u64(b, ENTRY_OFF_GENERATION, self.generation);
        put_u64(b, ENTRY_OFF_LSN, self.lsn);
        put_u64(b, ENTRY_OFF_EPOCH, self.epoch);
        put_u64(b, ENTRY_OFF_LBA, self.lba);
        put_u32(b, ENTRY_OFF_BLOCKS, self.blocks);
        put_u32(b, ENTRY_OFF_PAYLOAD_LEN, self.payload_len);
        put_u64(b, ENTRY_OFF_DURABLE_HINT, self.durable_hint);
        put_u32(b, ENTRY_OFF_CONTENT_CRC, self.content_crc);
        let crc = crc32fast::hash(&b[..ENTRY_OFF_HEADER_CRC]);
        put_u32(b, ENTRY_OFF_HEADER_CRC, crc);
    }

    /// Decodes a header, checking the magic, the header CRC, the reserved bytes and the
    /// kind-specific shape (payload length versus block count). The payload is not checked.
    pub fn decode(buf: &[u8], magic: [u8; 4]) -> std::result::Result<EntryHeader, String> {
        if buf.len() < ENTRY_HEADER_SIZE {
            return Err(format!(
                "header needs {ENTRY_HEADER_SIZE} bytes, have {}",
                buf.len()
            ));
        }
        if buf[ENTRY_OFF_MAGIC..ENTRY_OFF_MAGIC + 4] != magic {
            return Err("bad magic".into());
        }
        let stored = get_u32(buf, ENTRY_OFF_HEADER_CRC);
        let computed = crc32fast::hash(&buf[..ENTRY_OFF_HEADER_CRC]);
        if stored != computed {
            return Err(format!(
                "header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        if buf[ENTRY_OFF_FLAGS] != 0
            || buf[ENTRY_OFF_RESERVED] != 0
            || buf[ENTRY_OFF_RESERVED + 1] != 0
        {
            return Err("nonzero flags or reserved bytes".into());
        }
        let h = EntryHeader {
            kind: buf[ENTRY_OFF_KIND],
            generation: get_u64(buf, ENTRY_OFF_GENERATION),
            lsn: get_u64(buf, ENTRY_OFF_LSN),
            epoch: get_u64(buf, ENTRY_OFF_EPOCH),
            lba: get_u64(buf, ENTRY_OFF_LBA),
            blocks: get_u32(buf, ENTRY_OFF_BLOCKS),
            payload_len: get_u32(buf, ENTRY_OFF_PAYLOAD_LEN),
            durable_hint: get_u64(buf, ENTRY_OFF_DURABLE_HINT),
            content_crc: get_u32(buf, ENTRY_OFF_CONTENT_CRC),
        };
        match h.kind {
            KIND_WRITE => {
                if h.blocks == 0 || h.payload_len == 0 || !h.payload_len.is_multiple_of(h.blocks) {
                    return Err(format!(
                        "write entry with {} blocks and {} payload bytes",
                        h.blocks, h.payload_len
                    ));
                }
            }
            KIND_TRIM => {
                if h.blocks == 0 || h.payload_len != 0 {
                    return Err(format!(
                        "trim entry with {} blocks and {} payload bytes",
                        h.blocks, h.payload_len
                    ));
                }
            }
            KIND_BARRIER => {
                if h.blocks != 0 || h.payload_len != 0 || h.lba != 0 {
                    return Err("barrier entry with a block range or payload".into());
                }
            }
            KIND_PADDING => {
                if h.blocks != 0 || h.lba != 0 || h.content_crc != 0 {
                    return Err("padding entry with a block range or content crc".into());
                }
            }
            k => return Err(format!("unknown entry kind {k:#04x}")),
        }
        if h.lba.checked_add(u64::from(h.blocks)).is_none() {
            return Err("block range overflows".into());
        }
        Ok(h)
    }
}
