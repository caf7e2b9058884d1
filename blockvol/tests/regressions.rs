//! One regression test per bug of reference-blockvol.md section 9 that applies to this design,
//! each named after the bug and written so that the reference's behaviour would fail it.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use blockvol::format::{ENTRY_HEADER_SIZE, WAL_OFFSET};
use blockvol::{
    ApplyOutcome, BlockVolError, CrashMode, EntryKind, Epoch, FlushGate, FlusherMode, Lba, Lsn,
    OpenOptions, RetentionPolicy, Role, SimDisk, Volume, WalEntry,
};
use common::{Model, Op, data, manual, small, tiny};

/// Crashes `disk` (only synced bytes survive) and reopens the result, returning the volume and
/// the new disk it lives on.
fn crash_reopen(disk: &SimDisk) -> (Volume, SimDisk) {
    let d = SimDisk::from_image(disk.crash_image_with(0, CrashMode::DurableOnly));
    let v = Volume::open_sim(&d, &manual()).expect("reopen after crash");
    (v, d)
}

fn reopen_durable(disk: &SimDisk) -> Volume {
    crash_reopen(disk).0
}

fn replica_from(primary: &Volume, opts: &blockvol::CreateOptions) -> (Volume, SimDisk) {
    let (r, d) = Volume::create_sim(opts, &manual()).expect("create replica");
    r.assign(Role::Replica, primary.status().epoch)
        .expect("assign replica");
    for e in primary.scan_from(Lsn(1)).expect("scan") {
        assert_eq!(
            r.apply(&e.expect("entry")).expect("apply"),
            ApplyOutcome::Applied
        );
    }
    (r, d)
}

#[test]
fn a1_crash_before_first_checkpoint_recovers_lsn_head_not_bytes() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    for i in 0..5 {
        v.write(Lba(i), &data(i, 1, o.block_size)).expect("write");
    }
    v.sync().expect("sync");
    drop(v);
    let v = reopen_durable(&disk);
    // The reference assigned the highest LSN (5) to a byte position; here head is an LSN and
    // the next write takes LSN 6.
    assert_eq!(v.status().head, Lsn(5));
    assert_eq!(v.status().checkpoint, Lsn(0));
    assert_eq!(
        v.write(Lba(9), &data(9, 1, o.block_size)).expect("write"),
        Lsn(6)
    );
}

#[test]
fn a2_stale_head_then_write_keeps_acknowledged() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    let mut ops = Vec::new();
    for i in 0..6u64 {
        let d = data(i, 2, bs);
        v.write(Lba(i * 2), &d).expect("write");
        ops.push(Op::Write {
            lba: i * 2,
            data: d,
        });
    }
    v.sync().expect("sync");
    drop(v);
    // The superblock's head hint is stale (nothing wrote it since open); recovery must resume
    // the writer after the last recovered entry, not at the hint.
    let (v, disk) = crash_reopen(&disk);
    let d = data(100, 1, bs);
    assert_eq!(v.write(Lba(40), &d).expect("write"), Lsn(7));
    ops.push(Op::Write { lba: 40, data: d });
    v.sync().expect("sync");
    // Variant (b): a flush right after recovery must not push the tail past the head.
    v.force_flush().expect("flush");
    let s = v.status();
    assert!(
        s.tail <= s.head && s.wal_used_bytes <= s.wal_size_bytes,
        "{s:?}"
    );
    drop(v);
    let v = reopen_durable(&disk);
    assert_eq!(v.status().head, Lsn(7));
    assert_eq!(v.digest().expect("digest"), Model::at(&o, &ops, 7).digest());
    // Writes keep working after the flush: the WAL does not read as full.
    for i in 0..60 {
        v.write(Lba(i % 64), &data(i, 1, bs))
            .expect("write after recovery and flush");
        if i % 20 == 19 {
            v.force_flush().expect("flush");
        }
    }
}

#[test]
fn a3_simulated_crash_really_drops_unsynced_writes() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.write(Lba(0), &data(1, 1, o.block_size)).expect("write");
    v.sync().expect("sync");
    v.write(Lba(1), &data(2, 1, o.block_size))
        .expect("unsynced write");
    assert!(disk.unsynced_sectors() > 0);
    drop(v);
    // A plain close would keep the page cache; the simulated crash must not.
    let v = reopen_durable(&disk);
    assert_eq!(v.status().head, Lsn(1));
    assert_eq!(
        v.read(Lba(1), 1).expect("read"),
        vec![0u8; o.block_size as usize]
    );
}

