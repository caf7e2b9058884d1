//! Retained history: what the primary's storage still holds, and the recovery decisions that
//! follow from it (recoverability, its proof, and the rebuild source).

use std::fmt;

use crate::outcome::{HandshakeResult, Outcome};
use crate::rebuild::RebuildSource;
use crate::types::{Epoch, Lsn};

/// A half-open LSN range `(after, to]`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LsnRange {
    /// Exclusive start.
    pub after: Lsn,
    /// Inclusive end.
    pub to: Lsn,
}

impl LsnRange {
    /// Builds `(after, to]`.
    pub const fn new(after: Lsn, to: Lsn) -> Self {
        LsnRange { after, to }
    }

    /// True when the two ranges share at least one LSN.
    pub fn intersects(&self, other: &LsnRange) -> bool {
        self.after < other.to && other.after < self.to
    }
}

impl fmt::Display for LsnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {}]", self.after, self.to)
    }
}

/// The identity of one WAL entry: its LSN, the epoch it was written under, and a checksum of
/// its content. Two logs that hold the same `EntryId` at an LSN hold the same entry; because
/// replicas only ever extend their log contiguously from a verified anchor, they then agree on
/// every earlier entry too (log matching).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryId {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The epoch of the primary that wrote it.
    pub epoch: Epoch,
    /// A checksum of the entry's content (what it writes where), independent of where it is
    /// stored.
    pub checksum: u32,
}

impl EntryId {
    /// The position before the first entry, which every log shares.
    pub const ORIGIN: EntryId = EntryId {
        lsn: Lsn::ZERO,
        epoch: Epoch(0),
        checksum: 0,
    };
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lsn={} epoch={} crc={:08x}",
            self.lsn, self.epoch, self.checksum
        )
    }
}

/// What a replica reports at the handshake: the last LSN it holds and, when it can, the
/// identity of the entry there. With the tip identity, a replica whose entries differ from the
/// primary's at the same LSNs is detected instead of being declared in sync.
///
/// There are three ways to make one, and each says what it claims: [`new`](Self::new) (a
/// replica that names its tip), [`incomplete`](Self::incomplete) (a replica whose store is not
/// a valid copy) and [`unverified`](Self::unverified) (only an LSN: log matching is skipped,
/// which is how the reference once declared a divergent replica in sync). The fields are
/// private so that an unverified handshake cannot be built by accident.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaHandshake {
    flushed: Lsn,
    tip: Option<EntryId>,
    incomplete: bool,
    log: Option<ReplicaLog>,
}

/// Where one epoch's entries begin in a replica's log.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EpochStart {
    /// The epoch the entries were written in.
    pub epoch: Epoch,
    /// Its first entry in the replica's log (or the replica's floor, for the epoch of the
    /// entry there).
    pub first: Lsn,
}

/// Most epochs a [`ReplicaLog`] carries; a replica with more keeps the newest.
pub const MAX_EPOCH_STARTS: usize = 16;

/// The epochs of the part of a replica's log it can still truncate: from its floor (the
/// checkpoint: entries at or below it are in its extent) to its head. With it the engine finds
/// the last entry the replica shares with the primary (the divergence point), truncates there
/// and catches up, where a replica whose tip differs would otherwise be rebuilt.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaLog {
    floor: Lsn,
    starts: [EpochStart; MAX_EPOCH_STARTS],
    len: u8,
}

/// Why a replica's epoch list was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaLogError {
    /// No epoch was given.
    Empty,
    /// The first epoch starts above the floor, so the entry at the floor has no epoch.
    FloorUncovered {
        /// The floor.
        floor: Lsn,
        /// Where the first epoch starts.
        first: Lsn,
    },
    /// Epochs and their first LSNs must both rise strictly.
    NotAscending {
        /// The position in the list.
        index: usize,
    },
}

