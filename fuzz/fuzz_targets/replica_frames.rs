//! The replica's message decoding as `LocalReplica` does it: apply requests whose frames come
//! from the fuzzer (optionally behind valid entries, optionally with the header and content
//! CRCs of the fuzzer's frame recomputed), then a base install fed the same bytes as a chunk
//! frame. Replies are values or typed errors; afterwards the volume reopens.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockvol::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_WIRE, ENTRY_OFF_BLOCKS, ENTRY_OFF_CONTENT_CRC,
    ENTRY_OFF_HEADER_CRC, ENTRY_OFF_KIND, ENTRY_OFF_LBA, ENTRY_OFF_PAYLOAD_LEN, KIND_WRITE,
    content_crc,
};
use blockvol::{
    CreateOptions, EntryInfo, EntryKind, Epoch, FlushGate, Lba, Lsn, OpenOptions, Role, SimDisk,
    Volume, WalEntry,
};
use libfuzzer_sys::fuzz_target;
use v2bridge::{
    ApplyRequest, BaseBeginRequest, BaseChunkRequest, Lineage, LocalReplica, ReplicaTarget,
};

const EPOCH: Epoch = Epoch(5);

fn opts() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Committed,
        wal_full_timeout: Duration::from_millis(1),
        ..OpenOptions::manual()
    }
}

fn entry(lsn: u64) -> WalEntry {
    WalEntry {
        lsn: Lsn(lsn),
        epoch: EPOCH,
        kind: EntryKind::Write {
            lba: Lba(lsn % 64),
            data: vec![lsn as u8; 512],
        },
    }
}

/// A replica volume holding entries 1..=4, as an image.
fn template() -> &'static Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let create = CreateOptions {
            volume_size_bytes: 64 * 512,
            wal_size_bytes: 64 * 1024,
            block_size: 512,
        };
        let (v, disk) = Volume::create_sim(&create, &opts()).expect("create");
        v.assign(Role::Replica, EPOCH).expect("assign");
        for l in 1..=4 {
            v.apply(&entry(l)).expect("apply");
        }
        v.close().expect("close");
        disk.durable_image()
    })
}

fn fix_entry(b: &mut [u8]) {
    if b.len() < ENTRY_HEADER_SIZE {
        return;
    }
    b[..4].copy_from_slice(&ENTRY_MAGIC_WIRE);
    let kind = b[ENTRY_OFF_KIND];
    let lba = u64::from_le_bytes(b[ENTRY_OFF_LBA..ENTRY_OFF_LBA + 8].try_into().expect("8"));
    let blocks = u32::from_le_bytes(
        b[ENTRY_OFF_BLOCKS..ENTRY_OFF_BLOCKS + 4]
            .try_into()
            .expect("4"),
    );
    let len = u32::from_le_bytes(
        b[ENTRY_OFF_PAYLOAD_LEN..ENTRY_OFF_PAYLOAD_LEN + 4]
            .try_into()
            .expect("4"),
    ) as usize;
    let end = (ENTRY_HEADER_SIZE + len).min(b.len());
    let count = if kind == KIND_WRITE {
        len as u64
    } else {
        u64::from(blocks)
    };
    let crc = content_crc(kind, lba, count, &b[ENTRY_HEADER_SIZE..end]);
    b[ENTRY_OFF_CONTENT_CRC..ENTRY_OFF_CONTENT_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    let h = crc32fast::hash(&b[..ENTRY_OFF_HEADER_CRC]);
    b[ENTRY_OFF_HEADER_CRC..ENTRY_OFF_HEADER_CRC + 4].copy_from_slice(&h.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (mode, count, anchor_sel, epoch_sel) = (data[0], data[1], data[2], data[3]);
    let fuzz = &data[4..];
    let disk = SimDisk::from_image(template().clone());
    let vol = Arc::new(Volume::open_sim(&disk, &opts()).expect("template opens"));
    let mut replica = LocalReplica::new(Arc::clone(&vol));
    let lineage = Lineage::new(
        "primary",
        if epoch_sel < 200 {
            EPOCH
        } else {
            Epoch(u64::from(epoch_sel))
        },
        1,
    );
    let valid = u64::from(mode & 3);
    let mut frames = Vec::new();
    for l in 5..5 + valid {
        entry(l).encode_into(&mut frames).expect("encode");
    }
    let start = frames.len();
    frames.extend_from_slice(fuzz);
    if mode & 4 == 4 {
        fix_entry(&mut frames[start..]);
    }
    let anchor = if anchor_sel < 230 {
        vol.entry_info(Lsn(4)).expect("tip")
    } else {
        EntryInfo {
            lsn: Lsn(u64::from(anchor_sel)),
            epoch: EPOCH,
            content_crc: 0,
        }
    };
    let _ = replica.apply(ApplyRequest {
        lineage,
        committed: Lsn(u64::from(count)),
        anchor,
        count: u32::from(count % 8),
        frames,
    });
    let head = vol.status().head.0;
    assert!(head >= 4);
    if mode & 4 == 0 {
        // Without a fixed-up frame only the valid entries can have landed.
        assert!(head <= 4 + valid, "garbage applied: head {head}");
    }
    if mode & 8 == 8 {
        let g = vol.geometry();
        if replica
            .begin_base(BaseBeginRequest {
                lineage,
                base_lsn: Lsn(40),
                base_entry: EntryInfo {
                    lsn: Lsn(40),
                    epoch: EPOCH,
                    content_crc: 0,
                },
                geometry: g,
            })
            .is_ok()
        {
            let _ = replica.base_chunk(BaseChunkRequest {
                lineage,
                frame: fuzz.to_vec(),
            });
            let _ = replica.finish_base(lineage);
        }
    }
    drop(replica);
    drop(vol);
    let v = Volume::open_sim(&disk, &opts()).expect("the replica reopens");
    let _ = v.digest();
});