#[test]
fn a4_corrupt_post_wrap_entry_is_reported_and_repair_keeps_a_prefix() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    // Fill most of a lap, checkpoint, then write past the ring end so entries wrap.
    let mut lsn = 0;
    for i in 0..40u64 {
        lsn = v.write(Lba(i % 60), &data(i, 2, bs)).expect("write").0;
    }
    v.force_flush().expect("flush");
    let first_after_cp = lsn + 1;
    let mut wrapped = None;
    for i in 0..40u64 {
        let l = v.write(Lba(i % 60), &data(500 + i, 2, bs)).expect("write");
        let off = v.entry_file_offset(l).expect("offset");
        if wrapped.is_none() && off < WAL_OFFSET + 4096 && l.0 > first_after_cp {
            wrapped = Some(l);
        }
    }
    v.sync().expect("sync");
    let victim = wrapped.expect("a post-wrap entry");
    let off = v.entry_file_offset(victim).expect("offset");
    let head = v.status().head;
    // A clean close records the durable LSN in the superblock.
    v.close().expect("close");
    // Corrupt the payload of the first post-wrap entry: the entries after it were synced
    // after it, so this is corruption, not a torn tail.
    disk.corrupt(off + ENTRY_HEADER_SIZE as u64 + 3, &[0xFF, 0x00, 0xFF]);
    let err =
        Volume::open_sim(&disk, &manual()).expect_err("must not open over mid-log corruption");
    match err {
        BlockVolError::Corrupt {
            region,
            lsn,
            offset,
            ..
        } => {
            assert_eq!(region, "wal");
            assert_eq!(lsn, Some(victim));
            assert_eq!(offset, off);
        }
        e => panic!("expected Corrupt, got {e}"),
    }
    // Explicit repair keeps exactly the prefix before the damaged entry.
    let repair = OpenOptions {
        repair: true,
        ..manual()
    };
    let v = Volume::open_sim(&disk, &repair).expect("repair open");
    let s = v.status();
    assert_eq!(s.head, Lsn(victim.0 - 1));
    assert!(s.head < head);
    assert!(
        !s.checkpoint_trusted,
        "a repaired volume's checkpoint is untrusted"
    );
    drop(v);
    // The repair is persisted: a normal open now succeeds at the same state, still untrusted.
    let v = Volume::open_sim(&disk, &manual()).expect("open after repair");
    assert_eq!(v.status().head, Lsn(victim.0 - 1));
    assert!(!v.status().checkpoint_trusted);
}

#[test]
fn a4_torn_last_entry_ends_the_log_without_error() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    for i in 0..5 {
        v.write(Lba(i), &data(i, 1, o.block_size)).expect("write");
    }
    v.sync().expect("sync");
    let off = v.entry_file_offset(Lsn(5)).expect("offset");
    drop(v);
    disk.corrupt(off + ENTRY_HEADER_SIZE as u64, &[0x5A; 16]);
    let v = Volume::open_sim(&disk, &manual()).expect("a torn last entry is not corruption");
    assert_eq!(v.status().head, Lsn(4));
    assert!(v.status().checkpoint_trusted);
}

#[test]
fn a5_install_base_then_reopen_does_not_replay_old_generation() {
    let o = tiny();
    let bs = o.block_size;
    // The primary: 30 entries, base at 30.
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    for i in 0..30u64 {
        p.write(Lba(i % 50), &data(i, 1, bs)).expect("write");
    }
    // The replica held a different history in its WAL (not flushed).
    let (r, rd) = Volume::create_sim(&o, &manual()).expect("replica");
    r.assign(Role::Rebuilding, Epoch(0)).expect("assign");
    for i in 1..=12u64 {
        r.apply(&WalEntry {
            lsn: Lsn(i),
            epoch: Epoch(0),
            kind: EntryKind::Write {
                lba: Lba(i),
                data: data(9000 + i, 1, bs),
            },
        })
        .expect("apply");
    }
    r.sync().expect("sync");
    let base = p.pin_base(Lsn(30)).expect("pin base");
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    for c in base.reader(4096) {
        inst.write_chunk(&c.expect("chunk")).expect("write chunk");
    }
    inst.finish().expect("finish");
    let want = p.digest().expect("digest");
    assert_eq!(r.digest().expect("digest"), want);
    drop(r);
    // Reopen: the old entries (valid CRCs, older generation) must not come back.
    let r = reopen_durable(&rd);
    let s = r.status();
    assert_eq!((s.head, s.checkpoint, s.tail), (Lsn(30), Lsn(30), Lsn(30)));
    assert_eq!(s.generation, 2);
    assert_eq!(r.digest().expect("digest"), want);
    assert_eq!(r.entry_info(Lsn(30)).expect("info"), base.entry_info());
}

