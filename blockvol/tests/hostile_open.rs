//! `Volume::open` (and the read-only `inspect` behind `blockvol check`) on hostile bytes:
//! arbitrary files, a valid superblock over an arbitrary ring, superblock fields set to hostile
//! values *with a valid CRC*, and WAL entry headers rewritten with hostile fields and valid
//! CRCs (the stamp kept, so recovery really follows them). Every case opens or fails with a
//! typed error, never panics; a volume that opens is then driven through reads, writes, syncs,
//! flushes, scans, pins, truncation, close and reopen, which must not panic either.
//!
//! The checksums make random damage easy to detect (see `corruption_sweep.rs`); these cases
//! go past the checksums to the validation behind them.

mod common;

use std::sync::OnceLock;

use blockvol::format::{
    ENTRY_HEADER_SIZE, ENTRY_OFF_BLOCKS, ENTRY_OFF_CONTENT_CRC, ENTRY_OFF_DURABLE_HINT,
    ENTRY_OFF_EPOCH, ENTRY_OFF_FLAGS, ENTRY_OFF_GENERATION, ENTRY_OFF_HEADER_CRC, ENTRY_OFF_KIND,
    ENTRY_OFF_LBA, ENTRY_OFF_LSN, ENTRY_OFF_PAYLOAD_LEN, KIND_WRITE, SB_OFF_BLOCK_SIZE,
    SB_OFF_CHECKPOINT, SB_OFF_CRC, SB_OFF_DURABLE_MARK, SB_OFF_EPOCH, SB_OFF_EXTENT_OFFSET,
    SB_OFF_FLAGS, SB_OFF_GENERATION, SB_OFF_HEAD_HINT, SB_OFF_INSTALL_LSN, SB_OFF_RESERVED,
    SB_OFF_ROLE, SB_OFF_SEQ, SB_OFF_TAIL_CRC, SB_OFF_TAIL_EPOCH, SB_OFF_TAIL_LSN, SB_OFF_TAIL_POS,
    SB_OFF_VERSION, SB_OFF_VOLUME_BLOCKS, SB_OFF_WAL_OFFSET, SB_OFF_WAL_SIZE, SB_SLOT_SIZE,
    content_crc,
};
use blockvol::{BlockVolError, Lba, OpenOptions, RetentionPolicy, SimDisk, Volume};
use common::known::{Known, known_volume};
use common::manual;
use proptest::prelude::*;

fn known() -> &'static Known {
    static K: OnceLock<Known> = OnceLock::new();
    K.get_or_init(|| known_volume(true))
}

/// Errors a hostile file may legitimately produce.
fn acceptable(e: &BlockVolError) -> bool {
    matches!(
        e,
        BlockVolError::Corrupt { .. }
            | BlockVolError::NoValidSuperblock { .. }
            | BlockVolError::GeometryMismatch { .. }
            | BlockVolError::FileTooShort { .. }
            | BlockVolError::Io { .. }
            | BlockVolError::InvalidArgument(_)
            // A version field edited to 1: an older format, refused for a read-write open.
            | BlockVolError::NeedsUpgrade { version: 1, .. }
    )
}

/// Drives a volume that opened from hostile bytes through every kind of operation. Errors are
/// fine (they are typed by construction); panics are not.
fn exercise(v: Volume, disk: &SimDisk, opts: &OpenOptions) {
    let st = v.status();
    let g = v.geometry();
    let _ = v.digest();
    let _ = v.read(Lba(0), 1);
    let _ = v.read(Lba(g.volume_blocks.saturating_sub(1)), 1);
    let _ = v.entry_info(st.head);
    let _ = v.entry_info(st.tail);
    let _ = v.retained_gaps();
    if let Ok(scan) = v.scan_from(st.retained_start) {
        for e in scan.take(64) {
            if e.is_err() {
                break;
            }
        }
    }
    let _ = v.pin_wal(st.tail);
    let block = vec![0xA5u8; g.block_size as usize];
    let _ = v.write(Lba(0), &block);
    let _ = v.trim(Lba(g.volume_blocks.saturating_sub(1)), 1);
    let _ = v.barrier();
    let _ = v.sync();
    let _ = v.force_flush();
    v.set_retention(RetentionPolicy {
        keep_entries: 1,
        keep_bytes: 0,
    });
    let _ = v.truncate_after(v.status().checkpoint);
    let _ = v.write(Lba(0), &block);
    let _ = v.sync();
    let _ = v.close();
    if let Ok(v) = Volume::open_sim(disk, opts) {
        let _ = v.digest();
        let _ = v.close();
    }
}

