//! The rebuild state machine: source selection, base transfer, optional WAL tail replay.
//!
//! Phases and their edges (anything else is refused):
//!
//! | from          | to                                           |
//! |---------------|----------------------------------------------|
//! | init          | source_select, aborted                       |
//! | source_select | transfer, aborted                            |
//! | transfer      | tail_replay (snapshot_tail only), completed (full_base only), aborted |
//! | tail_replay   | completed, aborted                           |
//! | completed     | (terminal)                                   |
//! | aborted       | (terminal)                                   |
//!
//! Unlike the reference, progress is bounded (base progress by the snapshot or target, tail
//! progress by the target), tail progress starts at the snapshot LSN, a snapshot above the
//! committed LSN is refused, and `abort` is reached whenever the owning session is invalidated.

use std::fmt;

use crate::error::{EngineError, Result};
use crate::types::Lsn;

/// Where a rebuild takes its base from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RebuildSource {
    /// A trusted checkpoint image plus the WAL tail after it.
    SnapshotTail,
    /// A full base image at the committed LSN.
    FullBase,
}

impl RebuildSource {
    /// The reference's name for the source.
    pub const fn as_str(self) -> &'static str {
        match self {
            RebuildSource::SnapshotTail => "snapshot_tail",
            RebuildSource::FullBase => "full_base",
        }
    }
}

impl fmt::Display for RebuildSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rebuild's phase.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RebuildPhase {
    /// Created, no source yet.
    Init,
    /// Source chosen.
    SourceSelect,
    /// Base image being transferred.
    Transfer,
    /// WAL tail after the snapshot being replayed.
    TailReplay,
    /// Done.
    Completed,
    /// Abandoned (the session was invalidated).
    Aborted,
}

impl RebuildPhase {
    /// The reference's name for the phase.
    pub const fn as_str(self) -> &'static str {
        match self {
            RebuildPhase::Init => "init",
            RebuildPhase::SourceSelect => "source_select",
            RebuildPhase::Transfer => "transfer",
            RebuildPhase::TailReplay => "tail_replay",
            RebuildPhase::Completed => "completed",
            RebuildPhase::Aborted => "aborted",
        }
    }

    /// True for `Completed` and `Aborted`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, RebuildPhase::Completed | RebuildPhase::Aborted)
    }
}

impl fmt::Display for RebuildPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rebuild sub-state carried by a rebuild session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildState {
    source: Option<RebuildSource>,
    phase: RebuildPhase,
    abort_reason: Option<String>,
    snapshot_lsn: Option<Lsn>,
    snapshot_valid: bool,
    transferred_to: Option<Lsn>,
    tail_start: Option<Lsn>,
    tail_target: Option<Lsn>,
    tail_replayed_to: Option<Lsn>,
}

impl Default for RebuildState {
    fn default() -> Self {
        Self::new()
    }
}

impl RebuildState {
    /// A rebuild in `init`.
    pub fn new() -> Self {
        RebuildState {
            source: None,
            phase: RebuildPhase::Init,
            abort_reason: None,
            snapshot_lsn: None,
            snapshot_valid: false,
            transferred_to: None,
            tail_start: None,
            tail_target: None,
            tail_replayed_to: None,
        }
    }

    /// The chosen source, once selected.
    pub fn source(&self) -> Option<RebuildSource> {
        self.source
    }
    /// The current phase.
    pub fn phase(&self) -> RebuildPhase {
        self.phase
    }
    /// Why the rebuild was aborted, if it was.
    pub fn abort_reason(&self) -> Option<&str> {
        self.abort_reason.as_deref()
    }
    /// The snapshot LSN offered at selection.
    pub fn snapshot_lsn(&self) -> Option<Lsn> {
        self.snapshot_lsn
    }
    /// Whether the snapshot was valid at selection.
    pub fn snapshot_valid(&self) -> bool {
        self.snapshot_valid
    }
    /// How far the base transfer got (an LSN: the base image's LSN once installed).
    pub fn transferred_to(&self) -> Option<Lsn> {
        self.transferred_to
    }
    /// First LSN of the tail, exclusive (the snapshot LSN).
    pub fn tail_start(&self) -> Option<Lsn> {
        self.tail_start
    }
    /// The rebuild's target (the committed LSN at selection).
    pub fn tail_target(&self) -> Option<Lsn> {
        self.tail_target
    }
    /// How far the tail replay got.
    pub fn tail_replayed_to(&self) -> Option<Lsn> {
        self.tail_replayed_to
    }