#[test]
fn a5_truncate_then_reopen_does_not_resurrect_dropped_entries() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.assign(Role::Replica, Epoch(1)).expect("assign");
    let mut ops = Vec::new();
    for i in 1..=10u64 {
        let d = data(i, 1, bs);
        v.apply(&WalEntry {
            lsn: Lsn(i),
            epoch: Epoch(1),
            kind: EntryKind::Write {
                lba: Lba(i),
                data: d.clone(),
            },
        })
        .expect("apply");
        ops.push(Op::Write { lba: i, data: d });
    }
    v.sync().expect("sync");
    v.truncate_after(Lsn(6)).expect("truncate");
    drop(v);
    let v = reopen_durable(&disk);
    assert_eq!(v.status().head, Lsn(6));
    assert_eq!(v.digest().expect("digest"), Model::at(&o, &ops, 6).digest());
}

#[test]
fn a6_damaged_padding_is_not_followed_blindly() {
    let o = tiny();
    let bs = o.block_size;
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    // Large entries: entry 3 does not fit before the ring end, so padding precedes it.
    v.write(Lba(0), &data(1, 50, bs)).expect("write 1");
    v.sync().expect("sync");
    v.force_flush().expect("flush");
    v.write(Lba(0), &data(2, 40, bs)).expect("write 2");
    let l3 = v.write(Lba(0), &data(3, 40, bs)).expect("write 3");
    v.sync().expect("sync");
    // Entry 4 is appended after entry 3 was synced: its durable hint proves it.
    v.write(Lba(1), &data(4, 1, bs)).expect("write 4");
    v.sync().expect("sync");
    let off3 = v.entry_file_offset(l3).expect("offset");
    assert_eq!(
        off3, WAL_OFFSET,
        "entry 3 should have wrapped to the ring start"
    );
    drop(v);
    // Find the padding header: it is the last header before the ring end (scan the gap).
    let wal = disk.peek(WAL_OFFSET, o.wal_size_bytes as usize);
    let pad = (0..wal.len() - ENTRY_HEADER_SIZE)
        .step_by(8)
        .rev()
        .find(|&i| &wal[i..i + 4] == b"BVWE" && wal[i + 4] == blockvol::format::KIND_PADDING)
        .expect("a padding header");
    // Change its length: the header CRC no longer matches, so the walk must stop there (and,
    // since entry 4 after it was synced later, report corruption) rather than jump anywhere.
    disk.corrupt(WAL_OFFSET + pad as u64 + 44, &[0x10, 0, 0, 0]);
    let err = Volume::open_sim(&disk, &manual()).expect_err("damaged padding");
    assert!(
        matches!(
            err,
            BlockVolError::Corrupt {
                lsn: Some(Lsn(3)),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a7_torn_superblock_write_falls_back_to_the_other_slot() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.write(Lba(0), &data(1, 1, o.block_size)).expect("write");
    v.force_flush().expect("flush");
    let cp = v.status().checkpoint;
    drop(v);
    // Tear both possible "newest" slots in turn: each time the other one is used.
    for slot in [0u64, 4096] {
        let d = SimDisk::from_image(disk.durable_image());
        d.corrupt(slot + 100, &[0xAA; 64]);
        let v = Volume::open_sim(&d, &manual()).expect("one valid slot is enough");
        assert!(v.status().checkpoint <= cp);
        assert!(v.status().checkpoint_trusted);
        assert_eq!(v.read(Lba(0), 1).expect("read"), data(1, 1, o.block_size));
    }
    let d = SimDisk::from_image(disk.durable_image());
    d.corrupt(100, &[0xAA; 8]);
    d.corrupt(4096 + 100, &[0xAA; 8]);
    assert!(matches!(
        Volume::open_sim(&d, &manual()),
        Err(BlockVolError::NoValidSuperblock { .. })
    ));
}

#[test]
fn a8_zero_length_operations_are_refused() {
    let (v, _d) = Volume::create_sim(&tiny(), &manual()).expect("create");
    assert!(matches!(
        v.trim(Lba(0), 0),
        Err(BlockVolError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(Lba(0), &[]),
        Err(BlockVolError::Misaligned { .. })
    ));
    assert!(matches!(
        v.read(Lba(0), 0),
        Err(BlockVolError::OutOfRange { .. })
    ));
    assert_eq!(
        v.status().head,
        Lsn(0),
        "no refused operation consumed an LSN"
    );
}

#[test]
fn b1_wal_full_timeout_burns_no_lsn() {
    let o = tiny();
    let bs = o.block_size;
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    let pin = v.pin_wal(Lsn(0)).expect("pin");
    let mut last = Lsn(0);
    let err = loop {
        match v.write(Lba(last.0 % 60), &data(last.0, 4, bs)) {
            Ok(l) => last = l,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, BlockVolError::WalFull { .. }), "{err}");
    assert_eq!(v.status().head, last, "the failed write consumed an LSN");
    // A replica fed from the log sees no hole, before and after the failed write.
    let (r, _rd) = replica_from(&v, &o);
    r.force_flush().expect("replica flush makes room");
    drop(pin);
    v.force_flush().expect("flush");
    assert_eq!(
        v.write(Lba(0), &data(7, 1, bs)).expect("write after room"),
        Lsn(last.0 + 1)
    );
    for e in v.scan_from(Lsn(last.0 + 1)).expect("scan") {
        assert_eq!(
            r.apply(&e.expect("entry")).expect("contiguous apply"),
            ApplyOutcome::Applied
        );
    }
    assert_eq!(r.status().head, v.status().head);
    assert_eq!(r.digest().expect("digest"), v.digest().expect("digest"));
}

#[test]
fn b2_concurrent_writes_to_one_lba_read_highest_lsn() {
    let o = small();
    let bs = o.block_size;
    let open = OpenOptions {
        flusher: FlusherMode::Background {
            interval: Duration::from_millis(1),
        },
        ..manual()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("b2.vol");
    let v = Arc::new(Volume::create(&path, &o, &open).expect("create"));
    let start = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let v = v.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut mine = Vec::new();
                for i in 0..150u64 {
                    let d = data(t * 1000 + i, 1, bs);
                    let l = loop {
                        match v.write(Lba(3), &d) {
                            Ok(l) => break l,
                            Err(BlockVolError::WalFull { .. }) => continue,
                            Err(e) => panic!("write: {e}"),
                        }
                    };
                    mine.push((l, d));
                    if i % 10 == 0 {
                        v.sync().expect("sync");
                    }
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<(Lsn, Vec<u8>)> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    all.sort_by_key(|(l, _)| *l);
    let newest = &all.last().expect("writes").1;
    assert_eq!(
        &v.read(Lba(3), 1).expect("read"),
        newest,
        "read must show the highest LSN"
    );
    v.force_flush().expect("flush");
    assert_eq!(&v.read(Lba(3), 1).expect("read"), newest, "after flush too");
    let v = Arc::try_unwrap(v).expect("sole owner");
    v.close().expect("close");
    let v = Volume::open(&path, &manual()).expect("reopen");
    assert_eq!(
        &v.read(Lba(3), 1).expect("read"),
        newest,
        "and after reopen"
    );
}

#[test]
fn b3_checkpoint_never_decreases_under_pins_and_partial_flushes() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    let mut last_cp = Lsn(0);
    for round in 0..6u64 {
        for i in 0..5 {
            v.write(Lba(i), &data(round * 10 + i, 1, o.block_size))
                .expect("write");
        }
        let pin = v.pin_wal(v.status().checkpoint).expect("pin");
        for target in [3, 1, 20, 0, 9] {
            let cp = v.force_flush_to(Lsn(round * 5 + target)).expect("flush_to");
            assert!(cp >= last_cp, "checkpoint went from {last_cp} to {cp}");
            last_cp = cp;
        }
        drop(pin);
    }
    assert_eq!(v.force_flush().expect("flush"), v.status().head);
}

#[test]
fn b4_released_pin_unwedges_full_wal_without_new_flush() {
    let o = tiny();
    let bs = o.block_size;
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    let pin = v.pin_wal(Lsn(0)).expect("pin");
    loop {
        match v.write(Lba(0), &data(1, 4, bs)) {
            Ok(_) => {}
            Err(BlockVolError::WalFull { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // Everything is flushed, so nothing is dirty; only the pin holds the tail.
    let cp = v.force_flush().expect("flush");
    assert_eq!(cp, v.status().head);
    assert!(matches!(
        v.write(Lba(0), &data(2, 4, bs)),
        Err(BlockVolError::WalFull { .. })
    ));
    drop(pin);
    // No flush in between: the tail must move by itself.
    v.write(Lba(0), &data(3, 4, bs))
        .expect("write after the pin is released");
    assert_eq!(v.status().tail, cp);
}

#[test]
fn b5_revoking_a_pin_releases_the_tail_while_idle() {
    let o = tiny();
    let bs = o.block_size;
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    let pin = v.pin_wal(Lsn(0)).expect("pin");
    while v.write(Lba(0), &data(1, 4, bs)).is_ok() {}
    v.force_flush().expect("flush");
    assert_eq!(v.status().pins_outstanding, 1);
    assert_eq!(v.revoke_wal_pins("replica gone too long"), 1);
    assert!(pin.is_revoked());
    assert_eq!(v.status().pins_outstanding, 0);
    assert_eq!(
        v.status().tail,
        v.status().checkpoint,
        "the tail moved without a flush"
    );
    v.write(Lba(0), &data(2, 4, bs))
        .expect("writes resume while the revoked pin is still alive");
}

#[test]
fn b6_damaged_wal_entry_stops_the_flush_with_an_error() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.write(Lba(0), &data(1, 1, o.block_size)).expect("write");
    let l2 = v.write(Lba(1), &data(2, 1, o.block_size)).expect("write");
    v.sync().expect("sync");
    let off = v.entry_file_offset(l2).expect("offset");
    disk.corrupt(off + ENTRY_HEADER_SIZE as u64 + 1, &[0x42]);
    let err = v
        .force_flush()
        .expect_err("a damaged entry must not be flushed or skipped");
    assert!(
        matches!(err, BlockVolError::Corrupt { lsn: Some(l), .. } if l == l2),
        "{err}"
    );
    assert_eq!(v.status().checkpoint, Lsn(0));
}

#[test]
fn b8_failed_sync_poisons_the_volume() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.write(Lba(0), &data(1, 1, o.block_size)).expect("write");
    disk.fail_next_syncs(1);
    let first = v.sync().expect_err("the sync fails");
    assert!(matches!(first, BlockVolError::Io { .. }), "{first}");
    // Later syncs would "succeed" after the kernel dropped the pages; they must be refused.
    match v.sync() {
        Err(BlockVolError::Poisoned { first_failure }) => assert!(first_failure.contains("msync")),
        r => panic!("expected Poisoned, got {r:?}"),
    }
    assert!(matches!(
        v.write(Lba(1), &data(2, 1, o.block_size)),
        Err(BlockVolError::Poisoned { .. })
    ));
    assert!(matches!(
        v.force_flush(),
        Err(BlockVolError::Poisoned { .. })
    ));
    assert!(v.status().poisoned);
    // Reads still work.
    assert_eq!(v.read(Lba(0), 1).expect("read"), data(1, 1, o.block_size));
}

#[test]
fn b9_role_change_while_waiting_for_wal_space_refuses_the_write() {
    let o = tiny();
    let bs = o.block_size;
    let open = OpenOptions {
        wal_full_timeout: Duration::from_secs(30),
        ..manual()
    };
    let (v, _d) = Volume::create_sim(&o, &open).expect("create");
    let v = Arc::new(v);
    let pin = v.pin_wal(Lsn(0)).expect("pin");
    // Fill the ring (with a short-timeout probe we cannot use here; fill by size instead).
    while v.status().wal_used_bytes + 3000 < v.status().wal_size_bytes {
        v.write(Lba(0), &data(1, 4, bs)).expect("fill");
    }
    let writer = {
        let v = v.clone();
        std::thread::spawn(move || v.write(Lba(0), &data(2, 8, bs)))
    };
    v.assign(Role::Stale, Epoch(1)).expect("demote");
    let r = writer.join().expect("writer");
    assert!(
        matches!(
            r,
            Err(BlockVolError::WrongRole {
                role: Role::Stale,
                ..
            })
        ),
        "a write admitted after the demotion must be refused, got {r:?}"
    );
    drop(pin);
}

#[test]
fn c2_retained_start_is_the_first_lsn_physically_present() {
    let o = tiny();
    let open = OpenOptions {
        retention: RetentionPolicy {
            keep_entries: 3,
            keep_bytes: 0,
        },
        ..manual()
    };
    let (v, _d) = Volume::create_sim(&o, &open).expect("create");
    for i in 0..10 {
        v.write(Lba(i), &data(i, 1, o.block_size)).expect("write");
    }
    v.force_flush().expect("flush");
    let s = v.status();
    assert_eq!(s.checkpoint, Lsn(10));
    assert_eq!(
        s.retained_start,
        Lsn(8),
        "three entries of history kept behind the checkpoint"
    );
    assert_eq!(v.scan_from(s.retained_start).expect("scan").count(), 3);
    assert!(matches!(
        v.scan_from(Lsn(7)),
        Err(BlockVolError::Recycled {
            retained_start: Lsn(8),
            ..
        })
    ));
    assert_eq!(v.entry_info(s.tail).expect("tail info").lsn, Lsn(7));
}

#[test]
fn c4_committed_is_set_by_replication_not_by_the_checkpoint() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    for i in 0..4 {
        v.write(Lba(i), &data(i, 1, o.block_size)).expect("write");
    }
    v.force_flush().expect("flush");
    assert_eq!(v.status().checkpoint, Lsn(4));
    assert_eq!(v.status().committed, Lsn(0));
    v.set_committed(Lsn(2));
    assert_eq!(v.status().committed, Lsn(2));
}

#[test]
fn d4_replica_accepts_retained_entries_from_older_epochs() {
    let o = tiny();
    let (r, _d) = Volume::create_sim(&o, &manual()).expect("create");
    r.assign(Role::Replica, Epoch(3)).expect("assign");
    for (i, epoch) in [(1u64, 1u64), (2, 1), (3, 2), (4, 3)] {
        let e = WalEntry {
            lsn: Lsn(i),
            epoch: blockvol::Epoch(epoch),
            kind: EntryKind::Write {
                lba: Lba(i),
                data: data(i, 1, o.block_size),
            },
        };
        assert_eq!(
            r.apply(&e).expect("older epochs are fine"),
            ApplyOutcome::Applied
        );
    }
    let future = WalEntry {
        lsn: Lsn(5),
        epoch: Epoch(4),
        kind: EntryKind::Barrier,
    };
    assert!(matches!(
        r.apply(&future),
        Err(BlockVolError::EntryEpochAhead { .. })
    ));
}

#[test]
fn d5_divergent_tail_is_truncated_and_replica_converges() {
    let o = tiny();
    let bs = o.block_size;
    let gate = OpenOptions {
        flush_gate: FlushGate::Committed,
        ..manual()
    };
    // Old primary history: 1..=8, of which 1..=4 were committed.
    let (r, rd) = Volume::create_sim(&o, &gate).expect("replica");
    r.assign(Role::Replica, Epoch(1)).expect("assign");
    let entry = |lsn: u64, tag: u64, epoch: u64| WalEntry {
        lsn: Lsn(lsn),
        epoch: blockvol::Epoch(epoch),
        kind: EntryKind::Write {
            lba: Lba(lsn),
            data: data(tag, 1, bs),
        },
    };
    for i in 1..=8 {
        r.apply(&entry(i, i, 1)).expect("apply");
    }
    r.set_committed(Lsn(4));
    // The flusher may not pass committed, so the uncommitted suffix stays truncatable.
    assert_eq!(r.force_flush().expect("flush"), Lsn(4));
    // New primary: same 1..=4, then its own 5..=10 at epoch 2.
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    p.assign(Role::Replica, Epoch(1)).expect("assign");
    for i in 1..=4 {
        p.apply(&entry(i, i, 1)).expect("apply");
    }
    p.assign(Role::Primary, Epoch(2)).expect("promote");
    for i in 5..=10 {
        p.write(Lba(i), &data(100 + i, 1, bs)).expect("write");
    }
    // Catch-up without truncation is refused as divergent, never silently skipped.
    let e5 = p
        .scan_from(Lsn(5))
        .expect("scan")
        .next()
        .expect("entry")
        .expect("ok");
    r.assign(Role::Replica, Epoch(2)).expect("assign");
    assert!(matches!(
        r.apply(&e5),
        Err(BlockVolError::Divergent { lsn: Lsn(5), .. })
    ));
    assert!(matches!(
        r.truncate_after(Lsn(3)),
        Err(BlockVolError::BelowCheckpoint { .. })
    ));
    r.truncate_after(Lsn(4)).expect("truncate");
    for e in p.scan_from(Lsn(5)).expect("scan") {
        r.apply(&e.expect("entry")).expect("apply");
    }
    assert_eq!(r.digest().expect("digest"), p.digest().expect("digest"));
    r.sync().expect("sync");
    drop(r);
    let r = reopen_durable(&rd);
    assert_eq!(r.digest().expect("digest"), p.digest().expect("digest"));
}

#[test]
fn d6_concurrent_apply_of_one_lsn_appends_once() {
    let o = tiny();
    let (r, _d) = Volume::create_sim(&o, &manual()).expect("create");
    r.assign(Role::Replica, Epoch(1)).expect("assign");
    let r = Arc::new(r);
    let e = WalEntry {
        lsn: Lsn(1),
        epoch: Epoch(1),
        kind: EntryKind::Write {
            lba: Lba(0),
            data: data(1, 1, o.block_size),
        },
    };
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let r = r.clone();
            let e = e.clone();
            std::thread::spawn(move || r.apply(&e).expect("apply"))
        })
        .collect();
    let outcomes: Vec<ApplyOutcome> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ApplyOutcome::Applied)
            .count(),
        1
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ApplyOutcome::Duplicate)
            .count(),
        7
    );
    assert_eq!(r.status().head, Lsn(1));
}

#[test]
fn e1_full_base_under_continuous_writes_equals_primary_at_base_lsn() {
    let o = blockvol::CreateOptions {
        volume_size_bytes: 1 << 20,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    };
    let bs = o.block_size;
    let dir = tempfile::tempdir().expect("tempdir");
    let open = OpenOptions {
        flusher: FlusherMode::Background {
            interval: Duration::from_millis(2),
        },
        wal_full_timeout: Duration::from_millis(20),
        ..OpenOptions::default()
    };
    let p = Arc::new(Volume::create(dir.path().join("p.vol"), &o, &open).expect("primary"));
    // Dirty some LBAs before the base is taken.
    for i in 0..40u64 {
        p.write(Lba(i), &data(i, 1, bs)).expect("write");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let p = p.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Rewrites LBAs that were dirty when the base was pinned. While the base pin
                // fences the flusher the ring can fill; a full ring is a clean, retryable error.
                match p.write(Lba(i % 48), &data(10_000 + i, 1, bs)) {
                    Ok(_) => i += 1,
                    Err(BlockVolError::WalFull { .. }) => continue,
                    Err(e) => panic!("write: {e}"),
                }
                if i.is_multiple_of(8) {
                    p.sync().expect("sync");
                }
            }
            i
        })
    };
    while p.status().head.0 < 80 {
        std::thread::yield_now();
    }
    let at = p.sync().expect("sync");
    let base = p.pin_base(at).expect("pin base");
    assert_eq!(base.lsn(), at);
    let r = Volume::create(dir.path().join("r.vol"), &o, &manual()).expect("replica");
    r.assign(Role::Rebuilding, Epoch(0)).expect("assign");
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    for c in base.reader(64 * 1024) {
        inst.write_chunk(&c.expect("chunk")).expect("write chunk");
    }
    inst.finish().expect("finish");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    assert!(written > 0);
    let h = p.sync().expect("sync");
    assert!(h > at, "writes continued while the base was pinned");
    // Tail replay from base + 1 to H; the base pin keeps that range in the WAL.
    for e in p
        .scan_from(Lsn(at.0 + 1))
        .expect("the tail after the base is retained")
    {
        assert_eq!(
            r.apply(&e.expect("entry")).expect("apply"),
            ApplyOutcome::Applied
        );
    }
    drop(base);
    assert_eq!(r.status().head, h);
    assert_eq!(r.digest().expect("digest"), p.digest().expect("digest"));
}

