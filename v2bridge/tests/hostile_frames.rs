//! The replica side of the wire on hostile messages: `LocalReplica` (the seam a network
//! transport would feed) gets apply requests whose frames are arbitrary bytes, damaged
//! encodings, encodings rewritten behind a valid header CRC, counts that do not match the
//! frames, anchors and lineages at the edges, base chunks likewise, and every other request
//! with edge scalars. Every request returns a reply or a typed `TargetError`, never panics;
//! garbage is never applied (the replica holds exactly the valid entries that preceded the
//! first bad frame); and afterwards the volume file passes `blockvol check` and reopens.

use std::sync::Arc;
use std::time::Duration;

use blockvol::{
    BaseChunk, CreateOptions, EntryInfo, EntryKind, Epoch, FlushGate, Geometry, Lba, Lsn,
    OpenOptions, Role, Volume, WalEntry,
};
use proptest::prelude::*;
use v2bridge::{
    ApplyRequest, BarrierRequest, BaseBeginRequest, BaseChunkRequest, Lineage, LocalReplica,
    ReplicaTarget, TargetError, TruncateRequest,
};

const BS: u64 = 4096;
const BLOCKS: u64 = 64;
const EPOCH: u64 = 5;

fn open_opts() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Committed,
        wal_full_timeout: Duration::from_millis(20),
        ..OpenOptions::manual()
    }
}

/// A replica on a real volume file holding `held` entries at `EPOCH`.
struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    replica: LocalReplica,
    vol: Arc<Volume>,
}

fn entry(lsn: u64) -> WalEntry {
    WalEntry {
        lsn: Lsn(lsn),
        epoch: Epoch(EPOCH),
        kind: if lsn.is_multiple_of(5) {
            EntryKind::Trim {
                lba: Lba(lsn % BLOCKS),
                blocks: 1,
            }
        } else {
            EntryKind::Write {
                lba: Lba((lsn * 3) % BLOCKS),
                data: vec![lsn as u8; BS as usize],
            }
        },
    }
}

fn fixture(held: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.vol");
    let opts = CreateOptions {
        volume_size_bytes: BLOCKS * BS,
        wal_size_bytes: 256 * 1024,
        block_size: BS as u32,
    };
    let vol = Volume::create(&path, &opts, &open_opts()).expect("create");
    vol.assign(Role::Replica, Epoch(EPOCH)).expect("assign");
    for lsn in 1..=held {
        vol.apply(&entry(lsn)).expect("apply");
    }
    vol.sync().expect("sync");
    let vol = Arc::new(vol);
    Fixture {
        replica: LocalReplica::new(Arc::clone(&vol)),
        vol,
        path,
        _dir: dir,
    }
}

impl Fixture {
    /// Drops the replica, checks the file with the command line's logic (`blockvol check`)
    /// and reopens it; the directory lives as long as the returned guard.
    fn check_file(self) -> (Volume, tempfile::TempDir) {
        let Fixture {
            _dir,
            path,
            replica,
            vol,
        } = self;
        drop(replica);
        let vol = Arc::try_unwrap(vol).unwrap_or_else(|_| panic!("volume still shared"));
        vol.close().expect("close");
        let ins = blockvol::inspect::inspect(&path).expect("inspect");
        assert!(
            !ins.is_corrupt(),
            "the replica's file is corrupt after hostile requests"
        );
        let v = Volume::open(&path, &open_opts()).expect("reopen");
        (v, _dir)
    }
}

/// CRC-32/ISO-HDLC (what `crc32fast` computes), for re-checksumming rewritten headers.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn lineage(epoch: u64) -> Lineage {
    Lineage::new("primary-a", Epoch(epoch), 7)
}

fn typed(e: &TargetError) -> bool {
    matches!(
        e,
        TargetError::Fenced(_)
            | TargetError::Gap { .. }
            | TargetError::Divergent { .. }
            | TargetError::BelowCheckpoint { .. }
            | TargetError::BadFrame(_)
            | TargetError::Storage(_)
            | TargetError::Protocol(_)
    )
}

/// How the frames of one apply request are built.
#[derive(Clone, Debug)]
enum Frames {
    /// Arbitrary bytes.
    Noise(Vec<u8>),
    /// `n` valid entries for head + 1.., then one byte of the encoding XORed.
    Damaged { n: u64, at: usize, x: u8 },
    /// `n` valid entries, then header bytes rewritten and the header CRC recomputed.
    Rewritten { n: u64, edits: Vec<(usize, u8)> },
    /// `n` valid entries, intact.
    Valid { n: u64 },
}

