//! Retention pins and WAL scans.

use std::sync::Arc;

use crate::entry::{EntryKind, WalEntry};
use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, ENTRY_MAGIC_WIRE, EntryHeader, KIND_WRITE, content_crc,
    header_count,
};
use crate::types::{EntryInfo, Epoch, Lsn};
use crate::volume::{Shared, Volume};

/// Keeps every entry with LSN greater than `lsn()` in the WAL until dropped or revoked.
///
/// `Send + Sync`. Dropping it releases the pin and wakes the flusher.
pub struct WalPin {
    shared: Arc<Shared>,
    id: u64,
    after: Lsn,
}

impl std::fmt::Debug for WalPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalPin(after {})", self.after)
    }
}

impl WalPin {
    /// Entries above this LSN are kept.
    pub fn lsn(&self) -> Lsn {
        self.after
    }

    /// Whether `revoke_wal_pins` revoked this pin (it then holds nothing).
    pub fn is_revoked(&self) -> bool {
        self.shared.pin_revoked(self.id)
    }
}

impl Drop for WalPin {
    fn drop(&mut self) {
        self.shared.remove_pin(self.id);
    }
}

/// Iterator over `from, from+1, ..., end` (the head when the scan was opened).
///
/// Holds a read pin on `from - 1` while alive. Every failure is an error item (after which the
/// iterator ends): `Recycled` if the range was recycled after a revocation, `ScanInvalidated`
/// after a truncation or base install, `Corrupt` if stored bytes fail their checks. It never
/// ends early without saying so.
pub struct WalScan {
    shared: Arc<Shared>,
    pin_id: u64,
    next: u64,
    end: u64,
    lineage: u64,
    stamp: u64,
    done: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for WalScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalScan(next {}, end {})", self.next, self.end)
    }
}

impl WalScan {
    /// The last LSN this scan yields.
    pub fn end(&self) -> Lsn {
        Lsn(self.end)
    }

    /// The LSN the next item will carry.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.next)
    }

    /// Reads the entry at `self.next` from the ring into `out[start..]` and checks it: the
    /// scan is still valid and the entry retained, its header decodes with this ring's stamp,
    /// LSN and kind as the index expects, and its content checksum matches. The one check both
    /// `next` and `next_encoded` rely on; returns the decoded header.
    fn read_checked(&self, out: &mut Vec<u8>, start: usize) -> Result<EntryHeader> {
        let lsn = self.next;
        let (e, file_off) = {
            let s = &self.shared;
            let st = s.lock_state();
            if st.closed {
                return Err(BlockVolError::Closed);
            }
            if st.lineage != self.lineage {
                return Err(BlockVolError::ScanInvalidated { at: Lsn(lsn) });
            }
            if lsn <= st.tail {
                return Err(BlockVolError::Recycled {
                    requested: Lsn(lsn),
                    retained_start: Lsn(st.tail + 1),
                });
            }
            let Some(e) = st.entry(lsn).copied() else {
                return Err(BlockVolError::ScanInvalidated { at: Lsn(lsn) });
            };
            out.resize(start + ENTRY_HEADER_SIZE + e.payload_len as usize, 0);
            s.read_wal(e.pos, &mut out[start..])?;
            (e, s.wal_file_off(e.pos))
        };
        let corrupt = |detail: String| BlockVolError::Corrupt {
            region: "wal",
            offset: file_off,
            lsn: Some(Lsn(lsn)),
            detail,
        };
        let buf = &out[start..];
        let h = EntryHeader::decode(buf, ENTRY_MAGIC_DISK).map_err(&corrupt)?;
        if h.generation != self.stamp || h.lsn != lsn || h.kind != e.kind {
            return Err(corrupt(format!(
                "header names lsn {} kind {:#04x}; the index expects lsn {lsn} kind {:#04x}",
                h.lsn, h.kind, e.kind
            )));
        }
        let crc = content_crc(h.kind, h.lba, header_count(&h), &buf[ENTRY_HEADER_SIZE..]);
        if crc != h.content_crc {
            return Err(corrupt(format!(
                "content checksum mismatch: stored {:#010x}, computed {crc:#010x}",
                h.content_crc
            )));
        }
        Ok(h)
    }

    fn read_next(&mut self) -> Result<WalEntry> {
        let lsn = self.next;
        let mut buf = std::mem::take(&mut self.buf);
        let checked = self.read_checked(&mut buf, 0);
        self.buf = buf;
        let h = checked?;
        let kind = EntryKind::from_header(&h, &self.buf[ENTRY_HEADER_SIZE..]);
        Ok(WalEntry {
            lsn: Lsn(lsn),
            epoch: Epoch(h.epoch),
            kind,
        })
    }
}

