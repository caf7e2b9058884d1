//! Retention pins, scans and their boundaries, including a scan racing the flusher and a
//! writer that wraps the ring.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockvol::{BlockVolError, Epoch, FlusherMode, Lba, Lsn, OpenOptions, RetentionPolicy, Volume};
use common::{Op, data, manual, tiny};

fn written(v: &Volume, n: u64, bs: u32) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let d = data(i, 1, bs);
            v.write(Lba(i % 60), &d).expect("write");
            Op::Write {
                lba: i % 60,
                data: d,
            }
        })
        .collect()
}

#[test]
fn pin_after_x_keeps_x_plus_one_and_scan_from_x_is_recycled() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    let ops = written(&v, 10, o.block_size);
    let pin = v.pin_wal(Lsn(4)).expect("pin");
    assert_eq!(pin.lsn(), Lsn(4));
    assert_eq!(v.force_flush().expect("flush"), Lsn(10));
    let s = v.status();
    assert_eq!(s.tail, Lsn(4), "the pin on 4 keeps 5.. and lets 4 go");
    assert_eq!(s.retained_start, Lsn(5));
    let got: Vec<Op> = v
        .scan_from(Lsn(5))
        .expect("scan from x+1")
        .map(|e| Op::from_entry(&e.expect("entry")))
        .collect();
    assert_eq!(got, ops[4..].to_vec());
    assert!(matches!(
        v.scan_from(Lsn(4)),
        Err(BlockVolError::Recycled {
            requested: Lsn(4),
            retained_start: Lsn(5)
        })
    ));
    // Pinning below the tail is refused atomically; pinning at the tail is fine.
    assert!(matches!(
        v.pin_wal(Lsn(3)),
        Err(BlockVolError::Recycled { .. })
    ));
    let again = v.pin_wal(Lsn(4)).expect("pin at the tail");
    assert_eq!(v.status().pins_outstanding, 2);
    drop(pin);
    drop(again);
    assert_eq!(v.status().pins_outstanding, 0);
    v.force_flush().expect("flush");
    assert_eq!(v.status().tail, Lsn(10));
    // entry_info works for the tail entry even though it was recycled.
    assert_eq!(v.entry_info(Lsn(10)).expect("tail info").lsn, Lsn(10));
    assert!(matches!(
        v.entry_info(Lsn(9)),
        Err(BlockVolError::Recycled { .. })
    ));
    assert_eq!(
        v.entry_info(Lsn(0)).expect("origin"),
        blockvol::EntryInfo::ORIGIN
    );
}

#[test]
fn scan_yields_exactly_the_range_captured_at_creation() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    written(&v, 6, o.block_size);
    let scan = v.scan_from(Lsn(3)).expect("scan");
    assert_eq!(scan.end(), Lsn(6));
    v.write(Lba(1), &data(99, 1, o.block_size))
        .expect("write during scan");
    let lsns: Vec<u64> = scan.map(|e| e.expect("entry").lsn.0).collect();
    assert_eq!(lsns, vec![3, 4, 5, 6]);
    // An empty scan from head + 1 is allowed; beyond that is an error.
    assert_eq!(v.scan_from(Lsn(8)).expect("empty").count(), 0);
    assert!(matches!(
        v.scan_from(Lsn(9)),
        Err(BlockVolError::BeyondHead { .. })
    ));
    assert!(matches!(
        v.scan_from(Lsn(0)),
        Err(BlockVolError::InvalidArgument(_))
    ));
}

#[test]
fn an_open_scan_holds_its_range_against_the_flusher() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    written(&v, 8, o.block_size);
    let mut scan = v.scan_from(Lsn(2)).expect("scan");
    assert_eq!(scan.next().expect("first").expect("ok").lsn, Lsn(2));
    v.force_flush().expect("flush");
    assert_eq!(
        v.status().tail,
        Lsn(1),
        "the scan's read pin holds the tail"
    );
    let rest: Vec<u64> = scan.map(|e| e.expect("entry").lsn.0).collect();
    assert_eq!(rest, vec![3, 4, 5, 6, 7, 8]);
}

