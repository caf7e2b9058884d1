//! The engine's [`CatchUpIo`] and [`RebuildIo`] on a primary blockvol volume and a
//! [`ReplicaTarget`]: WAL entries are scanned from the primary, encoded, shipped and applied on
//! the replica; base images are read from a pinned image in checksummed chunks and installed.
//! Every call reports what the replica actually did.
//!
//! Where the entries and images come from is a [`PrimarySource`]: [`LocalSource`] reads the
//! primary's volume in this process (a primary pushing to its replica); another crate's source
//! can read them over a network (a replica pulling its own rebuild), with the same checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockvol::{BaseInstallSpec, BasePin, BaseReader, EntryInfo, Lba, Volume};
use engine::{
    BaseChunkProgress, BaseRequest, CatchUpIo, EntryId, Lsn, PinId, RebuildIo, TransferError,
    WalChunk,
};

use crate::convert::{entry_id, primary_transfer_error, to_blockvol, to_engine};
use crate::storage::BlockVolStorage;
use crate::target::{
    ApplyRequest, BarrierRequest, BaseBeginRequest, BaseChunkRequest, Lineage, ReplicaTarget,
    TargetError, TruncateRequest,
};

/// What the I/O moved, for reports and tests.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// WAL chunks shipped.
    pub wal_chunks: u64,
    /// Entries applied on the replica.
    pub entries_applied: u64,
    /// Entries the replica already held (identical).
    pub duplicates: u64,
    /// Encoded WAL bytes shipped.
    pub wal_bytes: u64,
    /// Truncations executed.
    pub truncations: u64,
    /// Base chunks shipped.
    pub base_chunks: u64,
    /// Base bytes read from the image (including zero runs not shipped).
    pub base_bytes_scanned: u64,
    /// Base data bytes shipped.
    pub base_bytes_sent: u64,
    /// Image bytes not sent because the replica resumed an interrupted install of the same
    /// image (they were already durable there).
    pub base_bytes_resumed: u64,
    /// Barriers.
    pub barriers: u64,
}

/// Live counters of one recovery, shared with whoever reports its progress (a status page, a
/// progress log) while the recovery runs on another thread. Relaxed atomics: each counter is
/// exact, a reader may see one a step ahead of another.
#[derive(Debug, Default)]
pub struct Progress {
    base_total: AtomicU64,
    base_done: AtomicU64,
    entries: AtomicU64,
    wal_bytes: AtomicU64,
}

/// What [`Progress`] counted so far.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// The image's size in bytes (0 before a base transfer began).
    pub base_total: u64,
    /// Image bytes the replica holds: scanned and sent, or kept from an interrupted install.
    pub base_done: u64,
    /// WAL entries applied on the replica.
    pub entries: u64,
    /// Encoded WAL bytes shipped.
    pub wal_bytes: u64,
}

impl Progress {
    /// What was counted so far.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            base_total: self.base_total.load(Ordering::Relaxed),
            base_done: self.base_done.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            wal_bytes: self.wal_bytes.load(Ordering::Relaxed),
        }
    }
}

/// One chunk of an image read by a [`PrimarySource`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageChunk {
    /// The next non-zero run in blockvol's checksummed chunk form; `None` at the image's end.
    pub frame: Option<Vec<u8>>,
    /// Image bytes this chunk covers (zero runs skipped since the last chunk included).
    pub scanned: u64,
    /// Data bytes it carries.
    pub sent: u64,
}

/// Where a transfer reads the primary's entries and images.
pub trait PrimarySource: Send {
    /// The identity of the primary's entry at `lsn`.
    fn entry_at(&mut self, lsn: Lsn) -> Result<EntryInfo, TransferError>;
    /// Appends entries after `after` to `frames` in wire form, in LSN order: at least one and
    /// at most `want` (a source may stop early to bound one read; fewer than `want` because
    /// the log ends is a `Gap` error); returns how many.
    fn read_entries(
        &mut self,
        after: Lsn,
        want: u64,
        frames: &mut Vec<u8>,
    ) -> Result<u32, TransferError>;
    /// Opens the image that pin `pin_id` holds, which must be at `lsn`, to be read from block
    /// `from` on (0: the whole image); returns how to install it.
    fn open_image(
        &mut self,
        pin_id: PinId,
        lsn: Lsn,
        from: Lba,
    ) -> Result<BaseInstallSpec, TransferError>;
    /// The next chunk of the open image, of at most `max_bytes` data bytes.
    fn next_image_chunk(&mut self, max_bytes: u64) -> Result<ImageChunk, TransferError>;
    /// Lets go of the open image (a failed or finished transfer).
    fn close_image(&mut self);
}

