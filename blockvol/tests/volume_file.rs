//! The real-file volume: creation checks, preallocation, locking, reopen, group commit and
//! concurrent writers.

mod common;

use std::sync::{Arc, Barrier};

use blockvol::{BlockVolError, CreateOptions, Lba, Lsn, OpenOptions, Volume};
use common::{Model, Op, data, manual, small};

#[test]
fn create_validates_geometry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = [
        CreateOptions {
            volume_size_bytes: 4096,
            wal_size_bytes: 65536,
            block_size: 1000,
        },
        CreateOptions {
            volume_size_bytes: 5000,
            wal_size_bytes: 65536,
            block_size: 4096,
        },
        CreateOptions {
            volume_size_bytes: 0,
            wal_size_bytes: 65536,
            block_size: 4096,
        },
        CreateOptions {
            volume_size_bytes: 4096,
            wal_size_bytes: 4096,
            block_size: 4096,
        },
        CreateOptions {
            volume_size_bytes: 4096,
            wal_size_bytes: 65536 + 1,
            block_size: 4096,
        },
        CreateOptions {
            volume_size_bytes: 65536 * 2,
            wal_size_bytes: 65536,
            block_size: 65536,
        },
    ];
    for (i, o) in bad.iter().enumerate() {
        let r = Volume::create(dir.path().join(format!("bad{i}")), o, &manual());
        assert!(
            matches!(r, Err(BlockVolError::InvalidArgument(_))),
            "case {i}: {r:?}"
        );
        assert!(!dir.path().join(format!("bad{i}")).exists());
    }
}

#[test]
fn file_is_preallocated_locked_and_reopens_with_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let o = small();
    let v = Volume::create(&path, &o, &manual()).expect("create");
    let meta = std::fs::metadata(&path).expect("stat");
    // Superblocks, WAL, extent, then the checksum region (4 bytes a block, whole pages).
    let csum = (o.volume_size_bytes / u64::from(o.block_size) * 4).div_ceil(4096) * 4096;
    assert_eq!(
        meta.len(),
        8192 + o.wal_size_bytes + o.volume_size_bytes + csum
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "the file must not be sparse"
        );
    }
    assert!(matches!(
        Volume::open(&path, &manual()),
        Err(BlockVolError::Locked { .. })
    ));
    assert!(matches!(
        Volume::create(&path, &o, &manual()),
        Err(BlockVolError::Io { op: "create", .. })
    ));
    let mut ops = Vec::new();
    for i in 0..30u64 {
        let d = data(i, 1 + i % 3, o.block_size);
        v.write(Lba(i * 3), &d).expect("write");
        ops.push(Op::Write {
            lba: i * 3,
            data: d,
        });
        if i % 7 == 0 {
            v.force_flush().expect("flush");
        }
    }
    v.trim(Lba(0), 10).expect("trim");
    ops.push(Op::Trim { lba: 0, blocks: 10 });
    let want = Model::at(&o, &ops, ops.len() as u64).digest();
    assert_eq!(v.digest().expect("digest"), want);
    v.close().expect("close");
    let v = Volume::open(&path, &manual()).expect("reopen");
    assert_eq!(v.status().head, Lsn(31));
    assert_eq!(v.digest().expect("digest"), want);
    assert_eq!(v.geometry().volume_blocks, 256);
}

#[test]
fn reads_cover_the_dirty_map_and_the_extent() {
    let (v, _d) = Volume::create_sim(&small(), &manual()).expect("create");
    let bs = 4096;
    v.write(Lba(0), &data(1, 4, bs)).expect("write");
    v.force_flush().expect("flush");
    v.write(Lba(1), &data(2, 1, bs))
        .expect("overwrite the middle, unflushed");
    v.trim(Lba(3), 1).expect("trim, unflushed");
    let got = v.read(Lba(0), 5).expect("read");
    let a = data(1, 4, bs);
    assert_eq!(&got[..4096], &a[..4096]);
    assert_eq!(&got[4096..8192], &data(2, 1, bs)[..]);
    assert_eq!(&got[8192..12288], &a[8192..12288]);
    assert_eq!(&got[12288..], &vec![0u8; 8192][..]);
    let mut buf = vec![0u8; 4096];
    v.read_into(Lba(1), &mut buf).expect("read_into");
    assert_eq!(buf, data(2, 1, bs));
    assert!(matches!(
        v.read(Lba(255), 2),
        Err(BlockVolError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(Lba(0), &[0u8; 100]),
        Err(BlockVolError::Misaligned { .. })
    ));
    assert!(matches!(
        v.write(Lba(0), &vec![0u8; 64 * 1024]),
        Err(BlockVolError::EntryTooLarge { .. })
    ));
}

#[test]
fn group_commit_serves_concurrent_writers_with_contiguous_lsns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = CreateOptions {
        volume_size_bytes: 4 << 20,
        wal_size_bytes: 4 << 20,
        block_size: 4096,
    };
    let v = Arc::new(
        Volume::create(dir.path().join("v.vol"), &o, &OpenOptions::default()).expect("create"),
    );
    let threads = 16u64;
    let per = 40u64;
    let start = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let v = v.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut lsns = Vec::new();
                for i in 0..per {
                    let l = v
                        .write(Lba(t * per + i), &data(t * 1000 + i, 1, 4096))
                        .expect("write");
                    let d = v.sync().expect("sync");
                    assert!(
                        d >= l,
                        "sync returned {d} before its own write {l} was durable"
                    );
                    lsns.push(l.0);
                }
                lsns
            })
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=threads * per).collect::<Vec<_>>(),
        "LSNs are unique and contiguous"
    );
    for t in 0..threads {
        for i in 0..per {
            assert_eq!(
                v.read(Lba(t * per + i), 1).expect("read"),
                data(t * 1000 + i, 1, 4096)
            );
        }
    }
}

