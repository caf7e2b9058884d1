//! The engine's [`StorageAdapter`] on a primary blockvol volume.
//!
//! - History: one `Volume::status()` snapshot (head, tail, committed, checkpoint, trust), plus
//!   the contiguity proof of blockvol's LSN index (`Volume::retained_gaps`).
//! - WAL pins are blockvol `WalPin`s: while the engine holds one, blockvol's tail cannot pass
//!   it (the check against the tail and the registration are one step inside blockvol).
//! - Snapshot and full-base pins are blockvol `BasePin`s: a flusher fence that keeps the
//!   extent exactly at the pinned LSN while writes continue into the WAL. The bridge keeps each
//!   image in a registry under the engine's pin ID, so the rebuild I/O can read the very image
//!   the plan pinned. Dropping the engine's pin removes it from the registry; the image is
//!   released when the last reader is done with it too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockvol::{BasePin, Volume};
use engine::{
    EntryId, FullBasePin, LsnRange, PinGuard, PinId, RetainedHistory, RetentionPin, SnapshotPin,
    StorageAdapter, StorageError,
};

use crate::convert::{entry_id, storage_error, to_blockvol, to_engine};

type Images = Arc<Mutex<HashMap<PinId, Arc<BasePin>>>>;

/// Called with each image the engine lets go of (see [`BlockVolStorage::set_image_keeper`]).
pub type ImageKeeper = Arc<dyn Fn(Arc<BasePin>) + Send + Sync>;

fn lock_images(images: &Images) -> MutexGuard<'_, HashMap<PinId, Arc<BasePin>>> {
    images.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The primary's storage, as the engine sees it.
pub struct BlockVolStorage {
    vol: Arc<Volume>,
    images: Images,
    keeper: Arc<Mutex<Option<ImageKeeper>>>,
    next_pin: AtomicU64,
    #[cfg(feature = "testing")]
    fail_next: Mutex<Vec<engine::PinKind>>,
}

impl std::fmt::Debug for BlockVolStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockVolStorage")
            .field("volume", &self.vol)
            .finish_non_exhaustive()
    }
}

impl BlockVolStorage {
    /// Storage over the primary volume `vol`.
    ///
    /// The volume should be opened with `FlushGate::Committed`: with `FlushGate::Durable` its
    /// checkpoint can pass the committed LSN, and a full base at committed (which the engine
    /// plans when there is no usable checkpoint) then cannot be pinned (`pin_base` refuses an
    /// LSN below the checkpoint), so such a primary can only rebuild replicas from snapshots.
    pub fn new(vol: Arc<Volume>) -> Self {
        BlockVolStorage {
            vol,
            images: Arc::new(Mutex::new(HashMap::new())),
            keeper: Arc::new(Mutex::new(None)),
            next_pin: AtomicU64::new(0),
            #[cfg(feature = "testing")]
            fail_next: Mutex::new(Vec::new()),
        }
    }

    /// The primary volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// The base image a snapshot or full-base pin holds, while the engine holds the pin.
    pub fn image(&self, pin: PinId) -> Option<Arc<BasePin>> {
        lock_images(&self.images).get(&pin).cloned()
    }

    /// Hands every image the engine lets go of to `keeper` (or, with `None`, drops it at
    /// once, the default). A keeper that holds the image for a while keeps the primary's extent
    /// at that image (its flusher stays fenced) so that a rebuild interrupted mid-image can
    /// pin the very same image again and the replica resumes its install instead of starting
    /// over; it must let go within a bounded time, since the WAL grows while it holds.
    pub fn set_image_keeper(&self, keeper: Option<ImageKeeper>) {
        *self.keeper.lock().unwrap_or_else(PoisonError::into_inner) = keeper;
    }

    /// Images currently registered (engine snapshot and full-base pins alive).
    pub fn images_held(&self) -> usize {
        lock_images(&self.images).len()
    }

