//! Logical WAL entries and their self-checking wire form.

use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_WIRE, EntryHeader, KIND_BARRIER, KIND_PADDING, KIND_TRIM,
    KIND_WRITE, content_crc, header_count,
};
use crate::types::{EntryInfo, Epoch, Lba, Lsn};

/// What an entry does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Write `data` (whole blocks) starting at block `lba`.
    Write {
        /// First block.
        lba: Lba,
        /// Whole blocks of data.
        data: Vec<u8>,
    },
    /// Zero `blocks` blocks starting at `lba`.
    Trim {
        /// First block.
        lba: Lba,
        /// Number of blocks.
        blocks: u64,
    },
    /// A no-op that consumes an LSN.
    Barrier,
}

impl EntryKind {
    /// The kind a checked header and its payload describe (anything but a write or a trim is
    /// a barrier: padding never reaches here).
    pub(crate) fn from_header(h: &EntryHeader, payload: &[u8]) -> EntryKind {
        match h.kind {
            KIND_WRITE => EntryKind::Write {
                lba: Lba(h.lba),
                data: payload.to_vec(),
            },
            KIND_TRIM => EntryKind::Trim {
                lba: Lba(h.lba),
                blocks: u64::from(h.blocks),
            },
            _ => EntryKind::Barrier,
        }
    }
}

/// One logical entry: what a scan yields and what `apply` accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalEntry {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The epoch it was written under.
    pub epoch: Epoch,
    /// What it does.
    pub kind: EntryKind,
}

impl WalEntry {
    pub(crate) fn kind_code(&self) -> u8 {
        match self.kind {
            EntryKind::Write { .. } => KIND_WRITE,
            EntryKind::Trim { .. } => KIND_TRIM,
            EntryKind::Barrier => KIND_BARRIER,
        }
    }

    /// `(lba, count, payload)` as they enter the content CRC.
    fn crc_fields(&self) -> (u64, u64, &[u8]) {
        match &self.kind {
            EntryKind::Write { lba, data } => (lba.0, data.len() as u64, data.as_slice()),
            EntryKind::Trim { lba, blocks } => (lba.0, *blocks, &[][..]),
            EntryKind::Barrier => (0, 0, &[][..]),
        }
    }

    /// The entry's content identity (LSN, epoch, content CRC).
    pub fn info(&self) -> EntryInfo {
        let (lba, count, payload) = self.crc_fields();
        EntryInfo {
            lsn: self.lsn,
            epoch: self.epoch,
            content_crc: content_crc(self.kind_code(), lba, count, payload),
        }
    }

    /// Bytes of the wire form.
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_SIZE + self.crc_fields().2.len()
    }

    /// Appends the wire form (a 64-byte header carrying both CRCs, then the payload) to `out`.
    ///
    /// Fails only when the entry cannot be represented: more than `u32::MAX` blocks or payload
    /// bytes, or an empty write or trim.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let (lba, count, payload) = self.crc_fields();
        let payload_len = u32::try_from(payload.len()).map_err(|_| {
            BlockVolError::InvalidArgument(format!(
                "payload of {} bytes is too large",
                payload.len()
            ))
        })?;
        let blocks = match &self.kind {
            // The wire form does not know the block size; a write records its payload as one
            // "block" span and the receiver re-derives the block count from its geometry.
            EntryKind::Write { .. } => 1,
            EntryKind::Trim { blocks, .. } => u32::try_from(*blocks).map_err(|_| {
                BlockVolError::InvalidArgument(format!("trim of {blocks} blocks is too large"))
            })?,
            EntryKind::Barrier => 0,
        };
        if matches!(self.kind, EntryKind::Write { .. }) && payload.is_empty() {
            return Err(BlockVolError::InvalidArgument("write with no data".into()));
        }
        if matches!(self.kind, EntryKind::Trim { .. }) && blocks == 0 {
            return Err(BlockVolError::InvalidArgument("trim of zero blocks".into()));
        }
        let h = EntryHeader {
            kind: self.kind_code(),
            generation: 0,
            lsn: self.lsn.0,
            epoch: self.epoch.0,
            lba,
            blocks,
            payload_len,
            durable_hint: 0,
            content_crc: content_crc(self.kind_code(), lba, count, payload),
        };
        let start = out.len();
        out.resize(start + ENTRY_HEADER_SIZE, 0);
        h.encode_into(ENTRY_MAGIC_WIRE, &mut out[start..]);
        out.extend_from_slice(payload);
        Ok(())
    }

    /// The wire form as a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Decodes exactly one wire-form entry; trailing bytes are an error.
    pub fn decode(buf: &[u8]) -> Result<WalEntry> {
        let (e, used) = WalEntry::decode_prefix(buf)?;
        if used != buf.len() {
            return Err(BlockVolError::decode(
                "wal entry",
                format!(
                    "{} trailing bytes after a {used}-byte entry",
                    buf.len() - used
                ),
            ));
        }
        Ok(e)
    }

    /// Decodes one wire-form entry from the front of `buf`, returning it and the bytes used.
    pub fn decode_prefix(buf: &[u8]) -> Result<(WalEntry, usize)> {
        let (h, total) = decode_wire(buf)?;
        let kind = EntryKind::from_header(&h, &buf[ENTRY_HEADER_SIZE..total]);
        Ok((
            WalEntry {
                lsn: Lsn(h.lsn),
                epoch: Epoch(h.epoch),
                kind,
            },
            total,
        ))
    }
}

