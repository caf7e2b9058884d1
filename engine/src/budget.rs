//! Catch-up budgets: a catch-up that does not converge within its budget escalates to rebuild
//! instead of chasing the head forever.

use std::fmt;

use crate::types::Tick;

/// Limits on one catch-up session. `None` means that dimension has no limit.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CatchUpBudget {
    /// Longest allowed run, from the start tick.
    pub max_duration_ticks: Option<u64>,
    /// Most entries the session may replay (counted from the replica's starting point, so the
    /// replica's existing prefix never counts).
    pub max_entries: Option<u64>,
    /// Longest allowed time without progress.
    pub progress_deadline_ticks: Option<u64>,
}

/// What a session has consumed of its budget.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetCheck {
    /// When the catch-up started, if a tick was given.
    pub start_tick: Option<Tick>,
    /// Entries replayed so far: `recovered_to - start`.
    pub entries_replayed: u64,
    /// The tick of the last progress report (the start tick until the first one).
    pub last_progress_tick: Option<Tick>,
}

/// Why a budget was exceeded.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BudgetViolation {
    /// Ran longer than `max_duration_ticks`.
    DurationExceeded,
    /// Replayed more than `max_entries`.
    EntriesExceeded,
    /// No progress for longer than `progress_deadline_ticks`.
    ProgressStalled,
}

impl BudgetViolation {
    /// The reference's name for the violation.
    pub const fn as_str(self) -> &'static str {
        match self {
            BudgetViolation::DurationExceeded => "duration_exceeded",
            BudgetViolation::EntriesExceeded => "entries_exceeded",
            BudgetViolation::ProgressStalled => "progress_stalled",
        }
    }
}

impl fmt::Display for BudgetViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CatchUpBudget {
    /// True when no dimension is limited.
    pub fn is_unlimited(&self) -> bool {
        self.max_duration_ticks.is_none()
            && self.max_entries.is_none()
            && self.progress_deadline_ticks.is_none()
    }

    /// Checks the tracker against the budget at `now`, in the reference's order: duration,
    /// entries, stall. Elapsed time saturates, so a clock that moved backwards never produces a
    /// false violation. Stall detection measures from the last progress tick, or from the start
    /// tick before any progress, so it works from tick 0 on.
    pub fn check(&self, tracker: &BudgetCheck, now: Tick) -> Option<BudgetViolation> {
        if let (Some(max), Some(start)) = (self.max_duration_ticks, tracker.start_tick)
            && now.since(start) > max
        {
            return Some(BudgetViolation::DurationExceeded);
        }
        if let Some(max) = self.max_entries
            && tracker.entries_replayed > max
        {
            return Some(BudgetViolation::EntriesExceeded);
        }
        if let (Some(deadline), Some(last)) = (
            self.progress_deadline_ticks,
            tracker.last_progress_tick.or(tracker.start_tick),
        ) && now.since(last) > deadline
        {
            return Some(BudgetViolation::ProgressStalled);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn tracker(start: Option<u64>, entries: u64, last: Option<u64>) -> BudgetCheck {
        BudgetCheck {
            start_tick: start.map(Tick),
            entries_replayed: entries,
            last_progress_tick: last.map(Tick),
        }
    }

    #[rstest]
    // Reference numbers: duration max 10 / start 0 / now 15 violates; max 5 / now 10 violates.
    #[case(
        Some(10),
        None,
        None,
        tracker(Some(0), 0, None),
        15,
        Some(BudgetViolation::DurationExceeded)
    )]
    #[case(
        Some(5),
        None,
        None,
        tracker(Some(0), 0, None),
        10,
        Some(BudgetViolation::DurationExceeded)
    )]
    #[case(Some(10), None, None, tracker(Some(0), 0, None), 10, None)]
    // A clock that goes backwards is not a violation (the reference's unsigned wrap was).
    #[case(Some(10), None, None, tracker(Some(100), 0, None), 3, None)]
    // Entries: max 20 with 21 violates, with 20 does not.
    #[case(
        None,
        Some(20),
        None,
        tracker(Some(0), 21, None),
        1,
        Some(BudgetViolation::EntriesExceeded)
    )]
    #[case(None, Some(20), None, tracker(Some(0), 20, None), 1, None)]
    // Stall: deadline 5, progress at 12, now 18 violates; now 17 does not.
    #[case(
        None,
        None,
        Some(5),
        tracker(Some(10), 2, Some(12)),
        18,
        Some(BudgetViolation::ProgressStalled)
    )]
    #[case(None, None, Some(5), tracker(Some(10), 2, Some(12)), 17, None)]
    // Stall detection works from tick 0 (the reference disabled it until a tick > 0).
    #[case(
        None,
        None,
        Some(5),
        tracker(Some(0), 0, Some(0)),
        6,
        Some(BudgetViolation::ProgressStalled)
    )]
    // Order: duration is reported before entries.
    #[case(
        Some(1),
        Some(1),
        None,
        tracker(Some(0), 5, None),
        5,
        Some(BudgetViolation::DurationExceeded)
    )]
    // Unlimited budget never fires.
    #[case(None, None, None, tracker(Some(0), u64::MAX, Some(0)), u64::MAX, None)]
    fn budget_boundaries(
        #[case] max_duration: Option<u64>,
        #[case] max_entries: Option<u64>,
        #[case] deadline: Option<u64>,
        #[case] t: BudgetCheck,
        #[case] now: u64,
        #[case] expected: Option<BudgetViolation>,
    ) {
        let budget = CatchUpBudget {
            max_duration_ticks: max_duration,
            max_entries,
            progress_deadline_ticks: deadline,
        };
        assert_eq!(budget.check(&t, Tick(now)), expected);
    }
}
