//! The replica side of a transfer, as messages.
//!
//! [`ReplicaTarget`] is the seam for a network transport: every request and reply is an owned
//! value, WAL entries and base chunks travel in their self-checking encoded form (length and
//! CRC), and the receiver decodes and verifies them. [`LocalReplica`] is the in-process
//! implementation over a replica blockvol volume.
//!
//! Every mutating request carries its [`Lineage`]: the driving engine (a stable tag of the
//! server whose registry owns the session), the session's epoch and its ID. The replica refuses
//! a lineage older than the newest it accepted from the same driver, so a superseded executor
//! can never change a replica that a newer session is recovering; an epoch below the volume's
//! persisted epoch is refused whatever the driver. (Session IDs are only ordered within one
//! registry, which is why the driver is part of the lineage: a primary pushes catch-ups, a
//! rebuilding replica pulls its own rebuild.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockvol::{
    BaseInstall, BaseInstallSpec, BlockVolError, EntryInfo, Epoch, Geometry, Lba, Lsn,
    RepairOutcome, Role, ScrubReport, Volume,
};
use engine::{EpochStart, ReplicaLog};

/// The recovery session a request belongs to. Within one driver, ordered by epoch, then
/// session ID.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lineage {
    /// The session's epoch.
    pub epoch: Epoch,
    /// The session's ID, unique within the driver's registry.
    pub session: u64,
    /// A stable tag of the engine driving the session (see [`Lineage::driver_tag`]).
    pub driver: u64,
}

impl Lineage {
    /// A lineage for `session` at `epoch`, driven by the server `driver`.
    pub fn new(driver: &str, epoch: Epoch, session: u64) -> Self {
        Lineage {
            epoch,
            session,
            driver: Self::driver_tag(driver),
        }
    }

    /// A stable 64-bit tag of a server ID (FNV-1a), so lineages stay `Copy`.
    pub fn driver_tag(driver: &str) -> u64 {
        driver.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

/// The replica's answer to a handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeReply {
    /// The last LSN held (made durable before replying).
    pub head: Lsn,
    /// The identity of the entry at `head`.
    pub tip: EntryInfo,
    /// Entries at or below this are in the replica's extent and cannot be truncated.
    pub checkpoint: Lsn,
    /// The replica's persisted epoch.
    pub epoch: Epoch,
    /// A base install was interrupted: the replica is not a valid copy.
    pub install_incomplete: bool,
    /// The epochs of the log the replica can still truncate (from its checkpoint up), so a
    /// log that left the primary's is truncated where it did instead of rebuilt; `None` from a
    /// replica that cannot tell.
    pub log: Option<Box<ReplicaLog>>,
}

/// Apply a run of WAL entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyRequest {
    /// The session.
    pub lineage: Lineage,
    /// The primary's committed LSN for this recovery (gates the replica's flusher).
    pub committed: Lsn,
    /// The entry the run builds on: the replica must hold exactly this entry at its LSN.
    pub anchor: EntryInfo,
    /// Number of entries in `frames`.
    pub count: u32,
    /// The entries, each in `WalEntry` wire form, back to back.
    pub frames: Vec<u8>,
}

/// What an apply did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ApplyReply {
    /// The replica's head afterwards.
    pub applied_to: Lsn,
    /// Entries appended.
    pub applied: u64,
    /// Entries the replica already held, identical (acknowledged idempotently).
    pub duplicates: u64,
}

/// Drop every entry after `after`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TruncateRequest {
    /// The session.
    pub lineage: Lineage,
    /// The truncation point.
    pub after: Lsn,
    /// The primary's committed LSN.
    pub committed: Lsn,
}

/// Start installing a base image.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BaseBeginRequest {
    /// The session.
    pub lineage: Lineage,
    /// The image's LSN.
    pub base_lsn: Lsn,
    /// The primary's entry at `base_lsn` (the replica's new tail entry).
    pub base_entry: EntryInfo,
    /// The primary's geometry.
    pub geometry: Geometry,
}

/// One chunk of a base image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChunkRequest {
    /// The session.
    pub lineage: Lineage,
    /// The chunk in `BaseChunk` wire form (checksummed).
    pub frame: Vec<u8>,
}

/// Make everything durable and report how far.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BarrierRequest {
    /// The session.
    pub lineage: Lineage,
    /// The LSN the sender expects the replica to hold.
    pub target: Lsn,
    /// The sender's entry at `target`, when it has one: the replica raises its committed point
    /// only when it holds exactly this entry there.
    pub expected_tip: Option<EntryInfo>,
    /// The primary's committed LSN.
    pub committed: Lsn,
}

