//! Simulated-disk volumes and test hooks (feature `testing`).

use std::sync::Arc;

use super::flush::background_cycle;
use super::superblock::{format_superblocks, initial_superblock, read_slots};
use super::{Volume, validate_create};
use crate::error::{BlockVolError, Result};
use crate::medium::Medium;
use crate::types::{CreateOptions, Lsn, OpenOptions};

impl Volume {
    /// Creates a volume on a new simulated disk (feature `testing`).
    pub fn create_sim(
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<(Volume, crate::sim::SimDisk)> {
        let geo = validate_create(create)?;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&geo.volume_blocks.to_le_bytes());
        id[8..12].copy_from_slice(&geo.block_size.to_le_bytes());
        id[12] = 0x5A;
        let sb = initial_superblock(&geo, id);
        let disk = crate::sim::SimDisk::new(sb.file_len());
        {
            if !disk.claim() {
                return Err(BlockVolError::Locked {
                    path: "simulated disk".into(),
                });
            }
            let m = crate::sim::SimMedium::new(disk.clone());
            format_superblocks(&m, &sb)?;
        }
        let v = Volume::open_sim(&disk, open)?;
        Ok((v, disk))
    }

    /// Runs one cycle of the background flusher now, on the caller's thread (feature
    /// `testing`: makes the pipelined background flush deterministic to test).
    pub fn run_flusher_cycle(&self) -> Result<()> {
        background_cycle(&self.shared)
    }

    /// File offset of the header of retained entry `lsn` (feature `testing`, for fault
    /// injection).
    pub fn entry_file_offset(&self, lsn: Lsn) -> Result<u64> {
        let st = self.shared.lock_state();
        st.entry(lsn.0)
            .map(|e| self.shared.wal_file_off(e.pos))
            .ok_or(BlockVolError::Recycled {
                requested: lsn,
                retained_start: Lsn(st.tail + 1),
            })
    }

    /// Converts the version 1 volume on a simulated disk to the current format in place
    /// (feature `testing`; the disk must already hold the new geometry, checksum region
    /// included: a version 1 file may be longer than its geometry). See [`crate::upgrade_file`].
    pub fn upgrade_sim(disk: &crate::sim::SimDisk) -> Result<crate::UpgradeOutcome> {
        if !disk.claim() {
            return Err(BlockVolError::Locked {
                path: "simulated disk".into(),
            });
        }
        let m = crate::sim::SimMedium::new(disk.clone());
        crate::upgrade::upgrade_medium(&m)
    }

    /// Opens a volume on a simulated disk (feature `testing`), running recovery.
    pub fn open_sim(disk: &crate::sim::SimDisk, open: &OpenOptions) -> Result<Volume> {
        if !disk.claim() {
            return Err(BlockVolError::Locked {
                path: "simulated disk".into(),
            });
        }
        let m = crate::sim::SimMedium::new(disk.clone());
        let slots = read_slots(&|o, b| m.read_at(o, b), m.len(), "simulated disk")?;
        Volume::open_medium(Arc::new(m), &slots, open, false)
    }
}
