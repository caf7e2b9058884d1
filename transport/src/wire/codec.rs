//! Field readers and writers: big-endian integers, bounded strings and byte strings. Every read
//! checks what is left first, so a short or lying payload is a typed error, never a panic.

use blockvol::{EntryInfo, Epoch, Geometry, Lsn};
use bytes::{Buf, BufMut, BytesMut};
use v2bridge::Lineage;

use super::WireError;

/// Longest string field (volume names, node names, error details), in bytes.
pub const MAX_STRING: usize = 4096;

/// Reads fields from one frame's payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    field: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, field: "" }
    }

    fn need(&mut self, n: usize, field: &'static str) -> Result<(), WireError> {
        self.field = field;
        if self.buf.remaining() < n {
            return Err(WireError::Truncated {
                field,
                need: n,
                have: self.buf.remaining(),
            });
        }
        Ok(())
    }

    /// Bytes left in the payload.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }

    pub(crate) fn u128(&mut self, field: &'static str) -> Result<u128, WireError> {
        self.need(16, field)?;
        Ok(self.buf.get_u128())
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::BadValue {
                field,
                detail: format!("boolean byte {v}"),
            }),
        }
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        self.need(N, field)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    /// A `u16` length and that many UTF-8 bytes, at most `max`.
    pub(crate) fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(WireError::BadValue {
                field,
                detail: format!("{len} bytes, at most {max}"),
            });
        }
        self.need(len, field)?;
        let s = std::str::from_utf8(&self.buf[..len]).map_err(|_| WireError::BadValue {
            field,
            detail: "not UTF-8".into(),
        })?;
        let s = s.to_owned();
        self.buf.advance(len);
        Ok(s)
    }

    /// A `u32` length and that many bytes. The length is checked against what the frame holds
    /// before anything is allocated.
    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, WireError> {
        let len = self.u32(field)? as usize;
        self.need(len, field)?;
        let out = self.buf[..len].to_vec();
        self.buf.advance(len);
        Ok(out)
    }

    pub(crate) fn lsn(&mut self, field: &'static str) -> Result<Lsn, WireError> {
        Ok(Lsn(self.u64(field)?))
    }

    pub(crate) fn entry_info(&mut self, field: &'static str) -> Result<EntryInfo, WireError> {
        Ok(EntryInfo {
            lsn: self.lsn(field)?,
            epoch: Epoch(self.u64(field)?),
            content_crc: self.u32(field)?,
        })
    }

    pub(crate) fn lineage(&mut self) -> Result<Lineage, WireError> {
        let lineage = Lineage {
            driver: self.u64("lineage.driver")?,
            epoch: Epoch(self.u64("lineage.epoch")?),
            session: self.u64("lineage.session")?,
        };
        // A zero field is never a real session: refuse it rather than let it compare low.
        if lineage.epoch.0 == 0 || lineage.session == 0 {
            return Err(WireError::BadValue {
                field: "lineage",
                detail: format!(
                    "zero epoch or session (epoch {}, session {})",
                    lineage.epoch, lineage.session
                ),
            });
        }
        Ok(lineage)
    }

    pub(crate) fn geometry(&mut self) -> Result<Geometry, WireError> {
        Ok(Geometry {
            block_size: self.u32("geometry.block_size")?,
            volume_blocks: self.u64("geometry.volume_blocks")?,
            wal_size_bytes: self.u64("geometry.wal_size_bytes")?,
        })
    }

    /// Refuses bytes left over after the last field.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            return Err(WireError::TrailingBytes {
                after: self.field,
                count: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

/// Writes fields into a payload.
pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut BytesMut,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.out.put_u8(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out.put_u16(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.put_u32(v);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.put_u64(v);
    }

    pub(crate) fn u128(&mut self, v: u128) {
        self.out.put_u128(v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.out.put_u8(u8::from(v));
    }

    pub(crate) fn raw(&mut self, v: &[u8]) {
        self.out.put_slice(v);
    }

    /// A string, cut at [`MAX_STRING`] bytes (on a character boundary).
    pub(crate) fn string(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STRING);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.raw(&s.as_bytes()[..end]);
    }

    /// A byte string; the caller has checked that it fits a frame.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> Result<(), WireError> {
        let len = u32::try_from(v.len()).map_err(|_| WireError::FrameTooLarge {
            length: v.len() as u64,
            max: u32::MAX,
        })?;
        self.u32(len);
        self.raw(v);
        Ok(())
    }

    pub(crate) fn entry_info(&mut self, e: &EntryInfo) {
        self.u64(e.lsn.0);
        self.u64(e.epoch.0);
        self.u32(e.content_crc);
    }

    pub(crate) fn lineage(&mut self, l: &Lineage) {
        self.u64(l.driver);
        self.u64(l.epoch.0);
        self.u64(l.session);
    }

    pub(crate) fn geometry(&mut self, g: &Geometry) {
        self.u32(g.block_size);
        self.u64(g.volume_blocks);
        self.u64(g.wal_size_bytes);
    }
}