impl fmt::Display for ReplicaLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaLogError::Empty => f.write_str("no epochs"),
            ReplicaLogError::FloorUncovered { floor, first } => {
                write!(
                    f,
                    "the first epoch starts at {first}, above the floor {floor}"
                )
            }
            ReplicaLogError::NotAscending { index } => {
                write!(f, "epoch {index} does not rise above the one before it")
            }
        }
    }
}

impl std::error::Error for ReplicaLogError {}

impl ReplicaLog {
    /// The epochs of a replica's log from `floor` to its head, oldest first: each epoch and
    /// the first LSN of its entries (the first one's LSN at or below the floor). Epochs and
    /// LSNs must rise strictly. More than [`MAX_EPOCH_STARTS`] keep the newest, and the floor
    /// rises to the first kept start (the engine then looks no lower).
    pub fn new(floor: Lsn, starts: &[EpochStart]) -> Result<ReplicaLog, ReplicaLogError> {
        let first = starts.first().ok_or(ReplicaLogError::Empty)?;
        if first.first > floor {
            return Err(ReplicaLogError::FloorUncovered {
                floor,
                first: first.first,
            });
        }
        for (i, w) in starts.windows(2).enumerate() {
            if w[1].epoch <= w[0].epoch || w[1].first <= w[0].first {
                return Err(ReplicaLogError::NotAscending { index: i + 1 });
            }
        }
        let keep = &starts[starts.len().saturating_sub(MAX_EPOCH_STARTS)..];
        let floor = if keep.len() < starts.len() {
            keep[0].first.max(floor)
        } else {
            floor
        };
        let mut arr = [EpochStart {
            epoch: Epoch(0),
            first: Lsn(0),
        }; MAX_EPOCH_STARTS];
        arr[..keep.len()].copy_from_slice(keep);
        Ok(ReplicaLog {
            floor,
            starts: arr,
            len: keep.len() as u8,
        })
    }

    /// The lowest LSN the replica can truncate to.
    pub fn floor(&self) -> Lsn {
        self.floor
    }

    /// The epochs, oldest first.
    pub fn starts(&self) -> &[EpochStart] {
        &self.starts[..usize::from(self.len)]
    }

    /// The epoch of the replica's entry at `lsn`, for `lsn` at or above the floor (the caller
    /// keeps it at or below the replica's head).
    pub fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        if lsn < self.floor {
            return None;
        }
        self.starts()
            .iter()
            .rev()
            .find(|s| s.first <= lsn)
            .map(|s| s.epoch)
    }
}

/// Where a replica's log left the primary's, as a plan found it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DivergencePoint {
    /// The replica's head at the handshake (F).
    pub replica_head: Lsn,
    /// The replica's entry there.
    pub replica_tip: EntryId,
    /// The last entry both logs share, as the primary holds it: the replica truncates to it
    /// (and its new tip must be exactly this entry), then catches up from it.
    pub point: EntryId,
}

impl ReplicaHandshake {
    /// A replica at `flushed` whose entry there is `tip`: its log is matched against the
    /// primary's.
    pub fn new(flushed: Lsn, tip: EntryId) -> Self {
        ReplicaHandshake {
            flushed,
            tip: Some(tip),
            incomplete: false,
            log: None,
        }
    }

    /// Adds the epochs of the replica's truncatable log, so a replica whose tip differs can
    /// be truncated to the last entry it shares with the primary instead of rebuilt. Ignored
    /// for a handshake without a tip.
    #[must_use]
    pub fn with_log(mut self, log: ReplicaLog) -> Self {
        if self.tip.is_some() {
            self.log = Some(log);
        }
        self
    }

    /// A replica whose store is not a valid copy (for example a base install was
    /// interrupted): whatever it holds cannot be built on, so only a rebuild can restore it.
    pub fn incomplete(flushed: Lsn) -> Self {
        ReplicaHandshake {
            flushed,
            tip: None,
            incomplete: true,
            log: None,
        }
    }

    /// A replica that reports only its LSN. The engine can then compare LSNs but not
    /// entries: a replica holding an old primary's entries at LSNs up to committed is
    /// planned as in sync. Use it only where the replica cannot name its tip (a peer that
    /// predates tip identities, or a test of exactly this weakness).
    pub fn unverified(flushed: Lsn) -> Self {
        ReplicaHandshake {
            flushed,
            tip: None,
            incomplete: false,
            log: None,
        }
    }

