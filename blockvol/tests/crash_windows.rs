//! Crash windows of multi-step protocols, checked at every sync boundary: the repair open
//! (review finding 3) and the flush cycle with its intent mark (review finding 1).
//!
//! Each test runs one operation on a simulated disk whose hook builds crash images before and
//! after every sync the operation makes (only synced bytes; every written byte; random subsets
//! of unsynced sectors, one of them torn), then reopens each image and checks what the
//! protocol promises.

mod common;

use std::sync::{Arc, Mutex};

use blockvol::format::WAL_OFFSET;
use blockvol::{
    BasePin, BlockVolError, CrashMode, Digest, FlushGate, Lba, Lsn, OpenOptions, RetentionPolicy,
    SimDisk, SyncPoint, Volume,
};
use common::{Model, Op, data, manual, tiny};

/// One crash image and where it was taken.
struct Image {
    what: String,
    /// Taken at a superblock sync.
    sb: bool,
    bytes: Vec<u8>,
}

/// Installs a hook on `disk` that records crash images at every sync boundary until removed.
fn record_images(disk: &SimDisk) -> Arc<Mutex<Vec<Image>>> {
    let images: Arc<Mutex<Vec<Image>>> = Arc::new(Mutex::new(Vec::new()));
    let out = images.clone();
    disk.set_sync_hook(Some(Arc::new(move |d: &SimDisk, p: &SyncPoint| {
        let at = format!(
            "{} sync #{} of {}+{}",
            if p.after { "after" } else { "before" },
            p.index,
            p.offset,
            p.len
        );
        let mut v = out.lock().unwrap();
        for (mode, seed) in [
            (CrashMode::DurableOnly, 0),
            (CrashMode::AllWritten, 0),
            (CrashMode::RandomSectors, p.index * 2),
            (CrashMode::RandomSectorsTorn, p.index * 2 + 1),
        ] {
            v.push(Image {
                what: format!("{at}, {mode:?}"),
                sb: p.offset < WAL_OFFSET,
                bytes: d.crash_image_with(seed, mode),
            });
        }
    })));
    images
}

fn repair() -> OpenOptions {
    OpenOptions {
        repair: true,
        ..manual()
    }
}

/// Runs a repair open of `disk` (whose log is corrupt at `bad_lsn`) under the recorder and
/// checks every crash image: a plain open either refuses it as corrupt or opens it untrusted
/// (never clean, which would hide the lost entries), and a repair open gives the repaired
/// state, `expect_head` with the first `expect_head` blocks' data, the same on a second open.
fn check_repair_crash_windows(disk: &SimDisk, expect_head: u64, intact_blocks: u64) {
    let bs = tiny().block_size;
    let images = record_images(disk);
    let v = Volume::open_sim(disk, &repair()).expect("repair open");
    disk.set_sync_hook(None);
    assert!(!v.status().checkpoint_trusted);
    assert_eq!(v.status().head, Lsn(expect_head));
    drop(v);
    let images = std::mem::take(&mut *images.lock().unwrap());
    assert!(images.len() >= 8, "only {} images", images.len());
    for img in &images {
        let what = &img.what;
        let d = SimDisk::from_image(img.bytes.clone());
        match Volume::open_sim(&d, &manual()) {
            Err(BlockVolError::Corrupt { .. }) => {}
            Err(e) => panic!("{what}: plain open failed with {e}"),
            Ok(v) => {
                let s = v.status();
                assert!(
                    !s.checkpoint_trusted,
                    "{what}: the repair's crash left a clean volume at head {}",
                    s.head
                );
                assert!(s.head.0 >= intact_blocks.min(expect_head), "{what}: {s:?}");
            }
        }
        let d = SimDisk::from_image(img.bytes.clone());
        let v = Volume::open_sim(&d, &repair()).unwrap_or_else(|e| panic!("{what}: repair: {e}"));
        let s = v.status();
        assert!(!s.checkpoint_trusted, "{what}");
        assert_eq!(s.head, Lsn(expect_head), "{what}");
        for i in 0..intact_blocks {
            assert_eq!(
                v.read(Lba(i), 1).unwrap(),
                data(100 + i, 1, bs),
                "{what}: block {i}"
            );
        }
        drop(v);
        let v = Volume::open_sim(&d, &manual()).unwrap_or_else(|e| panic!("{what}: again: {e}"));
        assert_eq!(v.status().head, Lsn(expect_head), "{what}");
        assert!(!v.status().checkpoint_trusted, "{what}");
    }
}

