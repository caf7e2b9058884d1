//! A simulated disk for crash testing (feature `testing`).
//!
//! It keeps what was *written* apart from what was *synced*: `write_at` changes only the
//! written view and marks 512-byte sectors dirty; `sync_range` copies the covered dirty sectors
//! to the durable view. A crash image is the durable view plus a random subset of the dirty
//! sectors as written, optionally with one sector torn (a prefix new, the rest old). A hook
//! fires before and after every sync, so a test can build crash images at every sync boundary
//! of a workload, including the ones inside a flush cycle.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::medium::Medium;

/// Sector size used for dirty tracking and tearing.
pub(crate) const SECTOR: u64 = 512;

/// Called before (`after == false`) and after (`after == true`) every sync.
pub type SyncHook = Arc<dyn Fn(&SimDisk, &SyncPoint) + Send + Sync>;

/// Where a sync hook fired.
#[derive(Clone, Debug)]
pub struct SyncPoint {
    /// Sequence number of the sync call on this disk.
    pub index: u64,
    /// Whether the sync has completed.
    pub after: bool,
    /// File offset of the synced range.
    pub offset: u64,
    /// Length of the synced range.
    pub len: u64,
}

/// How a crash image treats unsynced sectors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Only synced bytes survive.
    DurableOnly,
    /// Each unsynced sector survives with probability one half.
    RandomSectors,
    /// As `RandomSectors`, and one unsynced sector is torn.
    RandomSectorsTorn,
    /// Every written byte survives (a process crash with the page cache intact).
    AllWritten,
}

struct SimState {
    written: Vec<u8>,
    durable: Vec<u8>,
    dirty: BTreeSet<u64>,
    open: bool,
    fail_syncs: u32,
    syncs: u64,
}

struct SimInner {
    st: Mutex<SimState>,
    hook: Mutex<Option<SyncHook>>,
}

/// A cloneable handle to one simulated disk.
#[derive(Clone)]
pub struct SimDisk {
    inner: Arc<SimInner>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimDisk({} bytes)", self.len())
    }
}

