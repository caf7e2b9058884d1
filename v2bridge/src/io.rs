//! The engine's [`CatchUpIo`] and [`RebuildIo`] on a primary blockvol volume and a
//! [`ReplicaTarget`]: WAL entries are scanned from the primary, encoded, shipped and applied on
//! the replica; base images are read from a pinned image in checksummed chunks and installed.
//! Every call reports what the replica actually did.

use std::sync::Arc;

use blockvol::{BasePin, BaseReader, EntryInfo, Volume};
use engine::{
    BaseChunkProgress, BaseRequest, CatchUpIo, EntryId, Lsn, RebuildIo, TransferError, WalChunk,
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
    /// Barriers.
    pub barriers: u64,
}

struct BaseTransfer {
    lsn: Lsn,
    reader: Option<BaseReader<'static>>,
    pin: Arc<BasePin>,
    done: bool,
}

/// Moves real data from a primary volume to one replica for one recovery session.
pub struct BridgeIo<T: ReplicaTarget> {
    primary: Arc<Volume>,
    storage: Arc<BlockVolStorage>,
    target: T,
    lineage: Lineage,
    committed: Lsn,
    base: Option<BaseTransfer>,
    frames: Vec<u8>,
    /// What moved so far.
    pub stats: IoStats,
}

fn transfer_error(e: TargetError) -> TransferError {
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
        BridgeIo {
            primary: Arc::clone(storage.volume()),
            storage,
            target,
            lineage,
            committed,
            base: None,
            frames: Vec::new(),
            stats: IoStats::default(),
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

    fn primary_anchor(&self, after: Lsn) -> Result<EntryInfo, TransferError> {
        self.primary
            .entry_info(to_blockvol(after))
            .map_err(|e| primary_transfer_error(e, after))
    }
}

impl<T: ReplicaTarget> CatchUpIo for BridgeIo<T> {
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
        let mut scan = self
            .primary
            .scan_from(to_blockvol(after.next()))
            .map_err(|e| primary_transfer_error(e, after))?;
        self.frames.clear();
        let mut count: u32 = 0;
        let mut expected = after.next();
        while u64::from(count) < want {
            // Each entry goes from the primary's ring straight into the frame buffer, already
            // in wire form (one copy, its stored CRC checked once on the way).
            let Some(item) = scan.next_encoded(&mut self.frames) else {
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
            count += 1;
            expected = expected.next();
        }
        drop(scan);
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
        self.stats.wal_chunks += 1;
        self.stats.entries_applied += reply.applied;
        self.stats.duplicates += reply.duplicates;
        self.stats.wal_bytes += bytes;
        Ok(WalChunk {
            applied_to: to_engine(reply.applied_to),
            entries: reply.applied + reply.duplicates,
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

impl<T: ReplicaTarget> RebuildIo for BridgeIo<T> {
    fn begin_base(&mut self, base: &BaseRequest) -> Result<u64, TransferError> {
        let pin =
            self.storage
                .image(base.pin_id)
                .ok_or_else(|| TransferError::BaseUnavailable {
                    detail: format!("pin {} holds no image (released?)", base.pin_id),
                })?;
        if to_engine(pin.lsn()) != base.lsn {
            return Err(TransferError::BaseUnavailable {
                detail: format!(
                    "pin {} holds an image at {}, plan wants {}",
                    base.pin_id,
                    pin.lsn(),
                    base.lsn
                ),
            });
        }
        let spec = pin.install_spec();
        self.target
            .begin_base(BaseBeginRequest {
                lineage: self.lineage,
                base_lsn: spec.base_lsn,
                base_entry: spec.base_entry,
                geometry: spec.geometry,
            })
            .map_err(transfer_error)?;
        let total = spec.geometry.volume_bytes();
        self.base = Some(BaseTransfer {
            lsn: base.lsn,
            reader: None,
            pin,
            done: false,
        });
        Ok(total)
    }

    fn transfer_base_chunk(&mut self, max_bytes: u64) -> Result<BaseChunkProgress, TransferError> {
        let lineage = self.lineage;
        let Some(base) = self.base.as_mut() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no base transfer in progress".into(),
            });
        };
        if base.done {
            return Ok(BaseChunkProgress {
                bytes: 0,
                bytes_sent: 0,
                done: true,
            });
        }
        let chunk_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let reader = base
            .reader
            .get_or_insert_with(|| BasePin::reader_owned(Arc::clone(&base.pin), chunk_bytes));
        let scanned_before = reader.bytes_scanned();
        let sent_before = reader.bytes_sent();
        // One non-zero run per call at most `chunk_bytes` long; zero runs are skipped by the
        // reader and only counted as covered bytes.
        // The chunk is encoded straight from the reader's window (one copy, one CRC pass).
        let next = reader.next_frame();
        let next_was_chunk = matches!(next, Some(Ok(_)));
        let scanned = reader.bytes_scanned() - scanned_before;
        let sent = reader.bytes_sent() - sent_before;
        let sent_chunk = match next {
            None => {
                base.done = true;
                Ok(())
            }
            Some(Err(e)) => Err(TransferError::BaseUnavailable {
                detail: format!("reading the image at {}: {e}", base.lsn),
            }),
            Some(Ok(frame)) => self
                .target
                .base_chunk(BaseChunkRequest { lineage, frame })
                .map_err(transfer_error),
        };
        if let Err(e) = sent_chunk {
            // A failed transfer lets go of the image at once, so the primary's flusher is not
            // kept fenced until this I/O object happens to be dropped.
            self.base = None;
            return Err(e);
        }
        if next_was_chunk {
            self.stats.base_chunks += 1;
        }
        self.stats.base_bytes_scanned += scanned;
        self.stats.base_bytes_sent += sent;
        Ok(BaseChunkProgress {
            bytes: scanned,
            bytes_sent: sent,
            done: base.done,
        })
    }

    fn finish_base(&mut self) -> Result<Lsn, TransferError> {
        let Some(base) = self.base.take() else {
            return Err(TransferError::BaseUnavailable {
                detail: "no base transfer in progress".into(),
            });
        };
        if !base.done {
            return Err(TransferError::BaseUnavailable {
                detail: "finish before the whole image was transferred".into(),
            });
        }
        drop(base.reader);
        let lsn = self
            .target
            .finish_base(self.lineage)
            .map_err(transfer_error)?;
        Ok(to_engine(lsn))
    }
}
