//! A valid volume with known contents and a map of where every structure lies in its file,
//! for the corruption sweep and the hostile-input tests.

use blockvol::format::{
    ENTRY_HEADER_SIZE, SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE, Superblock, WAL_OFFSET,
    entry_size,
};
use blockvol::{CrashMode, CreateOptions, Digest, Lba, Lsn, RetentionPolicy, Volume};

use super::{Model, Op, data, manual, tiny};

/// One retained WAL entry, located in the file.
#[derive(Clone, Copy, Debug)]
pub struct EntryLoc {
    pub lsn: u64,
    /// File offset of the 64-byte header.
    pub header: u64,
    /// Payload bytes after the header (covered by the content CRC).
    pub payload_len: u64,
    /// Bytes the entry occupies (header, payload, alignment fill).
    pub size: u64,
}

/// A padding entry or a skipped ring end (fewer than 64 bytes), located in the file.
#[derive(Clone, Copy, Debug)]
pub struct FillLoc {
    /// File offset where the fill starts; it runs to the end of the ring.
    pub start: u64,
    /// True when a padding header is there (at least 64 bytes); false for a skip.
    pub has_header: bool,
}

/// A volume image plus everything needed to judge a damaged copy of it.
#[derive(Clone, Debug)]
pub struct Known {
    pub opts: CreateOptions,
    /// The file image.
    pub image: Vec<u8>,
    /// Every operation, LSN = index + 1.
    pub ops: Vec<Op>,
    pub head: u64,
    pub checkpoint: u64,
    pub tail: u64,
    /// The durable mark of the superblock recovery uses.
    pub durable_mark: u64,
    /// Retained entries, in LSN order.
    pub entries: Vec<EntryLoc>,
    /// Padding entries and skips inside the retained range.
    pub fills: Vec<FillLoc>,
    /// The slot recovery uses (0 = A, 1 = B).
    pub newest_slot: usize,
    pub extent_offset: u64,
    /// File offset of the checksum region (4 bytes per block, then zero fill to the page end).
    pub csum_offset: u64,
    pub file_len: u64,
    /// Contents at `head`.
    pub digest: Digest,
    /// The image at `head` (the model).
    pub model: Model,
    /// LBAs whose newest version is in the WAL above the checkpoint (the extent copy is
    /// shadowed and never read).
    pub shadowed: Vec<bool>,
}

impl Known {
    pub fn wal_end(&self) -> u64 {
        self.extent_offset
    }

    /// The block an extent offset belongs to.
    pub fn lba_of(&self, off: u64) -> u64 {
        (off - self.extent_offset) / u64::from(self.opts.block_size)
    }

    /// Blocks in the volume.
    pub fn volume_blocks(&self) -> u64 {
        self.opts.volume_size_bytes / u64::from(self.opts.block_size)
    }

    /// End of the extent.
    pub fn extent_end(&self) -> u64 {
        self.extent_offset + self.opts.volume_size_bytes
    }

    /// End of the checksums in use (the region's zero fill follows, up to the file end).
    pub fn csum_used_end(&self) -> u64 {
        self.csum_offset + 4 * self.volume_blocks()
    }

    /// The block whose checksum a checksum-region offset belongs to.
    pub fn csum_lba_of(&self, off: u64) -> u64 {
        (off - self.csum_offset) / 4
    }
}