/// Opens `img` on a simulated disk; exercises it when it opens.
fn open_image(img: Vec<u8>) -> Result<(), TestCaseError> {
    let disk = SimDisk::from_image(img);
    let opts = OpenOptions {
        wal_full_timeout: std::time::Duration::from_millis(1),
        ..manual()
    };
    match Volume::open_sim(&disk, &opts) {
        Ok(v) => exercise(v, &disk, &opts),
        Err(e) => prop_assert!(acceptable(&e), "untyped refusal: {e}"),
    }
    Ok(())
}

fn recrc_slot(img: &mut [u8], slot: usize) {
    let base = slot * SB_SLOT_SIZE as usize;
    let crc = crc32fast::hash(&img[base..base + SB_OFF_CRC]);
    img[base + SB_OFF_CRC..base + SB_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

fn recrc_header(img: &mut [u8], at: usize) {
    let crc = crc32fast::hash(&img[at..at + ENTRY_OFF_HEADER_CRC]);
    img[at + ENTRY_OFF_HEADER_CRC..at + ENTRY_OFF_HEADER_CRC + 4]
        .copy_from_slice(&crc.to_le_bytes());
}

fn put(img: &mut [u8], at: usize, size: usize, v: u64) {
    img[at..at + size].copy_from_slice(&v.to_le_bytes()[..size]);
}

fn get(img: &[u8], at: usize, size: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..size].copy_from_slice(&img[at..at + size]);
    u64::from_le_bytes(b)
}

/// Every superblock field: (offset, size).
const SB_FIELDS: [(usize, usize); 22] = [
    (SB_OFF_VERSION, 4),
    (SB_OFF_FLAGS, 4),
    (SB_OFF_SEQ, 8),
    (SB_OFF_BLOCK_SIZE, 4),
    (SB_OFF_RESERVED, 4),
    (SB_OFF_VOLUME_BLOCKS, 8),
    (SB_OFF_WAL_OFFSET, 8),
    (SB_OFF_WAL_SIZE, 8),
    (SB_OFF_EXTENT_OFFSET, 8),
    (SB_OFF_GENERATION, 8),
    (SB_OFF_CHECKPOINT, 8),
    (SB_OFF_TAIL_LSN, 8),
    (SB_OFF_TAIL_POS, 8),
    (SB_OFF_TAIL_EPOCH, 8),
    (SB_OFF_TAIL_CRC, 4),
    (SB_OFF_ROLE, 4),
    (SB_OFF_EPOCH, 8),
    (SB_OFF_HEAD_HINT, 8),
    (SB_OFF_INSTALL_LSN, 8),
    (SB_OFF_DURABLE_MARK, 8),
    // The volume id (two halves) changes the stamp: nothing in the ring matches any more.
    (24, 8),
    (32, 8),
];

/// Every entry header field after the magic: (offset, size).
const ENTRY_FIELDS: [(usize, usize); 10] = [
    (ENTRY_OFF_KIND, 1),
    (ENTRY_OFF_FLAGS, 1),
    (ENTRY_OFF_GENERATION, 8),
    (ENTRY_OFF_LSN, 8),
    (ENTRY_OFF_EPOCH, 8),
    (ENTRY_OFF_LBA, 8),
    (ENTRY_OFF_BLOCKS, 4),
    (ENTRY_OFF_PAYLOAD_LEN, 4),
    (ENTRY_OFF_DURABLE_HINT, 8),
    (ENTRY_OFF_CONTENT_CRC, 4),
];

/// A hostile value for a field holding `current`: edges, neighbours, powers of two, noise.
fn hostile_value() -> impl Strategy<Value = (u8, u64)> {
    (0u8..16, any::<u64>())
}

fn pick_value(choice: u8, noise: u64, current: u64) -> u64 {
    match choice {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX - 7,
        4 => u64::MAX / 2,
        5 => u64::from(u32::MAX),
        6 => current.wrapping_add(1),
        7 => current.wrapping_sub(1),
        8 => current.wrapping_add(8),
        9 => current.wrapping_mul(2),
        10 => 1 << (noise % 64),
        11 => current ^ (1 << (noise % 64)),
        12 => 4096,
        13 => 65536,
        _ => noise,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes as the whole medium, and as a real file through `Volume::open` and
    /// `inspect` (one in eight cases, the file system is slower).
    #[test]
    fn arbitrary_bytes_open_or_fail_typed(
        bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
        magic in any::<bool>(),
        on_file in 0u8..8,
    ) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            // Get past the magic check, at least.
            bytes[..8].copy_from_slice(b"BLKVOLSB");
        }
        open_image(bytes.clone())?;
        if on_file == 0 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("hostile.vol");
            std::fs::write(&path, &bytes).expect("write");
            if let Ok(ins) = blockvol::inspect::inspect(&path) {
                let _ = ins.is_corrupt();
            }
            match Volume::open(&path, &manual()) {
                Ok(v) => { let _ = v.digest(); let _ = v.close(); }
                Err(e) => prop_assert!(acceptable(&e), "untyped refusal: {e}"),
            }
        }
    }

    /// Both superblocks intact, the ring (or part of it) replaced by arbitrary bytes.
    #[test]
    fn valid_superblocks_over_an_arbitrary_ring(
        patches in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 1..600)), 1..12),
    ) {
        let k = known();
        let mut img = k.image.clone();
        let wal = 2 * SB_SLOT_SIZE;
        let span = k.extent_offset - wal;
        for (at, bytes) in patches {
            let o = (wal + at % span) as usize;
            let n = bytes.len().min(k.extent_offset as usize - o);
            img[o..o + n].copy_from_slice(&bytes[..n]);
        }
        open_image(img)?;
    }

    /// Superblock fields set to hostile values, the slot's CRC recomputed, in the newest slot
    /// or in both.
    #[test]
    fn superblock_fields_with_valid_crc(
        edits in proptest::collection::vec((0usize..SB_FIELDS.len(), hostile_value()), 1..4),
        both in any::<bool>(),
    ) {
        let k = known();
        let mut img = k.image.clone();
        let slots: Vec<usize> = if both { vec![0, 1] } else { vec![k.newest_slot] };
        for slot in slots {
            let base = slot * SB_SLOT_SIZE as usize;
            for &(f, (choice, noise)) in &edits {
                let (off, size) = SB_FIELDS[f];
                let cur = get(&img, base + off, size);
                put(&mut img, base + off, size, pick_value(choice, noise, cur));
            }
            recrc_slot(&mut img, slot);
        }
        open_image(img)?;
    }

    /// Retained entry headers rewritten with hostile fields and a valid header CRC (and, when
    /// asked, a content CRC matching the stored payload), the volume's stamp kept unless the
    /// stamp itself is the field.
    #[test]
    fn entry_headers_with_valid_crc(
        edits in proptest::collection::vec((any::<usize>(), 0usize..ENTRY_FIELDS.len(), hostile_value()), 1..4),
        fix_content in any::<bool>(),
    ) {
        let k = known();
        let mut img = k.image.clone();
        for (which, f, (choice, noise)) in edits {
            let e = k.entries[which % k.entries.len()];
            let at = e.header as usize;
            let (off, size) = ENTRY_FIELDS[f];
            let cur = get(&img, at + off, size);
            put(&mut img, at + off, size, pick_value(choice, noise, cur));
            if fix_content {
                let kind = img[at + ENTRY_OFF_KIND];
                let lba = get(&img, at + ENTRY_OFF_LBA, 8);
                let blocks = get(&img, at + ENTRY_OFF_BLOCKS, 4);
                let len = get(&img, at + ENTRY_OFF_PAYLOAD_LEN, 4) as usize;
                let p = at + ENTRY_HEADER_SIZE;
                let payload = &img[p.min(img.len())..(p + len).min(img.len())];
                let count = if kind == KIND_WRITE { len as u64 } else { blocks };
                let crc = content_crc(kind, lba, count, payload);
                put(&mut img, at + ENTRY_OFF_CONTENT_CRC, 4, u64::from(crc));
            }
            recrc_header(&mut img, at);
        }
        open_image(img)?;
    }
}