impl WalScan {
    /// Appends the next entry in wire form to `out`, exactly the bytes
    /// `WalEntry::encode_into` would append for the entry `next` yields, and returns its
    /// identity. The entry is copied once, from the ring into `out`, checked there like `next`
    /// checks it (header, stamp, LSN, kind, content CRC), and its header rewritten in place in
    /// wire form (the content CRC carries over: it does not depend on the block size or the
    /// ring). No per-entry allocation once `out` has grown. `None` after the last entry; an
    /// error ends the scan (and leaves `out` as it was).
    pub fn next_encoded(&mut self, out: &mut Vec<u8>) -> Option<Result<EntryInfo>> {
        if self.done || self.next > self.end {
            return None;
        }
        let start = out.len();
        match self.read_encoded(out, start) {
            Ok(info) => {
                self.next += 1;
                Some(Ok(info))
            }
            Err(e) => {
                out.truncate(start);
                self.done = true;
                Some(Err(e))
            }
        }
    }

    fn read_encoded(&mut self, out: &mut Vec<u8>, start: usize) -> Result<EntryInfo> {
        let lsn = self.next;
        let mut h = self.read_checked(out, start)?;
        let buf = &mut out[start..];
        // The wire header: zero stamp and durable hint; a write records its payload as one
        // span (the receiver derives the block count from its own geometry).
        h.generation = 0;
        h.durable_hint = 0;
        if h.kind == KIND_WRITE {
            h.blocks = 1;
        }
        h.encode_into(ENTRY_MAGIC_WIRE, &mut buf[..ENTRY_HEADER_SIZE]);
        Ok(EntryInfo {
            lsn: Lsn(lsn),
            epoch: Epoch(h.epoch),
            content_crc: h.content_crc,
        })
    }
}

impl Iterator for WalScan {
    type Item = Result<WalEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next > self.end {
            return None;
        }
        match self.read_next() {
            Ok(e) => {
                self.next += 1;
                Some(Ok(e))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Drop for WalScan {
    fn drop(&mut self) {
        self.shared.remove_pin(self.pin_id);
    }
}

impl Volume {
    /// Pins the WAL: every entry with LSN > `after` stays until the pin is dropped or revoked.
    /// Refused with `Recycled` when `after` is below the tail.
    pub fn pin_wal(&self, after: Lsn) -> Result<WalPin> {
        let s = &self.shared;
        let mut st = s.lock_state();
        if st.closed {
            return Err(BlockVolError::Closed);
        }
        s.check_installed(&st, "pin_wal")?;
        let id = s.add_pin(&mut st, after.0)?;
        Ok(WalPin {
            shared: s.clone(),
            id,
            after,
        })
    }

    /// Opens a scan yielding exactly `from, from+1, ...` up to the current head.
    pub fn scan_from(&self, from: Lsn) -> Result<WalScan> {
        if from.0 == 0 {
            return Err(BlockVolError::InvalidArgument(
                "scans start at lsn 1 or later".into(),
            ));
        }
        let s = &self.shared;
        let mut st = s.lock_state();
        if st.closed {
            return Err(BlockVolError::Closed);
        }
        s.check_installed(&st, "scan")?;
        if from.0 > st.head + 1 {
            return Err(BlockVolError::BeyondHead {
                requested: from,
                head: Lsn(st.head),
            });
        }
        let pin_id = s.add_pin(&mut st, from.0 - 1)?;
        Ok(WalScan {
            shared: s.clone(),
            pin_id,
            next: from.0,
            end: st.head,
            lineage: st.lineage,
            stamp: st.stamp,
            done: false,
            buf: Vec::new(),
        })
    }
}