fn frames() -> impl Strategy<Value = Frames> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Frames::Noise),
        (1u64..5, any::<usize>(), 1u8..=255).prop_map(|(n, at, x)| Frames::Damaged { n, at, x }),
        (
            1u64..5,
            proptest::collection::vec((0usize..60, any::<u8>()), 1..4)
        )
            .prop_map(|(n, edits)| Frames::Rewritten { n, edits }),
        (1u64..5).prop_map(|n| Frames::Valid { n }),
    ]
}

/// Encodes entries `from..from + n` back to back; returns the bytes and each frame's start.
fn encode(from: u64, n: u64) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut starts = Vec::new();
    for lsn in from..from + n {
        starts.push(out.len());
        entry(lsn).encode_into(&mut out).expect("encode");
    }
    (out, starts)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn apply_requests_with_hostile_frames_apply_nothing_but_valid_entries(
        f in frames(),
        count in prop_oneof![0u32..6, any::<u32>()],
        anchor_ok in prop_oneof![4 => Just(true), 1 => Just(false)],
        anchor_lsn in any::<u64>(),
        committed in prop_oneof![0u64..10, any::<u64>()],
        lineage_epoch in prop_oneof![4 => Just(EPOCH), 1 => any::<u64>()],
    ) {
        let held = 4;
        let mut fx = fixture(held);
        let tip = fx.vol.entry_info(Lsn(held)).expect("tip");
        let anchor = if anchor_ok {
            tip
        } else {
            EntryInfo { lsn: Lsn(anchor_lsn), epoch: Epoch(EPOCH), content_crc: 0xDEAD_BEEF }
        };
        // How many leading frames are valid entries for held + 1...
        let (bytes, valid_prefix) = match &f {
            Frames::Noise(b) => (b.clone(), 0),
            Frames::Damaged { n, at, x } => {
                let (mut b, starts) = encode(held + 1, *n);
                let i = at % b.len();
                b[i] ^= x;
                let broken = starts.iter().rposition(|s| *s <= i).expect("frame");
                (b, broken as u64)
            }
            Frames::Rewritten { n, edits } => {
                let (mut b, starts) = encode(held + 1, *n);
                let last = *starts.last().expect("frame");
                for &(at, v) in edits {
                    b[last + at] = v;
                }
                let crc = crc32(&b[last..last + 60]);
                b[last + 60..last + 64].copy_from_slice(&crc.to_le_bytes());
                (b, n - 1)
            }
            Frames::Valid { n } => (encode(held + 1, *n).0, *n),
        };
        let req = ApplyRequest {
            lineage: lineage(lineage_epoch),
            committed: Lsn(committed),
            anchor,
            count,
            frames: bytes,
        };
        let r = fx.replica.apply(req);
        if let Err(e) = &r {
            prop_assert!(typed(e), "{e}");
        }
        let head = fx.vol.status().head.0;
        prop_assert!(head >= held);
        let rewritten_last_valid = matches!(f, Frames::Rewritten { .. }) && head == held + valid_prefix + 1;
        if !rewritten_last_valid {
            // Only the valid prefix can land, and only as far as `count` asked.
            prop_assert!(
                head <= held + valid_prefix.min(u64::from(count)),
                "head {} after {:?} with count {} (valid prefix {})", head, f, count, valid_prefix
            );
            for lsn in held + 1..=head {
                prop_assert_eq!(fx.vol.entry_info(Lsn(lsn)).expect("info"), entry(lsn).info());
            }
        }
        if matches!(f, Frames::Valid { .. }) && anchor_ok && lineage_epoch == EPOCH {
            let n = valid_prefix;
            if u64::from(count) == n {
                prop_assert!(r.is_ok(), "a valid request failed: {:?}", r);
                prop_assert_eq!(head, held + n);
            } else {
                // A count that does not match the frames is refused (the prefix may land).
                prop_assert!(matches!(r, Err(TargetError::BadFrame(_))), "{:?}", r);
            }
        }
        let (v, _dir) = fx.check_file();
        prop_assert_eq!(v.status().head.0, head);
    }

    #[test]
    fn base_chunk_requests_with_hostile_frames_write_only_valid_chunks(
        noise in proptest::collection::vec(any::<u8>(), 0..200),
        mode in 0u8..4,
        lba in prop_oneof![0u64..BLOCKS, any::<u64>()],
        blocks in prop_oneof![1u32..3, any::<u32>()],
        at in any::<usize>(),
        x in 1u8..=255,
    ) {
        let mut fx = fixture(4);
        let geometry = fx.vol.geometry();
        fx.replica.begin_base(BaseBeginRequest {
            lineage: lineage(EPOCH),
            base_lsn: Lsn(20),
            base_entry: EntryInfo { lsn: Lsn(20), epoch: Epoch(EPOCH), content_crc: 1 },
            geometry,
        }).expect("begin");
        let valid = BaseChunk::new(Lba(lba), blocks.min(2), vec![0x77; (u64::from(blocks.min(2)) * BS) as usize]);
        let frame = match mode {
            0 => noise,
            1 => {
                let mut f = valid.encode().expect("encode");
                let i = at % f.len();
                f[i] ^= x;
                f
            }
            2 => BaseChunk::new(Lba(lba), blocks, vec![0x77; 100]).encode().expect("encode"),
            _ => valid.encode().expect("encode"),
        };
        let fits = mode == 3 && lba + u64::from(blocks.min(2)) <= BLOCKS;
        let res = fx.replica.base_chunk(BaseChunkRequest { lineage: lineage(EPOCH), frame });
        match &res {
            Ok(()) => prop_assert!(fits, "mode {} accepted", mode),
            Err(e) => {
                prop_assert!(typed(e), "{e}");
                prop_assert!(!fits, "a valid chunk was refused: {e}");
            }
        }
        prop_assert_eq!(fx.replica.finish_base(lineage(EPOCH)).expect("finish"), Lsn(20));
        let (v, _dir) = fx.check_file();
        // The image holds the valid chunk and zeros elsewhere.
        let mut expected = vec![0u8; (BLOCKS * BS) as usize];
        if fits {
            let a = (lba * BS) as usize;
            expected[a..a + valid.data.len()].copy_from_slice(&valid.data);
        }
        prop_assert_eq!(v.digest().expect("digest"), blockvol::Digest::of_image(&expected));
    }
}

