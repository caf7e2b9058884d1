//! The crash plan of reference-blockvol.md 10.6 on scripted workloads: a simulated disk keeps
//! written and synced bytes apart; at every sync boundary (before and after each sync,
//! including those inside flush cycles and superblock writes) crash images are built by
//! dropping and tearing unsynced sectors, and by tearing the last sector of the newest entry,
//! then reopened and checked against the six invariants (see `common/crashplan.rs`).
//! `crash_random.rs` runs the same checks on random workloads.

mod common;

use blockvol::{Epoch, Lba, Lsn, RetentionPolicy};
use common::crashplan::{ack, checkpointed, label, record, run_crash_plan};
use common::{Op, data, manual, tiny};

/// Every crash image of sync point `sp`: the four crash modes, then (when few sectors differ)
/// each unsynced sector alone and each left out, labelled.
fn crash_images(d: &blockvol::SimDisk, sp: &blockvol::SyncPoint) -> Vec<(String, Vec<u8>)> {
    use blockvol::CrashMode;
    let mut images: Vec<(String, Vec<u8>)> = [
        CrashMode::DurableOnly,
        CrashMode::AllWritten,
        CrashMode::RandomSectors,
        CrashMode::RandomSectorsTorn,
    ]
    .into_iter()
    .map(|m| (format!("{m:?}"), d.crash_image_with(sp.index, m)))
    .collect();
    for (s, alone, img) in common::crashplan::single_sector_images(d) {
        images.push((format!("sector {s} alone={alone}"), img));
    }
    images
}

fn images(o: &common::crashplan::SharedOracle) -> usize {
    o.lock().expect("oracle").images_checked
}