    /// F: the replica's last held (and durable) LSN.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// The identity of the replica's entry at F, when it reported one.
    pub fn tip(&self) -> Option<EntryId> {
        self.tip
    }

    /// The epochs of the replica's truncatable log, when it reported them.
    pub fn log(&self) -> Option<&ReplicaLog> {
        self.log.as_ref()
    }

    /// Whether the replica reported its store as not a valid copy.
    pub fn is_incomplete(&self) -> bool {
        self.incomplete
    }

    /// Whether the replica named its tip, so its log can be matched against the primary's.
    pub fn is_verified(&self) -> bool {
        self.tip.is_some()
    }
}

/// Whether the replica's log was checked against the primary's at the anchor LSN.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The replica gave no tip identity: only LSNs were compared.
    NotChecked,
    /// The replica's entry at F is the primary's entry at F.
    Matched(EntryId),
    /// The replica is ahead of committed; after truncating to C its new tip must be the
    /// primary's entry at C, which the executor checks.
    AfterTruncation,
}

/// A snapshot of the primary's retained WAL and checkpoint, as storage reports it.
///
/// Invariants a storage implementation must keep: `tail_lsn <= head_lsn`; every LSN in
/// `(tail_lsn, head_lsn]` is present except those listed in `missing`; `missing` ranges lie in
/// `(tail_lsn, head_lsn]`. The engine never assumes contiguity: a hole makes any range that
/// crosses it unrecoverable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetainedHistory {
    /// Highest LSN written.
    pub head_lsn: Lsn,
    /// Entries with LSN > tail are retained; entries <= tail are recycled.
    pub tail_lsn: Lsn,
    /// The replication layer's committed LSN (not the flusher checkpoint).
    pub committed_lsn: Lsn,
    /// The storage checkpoint, `None` when there is none.
    pub checkpoint_lsn: Option<Lsn>,
    /// Whether the checkpoint image can be trusted as a rebuild base.
    pub checkpoint_trusted: bool,
    /// Holes inside `(tail, head]`; empty when storage proved the retained range contiguous.
    pub missing: Vec<LsnRange>,
}

/// Why a replica is or is not recoverable from retained history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProofReason {
    /// F == C.
    ZeroGap,
    /// F > C: the replica holds entries beyond committed and must truncate them.
    ReplicaAheadNeedsTruncation {
        /// F.
        flushed: Lsn,
        /// C.
        committed: Lsn,
    },
    /// Every entry of `needed` is retained.
    GapWithinRetention {
        /// The range to replay.
        needed: LsnRange,
        /// The primary's tail.
        tail: Lsn,
        /// The primary's head.
        head: Lsn,
    },
    /// The first needed entry was recycled.
    GapBeyondRetention {
        /// F + 1.
        first_needed: Lsn,
        /// The primary's tail.
        tail: Lsn,
    },
    /// The committed LSN is beyond what the primary's WAL holds.
    CommittedBeyondHead {
        /// C.
        committed: Lsn,
        /// The primary's head.
        head: Lsn,
    },
    /// The replica's entry at F is not the primary's entry at F: its log diverged (for
    /// example an old primary's uncommitted writes), so no catch-up on top of it is safe.
    Divergent {
        /// The replica's tip.
        replica: EntryId,
        /// The primary's entry at that LSN, if the primary knows it.
        primary: Option<EntryId>,
    },
    /// The replica's store is not a valid copy (an interrupted base install).
    ReplicaIncomplete,
    /// A hole inside the retained range crosses the needed range.
    HoleInRetention {
        /// The range to replay.
        needed: LsnRange,
        /// The first missing range that crosses it.
        missing: LsnRange,
    },
}

