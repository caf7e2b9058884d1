//! The volume: state, locking protocol, write/read/sync, flusher, retention, recovery, fencing
//! and the replica side. See the crate docs for the architecture and invariants.
//!
//! Lock order: `flush_lock` → `extent_rw` → superblock writer (`Shared::sb`) → state mutex.
//! The state mutex is never held across an msync or fdatasync except by truncation.
//!
//! This module holds the shared state (`Shared`), the `Volume` handle and its lifecycle
//! (create, open, assign, status, close). The rest is split by concern, each file an
//! `impl Shared` and/or `impl Volume` block:
//!
//! - `state`: `State` (everything behind the state mutex), the dirty map and pin records;
//! - `superblock`: building, writing and choosing superblocks;
//! - `retention`: retention and the tail (`persist_progress`), retained range queries;
//! - `append`: reserving ring space and appending entries; the client writes;
//! - `sync`: group commit and writeback hints;
//! - `read`: reads and the digest;
//! - `csum`: the extent checksums: verifying blocks read from the extent, batched checksum
//!   updates for the flusher and base installs, and `scrub_range`;
//! - `flush`: flush cycles, the flush intent, recovery's redo, the background flusher;
//! - `pins`: WAL pin records and their revocation;
//! - `recovery`: `open_medium`, the recovery every open runs;
//! - `replica`: `apply`, `apply_encoded` and `truncate_after`;
//! - `sim_hooks` (feature `testing`): simulated-disk volumes and test hooks.

mod append;
mod csum;
mod flush;
mod pins;
mod read;
mod recovery;
mod replica;
mod retention;
#[cfg(any(test, feature = "testing"))]
mod sim_hooks;
mod state;
mod superblock;
mod sync;
pub use replica::ApplyRun;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{BlockVolError, Result};
use crate::format::{
    ENTRY_HEADER_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MIN_WAL_SIZE, Superblock, WAL_OFFSET,
    WAL_SIZE_ALIGN,
};
use crate::medium::{FileMedium, Layout, Medium, ReadOnlyFileMedium};
use crate::types::{
    CreateOptions, Epoch, FlushGate, FlusherMode, Geometry, Lba, Lsn, OpenOptions, Role, Status,
};

use append::AppendMode;
use append::{check_entry_len, max_entry_for};
pub(crate) use csum::CsumBatch;
pub(crate) use state::{FenceRec, State};
use superblock::{SbWriter, format_superblocks, initial_superblock};
pub(crate) use superblock::{pick_superblock, read_slots};

/// Largest buffer the flusher, digest and zeroing use at once.
const IO_CHUNK: usize = 1 << 20;

