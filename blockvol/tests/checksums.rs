//! Extent checksums (format version 2, docs/format.md 5.1): reads, base image readers and
//! scrubs refuse damaged blocks with a typed error and a counter; rewriting a block heals it;
//! version 1 files open read-only only and `upgrade` converts them, crash-safely.

mod common;

use std::sync::{Arc, Mutex};

use blockvol::format::{CSUM_SIZE, FORMAT_VERSION, SB_SLOT_SIZE, Superblock, block_csum};
use blockvol::{
    BlockVolError, CrashMode, Lba, Lsn, RepairOutcome, SimDisk, SyncPoint, UpgradeOutcome, Volume,
    upgrade_file,
};
use common::cli::{run, s, stderr, stdout};
use common::{Model, Op, as_version_1, assert_scrub_clean, data, manual, small, tiny};

/// The newest valid superblock of an image.
fn superblock(img: &[u8]) -> Superblock {
    let a = Superblock::decode(&img[..SB_SLOT_SIZE as usize], 0);
    let b = Superblock::decode(
        &img[SB_SLOT_SIZE as usize..2 * SB_SLOT_SIZE as usize],
        SB_SLOT_SIZE,
    );
    blockvol::format::choose_superblock(&a, &b)
        .expect("a valid superblock")
        .1
}

/// A sim volume with every block of `lbas` written and flushed.
fn flushed(lbas: &[u64]) -> (Volume, SimDisk) {
    let o = tiny();
    let (v, d) = Volume::create_sim(&o, &manual()).expect("create");
    for &l in lbas {
        v.write(Lba(l), &data(900 + l, 1, o.block_size))
            .expect("write");
    }
    v.force_flush().expect("flush");
    (v, d)
}

