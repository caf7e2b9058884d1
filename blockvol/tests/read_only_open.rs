//! `Volume::open_read_only`: recovery in memory only. It must see exactly what a read-write
//! open recovers (torn tails, unflushed entries, interrupted flushes) and never change a byte
//! of the file.

mod common;

use std::sync::{Arc, Mutex};

use blockvol::{BlockVolError, Digest, Epoch, Lba, Lsn, Role, SimDisk, SyncPoint, Volume};
use common::cli::{corrupt_log_volume, torn_tail_volume};
use common::{data, manual, small, tiny};

#[test]
fn read_only_open_recovers_in_memory_and_never_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("torn.vol");
    torn_tail_volume(&path);
    let before = std::fs::read(&path).expect("read");
    let bs = small().block_size;
    let mut image = vec![0u8; small().volume_size_bytes as usize];
    for lba in 1..=3usize {
        image[lba * bs as usize..(lba + 1) * bs as usize].copy_from_slice(&data(lba as u64, 1, bs));
    }
    let v = Volume::open_read_only(&path).expect("read-only open");
    assert!(v.is_read_only());
    let s = v.status();
    assert_eq!((s.head, s.checkpoint, s.durable), (Lsn(3), Lsn(0), Lsn(3)));
    assert_eq!(v.digest().expect("digest"), Digest::of_image(&image));
    assert_eq!(v.read(Lba(2), 1).expect("read"), data(2, 1, bs));
    let scanned: Vec<u64> = v
        .scan_from(Lsn(1))
        .expect("scan")
        .map(|e| e.expect("entry").lsn.0)
        .collect();
    assert_eq!(scanned, [1, 2, 3]);
    // Shared with other read-only openers, exclusive of read-write ones.
    let other = Volume::open_read_only(&path).expect("a second read-only open");
    assert!(matches!(
        Volume::open(&path, &manual()),
        Err(BlockVolError::Locked { .. })
    ));
    drop(other);
    // Everything that would change the file is refused.
    let ro = |r: Result<(), BlockVolError>, what: &str| {
        assert!(
            matches!(r, Err(BlockVolError::ReadOnly)),
            "{what}: {r:?} on a read-only volume"
        );
    };
    ro(v.write(Lba(0), &data(9, 1, bs)).map(drop), "write");
    ro(v.trim(Lba(0), 1).map(drop), "trim");
    ro(v.barrier().map(drop), "barrier");
    ro(v.sync().map(drop), "sync");
    ro(v.force_flush().map(drop), "force_flush");
    ro(v.assign(Role::Primary, Epoch(1)), "assign");
    ro(v.truncate_after(Lsn(1)), "truncate_after");
    ro(v.pin_snapshot().map(drop), "pin_snapshot");
    ro(v.pin_base(Lsn(3)).map(drop), "pin_base");
    v.close().expect("close");
    assert!(
        std::fs::read(&path).expect("read") == before,
        "the read-only open changed the file"
    );
    // A read-write open recovers the same contents (and does change the file: it zeroes the
    // torn tail's header and writes a superblock).
    let v = Volume::open(&path, &manual()).expect("open");
    assert_eq!(v.status().head, Lsn(3));
    assert_eq!(v.digest().expect("digest"), Digest::of_image(&image));
    v.close().expect("close");
    assert!(std::fs::read(&path).expect("read") != before);

    // A corrupt log is refused, as by a read-write open, and left as it is.
    let bad = dir.path().join("corrupt.vol");
    corrupt_log_volume(&bad);
    let before = std::fs::read(&bad).expect("read");
    assert!(matches!(
        Volume::open_read_only(&bad),
        Err(BlockVolError::Corrupt { .. })
    ));
    assert!(std::fs::read(&bad).expect("read") == before);
}

/// A crash image and where it was taken.
type Image = (String, Vec<u8>);

/// Every crash image of a flush cycle (before and after each of its syncs: the intent
/// superblock, the extent writes, the final superblock), written to a file: the read-only open
/// sees the head and contents a read-write recovery reaches (which redoes the interrupted
/// flush), and leaves the file untouched.
#[test]
fn read_only_open_sees_what_recovery_persists_at_every_flush_crash_window() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    for i in 0..8u64 {
        v.write(Lba(i), &data(i, 1, bs)).expect("write");
    }
    v.force_flush().expect("flush");
    // Overwrites, a multi-block write and a trim after the checkpoint: a flush interrupted
    // half-way leaves blocks in the extent that the WAL rewrites.
    for i in 0..6u64 {
        v.write(Lba(i * 2), &data(100 + i, 2, bs)).expect("write");
    }
    v.trim(Lba(3), 2).expect("trim");
    v.write(Lba(1), &data(200, 1, bs)).expect("write");
    v.sync().expect("sync");
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
            (blockvol::CrashMode::DurableOnly, 0),
            (blockvol::CrashMode::AllWritten, 0),
            (blockvol::CrashMode::RandomSectors, p.index * 2),
        ] {
            v.push((format!("{at}, {mode:?}"), d.crash_image_with(seed, mode)));
        }
    })));
    v.force_flush().expect("flush");
    disk.set_sync_hook(None);
    drop(v);
    let images = std::mem::take(&mut *images.lock().unwrap());
    assert!(images.len() >= 12, "only {} images", images.len());
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (what, bytes)) in images.into_iter().enumerate() {
        let path = dir.path().join(format!("img{i}.vol"));
        std::fs::write(&path, &bytes).expect("write image");
        let rw = Volume::open_sim(&SimDisk::from_image(bytes.clone()), &manual())
            .map(|v| (v.status().head, v.digest().expect("digest")));
        let ro = Volume::open_read_only(&path).map(|v| {
            let r = (v.status().head, v.digest().expect("digest"));
            v.close().expect("close");
            r
        });
        match (rw, ro) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}: read-only view differs"),
            (Err(BlockVolError::Corrupt { .. }), Err(BlockVolError::Corrupt { .. })) => {}
            (a, b) => panic!("{what}: read-write open {a:?}, read-only open {b:?}"),
        }
        assert!(
            std::fs::read(&path).expect("read image") == bytes,
            "{what}: the read-only open changed the file"
        );
    }
}
