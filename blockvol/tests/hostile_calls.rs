//! The volume's entry points for replicated data (what a replica receives from the network)
//! with hostile arguments: LSNs, epochs, block ranges and base-install targets at the edges of
//! their types. Every call returns a value or a typed error, never panics, and the volume
//! reopens afterwards with its contents intact.

mod common;

use blockvol::{
    BaseChunk, BaseInstallSpec, BlockVolError, EntryInfo, EntryKind, Epoch, Lba, Lsn, Role,
    SimDisk, Volume, WalEntry,
};
use common::{Model, Op, data, manual, tiny};
use proptest::prelude::*;

const EDGES: [u64; 10] = [
    0,
    1,
    2,
    63,
    64,
    u32::MAX as u64,
    1 << 62,
    (1 << 63) - 1,
    u64::MAX - 1,
    u64::MAX,
];

/// A replica volume holding a few entries, and the model of its contents.
fn replica() -> (Volume, SimDisk, Model) {
    let opts = tiny();
    let (v, disk) = Volume::create_sim(&opts, &manual()).expect("create");
    v.assign(Role::Replica, Epoch(3)).expect("assign");
    let mut ops = Vec::new();
    for lsn in 1..=5u64 {
        let d = data(lsn, 1, opts.block_size);
        let e = WalEntry {
            lsn: Lsn(lsn),
            epoch: Epoch(3),
            kind: EntryKind::Write {
                lba: Lba(lsn),
                data: d.clone(),
            },
        };
        v.apply(&e).expect("apply");
        ops.push(Op::Write { lba: lsn, data: d });
    }
    v.sync().expect("sync");
    (v, disk, Model::at(&opts, &ops, 5))
}

/// After hostile calls: the volume reopens (or is refused with a typed error) without panic,
/// and when nothing legitimate changed it, holds the same contents.
fn reopen_unchanged(v: Volume, disk: &SimDisk, model: &Model, what: &str) {
    drop(v);
    let v = Volume::open_sim(disk, &manual()).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    assert_eq!(
        v.digest().expect("digest"),
        model.digest(),
        "{what}: contents changed"
    );
}

#[test]
fn apply_with_edge_lsns_epochs_and_ranges_is_refused_typed() {
    let (v, disk, model) = replica();
    let bs = v.geometry().block_size as usize;
    let mut refused = 0;
    for lsn in EDGES {
        for epoch in [0, 3, 4, u64::MAX] {
            for lba in EDGES {
                let kinds = [
                    EntryKind::Write {
                        lba: blockvol::Lba(lba),
                        data: vec![7u8; bs],
                    },
                    EntryKind::Write {
                        lba: blockvol::Lba(lba),
                        data: vec![7u8; bs + 1],
                    },
                    EntryKind::Trim {
                        lba: blockvol::Lba(lba),
                        blocks: lba,
                    },
                    EntryKind::Trim {
                        lba: Lba(0),
                        blocks: u64::MAX,
                    },
                    EntryKind::Barrier,
                ];
                for kind in kinds {
                    let e = WalEntry {
                        lsn: Lsn(lsn),
                        epoch: blockvol::Epoch(epoch),
                        kind,
                    };
                    // LSN 6 with an in-range write at an epoch not beyond the volume's is the
                    // one legitimate append; skip it to keep the contents fixed.
                    if lsn == 6 {
                        continue;
                    }
                    match v.apply(&e) {
                        Ok(o) => panic!("apply of {e:?} returned {o:?}"),
                        Err(_) => refused += 1,
                    }
                }
            }
        }
    }
    assert!(refused > 1000);
    reopen_unchanged(v, &disk, &model, "apply");
}

#[test]
fn lsn_arguments_at_the_edges_are_refused_or_harmless() {
    let (v, disk, model) = replica();
    for x in EDGES {
        let _ = v.entry_info(Lsn(x));
        let _ = v.pin_wal(Lsn(x));
        if let Ok(scan) = v.scan_from(Lsn(x)) {
            for e in scan.take(8) {
                let _ = e;
            }
        }
        let _ = v.pin_base(Lsn(x));
        // Truncation at or above the head is a no-op; below the checkpoint it is refused.
        if x >= 5 {
            v.truncate_after(Lsn(x))
                .expect("truncate at or above the head");
        }
        v.set_committed(Lsn(x));
        let _ = v.force_flush_to(Lsn(x));
    }
    v.set_committed(Lsn(0));
    assert_eq!(v.status().head, Lsn(5));
    reopen_unchanged(v, &disk, &model, "lsn arguments");
}