    fn expect_phase(&self, operation: &'static str, expected: RebuildPhase) -> Result<()> {
        if self.phase != expected {
            return Err(EngineError::RebuildPhaseMismatch {
                operation,
                expected,
                found: self.phase,
            });
        }
        Ok(())
    }

    /// Chooses the source. A valid snapshot LSN selects snapshot + tail with the tail
    /// `(snapshot, committed]`; anything else selects a full base at `committed`.
    pub fn select_source(
        &mut self,
        snapshot_lsn: Option<Lsn>,
        snapshot_valid: bool,
        committed: Lsn,
    ) -> Result<()> {
        self.expect_phase("select_source", RebuildPhase::Init)?;
        match snapshot_lsn {
            Some(snap) if snapshot_valid => {
                if snap > committed {
                    return Err(EngineError::SnapshotAboveCommitted {
                        snapshot: snap,
                        committed,
                    });
                }
                self.source = Some(RebuildSource::SnapshotTail);
                self.tail_start = Some(snap);
            }
            _ => {
                self.source = Some(RebuildSource::FullBase);
            }
        }
        self.snapshot_lsn = snapshot_lsn;
        self.snapshot_valid = snapshot_valid;
        self.tail_target = Some(committed);
        self.phase = RebuildPhase::SourceSelect;
        Ok(())
    }

    /// Starts the base transfer.
    pub fn begin_transfer(&mut self) -> Result<()> {
        self.expect_phase("begin_transfer", RebuildPhase::SourceSelect)?;
        self.phase = RebuildPhase::Transfer;
        Ok(())
    }

    /// The LSN the base image must reach: the snapshot for snapshot + tail, the target for a
    /// full base.
    fn base_target(&self) -> Option<Lsn> {
        match self.source? {
            RebuildSource::SnapshotTail => self.snapshot_lsn,
            RebuildSource::FullBase => self.tail_target,
        }
    }

    /// Records base progress. It must strictly increase (the first report may be LSN 0, so a
    /// full base at committed 0 works) and may not pass the base's LSN.
    pub fn record_transfer_progress(&mut self, lsn: Lsn) -> Result<()> {
        self.expect_phase("record_transfer_progress", RebuildPhase::Transfer)?;
        if let Some(current) = self.transferred_to
            && lsn <= current
        {
            return Err(EngineError::ProgressRegression {
                current,
                proposed: lsn,
            });
        }
        if let Some(target) = self.base_target()
            && lsn > target
        {
            return Err(EngineError::ExceedsFrozenTarget {
                target,
                proposed: lsn,
            });
        }
        self.transferred_to = Some(lsn);
        Ok(())
    }

    /// Starts the tail replay; only for snapshot + tail, and only once the base reached the
    /// snapshot LSN.
    pub fn begin_tail_replay(&mut self) -> Result<()> {
        self.expect_phase("begin_tail_replay", RebuildPhase::Transfer)?;
        let snapshot = match (self.source, self.snapshot_lsn) {
            (Some(RebuildSource::SnapshotTail), Some(snap)) => snap,
            _ => {
                return Err(EngineError::RebuildPhaseMismatch {
                    operation: "begin_tail_replay (full_base has no tail)",
                    expected: RebuildPhase::Transfer,
                    found: self.phase,
                });
            }
        };
        if self.transferred_to.is_none_or(|t| t < snapshot) {
            return Err(EngineError::BaseTransferIncomplete {
                transferred: self.transferred_to,
                snapshot,
            });
        }
        self.tail_replayed_to = Some(snapshot);
        self.phase = RebuildPhase::TailReplay;
        Ok(())
    }

    /// Records tail progress: strictly above what was replayed (which starts at the snapshot)
    /// and at most the target.
    pub fn record_tail_replay_progress(&mut self, lsn: Lsn) -> Result<()> {
        self.expect_phase("record_tail_replay_progress", RebuildPhase::TailReplay)?;
        let current = self.tail_replayed_to.unwrap_or(Lsn::ZERO);
        if lsn <= current {
            return Err(EngineError::ProgressRegression {
                current,
                proposed: lsn,
            });
        }
        if let Some(target) = self.tail_target
            && lsn > target
        {
            return Err(EngineError::ExceedsFrozenTarget {
                target,
                proposed: lsn,
            });
        }
        self.tail_replayed_to = Some(lsn);
        Ok(())
    }