struct OpenImage {
    from: Lba,
    lsn: Lsn,
    reader: Option<BaseReader<'static>>,
    pin: Arc<BasePin>,
}

/// The primary's volume in this process, and the images its [`BlockVolStorage`] pinned.
pub struct LocalSource {
    primary: Arc<Volume>,
    storage: Arc<BlockVolStorage>,
    image: Option<OpenImage>,
}

impl LocalSource {
    /// A source over `storage`'s volume.
    pub fn new(storage: Arc<BlockVolStorage>) -> Self {
        LocalSource {
            primary: Arc::clone(storage.volume()),
            storage,
            image: None,
        }
    }

    /// Like [`PrimarySource::read_entries`], but stops early (after at least one entry) before
    /// `frames` would grow by more than `max_bytes`: a server answering a peer's request bounds what it
    /// reads by what one reply may carry.
    pub fn read_entries_bounded(
        &mut self,
        after: Lsn,
        want: u64,
        max_bytes: usize,
        frames: &mut Vec<u8>,
    ) -> Result<u32, TransferError> {
        let mut scan = self
            .primary
            .scan_from(to_blockvol(after.next()))
            .map_err(|e| primary_transfer_error(e, after))?;
        let start = frames.len();
        let mut count: u32 = 0;
        let mut expected = after.next();
        while u64::from(count) < want {
            let before = frames.len();
            // Each entry goes from the primary's ring straight into the frame buffer, already
            // in wire form (one copy, its stored CRC checked once on the way).
            let Some(item) = scan.next_encoded(frames) else {
                return Err(TransferError::Gap {
                    expected,
                    found: to_engine(scan.end()).next(),
                });
            };
            let info = item.map_err(|e| primary_transfer_error(e, after))?;
            if to_engine(info.lsn) != expected {
                return Err(TransferError::Gap {
                    expected,
                    found: to_engine(info.lsn),
                });
            }
            if count > 0 && frames.len() - start > max_bytes {
                // Over the budget: this entry waits for the next read.
                frames.truncate(before);
                break;
            }
            count += 1;
            expected = expected.next();
        }
        Ok(count)
    }
}

impl PrimarySource for LocalSource {
    fn entry_at(&mut self, lsn: Lsn) -> Result<EntryInfo, TransferError> {
        self.primary
            .entry_info(to_blockvol(lsn))
            .map_err(|e| primary_transfer_error(e, lsn))
    }

    fn read_entries(
        &mut self,
        after: Lsn,
        want: u64,
        frames: &mut Vec<u8>,
    ) -> Result<u32, TransferError> {
        self.read_entries_bounded(after, want, usize::MAX, frames)
    }

    fn open_image(
        &mut self,
        pin_id: PinId,
        lsn: Lsn,
        from: Lba,
    ) -> Result<BaseInstallSpec, TransferError> {
        let pin = self
            .storage
            .image(pin_id)
            .ok_or_else(|| TransferError::BaseUnavailable {
                detail: format!("pin {pin_id} holds no image (released?)"),
            })?;
        if to_engine(pin.lsn()) != lsn {
            return Err(TransferError::BaseUnavailable {
                detail: format!(
                    "pin {pin_id} holds an image at {}, plan wants {lsn}",
                    pin.lsn()
                ),
            });
        }
        let spec = pin.install_spec();
        self.image = Some(OpenImage {
            from,
            lsn,
            reader: None,
            pin,
        });
        Ok(spec)
    }