/// Review finding 3: a repair open zeroed the leftovers (the evidence of corruption) before it
/// persisted the repaired mark, so a crash in between opened clean with synced entries gone.
#[test]
fn repair_open_crash_windows_above_the_checkpoint() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    for i in 0..10u64 {
        v.write(Lba(i), &data(100 + i, 1, bs)).unwrap();
        v.sync().unwrap();
    }
    let off = v.entry_file_offset(Lsn(5)).unwrap();
    drop(v);
    disk.corrupt(off + 64 + 7, &[0xAA, 0x55]);
    assert!(matches!(
        Volume::open_sim(&disk, &manual()),
        Err(BlockVolError::Corrupt { .. })
    ));
    check_repair_crash_windows(&disk, 4, 4);
}

/// The same when the log ends below the checkpoint: the repair restarts the WAL empty at the
/// checkpoint, and that new tail is persisted with the mark, before any leftover is zeroed.
#[test]
fn repair_open_crash_windows_below_the_checkpoint() {
    let o = tiny();
    let bs = o.block_size;
    let keep = OpenOptions {
        retention: RetentionPolicy {
            keep_entries: 100,
            keep_bytes: 0,
        },
        ..manual()
    };
    let (v, disk) = Volume::create_sim(&o, &keep).expect("create");
    for i in 0..12u64 {
        v.write(Lba(i), &data(100 + i, 1, bs)).unwrap();
        v.sync().unwrap();
        if i == 9 {
            assert_eq!(v.force_flush().unwrap(), Lsn(10));
        }
    }
    let off = v.entry_file_offset(Lsn(5)).unwrap();
    drop(v);
    disk.corrupt(off + 64 + 7, &[0xAA, 0x55]);
    assert!(matches!(
        Volume::open_sim(&disk, &manual()),
        Err(BlockVolError::Corrupt { .. })
    ));
    check_repair_crash_windows(&disk, 10, 10);
}

// ---- Flush intent (review finding 1) ----------------------------------------------------------

/// The workload of the flush tests: overlapping writes, multi-block writes, a trim and a
/// barrier, so a flush writes some blocks, skips rewritten ones and zeroes others.
fn flush_ops() -> Vec<Op> {
    let bs = tiny().block_size;
    let mut ops = Vec::new();
    for i in 0..14u64 {
        ops.push(match i {
            4 => Op::Trim { lba: 1, blocks: 3 },
            7 => Op::Barrier,
            9 => Op::Write {
                lba: 10,
                data: data(500 + i, 4, bs),
            },
            _ => Op::Write {
                lba: (i * 3) % 8,
                data: data(500 + i, 1 + i % 2, bs),
            },
        });
    }
    ops
}

fn apply_op(v: &Volume, op: &Op) -> Lsn {
    match op {
        Op::Write { lba, data } => v.write(Lba(*lba), data).expect("write"),
        Op::Trim { lba, blocks } => v.trim(Lba(*lba), *blocks).expect("trim"),
        Op::Barrier => v.barrier().expect("barrier"),
    }
}

fn image_at(ops: &[Op], lsn: Lsn) -> Vec<u8> {
    Model::at(&tiny(), ops, lsn.0).image
}

/// Every chunk of a base image, laid out as a flat image.
fn base_image(pin: &BasePin) -> Vec<u8> {
    let o = tiny();
    let bs = o.block_size as usize;
    let mut img = vec![0u8; o.volume_size_bytes as usize];
    for c in pin.reader(4 * bs) {
        let c = c.expect("base chunk");
        let a = c.lba.0 as usize * bs;
        img[a..a + c.data.len()].copy_from_slice(&c.data);
    }
    img
}

fn opts_for(gate: FlushGate) -> OpenOptions {
    OpenOptions {
        flush_gate: gate,
        ..manual()
    }
}

