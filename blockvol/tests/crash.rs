//! The crash plan of reference-blockvol.md 10.6: scripted workloads on a simulated disk that
//! keeps written and synced bytes apart; at every sync boundary (before and after each sync,
//! including those inside flush cycles and superblock writes) crash images are built by
//! dropping and tearing unsynced sectors, reopened, and checked against six invariants:
//!
//! 1. every LSN at or below the last sync-acknowledged LSN is readable with its data;
//! 2. the recovered contents equal the model at the recovered head (a prefix state);
//! 3. the recovered head is at least the acknowledged LSN, at most the appended one, and the
//!    retained LSNs scan contiguously with the model's operations;
//! 4. writing after reopen never changes data at LSNs at or below the recovered head;
//! 5. reopening twice gives the same state;
//! 6. the checkpoint never decreases across reopen.

mod common;

use std::sync::{Arc, Mutex};

use blockvol::{
    CrashMode, CreateOptions, Lsn, OpenOptions, RetentionPolicy, SimDisk, SyncPoint, Volume,
};
use common::{Model, Op, data, manual, tiny};

#[derive(Default)]
struct Oracle {
    ops: Vec<Op>,
    acked: u64,
    checkpoint_floor: u64,
    images_checked: usize,
    label: String,
}

fn check_image(
    opts: &CreateOptions,
    img: Vec<u8>,
    ops: &[Op],
    acked: u64,
    cp_floor: u64,
    what: &str,
) {
    let disk = SimDisk::from_image(img);
    let v =
        Volume::open_sim(&disk, &manual()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let s = v.status();
    let head = s.head.0;
    let appended = ops.len() as u64;
    assert!(
        head >= acked,
        "{what}: recovered head {head} below the acknowledged {acked}"
    );
    assert!(
        head <= appended,
        "{what}: recovered head {head} beyond the appended {appended}"
    );
    assert!(
        s.checkpoint.0 >= cp_floor,
        "{what}: checkpoint {} below the persisted {cp_floor}",
        s.checkpoint
    );
    assert!(
        s.tail <= s.checkpoint && s.checkpoint <= s.durable && s.durable == s.head,
        "{what}: {s:?}"
    );
    assert!(
        s.checkpoint_trusted,
        "{what}: a crash alone must not make the checkpoint untrusted"
    );
    let model = Model::at(opts, ops, head);
    assert_eq!(
        v.digest().expect("digest"),
        model.digest(),
        "{what}: contents differ from the model at lsn {head}"
    );
    // The retained range scans contiguously and matches the model's operations.
    let mut expect = s.retained_start.0;
    for e in v.scan_from(s.retained_start).expect("scan") {
        let e = e.unwrap_or_else(|err| panic!("{what}: scan failed at {expect}: {err}"));
        assert_eq!(e.lsn.0, expect, "{what}: scan not contiguous");
        assert_eq!(
            Op::from_entry(&e),
            ops[(expect - 1) as usize],
            "{what}: entry {expect} differs"
        );
        expect += 1;
    }
    assert_eq!(expect, head + 1, "{what}: scan ended early");
    drop(v);
    // Invariant 5: a second open sees exactly the same state.
    let v = Volume::open_sim(&disk, &manual()).expect("second reopen");
    let s2 = v.status();
    assert_eq!(
        (s2.head, s2.tail, s2.checkpoint, s2.generation),
        (s.head, s.tail, s.checkpoint, s.generation),
        "{what}: second reopen differs"
    );
    assert_eq!(
        v.digest().expect("digest"),
        model.digest(),
        "{what}: second reopen contents differ"
    );
    // Invariant 4: a write after recovery lands at head + 1 and changes nothing older.
    let extra = data(0xE0E0 + head, 1, opts.block_size);
    let lsn = v.write(5, &extra).expect("write after reopen");
    assert_eq!(
        lsn,
        Lsn(head + 1),
        "{what}: the first write after recovery must take head + 1"
    );
    v.sync().expect("sync after reopen");
    drop(v);
    let after = SimDisk::from_image(disk.crash_image_with(0, CrashMode::DurableOnly));
    let v = Volume::open_sim(&after, &manual()).expect("reopen after the post-recovery write");
    assert_eq!(
        v.status().head,
        Lsn(head + 1),
        "{what}: post-recovery write lost"
    );
    assert!(
        v.status().checkpoint >= s.checkpoint,
        "{what}: checkpoint went backwards"
    );
    let mut m = model.clone();
    m.apply(&Op::Write {
        lba: 5,
        data: extra,
    });
    assert_eq!(
        v.digest().expect("digest"),
        m.digest(),
        "{what}: post-recovery write changed older data"
    );
}

/// Runs `workload` with a hook that checks crash images at every sync boundary.
fn run_crash_plan(
    opts: CreateOptions,
    open: OpenOptions,
    workload: impl FnOnce(&Volume, &Arc<Mutex<Oracle>>),
) -> usize {
    let (v, disk) = Volume::create_sim(&opts, &open).expect("create");
    let oracle = Arc::new(Mutex::new(Oracle::default()));
    let o = oracle.clone();
    let hook_opts = opts.clone();
    disk.set_sync_hook(Some(Arc::new(move |d: &SimDisk, p: &SyncPoint| {
        let (ops, acked, cp, label) = {
            let g = o.lock().expect("oracle");
            (g.ops.clone(), g.acked, g.checkpoint_floor, g.label.clone())
        };
        let seed = p.index * 2 + u64::from(p.after);
        let modes = [
            CrashMode::DurableOnly,
            CrashMode::AllWritten,
            CrashMode::RandomSectors,
            CrashMode::RandomSectorsTorn,
        ];
        for mode in modes {
            let what = format!(
                "{label}: sync #{} ({}), {mode:?}, seed {seed}",
                p.index,
                if p.after { "after" } else { "before" }
            );
            check_image(
                &hook_opts,
                d.crash_image_with(seed, mode),
                &ops,
                acked,
                cp,
                &what,
            );
        }
        o.lock().expect("oracle").images_checked += modes.len();
    })));
    workload(&v, &oracle);
    disk.set_sync_hook(None);
    oracle.lock().expect("oracle").images_checked
}

fn record(o: &Arc<Mutex<Oracle>>, lsn: Lsn, op: Op) {
    let mut g = o.lock().expect("oracle");
    assert_eq!(lsn.0, g.ops.len() as u64 + 1, "LSNs must be contiguous");
    g.ops.push(op);
}

fn ack(o: &Arc<Mutex<Oracle>>, durable: Lsn) {
    o.lock().expect("oracle").acked = durable.0;
}

fn checkpointed(o: &Arc<Mutex<Oracle>>, cp: Lsn) {
    o.lock().expect("oracle").checkpoint_floor = cp.0;
}

fn label(o: &Arc<Mutex<Oracle>>, l: &str) {
    o.lock().expect("oracle").label = l.to_string();
}

#[test]
fn crash_plan_writes_trims_syncs_and_flushes_across_wraps() {
    let opts = tiny();
    let bs = opts.block_size;
    let n = run_crash_plan(opts, manual(), |v, o| {
        label(o, "mixed");
        for i in 0..90u64 {
            let lba = (i * 7) % 60;
            let blocks = 1 + i % 4;
            if i % 11 == 5 {
                let lsn = v.trim(lba, blocks).expect("trim");
                record(o, lsn, Op::Trim { lba, blocks });
            } else if i % 17 == 3 {
                let lsn = v.barrier().expect("barrier");
                record(o, lsn, Op::Barrier);
            } else {
                let d = data(i, blocks, bs);
                let lsn = v.write(lba, &d).expect("write");
                record(o, lsn, Op::Write { lba, data: d });
            }
            if i % 3 == 2 {
                let d = v.sync().expect("sync");
                ack(o, d);
            }
            if i % 9 == 8 {
                let cp = v.force_flush().expect("flush");
                ack(o, v.status().durable);
                checkpointed(o, cp);
            }
        }
        let d = v.sync().expect("final sync");
        ack(o, d);
        assert!(v.status().generation == 1);
    });
    eprintln!("mixed: {n} images");
    assert!(n > 400, "only {n} crash images were checked");
}

#[test]
fn crash_plan_partial_flushes_with_retention_keep_history() {
    let opts = tiny();
    let bs = opts.block_size;
    let open = manual();
    let n = run_crash_plan(opts, open, |v, o| {
        label(o, "retention");
        v.set_retention(RetentionPolicy {
            keep_entries: 6,
            keep_bytes: 0,
        });
        for i in 0..70u64 {
            let lba = (i * 13) % 62;
            let d = data(1000 + i, 2, bs);
            let lsn = v.write(lba, &d).expect("write");
            record(o, lsn, Op::Write { lba, data: d });
            if i % 4 == 3 {
                let d = v.sync().expect("sync");
                ack(o, d);
            }
            if i % 10 == 9 {
                // Flush to a point in the middle of what is durable, so the checkpoint, the
                // tail and the head all differ.
                let target = Lsn(v.status().head.0 - 3);
                let cp = v.force_flush_to(target).expect("flush_to");
                ack(o, v.status().durable);
                checkpointed(o, cp);
                assert_eq!(cp, target);
            }
        }
    });
    assert!(n > 200, "only {n} crash images were checked");
}

#[test]
fn crash_plan_large_multiblock_entries_and_overwrites() {
    let opts = tiny();
    let bs = opts.block_size;
    let n = run_crash_plan(opts, manual(), |v, o| {
        label(o, "large");
        for i in 0..40u64 {
            // Up to 24 KiB entries: a lap holds only a few, so padding and skips are frequent.
            let blocks = 8 + (i * 5) % 41;
            let lba = (i * 3) % (64 - blocks);
            let d = data(5000 + i, blocks, bs);
            let lsn = v.write(lba, &d).expect("write");
            record(o, lsn, Op::Write { lba, data: d });
            let d = v.sync().expect("sync");
            ack(o, d);
            if i % 2 == 1 {
                let cp = v.force_flush().expect("flush");
                checkpointed(o, cp);
            }
        }
    });
    assert!(n > 100, "only {n} crash images were checked");
}