    fn next_image_chunk(&mut self, max_bytes: u64) -> Result<ImageChunk, TransferError> {
        let Some(image) = self.image.as_mut() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no image open".into(),
            });
        };
        let chunk_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let reader = image.reader.get_or_insert_with(|| {
            BasePin::reader_owned(Arc::clone(&image.pin), chunk_bytes).starting_at(image.from)
        });
        let scanned_before = reader.bytes_scanned();
        let sent_before = reader.bytes_sent();
        // One non-zero run per call at most `chunk_bytes` long; zero runs are skipped by the
        // reader and only counted as covered bytes. The chunk is encoded straight from the
        // reader's window (one copy, one CRC pass).
        let frame = match reader.next_frame() {
            None => None,
            Some(Ok(frame)) => Some(frame),
            Some(Err(e)) => {
                return Err(TransferError::BaseUnavailable {
                    detail: format!("reading the image at {}: {e}", image.lsn),
                });
            }
        };
        Ok(ImageChunk {
            frame,
            scanned: reader.bytes_scanned() - scanned_before,
            sent: reader.bytes_sent() - sent_before,
        })
    }

    fn close_image(&mut self) {
        self.image = None;
    }
}

/// Moves real data from a primary to one replica for one recovery session.
pub struct BridgeIo<T: ReplicaTarget, S: PrimarySource = LocalSource> {
    source: S,
    target: T,
    lineage: Lineage,
    committed: Lsn,
    /// A base transfer in progress: whether its image ended.
    base: Option<bool>,
    /// Image bytes the replica already held (a resumed install), reported as covered with the
    /// next chunk.
    resumed: u64,
    frames: Vec<u8>,
    /// What moved so far.
    pub stats: IoStats,
    /// Live counters for another thread, when asked for.
    progress: Option<Arc<Progress>>,
}

/// A replica's refusal as the engine's transfer error.
pub fn transfer_error(e: TargetError) -> TransferError {
    match e {
        TargetError::Fenced(detail) => TransferError::Fenced { detail },
        TargetError::Gap { expected, found } => TransferError::Gap {
            expected: to_engine(expected),
            found: to_engine(found),
        },
        TargetError::Divergent { lsn, detail } => TransferError::Divergent {
            lsn: to_engine(lsn),
            detail,
        },
        TargetError::BelowCheckpoint {
            requested,
            checkpoint,
        } => TransferError::TruncateBelowCheckpoint {
            requested: to_engine(requested),
            checkpoint: to_engine(checkpoint),
        },
        // Same consequence as a checkpoint in the way: the replica cannot drop those entries.
        TargetError::BelowCommitted {
            requested,
            committed,
        } => TransferError::TruncateBelowCheckpoint {
            requested: to_engine(requested),
            checkpoint: to_engine(committed),
        },
        TargetError::BadFrame(detail) => TransferError::Checksum { detail },
        TargetError::Storage(detail) => TransferError::Storage { detail },
        TargetError::Protocol(detail) | TargetError::Transport(detail) => {
            TransferError::Transport { detail }
        }
    }
}

impl<T: ReplicaTarget> BridgeIo<T> {
    /// I/O for the session `lineage`, recovering the replica to `committed` (the plan's
    /// frozen target, which the replica uses to gate its flusher).
    pub fn new(storage: Arc<BlockVolStorage>, target: T, lineage: Lineage, committed: Lsn) -> Self {
        Self::with_source(LocalSource::new(storage), target, lineage, committed)
    }
}

impl<T: ReplicaTarget, S: PrimarySource> BridgeIo<T, S> {
    /// I/O reading the primary through `source`.
    pub fn with_source(source: S, target: T, lineage: Lineage, committed: Lsn) -> Self {
        BridgeIo {
            source,
            target,
            lineage,
            committed,
            base: None,
            resumed: 0,
            frames: Vec::new(),
            stats: IoStats::default(),
            progress: None,
        }
    }

    /// Also counts into `progress` as the recovery goes (see [`Progress`]).
    #[must_use]
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    fn count(&self, f: impl FnOnce(&Progress)) {
        if let Some(p) = &self.progress {
            f(p);
        }
    }