#[test]
fn revoked_scan_pin_reports_recycled_instead_of_a_short_scan() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    written(&v, 8, o.block_size);
    let mut scan = v.scan_from(Lsn(1)).expect("scan");
    assert!(scan.next().expect("first").is_ok());
    assert_eq!(v.revoke_wal_pins("admin"), 1);
    v.force_flush().expect("flush");
    match scan.next() {
        Some(Err(BlockVolError::Recycled {
            requested: Lsn(2),
            retained_start: Lsn(9),
        })) => {}
        other => panic!("expected Recycled, got {other:?}"),
    }
    assert!(
        scan.next().is_none(),
        "the scan ends after reporting the error"
    );
}

#[test]
fn truncation_invalidates_an_open_scan() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    v.assign(blockvol::Role::Replica, Epoch(0)).expect("assign");
    for i in 1..=6u64 {
        v.apply(&blockvol::WalEntry {
            lsn: Lsn(i),
            epoch: Epoch(0),
            kind: blockvol::EntryKind::Barrier,
        })
        .expect("apply");
    }
    let mut scan = v.scan_from(Lsn(1)).expect("scan");
    assert!(scan.next().expect("first").is_ok());
    v.truncate_after(Lsn(3)).expect("truncate");
    assert!(matches!(
        scan.next(),
        Some(Err(BlockVolError::ScanInvalidated { at: Lsn(2) }))
    ));
}

#[test]
fn retention_keeps_history_behind_the_checkpoint_but_yields_under_pressure() {
    let o = tiny();
    let bs = o.block_size;
    let open = OpenOptions {
        retention: RetentionPolicy {
            keep_entries: 1_000_000,
            keep_bytes: 0,
        },
        ..manual()
    };
    let (v, _d) = Volume::create_sim(&o, &open).expect("create");
    written(&v, 10, bs);
    v.force_flush().expect("flush");
    assert_eq!(
        v.status().tail,
        Lsn(0),
        "policy keeps everything while there is room"
    );
    // Fill the ring: the soft policy gives way instead of failing writes.
    for i in 0..200u64 {
        v.write(Lba(i % 60), &data(i, 4, bs))
            .expect("retention never blocks writes");
        if i % 10 == 9 {
            v.force_flush().expect("flush");
        }
    }
    assert!(v.status().tail > Lsn(0));
    v.set_retention(RetentionPolicy {
        keep_entries: 0,
        keep_bytes: 0,
    });
    v.force_flush().expect("flush");
    assert_eq!(v.status().tail, v.status().checkpoint);
}

#[test]
fn retention_by_bytes_keeps_at_least_that_many_bytes() {
    let o = tiny();
    let open = OpenOptions {
        retention: RetentionPolicy {
            keep_entries: 0,
            keep_bytes: 2000,
        },
        ..manual()
    };
    let (v, _d) = Volume::create_sim(&o, &open).expect("create");
    written(&v, 10, o.block_size);
    v.force_flush().expect("flush");
    // Each one-block entry takes 576 bytes: four entries cover 2000 bytes.
    assert_eq!(v.status().retained_start, Lsn(7));
}

