//! The storage contract: what the engine needs from the primary's store, and the three pins
//! that keep recovery resources alive.
//!
//! Pins are RAII values. A pin holds whatever the storage put in its [`PinGuard`] (a retention
//! hold, an image handle, a release callback); dropping the pin drops the guard, and that
//! releases the resource. No path can leak a pin: plans own their pins, executors own their
//! plans, and both are dropped on every exit.

use std::fmt;

use crate::error::StorageError;
use crate::history::{EntryId, RetainedHistory};
use crate::types::Lsn;

/// A storage-assigned pin identifier, unique per storage instance.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PinId(pub u64);

impl fmt::Display for PinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Releases a storage resource when dropped. Storage builds one from the value that holds the
/// resource ([`PinGuard::hold`]) or from a release callback ([`PinGuard::on_release`]).
pub struct PinGuard {
    _hold: Box<dyn Send>,
}

struct OnRelease(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnRelease {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl PinGuard {
    /// A guard that keeps `value` alive until the pin is dropped (for stores whose own handle
    /// types release on drop).
    pub fn hold<T: Send + 'static>(value: T) -> Self {
        PinGuard {
            _hold: Box::new(value),
        }
    }

    /// A guard that runs `release` exactly once, when the pin is dropped.
    pub fn on_release(release: impl FnOnce() + Send + 'static) -> Self {
        PinGuard {
            _hold: Box::new(OnRelease(Some(Box::new(release)))),
        }
    }
}

impl fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinGuard")
    }
}

/// Keeps every WAL entry with LSN > `start_lsn` from being recycled.
#[derive(Debug)]
pub struct RetentionPin {
    /// Entries after this LSN are retained.
    pub start_lsn: Lsn,
    /// Storage's ID for the pin.
    pub pin_id: PinId,
    _guard: PinGuard,
}

impl RetentionPin {
    /// A pin holding `guard`.
    pub fn new(start_lsn: Lsn, pin_id: PinId, guard: PinGuard) -> Self {
        RetentionPin {
            start_lsn,
            pin_id,
            _guard: guard,
        }
    }
}

/// Keeps an immutable image of the trusted checkpoint at `lsn` alive.
#[derive(Debug)]
pub struct SnapshotPin {
    /// The checkpoint LSN the image represents.
    pub lsn: Lsn,
    /// Storage's ID for the pin.
    pub pin_id: PinId,
    _guard: PinGuard,
}

impl SnapshotPin {
    /// A pin holding `guard`.
    pub fn new(lsn: Lsn, pin_id: PinId, guard: PinGuard) -> Self {
        SnapshotPin {
            lsn,
            pin_id,
            _guard: guard,
        }
    }
}

/// Keeps an immutable full base image at `committed_lsn` alive.
#[derive(Debug)]
pub struct FullBasePin {
    /// The LSN the image represents.
    pub committed_lsn: Lsn,
    /// Storage's ID for the pin.
    pub pin_id: PinId,
    _guard: PinGuard,
}

impl FullBasePin {
    /// A pin holding `guard`.
    pub fn new(committed_lsn: Lsn, pin_id: PinId, guard: PinGuard) -> Self {
        FullBasePin {
            committed_lsn,
            pin_id,
            _guard: guard,
        }
    }
}

/// What the engine needs from the primary's storage. Implementations must be thread-safe.
///
/// Contract:
/// - `get_retained_history` reports one consistent snapshot (see [`RetainedHistory`] for its
///   invariants), including any holes in the retained range; committed is the replication
///   layer's committed LSN, never the flusher checkpoint.
/// - `pin_wal_retention(after)` keeps every entry with LSN > `after` until the pin is dropped,
///   and fails with [`StorageError::Recycled`] if `after` is below the tail. Creation must be
///   atomic with respect to recycling.
/// - `pin_snapshot(lsn)` keeps an immutable image of the trusted checkpoint at `lsn` (never the
///   live extent) until dropped; it fails if no trusted checkpoint is at `lsn`.
/// - `pin_full_base(lsn)` keeps an immutable image exactly at `lsn` until dropped.
/// - `entry_id(lsn)` identifies the primary's entry at `lsn` for every LSN in
///   `[tail, head]` (the tail entry's identity must survive its recycling) and `Lsn(0)`
///   (the origin); `None` when it cannot vouch for that LSN.
/// - Dropping a pin releases it; releasing never fails.
pub trait StorageAdapter: Send + Sync {
    /// The retained history now.
    fn get_retained_history(&self) -> Result<RetainedHistory, StorageError>;
    /// The identity of the primary's entry at `lsn`, if storage can vouch for it.
    fn entry_id(&self, lsn: Lsn) -> Result<Option<EntryId>, StorageError>;
    /// Pins the checkpoint image at `checkpoint_lsn`.
    fn pin_snapshot(&self, checkpoint_lsn: Lsn) -> Result<SnapshotPin, StorageError>;
    /// Pins every WAL entry after `after`.
    fn pin_wal_retention(&self, after: Lsn) -> Result<RetentionPin, StorageError>;
    /// Pins a full base image at `committed_lsn`.
    fn pin_full_base(&self, committed_lsn: Lsn) -> Result<FullBasePin, StorageError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn guard_releases_exactly_once_on_drop() {
        let released = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&released);
        let pin = RetentionPin::new(
            Lsn(3),
            PinId(1),
            PinGuard::on_release(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(released.load(Ordering::SeqCst), 0);
        drop(pin);
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }
}
