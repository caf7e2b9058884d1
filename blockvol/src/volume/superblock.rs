//! Superblocks: the one built from the in-memory state, the alternating-slot writer, the two
//! slots of a new volume, and choosing the newest valid slot on open.

use std::sync::MutexGuard;

use super::{Shared, State, lock};
use crate::error::{BlockVolError, Result};
use crate::format::{
    SB_FLAG_INSTALL_INCOMPLETE, SB_FLAG_REPAIRED, SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET, SB_SLOT_SIZE,
    Superblock, WAL_OFFSET, choose_superblock,
};
use crate::medium::Medium;
use crate::types::{Geometry, Role};

/// Holds `(seq, slot)` of the last superblock written; its mutex serializes superblock writes.
pub(crate) struct SbWriter {
    pub(super) seq: u64,
    pub(super) slot: usize,
}

impl Shared {
    /// The superblock describing the persisted state (the in-memory state equals it).
    pub(crate) fn sb_from_state(&self, st: &State) -> Superblock {
        let mut flags = 0;
        if st.install_incomplete {
            flags |= SB_FLAG_INSTALL_INCOMPLETE;
        }
        if st.repaired {
            flags |= SB_FLAG_REPAIRED;
        }
        Superblock {
            version: crate::format::FORMAT_VERSION,
            flags,
            seq: 0,
            volume_id: self.volume_id,
            block_size: self.geo.block_size,
            volume_blocks: self.geo.volume_blocks,
            wal_offset: WAL_OFFSET,
            wal_size: self.wal_size(),
            extent_offset: self.extent_offset,
            generation: st.generation,
            checkpoint: st.checkpoint,
            tail_lsn: st.tail,
            tail_pos: st.tail_pos,
            tail_epoch: st.tail_info.epoch.0,
            tail_crc: st.tail_info.content_crc,
            role: st.role,
            epoch: st.epoch.0,
            head_hint: st.head,
            install_lsn: if st.install_incomplete {
                st.install_lsn
            } else {
                0
            },
            durable_mark: st.durable,
            flush_mark: st.flush_mark,
            install_epoch: if st.install_incomplete {
                st.install_entry.epoch.0
            } else {
                0
            },
            install_crc: if st.install_incomplete {
                st.install_entry.content_crc
            } else {
                0
            },
            install_resume: if st.install_incomplete {
                st.install_resume
            } else {
                0
            },
        }
    }

    /// Writes `sb` into the slot not holding the newest superblock and syncs it.
    pub(crate) fn write_sb(&self, w: &mut SbWriter, mut sb: Superblock) -> Result<()> {
        sb.seq = w.seq + 1;
        let slot = 1 - w.slot;
        let off = if slot == 0 {
            SB_SLOT_A_OFFSET
        } else {
            SB_SLOT_B_OFFSET
        };
        let bytes = sb.encode();
        self.medium.write_at(off, &bytes).map_err(|e| {
            BlockVolError::io("write superblock", format!("slot at offset {off}"), e)
        })?;
        self.medium.sync_range(off, SB_SLOT_SIZE).map_err(|e| {
            BlockVolError::io("sync superblock", format!("slot at offset {off}"), e)
        })?;
        w.seq = sb.seq;
        w.slot = slot;
        Ok(())
    }

    pub(crate) fn sb_writer(&self) -> MutexGuard<'_, SbWriter> {
        lock(&self.sb)
    }

    /// Writes a superblock built from the state by `f`, poisoning the volume on failure.
    pub(crate) fn persist_with(
        &self,
        w: &mut SbWriter,
        f: impl FnOnce(&State) -> Superblock,
    ) -> Result<()> {
        let sb = {
            let st = self.lock_state();
            self.check_usable(&st)?;
            f(&st)
        };
        if let Err(e) = self.write_sb(w, sb) {
            let mut st = self.lock_state();
            self.poison(&mut st, e.to_string());
            return Err(e);
        }
        Ok(())
    }
}

/// The superblock of a freshly created volume.
pub(super) fn initial_superblock(geo: &Geometry, volume_id: [u8; 16]) -> Superblock {
    Superblock {
        version: crate::format::FORMAT_VERSION,
        flags: 0,
        seq: 0,
        volume_id,
        block_size: geo.block_size,
        volume_blocks: geo.volume_blocks,
        wal_offset: WAL_OFFSET,
        wal_size: geo.wal_size_bytes,
        extent_offset: WAL_OFFSET + geo.wal_size_bytes,
        generation: 1,
        checkpoint: 0,
        tail_lsn: 0,
        tail_pos: 0,
        tail_epoch: 0,
        tail_crc: 0,
        role: Role::None,
        epoch: 0,
        head_hint: 0,
        install_lsn: 0,
        durable_mark: 0,
        flush_mark: 0,
        install_epoch: 0,
        install_crc: 0,
        install_resume: 0,
    }
}

/// Writes both slots (seq 1 in A, seq 2 in B) so a new volume has two valid superblocks.
pub(super) fn format_superblocks(m: &dyn Medium, sb: &Superblock) -> Result<()> {
    for (seq, off) in [(1u64, SB_SLOT_A_OFFSET), (2, SB_SLOT_B_OFFSET)] {
        let mut s = sb.clone();
        s.seq = seq;
        m.write_at(off, &s.encode())
            .map_err(|e| BlockVolError::io("write superblock", m.describe(), e))?;
        m.sync_range(off, SB_SLOT_SIZE)
            .map_err(|e| BlockVolError::io("sync superblock", m.describe(), e))?;
    }
    Ok(())
}

/// Reads both superblock slots of a medium of `len` bytes. A slot the medium is too short to
/// hold is not read (`pick_superblock` rejects it, saying why).
pub(crate) fn read_slots(
    read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    len: u64,
    what: &str,
) -> Result<[Vec<u8>; 2]> {
    let mut slots = [
        vec![0u8; SB_SLOT_SIZE as usize],
        vec![0u8; SB_SLOT_SIZE as usize],
    ];
    for (buf, off) in slots.iter_mut().zip([SB_SLOT_A_OFFSET, SB_SLOT_B_OFFSET]) {
        if off + SB_SLOT_SIZE <= len {
            read(off, buf)
                .map_err(|e| BlockVolError::io("read superblock", what.to_string(), e))?;
        }
    }
    Ok(slots)
}

/// Decodes both slots of a medium of `len` bytes and picks the newest valid one; then checks
/// that the medium holds the geometry it describes (`FileTooShort`, naming `what`).
pub(crate) fn pick_superblock(
    slots: &[Vec<u8>; 2],
    len: u64,
    what: &str,
) -> Result<(usize, Superblock)> {
    let decode = |i: usize, off: u64| {
        if off + SB_SLOT_SIZE > len {
            return Err(BlockVolError::Corrupt {
                region: "superblock",
                offset: off,
                lsn: None,
                detail: format!("the file is {len} bytes: too short to hold this slot"),
            });
        }
        Superblock::decode(&slots[i], off)
    };
    let a = decode(0, SB_SLOT_A_OFFSET);
    let b = decode(1, SB_SLOT_B_OFFSET);
    let (slot, sb) = choose_superblock(&a, &b).ok_or_else(|| BlockVolError::NoValidSuperblock {
        slot_a: a.err().map(|e| e.to_string()).unwrap_or_default(),
        slot_b: b.err().map(|e| e.to_string()).unwrap_or_default(),
    })?;
    if len < sb.file_len() {
        return Err(BlockVolError::FileTooShort {
            path: what.to_string(),
            len,
            required: sb.file_len(),
        });
    }
    Ok((slot, sb))
}
