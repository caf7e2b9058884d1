//! `Volume::apply_encoded_run` (a catch-up chunk placed under one lock and written with
//! vectored positioned writes) leaves exactly what one `apply_encoded` per entry leaves: the
//! same outcomes, the same refusals with the same prefix applied, and after a reopen (the
//! ring read back from disk, wraps and padding included) the same entries and the primary's
//! image. Real files, so the `pwritev` path of the file medium is the one tested;
//! one case runs on the simulated disk, whose medium writes slice by slice.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockvol::{
    ApplyOutcome, ApplyRun, BlockVolError, CreateOptions, EntryKind, Epoch, FlushGate, Lba, Lsn,
    OpenOptions, Role, Volume, WalEntry,
};
use proptest::prelude::*;

const BS: usize = 4096;
const BLOCKS: u64 = 64;

fn create(wal: u64) -> CreateOptions {
    CreateOptions {
        volume_size_bytes: BLOCKS * BS as u64,
        wal_size_bytes: wal,
        block_size: BS as u32,
    }
}

fn manual() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Durable,
        wal_full_timeout: Duration::from_secs(20),
        ..OpenOptions::manual()
    }
}

/// Entries of a primary, in wire form back to back, with their count and the primary's
/// digest. `ops` are `(kind, lba, blocks, seed)`: kind 0-5 a write of `blocks` blocks, 6 a
/// trim, 7 a barrier.
fn primary(ops: &[(u8, u64, u64, u8)]) -> (Vec<Vec<u8>>, blockvol::Digest) {
    let (p, _d) = Volume::create_sim(&create(8 << 20), &manual()).expect("create primary");
    for &(kind, lba, blocks, seed) in ops {
        let lba = lba % (BLOCKS - 3);
        match kind {
            0..=5 => {
                let data: Vec<u8> = (0..blocks as usize * BS)
                    .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                    .collect();
                p.write(Lba(lba), &data).expect("write");
            }
            6 => {
                p.trim(Lba(lba), blocks).expect("trim");
            }
            _ => {
                p.barrier().expect("barrier");
            }
        }
    }
    let mut frames = Vec::new();
    let mut scan = p.scan_from(Lsn(1)).expect("scan");
    let mut buf = Vec::new();
    while let Some(r) = scan.next_encoded(&mut buf) {
        r.expect("entry");
        frames.push(std::mem::take(&mut buf));
    }
    (frames, p.digest().expect("digest"))
}

fn replica(path: &Path, wal: u64, open: &OpenOptions) -> Volume {
    let v = Volume::create(path, &create(wal), open).expect("create replica");
    v.assign(Role::Replica, Epoch(1)).expect("assign");
    v
}

/// One `apply_encoded` per entry of `frames`, as the run would: the first error ends it.
fn one_by_one(v: &Volume, frames: &[u8], count: u64) -> Result<ApplyRun, BlockVolError> {
    let mut rest = frames;
    let mut r = ApplyRun::default();
    for _ in 0..count {
        let (o, used) = v.apply_encoded(rest)?;
        match o {
            ApplyOutcome::Applied => r.applied += 1,
            ApplyOutcome::Duplicate => r.duplicates += 1,
        }
        rest = &rest[used..];
    }
    Ok(r)
}

