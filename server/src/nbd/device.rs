//! What an NBD connection serves: the [`BlockDevice`] trait, the [`Exports`] a server looks
//! names up in, and [`VolumeDevice`], a block device over a blockvol [`Volume`].

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blockvol::{BlockVolError, Lba, Volume};

use super::proto::NbdErrno;

/// Why a device refused or failed a request. Each variant maps to one NBD error value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The device may not serve this now (fenced, a replica, the lease expired): `EPERM`.
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The storage failed: `EIO`.
    #[error("I/O error: {0}")]
    Io(String),
    /// No space: `ENOSPC`.
    #[error("no space left on the device")]
    NoSpace,
    /// The request can never be valid (a range outside the device): `EINVAL`.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device does not do this: `ENOTSUP`.
    #[error("operation not supported")]
    Unsupported,
    /// The device is shutting down (closed): `ESHUTDOWN`.
    #[error("shutting down")]
    Shutdown,
}

impl DeviceError {
    /// The NBD error value for this error.
    pub fn errno(&self) -> NbdErrno {
        match self {
            DeviceError::NotPermitted(_) => NbdErrno::Perm,
            DeviceError::Io(_) => NbdErrno::Io,
            DeviceError::NoSpace => NbdErrno::NoSpc,
            DeviceError::Invalid(_) => NbdErrno::Inval,
            DeviceError::Unsupported => NbdErrno::NotSup,
            DeviceError::Shutdown => NbdErrno::Shutdown,
        }
    }
}

impl From<BlockVolError> for DeviceError {
    fn from(e: BlockVolError) -> Self {
        match e {
            BlockVolError::WrongRole { .. }
            | BlockVolError::StaleEpoch { .. }
            | BlockVolError::ReadOnly
            | BlockVolError::InstallIncomplete { .. } => DeviceError::NotPermitted(e.to_string()),
            BlockVolError::OutOfRange { .. }
            | BlockVolError::Misaligned { .. }
            | BlockVolError::InvalidArgument(_)
            | BlockVolError::EntryTooLarge { .. } => DeviceError::Invalid(e.to_string()),
            BlockVolError::NoSpace { .. } => DeviceError::NoSpace,
            BlockVolError::Closed => DeviceError::Shutdown,
            // WAL full, poisoned, I/O, corruption and anything added later: the storage could
            // not do it; the message says why.
            other => DeviceError::Io(other.to_string()),
        }
    }
}

/// A block device an NBD connection serves. Offsets and lengths are in bytes; the server has
/// checked that a request lies within [`size`](BlockDevice::size) before it calls, but
/// implementations check again (they are public API).
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The advertised minimum and preferred block size.
    fn block_size(&self) -> u32;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `data` at `offset`; with `fua` the data is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// A hint that `[offset, offset + len)` is no longer needed.
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Makes `[offset, offset + len)` read as zeros; with `fua` durably before returning.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError>;
    /// Whether a flush (or FUA) on one connection covers writes completed on every connection
    /// to this device (then the server advertises `NBD_FLAG_CAN_MULTI_CONN`).
    fn flush_covers_all_connections(&self) -> bool {
        true
    }
}

/// Why an export cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// No export has this name: `NBD_REP_ERR_UNKNOWN`.
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The export exists but may not be served now (a fenced or lease-less primary, a
    /// replica): `NBD_REP_ERR_POLICY`.
    #[error("export {name:?} refused: {reason}")]
    Refused {
        /// The export.
        name: String,
        /// Why.
        reason: String,
    },
    /// The server is shutting down: `NBD_REP_ERR_SHUTDOWN`.
    #[error("shutting down")]
    Shutdown,
}

/// The exports a server serves, by name.
pub trait Exports: Send + Sync {
    /// The names `NBD_OPT_LIST` reports.
    fn list(&self) -> Vec<String>;
    /// The device to serve under `name` now (a fenced or lease-less primary refuses). Every
    /// connection to one volume should get the same device (see [`VolumeDevice`]).
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError>;
}

/// A fixed map of names to devices (tests, benchmarks, a single-volume server).
#[derive(Default)]
pub struct StaticExports {
    devices: BTreeMap<String, Arc<dyn BlockDevice>>,
}

