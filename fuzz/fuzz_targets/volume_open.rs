//! `Volume::open` (on a simulated disk, the same recovery code a file gets) on hostile images,
//! and everything a volume that opens can be asked to do. The first byte picks the mode:
//!
//! - below 64: the rest of the input is the whole medium;
//! - otherwise the input patches a valid, cleanly closed volume (with wrapped entries, padding,
//!   flushed and unflushed data): records of `[target u8][offset u16][len u8][bytes]`, where
//!   the target picks a superblock slot, a retained entry header or payload, or any byte; then,
//!   per mode bits, the superblock CRCs and the touched entry headers' CRCs are recomputed so
//!   the patches reach the validation behind the checksums.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use blockvol::format::{ENTRY_HEADER_SIZE, ENTRY_OFF_HEADER_CRC, SB_OFF_CRC, SB_SLOT_SIZE};
use blockvol::{CreateOptions, Lba, Lsn, OpenOptions, RetentionPolicy, SimDisk, Volume};
use libfuzzer_sys::fuzz_target;

struct Known {
    image: Vec<u8>,
    /// File offsets of retained entry headers.
    headers: Vec<usize>,
}

fn opts() -> OpenOptions {
    OpenOptions {
        wal_full_timeout: Duration::from_millis(1),
        ..OpenOptions::manual()
    }
}

fn known() -> &'static Known {
    static K: OnceLock<Known> = OnceLock::new();
    K.get_or_init(|| {
        let create = CreateOptions {
            volume_size_bytes: 64 * 512,
            wal_size_bytes: 64 * 1024,
            block_size: 512,
        };
        let (v, disk) = Volume::create_sim(&create, &opts()).expect("create");
        v.set_retention(RetentionPolicy {
            keep_entries: 6,
            keep_bytes: 0,
        });
        for i in 0..120u64 {
            let blocks = 1 + (i * 5) % 9;
            let lba = (i * 11) % (64 - blocks);
            if i % 11 == 4 {
                v.trim(Lba(lba), blocks).expect("trim");
            } else {
                v.write(Lba(lba), &vec![i as u8; (blocks * 512) as usize])
                    .expect("write");
            }
            if i % 3 == 2 {
                v.sync().expect("sync");
            }
            if i % 8 == 7 && i < 110 {
                v.force_flush().expect("flush");
            }
        }
        let st = v.status();
        let headers = (st.tail.0 + 1..=st.head.0)
            .map(|l| v.entry_file_offset(Lsn(l)).expect("retained") as usize)
            .collect();
        v.close().expect("close");
        Known {
            image: disk.durable_image(),
            headers,
        }
    })
}

/// Everything a volume that opened can be asked; errors are fine, panics are not.
fn exercise(v: Volume, disk: &SimDisk) {
    let st = v.status();
    let g = v.geometry();
    let _ = v.digest();
    let _ = v.entry_info(st.head);
    if let Ok(scan) = v.scan_from(st.retained_start) {
        for e in scan.take(16) {
            if e.is_err() {
                break;
            }
        }
    }
    let block = vec![0x5Au8; g.block_size as usize];
    let _ = v.write(Lba(g.volume_blocks.saturating_sub(1)), &block);
    let _ = v.sync();
    let _ = v.force_flush();
    let _ = v.truncate_after(v.status().checkpoint);
    let _ = v.close();
    if let Ok(v) = Volume::open_sim(disk, &opts()) {
        let _ = v.digest();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let img = if mode < 64 {
        rest.to_vec()
    } else {
        let k = known();
        let mut img = k.image.clone();
        let mut touched = Vec::new();
        let mut r = rest;
        while r.len() >= 4 {
            let target = r[0];
            let off = usize::from(u16::from_le_bytes([r[1], r[2]]));
            let len = usize::from(r[3]).min(r.len() - 4);
            let bytes = &r[4..4 + len];
            r = &r[4 + len..];
            let at = match target % 4 {
                0 => off % (2 * SB_SLOT_SIZE as usize),
                1 | 2 => {
                    let h = k.headers[off % k.headers.len()];
                    touched.push(h);
                    // Header fields, or the payload just behind the header.
                    h + (off >> 8) % if target % 4 == 1 { 60 } else { 600 }
                }
                _ => (off << 4) % img.len(),
            };
            let end = (at + bytes.len()).min(img.len());
            img[at..end].copy_from_slice(&bytes[..end - at]);
        }
        if mode & 1 == 1 {
            for slot in 0..2 {
                let base = slot * SB_SLOT_SIZE as usize;
                let crc = crc32fast::hash(&img[base..base + SB_OFF_CRC]);
                img[base + SB_OFF_CRC..base + SB_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
        if mode & 2 == 2 {
            for h in touched {
                if h + ENTRY_HEADER_SIZE <= img.len() {
                    let crc = crc32fast::hash(&img[h..h + ENTRY_OFF_HEADER_CRC]);
                    img[h + ENTRY_OFF_HEADER_CRC..h + ENTRY_OFF_HEADER_CRC + 4]
                        .copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
        img
    };
    let disk = SimDisk::from_image(img);
    if let Ok(v) = Volume::open_sim(&disk, &opts()) {
        exercise(v, &disk);
    }
});
