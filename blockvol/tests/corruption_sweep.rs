//! The corruption sweep: a valid volume with known contents, one byte flipped at *every* offset
//! of its file (both superblock slots, WAL headers, payloads, padding, recycled ring bytes, the
//! extent, the checksum region), each copy opened and read in full. The flip mask varies with
//! the offset (one bit, all bits, a pseudo-random byte).
//! Never a panic, never wrong data with success. The exact rule per region:
//!
//! **Cleanly closed volume** (every entry synced; the superblock's durable mark is the head):
//!
//! | region | rule |
//! |---|---|
//! | superblock slot A or B, any byte (fields, zero fill, CRC) | opens; reads return exactly the original data (the damaged slot fails its CRC and the other slot leads to the same state) |
//! | retained WAL entry header (64 bytes) | `Corrupt { region: "wal" }` (the header CRC fails and the log would end below the durable mark) |
//! | retained WAL entry payload | `Corrupt { region: "wal" }` (the content CRC fails) |
//! | alignment fill after a payload | opens; exact original data (not checksummed, never read; with 512-byte blocks every entry is 8-aligned already, so this volume has none) |
//! | padding header | `Corrupt { region: "wal" }` |
//! | padding body, skipped ring end | opens; exact original data (ignored by design) |
//! | WAL bytes outside the retained range (recycled laps, never written) | opens; exact original data |
//! | extent block whose newest version is in the WAL | opens; exact original data (the WAL copy is read) |
//! | other extent bytes | opens, and the read fails with `ChecksumMismatch` naming exactly that block, counted in `checksum_errors` (docs/format.md 5.1) |
//! | checksum of a block whose newest version is in the WAL | opens; exact original data (the extent copy and its checksum are not read) |
//! | other checksum bytes | as other extent bytes: `ChecksumMismatch` naming the block the checksum belongs to |
//! | checksum region zero fill (after the last block's checksum) | opens; exact original data (never read) |
//!
//! **Volume left by a process crash** (the last entries synced one by one, the final two
//! unsynced, the superblock's durable mark behind): a typed error, or a prefix state whose head
//! is at least the last acknowledged LSN and whose contents equal the model at that head. An
//! entry after the last durability proof (the last two here) may be dropped as a torn tail when
//! damaged: that is docs/format.md 12's documented limit, and the sweep checks it is the *only*
//! way the head goes down (the damage lies inside entry head + 1).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use blockvol::format::{ENTRY_HEADER_SIZE, SB_FIELDS_END, SB_OFF_CRC, SB_SLOT_SIZE};
use blockvol::{BlockVolError, Digest, SimDisk, Volume};
use common::known::{Known, known_volume};
use common::manual;

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Region {
    SbFields,
    SbZeroFill,
    SbCrc,
    WalHeader,
    WalPayload,
    WalAlignFill,
    PaddingHeader,
    PaddingBody,
    RingEndSkip,
    WalOutsideRetained,
    ExtentShadowed,
    Extent,
    CsumShadowed,
    Csum,
    CsumFill,
}

fn classify(k: &Known, off: u64) -> Region {
    if off < 2 * SB_SLOT_SIZE {
        let o = (off % SB_SLOT_SIZE) as usize;
        return if o < SB_FIELDS_END {
            Region::SbFields
        } else if o < SB_OFF_CRC {
            Region::SbZeroFill
        } else {
            Region::SbCrc
        };
    }
    if off >= k.csum_used_end() {
        return Region::CsumFill;
    }
    if off >= k.csum_offset {
        return if k.shadowed[k.csum_lba_of(off) as usize] {
            Region::CsumShadowed
        } else {
            Region::Csum
        };
    }
    if off >= k.extent_offset {
        assert!(
            off < k.extent_end(),
            "no gap between extent and checksums here"
        );
        return if k.shadowed[k.lba_of(off) as usize] {
            Region::ExtentShadowed
        } else {
            Region::Extent
        };
    }
    for e in &k.entries {
        if off >= e.header && off < e.header + e.size {
            let rel = off - e.header;
            return if rel < ENTRY_HEADER_SIZE as u64 {
                Region::WalHeader
            } else if rel < ENTRY_HEADER_SIZE as u64 + e.payload_len {
                Region::WalPayload
            } else {
                Region::WalAlignFill
            };
        }
    }
    for f in &k.fills {
        if off >= f.start && off < k.wal_end() {
            return if !f.has_header {
                Region::RingEndSkip
            } else if off < f.start + ENTRY_HEADER_SIZE as u64 {
                Region::PaddingHeader
            } else {
                Region::PaddingBody
            };
        }
    }
    Region::WalOutsideRetained
}