impl ProofReason {
    /// A stable name for the reason (the text before the colon in the reference's strings).
    pub const fn name(&self) -> &'static str {
        match self {
            ProofReason::ZeroGap => "zero_gap",
            ProofReason::ReplicaAheadNeedsTruncation { .. } => "replica_ahead_needs_truncation",
            ProofReason::GapWithinRetention { .. } => "gap_within_retention",
            ProofReason::GapBeyondRetention { .. } => "gap_beyond_retention",
            ProofReason::CommittedBeyondHead { .. } => "committed_beyond_head",
            ProofReason::Divergent { .. } => "divergent_history",
            ProofReason::ReplicaIncomplete => "replica_incomplete",
            ProofReason::HoleInRetention { .. } => "hole_in_retention",
        }
    }
}

impl fmt::Display for ProofReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProofReason::ZeroGap
            | ProofReason::ReplicaAheadNeedsTruncation { .. }
            | ProofReason::ReplicaIncomplete => f.write_str(self.name()),
            ProofReason::GapWithinRetention { needed, tail, head } => write!(
                f,
                "gap_within_retention: need {needed}, tail={tail} head={head}"
            ),
            ProofReason::GapBeyondRetention { first_needed, tail } => write!(
                f,
                "gap_beyond_retention: need LSN {first_needed} but tail={tail}"
            ),
            ProofReason::CommittedBeyondHead { committed, head } => write!(
                f,
                "committed_beyond_head: committed={committed} head={head}"
            ),
            ProofReason::Divergent { replica, primary } => match primary {
                Some(p) => write!(
                    f,
                    "divergent_history: replica has {replica}, primary has {p}"
                ),
                None => write!(
                    f,
                    "divergent_history: replica has {replica}, primary cannot vouch for LSN {}",
                    replica.lsn
                ),
            },
            ProofReason::HoleInRetention { needed, missing } => {
                write!(
                    f,
                    "hole_in_retention: need {needed} but {missing} is missing"
                )
            }
        }
    }
}

/// An explicit, inspectable answer to "can this replica be recovered without a rebuild?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoverabilityProof {
    /// F.
    pub replica_flushed_lsn: Lsn,
    /// C.
    pub committed_lsn: Lsn,
    /// The primary's tail.
    pub tail_lsn: Lsn,
    /// The primary's head.
    pub head_lsn: Lsn,
    /// The verdict.
    pub recoverable: bool,
    /// Why.
    pub reason: ProofReason,
    /// Whether the replica's log was matched against the primary's.
    pub anchor: AnchorCheck,
    /// Set when the replica's log left the primary's below both its head and committed: the
    /// rest of the proof is then for the replica truncated to that point (`replica_flushed_lsn`
    /// is the point), and the plan truncates there before it catches up.
    pub divergence: Option<DivergencePoint>,
    /// Set when the replica's log differs from the primary's and the epochs it reported did
    /// not give a point to truncate at: why (below its floor, outside the primary's
    /// retention, the same LSN and epoch naming different entries). The plan is then the one
    /// without a point (a rebuild for a divergent tip).
    pub divergence_unusable: Option<String>,
}

impl RecoverabilityProof {
    /// The outcome this proof implies. The engine derives outcomes from proofs, so the two can
    /// never disagree (in the reference the classifier ignored the head and holes).
    pub fn outcome(&self) -> Outcome {
        match self.reason {
            ProofReason::ZeroGap => Outcome::ZeroGap,
            _ if self.recoverable => Outcome::CatchUp,
            _ => Outcome::NeedsRebuild,
        }
    }
}

/// Why a rebuild uses the source it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebuildReason {
    /// A trusted checkpoint with a replayable tail: snapshot + tail.
    TrustedCheckpoint {
        /// The checkpoint LSN.
        checkpoint: Lsn,
    },
    /// No checkpoint exists.
    NoCheckpoint,
    /// A checkpoint exists but is not trusted.
    UntrustedCheckpoint {
        /// The checkpoint LSN.
        checkpoint: Lsn,
    },
    /// The checkpoint is trusted but the WAL after it cannot be replayed to committed.
    TrustedCheckpointUnreplayableTail {
        /// The checkpoint LSN.
        checkpoint: Lsn,
        /// The primary's tail.
        tail: Lsn,
    },
    /// The checkpoint is above committed, so its image holds uncommitted data.
    CheckpointAboveCommitted {
        /// The checkpoint LSN.
        checkpoint: Lsn,
        /// The committed LSN.
        committed: Lsn,
    },
}

