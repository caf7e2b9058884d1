//! Codec round trips, and every decoder fed arbitrary or mutated bytes returns a value or a
//! typed error (never a panic).

use blockvol::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, EntryHeader, FORMAT_VERSION, SB_COUNTER_LIMIT,
    SB_SLOT_SIZE, Superblock,
};
use blockvol::{BaseChunk, BlockVolError, EntryKind, Lba, Lsn, Role, WalEntry};
use proptest::prelude::*;

fn entry() -> impl Strategy<Value = WalEntry> {
    let kind = prop_oneof![
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 1..2048)
        )
            .prop_map(|(lba, data)| EntryKind::Write {
                lba: Lba(lba >> 8),
                data
            }),
        (any::<u64>(), 1u64..=u64::from(u32::MAX)).prop_map(|(lba, blocks)| EntryKind::Trim {
            lba: Lba(lba >> 33),
            blocks
        }),
        Just(EntryKind::Barrier),
    ];
    (1u64.., any::<u64>(), kind).prop_map(|(lsn, epoch, kind)| WalEntry {
        lsn: Lsn(lsn),
        epoch: blockvol::Epoch(epoch),
        kind,
    })
}

fn superblock() -> impl Strategy<Value = Superblock> {
    (
        (
            0..SB_COUNTER_LIMIT,
            any::<[u8; 16]>(),
            9u32..=16,
            1u64..1 << 30,
            16u64..1 << 14,
        ),
        (
            1u64..SB_COUNTER_LIMIT,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            0u32..6,
            any::<u64>(),
        ),
    )
        .prop_map(
            |((seq, id, bs_shift, blocks, wal_pages), (generation, a, b, c, crc, role, epoch))| {
                let wal_size = wal_pages * 4096;
                let mut lsns = [a >> 2, b >> 2, c >> 2];
                lsns.sort();
                // Every third slot is written during a resumable base install.
                let installing = seq % 3 == 0;
                Superblock {
                    // Every other slot is an older-format (version 1) one.
                    version: if seq % 2 == 0 { 1 } else { FORMAT_VERSION },
                    flags: u32::from(installing),
                    seq,
                    volume_id: id,
                    block_size: 1 << bs_shift,
                    volume_blocks: blocks,
                    wal_offset: 8192,
                    wal_size,
                    extent_offset: 8192 + wal_size,
                    generation,
                    checkpoint: lsns[1],
                    tail_lsn: lsns[0],
                    tail_pos: (c >> 4) * 8,
                    tail_epoch: epoch,
                    tail_crc: crc,
                    role: match role {
                        0 => Role::None,
                        1 => Role::Primary,
                        2 => Role::Replica,
                        3 => Role::Stale,
                        4 => Role::Rebuilding,
                        _ => Role::Draining,
                    },
                    epoch,
                    head_hint: lsns[2],
                    install_lsn: if installing { lsns[2] } else { 0 },
                    install_epoch: if installing { epoch } else { 0 },
                    install_crc: if installing { crc } else { 0 },
                    install_resume: if installing { blocks / 2 } else { 0 },
                    durable_mark: lsns[2],
                    flush_mark: if seq % 2 == 0 {
                        0
                    } else {
                        lsns[1] + (lsns[2] - lsns[1]) / 2
                    },
                }
            },
        )
}

fn is_typed(e: &BlockVolError) -> bool {
    matches!(
        e,
        BlockVolError::Decode { .. }
            | BlockVolError::Corrupt { .. }
            | BlockVolError::ChunkChecksum { .. }
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn wal_entry_round_trips(e in entry()) {
        let bytes = e.encode().expect("encode");
        prop_assert_eq!(bytes.len(), e.encoded_len());
        let d = WalEntry::decode(&bytes).expect("decode");
        prop_assert_eq!(d.info(), e.info());
        prop_assert_eq!(d, e);
    }

    #[test]
    fn wal_entry_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = WalEntry::decode(&bytes) {
            prop_assert!(is_typed(&e), "{e}");
        }
    }

    #[test]
    fn wal_entry_decoder_rejects_mutations(e in entry(), pos in any::<usize>(), x in 1u8..=255) {
        let mut bytes = e.encode().expect("encode");
        let i = pos % bytes.len();
        bytes[i] ^= x;
        match WalEntry::decode(&bytes) {
            Ok(d) => prop_assert!(false, "mutation at {} accepted: {:?}", i, d.lsn),
            Err(err) => prop_assert!(is_typed(&err), "{err}"),
        }
        // Truncation and trailing bytes are refused too.
        let full = e.encode().expect("encode");
        prop_assert!(WalEntry::decode(&full[..full.len() - 1]).is_err());
        let mut longer = full.clone();
        longer.push(0);
        prop_assert!(WalEntry::decode(&longer).is_err());
    }

    #[test]
    fn superblock_round_trips(sb in superblock()) {
        let bytes = sb.encode();
        prop_assert_eq!(bytes.len() as u64, SB_SLOT_SIZE);
        prop_assert_eq!(Superblock::decode(&bytes, 0).expect("decode"), sb);
    }

    #[test]
    fn superblock_decoder_survives_arbitrary_and_mutated_bytes(
        sb in superblock(),
        noise in proptest::collection::vec(any::<u8>(), 0..4200),
        pos in 0usize..4096,
        x in 1u8..=255,
    ) {
        if let Err(e) = Superblock::decode(&noise, 0) {
            prop_assert!(is_typed(&e), "{e}");
        }
        let mut bytes = sb.encode();
        bytes[pos] ^= x;
        prop_assert!(Superblock::decode(&bytes, 0).is_err(), "mutation at {} accepted", pos);
    }

    #[test]
    fn entry_header_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        // Decoding a header from stray ring bytes yields a header or a reason, never a panic.
        let _ = EntryHeader::decode(&bytes, ENTRY_MAGIC_DISK);
        if bytes.len() >= ENTRY_HEADER_SIZE {
            let mut b = bytes.clone();
            b[..4].copy_from_slice(&ENTRY_MAGIC_DISK);
            let _ = EntryHeader::decode(&b, ENTRY_MAGIC_DISK);
        }
    }

    #[test]
    fn base_chunk_round_trips_and_rejects_damage(
        lba in any::<u64>(),
        blocks in 1u32..64,
        data in proptest::collection::vec(any::<u8>(), 1..4096),
        pos in any::<usize>(),
        x in 1u8..=255,
    ) {
        let c = BaseChunk::new(Lba(lba), blocks, data);
        c.verify().expect("fresh chunk verifies");
        let bytes = c.encode().expect("encode");
        prop_assert_eq!(BaseChunk::decode(&bytes).expect("decode"), c);
        let mut bad = bytes.clone();
        let i = pos % bad.len();
        bad[i] ^= x;
        match BaseChunk::decode(&bad) {
            Ok(_) => prop_assert!(false, "mutation at {} accepted", i),
            Err(e) => prop_assert!(is_typed(&e), "{e}"),
        }
    }

    #[test]
    fn base_chunk_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = BaseChunk::decode(&bytes) {
            prop_assert!(is_typed(&e), "{e}");
        }
    }
}