/// The replica's durable position.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BarrierReply {
    /// The durable LSN.
    pub durable: Lsn,
    /// The identity of the entry at `durable`.
    pub tip: EntryInfo,
}

/// Why a replica refused or failed a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// A stale lineage or epoch.
    #[error("fenced: {0}")]
    Fenced(String),
    /// An entry that is not the replica's head + 1.
    #[error("gap: replica expected lsn {expected}, got {found}")]
    Gap {
        /// The next LSN the replica accepts.
        expected: Lsn,
        /// The LSN sent.
        found: Lsn,
    },
    /// The replica's entry differs from the sender's at the same LSN.
    #[error("divergent at lsn {lsn}: {detail}")]
    Divergent {
        /// Where.
        lsn: Lsn,
        /// What differed.
        detail: String,
    },
    /// Truncation below the replica's checkpoint.
    #[error("cannot truncate to {requested}: replica checkpoint is {checkpoint}")]
    BelowCheckpoint {
        /// Requested point.
        requested: Lsn,
        /// The replica's checkpoint.
        checkpoint: Lsn,
    },
    /// Truncation below the committed point the replica was told: it would drop committed
    /// entries. Only a rebuild can reconcile the replica with a sender that asks for it.
    #[error("cannot truncate to {requested}: the replica was told {committed} is committed")]
    BelowCommitted {
        /// Requested point.
        requested: Lsn,
        /// The replica's committed point.
        committed: Lsn,
    },
    /// A frame failed its checksum or did not decode.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// The replica's storage failed.
    #[error("replica storage: {0}")]
    Storage(String),
    /// The request does not fit the replica's state (no install in progress, and so on).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The replica could not be reached, or the connection to it failed or was closed: the
    /// request may or may not have been applied.
    #[error("transport: {0}")]
    Transport(String),
}

/// A replica, reached through messages.
pub trait ReplicaTarget: Send {
    /// Makes the replica's log durable and reports where it stands.
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError>;
    /// Applies a run of entries on top of `anchor`.
    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError>;
    /// Truncates; returns the identity of the new tip.
    fn truncate(&mut self, req: TruncateRequest) -> Result<EntryInfo, TargetError>;
    /// Starts a base install; returns where the sender starts: every block below that LBA
    /// already holds this very image durably (an interrupted install of it resumes), `Lba(0)`
    /// when it starts over.
    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<Lba, TargetError>;
    /// Writes one base chunk.
    fn base_chunk(&mut self, req: BaseChunkRequest) -> Result<(), TargetError>;
    /// Finishes the install; returns the base LSN now held.
    fn finish_base(&mut self, lineage: Lineage) -> Result<Lsn, TargetError>;
    /// Makes everything durable.
    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError>;
}

/// The epochs of `vol`'s truncatable log for a handshake; `None` when the volume cannot
/// list them (the engine then plans as it would without).
fn replica_log(vol: &Volume) -> Option<Box<ReplicaLog>> {
    let (floor, starts) = vol.epoch_starts().ok()?;
    let starts: Vec<EpochStart> = starts
        .into_iter()
        .map(|(epoch, first)| EpochStart {
            epoch: crate::convert::epoch_to_engine(epoch),
            first: crate::convert::to_engine(first),
        })
        .collect();
    ReplicaLog::new(crate::convert::to_engine(floor), &starts)
        .ok()
        .map(Box::new)
}

/// Raises (never lowers) the replica's committed point: it gates the replica's flusher, and
/// lowering it could only strand entries the flusher already holds back.
fn raise_committed(vol: &Volume, lsn: Lsn) {
    if lsn > vol.status().committed {
        vol.set_committed(lsn);
    }
}

fn storage(e: BlockVolError) -> TargetError {
    match e {
        BlockVolError::Gap { expected, found } => TargetError::Gap { expected, found },
        BlockVolError::Divergent {
            lsn,
            local,
            incoming,
        } => TargetError::Divergent {
            lsn,
            detail: format!("replica holds {local:?}, sender sent {incoming:?}"),
        },
        BlockVolError::BelowCheckpoint {
            requested,
            checkpoint,
        } => TargetError::BelowCheckpoint {
            requested,
            checkpoint,
        },
        e @ (BlockVolError::ChunkChecksum { .. } | BlockVolError::Decode { .. }) => {
            TargetError::BadFrame(e.to_string())
        }
        e @ (BlockVolError::StaleEpoch { .. }
        | BlockVolError::EpochRegression { .. }
        | BlockVolError::WrongRole { .. }) => TargetError::Fenced(e.to_string()),
        other => TargetError::Storage(other.to_string()),
    }
}