    fn next_id(&self) -> PinId {
        PinId(self.next_pin.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Makes the next pin of `kind` fail once (fault injection for tests).
    #[cfg(feature = "testing")]
    pub fn fail_next_pin(&self, kind: engine::PinKind) {
        self.fail_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(kind);
    }

    #[cfg(feature = "testing")]
    fn injected(&self, kind: engine::PinKind) -> Result<(), StorageError> {
        let mut g = self
            .fail_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match g.iter().position(|k| *k == kind) {
            Some(i) => {
                g.remove(i);
                Err(StorageError::Backend(format!(
                    "injected {kind} pin failure"
                )))
            }
            None => Ok(()),
        }
    }

    #[cfg(not(feature = "testing"))]
    fn injected(&self, _kind: engine::PinKind) -> Result<(), StorageError> {
        Ok(())
    }

    /// Registers an image under a new engine pin ID; the guard unregisters it.
    fn register(&self, pin: BasePin) -> (PinId, PinGuard) {
        let id = self.next_id();
        lock_images(&self.images).insert(id, Arc::new(pin));
        let images = Arc::clone(&self.images);
        let keeper = Arc::clone(&self.keeper);
        let guard = PinGuard::on_release(move || {
            let pin = lock_images(&images).remove(&id);
            let keeper = keeper
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let (Some(pin), Some(keep)) = (pin, keeper) {
                keep(pin);
            }
        });
        (id, guard)
    }
}

impl StorageAdapter for BlockVolStorage {
    fn get_retained_history(&self) -> Result<RetainedHistory, StorageError> {
        let st = self.vol.status();
        if st.install_incomplete {
            return Err(StorageError::Backend(
                "volume holds an incomplete base install; it is not a valid primary".into(),
            ));
        }
        let missing = self
            .vol
            .retained_gaps()
            .into_iter()
            .map(|(after, to)| LsnRange::new(to_engine(after), to_engine(to)))
            .collect();
        Ok(RetainedHistory {
            head_lsn: to_engine(st.head),
            tail_lsn: to_engine(st.tail),
            committed_lsn: to_engine(st.committed),
            // blockvol reports checkpoint 0 when nothing was ever flushed: no checkpoint.
            checkpoint_lsn: (st.checkpoint.0 > 0).then(|| to_engine(st.checkpoint)),
            checkpoint_trusted: st.checkpoint_trusted,
            missing,
        })
    }

    fn entry_id(&self, lsn: engine::Lsn) -> Result<Option<EntryId>, StorageError> {
        match self.vol.entry_info(to_blockvol(lsn)) {
            Ok(info) => Ok(Some(entry_id(info))),
            Err(
                blockvol::BlockVolError::Recycled { .. }
                | blockvol::BlockVolError::BeyondHead { .. },
            ) => Ok(None),
            Err(e) => Err(storage_error(e)),
        }
    }

    fn pin_snapshot(&self, checkpoint_lsn: engine::Lsn) -> Result<SnapshotPin, StorageError> {
        self.injected(engine::PinKind::Snapshot)?;
        let st = self.vol.status();
        // Checkpoint 0 means nothing was ever flushed: there is no snapshot to pin.
        let checkpoint = (st.checkpoint.0 > 0).then(|| to_engine(st.checkpoint));
        if !st.checkpoint_trusted || checkpoint != Some(checkpoint_lsn) {
            return Err(StorageError::SnapshotUnavailable {
                requested: checkpoint_lsn,
                checkpoint,
                trusted: st.checkpoint_trusted,
            });
        }
        let pin = self.vol.pin_snapshot().map_err(storage_error)?;
        if to_engine(pin.lsn()) != checkpoint_lsn {
            // The checkpoint moved between the status read and the fence; the image is not the
            // one the plan chose.
            return Err(StorageError::SnapshotUnavailable {
                requested: checkpoint_lsn,
                checkpoint: Some(to_engine(pin.lsn())),
                trusted: true,
            });
        }
        let (id, guard) = self.register(pin);
        Ok(SnapshotPin::new(checkpoint_lsn, id, guard))
    }

    fn pin_wal_retention(&self, after: engine::Lsn) -> Result<RetentionPin, StorageError> {
        self.injected(engine::PinKind::WalRetention)?;
        let pin = self.vol.pin_wal(to_blockvol(after)).map_err(|e| match e {
            // blockvol names the first LSN that is gone; the engine's contract names the
            // exclusive start that was asked for.
            blockvol::BlockVolError::Recycled { retained_start, .. } => StorageError::Recycled {
                requested: after,
                retained_start: to_engine(retained_start),
            },
            other => storage_error(other),
        })?;
        let id = self.next_id();
        Ok(RetentionPin::new(after, id, PinGuard::hold(pin)))
    }

    fn pin_full_base(&self, committed_lsn: engine::Lsn) -> Result<FullBasePin, StorageError> {
        self.injected(engine::PinKind::FullBase)?;
        let pin = self.vol.pin_base(to_blockvol(committed_lsn)).map_err(|e| {
            StorageError::BaseUnavailable {
                requested: committed_lsn,
                detail: e.to_string(),
            }
        })?;
        let (id, guard) = self.register(pin);
        Ok(FullBasePin::new(committed_lsn, id, guard))
    }
}