#[test]
fn c1_scan_under_flusher_and_wrap_is_contiguous_or_typed_error() {
    let o = tiny();
    let bs = o.block_size;
    let open = OpenOptions {
        flusher: FlusherMode::Background {
            interval: Duration::from_millis(1),
        },
        wal_full_timeout: Duration::from_millis(20),
        ..OpenOptions::default()
    };
    let (v, _d) = Volume::create_sim(&o, &open).expect("create");
    let v = Arc::new(v);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let v = v.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match v.write(Lba(i % 60), &data(i, 1 + i % 3, bs)) {
                    Ok(_) => i += 1,
                    Err(BlockVolError::WalFull { .. }) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            i
        })
    };
    let revoker = {
        let v = v.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(3));
                n += v.revoke_wal_pins("pressure test");
            }
            n
        })
    };
    let mut complete = 0;
    let mut recycled = 0;
    let mut entries = 0u64;
    let mut rounds = 0;
    // Keep scanning until the writer has wrapped the 64 KiB ring many times over and at least
    // one scan saw entries. On a loaded machine the flusher can recycle everything between
    // status() and the scan for a long stretch, so seeing entries takes a while (bounded).
    let started = std::time::Instant::now();
    while (v.status().head.0 < 3000 || rounds < 50 || entries == 0 || complete == 0)
        && started.elapsed() < Duration::from_secs(60)
    {
        rounds += 1;
        let start = v.status().retained_start;
        let scan = match v.scan_from(start) {
            Ok(s) => s,
            // The tail may have moved between status() and scan_from().
            Err(BlockVolError::Recycled { .. }) => continue,
            Err(e) => panic!("scan_from: {e}"),
        };
        let end = scan.end();
        let mut expect = start.0;
        let mut failed = false;
        for item in scan {
            match item {
                Ok(e) => {
                    assert_eq!(e.lsn.0, expect, "scan skipped or repeated an LSN");
                    expect += 1;
                    entries += 1;
                }
                Err(BlockVolError::Recycled { requested, .. }) => {
                    assert_eq!(requested.0, expect);
                    recycled += 1;
                    failed = true;
                }
                Err(e) => panic!("unexpected scan error: {e}"),
            }
        }
        if !failed {
            assert_eq!(
                expect,
                end.0 + 1,
                "a scan without an error must reach its end"
            );
            complete += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().expect("writer");
    let revoked = revoker.join().expect("revoker");
    assert!(
        w > 0 && entries > 0 && complete > 0,
        "writes {w}, entries {entries}, complete {complete}"
    );
    // Every error was a typed Recycled caused by a revocation, never a silent short scan.
    assert!(recycled == 0 || revoked > 0);
    let s = v.status();
    assert!(
        s.tail <= s.checkpoint && s.checkpoint <= s.durable && s.durable <= s.head,
        "{s:?}"
    );
}

#[test]
fn base_pins_fence_the_flusher_at_the_lowest_and_refuse_what_they_cannot_hold() {
    let o = tiny();
    let gate = OpenOptions {
        flush_gate: blockvol::FlushGate::Committed,
        ..manual()
    };
    let (v, _d) = Volume::create_sim(&o, &gate).expect("create");
    written(&v, 10, o.block_size);
    v.set_committed(Lsn(8));
    // Beyond the committed gate: refused with a reason.
    assert!(matches!(
        v.pin_base(Lsn(9)),
        Err(BlockVolError::BaseUnavailable { .. })
    ));
    assert!(matches!(
        v.pin_base(Lsn(11)),
        Err(BlockVolError::BeyondHead { .. })
    ));
    let a = v.pin_base(Lsn(4)).expect("base at 4");
    assert_eq!(
        v.status().checkpoint,
        Lsn(4),
        "pin_base flushes exactly to its LSN"
    );
    let b = v.pin_snapshot().expect("a snapshot at the same point");
    assert_eq!(b.lsn(), Lsn(4));
    assert_eq!(v.status().pins_outstanding, 2, "each base pin counts once");
    assert_eq!(a.entry_info(), b.entry_info());
    // A higher base cannot be made while a lower fence holds the flusher.
    assert!(matches!(
        v.pin_base(Lsn(6)),
        Err(BlockVolError::BaseUnavailable { .. })
    ));
    assert_eq!(v.force_flush().expect("flush"), Lsn(4), "the fence holds");
    drop(a);
    assert_eq!(
        v.force_flush().expect("flush"),
        Lsn(4),
        "the other fence still holds"
    );
    drop(b);
    assert_eq!(
        v.force_flush().expect("flush"),
        Lsn(8),
        "then the gate is the limit"
    );
    // The checkpoint has passed 4: an exact base there no longer exists.
    match v.pin_base(Lsn(4)) {
        Err(BlockVolError::BaseUnavailable {
            requested,
            checkpoint,
            ..
        }) => {
            assert_eq!((requested, checkpoint), (Lsn(4), Lsn(8)));
        }
        r => panic!("expected BaseUnavailable, got {r:?}"),
    }
    assert_eq!(v.status().pins_outstanding, 0);
}

#[test]
fn base_reader_skips_zero_runs_and_reports_both_counts() {
    let o = tiny();
    let (v, _d) = Volume::create_sim(&o, &manual()).expect("create");
    v.write(Lba(10), &data(1, 3, o.block_size)).expect("write");
    v.write(Lba(40), &data(2, 1, o.block_size)).expect("write");
    let base = v.pin_base(Lsn(2)).expect("pin");
    let mut r = base.reader(8 * 512);
    let chunks: Vec<blockvol::BaseChunk> = r.by_ref().map(|c| c.expect("chunk")).collect();
    let spans: Vec<(u64, u32)> = chunks.iter().map(|c| (c.lba.0, c.blocks)).collect();
    assert_eq!(spans, vec![(10, 3), (40, 1)]);
    for c in &chunks {
        c.verify().expect("crc");
    }
    assert_eq!(r.bytes_scanned(), 64 * 512);
    assert_eq!(r.bytes_sent(), 4 * 512);
}