/// One table case: `Ok(true)` opened (and survived `exercise`), `Ok(false)` refused with a
/// typed error, `Err` a panic or an untyped refusal.
fn table_case(img: Vec<u8>) -> Result<bool, String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let disk = SimDisk::from_image(img);
        match Volume::open_sim(&disk, &manual()) {
            Ok(v) => {
                exercise(v, &disk, &manual());
                Ok(true)
            }
            Err(e) if acceptable(&e) => Ok(false),
            Err(e) => Err(format!("untyped refusal: {e}")),
        }
    }));
    match r {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

/// The hostile values the proptests draw, each applied alone to each superblock field of the
/// newest slot: a deterministic table so every edge is always covered.
#[test]
fn every_superblock_field_at_every_edge_value() {
    let k = known();
    let (mut opened, mut refused) = (0, 0);
    let mut failures = Vec::new();
    for (off, size) in SB_FIELDS {
        for choice in 0u8..16 {
            let mut img = k.image.clone();
            let base = k.newest_slot * SB_SLOT_SIZE as usize;
            let cur = get(&img, base + off, size);
            let v = pick_value(choice, 0x5DEE_CE66_D1CE_4E5B, cur);
            put(&mut img, base + off, size, v);
            // Both slots carry the edit so the fallback slot cannot hide it.
            let other = 1 - k.newest_slot;
            let obase = other * SB_SLOT_SIZE as usize;
            put(&mut img, obase + off, size, v);
            recrc_slot(&mut img, k.newest_slot);
            recrc_slot(&mut img, other);
            match table_case(img) {
                Ok(true) => opened += 1,
                Ok(false) => refused += 1,
                Err(why) => failures.push(format!("superblock field at {off} = {v:#x}: {why}")),
            }
        }
    }
    eprintln!("superblock edges: {opened} opened, {refused} refused");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same for every entry-header field of the first, a middle and the last retained entry.
#[test]
fn every_entry_header_field_at_every_edge_value() {
    let k = known();
    let picks = [0, k.entries.len() / 2, k.entries.len() - 1];
    let (mut opened, mut refused) = (0, 0);
    let mut failures = Vec::new();
    for &i in &picks {
        let at = k.entries[i].header as usize;
        for (off, size) in ENTRY_FIELDS {
            for choice in 0u8..16 {
                let mut img = k.image.clone();
                let cur = get(&img, at + off, size);
                let v = pick_value(choice, 0x1234_5678_9ABC_DEF1, cur);
                put(&mut img, at + off, size, v);
                recrc_header(&mut img, at);
                match table_case(img) {
                    Ok(true) => opened += 1,
                    Ok(false) => refused += 1,
                    Err(why) => failures.push(format!("entry {i} field at {off} = {v:#x}: {why}")),
                }
            }
        }
    }
    eprintln!("entry header edges: {opened} opened, {refused} refused");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Both slots carry `edit`, CRCs recomputed; opening must refuse with a typed error.
fn both_slots_edited_are_refused(edit: impl Fn(&mut [u8], usize)) -> BlockVolError {
    let k = known();
    let mut img = k.image.clone();
    for slot in 0..2 {
        edit(&mut img, slot * SB_SLOT_SIZE as usize);
        recrc_slot(&mut img, slot);
    }
    let disk = SimDisk::from_image(img);
    match Volume::open_sim(&disk, &manual()) {
        Ok(_) => panic!("a crafted superblock was accepted"),
        Err(e) => e,
    }
}

/// Regression: a superblock with `seq == u64::MAX` (valid CRC) decoded, and the first
/// superblock write of recovery overflowed `seq + 1` (a panic in debug builds, a wrapped seq
/// that loses the slot race in release). Now refused by validation (`SB_COUNTER_LIMIT`).
#[test]
fn regression_superblock_seq_at_u64_max_is_refused() {
    let e = both_slots_edited_are_refused(|img, base| put(img, base + SB_OFF_SEQ, 8, u64::MAX));
    assert!(matches!(e, BlockVolError::NoValidSuperblock { .. }), "{e}");
}

/// Regression: a superblock with `tail_pos` near `u64::MAX` (8-aligned, valid CRC) decoded,
/// and the recovery walk overflowed `tail_pos + wal_size`. Now refused by validation.
#[test]
fn regression_superblock_tail_pos_near_u64_max_is_refused() {
    let e = both_slots_edited_are_refused(|img, base| {
        put(img, base + SB_OFF_TAIL_POS, 8, u64::MAX - 7)
    });
    assert!(matches!(e, BlockVolError::NoValidSuperblock { .. }), "{e}");
}

/// Regression: tail, checkpoint and durable mark all at `u64::MAX` pass the ordering checks,
/// and the recovery walk overflowed `tail_lsn + 1`. Now refused by validation.
#[test]
fn regression_superblock_lsns_at_u64_max_are_refused() {
    let e = both_slots_edited_are_refused(|img, base| {
        for off in [
            SB_OFF_TAIL_LSN,
            SB_OFF_CHECKPOINT,
            SB_OFF_DURABLE_MARK,
            SB_OFF_HEAD_HINT,
        ] {
            put(img, base + off, 8, u64::MAX);
        }
    });
    assert!(matches!(e, BlockVolError::NoValidSuperblock { .. }), "{e}");
    // Just below the limit still opens (or is refused as corrupt WAL), without a panic.
    let k = known();
    let mut img = k.image.clone();
    for slot in 0..2 {
        let base = slot * SB_SLOT_SIZE as usize;
        for off in [SB_OFF_TAIL_LSN, SB_OFF_CHECKPOINT, SB_OFF_DURABLE_MARK] {
            put(
                &mut img,
                base + off,
                8,
                blockvol::format::SB_COUNTER_LIMIT - 1,
            );
        }
        recrc_slot(&mut img, slot);
    }
    assert!(table_case(img).is_ok());
}