/// What scrubbing found on one copy of a volume, and what was repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubStats {
    /// Blocks the last scrub of their range found damaged and nothing has repaired since
    /// (at most [`MAX_TRACKED_DAMAGE`] are tracked; `found` counts them all).
    pub damaged: u64,
    /// Damaged blocks found by scrubs since the volume was opened (a block found in two
    /// passes counts twice).
    pub found: u64,
    /// Blocks repaired from a peer's copy since the volume was opened.
    pub repaired: u64,
    /// Complete passes over the volume.
    pub passes: u64,
    /// When the last complete pass ended, in seconds since the Unix epoch (0: never).
    pub last_pass_unix: u64,
}

/// Most damaged blocks one copy tracks by address.
pub const MAX_TRACKED_DAMAGE: usize = 65_536;

#[derive(Default)]
struct ScrubTrack {
    damaged: BTreeSet<u64>,
    found: u64,
    repaired: u64,
    passes: u64,
    last_pass_unix: u64,
}

struct Node {
    vol: Arc<Volume>,
    scrub: ScrubTrack,
    /// The newest lineage accepted from each driver.
    newest: BTreeMap<u64, Lineage>,
    /// An install in progress and the session that began it: only that session may send its
    /// chunks and finish it.
    install: Option<(Lineage, BaseInstall)>,
    /// The last session that moved past its start: it applied entries or finished an install.
    /// A truncation or an install begun by that same session afterwards can only be a copy of
    /// its earlier request arriving again (a duplicated frame, a retransmission): refused,
    /// since carrying it out would drop or wipe entries the session has since written and a
    /// primary may have counted durable (found by the network simulator, D52).
    settled: Option<Lineage>,
}

/// An in-process replica over a blockvol volume (opened with `FlushGate::Committed`, so it can
/// always truncate above the committed point it was told). Cheap to clone; clones share the
/// volume, the newest accepted lineage and an install in progress.
#[derive(Clone)]
pub struct LocalReplica {
    node: Arc<Mutex<Node>>,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalReplica")
    }
}

impl LocalReplica {
    /// A replica over `vol`.
    pub fn new(vol: Arc<Volume>) -> Self {
        LocalReplica {
            node: Arc::new(Mutex::new(Node {
                vol,
                scrub: ScrubTrack::default(),
                newest: BTreeMap::new(),
                install: None,
                settled: None,
            })),
        }
    }

    /// Verifies the flushed blocks of `[from, from + count)` against their checksums (see
    /// [`Volume::scrub_range`]) and records what it found: the range's damaged blocks replace
    /// what was known of it, and a range that ends at the volume's last block completes a pass.
    /// The replica's lock is not held while the blocks are read, so applies go on.
    pub fn scrub(&self, from: Lba, count: u64) -> Result<ScrubReport, TargetError> {
        let vol = self.volume();
        let report = vol.scrub_range(from, count).map_err(storage)?;
        let blocks = vol.geometry().volume_blocks;
        let end = from.0.saturating_add(count);
        let mut node = self.lock();
        let t = &mut node.scrub;
        let stale: Vec<u64> = t.damaged.range(from.0..end).copied().collect();
        for l in stale {
            t.damaged.remove(&l);
        }
        for l in &report.damaged {
            if t.damaged.len() < MAX_TRACKED_DAMAGE {
                t.damaged.insert(l.0);
            }
        }
        t.found += report.damaged.len() as u64;
        if end >= blocks {
            t.passes += 1;
            t.last_pass_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        }
        Ok(report)
    }

    /// Block `lba` as this copy holds it, verified (a damaged block is an error, never data).
    pub fn read_block(&self, lba: Lba) -> Result<Vec<u8>, TargetError> {
        self.volume().read(lba, 1).map_err(storage)
    }

    /// Repairs block `lba` from `copy`, a peer's verified copy, for a primary at `epoch` (the
    /// volume's own epoch: a request from another epoch is fenced). The stored checksum
    /// decides whether the copy is this block's version ([`Volume::repair_block`]); nothing
    /// is written otherwise.
    pub fn repair(
        &self,
        epoch: Epoch,
        lba: Lba,
        copy: &[u8],
    ) -> Result<RepairOutcome, TargetError> {
        let vol = self.volume();
        let at = vol.status().epoch;
        if epoch != at {
            return Err(TargetError::Fenced(format!(
                "repair at epoch {epoch}, the volume is at epoch {at}"
            )));
        }
        let outcome = vol.repair_block(lba, copy).map_err(storage)?;
        let mut node = self.lock();
        node.scrub.damaged.remove(&lba.0);
        if matches!(
            outcome,
            RepairOutcome::ExtentRewritten | RepairOutcome::ChecksumRewritten
        ) {
            node.scrub.repaired += 1;
        }
        Ok(outcome)
    }

