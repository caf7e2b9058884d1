//! Read-only inspection of a volume file, for the command line: both superblock slots, the
//! recovery walk and every entry checksum, without modifying the file.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{BlockVolError, Result};
use crate::format::{
    SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE, Superblock, WAL_OFFSET, choose_superblock,
};
use crate::medium::open_volume_file;
use crate::walk::{IndexEntry, WalkParams, wal_stamp, walk};

/// One superblock slot as found on disk.
#[derive(Debug)]
pub struct SlotReport {
    /// File offset of the slot.
    pub offset: u64,
    /// The decoded superblock, or why it was rejected.
    pub result: std::result::Result<Superblock, String>,
}

/// One WAL entry found by the walk.
#[derive(Clone, Debug)]
pub struct EntryListing {
    /// LSN.
    pub lsn: u64,
    /// Kind name: `write`, `trim`, `barrier`.
    pub kind: &'static str,
    /// Epoch.
    pub epoch: u64,
    /// First block.
    pub lba: u64,
    /// Block count.
    pub blocks: u32,
    /// Content CRC.
    pub content_crc: u32,
    /// File offset of the header.
    pub file_offset: u64,
}

/// What the walk of the WAL found.
#[derive(Debug)]
pub struct WalReport {
    /// Valid entries from the tail, in LSN order.
    pub entries: Vec<EntryListing>,
    /// Last valid LSN.
    pub head: u64,
    /// Why the walk stopped.
    pub end_detail: String,
    /// File offset where it stopped.
    pub end_offset: u64,
    /// Set when the log is corrupt (not merely torn at its end).
    pub corruption: Option<String>,
    /// Headers of this generation beyond the end (torn-tail leftovers).
    pub leftovers: usize,
}

/// Everything `inspect` found.
#[derive(Debug)]
pub struct Inspection {
    /// The inspected path.
    pub path: PathBuf,
    /// Slot A then slot B.
    pub slots: [SlotReport; 2],
    /// Index (0 = A, 1 = B) and contents of the slot recovery would use.
    pub chosen: Option<(usize, Superblock)>,
    /// The walk, when a superblock was usable, no install is incomplete and the file holds
    /// the geometry the superblock describes ([`Inspection::wal_not_checked`] says why not).
    pub wal: Option<WalReport>,
    /// File length.
    pub file_len: u64,
}

impl Inspection {
    /// `FileTooShort` when the file is shorter than the chosen superblock's geometry requires
    /// (it was truncated): the WAL is then not walked.
    pub fn file_too_short(&self) -> Option<BlockVolError> {
        let (_, sb) = self.chosen.as_ref()?;
        (sb.file_len() > self.file_len).then(|| BlockVolError::FileTooShort {
            path: self.path.display().to_string(),
            len: self.file_len,
            required: sb.file_len(),
        })
    }

    /// Why the WAL was not walked (`wal` is `None`), if it was not.
    pub fn wal_not_checked(&self) -> Option<String> {
        if self.wal.is_some() {
            return None;
        }
        Some(match &self.chosen {
            None => "no valid superblock".to_string(),
            Some((_, sb)) if sb.file_len() > self.file_len => format!(
                "the file is {} bytes, shorter than the {} its superblock describes",
                self.file_len,
                sb.file_len()
            ),
            Some((_, sb)) => format!(
                "base install incomplete (target lsn {}, durable below lba {})",
                sb.install_lsn, sb.install_resume
            ),
        })
    }

    /// Whether any checksum or structural check failed.
    pub fn is_corrupt(&self) -> bool {
        self.slots.iter().any(|s| s.result.is_err())
            || self.chosen.is_none()
            || self.wal.as_ref().is_some_and(|w| w.corruption.is_some())
            || self
                .chosen
                .as_ref()
                .is_some_and(|(_, sb)| sb.file_len() > self.file_len)
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        crate::format::KIND_WRITE => "write",
        crate::format::KIND_TRIM => "trim",
        crate::format::KIND_BARRIER => "barrier",
        _ => "unknown",
    }
}