#[test]
fn epochs_at_the_edges_persist_without_overflow() {
    let (v, disk, model) = replica();
    for epoch in [3, 4, (1 << 63) - 1, u64::MAX - 1, u64::MAX] {
        v.assign(Role::Replica, Epoch(epoch))
            .expect("a higher epoch is accepted");
        assert!(
            matches!(
                v.assign(Role::Replica, Epoch(epoch.saturating_sub(1))),
                Err(BlockVolError::EpochRegression { .. })
            ) || epoch == 3
        );
    }
    let block = vec![1u8; v.geometry().block_size as usize];
    let _ = v.write_in_epoch(Epoch(u64::MAX), Lba(0), &block);
    reopen_unchanged(v, &disk, &model, "epochs");
    let v = Volume::open_sim(&disk, &manual()).expect("reopen");
    assert_eq!(v.status().epoch, Epoch(u64::MAX));
}

/// Regression: `begin_base_install` accepted any base LSN and persisted it as the install
/// target; a base LSN at or beyond the superblock counter limit made the slot it wrote invalid
/// (and, after `finish`, the next head + 1 overflow). Now refused before anything is written.
#[test]
fn regression_base_install_at_an_edge_lsn_is_refused_before_writing() {
    let (v, disk, model) = replica();
    let geometry = v.geometry();
    for base in [1u64 << 63, u64::MAX - 1, u64::MAX] {
        let spec = BaseInstallSpec {
            base_lsn: Lsn(base),
            base_entry: EntryInfo {
                lsn: Lsn(base),
                epoch: Epoch(3),
                content_crc: 0,
            },
            geometry,
        };
        match v.begin_base_install(spec) {
            Err(BlockVolError::InvalidArgument(_)) => {}
            Err(e) => panic!("base {base}: unexpected error {e}"),
            Ok(_) => panic!("base {base}: install accepted"),
        }
        assert!(!v.status().install_incomplete);
    }
    reopen_unchanged(v, &disk, &model, "base install");
}

/// An install at a large but valid LSN finishes, reopens, and accepts the next entry.
#[test]
fn base_install_just_below_the_limit_finishes_and_continues() {
    let (v, disk, _) = replica();
    let base = (1u64 << 63) - 2;
    let spec = BaseInstallSpec {
        base_lsn: Lsn(base),
        base_entry: EntryInfo {
            lsn: Lsn(base),
            epoch: Epoch(3),
            content_crc: 0,
        },
        geometry: v.geometry(),
    };
    let mut inst = v.begin_base_install(spec).expect("begin");
    let bs = v.geometry().block_size as usize;
    inst.write_chunk(&BaseChunk::new(Lba(2), 1, vec![9u8; bs]))
        .expect("chunk");
    inst.finish().expect("finish");
    let e = WalEntry {
        lsn: Lsn(base + 1),
        epoch: Epoch(3),
        kind: EntryKind::Barrier,
    };
    v.apply(&e).expect("apply after the base");
    v.sync().expect("sync");
    drop(v);
    let v = Volume::open_sim(&disk, &manual()).expect("reopen");
    assert_eq!(v.status().head, Lsn(base + 1));
    assert_eq!(v.read(Lba(2), 1).expect("read"), vec![9u8; bs]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Chunks with arbitrary fields and a valid CRC written into an install: a typed error or
    /// a write inside the extent, never a panic.
    #[test]
    fn base_chunks_with_hostile_fields_are_refused_or_land_inside(
        lba in prop_oneof![any::<u64>(), 0u64..70],
        blocks in prop_oneof![any::<u32>(), 0u32..70],
        len in 0usize..3000,
    ) {
        let (v, _disk, _) = replica();
        let spec = BaseInstallSpec {
            base_lsn: Lsn(9),
            base_entry: EntryInfo { lsn: Lsn(9), epoch: Epoch(3), content_crc: 0 },
            geometry: v.geometry(),
        };
        let mut inst = v.begin_base_install(spec).expect("begin");
        let chunk = BaseChunk::new(Lba(lba), blocks, vec![5u8; len]);
        let bs = v.geometry().block_size as u64;
        let fits = blocks > 0
            && lba.checked_add(u64::from(blocks)).is_some_and(|e| e <= 64)
            && len as u64 == u64::from(blocks) * bs;
        match inst.write_chunk(&chunk) {
            Ok(()) => prop_assert!(fits, "chunk lba {} blocks {} len {} accepted", lba, blocks, len),
            Err(e) => {
                prop_assert!(!fits, "a fitting chunk was refused: {}", e);
                prop_assert!(matches!(e, BlockVolError::OutOfRange { .. } | BlockVolError::InvalidArgument(_)), "{}", e);
            }
        }
    }
}

/// Which way a call ended, for comparing two paths that must agree.
fn shape<T: std::fmt::Debug>(r: &Result<T, BlockVolError>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => format!("Err({:?})", std::mem::discriminant(e)),
    }
}