/// Group commit's leader waits (bounded) for the writers the last sync released: a failed
/// sync in the middle of that must release every writer with an error, none may hang, and a
/// writer that finds the group gone must still get its sync.
#[test]
fn group_commit_failure_releases_a_gathering_group() {
    let o = CreateOptions {
        volume_size_bytes: 4 << 20,
        wal_size_bytes: 4 << 20,
        block_size: 4096,
    };
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    let v = Arc::new(v);
    // Every sync takes a while, so a leader has a reason and the time to gather its group.
    disk.set_sync_hook(Some(Arc::new(|_, _| {
        std::thread::sleep(std::time::Duration::from_millis(2))
    })));
    let threads = 8u64;
    let round = |v: &Arc<Volume>, base: u64| -> Vec<Result<(Lsn, Lsn), BlockVolError>> {
        let start = Arc::new(Barrier::new(threads as usize));
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (v, start) = (v.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let l = v.write(Lba(base + t), &data(base + t, 1, 4096))?;
                    Ok((l, v.sync()?))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    };
    let syncs_before = disk.sync_count();
    for r in 0..4 {
        for res in round(&v, r * threads) {
            let (l, d) = res.expect("healthy round");
            assert!(d >= l, "sync returned {d} before its write {l} was durable");
        }
    }
    let used = disk.sync_count() - syncs_before;
    assert!(
        used < 4 * threads,
        "{used} syncs for {} concurrent writes: group commit never grouped",
        4 * threads
    );
    disk.fail_next_syncs(1);
    let results = round(&v, 100);
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(
        failed >= 1,
        "the failed sync reached no writer: {results:?}"
    );
    for r in &results {
        match r {
            Ok((l, d)) => assert!(d >= l, "sync returned {d} before {l} was durable"),
            Err(BlockVolError::Poisoned { .. } | BlockVolError::Io { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        matches!(v.sync(), Err(BlockVolError::Poisoned { .. })),
        "a failed msync poisons the volume"
    );
}

#[test]
fn a_lone_writer_after_a_group_syncs_every_write() {
    let o = CreateOptions {
        volume_size_bytes: 4 << 20,
        wal_size_bytes: 4 << 20,
        block_size: 4096,
    };
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    let v = Arc::new(v);
    disk.set_sync_hook(Some(Arc::new(|_, _| {
        std::thread::sleep(std::time::Duration::from_millis(1))
    })));
    let start = Arc::new(Barrier::new(8));
    let hs: Vec<_> = (0..8u64)
        .map(|t| {
            let (v, start) = (v.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..10 {
                    v.write(Lba(t * 10 + i), &data(t, 1, 4096)).expect("write");
                    v.sync().expect("sync");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("thread");
    }
    // Alone now: the expectation of a group of eight decays at its first sync, so every
    // later sync is one leader with nobody to wait for, and each write is durable on return.
    for i in 0..50u64 {
        let l = v.write(Lba(100 + i), &data(i, 1, 4096)).expect("write");
        assert!(v.sync().expect("sync") >= l);
    }
    assert_eq!(v.status().durable, v.status().head);
}

/// The bulk appender's writeback hint (`start_writeback` hands whole pages to the disk)
/// changes no byte, including across the ring's wrap, and the data survives a reopen.
#[test]
fn writeback_hints_change_no_byte_across_the_wrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let o = CreateOptions {
        volume_size_bytes: 1 << 20,
        wal_size_bytes: 256 * 1024,
        block_size: 4096,
    };
    let v = Volume::create(&path, &o, &OpenOptions::manual()).expect("create");
    let mut model = Model::new(&o);
    for i in 0..200u64 {
        let lba = (i * 13) % 256;
        let d = data(i, 1, 4096);
        v.write(Lba(lba), &d).expect("write");
        model.apply(&Op::Write { lba, data: d });
        if i % 5 == 0 {
            v.start_writeback();
        }
        if i % 40 == 39 {
            v.sync().expect("sync");
            v.force_flush().expect("flush");
        }
    }
    v.start_writeback();
    v.sync().expect("sync");
    for lba in 0..256 {
        assert_eq!(
            v.read(Lba(lba), 1).expect("read"),
            model.read(lba, 1),
            "lba {lba}"
        );
    }
    v.close().expect("close");
    let v = Volume::open(&path, &OpenOptions::manual()).expect("reopen");
    for lba in 0..256 {
        assert_eq!(
            v.read(Lba(lba), 1).expect("read"),
            model.read(lba, 1),
            "lba {lba} after reopen"
        );
    }
}

#[test]
fn background_flusher_checkpoints_without_help() {
    let (v, _d) = Volume::create_sim(
        &small(),
        &OpenOptions {
            flusher: blockvol::FlusherMode::Background {
                interval: std::time::Duration::from_millis(1),
            },
            ..OpenOptions::default()
        },
    )
    .expect("create");
    for i in 0..10 {
        v.write(Lba(i), &data(i, 1, 4096)).expect("write");
    }
    // The flusher syncs and flushes on its own; wait for the outcome, not for a duration.
    while v.status().checkpoint < Lsn(10) {
        std::thread::yield_now();
    }
    assert_eq!(v.status().durable, Lsn(10));
    v.close().expect("close");
}