/// Reopens one crash image and checks that the extent is exactly the image at the recovered
/// checkpoint: a snapshot there, a base image at every retained LSN, and a truncation after
/// every LSN from the checkpoint to the head all give exactly the model's image. `cp_range`
/// bounds the recovered checkpoint (under `FlushGate::Committed` its top is the committed
/// LSN: nothing above it may ever reach the extent).
fn check_flush_image(
    what: &str,
    bytes: &[u8],
    ops: &[Op],
    gate: FlushGate,
    cp_range: std::ops::RangeInclusive<u64>,
) {
    let n = ops.len() as u64;
    let open = || {
        let d = SimDisk::from_image(bytes.to_vec());
        let v = Volume::open_sim(&d, &opts_for(gate)).unwrap_or_else(|e| panic!("{what}: {e}"));
        (v, d)
    };
    let (v, d) = open();
    let s = v.status();
    assert_eq!(s.head, Lsn(n), "{what}: every entry was synced");
    assert!(s.checkpoint_trusted, "{what}");
    assert!(
        cp_range.contains(&s.checkpoint.0),
        "{what}: checkpoint {} outside {cp_range:?}",
        s.checkpoint
    );
    assert_eq!(
        v.digest().unwrap(),
        Digest::of_image(&image_at(ops, s.head))
    );
    common::assert_scrub_clean(&v, what);
    let cp = s.checkpoint;
    {
        let snap = v.pin_snapshot().expect("snapshot");
        assert_eq!(snap.lsn(), cp);
        assert!(
            base_image(&snap) == image_at(ops, cp),
            "{what}: the snapshot at checkpoint {cp} is not the image at {cp}"
        );
    }
    drop(v);
    // A second open is the same state (the redo, if any, was persisted).
    let v = Volume::open_sim(&d, &opts_for(gate)).expect("second open");
    assert_eq!(v.status().checkpoint, cp, "{what}: second open");
    drop(v);
    for l in cp.0..=n {
        let (v, d) = open();
        let cp_now = v.status().checkpoint.0;
        if l < cp_now {
            continue;
        }
        v.truncate_after(Lsn(l))
            .unwrap_or_else(|e| panic!("{what}: truncate after {l}: {e}"));
        assert!(
            v.digest().unwrap() == Digest::of_image(&image_at(ops, Lsn(l))),
            "{what}: after truncate_after({l}) the contents are not the image at {l}"
        );
        drop(v);
        let v = Volume::open_sim(&d, &opts_for(gate)).expect("reopen after truncation");
        assert_eq!(v.status().head, Lsn(l), "{what}");
        assert!(
            v.digest().unwrap() == Digest::of_image(&image_at(ops, Lsn(l))),
            "{what}: reopened after truncate_after({l}), not the image at {l}"
        );
        // The next flush after the truncation moves only the surviving entries.
        let fl = v.force_flush().expect("flush after truncation");
        assert!(fl.0 <= l);
        drop(v);
    }
    // Base images at every LSN a pin can take.
    for at in cp.0..=n {
        if gate == FlushGate::Committed && at > *cp_range.end() {
            break;
        }
        let (v, _d) = open();
        if gate == FlushGate::Committed {
            v.set_committed(Lsn(at));
        }
        let pin = v
            .pin_base(Lsn(at))
            .unwrap_or_else(|e| panic!("{what}: pin_base({at}): {e}"));
        assert!(
            base_image(&pin) == image_at(ops, Lsn(at)),
            "{what}: the base image at {at} is not the image at {at}"
        );
    }
}

/// Runs `flush` under the recorder on a volume holding `ops` (all synced, the first `cp0`
/// flushed, `committed` set), then checks every crash image of it.
fn flush_crash_windows(
    gate: FlushGate,
    cp0: u64,
    committed: Option<u64>,
    flush: impl FnOnce(&Volume),
    cp_range: std::ops::RangeInclusive<u64>,
) -> usize {
    let ops = flush_ops();
    let (v, disk) = Volume::create_sim(&tiny(), &opts_for(gate)).expect("create");
    if gate == FlushGate::Committed {
        v.set_committed(Lsn(cp0));
    }
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(apply_op(&v, op), Lsn(i as u64 + 1));
        v.sync().unwrap();
        if i as u64 + 1 == cp0 {
            assert_eq!(v.force_flush_to(Lsn(cp0)).unwrap(), Lsn(cp0));
        }
    }
    if let Some(c) = committed {
        v.set_committed(Lsn(c));
    }
    let images = record_images(&disk);
    flush(&v);
    disk.set_sync_hook(None);
    drop(v);
    let images = std::mem::take(&mut *images.lock().unwrap());
    for img in &images {
        check_flush_image(&img.what, &img.bytes, &ops, gate, cp_range.clone());
    }
    // Crashes during the recovery that redoes an interrupted flush: take the image with the
    // extent fully written and no new checkpoint (durable bytes only, right before the
    // flush's final superblock sync), open it under the recorder, and check those images too.
    let last_sb = images
        .iter()
        .rev()
        .find(|i| i.what.starts_with("before") && i.what.contains("DurableOnly") && i.sb)
        .expect("a superblock sync");
    let d = SimDisk::from_image(last_sb.bytes.clone());
    let rec = record_images(&d);
    drop(Volume::open_sim(&d, &opts_for(gate)).expect("open with a redo"));
    d.set_sync_hook(None);
    let during = std::mem::take(&mut *rec.lock().unwrap());
    for img in &during {
        let what = format!("recovery of [{}]: {}", last_sb.what, img.what);
        check_flush_image(&what, &img.bytes, &ops, gate, cp_range.clone());
    }
    images.len() + during.len()
}