/// The part of a volume shared with its flusher thread, pins, scans and base handles.
pub(crate) struct Shared {
    pub medium: Arc<dyn Medium>,
    pub geo: Geometry,
    pub extent_offset: u64,
    /// File offset of the checksum region (version 2; see `checksums`).
    pub csum_offset: u64,
    /// Bytes in the checksum region (0 for a version 1 file).
    pub csum_len: u64,
    /// The file has extent checksums (format version 2): every extent read verifies them and
    /// every extent write updates them. A version 1 file opens read-only, unverified.
    pub checksums: bool,
    /// Extent blocks that failed their checksum (reads, base readers, scrubs) since the open.
    pub checksum_errors: std::sync::atomic::AtomicU64,
    /// Blocks repaired from a peer's copy since the open.
    pub blocks_repaired: std::sync::atomic::AtomicU64,
    pub volume_id: [u8; 16],
    pub gate: FlushGate,
    pub wal_full_timeout: Duration,
    pub state: Mutex<State>,
    /// Signalled whenever durable, tail, checkpoint, pins or flags change.
    pub cond: Condvar,
    /// Wakes the background flusher.
    pub flusher_cond: Condvar,
    /// Wakes a group-commit leader whose group has gathered.
    pub commit_cond: Condvar,
    /// Serializes flush cycles with truncation, base pins and base installs.
    pub flush_lock: Mutex<()>,
    /// Readers of the extent share it; the flusher takes it exclusively per extent write.
    pub extent_rw: RwLock<()>,
    pub sb: Mutex<SbWriter>,
    /// Data bytes between two resume points of a base install (0: the default).
    pub install_stride: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned std mutex means a panic elsewhere; the data it guards is still consistent
    // because every critical section updates state only after its fallible I/O succeeded.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn check_range(&self, lba: Lba, blocks: u64) -> Result<()> {
        let vb = self.geo.volume_blocks;
        if blocks == 0 || lba.0.checked_add(blocks).is_none_or(|e| e > vb) {
            return Err(BlockVolError::OutOfRange {
                lba,
                blocks,
                volume_blocks: vb,
            });
        }
        Ok(())
    }

    pub(crate) fn blocks_of(&self, len: usize) -> Result<u64> {
        let bs = self.geo.block_size;
        if len == 0 || !(len as u64).is_multiple_of(u64::from(bs)) {
            return Err(BlockVolError::Misaligned {
                len: len as u64,
                block_size: bs,
            });
        }
        Ok(len as u64 / u64::from(bs))
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn extent_read(&self) -> RwLockReadGuard<'_, ()> {
        self.extent_rw.read().unwrap_or_else(|p| p.into_inner())
    }

    fn extent_write(&self) -> RwLockWriteGuard<'_, ()> {
        self.extent_rw.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn flush_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.flush_lock)
    }

    pub(crate) fn wal_size(&self) -> u64 {
        self.geo.wal_size_bytes
    }

    fn block_size(&self) -> u64 {
        u64::from(self.geo.block_size)
    }

    pub(crate) fn extent_len(&self) -> u64 {
        self.geo.volume_bytes()
    }

    /// Refuses an entry with `payload_len` payload bytes that the ring could never place or
    /// whose header could not state its length; returns its size in the ring.
    pub(crate) fn check_entry_len(&self, payload_len: usize) -> Result<u64> {
        check_entry_len(payload_len, self.wal_size())
    }

    /// File offset of a logical WAL position.
    pub(crate) fn wal_file_off(&self, logical: u64) -> u64 {
        WAL_OFFSET + logical % self.wal_size()
    }

    pub(crate) fn read_wal(&self, logical: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.wal_file_off(logical);
        self.medium
            .read_at(off, buf)
            .map_err(|e| BlockVolError::io("read wal", format!("file offset {off}"), e))
    }

    /// Records the first failure; later writes and syncs are refused.
    pub(crate) fn poison(&self, st: &mut State, what: String) {
        if st.poisoned.is_none() {
            log::error!("volume {} poisoned: {what}", self.medium.describe());
            st.poisoned = Some(what);
        }
        self.cond.notify_all();
    }

    pub(crate) fn check_usable(&self, st: &State) -> Result<()> {
        if st.closed {
            return Err(BlockVolError::Closed);
        }
        if let Some(p) = &st.poisoned {
            return Err(BlockVolError::Poisoned {
                first_failure: p.clone(),
            });
        }
        if st.read_only {
            return Err(BlockVolError::ReadOnly);
        }
        Ok(())
    }

    pub(crate) fn check_installed(&self, st: &State, op: &'static str) -> Result<()> {
        if st.installing || st.install_incomplete {
            return Err(BlockVolError::InstallIncomplete {
                op,
                base_lsn: Lsn(st.install_lsn),
            });
        }
        Ok(())
    }

    /// Wakes the background flusher (a no-op with a manual flusher).
    pub(crate) fn wake_flusher(&self, st: &mut State) {
        st.flush_wanted = true;
        self.flusher_cond.notify_all();
    }
}

/// A block volume: WAL ring, extent, flusher, pins and the replica side.
///
/// `Send + Sync`; every method takes `&self`. Share it with `Arc<Volume>`.
pub struct Volume {
    pub(crate) shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({})", self.shared.medium.describe())
    }
}