    /// The replica target.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// The replica target back (a connection to reuse after the recovery).
    pub fn into_target(self) -> T {
        self.target
    }

    fn primary_anchor(&mut self, after: Lsn) -> Result<EntryInfo, TransferError> {
        self.source.entry_at(after)
    }
}

impl<T: ReplicaTarget, S: PrimarySource> CatchUpIo for BridgeIo<T, S> {
    fn truncate_after(&mut self, lsn: Lsn) -> Result<EntryId, TransferError> {
        let tip = self
            .target
            .truncate(TruncateRequest {
                lineage: self.lineage,
                after: to_blockvol(lsn),
                committed: to_blockvol(self.committed),
            })
            .map_err(transfer_error)?;
        self.stats.truncations += 1;
        Ok(entry_id(tip))
    }

    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        up_to: Lsn,
        max_entries: u64,
    ) -> Result<WalChunk, TransferError> {
        let want = after.distance_to(up_to).min(max_entries);
        if want == 0 {
            return Ok(WalChunk {
                applied_to: after,
                entries: 0,
                bytes: 0,
            });
        }
        // The entry the run builds on: the replica must hold exactly this one (log matching).
        let anchor = self.primary_anchor(after)?;
        self.frames.clear();
        let mut frames = std::mem::take(&mut self.frames);
        let read = self.source.read_entries(after, want, &mut frames);
        self.frames = frames;
        let count = read?;
        let bytes = self.frames.len() as u64;
        let reply = self
            .target
            .apply(ApplyRequest {
                lineage: self.lineage,
                committed: to_blockvol(self.committed),
                anchor,
                count,
                frames: std::mem::take(&mut self.frames),
            })
            .map_err(transfer_error)?;
        // The replica's counts are checked, not trusted: they must add up to the run sent.
        let entries = reply
            .applied
            .checked_add(reply.duplicates)
            .filter(|e| *e == u64::from(count))
            .ok_or_else(|| TransferError::Transport {
                detail: format!(
                    "replica reports {} applied and {} duplicates for a run of {count}",
                    reply.applied, reply.duplicates
                ),
            })?;
        self.stats.wal_chunks += 1;
        self.stats.entries_applied = self.stats.entries_applied.saturating_add(reply.applied);
        self.stats.duplicates = self.stats.duplicates.saturating_add(reply.duplicates);
        self.stats.wal_bytes = self.stats.wal_bytes.saturating_add(bytes);
        self.count(|p| {
            p.entries.fetch_add(reply.applied, Ordering::Relaxed);
            p.wal_bytes.fetch_add(bytes, Ordering::Relaxed);
        });
        Ok(WalChunk {
            applied_to: to_engine(reply.applied_to),
            entries,
            bytes,
        })
    }

    fn barrier(&mut self, target: Lsn) -> Result<Lsn, TransferError> {
        // A target the primary cannot vouch for (beyond its head) gets no tip: the replica
        // then makes its log durable without raising its committed point.
        let expected_tip = self.primary_anchor(target).ok();
        let reply = self
            .target
            .barrier(BarrierRequest {
                lineage: self.lineage,
                target: to_blockvol(target),
                expected_tip,
                committed: to_blockvol(self.committed),
            })
            .map_err(transfer_error)?;
        self.stats.barriers += 1;
        // The replica must end on the primary's entry at the LSN it reports: a barrier is also
        // a last log-matching check before the engine declares it in sync.
        let durable = to_engine(reply.durable);
        if durable <= target {
            let primary = self.primary_anchor(durable)?;
            if primary != reply.tip {
                return Err(TransferError::Divergent {
                    lsn: durable,
                    detail: format!("replica tip {:?}, primary {primary:?}", reply.tip),
                });
            }
        }
        Ok(durable)
    }
}