#[test]
fn e3_install_pauses_the_flusher_and_refuses_apply_until_finished() {
    let o = tiny();
    let bs = o.block_size;
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    for i in 0..5 {
        p.write(Lba(i), &data(i, 1, bs)).expect("write");
    }
    let base = p.pin_base(Lsn(5)).expect("pin");
    let (r, rd) = Volume::create_sim(&o, &manual()).expect("replica");
    r.assign(Role::Rebuilding, Epoch(0)).expect("assign");
    // Stale dirty entries on the replica must not be flushed over the installed image.
    r.apply(&WalEntry {
        lsn: Lsn(1),
        epoch: Epoch(0),
        kind: EntryKind::Write {
            lba: Lba(2),
            data: data(777, 1, bs),
        },
    })
    .expect("apply");
    r.sync().expect("sync");
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    let probe = WalEntry {
        lsn: Lsn(2),
        epoch: Epoch(0),
        kind: EntryKind::Barrier,
    };
    assert!(matches!(
        r.apply(&probe),
        Err(BlockVolError::InstallIncomplete { .. })
    ));
    assert!(matches!(
        r.force_flush(),
        Err(BlockVolError::InstallIncomplete { .. })
    ));
    assert!(matches!(
        r.scan_from(Lsn(1)),
        Err(BlockVolError::InstallIncomplete { .. })
    ));
    assert!(r.status().install_incomplete && !r.status().checkpoint_trusted);
    for c in base.reader(4096) {
        inst.write_chunk(&c.expect("chunk")).expect("chunk");
    }
    // A crash before finish leaves the volume marked incomplete.
    let crashed = SimDisk::from_image(rd.crash_image_with(1, CrashMode::AllWritten));
    {
        let c = Volume::open_sim(&crashed, &manual()).expect("an incomplete volume still opens");
        assert!(c.status().install_incomplete);
        assert!(!c.status().checkpoint_trusted);
        assert!(matches!(
            c.apply(&probe),
            Err(BlockVolError::InstallIncomplete { .. })
        ));
        assert!(matches!(
            c.read(Lba(0), 1),
            Err(BlockVolError::InstallIncomplete { .. })
        ));
    }
    inst.finish().expect("finish");
    assert_eq!(r.digest().expect("digest"), p.digest().expect("digest"));
    assert!(r.status().checkpoint_trusted);
}