/// Checks the wire-form entry at the front of `buf` (magic, header CRC, shape, zero stamp and
/// hint, LSN, length, content CRC) without copying it; returns its header and its length.
pub(crate) fn decode_wire(buf: &[u8]) -> Result<(EntryHeader, usize)> {
    let h = EntryHeader::decode(buf, ENTRY_MAGIC_WIRE)
        .map_err(|d| BlockVolError::decode("wal entry", d))?;
    if h.kind == KIND_PADDING {
        return Err(BlockVolError::decode(
            "wal entry",
            "padding is not a wire entry",
        ));
    }
    if h.generation != 0 || h.durable_hint != 0 {
        return Err(BlockVolError::decode(
            "wal entry",
            "wire entries carry zero generation and durable hint",
        ));
    }
    if h.lsn == 0 {
        return Err(BlockVolError::decode(
            "wal entry",
            "lsn 0 is never an entry",
        ));
    }
    if h.kind == KIND_WRITE && h.blocks != 1 {
        return Err(BlockVolError::decode(
            "wal entry",
            "wire write must record one span",
        ));
    }
    let total = ENTRY_HEADER_SIZE + h.payload_len as usize;
    if buf.len() < total {
        return Err(BlockVolError::decode(
            "wal entry",
            format!("truncated: need {total} bytes, have {}", buf.len()),
        ));
    }
    let payload = &buf[ENTRY_HEADER_SIZE..total];
    let crc = content_crc(h.kind, h.lba, header_count(&h), payload);
    if crc != h.content_crc {
        return Err(BlockVolError::decode(
            "wal entry",
            format!(
                "content checksum mismatch at lsn {}: stored {:#010x}, computed {crc:#010x}",
                h.lsn, h.content_crc
            ),
        ));
    }
    Ok((h, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_each_kind() {
        for kind in [
            EntryKind::Write {
                lba: Lba(7),
                data: vec![0xAB; 1024],
            },
            EntryKind::Trim {
                lba: Lba(3),
                blocks: 9,
            },
            EntryKind::Barrier,
        ] {
            let e = WalEntry {
                lsn: Lsn(42),
                epoch: Epoch(5),
                kind,
            };
            let bytes = e.encode().expect("encode");
            assert_eq!(bytes.len(), e.encoded_len());
            let d = WalEntry::decode(&bytes).expect("decode");
            assert_eq!(d, e);
            assert_eq!(d.info(), e.info());
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let e = WalEntry {
            lsn: Lsn(9),
            epoch: Epoch(2),
            kind: EntryKind::Write {
                lba: Lba(1),
                data: (0..512u32).map(|i| i as u8).collect(),
            },
        };
        let bytes = e.encode().expect("encode");
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                WalEntry::decode(&b).is_err(),
                "flip of bit {bit} not detected"
            );
        }
    }

    #[test]
    fn empty_write_and_zero_trim_are_refused() {
        let w = WalEntry {
            lsn: Lsn(1),
            epoch: Epoch(0),
            kind: EntryKind::Write {
                lba: Lba(0),
                data: vec![],
            },
        };
        assert!(matches!(w.encode(), Err(BlockVolError::InvalidArgument(_))));
        let t = WalEntry {
            lsn: Lsn(1),
            epoch: Epoch(0),
            kind: EntryKind::Trim {
                lba: Lba(0),
                blocks: 0,
            },
        };
        assert!(matches!(t.encode(), Err(BlockVolError::InvalidArgument(_))));
    }
}
