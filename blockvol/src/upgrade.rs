//! Converting a version 1 volume file (no extent checksums) to the current format, in place
//! (`blockvol upgrade`, docs/format.md section 11).
//!
//! Version 2 only adds the checksum region *after* the extent: nothing moves, so the upgrade
//! extends the file (allocated, as creation does), computes every block's checksum from the
//! extent as it is, writes and syncs the region, and then commits by writing the superblock
//! with the new version, to the older slot first and then to the other, each synced. A crash
//! before the first superblock sync leaves a valid version 1 file (longer than its geometry,
//! which version 1 allows), and the upgrade can simply run again; after it, the file is version
//! 2 with every checksum durable.
//!
//! The extent is checksummed as it stands, without running recovery: blocks an interrupted
//! flush left half written lie in `(checkpoint, flush mark]`, and the first read-write open
//! redoes that flush, rewriting those blocks with their checksums (until then every read takes
//! them from the WAL); blocks of an incomplete base install above its resume point are resent
//! by the install that resumes it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{BlockVolError, Result};
use crate::format::{
    CSUM_SIZE, FORMAT_VERSION, SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE, block_csum,
    is_zero, put_u32,
};
use crate::medium::{Medium, open_volume_file};
use crate::volume::{pick_superblock, read_slots};

/// What [`upgrade_file`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The file was converted.
    Upgraded {
        /// The version it had.
        from_version: u32,
        /// The version it has now.
        to_version: u32,
        /// Blocks checksummed.
        blocks: u64,
        /// Of those, blocks holding data (the rest are zeros, checksum 0).
        nonzero_blocks: u64,
    },
    /// The file already had the current version; nothing was written.
    AlreadyCurrent {
        /// Its version.
        version: u32,
    },
}

/// Converts the volume file at `path` to the current format version, in place and
/// crash-safely (see the module docs). The file is opened read-write under the exclusive lock
/// (`Locked` if a volume has it open); a file that is already current is left untouched.
pub fn upgrade_file(path: &Path) -> Result<UpgradeOutcome> {
    let ctx = path.display().to_string();
    let file = open_volume_file(path, true)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(BlockVolError::Locked { path: ctx }),
        Err(std::fs::TryLockError::Error(e)) => return Err(BlockVolError::io("lock", ctx, e)),
    }
    let len = file
        .metadata()
        .map_err(|e| BlockVolError::io("stat", ctx.clone(), e))?
        .len();
    let slots = read_slots(&|o, b| file.read_exact_at(b, o), len, &ctx)?;
    let (_, sb) = pick_superblock(&slots, len, &ctx)?;
    if sb.version < FORMAT_VERSION {
        let mut new = sb.clone();
        new.version = FORMAT_VERSION;
        if len < new.file_len() {
            // Extend and allocate the checksum region, as creation allocates the whole file.
            crate::sys::preallocate(&file, new.file_len())
                .map_err(|e| BlockVolError::io("fallocate", ctx.clone(), e))?;
        }
    }
    let m = PlainFile {
        len: file
            .metadata()
            .map_err(|e| BlockVolError::io("stat", ctx.clone(), e))?
            .len(),
        file,
        path: ctx,
    };
    upgrade_medium(&m)
}

/// The upgrade on a medium that already holds the whole new geometry.
pub(crate) fn upgrade_medium(m: &dyn Medium) -> Result<UpgradeOutcome> {
    let what = m.describe();
    let slots = read_slots(&|o, b| m.read_at(o, b), m.len(), &what)?;
    let (slot, sb) = pick_superblock(&slots, m.len(), &what)?;
    if sb.version >= FORMAT_VERSION {
        return Ok(UpgradeOutcome::AlreadyCurrent {
            version: sb.version,
        });
    }
    let mut new = sb.clone();
    new.version = FORMAT_VERSION;
    if m.len() < new.file_len() {
        return Err(BlockVolError::FileTooShort {
            path: what,
            len: m.len(),
            required: new.file_len(),
        });
    }
    let io_err = |op: &'static str| move |e: io::Error| BlockVolError::io(op, m.describe(), e);
    // Checksum every block, a megabyte of extent at a time; write the region in pieces.
    let bs = u64::from(sb.block_size);
    let per = ((1u64 << 20) / bs).max(1);
    let mut data = Vec::new();
    let mut csums: Vec<u8> = Vec::new();
    let mut written = 0u64;
    let mut nonzero = 0u64;
    let mut lba = 0u64;
    while lba < sb.volume_blocks {
        let n = per.min(sb.volume_blocks - lba);
        data.resize((n * bs) as usize, 0);
        m.read_at(sb.extent_offset + lba * bs, &mut data)
            .map_err(io_err("read extent"))?;
        for (i, b) in data.chunks_exact(bs as usize).enumerate() {
            let c = if is_zero(b) {
                0
            } else {
                nonzero += 1;
                block_csum(lba + i as u64, b)
            };
            let at = csums.len();
            csums.resize(at + CSUM_SIZE as usize, 0);
            put_u32(&mut csums, at, c);
        }
        lba += n;
        if csums.len() >= 1 << 16 || lba == sb.volume_blocks {
            if lba == sb.volume_blocks {
                // The region's fill after the last checksum is zero.
                let end = new.csum_len() - written;
                csums.resize(end as usize, 0);
            }
            m.write_at(new.csum_offset() + written, &csums)
                .map_err(io_err("write checksums"))?;
            written += csums.len() as u64;
            csums.clear();
        }
    }
    // The checksums are durable before any superblock names the version that has them.
    m.sync_range(
        sb.extent_offset,
        new.csum_offset() + new.csum_len() - sb.extent_offset,
    )
    .map_err(io_err("fdatasync checksums"))?;
    // Commit: the older slot first (a torn write leaves the version 1 slot in charge), then
    // the other, so no version 1 slot is left to fall back to.
    let offs = [SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET];
    for (i, off) in [offs[1 - slot], offs[slot]].into_iter().enumerate() {
        new.seq = sb.seq + 1 + i as u64;
        m.write_at(off, &new.encode())
            .map_err(io_err("write superblock"))?;
        m.sync_range(off, SB_SLOT_SIZE)
            .map_err(io_err("sync superblock"))?;
    }
    log::info!(
        "upgraded {what} from format version {} to {FORMAT_VERSION}: {} blocks checksummed",
        sb.version,
        sb.volume_blocks
    );
    Ok(UpgradeOutcome::Upgraded {
        from_version: sb.version,
        to_version: FORMAT_VERSION,
        blocks: sb.volume_blocks,
        nonzero_blocks: nonzero,
    })
}

/// The volume file with plain positioned I/O, for the upgrade (which holds the file's lock on
/// this descriptor, so it cannot open a `FileMedium`, which locks its own).
struct PlainFile {
    file: File,
    path: String,
    len: u64,
}

impl Medium for PlainFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, off)
    }

    fn sync_range(&self, _off: u64, _len: u64) -> io::Result<()> {
        self.file.sync_data()
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        crate::medium::write_zeros(&self.file, off, len)
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}