/// A wire frame: a valid encoding, then `edits` (offset, value) patched into it, the header
/// CRC recomputed when asked (so the edit gets past the first check).
fn frame(lsn: u64, kind: EntryKind, edits: &[(usize, u8)], recrc: bool) -> Vec<u8> {
    let mut f = WalEntry {
        lsn: Lsn(lsn),
        epoch: Epoch(3),
        kind,
    }
    .encode()
    .expect("encode");
    for &(at, v) in edits {
        let i = at % f.len();
        f[i] = v;
    }
    if recrc && f.len() >= 64 {
        let crc = crc32fast::hash(&f[..60]);
        f[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `apply_encoded` (the replica's copy-free path) and `decode_prefix` + `apply` agree on
    /// every frame: arbitrary bytes, damaged frames, and frames whose fields were rewritten
    /// behind a valid header CRC. Both volumes end identical.
    #[test]
    fn apply_encoded_agrees_with_decode_and_apply(
        lsn in prop_oneof![4u64..9, any::<u64>()],
        lba in prop_oneof![0u64..70, any::<u64>()],
        blocks in 1u64..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        recrc in any::<bool>(),
        trim in any::<bool>(),
        noise in proptest::collection::vec(any::<u8>(), 0..200),
        use_noise in 0u8..6,
    ) {
        let (a, _da, _) = replica();
        let (b, _db, _) = replica();
        let bs = a.geometry().block_size as u64;
        let kind = if trim {
            EntryKind::Trim { lba: blockvol::Lba(lba), blocks }
        } else {
            EntryKind::Write { lba: blockvol::Lba(lba), data: vec![0x3C; (blocks * bs) as usize] }
        };
        let f = if use_noise == 0 { noise } else { frame(lsn, kind, &edits, recrc) };
        let fast = a.apply_encoded(&f);
        let slow = WalEntry::decode_prefix(&f).and_then(|(e, used)| b.apply(&e).map(|o| (o, used)));
        prop_assert_eq!(shape(&fast), shape(&slow), "frame {:?}", &f[..f.len().min(64)]);
        prop_assert_eq!(a.status().head, b.status().head);
        prop_assert_eq!(a.digest().expect("digest"), b.digest().expect("digest"));
    }

    /// `write_frame` (copy-free) and `BaseChunk::decode` + `write_chunk` agree on every frame.
    #[test]
    fn write_frame_agrees_with_decode_and_write_chunk(
        lba in prop_oneof![0u64..70, any::<u64>()],
        blocks in prop_oneof![0u32..4, any::<u32>()],
        len in 0usize..2100,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        noise in proptest::collection::vec(any::<u8>(), 0..100),
        use_noise in 0u8..6,
    ) {
        let spec = |v: &Volume| BaseInstallSpec {
            base_lsn: Lsn(9),
            base_entry: EntryInfo { lsn: Lsn(9), epoch: Epoch(3), content_crc: 0 },
            geometry: v.geometry(),
        };
        let (a, _da, _) = replica();
        let (b, _db, _) = replica();
        let mut f = if use_noise == 0 {
            noise
        } else {
            BaseChunk::new(Lba(lba), blocks, vec![0x6B; len]).encode().expect("encode")
        };
        for &(at, v) in &edits {
            if !f.is_empty() {
                let i = at % f.len();
                f[i] = v;
            }
        }
        let mut ia = a.begin_base_install(spec(&a)).expect("begin");
        let mut ib = b.begin_base_install(spec(&b)).expect("begin");
        let fast = ia.write_frame(&f);
        let slow = BaseChunk::decode(&f).and_then(|c| ib.write_chunk(&c));
        prop_assert_eq!(shape(&fast), shape(&slow));
        prop_assert_eq!(ia.bytes_written(), ib.bytes_written());
        ia.finish().expect("finish");
        ib.finish().expect("finish");
        prop_assert_eq!(a.digest().expect("digest"), b.digest().expect("digest"));
    }
}
