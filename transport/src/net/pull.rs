//! The puller's side of a rebuild across the network: a replica given a `rebuilding`
//! assignment plans against the primary's retained history over one connection and reads the
//! primary's entries and images through it.
//!
//! [`RemotePrimary`] is the engine's [`StorageAdapter`] for a primary volume on a replica
//! server: history and entry identities are asked for, and every pin is taken on the primary
//! under a lease that a background thread renews while the pin is held. Dropping the pin
//! releases it; a puller that closes the connection, dies, or stops renewing loses its pins on
//! the primary when the lease runs out (the server releases them; no pin outlives its lease).
//! [`RemoteSource`] is a `v2bridge` [`PrimarySource`] over the same connection, so the
//! engine's executors pull through `BridgeIo::with_source(RemoteSource, LocalReplica, ..)`
//! exactly as a primary pushes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use blockvol::{BaseInstallSpec, EntryInfo, Lba};
use engine::{
    EntryId, FullBasePin, Lsn, LsnRange, PinGuard, PinId, RetainedHistory, RetentionPin,
    SnapshotPin, StorageAdapter, StorageError, TransferError,
};
use v2bridge::convert::{entry_id, to_blockvol, to_engine};
use v2bridge::{ImageChunk, PrimarySource, TargetError, transfer_error};

use super::client::{ClientConfig, ConnectError, RemoteReplica};
use crate::wire::{PinWhat, Reply, Request};

struct Shared {
    conn: Mutex<RemoteReplica>,
    lease: Duration,
    held: AtomicUsize,
    stop: AtomicBool,
    paused: AtomicBool,
}

impl Shared {
    fn conn(&self) -> MutexGuard<'_, RemoteReplica> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease_ms(&self) -> u32 {
        u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX)
    }
}

/// A primary volume on a replica server, as the engine's storage adapter.
pub struct RemotePrimary {
    shared: Arc<Shared>,
    renewer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RemotePrimary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePrimary")
            .field("lease", &self.shared.lease)
            .field("held", &self.shared.held.load(Ordering::Relaxed))
            .finish()
    }
}

fn backend(e: TargetError) -> StorageError {
    StorageError::Backend(format!("remote primary: {e}"))
}

impl RemotePrimary {
    /// Connects to volume `volume` on the server at `addr`; pins are leased for `lease` and
    /// renewed every third of it.
    pub fn connect(
        addr: SocketAddr,
        volume: &str,
        config: &ClientConfig,
        lease: Duration,
    ) -> Result<RemotePrimary, ConnectError> {
        let conn = RemoteReplica::connect(addr, volume, config)?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            lease: lease.max(Duration::from_millis(30)),
            held: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let renewer = std::thread::Builder::new()
            .name("lease-renewer".into())
            .spawn(move || renew(&s))
            .map_err(|e| ConnectError::Protocol {
                addr,
                detail: format!("renewer thread: {e}"),
            })?;
        Ok(RemotePrimary {
            shared,
            renewer: Some(renewer),
        })
    }

    /// A source of entries and images over the same connection.
    pub fn source(&self) -> RemoteSource {
        RemoteSource {
            shared: Arc::clone(&self.shared),
            image: None,
        }
    }

    /// Pins held now.
    pub fn pins_held(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Closes the connection with a goodbye: the primary releases every pin it still holds
    /// for it at once (the pins' own releases then fail harmlessly). A connection that just
    /// breaks instead leaves its leases to their deadlines (see `docs/wire.md`).
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.conn().close("puller closed");
    }

    /// Stops (or resumes) renewing leases: what a puller that hangs does. For tests.
    pub fn pause_renewals(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    fn pin(&self, what: PinWhat, lsn: Lsn) -> Result<(u64, Lsn, PinGuard), StorageError> {
        let reply = self
            .shared
            .conn()
            .call(Request::Pin {
                what,
                lsn: to_blockvol(lsn),
                lease_ms: self.shared.lease_ms(),
            })
            .map_err(backend)?;
        let Reply::Pinned { lease, lsn } = reply else {
            return Err(StorageError::Backend(format!("unexpected reply {reply:?}")));
        };
        self.shared.held.fetch_add(1, Ordering::SeqCst);
        let s = Arc::clone(&self.shared);
        let guard = PinGuard::on_release(move || {
            s.held.fetch_sub(1, Ordering::SeqCst);
            // Best effort: a release that cannot be sent ends with the lease.
            if let Err(e) = s.conn().call(Request::Release(lease)) {
                log::warn!("release of lease {lease}: {e} (it ends with the lease)");
            }
        });
        Ok((lease, to_engine(lsn), guard))
    }
}

impl Drop for RemotePrimary {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
    }
}

/// Renews the connection's leases every third of a lease while pins are held (waking at
/// least every 100 ms to notice a stop).
fn renew(s: &Shared) {
    let every = s.lease / 3;
    let mut last = std::time::Instant::now();
    while !s.stop.load(Ordering::SeqCst) {
        std::thread::sleep(every.min(Duration::from_millis(100)));
        if last.elapsed() < every
            || s.held.load(Ordering::SeqCst) == 0
            || s.paused.load(Ordering::SeqCst)
        {
            continue;
        }
        last = std::time::Instant::now();
        let lease_ms = s.lease_ms();
        if let Err(e) = s.conn().call(Request::Renew { lease_ms }) {
            log::warn!("lease renewal failed: {e}");
        }
    }
}