/// Builds the known volume. `closed`: cleanly closed (every entry durable, the superblock's
/// durable mark at the head); otherwise the image a process crash leaves after the last
/// operations were appended and only partly synced (every written byte, durable mark behind).
pub fn known_volume(closed: bool) -> Known {
    let opts = tiny();
    let bs = opts.block_size;
    let (v, disk) = Volume::create_sim(&opts, &manual()).expect("create");
    v.set_retention(RetentionPolicy {
        keep_entries: 6,
        keep_bytes: 0,
    });
    let mut ops = Vec::new();
    for i in 0..160u64 {
        let blocks = 1 + (i * 5) % 9;
        let lba = (i * 11) % (64 - blocks);
        let op = if i % 11 == 4 {
            Op::Trim { lba, blocks }
        } else if i % 17 == 6 {
            Op::Barrier
        } else {
            Op::Write {
                lba,
                data: data(70_000 + i, blocks, bs),
            }
        };
        let lsn = match &op {
            Op::Write { lba, data } => v.write(Lba(*lba), data),
            Op::Trim { lba, blocks } => v.trim(Lba(*lba), *blocks),
            Op::Barrier => v.barrier(),
        }
        .expect("append");
        ops.push(op);
        assert_eq!(lsn, Lsn(ops.len() as u64));
        if i % 3 == 2 {
            v.sync().expect("sync");
        }
        if i % 8 == 7 && i < 150 {
            v.force_flush().expect("flush");
        }
    }
    // The last entries: synced one by one (each later header's hint covers the one before),
    // then two left unsynced.
    for i in 0..6u64 {
        let lba = 3 + i * 7;
        let d = data(80_000 + i, 2, bs);
        v.write(Lba(lba), &d).expect("write");
        ops.push(Op::Write { lba, data: d });
        if i < 4 {
            v.sync().expect("sync");
        }
    }
    let st = v.status();
    let entries: Vec<EntryLoc> = (st.tail.0 + 1..=st.head.0)
        .map(|lsn| {
            let payload_len = match &ops[(lsn - 1) as usize] {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            };
            EntryLoc {
                lsn,
                header: v.entry_file_offset(Lsn(lsn)).expect("retained"),
                payload_len,
                size: entry_size(payload_len),
            }
        })
        .collect();
    let image = if closed {
        v.close().expect("close");
        disk.crash_image_with(0, CrashMode::DurableOnly)
    } else {
        let img = disk.crash_image_with(0, CrashMode::AllWritten);
        drop(v);
        img
    };
    let (newest_slot, sb) = {
        let a = Superblock::decode(
            &image[SB_SLOT_A_OFFSET as usize..(SB_SLOT_A_OFFSET + SB_SLOT_SIZE) as usize],
            SB_SLOT_A_OFFSET,
        );
        let b = Superblock::decode(
            &image[SB_SLOT_B_OFFSET as usize..(SB_SLOT_B_OFFSET + SB_SLOT_SIZE) as usize],
            SB_SLOT_B_OFFSET,
        );
        blockvol::format::choose_superblock(&a, &b).expect("a valid superblock")
    };
    let wal_size = sb.wal_size;
    let ring_end = WAL_OFFSET + wal_size;
    // Fills: where an entry does not start right after the previous one, the previous one's
    // end up to the ring end is padding (or a skip).
    let mut fills = Vec::new();
    let mut prev_end = WAL_OFFSET + sb.tail_pos % wal_size;
    for e in &entries {
        if e.header != prev_end {
            assert_eq!(
                e.header, WAL_OFFSET,
                "an entry moves only to the ring start"
            );
            fills.push(FillLoc {
                start: prev_end,
                has_header: ring_end - prev_end >= ENTRY_HEADER_SIZE as u64,
            });
        }
        prev_end = e.header + e.size;
        if prev_end == ring_end {
            prev_end = WAL_OFFSET;
        }
    }
    let model = Model::at(&opts, &ops, st.head.0);
    let mut shadowed = vec![false; 64];
    for op in &ops[st.checkpoint.0 as usize..] {
        match op {
            Op::Write { lba, data } => {
                for b in *lba..*lba + data.len() as u64 / u64::from(bs) {
                    shadowed[b as usize] = true;
                }
            }
            Op::Trim { lba, blocks } => {
                for b in *lba..*lba + *blocks {
                    shadowed[b as usize] = true;
                }
            }
            Op::Barrier => {}
        }
    }
    Known {
        digest: model.digest(),
        model,
        file_len: image.len() as u64,
        image,
        head: st.head.0,
        checkpoint: st.checkpoint.0,
        tail: st.tail.0,
        durable_mark: sb.durable_mark,
        entries,
        fills,
        newest_slot,
        extent_offset: sb.extent_offset,
        csum_offset: sb.csum_offset(),
        shadowed,
        ops,
        opts,
    }
}
