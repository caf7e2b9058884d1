//! Handshake outcome classification: zero gap, catch-up, or rebuild.

use std::fmt;

use crate::types::Lsn;

/// What a handshake decided.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The replica already has exactly the committed data.
    ZeroGap,
    /// The missing range is retained (or the replica only needs a truncation).
    CatchUp,
    /// Only a rebuild can bring the replica back.
    NeedsRebuild,
}

impl Outcome {
    /// The reference's name for the outcome.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::ZeroGap => "zero_gap",
            Outcome::CatchUp => "catchup",
            Outcome::NeedsRebuild => "needs_rebuild",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the two sides know at handshake time.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HandshakeResult {
    /// F: the replica's last held LSN.
    pub replica_flushed_lsn: Lsn,
    /// C: the primary's committed LSN.
    pub committed_lsn: Lsn,
    /// S: the first LSN the primary still retains (tail + 1). `Lsn(0)` and `Lsn(1)` both
    /// mean "everything retained".
    pub retention_start_lsn: Lsn,
}

impl HandshakeResult {
    /// Classifies the handshake, in order:
    /// 1. `F == C` is a zero gap (including `F = C = 0`); a replica ahead is never zero gap.
    /// 2. `F > C` is a catch-up that only truncates: it ships nothing, so the primary's
    ///    retention does not matter (the reference sent this case to rebuild when `F + 1 < S`).
    /// 3. `F + 1 >= S` is a catch-up: every missing entry is retained.
    /// 4. Otherwise the replica needs a rebuild.
    ///
    /// With tail T and S = T + 1, rule 3 means catch-up exactly when F >= T.
    pub fn classify(&self) -> Outcome {
        let f = self.replica_flushed_lsn;
        let c = self.committed_lsn;
        if f == c {
            Outcome::ZeroGap
        } else if f > c || f.next() >= self.retention_start_lsn {
            Outcome::CatchUp
        } else {
            Outcome::NeedsRebuild
        }
    }
}

/// Free-function form of [`HandshakeResult::classify`], named after the reference.
pub fn classify_outcome(hr: &HandshakeResult) -> Outcome {
    hr.classify()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(100, 100, 50, Outcome::ZeroGap)]
    #[case(0, 0, 0, Outcome::ZeroGap)]
    #[case(70, 100, 50, Outcome::CatchUp)]
    #[case(10, 100, 50, Outcome::NeedsRebuild)]
    #[case(49, 100, 50, Outcome::CatchUp)]
    #[case(48, 100, 50, Outcome::NeedsRebuild)]
    #[case(0, 100, 0, Outcome::CatchUp)]
    #[case(0, 100, 1, Outcome::CatchUp)]
    #[case(105, 100, 50, Outcome::CatchUp)]
    // Replica ahead but below the primary's retention start: truncation only, still catch-up.
    #[case(105, 100, 200, Outcome::CatchUp)]
    fn classification_boundaries(
        #[case] f: u64,
        #[case] c: u64,
        #[case] s: u64,
        #[case] expected: Outcome,
    ) {
        let hr = HandshakeResult {
            replica_flushed_lsn: Lsn(f),
            committed_lsn: Lsn(c),
            retention_start_lsn: Lsn(s),
        };
        assert_eq!(hr.classify(), expected);
    }
}