/// Every other request with scalars at the edges of their types, in one session: typed
/// replies only, and the file stays clean.
#[test]
fn every_request_with_edge_scalars_is_answered_typed() {
    let edges = [
        0u64,
        1,
        4,
        5,
        6,
        1 << 62,
        (1 << 63) - 1,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];
    let mut fx = fixture(4);
    let g = fx.vol.geometry();
    let r = &mut fx.replica;
    let mut answered = 0;
    for (i, &x) in edges.iter().enumerate() {
        let reply = r.handshake();
        assert!(reply.is_ok(), "{reply:?}");
        for res in [
            r.truncate(TruncateRequest {
                lineage: lineage(EPOCH),
                after: Lsn(x),
                committed: Lsn(x),
            })
            .map(|_| ()),
            r.barrier(BarrierRequest {
                lineage: lineage(EPOCH),
                target: Lsn(x),
                expected_tip: Some(EntryInfo {
                    lsn: Lsn(x),
                    epoch: Epoch(x),
                    content_crc: x as u32,
                }),
                committed: Lsn(x),
            })
            .map(|_| ()),
            r.begin_base(BaseBeginRequest {
                lineage: lineage(EPOCH),
                base_lsn: Lsn(x),
                base_entry: EntryInfo {
                    lsn: Lsn(x),
                    epoch: Epoch(EPOCH),
                    content_crc: 0,
                },
                geometry: Geometry {
                    block_size: if x == 4 { 4096 } else { x as u32 },
                    volume_blocks: x,
                    wal_size_bytes: x,
                },
            })
            .map(|_| ()),
            r.base_chunk(BaseChunkRequest {
                lineage: lineage(EPOCH),
                frame: x.to_le_bytes().to_vec(),
            }),
            r.finish_base(lineage(EPOCH)).map(|_| ()),
        ] {
            if let Err(e) = &res {
                assert!(typed(e), "{e}");
            }
            answered += 1;
        }
        // A base install begun with the volume's own geometry and an edge LSN: accepted only
        // below the superblock counter limit, finished, and the replica goes on. Each under a
        // session of its own (from another driver, so the edge session above stays current):
        // a session that already applied entries or finished an install may not begin one.
        let installer = Lineage::new("installer", Epoch(EPOCH), 1 + i as u64);
        let begun = r.begin_base(BaseBeginRequest {
            lineage: installer,
            base_lsn: Lsn(x),
            base_entry: EntryInfo {
                lsn: Lsn(x),
                epoch: Epoch(EPOCH),
                content_crc: 0,
            },
            geometry: g,
        });
        assert_eq!(
            begun.is_ok(),
            x < blockvol::format::SB_COUNTER_LIMIT,
            "base at {x}: {begun:?}"
        );
        if begun.is_ok() {
            assert_eq!(r.finish_base(installer).expect("finish"), Lsn(x));
        }
    }
    // Stale lineages are fenced once a newer one was seen; a newer epoch is accepted.
    let fenced = r.truncate(TruncateRequest {
        lineage: lineage(EPOCH - 1),
        after: Lsn(0),
        committed: Lsn(0),
    });
    assert!(matches!(fenced, Err(TargetError::Fenced(_))), "{fenced:?}");
    assert!(r.handshake().is_ok());
    assert!(answered >= 50);
    let (v, _dir) = fx.check_file();
    assert!(!v.status().install_incomplete);
}