impl StorageAdapter for RemotePrimary {
    fn get_retained_history(&self) -> Result<RetainedHistory, StorageError> {
        let reply = self.shared.conn().call(Request::History).map_err(backend)?;
        let Reply::History(h) = reply else {
            return Err(StorageError::Backend(format!("unexpected reply {reply:?}")));
        };
        Ok(RetainedHistory {
            head_lsn: to_engine(h.head),
            tail_lsn: to_engine(h.tail),
            committed_lsn: to_engine(h.committed),
            checkpoint_lsn: h.checkpoint.map(to_engine),
            checkpoint_trusted: h.checkpoint_trusted,
            missing: h
                .missing
                .into_iter()
                .map(|(a, t)| LsnRange::new(to_engine(a), to_engine(t)))
                .collect(),
        })
    }

    fn entry_id(&self, lsn: Lsn) -> Result<Option<EntryId>, StorageError> {
        let reply = self
            .shared
            .conn()
            .call(Request::EntryId(to_blockvol(lsn)))
            .map_err(backend)?;
        let Reply::EntryId(e) = reply else {
            return Err(StorageError::Backend(format!("unexpected reply {reply:?}")));
        };
        Ok(e.map(entry_id))
    }

    fn pin_snapshot(&self, checkpoint_lsn: Lsn) -> Result<SnapshotPin, StorageError> {
        let (lease, lsn, guard) = self.pin(PinWhat::Snapshot, checkpoint_lsn)?;
        Ok(SnapshotPin::new(lsn, PinId(lease), guard))
    }

    fn pin_wal_retention(&self, after: Lsn) -> Result<RetentionPin, StorageError> {
        let (lease, lsn, guard) = self.pin(PinWhat::Wal, after)?;
        Ok(RetentionPin::new(lsn, PinId(lease), guard))
    }

    fn pin_full_base(&self, committed_lsn: Lsn) -> Result<FullBasePin, StorageError> {
        let (lease, lsn, guard) = self.pin(PinWhat::FullBase, committed_lsn)?;
        Ok(FullBasePin::new(lsn, PinId(lease), guard))
    }
}

/// Entries and images of a remote primary, read over a [`RemotePrimary`]'s connection.
pub struct RemoteSource {
    shared: Arc<Shared>,
    image: Option<Lsn>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("image", &self.image)
            .finish()
    }
}

impl RemoteSource {
    fn call(&self, body: Request) -> Result<Reply, TransferError> {
        self.shared.conn().call(body).map_err(transfer_error)
    }
}

fn unexpected(reply: &Reply) -> TransferError {
    TransferError::Transport {
        detail: format!("unexpected reply {reply:?}"),
    }
}

impl PrimarySource for RemoteSource {
    fn entry_at(&mut self, lsn: Lsn) -> Result<EntryInfo, TransferError> {
        match self.call(Request::EntryId(to_blockvol(lsn)))? {
            Reply::EntryId(Some(e)) if e.lsn == to_blockvol(lsn) => Ok(e),
            Reply::EntryId(_) => Err(TransferError::Gap {
                expected: lsn,
                found: lsn.next(),
            }),
            other => Err(unexpected(&other)),
        }
    }

    fn read_entries(
        &mut self,
        after: Lsn,
        want: u64,
        frames: &mut Vec<u8>,
    ) -> Result<u32, TransferError> {
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        match self.call(Request::ReadWal {
            after: to_blockvol(after),
            want,
        })? {
            // The server may send fewer entries than asked (one reply's worth); the replica
            // checks each entry's checksum and the run's contiguity when it applies them.
            Reply::Wal { count, frames: f } if count >= 1 && count <= want => {
                frames.extend_from_slice(&f);
                Ok(count)
            }
            Reply::Wal { count, .. } => Err(TransferError::Transport {
                detail: format!("asked for {want} entries after {after}, got {count}"),
            }),
            other => Err(unexpected(&other)),
        }
    }

    fn open_image(
        &mut self,
        pin_id: PinId,
        lsn: Lsn,
        from: Lba,
    ) -> Result<BaseInstallSpec, TransferError> {
        match self.call(Request::ImageOpen {
            lease: pin_id.0,
            lsn: to_blockvol(lsn),
            from,
        })? {
            Reply::ImageOpen {
                base_lsn,
                base_entry,
                geometry,
            } if to_engine(base_lsn) == lsn => {
                self.image = Some(lsn);
                Ok(BaseInstallSpec {
                    base_lsn,
                    base_entry,
                    geometry,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    fn next_image_chunk(&mut self, max_bytes: u64) -> Result<ImageChunk, TransferError> {
        if self.image.is_none() {
            return Err(TransferError::BaseUnavailable {
                detail: "no image open".into(),
            });
        }
        let max = u32::try_from(max_bytes).unwrap_or(u32::MAX);
        match self.call(Request::ImageRead(max))? {
            Reply::ImageChunk(c) => Ok(ImageChunk {
                frame: c.frame,
                scanned: c.scanned,
                sent: c.sent,
            }),
            other => Err(unexpected(&other)),
        }
    }

    fn close_image(&mut self) {
        self.image = None;
    }
}