#[test]
fn f1_snapshot_lsn_is_the_contiguous_checkpoint_and_image_matches() {
    let o = tiny();
    let bs = o.block_size;
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    let mut ops = Vec::new();
    for i in 0..12u64 {
        let d = data(i, 1, bs);
        p.write(Lba(i % 5), &d).expect("write");
        ops.push(Op::Write {
            lba: i % 5,
            data: d,
        });
    }
    p.force_flush_to(Lsn(7)).expect("flush");
    // Writes after the snapshot is pinned do not reach its image.
    let snap = p.pin_snapshot().expect("snapshot");
    assert_eq!(snap.lsn(), Lsn(7));
    for i in 0..5u64 {
        p.write(Lba(i), &data(900 + i, 1, bs)).expect("write");
    }
    assert_eq!(p.force_flush().expect("flush is fenced"), Lsn(7));
    let (r, _rd) = Volume::create_sim(&o, &manual()).expect("replica");
    let mut inst = r.begin_base_install(snap.install_spec()).expect("begin");
    for c in snap.reader(1024) {
        inst.write_chunk(&c.expect("chunk")).expect("chunk");
    }
    inst.finish().expect("finish");
    assert_eq!(r.digest().expect("digest"), Model::at(&o, &ops, 7).digest());
    assert_eq!(r.status().head, Lsn(7));
}