/// Where the regions of the file `sb` describes lie.
fn layout(sb: &Superblock) -> Layout {
    Layout {
        len: sb.file_len(),
        wal_offset: WAL_OFFSET,
        wal_len: sb.wal_size,
        csum: sb
            .has_checksums()
            .then(|| (sb.csum_offset(), sb.csum_len())),
    }
}

/// Refuses a read-write open of a file older than the current format: it has no extent
/// checksums, and this code would write a file that claims them. Nothing is written.
fn check_writable_version(sb: &Superblock, what: &str) -> Result<()> {
    if sb.version < crate::format::FORMAT_VERSION {
        return Err(BlockVolError::NeedsUpgrade {
            path: what.to_string(),
            version: sb.version,
        });
    }
    Ok(())
}

/// Checks creation options and derives the geometry.
fn validate_create(o: &CreateOptions) -> Result<Geometry> {
    let bs = o.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(BlockVolError::InvalidArgument(format!(
            "block size {bs} must be a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
        )));
    }
    if o.volume_size_bytes == 0 || !o.volume_size_bytes.is_multiple_of(u64::from(bs)) {
        return Err(BlockVolError::InvalidArgument(format!(
            "volume size {} must be a positive multiple of the block size {bs}",
            o.volume_size_bytes
        )));
    }
    if o.wal_size_bytes < MIN_WAL_SIZE || !o.wal_size_bytes.is_multiple_of(WAL_SIZE_ALIGN) {
        return Err(BlockVolError::InvalidArgument(format!(
            "wal size {} must be a multiple of {WAL_SIZE_ALIGN} and at least {MIN_WAL_SIZE}",
            o.wal_size_bytes
        )));
    }
    if o.wal_size_bytes / 2 < ENTRY_HEADER_SIZE as u64 + u64::from(bs) {
        return Err(BlockVolError::InvalidArgument(format!(
            "wal size {} cannot hold a one-block entry in half the ring",
            o.wal_size_bytes
        )));
    }
    WAL_OFFSET
        .checked_add(o.wal_size_bytes)
        .and_then(|x| x.checked_add(o.volume_size_bytes))
        .ok_or_else(|| BlockVolError::InvalidArgument("volume file size overflows".into()))?;
    Ok(Geometry {
        block_size: bs,
        volume_blocks: o.volume_size_bytes / u64::from(bs),
        wal_size_bytes: o.wal_size_bytes,
    })
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut id).is_ok() {
            return id;
        }
    }
    // No entropy source: the id only needs to differ between volumes on one machine.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = t ^ (u128::from(std::process::id()) << 64);
    xxhash_rust::xxh3::xxh3_128(&seed.to_le_bytes()).to_le_bytes()
}

