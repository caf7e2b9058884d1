//! Crash windows of multi-step protocols, checked at every sync boundary: the repair open
//! (review finding 3) and the flush cycle with its intent mark (review finding 1).
//!
//! Each test runs one operation on a simulated disk whose hook builds crash images before and
//! after every sync the operation makes (only synced bytes; every written byte; random subsets
//! of unsynced sectors, one of them torn), then reopens each image and checks what the
//! protocol promises.

mod common;

use std::sync::{Arc, Mutex};

use blockvol::{
    BlockVolError, CrashMode, Lsn, OpenOptions, RetentionPolicy, SimDisk, SyncPoint, Volume,
};
use common::{data, manual, tiny};

/// One crash image and where it was taken.
struct Image {
    what: String,
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
                v.read(i, 1).unwrap(),
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
        v.write(i, &data(100 + i, 1, bs)).unwrap();
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
        v.write(i, &data(100 + i, 1, bs)).unwrap();
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