/// A crash at any sync boundary of a flush cycle (intent superblock, extent fdatasync, final
/// superblock), then truncation above the recovered checkpoint and snapshot/base images: all
/// exact. Before the fix a crash between the extent sync and the final superblock left the
/// extent ahead of the checkpoint, and truncation or a snapshot returned the dropped entries.
#[test]
fn flush_crash_windows_durable_gate() {
    let n = flush_ops().len() as u64;
    let checked = flush_crash_windows(
        FlushGate::Durable,
        3,
        None,
        |v| assert_eq!(v.force_flush().unwrap(), Lsn(n)),
        3..=n,
    );
    assert!(checked >= 24, "{checked} images");
}

/// Flushes short of the gate (`force_flush_to`), each with its own intent: crashes in either
/// are exact, and never redo beyond the limit the interrupted flush was asked for.
#[test]
fn flush_crash_windows_partial_flushes() {
    let n = flush_ops().len() as u64;
    flush_crash_windows(
        FlushGate::Durable,
        2,
        None,
        |v| {
            assert_eq!(v.force_flush_to(Lsn(6)).unwrap(), Lsn(6));
            assert_eq!(v.force_flush_to(Lsn(11)).unwrap(), Lsn(11));
        },
        2..=n,
    );
}

/// Under `FlushGate::Committed` nothing above the committed LSN reaches the extent, not even
/// through recovery's redo, and the recovered checkpoint never passes it.
#[test]
fn flush_crash_windows_committed_gate() {
    flush_crash_windows(
        FlushGate::Committed,
        3,
        Some(9),
        |v| {
            assert_eq!(v.force_flush_to(Lsn(5)).unwrap(), Lsn(5));
            assert_eq!(v.force_flush().unwrap(), Lsn(9));
        },
        3..=9,
    );
}

/// `pin_base` flushes exactly to its LSN and fences there; crashes during that flush are exact.
#[test]
fn flush_crash_windows_pin_base() {
    let n = flush_ops().len() as u64;
    flush_crash_windows(
        FlushGate::Durable,
        1,
        None,
        |v| {
            let pin = v.pin_base(Lsn(8)).expect("pin_base");
            assert!(base_image(&pin) == image_at(&flush_ops(), Lsn(8)));
        },
        1..=n,
    );
}

/// The background flusher's pipeline: a cycle that only announces (its superblock is the
/// intent), then a cycle that flushes up to the announcement; crashes in either are exact.
#[test]
fn flush_crash_windows_background_pipeline() {
    let n = flush_ops().len() as u64;
    flush_crash_windows(
        FlushGate::Durable,
        2,
        None,
        |v| {
            v.run_flusher_cycle().unwrap();
            assert_eq!(
                v.status().checkpoint,
                Lsn(2),
                "the first cycle only announces"
            );
            v.run_flusher_cycle().unwrap();
            assert_eq!(v.status().checkpoint, Lsn(n));
        },
        2..=n,
    );
}