#[test]
fn crash_plan_writes_trims_syncs_and_flushes_across_wraps() {
    let opts = tiny();
    let bs = opts.block_size;
    let n = images(&run_crash_plan(opts, manual(), |v, o| {
        label(o, "mixed");
        for i in 0..90u64 {
            let lba = (i * 7) % 60;
            let blocks = 1 + i % 4;
            if i % 11 == 5 {
                let lsn = v.trim(Lba(lba), blocks).expect("trim");
                record(o, v, lsn, Op::Trim { lba, blocks });
            } else if i % 17 == 3 {
                let lsn = v.barrier().expect("barrier");
                record(o, v, lsn, Op::Barrier);
            } else {
                let d = data(i, blocks, bs);
                let lsn = v.write(Lba(lba), &d).expect("write");
                record(o, v, lsn, Op::Write { lba, data: d });
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
    }));
    eprintln!("mixed: {n} images");
    assert!(n > 400, "only {n} crash images were checked");
}

#[test]
fn crash_plan_partial_flushes_with_retention_keep_history() {
    let opts = tiny();
    let bs = opts.block_size;
    let open = manual();
    let n = images(&run_crash_plan(opts, open, |v, o| {
        label(o, "retention");
        v.set_retention(RetentionPolicy {
            keep_entries: 6,
            keep_bytes: 0,
        });
        for i in 0..70u64 {
            let lba = (i * 13) % 62;
            let d = data(1000 + i, 2, bs);
            let lsn = v.write(Lba(lba), &d).expect("write");
            record(o, v, lsn, Op::Write { lba, data: d });
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
    }));
    eprintln!("retention: {n} images");
    assert!(n > 200, "only {n} crash images were checked");
}

#[test]
fn crash_plan_large_multiblock_entries_and_overwrites() {
    let opts = tiny();
    let bs = opts.block_size;
    let n = images(&run_crash_plan(opts, manual(), |v, o| {
        label(o, "large");
        for i in 0..40u64 {
            // Up to 24 KiB entries: a lap holds only a few, so padding and skips are frequent.
            let blocks = 8 + (i * 5) % 41;
            let lba = (i * 3) % (64 - blocks);
            let d = data(5000 + i, blocks, bs);
            let lsn = v.write(Lba(lba), &d).expect("write");
            record(o, v, lsn, Op::Write { lba, data: d });
            let d = v.sync().expect("sync");
            ack(o, d);
            if i % 2 == 1 {
                let cp = v.force_flush().expect("flush");
                checkpointed(o, cp);
            }
        }
    }));
    eprintln!("large: {n} images");
    assert!(n > 100, "only {n} crash images were checked");
}

/// Regression for a bug the random crash plan found: truncation zeroed every dropped entry
/// under one msync, so a crash could leave the first dropped entry damaged and a later one
/// intact; the later header's durable hint then "proved" the damaged entry had been synced and
/// recovery refused to open the volume (`Corrupt`) although nothing synced-and-kept was lost.
/// Truncation now removes the dropped headers newest group first (`Volume::truncate_after`).
/// Every sync boundary is checked with the usual images plus every single-sector subset.
#[test]
fn truncation_crash_is_never_reported_as_corruption() {
    let opts = tiny();
    let bs = opts.block_size;
    let o = run_crash_plan(opts, manual(), |v, o| {
        label(o, "truncation");
        o.lock().expect("oracle").exhaustive = true;
        let mut tag = 0u64;
        for round in 0..6u64 {
            // Entries synced one by one (each header's hint covers the entry before it),
            // then a few left unsynced.
            for i in 0..5 + round {
                let lba = (tag * 3) % 60;
                let d = data(9000 + tag, 1 + tag % 3, bs);
                let lsn = v.write(Lba(lba), &d).expect("write");
                record(o, v, lsn, Op::Write { lba, data: d });
                if i < 3 + round {
                    let d = v.sync().expect("sync");
                    ack(o, d);
                }
                tag += 1;
            }
            let st = v.status();
            let target = st.head.0.saturating_sub(2 + round % 3).max(st.checkpoint.0);
            {
                let mut g = o.lock().expect("oracle");
                g.acked = g.acked.min(target);
            }
            v.truncate_after(Lsn(target)).expect("truncate");
            {
                let mut g = o.lock().expect("oracle");
                g.ops.truncate(target as usize);
                g.last_entry = None;
            }
            assert_eq!(v.status().head, Lsn(target));
            if round % 2 == 1 {
                let cp = v.force_flush().expect("flush");
                ack(o, v.status().durable);
                checkpointed(o, cp);
            }
        }
    });
    let g = o.lock().expect("oracle");
    eprintln!(
        "truncation: {} images, {} single-sector",
        g.images_checked, g.single_sector_checked
    );
    assert!(
        g.single_sector_checked > 100,
        "only {} single-sector images were checked",
        g.single_sector_checked
    );
}

/// The base install under the crash plan (docs/format.md 8.2, the install rows): at every sync
/// boundary of `begin_base_install`, the chunk writes and `finish`, every crash image (the four
/// modes and every single-sector subset) reopens as exactly one of: the replica's old state
/// (checked with the six invariants against its old history), an incomplete install (I/O
/// refused, checkpoint untrusted, and still incomplete on a second open), or the new state
/// (head, tail and checkpoint at the base LSN, a new generation, the primary's image at the
/// base, and a write after it lands at base + 1).
#[test]
fn crash_plan_base_install_is_old_incomplete_or_new() {
    use blockvol::{BlockVolError, EntryKind, Role, SimDisk, SyncPoint, Volume, WalEntry};
    use common::crashplan::check_image;
    use std::sync::{Arc, Mutex};

    let opts = tiny();
    let bs = opts.block_size;
    let (p, _pd) = Volume::create_sim(&opts, &manual()).expect("primary");
    for i in 0..40u64 {
        p.write(Lba((i * 5) % 60), &data(20_000 + i, 1 + i % 3, bs))
            .expect("write");
    }
    p.sync().expect("sync");
    let base = p.pin_base(Lsn(40)).expect("pin base");
    let want = p.digest().expect("digest");
    // The replica's own history: applied, partly flushed, synced.
    let (r, rd) = Volume::create_sim(&opts, &manual()).expect("replica");
    r.assign(Role::Rebuilding, Epoch(0)).expect("assign");
    let mut old_ops = Vec::new();
    for i in 1..=15u64 {
        let d = data(30_000 + i, 1, bs);
        r.apply(&WalEntry {
            lsn: Lsn(i),
            epoch: Epoch(0),
            kind: EntryKind::Write {
                lba: Lba(i),
                data: d.clone(),
            },
        })
        .expect("apply");
        old_ops.push(Op::Write { lba: i, data: d });
        if i == 8 {
            r.force_flush().expect("flush");
        }
    }
    r.sync().expect("sync");
    // Role none, so the checks can write after reopening (a rebuilding replica only applies).
    r.assign(Role::None, Epoch(0)).expect("assign");
    let old_gen = r.status().generation;
    let old_cp = r.status().checkpoint.0;
    let counts = Arc::new(Mutex::new([0usize; 3]));
    let c2 = counts.clone();
    let opts2 = opts.clone();
    rd.set_sync_hook(Some(Arc::new(move |d: &SimDisk, sp: &SyncPoint| {
        for (mode, img) in crash_images(d, sp) {
            let what = format!(
                "install: sync #{} ({}), {mode}",
                sp.index,
                if sp.after { "after" } else { "before" }
            );
            let disk = SimDisk::from_image(img.clone());
            let v = Volume::open_sim(&disk, &manual())
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            let s = v.status();
            let kind = if s.install_incomplete {
                assert!(!s.checkpoint_trusted, "{what}");
                assert!(
                    matches!(
                        v.read(Lba(0), 1),
                        Err(BlockVolError::InstallIncomplete { .. })
                    ),
                    "{what}: an incomplete install must refuse reads"
                );
                drop(v);
                let v = Volume::open_sim(&disk, &manual()).expect("second open");
                assert!(
                    v.status().install_incomplete,
                    "{what}: incomplete once, then not"
                );
                1
            } else if s.generation == old_gen + 1 {
                assert_eq!(
                    (s.head, s.tail, s.checkpoint),
                    (Lsn(40), Lsn(40), Lsn(40)),
                    "{what}"
                );
                assert!(s.checkpoint_trusted, "{what}");
                assert_eq!(
                    v.digest().expect("digest"),
                    want,
                    "{what}: not the base image"
                );
                assert_eq!(v.barrier().expect("barrier"), Lsn(41), "{what}");
                2
            } else {
                drop(v);
                assert_eq!(s.generation, old_gen, "{what}");
                check_image(&opts2, img, &old_ops, 15, old_cp, &what);
                0
            };
            c2.lock().expect("counts")[kind] += 1;
        }
    })));
    let mut inst = r.begin_base_install(base.install_spec()).expect("begin");
    for c in base.reader(4096) {
        inst.write_chunk(&c.expect("chunk")).expect("write chunk");
    }
    inst.finish().expect("finish");
    rd.set_sync_hook(None);
    assert_eq!(r.digest().expect("digest"), want);
    let [old, incomplete, new] = *counts.lock().expect("counts");
    eprintln!("install: {old} images old, {incomplete} incomplete, {new} new");
    assert!(
        old > 0 && incomplete > 0 && new > 0,
        "every outcome must occur: {old} old, {incomplete} incomplete, {new} new"
    );
}

/// An interrupted install resumes to exactly the image (docs/format.md 8.4, resume points): an
/// install with a resume point every 4 blocks is crashed at every sync boundary (the four
/// modes and every single-sector subset); every image that reopens incomplete begins the same
/// install again, is sent only the blocks from its resume point on, and must then hold the
/// primary's image. Some images must resume from a point above 0 (the path ran), and none may
/// resume beyond the chunks written when it crashed.
#[test]
fn crash_plan_interrupted_install_resumes_to_the_image() {
    use blockvol::{SimDisk, SyncPoint, Volume};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let opts = tiny();
    let bs = opts.block_size;
    let (p, _pd) = Volume::create_sim(&opts, &manual()).expect("primary");
    // Dense data with a zero run in the middle, so elided runs are part of the image.
    for i in 0..64u64 {
        if !(20..26).contains(&i) {
            p.write(Lba(i), &data(50_000 + i, 1, bs)).expect("write");
        }
    }
    p.sync().expect("sync");
    let base = Arc::new(p.pin_base(p.status().head).expect("pin base"));
    let want = p.digest().expect("digest");
    let spec = base.install_spec();
    let (r, rd) = Volume::create_sim(&opts, &manual()).expect("replica");
    // The highest block written so far by the interrupted install (an upper bound for any
    // resume point a crash image may claim).
    let high = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Mutex::new([0usize; 3]));
    let (c2, h2, b2) = (counts.clone(), high.clone(), base.clone());
    rd.set_sync_hook(Some(Arc::new(move |d: &SimDisk, sp: &SyncPoint| {
        for (mode, img) in crash_images(d, sp) {
            let what = format!("resume: sync #{} ({}), {mode}", sp.index, sp.after);
            let disk = SimDisk::from_image(img);
            let v = Volume::open_sim(&disk, &manual())
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            if !v.status().install_incomplete {
                c2.lock().expect("counts")[0] += 1;
                continue;
            }
            let mut inst = v.begin_base_install(spec).expect("begin again");
            let from = inst.resume_from();
            assert!(
                from.0 <= h2.load(Ordering::SeqCst),
                "{what}: resumes at {from}, beyond the {} blocks written",
                h2.load(Ordering::SeqCst)
            );
            for c in b2.reader(512).starting_at(from) {
                inst.write_chunk(&c.expect("chunk")).expect("write chunk");
            }
            inst.finish().expect("finish");
            assert_eq!(v.digest().expect("digest"), want, "{what}: from {from}");
            common::assert_scrub_clean(&v, &what);
            c2.lock().expect("counts")[if from.0 > 0 { 2 } else { 1 }] += 1;
        }
    })));
    let mut inst = r.begin_base_install(spec).expect("begin");
    assert_eq!(inst.resume_from(), Lba(0));
    inst.set_progress_stride(4 * u64::from(bs));
    for c in base.reader(512) {
        let c = c.expect("chunk");
        high.store(c.lba.0 + u64::from(c.blocks), Ordering::SeqCst);
        inst.write_chunk(&c).expect("write chunk");
    }
    assert!(inst.durable_to().0 > 40, "resume points were recorded");
    inst.finish().expect("finish");
    rd.set_sync_hook(None);
    assert_eq!(r.digest().expect("digest"), want);
    let [other, from_zero, resumed] = *counts.lock().expect("counts");
    eprintln!("resume: {other} not incomplete, {from_zero} restarted, {resumed} resumed");
    assert!(
        from_zero > 0 && resumed > 10,
        "{from_zero} restarted, {resumed} resumed"
    );
}

/// A resume point belongs to one image: an interrupted install of image A does not resume for
/// image B (another base LSN), which starts over from a zeroed extent and installs exactly B;
/// and an install of A in the same process (no reopen) resumes where A stopped.
#[test]
fn a_resume_point_belongs_to_one_image() {
    use blockvol::Volume;
    let opts = tiny();
    let bs = opts.block_size;
    let (p, _pd) = Volume::create_sim(&opts, &manual()).expect("primary");
    for i in 0..64u64 {
        p.write(Lba(i), &data(60_000 + i, 1, bs)).expect("write");
    }
    p.sync().expect("sync");
    let a = p.pin_base(p.status().head).expect("pin a");
    let want_a = p.digest().expect("digest a");
    let (r, _rd) = Volume::create_sim(&opts, &manual()).expect("replica");
    let mut inst = r.begin_base_install(a.install_spec()).expect("begin a");
    inst.set_progress_stride(8 * u64::from(bs));
    for c in a.reader(512).take(30) {
        inst.write_chunk(&c.expect("chunk")).expect("write");
    }
    let durable = inst.durable_to();
    assert_eq!(durable, Lba(24), "three strides of 8 blocks");
    drop(inst);
    // The same image again: resumes at the durable point.
    let inst = r
        .begin_base_install(a.install_spec())
        .expect("begin a again");
    assert_eq!(inst.resume_from(), durable);
    drop(inst);
    drop(a);
    // Another image (the primary moved on): starts over, and the result is exactly B even
    // though the extent held a prefix of A.
    for i in 0..10u64 {
        p.write(Lba(i * 3), &data(70_000 + i, 1, bs))
            .expect("write");
    }
    p.sync().expect("sync");
    let b = p.pin_base(p.status().head).expect("pin b");
    let want_b = p.digest().expect("digest b");
    assert_ne!(want_a, want_b);
    let mut inst = r.begin_base_install(b.install_spec()).expect("begin b");
    assert_eq!(
        inst.resume_from(),
        Lba(0),
        "a resume point of A is not one of B"
    );
    for c in b.reader(512) {
        inst.write_chunk(&c.expect("chunk")).expect("write");
    }
    inst.finish().expect("finish b");
    assert_eq!(r.digest().expect("digest"), want_b);
}