#[test]
fn a_damaged_block_fails_the_read_is_counted_and_a_rewrite_heals_it() {
    let o = tiny();
    let bs = u64::from(o.block_size);
    let (v, d) = flushed(&[3, 4, 5]);
    let sb = superblock(&d.written_image());
    // One flipped byte in block 4.
    d.corrupt(
        sb.extent_offset + 4 * bs + 17,
        &[0x5A ^ d.peek(sb.extent_offset + 4 * bs + 17, 1)[0]],
    );
    let stored = block_csum(4, &data(904, 1, o.block_size));
    let mut buf = vec![0xEEu8; 3 * bs as usize];
    match v.read_into(Lba(3), &mut buf) {
        Err(BlockVolError::ChecksumMismatch {
            lba,
            expected,
            found,
        }) => {
            assert_eq!(lba, Lba(4));
            assert_eq!(expected, stored, "the stored checksum is the block's");
            assert_ne!(found, expected);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert!(
        buf.iter().all(|b| *b == 0),
        "no byte of the failed read is handed out"
    );
    assert_eq!(v.status().checksum_errors, 1);
    // Neighbours read fine; the damaged block fails every time and counts every time.
    assert_eq!(
        v.read(Lba(3), 1).expect("block 3"),
        data(903, 1, o.block_size)
    );
    assert_eq!(
        v.read(Lba(5), 1).expect("block 5"),
        data(905, 1, o.block_size)
    );
    assert!(matches!(
        v.read(Lba(4), 1),
        Err(BlockVolError::ChecksumMismatch { lba: Lba(4), .. })
    ));
    assert_eq!(v.status().checksum_errors, 2);
    let r = v.scrub_range(Lba(0), 64).expect("scrub");
    assert_eq!(r.damaged, vec![Lba(4)]);
    assert_eq!((r.checked, r.skipped), (64, 0));
    assert_eq!(v.status().checksum_errors, 3);
    // While a newer version is in the WAL, the extent copy is neither read nor scrubbed.
    let new = data(1904, 1, o.block_size);
    v.write(Lba(4), &new).expect("rewrite");
    assert_eq!(v.read(Lba(4), 1).expect("from the WAL"), new);
    let r = v.scrub_range(Lba(0), 64).expect("scrub");
    assert_eq!((r.checked, r.skipped, r.damaged.len()), (63, 1, 0));
    // Flushing the rewrite writes a new checksum with the new data: healed.
    v.force_flush().expect("flush");
    assert_eq!(v.read(Lba(4), 1).expect("healed"), new);
    let r = v.scrub_range(Lba(0), 64).expect("scrub");
    assert_eq!((r.checked, r.damaged.len()), (64, 0));
    assert_eq!(v.status().checksum_errors, 3, "nothing new was counted");
}

#[test]
fn repair_takes_only_the_blocks_own_version_and_survives_a_crash() {
    let o = tiny();
    let bs = u64::from(o.block_size);
    let (v, d) = flushed(&[3, 4, 5, 6]);
    let sb = superblock(&d.written_image());
    let good = |l: u64| data(900 + l, 1, o.block_size);
    let csum = |l: u64| sb.csum_offset() + l * CSUM_SIZE;
    // Block 4's data and block 5's checksum are damaged.
    d.corrupt(
        sb.extent_offset + 4 * bs + 9,
        &[0xFF ^ d.peek(sb.extent_offset + 4 * bs + 9, 1)[0]],
    );
    d.corrupt(csum(5), &[1, 2, 3, 4]);
    let before = d.written_image();
    // Refused: a block that is fine, another version of the block, a wrong length, and
    // anything out of range; none of them writes a byte.
    assert_eq!(
        v.repair_block(Lba(3), &good(4)).expect("fine"),
        RepairOutcome::NotDamaged
    );
    let other = data(77, 1, o.block_size);
    match v.repair_block(Lba(4), &other) {
        Err(BlockVolError::RepairMismatch {
            lba,
            stored,
            offered,
        }) => {
            assert_eq!(lba, Lba(4));
            assert_eq!(stored, block_csum(4, &good(4)));
            assert_eq!(offered, block_csum(4, &other));
        }
        r => panic!("another version of block 4 was taken: {r:?}"),
    }
    assert!(matches!(
        v.repair_block(Lba(4), &good(4)[..100]),
        Err(BlockVolError::InvalidArgument(_))
    ));
    assert!(matches!(
        v.repair_block(Lba(64), &good(4)),
        Err(BlockVolError::OutOfRange { .. })
    ));
    assert!(
        d.written_image() == before,
        "a refused repair wrote nothing"
    );
    assert_eq!(v.status().blocks_repaired, 0);
    // The block's own version repairs the extent; the equal bytes repair the checksum.
    assert_eq!(
        v.repair_block(Lba(4), &good(4)).expect("extent"),
        RepairOutcome::ExtentRewritten
    );
    assert_eq!(
        v.repair_block(Lba(5), &good(5)).expect("checksum"),
        RepairOutcome::ChecksumRewritten
    );
    assert_eq!(v.read(Lba(4), 1).expect("healed"), good(4));
    assert_eq!(v.read(Lba(5), 1).expect("healed"), good(5));
    assert_scrub_clean(&v, "after the repairs");
    assert_eq!(v.status().blocks_repaired, 2);
    // Both repairs were synced: a crash right after keeps them.
    let crashed = SimDisk::from_image(d.crash_image_with(1, CrashMode::DurableOnly));
    let v2 = Volume::open_sim(&crashed, &manual()).expect("reopen");
    assert!(v2.read(Lba(4), 1).expect("durable") == good(4));
    assert!(v2.read(Lba(5), 1).expect("durable") == good(5));
    assert_scrub_clean(&v2, "after a crash");
    // A block whose newest version is in the WAL is left to the flusher.
    d.corrupt(sb.extent_offset + 6 * bs, &[0xAB]);
    v.write(Lba(6), &data(1906, 1, o.block_size))
        .expect("rewrite");
    assert_eq!(
        v.repair_block(Lba(6), &good(6)).expect("newer"),
        RepairOutcome::NewerInWal
    );
}

#[test]
fn zero_blocks_trims_and_the_checksum_region_itself_are_verified() {
    let o = tiny();
    let bs = u64::from(o.block_size);
    let (v, d) = flushed(&[10, 11, 12, 13]);
    v.trim(Lba(11), 2).expect("trim");
    v.force_flush().expect("flush");
    let sb = superblock(&d.written_image());
    let csum = |l: u64| sb.csum_offset() + l * CSUM_SIZE;
    // A trimmed block's checksum is 0 ("all zeros"), like a block never written.
    assert_eq!(d.peek(csum(11), 4), vec![0; 4]);
    assert_eq!(d.peek(csum(40), 4), vec![0; 4]);
    assert_eq!(
        d.peek(csum(10), 4),
        block_csum(10, &data(910, 1, o.block_size))
            .to_le_bytes()
            .to_vec()
    );
    assert_scrub_clean(&v, "after the trim");
    // A never-written block that gains a byte, a trimmed one whose checksum gains a byte, and
    // a written one whose checksum is zeroed: each fails its read.
    d.corrupt(sb.extent_offset + 40 * bs + 3, &[1]);
    d.corrupt(csum(12) + 1, &[7]);
    d.corrupt(csum(13), &[0, 0, 0, 0]);
    for l in [40u64, 12, 13] {
        assert!(
            matches!(v.read(Lba(l), 1), Err(BlockVolError::ChecksumMismatch { lba, .. }) if lba == Lba(l)),
            "block {l}"
        );
    }
    assert_eq!(v.read(Lba(11), 1).expect("trimmed"), vec![0; bs as usize]);
    let r = v.scrub_range(Lba(0), 64).expect("scrub");
    assert_eq!(r.damaged, vec![Lba(12), Lba(13), Lba(40)]);
    assert!(matches!(
        v.scrub_range(Lba(60), 5),
        Err(BlockVolError::OutOfRange { .. })
    ));
}

#[test]
fn a_base_image_never_ships_a_damaged_block() {
    let o = tiny();
    let bs = u64::from(o.block_size);
    let (v, d) = flushed(&[1, 2, 30]);
    let sb = superblock(&d.written_image());
    d.corrupt(sb.extent_offset + 30 * bs, &[0xFF, 0x00, 0xFF]);
    let pin = v.pin_base(v.status().head).expect("pin");
    let mut shipped = Vec::new();
    let mut failure = None;
    for c in pin.reader(4 * bs as usize) {
        match c {
            Ok(c) => shipped.push(c.lba),
            Err(e) => failure = Some(e),
        }
    }
    assert!(
        matches!(
            failure,
            Some(BlockVolError::ChecksumMismatch { lba: Lba(30), .. })
        ),
        "{failure:?}"
    );
    assert!(!shipped.contains(&Lba(30)), "the damaged block was shipped");
    assert_eq!(v.status().checksum_errors, 1);
    // The wire-form reader refuses it too.
    let mut frames = pin.reader(4 * bs as usize);
    let mut failed = false;
    while let Some(f) = frames.next_frame() {
        if let Err(e) = f {
            assert!(matches!(
                e,
                BlockVolError::ChecksumMismatch { lba: Lba(30), .. }
            ));
            failed = true;
        }
    }
    assert!(failed);
}

/// On a real file the base reader skips holes without reading them; a checksum claiming data
/// in a hole (the data was lost) fails it as well: in a stretch of holes (block 100 of a
/// small volume), and in a hole beside data in the same read window (block 8003 of a 64 MiB
/// volume, next to block 8000, far enough into the file and into its window that no
/// read-ahead caches it and turns it into data; D55).
#[test]
fn a_base_image_over_holes_checks_their_checksums() {
    let big = blockvol::CreateOptions {
        volume_size_bytes: 64 << 20,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    };
    for (o, written, damaged) in [(small(), [0u64, 200], 100u64), (big, [8000, 9000], 8003)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("holes.vol");
        let v = Volume::create(&path, &o, &manual()).expect("create");
        for lba in written {
            v.write(Lba(lba), &data(lba, 1, o.block_size))
                .expect("write");
        }
        v.force_flush().expect("flush");
        v.close().expect("close");
        // Only the superblocks are read: reading the whole file would put the holes' zero
        // pages in the page cache, and the file system would then report them as data.
        let head = {
            use std::io::Read;
            let mut b = vec![0u8; 2 * SB_SLOT_SIZE as usize];
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_exact(&mut b))
                .expect("read superblocks");
            b
        };
        let sb = superblock(&head);
        // The block was never written: claim it held data.
        common::cli::damage(&path, sb.csum_offset() + damaged * CSUM_SIZE);
        let v = Volume::open(&path, &manual()).expect("open");
        let pin = v.pin_base(v.status().head).expect("pin");
        // Windows of 4 MiB: the kernel's read-ahead behind one window (128 KiB by default)
        // caches only the start of the next, whose zero pages then count as data.
        let r: Result<Vec<_>, _> = pin.reader(4 << 20).collect();
        assert!(
            matches!(
                r,
                Err(BlockVolError::ChecksumMismatch { lba: Lba(l), .. }) if l == damaged
            ),
            "block {damaged}: {:?}",
            r.as_ref().map(Vec::len)
        );
        assert!(v.status().checksum_errors >= 1);
    }
}

/// A version 1 file: a copy of a current one with its superblocks saying version 1 and no
/// checksum region.
fn v1_file(dir: &std::path::Path) -> (std::path::PathBuf, blockvol::Digest, Vec<u8>) {
    let o = small();
    let path = dir.join("old.vol");
    let v = Volume::create(&path, &o, &manual()).expect("create");
    // Flushed writes, then a few left in the WAL.
    for l in 0..40u64 {
        let blocks = if l < 32 { 1 + l % 3 } else { 1 };
        v.write(Lba(l * 6 % 250), &data(300 + l, blocks, o.block_size))
            .expect("write");
        if l % 4 == 3 && l < 32 {
            v.force_flush().expect("flush");
        }
    }
    v.trim(Lba(12), 4).expect("trim");
    v.sync().expect("sync");
    let digest = v.digest().expect("digest");
    v.close().expect("close");
    let current = std::fs::read(&path).expect("read");
    let mut img = current.clone();
    as_version_1(&mut img, true);
    std::fs::write(&path, &img).expect("write v1");
    (path, digest, current)
}

#[test]
fn a_version_1_file_opens_read_only_and_upgrade_converts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, digest, current) = v1_file(dir.path());
    let before = std::fs::read(&path).expect("read");
    // A read-write open is refused, saying what to do, and writes nothing.
    match Volume::open(&path, &manual()) {
        Err(e @ BlockVolError::NeedsUpgrade { version: 1, .. }) => {
            assert!(e.to_string().contains("blockvol upgrade"), "{e}");
        }
        other => panic!("expected NeedsUpgrade, got {other:?}"),
    }
    // Read-only works, unverified.
    let v = Volume::open_read_only(&path).expect("read-only");
    assert_eq!(v.format_version(), 1);
    assert_eq!(v.digest().expect("digest"), digest);
    assert!(matches!(
        v.scrub_range(Lba(0), 1),
        Err(BlockVolError::NeedsUpgrade { .. })
    ));
    v.close().expect("close");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "nothing was written"
    );
    // The command line says so too.
    let o = run(&["write", s(&path), "--lba", "0"], Some(&data(1, 1, 4096)));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("blockvol upgrade"), "{}", stderr(&o));
    let o = run(&["info", s(&path)], None);
    assert!(
        stdout(&o).contains("version 1 (no extent checksums"),
        "{}",
        stdout(&o)
    );
    let o = run(&["check", s(&path)], None);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("extent: not checked (format version 1"),
        "{}",
        stdout(&o)
    );
    let o = run(&["scrub", s(&path)], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Upgrade: the file becomes exactly what the current code wrote (the checksums computed
    // from the extent equal the ones the flusher stored), but for the superblock sequence.
    match upgrade_file(&path).expect("upgrade") {
        UpgradeOutcome::Upgraded {
            from_version: 1,
            to_version,
            blocks: 256,
            nonzero_blocks,
        } => {
            assert_eq!(to_version, FORMAT_VERSION);
            assert!(nonzero_blocks > 10);
        }
        other => panic!("{other:?}"),
    }
    let after = std::fs::read(&path).expect("read");
    assert_eq!(after.len(), current.len());
    let sb = superblock(&after);
    assert_eq!(sb.version, FORMAT_VERSION);
    let region = sb.csum_offset() as usize..after.len();
    assert!(
        after[region.clone()] == current[region],
        "the checksum region differs"
    );
    assert!(after[2 * SB_SLOT_SIZE as usize..] == current[2 * SB_SLOT_SIZE as usize..]);
    for slot in [0u64, SB_SLOT_SIZE] {
        let r = slot as usize..(slot + SB_SLOT_SIZE) as usize;
        assert_eq!(
            Superblock::decode(&after[r], slot).expect("valid").version,
            FORMAT_VERSION,
            "no version 1 slot is left to fall back to"
        );
    }
    let v = Volume::open(&path, &manual()).expect("open");
    assert_eq!(v.digest().expect("digest"), digest);
    assert_scrub_clean(&v, "upgraded");
    v.close().expect("close");
    // Again: nothing to do, nothing written.
    let again = std::fs::read(&path).expect("read");
    assert_eq!(
        upgrade_file(&path).expect("again"),
        UpgradeOutcome::AlreadyCurrent {
            version: FORMAT_VERSION
        }
    );
    assert_eq!(std::fs::read(&path).expect("read"), again);
    let o = run(&["upgrade", s(&path)], None);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("already format version"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn cli_upgrade_check_and_scrub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = v1_file(dir.path());
    let p = s(&path);
    let o = run(&["upgrade", p], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("upgraded from format version 1 to 2"),
        "{}",
        stdout(&o)
    );
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // The last writes are still in the WAL: their blocks are not read from the extent.
    assert!(
        stdout(&o)
            .contains("extent: 244 blocks verified against their checksums (12 newer in the WAL)"),
        "{}",
        stdout(&o)
    );
    let o = run(&["scrub", p, "--json"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"clean\":true"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("\"checked\":244,\"skipped\":12,"),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("scrub: 256/256 blocks (100%)"),
        "{}",
        stderr(&o)
    );
    // Damage block 6's data (written, flushed at the first flush).
    let sb = superblock(&std::fs::read(&path).expect("read"));
    common::cli::damage(&path, sb.extent_offset + 6 * 4096 + 99);
    let o = run(&["scrub", p, "--json"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"damaged\":[6]"), "{}", stdout(&o));
    assert!(stdout(&o).contains("\"damaged_count\":1"), "{}", stdout(&o));
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("extent: CORRUPT: 1 of 244 blocks fail their checksums: lba 6"),
        "{}",
        stdout(&o)
    );
    let o = run(&["read", p, "--lba", "6", "--blocks", "1"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "no data is written out");
    assert!(stderr(&o).contains("failed its checksum"), "{}", stderr(&o));
    let o = run(&["scrub", s(&dir.path().join("missing.vol"))], None);
    assert_eq!(o.status.code(), Some(2));
}

/// Crash images a sync hook records, each with where it was taken.
type Images = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A crash at every sync point of an upgrade (the checksum region's sync, then each
/// superblock slot's) leaves either a version 1 file that upgrades again, or a version 2 file
/// whose every checksum is right. The version 1 image is itself taken in the middle of a
/// flush (extent half written beyond the checkpoint), which the first open after the upgrade
/// redoes with checksums.
#[test]
fn upgrade_crash_windows() {
    let o = tiny();
    let bs = o.block_size;
    let (v, d) = Volume::create_sim(&o, &manual()).expect("create");
    let mut ops = Vec::new();
    for i in 0..24u64 {
        let op = if i == 9 {
            Op::Trim { lba: 2, blocks: 5 }
        } else {
            Op::Write {
                lba: (i * 7) % 60,
                data: data(700 + i, 1 + i % 3, bs),
            }
        };
        match &op {
            Op::Write { lba, data } => v.write(Lba(*lba), data).expect("write"),
            Op::Trim { lba, blocks } => v.trim(Lba(*lba), *blocks).expect("trim"),
            Op::Barrier => unreachable!(),
        };
        ops.push(op);
        if i == 11 {
            v.force_flush().expect("flush");
        }
    }
    v.sync().expect("sync");
    let want = Model::at(&o, &ops, ops.len() as u64).digest();
    // The version 1 images: the extent written by a flush of the rest, before its sync.
    let mid_flush: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    let m2 = mid_flush.clone();
    let extent_offset = superblock(&d.written_image()).extent_offset;
    d.set_sync_hook(Some(Arc::new(move |d: &SimDisk, p: &SyncPoint| {
        if !p.after && p.offset == extent_offset {
            *m2.lock().unwrap() = Some(d.crash_image_with(3, CrashMode::RandomSectorsTorn));
        }
    })));
    v.force_flush().expect("flush");
    d.set_sync_hook(None);
    drop(v);
    let mut v1_images = vec![d.crash_image_with(0, CrashMode::DurableOnly)];
    v1_images.push(mid_flush.lock().unwrap().take().expect("a mid-flush image"));
    let mut checked = [0usize; 2];
    for (n, mut img) in v1_images.into_iter().enumerate() {
        as_version_1(&mut img, false);
        let disk = SimDisk::from_image(img);
        assert!(matches!(
            Volume::open_sim(&disk, &manual()),
            Err(BlockVolError::NeedsUpgrade { version: 1, .. })
        ));
        let images: Images = Arc::new(Mutex::new(Vec::new()));
        let out = images.clone();
        disk.set_sync_hook(Some(Arc::new(move |d: &SimDisk, p: &SyncPoint| {
            for (mode, seed) in [
                (CrashMode::DurableOnly, 0),
                (CrashMode::AllWritten, 0),
                (CrashMode::RandomSectors, p.index * 2),
                (CrashMode::RandomSectorsTorn, p.index * 2 + 1),
            ] {
                out.lock().unwrap().push((
                    format!(
                        "image {n}, {} sync #{} of {}+{}, {mode:?}",
                        if p.after { "after" } else { "before" },
                        p.index,
                        p.offset,
                        p.len
                    ),
                    d.crash_image_with(seed, mode),
                ));
            }
        })));
        assert!(matches!(
            Volume::upgrade_sim(&disk).expect("upgrade"),
            UpgradeOutcome::Upgraded {
                from_version: 1,
                ..
            }
        ));
        disk.set_sync_hook(None);
        let mut images = std::mem::take(&mut *images.lock().unwrap());
        assert_eq!(
            images.len(),
            3 * 2 * 4,
            "three syncs, before and after, four modes"
        );
        images.push((
            "finished".into(),
            disk.crash_image_with(0, CrashMode::DurableOnly),
        ));
        for (what, img) in images {
            let d = SimDisk::from_image(img);
            let version = superblock(&d.written_image()).version;
            if version == 1 {
                checked[0] += 1;
                assert!(
                    matches!(
                        Volume::open_sim(&d, &manual()),
                        Err(BlockVolError::NeedsUpgrade { .. })
                    ),
                    "{what}"
                );
                Volume::upgrade_sim(&d).unwrap_or_else(|e| panic!("{what}: upgrade again: {e}"));
            } else {
                checked[1] += 1;
            }
            let v = Volume::open_sim(&d, &manual()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(v.status().head, Lsn(ops.len() as u64), "{what}");
            assert_eq!(
                v.digest().unwrap_or_else(|e| panic!("{what}: {e}")),
                want,
                "{what}"
            );
            assert_scrub_clean(&v, &what);
        }
    }
    eprintln!(
        "upgrade crash windows: {} images still version 1, {} version 2",
        checked[0], checked[1]
    );
    assert!(checked[0] > 0 && checked[1] > 0, "{checked:?}");
}

/// The stored checksum is XXH3-64 seeded with the LBA, folded to 32 bits (docs/format.md 5.1):
/// the implementation may change (it is twox-hash's, dispatched at run time), the values may
/// not. Checked against the reference implementation in xxhash-rust and a fixed value.
#[test]
fn block_checksums_are_xxh3_64_of_the_block_seeded_with_its_lba() {
    let fold = |h: u64| match (h ^ (h >> 32)) as u32 {
        0 => 1,
        c => c,
    };
    for (lba, seed) in [(0u64, 1u64), (7, 2), (1 << 40, 3), (u64::MAX, 4)] {
        let b = data(seed, 1, 4096);
        assert_eq!(
            block_csum(lba, &b),
            fold(xxhash_rust::xxh3::xxh3_64_with_seed(&b, lba)),
            "lba {lba}"
        );
    }
    assert_eq!(block_csum(7, &[0xAB; 4096]), GOLDEN);
}

const GOLDEN: u32 = 1_433_641_424;