#[test]
fn f2_install_rejects_a_corrupted_chunk_before_writing() {
    let o = tiny();
    let bs = o.block_size;
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    p.write(Lba(3), &data(3, 2, bs)).expect("write");
    let base = p.pin_base(Lsn(1)).expect("pin");
    let (r, _rd) = Volume::create_sim(&o, &manual()).expect("replica");
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    let mut chunk = base.reader(4096).next().expect("one chunk").expect("ok");
    chunk.data[5] ^= 0x01;
    assert!(matches!(
        inst.write_chunk(&chunk),
        Err(BlockVolError::ChunkChecksum { lba: Lba(3), .. })
    ));
    drop(inst);
    // Nothing of the bad chunk reached the extent, and the volume says it is incomplete.
    assert!(r.status().install_incomplete);
}

#[test]
fn g1_persisted_role_and_epoch_survive_reopen_and_a_primary_comes_back_fenced() {
    let o = tiny();
    let (v, disk) = Volume::create_sim(&o, &manual()).expect("create");
    v.assign(Role::Primary, Epoch(3)).expect("promote");
    v.write(Lba(0), &data(1, 1, o.block_size)).expect("write");
    v.sync().expect("sync");
    drop(v);
    let v = reopen_durable(&disk);
    let s = v.status();
    assert_eq!((s.role, s.epoch), (Role::Stale, Epoch(3)));
    assert!(matches!(
        v.write(Lba(0), &data(2, 1, o.block_size)),
        Err(BlockVolError::WrongRole { .. })
    ));
    assert!(matches!(
        v.assign(Role::Primary, Epoch(2)),
        Err(BlockVolError::EpochRegression {
            current: Epoch(3),
            requested: Epoch(2)
        })
    ));
    v.assign(Role::Primary, Epoch(3))
        .expect("re-assign at the same epoch");
    assert!(matches!(
        v.write_in_epoch(Epoch(2), Lba(0), &data(3, 1, o.block_size)),
        Err(BlockVolError::StaleEpoch {
            given: Epoch(2),
            current: Epoch(3)
        })
    ));
    v.write_in_epoch(Epoch(3), Lba(0), &data(4, 1, o.block_size))
        .expect("write at the current epoch");
}