    /// What scrubbing found on this copy.
    pub fn scrub_stats(&self) -> ScrubStats {
        let node = self.lock();
        let t = &node.scrub;
        ScrubStats {
            damaged: t.damaged.len() as u64,
            found: t.found,
            repaired: t.repaired,
            passes: t.passes,
            last_pass_unix: t.last_pass_unix,
        }
    }

    /// The replica's volume.
    pub fn volume(&self) -> Arc<Volume> {
        Arc::clone(&self.lock().vol)
    }

    fn lock(&self) -> MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Node {
    /// Refuses `what` from `lineage` if that session already moved past its start.
    fn not_settled(&self, lineage: Lineage, what: &str) -> Result<(), TargetError> {
        if self.settled == Some(lineage) {
            return Err(TargetError::Fenced(format!(
                "{what} from session {lineage:?}, which already applied entries or finished its \
                 install: a repeated request, refused"
            )));
        }
        Ok(())
    }

    /// Accepts `lineage` if it is not older than the newest accepted one; a newer epoch is
    /// persisted on the volume (the primary's session is the authority for its epoch).
    fn admit(&mut self, lineage: Lineage) -> Result<(), TargetError> {
        let st = self.vol.status();
        if lineage.epoch < st.epoch {
            return Err(TargetError::Fenced(format!(
                "request at epoch {}, replica is at epoch {}",
                lineage.epoch, st.epoch
            )));
        }
        let newest = self.newest.get(&lineage.driver).copied();
        if let Some(newest) = newest
            && lineage < newest
        {
            return Err(TargetError::Fenced(format!(
                "session {lineage:?} is older than session {newest:?} already accepted"
            )));
        }
        if lineage.epoch > st.epoch {
            let role = if st.role.accepts_apply() {
                st.role
            } else {
                Role::Replica
            };
            self.vol.assign(role, lineage.epoch).map_err(storage)?;
        } else if !st.role.accepts_apply() {
            self.vol.assign(Role::Replica, st.epoch).map_err(storage)?;
        }
        if newest != Some(lineage) {
            // A different session abandons whatever another one left half-done.
            self.install = None;
        }
        self.newest.insert(lineage.driver, lineage);
        Ok(())
    }

    fn tip(&self, lsn: Lsn) -> Result<EntryInfo, TargetError> {
        self.vol.entry_info(lsn).map_err(storage)
    }
}

impl ReplicaTarget for LocalReplica {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        let node = self.lock();
        let st = node.vol.status();
        if st.install_incomplete {
            return Ok(HandshakeReply {
                head: st.head,
                tip: EntryInfo::ORIGIN,
                checkpoint: st.checkpoint,
                epoch: st.epoch,
                install_incomplete: true,
                log: None,
            });
        }
        let durable = node.vol.sync().map_err(storage)?;
        Ok(HandshakeReply {
            head: durable,
            tip: node.tip(durable)?,
            checkpoint: node.vol.status().checkpoint,
            epoch: st.epoch,
            install_incomplete: false,
            log: replica_log(&node.vol),
        })
    }

    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        let mut node = self.lock();
        node.admit(req.lineage)?;
        let held = node.tip(req.anchor.lsn).map_err(|e| match e {
            TargetError::Storage(d) => TargetError::Divergent {
                lsn: req.anchor.lsn,
                detail: format!("replica cannot vouch for the anchor: {d}"),
            },
            other => other,
        })?;
        if held != req.anchor {
            return Err(TargetError::Divergent {
                lsn: req.anchor.lsn,
                detail: format!("replica holds {held:?}, sender builds on {:?}", req.anchor),
            });
        }
        // The anchor matched, so the log is verified up to it (log matching): let the flusher
        // move entries up to the sender's committed point within that prefix *before* appending.
        // A replica whose ring is full of verified entries it was never told are committed could
        // otherwise never make room for the next chunk: the committed point would only arrive
        // after the entries that need the room (found by the simulator).
        raise_committed(&node.vol, req.committed.min(req.anchor.lsn));
        // Placed under one lock and written to the ring in vectored positioned writes, not
        // copied into the map page fault by page fault (D54). Same checks and outcome as one
        // `apply_encoded` per entry; an error comes back with the entries before it applied.
        let r = node
            .vol
            .apply_encoded_run(&req.frames, u64::from(req.count))
            .map_err(|e| match e {
                e @ BlockVolError::Decode { .. } => TargetError::BadFrame(e.to_string()),
                other => storage(other),
            })?;
        let (applied, duplicates) = (r.applied, r.duplicates);
        // Hand this batch to the disk now; the barrier's sync then waits for the last batch
        // only instead of writing the whole catch-up at once.
        node.vol.start_writeback();
        // Only now is the log verified up to its head (anchor matched, every entry applied or
        // identical): the flusher may move entries up to the sender's committed point, but
        // never past what was verified, so a divergent tail always stays truncatable.
        let head = node.vol.status().head;
        raise_committed(&node.vol, req.committed.min(head));
        node.settled = Some(req.lineage);
        Ok(ApplyReply {
            applied_to: head,
            applied,
            duplicates,
        })
    }

    fn truncate(&mut self, req: TruncateRequest) -> Result<EntryInfo, TargetError> {
        let mut node = self.lock();
        node.admit(req.lineage)?;
        node.not_settled(req.lineage, "a truncation")?;
        // Truncation only ever drops an uncommitted tail, and a sender's committed point is at
        // least the one this replica was told. A request below it (a late message from a run of
        // a server that no longer exists: lineages are fenced per run, or a primary that lost
        // its committed point) must not drop entries the replica knows are committed. Below the
        // checkpoint, blockvol's own refusal answers first.
        let st = node.vol.status();
        if req.after < st.committed && req.after >= st.checkpoint {
            return Err(TargetError::BelowCommitted {
                requested: req.after,
                committed: st.committed,
            });
        }
        node.vol.truncate_after(req.after).map_err(storage)?;
        let head = node.vol.status().head;
        // The tip has not been matched against the sender's yet (the sender checks the reply),
        // so the committed point is not raised here.
        node.tip(head)
    }

    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<Lba, TargetError> {
        let mut node = self.lock();
        node.admit(req.lineage)?;
        node.not_settled(req.lineage, "a base install")?;
        // Abandon a half-finished install before starting over; if another session began it,
        // that session's next chunk or finish is refused (its image is gone).
        if let Some((owner, _)) = node.install.take()
            && owner != req.lineage
        {
            log::warn!(
                "install of session {owner:?} abandoned for session {:?}",
                req.lineage
            );
        }
        let spec = BaseInstallSpec {
            base_lsn: req.base_lsn,
            base_entry: req.base_entry,
            geometry: req.geometry,
        };
        let install = node.vol.begin_base_install(spec).map_err(storage)?;
        let from = install.resume_from();
        node.install = Some((req.lineage, install));
        Ok(from)
    }

    fn base_chunk(&mut self, req: BaseChunkRequest) -> Result<(), TargetError> {
        let mut node = self.lock();
        node.admit(req.lineage)?;
        let install = node
            .install
            .as_mut()
            .ok_or_else(|| TargetError::Protocol("base chunk without an install".into()))?;
        if install.0 != req.lineage {
            return Err(TargetError::Fenced(format!(
                "base chunk of session {:?}, but the install in progress is session {:?}'s",
                req.lineage, install.0
            )));
        }
        // Checked in place and written into the extent straight from the frame.
        install.1.write_frame(&req.frame).map_err(storage)
    }

    fn finish_base(&mut self, lineage: Lineage) -> Result<Lsn, TargetError> {
        let mut node = self.lock();
        node.admit(lineage)?;
        match &node.install {
            None => return Err(TargetError::Protocol("finish without an install".into())),
            Some((owner, _)) if *owner != lineage => {
                return Err(TargetError::Fenced(format!(
                    "finish of session {lineage:?}, but the install in progress is session \
                     {owner:?}'s"
                )));
            }
            Some(_) => {}
        }
        let Some((_, install)) = node.install.take() else {
            return Err(TargetError::Protocol("finish without an install".into()));
        };
        install.finish().map_err(storage)?;
        node.settled = Some(lineage);
        Ok(node.vol.status().head)
    }

    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        let mut node = self.lock();
        node.admit(req.lineage)?;
        let durable = node.vol.sync().map_err(storage)?;
        let tip = node.tip(durable)?;
        if durable == req.target && Some(tip) == req.expected_tip {
            raise_committed(&node.vol, req.committed.min(req.target));
        }
        Ok(BarrierReply { durable, tip })
    }
}