fn ops() -> impl Strategy<Value = Vec<(u8, u64, u64, u8)>> {
    proptest::collection::vec((0u8..8, 0u64..BLOCKS, 1u64..4, any::<u8>()), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Runs of random lengths into a small ring (so runs wrap and pad), the same on both
    /// replicas, with a sync and a flush every third run: the outcomes, heads and identities
    /// agree, and after a reopen (recovery from the ring files, the last runs unflushed) both
    /// hold the same entries and the primary's image.
    #[test]
    fn a_run_leaves_the_same_log_as_one_apply_per_entry(
        ops in ops(),
        cuts in proptest::collection::vec(1usize..40, 1..20),
        wal_kib in prop_oneof![Just(96u64), Just(128), Just(256)],
    ) {
        let (frames, digest) = primary(&ops);
        let wal = wal_kib << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        let (pa, pb) = (dir.path().join("run.vol"), dir.path().join("one.vol"));
        let a = replica(&pa, wal, &manual());
        let b = replica(&pb, wal, &manual());
        let mut i = 0;
        let mut cut = cuts.iter().cycle();
        let mut runs = 0;
        while i < frames.len() {
            // Three runs fit the ring between flushes: each takes under a quarter of it.
            let want = *cut.next().expect("cycle");
            let (mut bytes, mut n) = (0usize, 0usize);
            while n < want
                && i + n < frames.len()
                && bytes + frames[i + n].len() + 4096 < wal as usize / 4
            {
                bytes += frames[i + n].len();
                n += 1;
            }
            let n = n.max(1);
            let run: Vec<u8> = frames[i..i + n].concat();
            let ra = a.apply_encoded_run(&run, n as u64).expect("run");
            let rb = one_by_one(&b, &run, n as u64).expect("one by one");
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(ra.applied, n as u64);
            prop_assert_eq!(a.status().head, b.status().head);
            runs += 1;
            for v in [&a, &b] {
                v.sync().expect("sync");
                if runs % 3 == 0 {
                    v.set_committed(v.status().head);
                    v.force_flush().expect("flush");
                }
            }
            i += n;
        }
        prop_assert_eq!(a.digest().expect("digest"), digest);
        a.close().expect("close");
        b.close().expect("close");
        let a = Volume::open(&pa, &manual()).expect("reopen");
        let b = Volume::open(&pb, &manual()).expect("reopen");
        let (sa, sb) = (a.status(), b.status());
        prop_assert_eq!((sa.head, sa.tail, sa.checkpoint), (sb.head, sb.tail, sb.checkpoint));
        prop_assert_eq!(sa.head.0, frames.len() as u64);
        prop_assert_eq!(log(&a), log(&b));
        prop_assert_eq!(a.digest().expect("digest"), digest);
        prop_assert_eq!(b.digest().expect("digest"), digest);
    }
}

/// The entries a volume's ring holds above its checkpoint, in wire form.
fn log(v: &Volume) -> Vec<Vec<u8>> {
    let from = Lsn(v.status().checkpoint.0 + 1);
    let mut out = Vec::new();
    if from > v.status().head {
        return out;
    }
    let mut scan = v.scan_from(from).expect("scan");
    let mut buf = Vec::new();
    while let Some(r) = scan.next_encoded(&mut buf) {
        r.expect("entry");
        out.push(std::mem::take(&mut buf));
    }
    out
}

/// Wire frames of `n` one-block writes at LSNs `from..from + n` (epoch 1).
fn writes(from: u64, n: u64, seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for lsn in from..from + n {
        WalEntry {
            lsn: Lsn(lsn),
            epoch: Epoch(1),
            kind: EntryKind::Write {
                lba: Lba(lsn % BLOCKS),
                data: vec![seed ^ lsn as u8; BS],
            },
        }
        .encode_into(&mut out)
        .expect("encode");
    }
    out
}

#[test]
fn a_run_refuses_what_one_apply_each_refuses_with_the_same_prefix_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = 1 << 20;
    let mk = |name: &str| replica(&dir.path().join(name), wal, &manual());
    let frame_len = writes(1, 1, 0).len();

    // Duplicates first, then new entries: the duplicates are acknowledged, the rest applied.
    let (a, b) = (mk("a1"), mk("b1"));
    let first = writes(1, 5, 7);
    a.apply_encoded_run(&first, 5).expect("first run");
    b.apply_encoded_run(&first, 5).expect("first run");
    let overlap = writes(3, 10, 7);
    let ra = a.apply_encoded_run(&overlap, 10).expect("overlapping run");
    let rb = one_by_one(&b, &overlap, 10).expect("overlapping one by one");
    assert_eq!(ra, rb);
    assert_eq!(
        ra,
        ApplyRun {
            applied: 7,
            duplicates: 3
        }
    );
    assert_eq!(a.status().head, Lsn(12));

    // A divergent entry, a gap, damage and a short buffer: the same error, the same prefix.
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("divergent", writes(10, 6, 99), 6),
        ("gap", [writes(13, 2, 7), writes(16, 2, 7)].concat(), 4),
        (
            "damaged",
            {
                let mut f = writes(13, 4, 7);
                f[2 * frame_len + 100] ^= 1;
                f
            },
            4,
        ),
        ("short", writes(13, 3, 7)[..2 * frame_len + 70].to_vec(), 3),
        ("trailing", [writes(13, 2, 7), vec![0u8; 9]].concat(), 2),
        (
            "out of range",
            {
                let mut f = writes(13, 1, 7);
                WalEntry {
                    lsn: Lsn(14),
                    epoch: Epoch(1),
                    kind: EntryKind::Write {
                        lba: Lba(BLOCKS),
                        data: vec![1; BS],
                    },
                }
                .encode_into(&mut f)
                .expect("encode");
                f
            },
            2,
        ),
        (
            "epoch ahead",
            {
                let mut f = writes(13, 1, 7);
                WalEntry {
                    lsn: Lsn(14),
                    epoch: Epoch(2),
                    kind: EntryKind::Write {
                        lba: Lba(1),
                        data: vec![1; BS],
                    },
                }
                .encode_into(&mut f)
                .expect("encode");
                f
            },
            2,
        ),
    ];
    for (i, (what, run, count)) in cases.into_iter().enumerate() {
        let (a, b) = (mk(&format!("a{i}x")), mk(&format!("b{i}x")));
        let base = writes(1, 12, 7);
        a.apply_encoded_run(&base, 12).expect("base");
        one_by_one(&b, &base, 12).expect("base");
        let ra = a.apply_encoded_run(&run, count);
        let rb = one_by_one(&b, &run, count);
        let ea = ra.expect_err(what);
        // One-by-one stops at the same entry; trailing bytes it does not see (the run checks
        // that `count` entries use the whole buffer).
        if what != "trailing" {
            let eb = rb.expect_err(what);
            assert_eq!(
                std::mem::discriminant(&ea),
                std::mem::discriminant(&eb),
                "{what}: {ea} / {eb}"
            );
        } else {
            assert!(matches!(ea, BlockVolError::Decode { .. }), "{what}: {ea}");
        }
        assert_eq!(a.status().head, b.status().head, "{what}");
        assert_eq!(
            a.digest().expect("digest"),
            b.digest().expect("digest"),
            "{what}"
        );
        // Still usable: the next entries apply.
        let h = a.status().head.0;
        a.apply_encoded_run(&writes(h + 1, 2, 7), 2)
            .unwrap_or_else(|e| panic!("{what}: after the refusal: {e}"));
    }
}

