//! The recovery walk over the WAL ring, shared by `Volume::open` and the read-only inspection
//! used by the command line.
//!
//! The walk starts at the persisted tail position expecting `tail_lsn + 1` and follows entries
//! while the stamp (the WAL generation salted with the volume id) matches, both CRCs pass and
//! each LSN is exactly the expected one. The first failure ends the log. Then the rest of the
//! ring is searched for headers of this generation with a higher LSN: such a header whose
//! durable hint is at least the failed LSN proves that the failed entry had been synced, so the
//! failure is corruption rather than a torn tail.

use std::collections::VecDeque;
use std::io;

use crate::format::{
    ENTRY_ALIGN, ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, KIND_PADDING, KIND_WRITE,
    content_crc, entry_size, header_count,
};

/// One retained entry, as the in-memory LSN index holds it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Logical position where this entry's slot starts (including any skip or padding before
    /// the header); equals the previous entry's `end`.
    pub start: u64,
    /// Logical position of the header.
    pub pos: u64,
    /// Logical position just past the entry.
    pub end: u64,
    pub lsn: u64,
    pub kind: u8,
    pub lba: u64,
    pub blocks: u32,
    pub payload_len: u32,
    pub epoch: u64,
    pub content_crc: u32,
}

/// The stamp entries carry: the generation salted with the volume id, so headers copied from
/// another volume (for example a volume image stored inside this one) never match.
pub(crate) fn wal_stamp(volume_id: &[u8; 16], generation: u64) -> u64 {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(volume_id);
    b[16..].copy_from_slice(&generation.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&b)
}

/// Inputs of a walk.
pub(crate) struct WalkParams {
    pub wal_size: u64,
    pub stamp: u64,
    pub tail_lsn: u64,
    pub tail_pos: u64,
    pub block_size: u32,
    pub volume_blocks: u64,
}

/// A same-stamp header found beyond the end of the log.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Leftover {
    pub pos: u64,
    pub lsn: u64,
    pub durable_hint: u64,
}

/// What a walk found.
pub(crate) struct WalkResult {
    pub entries: VecDeque<IndexEntry>,
    /// Last LSN recovered (the tail LSN when nothing is).
    pub head: u64,
    /// Logical position just past the last recovered entry.
    pub head_pos: u64,
    /// Logical position where the walk stopped.
    pub end_pos: u64,
    /// Why the walk stopped.
    pub end_detail: String,
    /// Same-stamp headers with `lsn >= head + 1` beyond the end.
    pub leftovers: Vec<Leftover>,
    /// A leftover proving that entry `head + 1` had been synced, if any.
    pub evidence: Option<Leftover>,
}

/// Reads `buf.len()` bytes at a physical WAL offset.
pub(crate) type WalReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>;