impl fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebuildReason::TrustedCheckpoint { checkpoint } => {
                write!(f, "trusted_checkpoint: checkpoint={checkpoint}")
            }
            RebuildReason::NoCheckpoint => f.write_str("no_checkpoint"),
            RebuildReason::UntrustedCheckpoint { checkpoint } => {
                write!(f, "untrusted_checkpoint: checkpoint={checkpoint}")
            }
            RebuildReason::TrustedCheckpointUnreplayableTail { checkpoint, tail } => write!(
                f,
                "trusted_checkpoint_unreplayable_tail: checkpoint={checkpoint} tail={tail}"
            ),
            RebuildReason::CheckpointAboveCommitted {
                checkpoint,
                committed,
            } => write!(
                f,
                "checkpoint_above_committed: checkpoint={checkpoint} committed={committed}"
            ),
        }
    }
}

/// The rebuild source chosen from retained history, with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildDecision {
    /// The source.
    pub source: RebuildSource,
    /// The snapshot LSN for snapshot + tail; `None` for a full base.
    pub snapshot_lsn: Option<Lsn>,
    /// Why.
    pub reason: RebuildReason,
}

impl RetainedHistory {
    /// Checks the invariants a storage implementation must keep (see the type's docs):
    /// `tail <= head`, every hole non-empty and inside `(tail, head]`, and a checkpoint not
    /// above the head. The driver refuses a history that breaks them instead of planning
    /// from it. A committed LSN above the head is allowed: the proof reports it.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.tail_lsn > self.head_lsn {
            return Err(format!(
                "tail {} is above head {}",
                self.tail_lsn, self.head_lsn
            ));
        }
        if let Some(m) = self
            .missing
            .iter()
            .find(|m| m.to <= m.after || m.after < self.tail_lsn || m.to > self.head_lsn)
        {
            return Err(format!(
                "hole {m} is empty or outside the retained range ({}, {}]",
                self.tail_lsn, self.head_lsn
            ));
        }
        if let Some(cp) = self.checkpoint_lsn
            && cp > self.head_lsn
        {
            return Err(format!("checkpoint {cp} is above head {}", self.head_lsn));
        }
        Ok(())
    }

    /// The retention start S = tail + 1.
    pub fn retention_start(&self) -> Lsn {
        self.tail_lsn.next()
    }

    /// The handshake result for a replica that holds up to `replica_flushed`.
    pub fn make_handshake_result(&self, replica_flushed: Lsn) -> HandshakeResult {
        HandshakeResult {
            replica_flushed_lsn: replica_flushed,
            committed_lsn: self.committed_lsn,
            retention_start_lsn: self.retention_start(),
        }
    }

    /// The first hole that crosses `(after, to]`, if any.
    fn first_hole_in(&self, needed: LsnRange) -> Option<LsnRange> {
        self.missing.iter().copied().find(|m| m.intersects(&needed))
    }

    /// True when every entry of `(after, to]` is retained: the start is not recycled
    /// (`after >= tail`), the end is written (`to <= head`), and no hole crosses the range.
    /// An empty range (`to <= after`) needs nothing, so only the first condition applies.
    pub fn is_recoverable(&self, after: Lsn, to: Lsn) -> bool {
        if after < self.tail_lsn {
            return false;
        }
        if to <= after {
            return true;
        }
        to <= self.head_lsn && self.first_hole_in(LsnRange::new(after, to)).is_none()
    }

    /// Explains whether a replica holding up to `replica_flushed` can be recovered without a
    /// rebuild. Checked in order: zero gap, replica ahead (truncation), range retained, and
    /// otherwise the first reason the range is not retained.
    pub fn prove_recoverability(&self, replica_flushed: Lsn) -> RecoverabilityProof {
        let f = replica_flushed;
        let c = self.committed_lsn;
        let (recoverable, reason) = if f == c {
            (true, ProofReason::ZeroGap)
        } else if f > c {
            (
                true,
                ProofReason::ReplicaAheadNeedsTruncation {
                    flushed: f,
                    committed: c,
                },
            )
        } else {
            let needed = LsnRange::new(f, c);
            if self.is_recoverable(f, c) {
                (
                    true,
                    ProofReason::GapWithinRetention {
                        needed,
                        tail: self.tail_lsn,
                        head: self.head_lsn,
                    },
                )
            } else if f < self.tail_lsn {
                (
                    false,
                    ProofReason::GapBeyondRetention {
                        first_needed: f.next(),
                        tail: self.tail_lsn,
                    },
                )
            } else if c > self.head_lsn {
                (
                    false,
                    ProofReason::CommittedBeyondHead {
                        committed: c,
                        head: self.head_lsn,
                    },
                )
            } else {
                let missing = self.first_hole_in(needed).unwrap_or(LsnRange::new(f, c));
                (false, ProofReason::HoleInRetention { needed, missing })
            }
        };
        RecoverabilityProof {
            replica_flushed_lsn: f,
            committed_lsn: c,
            tail_lsn: self.tail_lsn,
            head_lsn: self.head_lsn,
            recoverable,
            reason,
            anchor: AnchorCheck::NotChecked,
            divergence: None,
            divergence_unusable: None,
        }
    }

    /// Like [`prove_recoverability`](Self::prove_recoverability), and also matches the
    /// replica's log against the primary's. `primary_at_flushed` is the primary's entry at the
    /// replica's F (from [`StorageAdapter::entry_id`](crate::StorageAdapter::entry_id)).
    ///
    /// For `F <= C` (zero gap or catch-up) the replica's tip must equal the primary's entry at
    /// F; otherwise the replica is not recoverable (`divergent_history`) and only a rebuild is
    /// safe. A replica ahead of C is checked after its truncation instead. Without a tip the
    /// proof is the LSN-only one.
    pub fn prove_with_anchor(
        &self,
        replica: &ReplicaHandshake,
        primary_at_flushed: Option<EntryId>,
    ) -> RecoverabilityProof {
        let mut proof = self.prove_recoverability(replica.flushed);
        if replica.incomplete {
            proof.recoverable = false;
            proof.reason = ProofReason::ReplicaIncomplete;
            return proof;
        }
        let Some(tip) = replica.tip else {
            return proof;
        };
        if replica.flushed > self.committed_lsn {
            proof.anchor = AnchorCheck::AfterTruncation;
            return proof;
        }
        if !proof.recoverable {
            return proof;
        }
        if tip.lsn == replica.flushed && primary_at_flushed == Some(tip) {
            proof.anchor = AnchorCheck::Matched(tip);
        } else {
            proof.recoverable = false;
            proof.reason = ProofReason::Divergent {
                replica: tip,
                primary: primary_at_flushed,
            };
        }
        proof
    }

    /// Chooses the rebuild source: snapshot + tail when the checkpoint is trusted, not above
    /// committed, and `(checkpoint, committed]` is recoverable; a full base otherwise.
    pub fn rebuild_source_decision(&self) -> RebuildDecision {
        let full_base = |reason| RebuildDecision {
            source: RebuildSource::FullBase,
            snapshot_lsn: None,
            reason,
        };
        let Some(cp) = self.checkpoint_lsn else {
            return full_base(RebuildReason::NoCheckpoint);
        };
        if !self.checkpoint_trusted {
            return full_base(RebuildReason::UntrustedCheckpoint { checkpoint: cp });
        }
        if cp > self.committed_lsn {
            return full_base(RebuildReason::CheckpointAboveCommitted {
                checkpoint: cp,
                committed: self.committed_lsn,
            });
        }
        if !self.is_recoverable(cp, self.committed_lsn) {
            return full_base(RebuildReason::TrustedCheckpointUnreplayableTail {
                checkpoint: cp,
                tail: self.tail_lsn,
            });
        }
        RebuildDecision {
            source: RebuildSource::SnapshotTail,
            snapshot_lsn: Some(cp),
            reason: RebuildReason::TrustedCheckpoint { checkpoint: cp },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn h(tail: u64, head: u64, committed: u64) -> RetainedHistory {
        RetainedHistory {
            head_lsn: Lsn(head),
            tail_lsn: Lsn(tail),
            committed_lsn: Lsn(committed),
            ..RetainedHistory::default()
        }
    }

    #[test]
    fn entry_ids_print_every_field() {
        let e = EntryId {
            lsn: Lsn(7),
            epoch: Epoch(3),
            checksum: 0xab,
        };
        assert_eq!(e.to_string(), "lsn=7 epoch=3 crc=000000ab");
    }

    /// `(tail, head, holes, checkpoint)` against the storage contract, at its boundaries.
    #[rstest]
    #[case(10, 20, &[], None, true)]
    #[case(20, 20, &[], Some(20), true)]
    #[case(21, 20, &[], None, false)]
    #[case(10, 20, &[(10, 20)], None, true)]
    #[case(10, 20, &[(12, 12)], None, false)]
    #[case(10, 20, &[(13, 12)], None, false)]
    #[case(10, 20, &[(9, 12)], None, false)]
    #[case(10, 20, &[(12, 21)], None, false)]
    #[case(10, 20, &[(11, 12), (15, 21)], None, false)]
    #[case(10, 20, &[], Some(21), false)]
    fn storage_contract_is_checked(
        #[case] tail: u64,
        #[case] head: u64,
        #[case] holes: &[(u64, u64)],
        #[case] checkpoint: Option<u64>,
        #[case] consistent: bool,
    ) {
        let mut hist = h(tail, head, head);
        hist.missing = holes
            .iter()
            .map(|(a, t)| LsnRange::new(Lsn(*a), Lsn(*t)))
            .collect();
        hist.checkpoint_lsn = checkpoint.map(Lsn);
        assert_eq!(hist.check_consistent().is_ok(), consistent, "{hist:?}");
    }

    #[rstest]
    // The reference's boundary table.
    #[case(50, 100, 50, 100, true)]
    #[case(50, 100, 49, 100, false)]
    #[case(30, 100, 50, 100, true)]
    #[case(60, 100, 50, 100, false)]
    #[case(0, 80, 0, 100, false)]
    // End exactly at the head, and one past it.
    #[case(0, 100, 0, 100, true)]
    #[case(0, 100, 0, 101, false)]
    // An empty range needs nothing, but its start still must not be recycled.
    #[case(10, 20, 20, 20, true)]
    #[case(10, 20, 25, 20, true)]
    #[case(10, 20, 5, 5, false)]
    fn is_recoverable_boundaries(
        #[case] tail: u64,
        #[case] head: u64,
        #[case] after: u64,
        #[case] to: u64,
        #[case] expected: bool,
    ) {
        assert_eq!(
            h(tail, head, head).is_recoverable(Lsn(after), Lsn(to)),
            expected
        );
    }

    #[rstest]
    // A hole at 41..=45 blocks any range that crosses it, and only those.
    #[case(30, 100, false)]
    #[case(40, 100, false)]
    #[case(44, 50, false)]
    #[case(45, 100, true)]
    #[case(30, 40, true)]
    fn holes_block_crossing_ranges(#[case] after: u64, #[case] to: u64, #[case] expected: bool) {
        let mut hist = h(10, 100, 100);
        hist.missing = vec![LsnRange::new(Lsn(40), Lsn(45))];
        assert_eq!(hist.is_recoverable(Lsn(after), Lsn(to)), expected);
    }

    #[rstest]
    // The reference's decision table, plus the cases it could not express.
    #[case(
        30,
        100,
        Some(50),
        true,
        RebuildSource::SnapshotTail,
        "trusted_checkpoint"
    )]
    #[case(
        80,
        100,
        Some(50),
        true,
        RebuildSource::FullBase,
        "trusted_checkpoint_unreplayable_tail"
    )]
    #[case(
        60,
        100,
        Some(40),
        true,
        RebuildSource::FullBase,
        "trusted_checkpoint_unreplayable_tail"
    )]
    #[case(
        50,
        0,
        Some(40),
        true,
        RebuildSource::FullBase,
        "checkpoint_above_committed"
    )]
    #[case(
        30,
        100,
        Some(50),
        false,
        RebuildSource::FullBase,
        "untrusted_checkpoint"
    )]
    #[case(30, 100, None, true, RebuildSource::FullBase, "no_checkpoint")]
    #[case(
        30,
        100,
        Some(120),
        true,
        RebuildSource::FullBase,
        "checkpoint_above_committed"
    )]
    #[case(
        100,
        100,
        Some(100),
        true,
        RebuildSource::SnapshotTail,
        "trusted_checkpoint"
    )]
    fn rebuild_source_decisions(
        #[case] tail: u64,
        #[case] committed: u64,
        #[case] checkpoint: Option<u64>,
        #[case] trusted: bool,
        #[case] source: RebuildSource,
        #[case] reason: &str,
    ) {
        let hist = RetainedHistory {
            head_lsn: Lsn(200),
            tail_lsn: Lsn(tail),
            committed_lsn: Lsn(committed),
            checkpoint_lsn: checkpoint.map(Lsn),
            checkpoint_trusted: trusted,
            missing: Vec::new(),
        };
        let d = hist.rebuild_source_decision();
        assert_eq!(d.source, source);
        assert!(d.reason.to_string().starts_with(reason), "{}", d.reason);
        assert_eq!(
            d.snapshot_lsn.is_some(),
            source == RebuildSource::SnapshotTail
        );
    }

    #[rstest]
    #[case(100, "zero_gap", true)]
    #[case(105, "replica_ahead_needs_truncation", true)]
    #[case(70, "gap_within_retention", true)]
    #[case(30, "gap_within_retention", true)]
    #[case(29, "gap_beyond_retention", false)]
    fn proof_reasons(#[case] f: u64, #[case] reason: &str, #[case] recoverable: bool) {
        let p = h(30, 100, 100).prove_recoverability(Lsn(f));
        assert_eq!(p.reason.name(), reason);
        assert_eq!(p.recoverable, recoverable);
    }

    #[test]
    fn anchor_mismatch_is_divergent_and_match_is_recorded() {
        let hist = h(0, 100, 100);
        let tip = EntryId {
            lsn: Lsn(70),
            epoch: Epoch(1),
            checksum: 7,
        };
        let other = EntryId { checksum: 8, ..tip };
        let ok = hist.prove_with_anchor(&ReplicaHandshake::new(Lsn(70), tip), Some(tip));
        assert_eq!(ok.anchor, AnchorCheck::Matched(tip));
        assert!(ok.recoverable);
        let bad = hist.prove_with_anchor(&ReplicaHandshake::new(Lsn(70), tip), Some(other));
        assert!(!bad.recoverable);
        assert_eq!(bad.reason.name(), "divergent_history");
        let unknown = hist.prove_with_anchor(&ReplicaHandshake::new(Lsn(70), tip), None);
        assert!(
            !unknown.recoverable,
            "a tip the primary cannot vouch for is not trusted"
        );
        let ahead = hist.prove_with_anchor(&ReplicaHandshake::new(Lsn(105), tip), None);
        assert_eq!(ahead.anchor, AnchorCheck::AfterTruncation);
        let incomplete = hist.prove_with_anchor(&ReplicaHandshake::incomplete(Lsn(100)), None);
        assert_eq!(incomplete.reason, ProofReason::ReplicaIncomplete);
        assert_eq!(incomplete.outcome(), Outcome::NeedsRebuild);
    }
}