/// Superblock syncs per flush cycle: an explicit flush past the persisted mark pays one for
/// its intent; the background flusher's pipeline pays one per cycle, as before the intent
/// protocol existed. A truncation lowers the mark, so a recovery never redoes the flush of
/// the new entries that take the dropped LSNs.
#[test]
fn flush_intent_costs_at_most_one_superblock_sync() {
    let bs = tiny().block_size;
    let (v, disk) = Volume::create_sim(&tiny(), &manual()).expect("create");
    let sb_syncs = Arc::new(Mutex::new(0usize));
    let c = sb_syncs.clone();
    disk.set_sync_hook(Some(Arc::new(move |_: &SimDisk, p: &SyncPoint| {
        if !p.after && p.offset < WAL_OFFSET {
            *c.lock().unwrap() += 1;
        }
    })));
    let count = |f: &dyn Fn()| {
        *sb_syncs.lock().unwrap() = 0;
        f();
        *sb_syncs.lock().unwrap()
    };
    let write = |from: u64, to: u64| {
        for i in from..to {
            v.write(Lba(i), &data(900 + i, 1, bs)).unwrap();
        }
    };
    write(0, 6);
    v.sync().unwrap();
    // Explicit flushes: intent + final each time the checkpoint moves.
    assert_eq!(
        count(&|| assert_eq!(v.force_flush_to(Lsn(2)).unwrap(), Lsn(2))),
        2
    );
    assert_eq!(
        count(&|| assert_eq!(v.force_flush_to(Lsn(4)).unwrap(), Lsn(4))),
        2
    );
    assert_eq!(count(&|| assert_eq!(v.force_flush().unwrap(), Lsn(6))), 2);
    // Nothing to move: no superblock at all.
    assert_eq!(count(&|| assert_eq!(v.force_flush().unwrap(), Lsn(6))), 0);
    // The background pipeline: one superblock per cycle.
    write(6, 10);
    let cycle = || v.run_flusher_cycle().unwrap();
    assert_eq!(count(&cycle), 1, "announce 10");
    assert_eq!(v.status().checkpoint, Lsn(6));
    write(10, 12);
    assert_eq!(count(&cycle), 1, "flush to 10, announce 12");
    assert_eq!(v.status().checkpoint, Lsn(10));
    write(12, 13);
    assert_eq!(count(&cycle), 1, "flush to 12, announce 13");
    assert_eq!(v.status().checkpoint, Lsn(12));
    assert_eq!(count(&cycle), 1, "flush to 13");
    assert_eq!(v.status().checkpoint, Lsn(13));
    assert_eq!(count(&cycle), 0, "idle");
    // An explicit flush below the announced mark needs no intent.
    write(13, 17);
    assert_eq!(count(&cycle), 1, "announce 17");
    assert_eq!(
        count(&|| assert_eq!(v.force_flush_to(Lsn(14)).unwrap(), Lsn(14))),
        1
    );
    // Truncating below the announced mark lowers it; the new entry 16 (block 20) is never
    // redone. (Entry k wrote block k - 1.)
    v.truncate_after(Lsn(15)).unwrap();
    v.write(Lba(20), &data(7777, 1, bs)).unwrap();
    v.sync().unwrap();
    disk.set_sync_hook(None);
    let d = SimDisk::from_image(disk.crash_image_with(0, CrashMode::DurableOnly));
    drop(v);
    let v = Volume::open_sim(&d, &manual()).expect("reopen");
    assert_eq!(v.status().head, Lsn(16));
    assert_eq!(
        v.status().checkpoint,
        Lsn(15),
        "redone up to the lowered mark"
    );
    v.truncate_after(Lsn(15)).unwrap();
    assert_eq!(v.read(Lba(20), 1).unwrap(), vec![0u8; bs as usize]);
    assert_eq!(v.read(Lba(14), 1).unwrap(), data(914, 1, bs), "entry 15");
    assert_eq!(
        v.read(Lba(15), 1).unwrap(),
        vec![0u8; bs as usize],
        "dropped entry 16"
    );
}

/// `blockvol info` shows a pending flush mark (a crash left one above the checkpoint), and the
/// next open redoes that flush and clears it.
#[test]
fn info_shows_a_pending_flush_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = path.to_str().expect("utf8");
    let info = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_blockvol"))
            .args(["info", p])
            .output()
            .expect("run blockvol info");
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let o = tiny();
    let v = Volume::create(&path, &o, &manual()).expect("create");
    for i in 0..3u64 {
        v.write(Lba(i), &data(i, 1, o.block_size)).unwrap();
    }
    // One background cycle only announces the entries: the mark is above the checkpoint.
    v.run_flusher_cycle().unwrap();
    assert_eq!(v.status().checkpoint, Lsn(0));
    drop(v); // no clean close
    let out = info();
    assert!(out.contains("flush mark:  3"), "{out}");
    let v = Volume::open(&path, &manual()).expect("open");
    assert_eq!(
        v.status().checkpoint,
        Lsn(3),
        "the open redid the announced flush"
    );
    v.close().unwrap();
    let out = info();
    assert!(!out.contains("flush mark"), "{out}");
}