/// Walks the ring. I/O errors are returned; everything else ends the log.
pub(crate) fn walk(p: &WalkParams, read: WalReader<'_>) -> io::Result<WalkResult> {
    let w = p.wal_size;
    let limit = p.tail_pos + w;
    let mut pos = p.tail_pos;
    let mut head_pos = p.tail_pos;
    let mut expected = p.tail_lsn + 1;
    let mut entries = VecDeque::new();
    let mut hdr = [0u8; ENTRY_HEADER_SIZE];
    let mut payload = Vec::new();
    let header = ENTRY_HEADER_SIZE as u64;
    let end_detail = loop {
        let phys = pos % w;
        let rem = w - phys;
        if rem < header {
            // Too little room for a header before the ring end: the writer skipped it.
            if pos + rem >= limit {
                break "ring exhausted".to_string();
            }
            pos += rem;
            continue;
        }
        if pos + header > limit {
            break "ring exhausted".to_string();
        }
        read(phys, &mut hdr)?;
        let h = match EntryHeader::decode(&hdr, ENTRY_MAGIC_DISK) {
            Ok(h) => h,
            Err(d) => break format!("no valid header at lsn {expected}: {d}"),
        };
        if h.generation != p.stamp {
            break format!("header of another generation where lsn {expected} was expected");
        }
        if h.lsn != expected {
            break format!("found lsn {} where lsn {expected} was expected", h.lsn);
        }
        if h.kind == KIND_PADDING {
            if u64::from(h.payload_len) + header != rem || pos + rem > limit {
                break format!("padding before lsn {expected} does not reach the ring end");
            }
            pos += rem;
            continue;
        }
        let size = entry_size(u64::from(h.payload_len));
        if size > rem || size > w / 2 || pos + size > limit {
            break format!("entry {expected} of {size} bytes does not fit the ring");
        }
        let blocks_end = h.lba.checked_add(u64::from(h.blocks));
        if blocks_end.is_none_or(|e| e > p.volume_blocks) {
            break format!("entry {expected} addresses blocks beyond the volume");
        }
        if h.kind == KIND_WRITE
            && u64::from(h.payload_len) != u64::from(h.blocks) * u64::from(p.block_size)
        {
            break format!("entry {expected} payload length does not match its block count");
        }
        payload.resize(h.payload_len as usize, 0);
        if !payload.is_empty() {
            read(phys + header, &mut payload)?;
        }
        let crc = content_crc(h.kind, h.lba, header_count(&h), &payload);
        if crc != h.content_crc {
            break format!("entry {expected} content checksum mismatch");
        }
        entries.push_back(IndexEntry {
            start: head_pos,
            pos,
            end: pos + size,
            lsn: h.lsn,
            kind: h.kind,
            lba: h.lba,
            blocks: h.blocks,
            payload_len: h.payload_len,
            epoch: h.epoch,
            content_crc: h.content_crc,
        });
        expected += 1;
        pos += size;
        head_pos = pos;
    };
    // From the end of the last accepted entry, not from where the walk stopped: a padding
    // header (or a skipped ring end) the walk followed before failing carries the expected LSN
    // too, and is a leftover to neutralize like any other.
    let leftovers = find_leftovers(p, read, head_pos, limit, expected)?;
    let evidence = leftovers
        .iter()
        .copied()
        .filter(|l| l.durable_hint >= expected)
        .min_by_key(|l| l.lsn);
    Ok(WalkResult {
        entries,
        head: expected - 1,
        head_pos,
        end_pos: pos,
        end_detail,
        leftovers,
        evidence,
    })
}

/// Searches `[from, limit)` (logical) for same-stamp headers with `lsn >= expected`.
fn find_leftovers(
    p: &WalkParams,
    read: WalReader<'_>,
    from: u64,
    limit: u64,
    expected: u64,
) -> io::Result<Vec<Leftover>> {
    const CHUNK: u64 = 1 << 20;
    let w = p.wal_size;
    let header = ENTRY_HEADER_SIZE as u64;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut seg_start = from;
    while seg_start < limit {
        // One physical segment: up to the ring end or the limit.
        let phys = seg_start % w;
        let seg_len = (w - phys).min(limit - seg_start);
        let mut off = 0u64;
        while off < seg_len {
            let n = (seg_len - off).min(CHUNK + header).min(seg_len - off);
            buf.resize(n as usize, 0);
            read(phys + off, &mut buf)?;
            let mut i = 0u64;
            while i < n.min(CHUNK) {
                if i + header <= n
                    && buf[i as usize..i as usize + 4] == ENTRY_MAGIC_DISK
                    && let Ok(h) = EntryHeader::decode(
                        &buf[i as usize..(i + header) as usize],
                        ENTRY_MAGIC_DISK,
                    )
                    && h.generation == p.stamp
                    && h.lsn >= expected
                {
                    out.push(Leftover {
                        pos: seg_start + off + i,
                        lsn: h.lsn,
                        durable_hint: h.durable_hint,
                    });
                }
                i += ENTRY_ALIGN;
            }
            off += n.min(CHUNK);
        }
        seg_start += seg_len;
    }
    Ok(out)
}