    /// True when the rebuild has everything it needs to complete.
    pub fn ready_to_complete(&self) -> bool {
        let Some(target) = self.tail_target else {
            return false;
        };
        match self.source {
            Some(RebuildSource::SnapshotTail) => {
                self.phase == RebuildPhase::TailReplay
                    && self.tail_replayed_to.is_some_and(|r| r >= target)
            }
            Some(RebuildSource::FullBase) => {
                self.phase == RebuildPhase::Transfer
                    && self.transferred_to.is_some_and(|t| t >= target)
            }
            None => false,
        }
    }

    /// Completes the rebuild; refused unless [`ready_to_complete`](Self::ready_to_complete).
    pub fn complete(&mut self) -> Result<()> {
        if !self.ready_to_complete() {
            return Err(EngineError::RebuildNotReady { phase: self.phase });
        }
        self.phase = RebuildPhase::Completed;
        Ok(())
    }

    /// Aborts the rebuild; a no-op once terminal (the first reason is kept).
    pub fn abort(&mut self, reason: impl Into<String>) {
        if self.phase.is_terminal() {
            return;
        }
        self.phase = RebuildPhase::Aborted;
        self.abort_reason = Some(reason.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn snapshot_tail_lifecycle() {
        let mut r = RebuildState::new();
        r.select_source(Some(Lsn(50)), true, Lsn(100)).unwrap();
        assert_eq!(r.source(), Some(RebuildSource::SnapshotTail));
        r.begin_transfer().unwrap();
        r.record_transfer_progress(Lsn(50)).unwrap();
        r.begin_tail_replay().unwrap();
        assert_eq!(r.tail_replayed_to(), Some(Lsn(50)));
        assert!(r.record_tail_replay_progress(Lsn(50)).is_err());
        r.record_tail_replay_progress(Lsn(100)).unwrap();
        r.complete().unwrap();
        assert_eq!(r.phase(), RebuildPhase::Completed);
    }

    #[test]
    fn full_base_at_committed_zero_works() {
        let mut r = RebuildState::new();
        r.select_source(None, false, Lsn(0)).unwrap();
        r.begin_transfer().unwrap();
        r.record_transfer_progress(Lsn(0)).unwrap();
        assert!(r.ready_to_complete());
        r.complete().unwrap();
    }

    #[test]
    fn progress_is_bounded() {
        let mut r = RebuildState::new();
        r.select_source(Some(Lsn(50)), true, Lsn(100)).unwrap();
        r.begin_transfer().unwrap();
        assert!(matches!(
            r.record_transfer_progress(Lsn(51)),
            Err(EngineError::ExceedsFrozenTarget { .. })
        ));
        r.record_transfer_progress(Lsn(50)).unwrap();
        r.begin_tail_replay().unwrap();
        assert!(matches!(
            r.record_tail_replay_progress(Lsn(101)),
            Err(EngineError::ExceedsFrozenTarget { .. })
        ));
    }

    #[test]
    fn snapshot_above_committed_refused() {
        let mut r = RebuildState::new();
        assert!(matches!(
            r.select_source(Some(Lsn(120)), true, Lsn(100)),
            Err(EngineError::SnapshotAboveCommitted { .. })
        ));
        assert_eq!(r.phase(), RebuildPhase::Init);
    }

    #[test]
    fn abort_keeps_first_reason_and_is_terminal() {
        let mut r = RebuildState::new();
        r.abort("first");
        r.abort("second");
        assert_eq!(r.phase(), RebuildPhase::Aborted);
        assert_eq!(r.abort_reason(), Some("first"));
        assert!(r.select_source(None, false, Lsn(1)).is_err());
    }

    #[rstest]
    #[case(Some(50), true, RebuildSource::SnapshotTail)]
    #[case(Some(50), false, RebuildSource::FullBase)]
    #[case(None, true, RebuildSource::FullBase)]
    #[case(None, false, RebuildSource::FullBase)]
    fn source_selection(
        #[case] snap: Option<u64>,
        #[case] valid: bool,
        #[case] expected: RebuildSource,
    ) {
        let mut r = RebuildState::new();
        r.select_source(snap.map(Lsn), valid, Lsn(100)).unwrap();
        assert_eq!(r.source(), Some(expected));
    }
}