/// The directory holding `path`'s entry: its parent, or `.` for a bare file name (whose parent
/// is the empty path).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl Volume {
    /// Creates a new volume file (which must not exist), preallocated and locked, and opens it.
    pub fn create(
        path: impl AsRef<Path>,
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Volume> {
        let path = path.as_ref();
        let geo = validate_create(create)?;
        let sb = initial_superblock(&geo, random_id());
        let medium = FileMedium::open(path, true, layout(&sb))?;
        let r = (|| {
            format_superblocks(&medium, &sb)?;
            medium
                .sync_file()
                .map_err(|e| BlockVolError::io("fsync", path.display().to_string(), e))?;
            // Make the new directory entry durable too, or a crash could lose the whole file.
            let dir = parent_dir(path);
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| BlockVolError::io("fsync directory", dir.display().to_string(), e))?;
            Ok(())
        })();
        if let Err(e) = r {
            drop(medium);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let slots = read_slots(
            &|o, b| medium.read_at(o, b),
            medium.len(),
            &path.display().to_string(),
        )?;
        Volume::open_medium(Arc::new(medium), &slots, open, false)
    }

    /// Opens an existing volume: recovery replays the WAL from the persisted tail and persists
    /// its result before the volume accepts I/O.
    pub fn open(path: impl AsRef<Path>, open: &OpenOptions) -> Result<Volume> {
        let path = path.as_ref();
        let ctx = path.display().to_string();
        // Read the superblock through a plain handle to learn the geometry, then open the
        // locked, mapped medium and read it again under the lock.
        // A short file is refused here, before the read-write open (which would need write
        // permission to say so) and before anything is mapped.
        let probe = crate::medium::open_volume_file(path, false)?;
        let probe_len = probe
            .metadata()
            .map_err(|e| BlockVolError::io("stat", ctx.clone(), e))?
            .len();
        let slots = {
            use std::os::unix::fs::FileExt;
            read_slots(&|o, b| probe.read_exact_at(b, o), probe_len, &ctx)?
        };
        drop(probe);
        let (_, sb) = pick_superblock(&slots, probe_len, &ctx)?;
        // An older format is refused before the read-write open, which could allocate holes.
        check_writable_version(&sb, &ctx)?;
        let medium = FileMedium::open(path, false, layout(&sb))?;
        let slots = read_slots(&|o, b| medium.read_at(o, b), medium.len(), &ctx)?;
        Volume::open_medium(Arc::new(medium), &slots, open, false)
    }

    /// Opens an existing volume for reading only (inspection): the file is opened `O_RDONLY`
    /// under a shared lock and never written, so this works on a read-only file or mount and
    /// leaves every byte as it was, evidence of a crash included.
    ///
    /// Recovery runs in memory only: the walk, the torn-tail and corruption decisions are those
    /// of [`Volume::open`], but no leftover is zeroed, nothing is synced, no interrupted flush
    /// is redone and no superblock is written. Reads, `digest`, `status`, `entry_info` and
    /// scans see exactly what a read-write open would recover (blocks written after the
    /// checkpoint are read from the WAL, whatever an interrupted flush left in the extent). A
    /// log that only a repair could open is refused with `Corrupt`. Everything that would
    /// change the file (writes, `sync`, flushes, truncation, `assign`, base pins and installs)
    /// fails with `ReadOnly`; `close` writes nothing.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Volume> {
        let path = path.as_ref();
        let medium = ReadOnlyFileMedium::open(path)?;
        let slots = read_slots(
            &|o, b| medium.read_at(o, b),
            medium.len(),
            &path.display().to_string(),
        )?;
        let opts = OpenOptions {
            flusher: FlusherMode::Manual,
            repair: false,
            ..OpenOptions::default()
        };
        Volume::open_medium(Arc::new(medium), &slots, &opts, true)
    }

    /// The file's format version: 2 has extent checksums; 1 (opened read-only) has none, and
    /// `blockvol upgrade` converts it.
    pub fn format_version(&self) -> u32 {
        if self.shared.checksums {
            crate::format::FORMAT_VERSION
        } else {
            1
        }
    }

    /// Whether the volume was opened with [`Volume::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.shared.lock_state().read_only
    }

    /// The volume's fixed shape.
    pub fn geometry(&self) -> Geometry {
        self.shared.geo
    }

    /// The largest [`write`](Volume::write) one call takes, in bytes (whole blocks): one entry
    /// holds at most half the WAL (and at most what a header's u32 length can state), less
    /// its header. Larger writes are refused with `EntryTooLarge`.
    pub fn max_write_bytes(&self) -> u64 {
        let bs = self.shared.block_size();
        let payload = max_entry_for(self.shared.wal_size()) - ENTRY_HEADER_SIZE as u64;
        payload / bs * bs
    }

    fn check_range(&self, lba: Lba, blocks: u64) -> Result<()> {
        self.shared.check_range(lba, blocks)
    }

    fn blocks_of(&self, len: usize) -> Result<u64> {
        self.shared.blocks_of(len)
    }

    /// Persists a new role and epoch. An epoch below the current one is refused.
    pub fn assign(&self, role: Role, epoch: Epoch) -> Result<()> {
        let s = &self.shared;
        let mut w = s.sb_writer();
        {
            let st = s.lock_state();
            s.check_usable(&st)?;
            if epoch < st.epoch {
                return Err(BlockVolError::EpochRegression {
                    current: st.epoch,
                    requested: epoch,
                });
            }
        }
        s.persist_with(&mut w, |st| {
            let mut sb = s.sb_from_state(st);
            sb.role = role;
            sb.epoch = epoch.0;
            sb
        })?;
        let mut st = s.lock_state();
        st.role = role;
        st.epoch = epoch;
        s.cond.notify_all();
        Ok(())
    }

    /// One consistent snapshot of the volume's state.
    pub fn status(&self) -> Status {
        let s = &self.shared;
        let st = s.lock_state();
        Status {
            head: Lsn(st.head),
            durable: Lsn(st.durable),
            retained_start: Lsn(st.tail + 1),
            tail: Lsn(st.tail),
            checkpoint: Lsn(st.checkpoint),
            committed: Lsn(st.committed),
            checkpoint_trusted: !st.repaired && !st.install_incomplete,
            epoch: st.epoch,
            role: st.role,
            generation: st.generation,
            // Every pin kind (WAL pin, scan, base pin) owns exactly one pin record.
            pins_outstanding: st.live_pins(),
            wal_used_bytes: st.head_pos - st.tail_pos,
            wal_size_bytes: s.wal_size(),
            install_incomplete: st.install_incomplete,
            poisoned: st.poisoned.is_some(),
            checksum_errors: s.checksum_errors.load(std::sync::atomic::Ordering::Relaxed),
            blocks_repaired: s.blocks_repaired.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn stop_flusher(&self) {
        {
            let mut st = self.shared.lock_state();
            st.stop_flusher = true;
            self.shared.flusher_cond.notify_all();
        }
        if let Some(h) = lock(&self.flusher).take()
            && h.join().is_err()
        {
            log::error!("flusher thread panicked");
        }
    }

    /// Stops the flusher, syncs the WAL and writes a final superblock. A read-only volume
    /// writes nothing.
    pub fn close(self) -> Result<()> {
        self.stop_flusher();
        let s = &self.shared;
        {
            let mut st = s.lock_state();
            if st.read_only {
                st.closed = true;
                return Ok(());
            }
        }
        let r = {
            let incomplete = {
                let st = s.lock_state();
                st.installing || st.install_incomplete
            };
            if incomplete { Ok(0) } else { s.sync() }
        };
        let r2 = {
            // No flush runs (the flush lock is held), so the extent holds exactly the entries
            // up to the checkpoint: the clean-close superblock drops the flush mark to the
            // checkpoint, and the next open starts exactly where this one ended instead of
            // redoing the flush of entries the last flush cycle only announced.
            let _f = s.flush_guard();
            let mut w = s.sb_writer();
            let r = s.persist_with(&mut w, |st| {
                let mut sb = s.sb_from_state(st);
                if !st.installing && !st.install_incomplete {
                    sb.flush_mark = st.checkpoint;
                }
                sb
            });
            if r.is_ok() {
                let mut st = s.lock_state();
                if !st.installing && !st.install_incomplete {
                    st.flush_mark = st.checkpoint;
                }
            }
            r
        };
        s.lock_state().closed = true;
        r?;
        r2
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_flusher();
        let mut st = self.shared.lock_state();
        st.closed = true;
        self.shared.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_of_a_bare_file_name_is_the_current_one() {
        assert_eq!(parent_dir(Path::new("vol.img")), Path::new("."));
        assert_eq!(parent_dir(Path::new("./vol.img")), Path::new("."));
        assert_eq!(parent_dir(Path::new("sub/vol.img")), Path::new("sub"));
        assert_eq!(parent_dir(Path::new("/vol.img")), Path::new("/"));
    }

    #[test]
    fn max_write_bytes_is_the_largest_accepted_write() {
        let o = CreateOptions::new(1 << 20, 64 * 1024);
        let (v, _d) = Volume::create_sim(&o, &OpenOptions::manual()).expect("create");
        let max = v.max_write_bytes();
        assert_eq!(max, 7 * 4096);
        assert!(v.write(Lba(0), &vec![1u8; max as usize]).is_ok());
        assert!(matches!(
            v.write(Lba(0), &vec![1u8; max as usize + 4096]),
            Err(BlockVolError::EntryTooLarge { .. })
        ));
    }
}