/// A small deterministic generator (splitmix64), so crash images depend only on the seed.
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl SimDisk {
    /// A zero-filled disk of `len` bytes, all durable.
    pub fn new(len: u64) -> SimDisk {
        SimDisk::from_image(vec![0u8; len as usize])
    }

    /// A disk whose durable and written views are both `image`.
    pub fn from_image(image: Vec<u8>) -> SimDisk {
        SimDisk {
            inner: Arc::new(SimInner {
                st: Mutex::new(SimState {
                    durable: image.clone(),
                    written: image,
                    dirty: BTreeSet::new(),
                    open: false,
                    fail_syncs: 0,
                    syncs: 0,
                }),
                hook: Mutex::new(None),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding this lock can only come from a test assertion; the bytes are
        // still consistent, so keep going.
        self.inner.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.lock().written.len() as u64
    }

    /// Whether the disk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Installs (or removes) the sync hook.
    pub fn set_sync_hook(&self, hook: Option<SyncHook>) {
        *self.inner.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Makes the next `n` syncs fail with EIO (nothing becomes durable).
    pub fn fail_next_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// Number of sync calls so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Number of written-but-unsynced sectors.
    pub fn unsynced_sectors(&self) -> usize {
        self.lock().dirty.len()
    }

    /// The durable view.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The written view (what a process crash with an intact page cache leaves).
    pub fn written_image(&self) -> Vec<u8> {
        self.lock().written.clone()
    }

    /// Overwrites bytes in both views (fault injection: media corruption).
    pub fn corrupt(&self, offset: u64, bytes: &[u8]) {
        let mut st = self.lock();
        let o = offset as usize;
        let end = (o + bytes.len()).min(st.written.len());
        let n = end.saturating_sub(o);
        st.written[o..end].copy_from_slice(&bytes[..n]);
        st.durable[o..end].copy_from_slice(&bytes[..n]);
    }

    /// Reads bytes from the written view.
    pub fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = self.lock();
        let o = (offset as usize).min(st.written.len());
        let end = (o + len).min(st.written.len());
        st.written[o..end].to_vec()
    }

    /// A crash image: `RandomSectors` for even seeds, `RandomSectorsTorn` for odd ones.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let mode = if seed.is_multiple_of(2) {
            CrashMode::RandomSectors
        } else {
            CrashMode::RandomSectorsTorn
        };
        self.crash_image_with(seed, mode)
    }

    /// A crash image built with an explicit mode.
    pub fn crash_image_with(&self, seed: u64, mode: CrashMode) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        let mut rng = SplitMix::new(seed);
        let dirty: Vec<u64> = st.dirty.iter().copied().collect();
        let copy = |img: &mut Vec<u8>, s: u64| {
            let a = (s * SECTOR) as usize;
            let b = (a + SECTOR as usize).min(img.len());
            img[a..b].copy_from_slice(&st.written[a..b]);
        };
        match mode {
            CrashMode::DurableOnly => {}
            CrashMode::AllWritten => {
                for &s in &dirty {
                    copy(&mut img, s);
                }
            }
            CrashMode::RandomSectors | CrashMode::RandomSectorsTorn => {
                for &s in &dirty {
                    if rng.next_u64() & 1 == 1 {
                        copy(&mut img, s);
                    }
                }
                if mode == CrashMode::RandomSectorsTorn && !dirty.is_empty() {
                    let s = dirty[(rng.next_u64() % dirty.len() as u64) as usize];
                    let a = (s * SECTOR) as usize;
                    let cut = (rng.next_u64() % SECTOR) as usize;
                    let b = (a + SECTOR as usize).min(img.len());
                    // A torn sector: the first `cut` bytes are new, the rest are what was durable.
                    img[a..a + cut.min(b - a)].copy_from_slice(&st.written[a..a + cut.min(b - a)]);
                    img[a + cut.min(b - a)..b].copy_from_slice(&st.durable[a + cut.min(b - a)..b]);
                }
            }
        }
        img
    }

    fn hook(&self) -> Option<SyncHook> {
        self.inner
            .hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Claims the disk for one open volume (the simulated exclusive lock).
    pub(crate) fn claim(&self) -> bool {
        let mut st = self.lock();
        if st.open {
            false
        } else {
            st.open = true;
            true
        }
    }

    fn release(&self) {
        self.lock().open = false;
    }
}

/// The `Medium` view of a claimed `SimDisk`; releases the claim when dropped.
pub(crate) struct SimMedium {
    disk: SimDisk,
}

impl SimMedium {
    pub(crate) fn new(disk: SimDisk) -> SimMedium {
        SimMedium { disk }
    }
}

impl Drop for SimMedium {
    fn drop(&mut self) {
        self.disk.release();
    }
}

fn range_check(len: usize, off: u64, n: u64) -> io::Result<(usize, usize)> {
    let end = off
        .checked_add(n)
        .filter(|e| *e <= len as u64)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sim access {off}+{n} beyond {len}"),
            )
        })?;
    Ok((off as usize, end as usize))
}

impl Medium for SimMedium {
    fn len(&self) -> u64 {
        self.disk.len()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.disk.lock();
        let (a, b) = range_check(st.written.len(), off, buf.len() as u64)?;
        buf.copy_from_slice(&st.written[a..b]);
        Ok(())
    }

    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.disk.lock();
        let (a, b) = range_check(st.written.len(), off, data.len() as u64)?;
        st.written[a..b].copy_from_slice(data);
        if b > a {
            for s in (a as u64 / SECTOR)..=((b as u64 - 1) / SECTOR) {
                st.dirty.insert(s);
            }
        }
        Ok(())
    }

    fn sync_range(&self, off: u64, len: u64) -> io::Result<()> {
        let index = {
            let mut st = self.disk.lock();
            range_check(st.written.len(), off, len)?;
            st.syncs += 1;
            st.syncs
        };
        let hook = self.disk.hook();
        if let Some(h) = &hook {
            h(
                &self.disk,
                &SyncPoint {
                    index,
                    after: false,
                    offset: off,
                    len,
                },
            );
        }
        {
            let mut st = self.disk.lock();
            if st.fail_syncs > 0 {
                st.fail_syncs -= 1;
                return Err(io::Error::other("simulated sync failure (EIO)"));
            }
            if len > 0 {
                let first = off / SECTOR;
                let last = (off + len - 1) / SECTOR;
                let covered: Vec<u64> = st.dirty.range(first..=last).copied().collect();
                for s in covered {
                    let a = (s * SECTOR) as usize;
                    let b = (a + SECTOR as usize).min(st.written.len());
                    let (w, d) = (&st.written[a..b].to_vec(), &mut st.durable);
                    d[a..b].copy_from_slice(w);
                    st.dirty.remove(&s);
                }
            }
        }
        if let Some(h) = &hook {
            h(
                &self.disk,
                &SyncPoint {
                    index,
                    after: true,
                    offset: off,
                    len,
                },
            );
        }
        Ok(())
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(off + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "simulated disk".into()
    }
}