impl<T: ReplicaTarget, S: PrimarySource> RebuildIo for BridgeIo<T, S> {
    fn begin_base(&mut self, base: &BaseRequest) -> Result<u64, TransferError> {
        let spec = self.source.open_image(base.pin_id, base.lsn, Lba(0))?;
        let begun = self
            .target
            .begin_base(BaseBeginRequest {
                lineage: self.lineage,
                base_lsn: spec.base_lsn,
                base_entry: spec.base_entry,
                geometry: spec.geometry,
            })
            .map_err(transfer_error)
            .and_then(|from| {
                let geo = spec.geometry;
                if from.0 > geo.volume_blocks {
                    return Err(TransferError::Transport {
                        detail: format!(
                            "the replica resumes at block {from}, beyond the image's {}",
                            geo.volume_blocks
                        ),
                    });
                }
                if from.0 > 0 {
                    // The replica holds this image durably below `from`: read from there.
                    self.source.close_image();
                    let again = self.source.open_image(base.pin_id, base.lsn, from)?;
                    if again != spec {
                        return Err(TransferError::BaseUnavailable {
                            detail: "the image changed when reopened to resume".into(),
                        });
                    }
                    log::info!(
                        "replica resumes the image at {} from block {from} of {}",
                        base.lsn,
                        geo.volume_blocks
                    );
                }
                Ok(from.0 * u64::from(geo.block_size))
            });
        match begun {
            Ok(resumed) => {
                self.resumed = resumed;
                self.stats.base_bytes_resumed =
                    self.stats.base_bytes_resumed.saturating_add(resumed);
            }
            Err(e) => {
                self.source.close_image();
                return Err(e);
            }
        }
        self.base = Some(false);
        let total = spec.geometry.volume_bytes();
        self.count(|p| {
            p.base_total.store(total, Ordering::Relaxed);
            p.base_done
                .store(self.resumed.min(total), Ordering::Relaxed);
        });
        Ok(total)
    }

    fn transfer_base_chunk(&mut self, max_bytes: u64) -> Result<BaseChunkProgress, TransferError> {
        let lineage = self.lineage;
        match self.base {
            None => {
                return Err(TransferError::BaseUnavailable {
                    detail: "no base transfer in progress".into(),
                });
            }
            Some(true) => {
                return Ok(BaseChunkProgress {
                    bytes: 0,
                    bytes_sent: 0,
                    done: true,
                });
            }
            Some(false) => {}
        }
        let chunk = self.source.next_image_chunk(max_bytes).and_then(|c| {
            let ImageChunk {
                frame,
                scanned,
                sent,
            } = c;
            let Some(frame) = frame else {
                return Ok((false, scanned, sent));
            };
            self.target
                .base_chunk(BaseChunkRequest { lineage, frame })
                .map_err(transfer_error)?;
            Ok((true, scanned, sent))
        });
        let (was_chunk, scanned, sent) = match chunk {
            Ok(c) => c,
            Err(e) => {
                // A failed transfer lets go of the image at once, so the primary's flusher is
                // not kept fenced until this I/O object happens to be dropped.
                self.base = None;
                self.source.close_image();
                return Err(e);
            }
        };
        let done = !was_chunk;
        self.base = Some(done);
        let covered = scanned.saturating_add(std::mem::take(&mut self.resumed));
        if was_chunk {
            self.stats.base_chunks += 1;
        }
        self.stats.base_bytes_scanned = self.stats.base_bytes_scanned.saturating_add(scanned);
        self.stats.base_bytes_sent = self.stats.base_bytes_sent.saturating_add(sent);
        self.count(|p| {
            p.base_done.fetch_add(scanned, Ordering::Relaxed);
        });
        Ok(BaseChunkProgress {
            bytes: covered,
            bytes_sent: sent,
            done,
        })
    }

    fn finish_base(&mut self) -> Result<Lsn, TransferError> {
        let Some(done) = self.base.take() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no base transfer in progress".into(),
            });
        };
        self.source.close_image();
        if !done {
            return Err(TransferError::BaseUnavailable {
                detail: "finish before the whole image was transferred".into(),
            });
        }
        let lsn = self
            .target
            .finish_base(self.lineage)
            .map_err(transfer_error)?;
        Ok(to_engine(lsn))
    }
}