impl std::fmt::Debug for StaticExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticExports")
            .field("names", &self.devices.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl StaticExports {
    /// No exports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `device` as `name` (replacing an earlier device of that name).
    pub fn insert(&mut self, name: impl Into<String>, device: Arc<dyn BlockDevice>) {
        self.devices.insert(name.into(), device);
    }

    /// `insert`, by value.
    pub fn with(mut self, name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        self.insert(name, device);
        self
    }
}

impl Exports for StaticExports {
    fn list(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError> {
        self.devices
            .get(name)
            .cloned()
            .ok_or_else(|| ExportError::Unknown(name.to_owned()))
    }
}

/// A check or action a [`VolumeDevice`]'s owner plugs in: the flush that replaces
/// `Volume::sync`, or the gate every request passes first.
pub type DeviceHook = Arc<dyn Fn() -> Result<(), DeviceError> + Send + Sync>;

/// The longest a request waits for an overlapping read-modify-write (or other mutation) to
/// finish before it fails with `EIO`. Mutations hold their range only for their own volume
/// calls, each bounded by the volume's WAL-full timeout.
pub const RANGE_WAIT: Duration = Duration::from_secs(60);

/// Block ranges held by mutations in progress, so that a read-modify-write of an edge block
/// never interleaves with another mutation of that block (which would lose one of them).
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Holds blocks `[first, end)` until the guard drops; waits (at most [`RANGE_WAIT`]) while
    /// an overlapping range is held.
    fn lock(&self, first: u64, end: u64) -> Result<RangeGuard<'_>, DeviceError> {
        let deadline = Instant::now() + RANGE_WAIT;
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !held.iter().any(|&(a, b)| a < end && first < b) {
                held.push((first, end));
                return Ok(RangeGuard {
                    locks: self,
                    range: (first, end),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DeviceError::Io(format!(
                    "blocks {first}..{end}: an overlapping request held them for {RANGE_WAIT:?}"
                )));
            }
            held = self
                .released
                .wait_timeout(held, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

/// A [`BlockDevice`] over a blockvol [`Volume`].
///
/// - Byte ranges that are not whole blocks are served by read-modify-write of their edge
///   blocks. Every mutation holds its block range (a range lock) for its volume calls, so two
///   concurrent unaligned writes to one block (or an unaligned write and an aligned one) cannot
///   lose each other's bytes. Reads take no lock.
/// - Writes longer than one WAL entry can hold ([`Volume::max_write_bytes`]) are split into
///   several entries; NBD promises no atomicity for a write, and each entry is whole blocks.
/// - `write_zeroes` trims the whole blocks (a trimmed block reads as zeros; blockvol zeroes
///   the extent with `FALLOC_FL_ZERO_RANGE`, which keeps it allocated, so `NBD_CMD_FLAG_NO_HOLE`
///   is honoured as is) and writes zeros into the partial edge blocks.
/// - `trim` discards only the whole blocks inside its range (the protocol allows rounding a
///   trim inwards).
/// - `flush` is `Volume::sync`, or the owner's flush hook ([`VolumeDevice::with_flush`]: the
///   volume server makes a flush mean its replication durability mode); FUA is the request
///   followed by that flush.
/// - The gate ([`VolumeDevice::gated`]) runs before every request: the volume server uses it
///   for "only a primary with a valid lease serves I/O".
///
/// Serve one `VolumeDevice` per volume and share it (`Arc`) between connections: the range
/// lock lives in it, so two devices over one volume would not see each other's
/// read-modify-writes.
pub struct VolumeDevice {
    vol: Arc<Volume>,
    block: u64,
    size: u64,
    /// Bytes per volume write (whole blocks, at least one block).
    max_entry: usize,
    flush: Option<DeviceHook>,
    gate: Option<DeviceHook>,
    ranges: RangeLocks,
}

impl std::fmt::Debug for VolumeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeDevice")
            .field("block", &self.block)
            .field("size", &self.size)
            .field("flush_hook", &self.flush.is_some())
            .field("gate", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

impl VolumeDevice {
    /// A device over `vol`; a flush is `Volume::sync`.
    pub fn new(vol: Arc<Volume>) -> Self {
        let g = vol.geometry();
        let block = u64::from(g.block_size);
        let max_entry = vol.max_write_bytes().max(block);
        VolumeDevice {
            block,
            size: g.volume_bytes(),
            max_entry: usize::try_from(max_entry).unwrap_or(usize::MAX),
            vol,
            flush: None,
            gate: None,
            ranges: RangeLocks::default(),
        }
    }

    /// A device over `vol` whose flushes (and FUA) call `flush` instead of `Volume::sync`.
    pub fn with_flush(vol: Arc<Volume>, flush: DeviceHook) -> Self {
        let mut d = Self::new(vol);
        d.flush = Some(flush);
        d
    }

    /// Checks `gate` before every request; its error is the request's.
    pub fn gated(mut self, gate: DeviceHook) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    fn admit(&self) -> Result<(), DeviceError> {
        match &self.gate {
            Some(g) => g(),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::Invalid(format!(
                "{len} bytes at offset {offset} leave the device of {} bytes",
                self.size
            ))),
        }
    }

    fn do_flush(&self) -> Result<(), DeviceError> {
        match &self.flush {
            Some(f) => f(),
            None => self.vol.sync().map(|_| ()).map_err(DeviceError::from),
        }
    }

    /// Writes whole blocks at `lba`, one volume entry per `max_entry` bytes.
    fn write_blocks(&self, lba: u64, data: &[u8]) -> Result<(), DeviceError> {
        let per = self.max_entry as u64 / self.block;
        for (i, chunk) in data.chunks(self.max_entry).enumerate() {
            self.vol.write(Lba(lba + i as u64 * per), chunk)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (any alignment) with the blocks it touches already held.
    fn write_held(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let bs = self.block;
        let end = offset + data.len() as u64;
        let first = offset / bs;
        let end_block = end.div_ceil(bs);
        if offset.is_multiple_of(bs) && end.is_multiple_of(bs) {
            return self.write_blocks(first, data);
        }
        let bsz = bs as usize;
        let span = usize::try_from((end_block - first) * bs)
            .map_err(|_| DeviceError::Invalid("write span overflows".into()))?;
        let mut buf = vec![0u8; span];
        let head_partial = !offset.is_multiple_of(bs);
        if head_partial {
            self.vol.read_into(Lba(first), &mut buf[..bsz])?;
        }
        // The last block, when partial, unless it is the first one and was read already.
        let tail_read = head_partial && end_block - 1 == first;
        if !end.is_multiple_of(bs) && !tail_read {
            self.vol
                .read_into(Lba(end_block - 1), &mut buf[span - bsz..])?;
        }
        let at = (offset - first * bs) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_blocks(first, &buf)
    }

    /// Trims whole blocks `[first, end)`.
    fn trim_blocks(&self, first: u64, end: u64) -> Result<(), DeviceError> {
        let mut lba = first;
        while lba < end {
            let n = (end - lba).min(u64::from(u32::MAX));
            self.vol.trim(Lba(lba), n)?;
            lba += n;
        }
        Ok(())
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        u32::try_from(self.block).unwrap_or(u32::MAX)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.admit()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.block;
        let end = offset + buf.len() as u64;
        let first = offset / bs;
        if offset.is_multiple_of(bs) && end.is_multiple_of(bs) {
            return Ok(self.vol.read_into(Lba(first), buf)?);
        }
        let span = usize::try_from((end.div_ceil(bs) - first) * bs)
            .map_err(|_| DeviceError::Invalid("read span overflows".into()))?;
        let mut tmp = vec![0u8; span];
        self.vol.read_into(Lba(first), &mut tmp)?;
        let at = (offset - first * bs) as usize;
        buf.copy_from_slice(&tmp[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.admit()?;
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            let _held = self
                .ranges
                .lock(offset / self.block, end.div_ceil(self.block))?;
            self.write_held(offset, data)?;
        }
        if fua { self.do_flush() } else { Ok(()) }
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.admit()?;
        self.do_flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.admit()?;
        self.check_range(offset, len)?;
        let first = offset.div_ceil(self.block);
        let end = (offset + len) / self.block;
        if first < end {
            let _held = self.ranges.lock(first, end)?;
            self.trim_blocks(first, end)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.admit()?;
        self.check_range(offset, len)?;
        if len > 0 {
            let bs = self.block;
            let end = offset + len;
            let _held = self.ranges.lock(offset / bs, end.div_ceil(bs))?;
            // Whole blocks [a, b) are trimmed; the partial edges get zeros written into them.
            let a = offset.div_ceil(bs);
            let b = end / bs;
            let zeros = vec![0u8; bs as usize];
            if a >= b {
                // No whole block: at most the ends of two neighbouring blocks.
                let mut at = offset;
                while at < end {
                    let n = (end - at).min(bs - at % bs);
                    self.write_held(at, &zeros[..n as usize])?;
                    at += n;
                }
            } else {
                if offset < a * bs {
                    self.write_held(offset, &zeros[..(a * bs - offset) as usize])?;
                }
                self.trim_blocks(a, b)?;
                if b * bs < end {
                    self.write_held(b * bs, &zeros[..(end - b * bs) as usize])?;
                }
            }
        }
        if fua { self.do_flush() } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvol::{CreateOptions, Epoch, OpenOptions, Role};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BS: usize = 4096;

    fn volume(dir: &tempfile::TempDir, size: u64, wal: u64) -> Arc<Volume> {
        let vol = Volume::create(
            dir.path().join("v.img"),
            &CreateOptions {
                volume_size_bytes: size,
                wal_size_bytes: wal,
                block_size: BS as u32,
            },
            &OpenOptions::default(),
        )
        .unwrap();
        vol.assign(Role::Primary, Epoch(1)).unwrap();
        Arc::new(vol)
    }

    /// Applies a write to the oracle image.
    fn put(image: &mut [u8], offset: u64, data: &[u8]) {
        image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn whole(vol: &Volume) -> Vec<u8> {
        vol.read(Lba(0), vol.geometry().volume_blocks).unwrap()
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
            .collect()
    }

    #[test]
    fn unaligned_writes_and_reads_match_an_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 64 * BS as u64, 1 << 20);
        let dev = VolumeDevice::new(Arc::clone(&vol));
        let mut image = vec![0u8; 64 * BS];
        // Inside one block, across a boundary, head partial + whole + tail partial, aligned
        // start with a partial end, partial start with an aligned end, one byte at the end.
        let cases: &[(u64, usize)] = &[
            (1000, 3000),
            (4000, 200),
            (5000, 3 * BS + 17),
            (8 * BS as u64, BS + 1),
            (12 * BS as u64 + 1, BS - 1),
            (64 * BS as u64 - 1, 1),
            (20 * BS as u64, 4 * BS),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(i as u8 * 17 + 3, len);
            dev.write(off, &data, false).unwrap();
            put(&mut image, off, &data);
            let mut back = vec![0u8; len];
            dev.read(off, &mut back).unwrap();
            assert_eq!(back, data, "read back case {i}");
        }
        assert_eq!(whole(&vol), image);
        let mut odd = vec![0u8; 5555];
        dev.read(777, &mut odd).unwrap();
        assert_eq!(&odd[..], &image[777..777 + 5555]);
    }

    #[test]
    fn write_zeroes_and_trim_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 32 * BS as u64, 1 << 20);
        let dev = VolumeDevice::new(Arc::clone(&vol));
        let ones = vec![0xffu8; 32 * BS];
        dev.write(0, &ones, false).unwrap();
        let mut image = ones.clone();
        // Partial head + whole blocks + partial tail; inside one block; across one boundary.
        for &(off, len) in &[
            (100u64, 5 * BS as u64),
            (9000, 50),
            (4 * BS as u64 - 10, 20),
        ] {
            dev.write_zeroes(off, len, false).unwrap();
            image[off as usize..(off + len) as usize].fill(0);
        }
        assert_eq!(whole(&vol), image);
        // Trim discards only whole blocks: block 20 is trimmed, the edges stay.
        dev.trim(20 * BS as u64 - 1, BS as u64 + 2).unwrap();
        image[20 * BS..21 * BS].fill(0);
        assert_eq!(whole(&vol), image);
        // Still zeros once the flusher moved everything to the extent.
        vol.force_flush().unwrap();
        assert_eq!(whole(&vol), image);
    }

    #[test]
    fn writes_larger_than_a_wal_entry_are_split() {
        let dir = tempfile::tempdir().unwrap();
        // A 256 KiB WAL takes entries of less than 128 KiB.
        let vol = volume(&dir, 1 << 20, 256 << 10);
        assert!(vol.max_write_bytes() < 512 << 10);
        let dev = VolumeDevice::new(Arc::clone(&vol));
        let data = pattern(9, 512 << 10);
        dev.write(4096, &data, true).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read(4096, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn concurrent_unaligned_writes_to_one_block_keep_both() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 16 * BS as u64, 4 << 20);
        let dev = Arc::new(VolumeDevice::new(Arc::clone(&vol)));
        // Eight writers each own 512 bytes of block 3 and rewrite them 200 times. Without the
        // range lock, a read-modify-write that read the block before another writer's write
        // puts the old bytes back; the final check finds each writer's last bytes.
        let threads: Vec<_> = (0..8u8)
            .map(|w| {
                let dev = Arc::clone(&dev);
                std::thread::spawn(move || {
                    for round in 0..200u8 {
                        let data = vec![w.wrapping_mul(31).wrapping_add(round) | 1; 512];
                        dev.write(3 * BS as u64 + u64::from(w) * 512, &data, false)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let block = vol.read(Lba(3), 1).unwrap();
        for w in 0..8u8 {
            let want = w.wrapping_mul(31).wrapping_add(199) | 1;
            assert!(
                block[w as usize * 512..(w as usize + 1) * 512]
                    .iter()
                    .all(|&b| b == want),
                "writer {w}'s bytes were lost"
            );
        }
    }

    #[test]
    fn ranges_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 4 * BS as u64, 1 << 20);
        let dev = VolumeDevice::new(vol);
        let mut buf = [0u8; 2];
        assert!(matches!(
            dev.read(4 * BS as u64 - 1, &mut buf),
            Err(DeviceError::Invalid(_))
        ));
        assert!(matches!(
            dev.write(u64::MAX, &[1], false),
            Err(DeviceError::Invalid(_))
        ));
        assert!(matches!(
            dev.trim(0, 5 * BS as u64),
            Err(DeviceError::Invalid(_))
        ));
        assert!(matches!(
            dev.write_zeroes(1, u64::MAX, false),
            Err(DeviceError::Invalid(_))
        ));
    }

    #[test]
    fn gate_and_flush_hook_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 4 * BS as u64, 1 << 20);
        let flushes = Arc::new(AtomicUsize::new(0));
        let f = Arc::clone(&flushes);
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let o = Arc::clone(&open);
        let dev = VolumeDevice::with_flush(
            Arc::clone(&vol),
            Arc::new(move || {
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .gated(Arc::new(move || {
            if o.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(DeviceError::NotPermitted("lease expired".into()))
            }
        }));
        dev.write(0, &[7u8; BS], true).unwrap();
        dev.write_zeroes(0, 10, true).unwrap();
        dev.flush().unwrap();
        dev.write(0, &[8u8; 10], false).unwrap();
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            3,
            "FUA write, FUA zeroes, flush"
        );
        open.store(false, Ordering::SeqCst);
        let before = vol.status().head;
        assert_eq!(
            dev.write(0, &[9u8; BS], false).unwrap_err().errno(),
            NbdErrno::Perm
        );
        let mut b = [0u8; 1];
        assert_eq!(dev.read(0, &mut b).unwrap_err().errno(), NbdErrno::Perm);
        assert_eq!(dev.flush().unwrap_err().errno(), NbdErrno::Perm);
        assert_eq!(vol.status().head, before, "a refused write appends nothing");
        assert_eq!(flushes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn blockvol_errors_map_to_nbd_errors() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 4 * BS as u64, 1 << 20);
        vol.assign(Role::Replica, Epoch(2)).unwrap();
        let dev = VolumeDevice::new(Arc::clone(&vol));
        let e = dev.write(0, &[1u8; BS], false).unwrap_err();
        assert!(matches!(e, DeviceError::NotPermitted(_)), "{e:?}");
        assert_eq!(e.errno().code(), 1);
        let io: DeviceError = BlockVolError::WalFull {
            needed: 1,
            free: 0,
            waited_ms: 5,
        }
        .into();
        assert!(matches!(&io, DeviceError::Io(m) if m.contains("WAL full")));
        assert_eq!(io.errno().code(), 5);
        assert_eq!(DeviceError::from(BlockVolError::Closed).errno().code(), 108);
        assert_eq!(DeviceError::NoSpace.errno().code(), 28);
        assert_eq!(DeviceError::Unsupported.errno().code(), 95);
        assert_eq!(DeviceError::Invalid(String::new()).errno().code(), 22);
    }
}