/// The offsets to damage: every byte of the file (a small volume makes this affordable).
fn offsets(k: &Known) -> Vec<u64> {
    (0..k.file_len).collect()
}

/// What one damaged copy did.
enum Outcome {
    /// Opened; the recovered head and the digest of everything read.
    Opened { head: u64, digest: Digest },
    /// A typed error, and the volume's `checksum_errors` afterwards (0 when the open failed).
    Refused(BlockVolError, u64),
}

fn open_and_read(img: Vec<u8>) -> Outcome {
    let disk = SimDisk::from_image(img);
    match Volume::open_sim(&disk, &manual()) {
        Ok(v) => {
            let head = v.status().head.0;
            match v.digest() {
                Ok(digest) => Outcome::Opened { head, digest },
                Err(e) => Outcome::Refused(e, v.status().checksum_errors),
            }
        }
        Err(e) => Outcome::Refused(e, 0),
    }
}

fn is_typed_corruption(e: &BlockVolError) -> bool {
    matches!(
        e,
        BlockVolError::Corrupt { .. }
            | BlockVolError::NoValidSuperblock { .. }
            | BlockVolError::ChecksumMismatch { .. }
    )
}

/// The block whose data or checksum holds file offset `off`, for the checksummed regions.
fn block_of(k: &Known, off: u64) -> Option<u64> {
    match classify(k, off) {
        Region::Extent => Some(k.lba_of(off)),
        Region::Csum => Some(k.csum_lba_of(off)),
        _ => None,
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    tried: u64,
    refused: u64,
    exact: u64,
    shorter_prefix: u64,
}

fn flip_mask(off: u64) -> u8 {
    match off % 3 {
        0 => 1 << (off % 8),
        1 => 0xFF,
        _ => ((off.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) | 1,
    }
}

fn report(name: &str, tallies: &std::collections::BTreeMap<Region, Tally>) -> u64 {
    let mut total = 0;
    eprintln!("corruption sweep ({name}): region, offsets tried, refused, exact, shorter prefix");
    for (r, t) in tallies {
        eprintln!(
            "  {r:?}: {} tried, {} refused, {} exact, {} shorter prefix",
            t.tried, t.refused, t.exact, t.shorter_prefix
        );
        total += t.tried;
    }
    eprintln!("  total: {total} offsets");
    total
}

#[test]
fn every_flipped_byte_of_a_closed_volume_is_refused_or_reads_exactly() {
    let k = known_volume(true);
    assert_eq!(
        k.durable_mark, k.head,
        "a clean close marks everything durable"
    );
    assert!(!k.fills.is_empty(), "the known volume must contain padding");
    assert!(
        k.checkpoint > k.tail,
        "entries at or below the checkpoint stay retained"
    );
    assert!(k.shadowed.iter().any(|s| *s) && k.shadowed.iter().any(|s| !*s));
    let mut tallies = std::collections::BTreeMap::<Region, Tally>::new();
    let mut failures = Vec::new();
    for off in offsets(&k) {
        let region = classify(&k, off);
        let mask = flip_mask(off);
        let mut img = k.image.clone();
        img[off as usize] ^= mask;
        let t = tallies.entry(region).or_default();
        t.tried += 1;
        let outcome = match catch_unwind(AssertUnwindSafe(|| open_and_read(img))) {
            Ok(o) => o,
            Err(_) => {
                failures.push(format!("offset {off} ({region:?}): panic"));
                continue;
            }
        };
        let verdict: Result<(), String> = match (&outcome, region) {
            (Outcome::Refused(e, _), _) if !is_typed_corruption(e) => {
                Err(format!("refused with an unexpected error: {e}"))
            }
            (
                Outcome::Refused(BlockVolError::Corrupt { region: "wal", .. }, _),
                Region::WalHeader | Region::WalPayload | Region::PaddingHeader,
            ) => {
                t.refused += 1;
                Ok(())
            }
            (
                Outcome::Refused(BlockVolError::ChecksumMismatch { lba, .. }, counted),
                Region::Extent | Region::Csum,
            ) => {
                if Some(lba.0) != block_of(&k, off) {
                    Err(format!(
                        "the mismatch names lba {lba}, not the damaged block"
                    ))
                } else if *counted != 1 {
                    Err(format!("checksum_errors is {counted}, expected 1"))
                } else {
                    t.refused += 1;
                    Ok(())
                }
            }
            (Outcome::Refused(e, _), _) => Err(format!("refused although it must open: {e}")),
            (
                Outcome::Opened { .. },
                Region::WalHeader | Region::WalPayload | Region::PaddingHeader,
            ) => Err("damage to a synced entry went undetected".into()),
            (Outcome::Opened { digest, .. }, Region::Extent | Region::Csum) => Err(format!(
                "damage to a flushed block or its checksum went undetected ({} data)",
                if *digest == k.digest {
                    "the original"
                } else {
                    "WRONG"
                }
            )),
            (Outcome::Opened { head, digest }, _) => {
                if *head == k.head && *digest == k.digest {
                    t.exact += 1;
                    Ok(())
                } else {
                    Err(format!(
                        "opened with head {head} (expected {}) and {} data",
                        k.head,
                        if *digest == k.digest {
                            "the original"
                        } else {
                            "WRONG"
                        }
                    ))
                }
            }
        };
        if let Err(why) = verdict {
            failures.push(format!("offset {off} ({region:?}, xor {mask:#04x}): {why}"));
        }
    }
    let total = report("closed", &tallies);
    assert!(
        failures.is_empty(),
        "{} of {total} damaged copies broke the rules:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert!(total > 5000, "only {total} offsets were tried");
    for r in [
        Region::SbFields,
        Region::SbZeroFill,
        Region::SbCrc,
        Region::WalHeader,
        Region::WalPayload,
        Region::PaddingHeader,
        Region::PaddingBody,
        Region::WalOutsideRetained,
        Region::ExtentShadowed,
        Region::Extent,
        Region::CsumShadowed,
        Region::Csum,
        Region::CsumFill,
    ] {
        assert!(
            tallies.get(&r).is_some_and(|t| t.tried > 0),
            "region {r:?} was never damaged"
        );
    }
}

#[test]
fn every_flipped_byte_of_a_crashed_volume_is_refused_or_a_prefix_keeping_acknowledged() {
    let k = known_volume(false);
    // The workload synced everything but the last two entries.
    let acked = k.head - 2;
    assert!(k.durable_mark < k.head);
    let mut tallies = std::collections::BTreeMap::<Region, Tally>::new();
    let mut failures = Vec::new();
    for off in offsets(&k) {
        let region = classify(&k, off);
        let mask = flip_mask(off);
        let mut img = k.image.clone();
        img[off as usize] ^= mask;
        let t = tallies.entry(region).or_default();
        t.tried += 1;
        let outcome = match catch_unwind(AssertUnwindSafe(|| open_and_read(img))) {
            Ok(o) => o,
            Err(_) => {
                failures.push(format!("offset {off} ({region:?}): panic"));
                continue;
            }
        };
        let verdict: Result<(), String> = match &outcome {
            Outcome::Refused(e, _) if is_typed_corruption(e) => {
                t.refused += 1;
                Ok(())
            }
            Outcome::Refused(e, _) => Err(format!("unexpected error: {e}")),
            Outcome::Opened { head, digest } => {
                let model = common::Model::at(&k.opts, &k.ops, *head);
                let inside_next = k
                    .entries
                    .iter()
                    .find(|e| e.lsn == head + 1)
                    .is_some_and(|e| off >= e.header && off < e.header + e.size);
                if *head < acked {
                    Err(format!("head {head} lost acknowledged lsn {acked}"))
                } else if *digest != model.digest() {
                    Err(format!("contents are not the state at lsn {head}"))
                } else if *head < k.head && !inside_next {
                    Err(format!(
                        "head {head} below {} although entry {} is intact",
                        k.head,
                        head + 1
                    ))
                } else {
                    if *head < k.head {
                        t.shorter_prefix += 1;
                    } else {
                        t.exact += 1;
                    }
                    Ok(())
                }
            }
        };
        if let Err(why) = verdict {
            failures.push(format!("offset {off} ({region:?}, xor {mask:#04x}): {why}"));
        }
    }
    let total = report("crashed", &tallies);
    assert!(
        failures.is_empty(),
        "{} of {total} damaged copies broke the rules:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert!(total > 5000, "only {total} offsets were tried");
    for r in [Region::Extent, Region::Csum] {
        assert!(
            tallies.get(&r).is_some_and(|t| t.refused > 0),
            "damage to {r:?} was never refused"
        );
    }
}

/// Media errors come in sectors: each 512-byte sector of the closed volume zeroed, then filled
/// with 0xFF. The same rules, applied to every byte of the sector: a sector changing a
/// retained entry header or payload, or a padding header, must be refused as corrupt; one
/// changing a flushed block (not shadowed by the WAL) or its checksum must fail the read with
/// `ChecksumMismatch` naming such a block; otherwise the volume opens and reads exactly the
/// original data.
#[test]
fn every_damaged_sector_of_a_closed_volume_is_refused_or_reads_exactly() {
    let k = known_volume(true);
    let mut failures = Vec::new();
    let (mut tried, mut refused) = (0u64, 0u64);
    for sector in 0..k.file_len / 512 {
        for fill in [0x00u8, 0xFF] {
            let (a, b) = (sector * 512, (sector + 1) * 512);
            let mut img = k.image.clone();
            img[a as usize..b as usize].fill(fill);
            if img == k.image {
                continue;
            }
            tried += 1;
            let changed: Vec<u64> = (a..b)
                .filter(|o| img[*o as usize] != k.image[*o as usize])
                .collect();
            let must_refuse = changed.iter().any(|o| {
                matches!(
                    classify(&k, *o),
                    Region::WalHeader | Region::WalPayload | Region::PaddingHeader
                )
            });
            let damaged: Vec<u64> = changed.iter().filter_map(|o| block_of(&k, *o)).collect();
            let what = format!("sector {sector} filled with {fill:#04x}");
            match catch_unwind(AssertUnwindSafe(|| open_and_read(img))) {
                Err(_) => failures.push(format!("{what}: panic")),
                Ok(Outcome::Refused(e, _)) if must_refuse && is_typed_corruption(&e) => {
                    refused += 1
                }
                Ok(Outcome::Refused(BlockVolError::ChecksumMismatch { lba, .. }, counted))
                    if damaged.contains(&lba.0) && counted >= 1 =>
                {
                    refused += 1
                }
                Ok(Outcome::Refused(e, _)) => failures.push(format!("{what}: refused: {e}")),
                Ok(Outcome::Opened { .. }) if must_refuse || !damaged.is_empty() => {
                    failures.push(format!("{what}: the damage went undetected"))
                }
                Ok(Outcome::Opened { head, digest }) => {
                    if head != k.head || digest != k.digest {
                        failures.push(format!("{what}: opened with head {head} and wrong data"));
                    }
                }
            }
        }
    }
    eprintln!(
        "corruption sweep (sectors): {tried} damaged sectors, {refused} refused, the rest read exactly"
    );
    assert!(
        failures.is_empty(),
        "{} damaged sectors broke the rules:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert!(tried > 300);
}

/// A sample of the sweep through real files: `Volume::open` agrees with the simulated disk,
/// and the command line's check (`inspect`) reports WAL corruption exactly when open refuses
/// with it, and a damaged superblock slot whenever one is.
#[test]
fn real_file_opens_and_the_check_agree_with_the_sweep() {
    let k = known_volume(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tried = 0;
    for off in (0..k.file_len).step_by(661) {
        let mask = flip_mask(off);
        let mut img = k.image.clone();
        img[off as usize] ^= mask;
        let path = dir.path().join(format!("damaged-{off}.vol"));
        std::fs::write(&path, &img).expect("write copy");
        let sim = open_and_read(img);
        let ins = blockvol::inspect::inspect(&path).expect("inspect");
        let wal_corrupt = ins.wal.as_ref().is_some_and(|w| w.corruption.is_some());
        let slot_damaged = ins.slots.iter().any(|s| s.result.is_err());
        let what = format!("offset {off} ({:?})", classify(&k, off));
        // The command line's check scrubs the extent through a read-only open: it must find
        // exactly the block the read refuses.
        let scrubbed = Volume::open_read_only(&path)
            .and_then(|v| v.scrub_range(blockvol::Lba(0), k.volume_blocks()))
            .ok();
        let sim = match sim {
            Outcome::Refused(BlockVolError::ChecksumMismatch { lba, .. }, _) => {
                assert_eq!(
                    scrubbed.map(|r| r.damaged),
                    Some(vec![lba]),
                    "{what}: the scrub disagrees with the read"
                );
                // Opens, then the read fails the same way.
                let v = Volume::open(&path, &manual()).expect("open");
                assert!(
                    matches!(
                        v.digest(),
                        Err(BlockVolError::ChecksumMismatch { lba: l, .. }) if l == lba
                    ),
                    "{what}: the file reads differently from the simulated disk"
                );
                assert_eq!(v.status().checksum_errors, 1, "{what}");
                drop(v);
                std::fs::remove_file(&path).expect("remove copy");
                tried += 1;
                continue;
            }
            other => other,
        };
        if let Some(r) = &scrubbed {
            assert!(r.damaged.is_empty(), "{what}: the scrub reports {r:?}");
        }
        match Volume::open(&path, &manual()) {
            Ok(v) => {
                let Outcome::Opened { head, digest } = sim else {
                    panic!("{what}: the file opened, the simulated disk refused");
                };
                assert_eq!(
                    (v.status().head.0, v.digest().expect("digest")),
                    (head, digest)
                );
                assert!(
                    !wal_corrupt,
                    "{what}: check reports WAL corruption, open does not"
                );
                assert_eq!(
                    slot_damaged,
                    off < 2 * SB_SLOT_SIZE,
                    "{what}: check misreports the superblock slots"
                );
            }
            Err(e) => {
                assert!(
                    matches!(sim, Outcome::Refused(..)),
                    "{what}: the file refused ({e}), the simulated disk opened"
                );
                assert!(
                    wal_corrupt && ins.is_corrupt(),
                    "{what}: open refused ({e}) but check passes"
                );
            }
        }
        std::fs::remove_file(&path).expect("remove copy");
        tried += 1;
    }
    eprintln!(
        "corruption sweep (real files): {tried} offsets agree between open, the simulated disk and check"
    );
    assert!(tried > 150);
}