/// Found by the network simulator (D52): a replica told a committed point by its old primary
/// kept it through a base install of an older image, above its new head; promoted later, it
/// planned its replicas against entries it never held and none of them could ever be
/// rebuilt. Finishing an install sets the committed point to the image's LSN.
#[test]
fn a_finished_install_sets_the_committed_point_to_its_base() {
    let o = tiny();
    let bs = o.block_size;
    let (p, _pd) = Volume::create_sim(&o, &manual()).expect("primary");
    for i in 0..10u64 {
        p.write(Lba(i), &data(i, 1, bs)).expect("write");
    }
    let (r, _rd) = Volume::create_sim(&o, &manual()).expect("replica");
    r.assign(Role::Replica, Epoch(0)).expect("assign");
    for i in 1..=20u64 {
        r.apply(&WalEntry {
            lsn: Lsn(i),
            epoch: Epoch(0),
            kind: EntryKind::Write {
                lba: Lba(i),
                data: data(7000 + i, 1, bs),
            },
        })
        .expect("apply");
    }
    r.set_committed(Lsn(20));
    let base = p.pin_base(Lsn(10)).expect("pin base");
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    for c in base.reader(4096) {
        inst.write_chunk(&c.expect("chunk")).expect("write chunk");
    }
    inst.finish().expect("finish");
    let s = r.status();
    assert_eq!((s.head, s.committed), (Lsn(10), Lsn(10)));
}
