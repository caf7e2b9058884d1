//! Helpers shared by the integration tests: small geometries, deterministic data and an
//! in-memory model of a volume's visible contents.
#![allow(dead_code)]

pub mod cli;
pub mod crashplan;
pub mod known;

use std::time::Duration;

use blockvol::{CreateOptions, Digest, EntryKind, OpenOptions, WalEntry};

/// 512-byte blocks, 64 blocks, the smallest WAL: small enough to build many crash images.
pub fn tiny() -> CreateOptions {
    CreateOptions {
        volume_size_bytes: 64 * 512,
        wal_size_bytes: 64 * 1024,
        block_size: 512,
    }
}

/// 4 KiB blocks, 1 MiB volume, 64 KiB WAL.
pub fn small() -> CreateOptions {
    CreateOptions {
        volume_size_bytes: 1 << 20,
        wal_size_bytes: 64 * 1024,
        block_size: 4096,
    }
}

/// A manual flusher with a short WAL-full timeout, so tests never wait long.
pub fn manual() -> OpenOptions {
    OpenOptions {
        wal_full_timeout: Duration::from_millis(50),
        ..OpenOptions::manual()
    }
}

/// `blocks` blocks whose bytes depend on `tag` and the position, so any misplaced byte shows.
pub fn data(tag: u64, blocks: u64, block_size: u32) -> Vec<u8> {
    let n = (blocks * u64::from(block_size)) as usize;
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One logical operation as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write { lba: u64, data: Vec<u8> },
    Trim { lba: u64, blocks: u64 },
    Barrier,
}

impl Op {
    pub fn from_entry(e: &WalEntry) -> Op {
        match &e.kind {
            EntryKind::Write { lba, data } => Op::Write {
                lba: lba.0,
                data: data.clone(),
            },
            EntryKind::Trim { lba, blocks } => Op::Trim {
                lba: lba.0,
                blocks: *blocks,
            },
            EntryKind::Barrier => Op::Barrier,
        }
    }
}

/// The flat image of a volume.
#[derive(Clone, Debug)]
pub struct Model {
    pub block_size: u32,
    pub image: Vec<u8>,
}

impl Model {
    pub fn new(opts: &CreateOptions) -> Model {
        Model {
            block_size: opts.block_size,
            image: vec![0; opts.volume_size_bytes as usize],
        }
    }

    pub fn apply(&mut self, op: &Op) {
        let bs = self.block_size as usize;
        match op {
            Op::Write { lba, data } => {
                let a = *lba as usize * bs;
                self.image[a..a + data.len()].copy_from_slice(data);
            }
            Op::Trim { lba, blocks } => {
                let a = *lba as usize * bs;
                self.image[a..a + *blocks as usize * bs].fill(0);
            }
            Op::Barrier => {}
        }
    }

    /// The image after the first `lsn` operations.
    pub fn at(opts: &CreateOptions, ops: &[Op], lsn: u64) -> Model {
        let mut m = Model::new(opts);
        for op in &ops[..lsn as usize] {
            m.apply(op);
        }
        m
    }

    pub fn digest(&self) -> Digest {
        Digest::of_image(&self.image)
    }

    pub fn read(&self, lba: u64, blocks: u64) -> &[u8] {
        let bs = self.block_size as usize;
        &self.image[lba as usize * bs..(lba + blocks) as usize * bs]
    }
}

/// Rewrites a current-format volume image the way format version 1 (no extent checksums) wrote
/// it, for the upgrade tests: every valid superblock slot says version 1 (its CRC recomputed;
/// the bytes are otherwise identical, since version 2 changed nothing else), and the checksum
/// region is cut off (`truncate`), or, where the medium cannot shrink (a simulated disk),
/// overwritten with junk beyond the version 1 geometry (a version 1 file may be longer than
/// its geometry), so an upgrade that skipped writing it fails.
pub fn as_version_1(img: &mut Vec<u8>, truncate: bool) {
    use blockvol::format::{SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE, Superblock};
    let mut v1_len = None;
    for off in [SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET] {
        let r = off as usize..(off + SB_SLOT_SIZE) as usize;
        if let Ok(mut sb) = Superblock::decode(&img[r.clone()], off) {
            sb.version = 1;
            img[r].copy_from_slice(&sb.encode());
            v1_len = Some(sb.file_len());
        }
    }
    let v1_len = v1_len.expect("a valid superblock") as usize;
    if truncate {
        img.truncate(v1_len);
    } else {
        for (i, b) in img[v1_len..].iter_mut().enumerate() {
            *b = 0xA5 ^ (i as u8);
        }
    }
}

/// Scrubs the whole volume and asserts every flushed block matches its checksum, and that no
/// read so far failed one (`checksum_errors` is 0).
pub fn assert_scrub_clean(v: &blockvol::Volume, what: &str) {
    let blocks = v.geometry().volume_blocks;
    let r = v
        .scrub_range(blockvol::Lba(0), blocks)
        .unwrap_or_else(|e| panic!("{what}: scrub failed: {e}"));
    assert!(
        r.damaged.is_empty(),
        "{what}: blocks fail their checksums: {:?}",
        r.damaged
    );
    assert_eq!(
        r.checked + r.skipped,
        blocks,
        "{what}: scrub did not cover the volume"
    );
    assert_eq!(v.status().checksum_errors, 0, "{what}");
}