#[test]
fn a_run_larger_than_the_free_ring_waits_for_room_and_completes() {
    // 64 KiB ring: 40 entries of 4160 bytes (166 KiB) cannot fit without a checkpoint between.
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = 64 << 10;
    let path = dir.path().join("small.vol");
    let v = Arc::new(replica(&path, wal, &manual()));
    let run = writes(1, 40, 3);
    assert!(run.len() as u64 > wal, "the run must not fit the ring");
    v.set_committed(Lsn(40));
    // A flusher of our own: the run can only finish once entries it placed are synced and
    // flushed, which it waits for the one-entry way.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = v.sync();
                let _ = v.force_flush();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let r = v.apply_encoded_run(&run, 40).expect("run");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    flusher.join().expect("flusher");
    assert_eq!(
        r,
        ApplyRun {
            applied: 40,
            duplicates: 0
        }
    );
    assert_eq!(v.status().head, Lsn(40));
    for lsn in 1..=40u64 {
        let mut buf = vec![0u8; BS];
        // The newest write of each block is the one with the highest LSN at that LBA.
        let newest = (1..=40u64)
            .filter(|l| l % BLOCKS == lsn % BLOCKS)
            .max()
            .unwrap_or(lsn);
        v.read_into(Lba(lsn % BLOCKS), &mut buf).expect("read");
        assert_eq!(buf, vec![3 ^ newest as u8; BS], "lba {}", lsn % BLOCKS);
    }
    v.sync().expect("sync");
    let v = Arc::into_inner(v).expect("only owner");
    let d = v.digest().expect("digest");
    v.close().expect("close");
    let v = Volume::open(&path, &manual()).expect("reopen");
    assert_eq!(v.digest().expect("digest"), d);
}

#[test]
fn on_the_simulated_disk_a_run_applies_like_one_apply_per_entry() {
    let (frames, digest) = primary(&[(0, 1, 2, 9), (6, 3, 2, 0), (7, 0, 0, 0), (1, 5, 1, 4)]);
    let n = frames.len() as u64;
    let run = frames.concat();
    let (a, _da) = Volume::create_sim(&create(1 << 20), &manual()).expect("create");
    a.assign(Role::Replica, Epoch(1)).expect("assign");
    let r = a.apply_encoded_run(&run, n).expect("run");
    assert_eq!(r.applied, n);
    assert_eq!(a.digest().expect("digest"), digest);
}