/// Inspects a volume file without modifying it (opened read-only under a shared lock).
///
/// Damage is reported in the `Inspection`; what is not damage is an error: `Locked` if a
/// volume has the file open, `NotARegularFile` for a directory, FIFO, socket or device, `Io`
/// when the file cannot be opened or read.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let ctx = path.display().to_string();
    let file = open_volume_file(path, false)?;
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(BlockVolError::Locked { path: ctx }),
        Err(std::fs::TryLockError::Error(e)) => return Err(BlockVolError::io("lock", ctx, e)),
    }
    let file_len = file
        .metadata()
        .map_err(|e| BlockVolError::io("stat", ctx.clone(), e))?
        .len();
    let mut bufs = [
        vec![0u8; SB_SLOT_SIZE as usize],
        vec![0u8; SB_SLOT_SIZE as usize],
    ];
    let mut results = Vec::new();
    for (i, off) in [SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET].into_iter().enumerate() {
        let r = if file_len < off + SB_SLOT_SIZE {
            Err(BlockVolError::Corrupt {
                region: "superblock",
                offset: off,
                lsn: None,
                detail: format!("the file is {file_len} bytes: too short to hold this slot"),
            })
        } else {
            // A failed read is an I/O error, not damage: report it as such.
            file.read_exact_at(&mut bufs[i], off)
                .map_err(|e| BlockVolError::io("read superblock", ctx.clone(), e))?;
            Superblock::decode(&bufs[i], off)
        };
        results.push(r);
    }
    let chosen = choose_superblock(&results[0], &results[1]);
    let mut wal = None;
    if let Some((_, sb)) = &chosen
        && sb.flags & crate::format::SB_FLAG_INSTALL_INCOMPLETE == 0
        && sb.file_len() <= file_len
    {
        let params = WalkParams {
            wal_size: sb.wal_size,
            stamp: wal_stamp(&sb.volume_id, sb.generation),
            tail_lsn: sb.tail_lsn,
            tail_pos: sb.tail_pos,
            block_size: sb.block_size,
            volume_blocks: sb.volume_blocks,
        };
        let reader = |phys: u64, buf: &mut [u8]| file.read_exact_at(buf, WAL_OFFSET + phys);
        let res =
            walk(&params, &reader).map_err(|e| BlockVolError::io("read wal", ctx.clone(), e))?;
        let end_offset = WAL_OFFSET + res.end_pos % sb.wal_size;
        let corruption = if let Some(ev) = &res.evidence {
            Some(format!(
                "WAL entry lsn {} at file offset {end_offset} is damaged ({}); entry {} at file offset {} shows it had been synced",
                res.head + 1,
                res.end_detail,
                ev.lsn,
                WAL_OFFSET + ev.pos % sb.wal_size
            ))
        } else if res.head < sb.checkpoint.max(sb.durable_mark) {
            Some(format!(
                "WAL ends at lsn {} (file offset {end_offset}: {}) below the synced lsn {} (checkpoint {})",
                res.head,
                res.end_detail,
                sb.checkpoint.max(sb.durable_mark),
                sb.checkpoint
            ))
        } else {
            None
        };
        let entries = res
            .entries
            .iter()
            .map(|e: &IndexEntry| EntryListing {
                lsn: e.lsn,
                kind: kind_name(e.kind),
                epoch: e.epoch,
                lba: e.lba,
                blocks: e.blocks,
                content_crc: e.content_crc,
                file_offset: WAL_OFFSET + e.pos % sb.wal_size,
            })
            .collect();
        wal = Some(WalReport {
            entries,
            head: res.head,
            end_detail: res.end_detail,
            end_offset,
            corruption,
            leftovers: res.leftovers.len(),
        });
    }
    let mut it = results.into_iter();
    let mut slot = |off: u64| SlotReport {
        offset: off,
        result: it
            .next()
            .unwrap_or_else(|| Err(BlockVolError::InvalidArgument("missing slot".into())))
            .map_err(|e| e.to_string()),
    };
    let slots = [slot(SB_SLOT_A_OFFSET), slot(SB_SLOT_B_OFFSET)];
    Ok(Inspection {
        path: path.to_path_buf(),
        slots,
        chosen,
        wal,
        file_len,
    })
}
