//! Deterministic simulation of a primary, replicas and faults (issue 6), in the style of
//! FoundationDB's simulator and TigerBeetle's VOPR: the real engine, v2bridge, controlbridge
//! and blockvol crates run single-threaded under faults chosen by one seed, and an oracle that
//! is independent of every one of them checks invariants after every step.
//!
//! # What runs
//!
//! One primary server and two or three replica servers. Each server is a real
//! [`BlockService`](controlbridge::BlockService) (one engine orchestrator per volume) over a
//! simulated [`VolumeBackend`](controlbridge::VolumeBackend) whose one volume is a real blockvol
//! [`Volume`](blockvol::Volume) on a [`SimDisk`](blockvol::SimDisk) (written and synced bytes
//! kept apart, so a crash drops or tears what was not synced). Recoveries run exactly as in
//! production: the master's assignments go through the control bridge, the primary pushes
//! catch-ups and truncations through `CatchUpExecutor` + v2bridge's `BridgeIo` to
//! `LocalReplica`s, and a replica assigned `rebuilding` pulls its base image (and tail) from
//! the primary's `BlockVolStorage`. Flushers are manual (`FlusherMode::Manual`), WAL-full waits
//! have a zero timeout, and nothing reads a clock, so a run depends on its seed only.
//!
//! The network is a table of live processes (module `net`): a connection is bound to the
//! process incarnation it reached, so a request after that process restarted fails like a
//! reset TCP connection (messages never outlive their connection); an address can be
//! unreachable; a server can move to a new address. A crash drops the process: its volume is
//! reopened from a `SimDisk` crash image (unsynced sectors dropped, kept, or torn), and its
//! service restarts with an empty registry. A service whose process crashed while it was
//! running (inside a recovery) is a ghost: its remaining backend calls fail.
//!
//! Volumes have no flusher thread, so the simulator plays the background flushers where they
//! matter: a replica keeps half of its ring free ahead of an apply, and a writer (client or
//! apply) that finds the ring full waits one flush cycle and tries again, as it would wait for
//! the real flusher.
//!
//! # Operations and faults
//!
//! Each step of the faulty phase draws one [`Op`] with seed-chosen weights (swarm testing: a
//! seed also switches some fault kinds off): client writes and trims, syncs (commits), flushes,
//! assignments from the master (reassign, rebuild, epoch bump, failover, late or duplicated
//! re-delivery of any earlier assignment), replica and primary crashes, disconnects and
//! reconnects, address changes, pin failures, retention pressure, replication rounds cut short,
//! and stale messages, sessions and writes. Inside every recovery, the executors' step hook
//! ([`controlbridge::VolumeBackend::on_recovery_step`]) may inject an [`Interleave`] event
//! between two steps: client writes and commits, flushes, retention pressure, an emergency pin
//! revocation, a disconnect, a crash of the target, of another replica or of the primary
//! (including the server running the recovery), an epoch bump, a cancel, a pin failure, a stale
//! request. Tests schedule these events instead ([`Sim::at_next_recovery_step`]).

//! # The replication model (what "committed" means)
//!
//! The crates implement recovery, not the steady-state replication stream, so the simulator
//! supplies a deliberately small one (like Kafka's in-sync replica set with
//! `min.insync.replicas = 1`):
//!
//! - Clients write to the primary's volume (`write_in_epoch` / `trim_in_epoch` at the volume's
//!   epoch). A write is *accepted* when the volume returns its LSN, and *acknowledged* only when
//!   a later client sync commits it.
//! - A client sync ([`Op::Commit`]) makes the primary durable to `d`, then, in rounds of at
//!   most 16 entries (a pipelined stream: each round tells the replicas the committed point of
//!   the last one, so they can flush), for every replica the primary's engine registry reports
//!   `in_sync`, ships `(F, t]` through the real
//!   `ReplicaTarget` path (`BridgeIo::stream_wal_chunk` with its anchor check, then `barrier`,
//!   which checks the replica's durable tip against the primary's entry) under the lineage of a
//!   separate `"<primary>/stream"` driver. A replica that misses the round (unreachable, fenced,
//!   restarted, divergent) is demoted to `degraded` in the primary's registry, and the next
//!   primary assignment recovers it through the engine.
//! - `t` is **committed** when the primary and every replica still in sync after the round
//!   have it durably, and at least one replica does (otherwise the sync fails and nothing new
//!   is acknowledged). The primary's volume then gets `set_committed(t)`, which gates its
//!   flusher and is the committed LSN the engine plans against. The replicas that acknowledged
//!   `t` are the *holders* of the committed prefix; a holder stops being one when a base install
//!   starts on it (its copy is wiped).
//! - At every step boundary the stream also tops up each in-sync replica to the committed LSN
//!   (a replica that finished a catch-up at its frozen target joins the stream there).
//! - Failover promotes a holder: the master bumps the epoch, fences the old primary (which may
//!   first accept writes nobody will acknowledge and ship some of them to a few replicas, and
//!   may crash), the new primary drops everything after the committed LSN (uncommitted data is
//!   never revived), and every other server comes back as a replica at the new epoch. A primary
//!   restart keeps its epoch; the coordinator restores the committed LSN on the reopened volume
//!   (blockvol does not persist it).
//!
//! # Invariants, checked after every step
//!
//! The oracle ([`oracle`]) is the simulator's own log of every write the primary accepted, the
//! committed LSN, and the images they imply. No check compares a volume with another volume or
//! with the engine's view.
//!
//! - **(a) in sync means holding committed data.** For every replica the current primary's
//!   registry reports `in_sync` (checked at every step boundary *before* the stream tops it up,
//!   and again before every replication round ships to it, so the simulator's own replication
//!   cannot repair a false claim first): the claim is backed by evidence the simulator saw
//!   since it last saw the replica out of sync (a handshake through its backend, recording the
//!   committed LSN the plan targets, or a replication round to it), its volume is a complete
//!   copy, its head is durable, `target <= head <= durable` where `target` is that recorded
//!   committed LSN (the recovery target) and `durable` is the primary's last sync (an in-sync
//!   replica may hold the primary's entries from a round that has not committed yet, never
//!   anything else), the identity of its entry at `head` equals the oracle's, and its digest
//!   equals the digest of the oracle image at `head`. After the top-up, every in-sync replica
//!   is exactly at the committed LSN.
//! - **(b) no synced-and-committed write is ever lost.** The primary holds exactly the oracle's
//!   log (head, entry identity at committed, digest of the oracle image at its head); after a
//!   primary crash its recovered head is at least its last acknowledged sync; every holder
//!   holds the oracle's entry at the committed LSN; a promoted replica, after dropping its
//!   uncommitted tail, has exactly the oracle's committed image.
//! - **(c) a stale epoch or session changes nothing.** Stale operations are injected on
//!   purpose, each judged stale by the simulator's own record of what the recipient has
//!   accepted, and the recipient's state is recorded before and after: an assignment older than
//!   one the server accepted (lower epoch, or the same epoch and an older address version: its
//!   registry, role and volume must not change), a replica request whose lineage epoch is below
//!   the epoch the replica was assigned, or whose session is older than one this run of the
//!   replica accepted from the same driver at the same epoch (it must be refused as fenced and
//!   leave the volume unchanged), engine calls with a session that is no longer
//!   current and an intent below the registry's epoch (refused, registry status unchanged), and
//!   client writes stamped with an old epoch (refused, volume unchanged).
//! - **(d) no pin outstanding without a recovery.** Recoveries run to completion inside a step,
//!   so at every step boundary every live volume reports `pins_outstanding == 0` and every
//!   primary storage holds no base image.
//! - **(e) liveness.** Every run ends with a healed phase: no more faults (every address
//!   reachable, queued pin failures dropped), and the master re-sends assignments (a rebuild for a replica the primary reports
//!   `needs_rebuild`, the primary's assignment while a replica is not in sync) while clients keep
//!   writing. Every replica must be in sync within [`SimOptions::liveness_bound`] healed steps
//!   and stay in sync; at the end every volume's digest equals the oracle's committed image.
//!
//! The first violation stops the run; the report carries the seed, the exact rerun command and
//! the last events.
//!
//! # What it does not model
//!
//! Concurrency inside a process (everything is one thread; interleaving happens only at the
//! executors' step hook), crashes in the middle of a sync or of a blockvol call (the
//! crash-consistency tests cover those), disk I/O errors and media corruption, messages that
//! outlive their connection or are reordered within it, durability modes other than the one
//! above (the engine has none), catch-up budgets (the control bridge sets none), the master's
//! own failures and its choice of what to send beyond the rules above, and more than one
//! volume.
//!
//! # Proving the checker can fail
//!
//! [`Bug`] switches make the simulated system misbehave in one specific way (handshakes without
//! log matching, a replica declared in sync without recovery, promotion of a non-holder, a
//! leaked pin, a "stale" request stamped with the current epoch, a master that never sends
//! rebuilds, a replica that installs a base image with one block of wrong bytes at the right
//! LSN and entry identity); `tests/sim_checker.rs` asserts each is reported as the matching
//! violation.

mod backend;
mod net;
pub mod oracle;
pub mod rng;
mod runner;
pub mod stream;
mod world;

use std::collections::BTreeMap;
use std::fmt;

pub use runner::{Sim, run};
pub use world::{Interleave, Observation, StaleKind, VOLUME};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed every choice comes from.
    pub seed: u64,
    /// Steps of the faulty phase.
    pub steps: u64,
    /// Steps of the healed phase that follows.
    pub heal_steps: u64,
    /// Healed steps within which every replica must be in sync.
    pub liveness_bound: u64,
    /// Number of replicas; `None` lets the seed choose two or three.
    pub replicas: Option<usize>,
    /// Chance (per mille) that the step hook injects a random event between two recovery
    /// steps; `None` lets the seed choose. Scripted tests set 0 and schedule events instead.
    pub interleave_per_mille: Option<u64>,
    /// A deliberate misbehaviour, to prove the checker catches it.
    pub bug: Option<Bug>,
    /// Print `seed=N` at the start and the rerun command on failure.
    pub print: bool,
}

impl SimOptions {
    /// Options for `seed` with `steps` faulty steps and the default healed phase.
    pub fn new(seed: u64, steps: u64) -> SimOptions {
        SimOptions {
            seed,
            steps,
            heal_steps: 30,
            liveness_bound: 12,
            replicas: None,
            interleave_per_mille: None,
            bug: None,
            print: false,
        }
    }
}

/// A deliberate misbehaviour of the simulated system (test-only switches).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Handshakes report only the replica's LSN, not the identity of its last entry (the
    /// reference's behaviour): a replica with a divergent tail at the committed LSN looks in
    /// sync.
    UnverifiedHandshake,
    /// A lagging replica is declared in sync through the engine's manual driver with a claimed
    /// zero gap, without moving any data.
    FalseInSync,
    /// Failover promotes a replica that does not hold the committed prefix.
    DesperatePromotion,
    /// A recovery leaves a WAL pin behind on the primary.
    LeakPin,
    /// "Stale" replica requests are stamped with the replica's current epoch.
    StaleStampedCurrent,
    /// The master never sends rebuilding assignments.
    NoRebuildAssignments,
    /// A replica writes one block of a base image it installs with wrong bytes (the first
    /// block of the first chunk, inverted, after the chunk's checksum was verified): the
    /// install ends at the right LSN with the right entry identity, only the bytes differ.
    CorruptBaseBlock,
}

/// The invariant a violation breaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// (a) a replica reported in sync holds the committed data at its recovery target.
    InSyncHoldsCommitted,
    /// (b) no synced-and-committed write is ever lost.
    CommittedNeverLost,
    /// (c) a stale epoch or session changes nothing.
    StaleChangesNothing,
    /// (d) no pin is outstanding when no recovery is active.
    NoPinWithoutRecovery,
    /// (e) after faults stop, every replica reaches in sync within the bound.
    Liveness,
    /// The simulator itself could not continue (a panic, or a setup step that must work), or
    /// its master sent an assignment that contradicts its own view of the cluster.
    Harness,
}

impl Invariant {
    /// The short label used in reports.
    pub const fn label(self) -> &'static str {
        match self {
            Invariant::InSyncHoldsCommitted => "(a) in_sync_holds_committed",
            Invariant::CommittedNeverLost => "(b) committed_never_lost",
            Invariant::StaleChangesNothing => "(c) stale_changes_nothing",
            Invariant::NoPinWithoutRecovery => "(d) no_pin_without_recovery",
            Invariant::Liveness => "(e) liveness",
            Invariant::Harness => "harness",
        }
    }
}

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The step at which it was found.
    pub step: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// What was found.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {}: {}: {}",
            self.step,
            self.invariant.label(),
            self.detail
        )
    }
}

/// Counts of what a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Steps run (faulty and healed).
    pub steps: u64,
    /// Operations applied at step level, by kind.
    pub ops: BTreeMap<&'static str, u64>,
    /// Faults injected (at step level and inside recoveries), by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Recovery outcomes reported by the control bridge, by path (`zero_gap`, `catchup`,
    /// `truncate`, `rebuild_snapshot_tail`, `rebuild_full_base`, `needs_rebuild`, `failed`).
    pub recoveries: BTreeMap<&'static str, u64>,
    /// Failed recoveries, by cause (the executor's release reason or the planning error,
    /// without step numbers).
    pub failures: BTreeMap<String, u64>,
    /// The first full message of each failure cause.
    pub failure_examples: BTreeMap<String, String>,
    /// Client writes and trims the primary accepted.
    pub writes: u64,
    /// Writes refused because the WAL was full.
    pub wal_full: u64,
    /// Syncs that committed something new.
    pub commits: u64,
    /// Syncs refused because no replica was in sync.
    pub commits_refused: u64,
    /// Replicas demoted by the replication stream.
    pub demotions: u64,
    /// Stale operations whose effect was checked.
    pub stale_checks: u64,
    /// Executor steps observed through the step hook.
    pub recovery_steps: u64,
    /// Events injected inside a running recovery.
    pub interleaved: u64,
    /// Invariant checks run.
    pub checks: u64,
    /// The committed LSN at the end.
    pub committed: u64,
    /// Epoch at the end.
    pub epoch: u64,
}

impl Stats {
    /// Adds another run's counts.
    pub fn merge(&mut self, o: &Stats) {
        self.steps += o.steps;
        for (k, v) in &o.ops {
            *self.ops.entry(k).or_default() += v;
        }
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        for (k, v) in &o.recoveries {
            *self.recoveries.entry(k).or_default() += v;
        }
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.failure_examples {
            self.failure_examples
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        self.writes += o.writes;
        self.wal_full += o.wal_full;
        self.commits += o.commits;
        self.commits_refused += o.commits_refused;
        self.demotions += o.demotions;
        self.stale_checks += o.stale_checks;
        self.recovery_steps += o.recovery_steps;
        self.interleaved += o.interleaved;
        self.checks += o.checks;
        self.committed += o.committed;
        self.epoch = self.epoch.max(o.epoch);
    }

    /// Total faults injected.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// The result of one seed.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The faulty steps asked for (for the rerun command).
    pub steps: u64,
    /// What the seed chose (replicas, WAL size, retention, fault weights).
    pub config: String,
    /// Counts.
    pub stats: Stats,
    /// Violations found (the run stops at the first).
    pub violations: Vec<Violation>,
    /// The last events before the end of the run.
    pub trace: Vec<String>,
}

impl SimReport {
    /// True when no invariant was violated.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this seed.
    pub fn rerun_command(&self) -> String {
        format!(
            "cargo xtask sim --seed {} --steps {}",
            self.seed, self.steps
        )
    }

    /// The first violation of `invariant`, if any.
    pub fn violation_of(&self, invariant: Invariant) -> Option<&Violation> {
        self.violations.iter().find(|v| v.invariant == invariant)
    }
}

/// An operation of the simulated world. The random schedule draws these; tests script them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Clients write (or trim) `count` times on the primary.
    Write {
        /// How many writes.
        count: u32,
    },
    /// A client sync: primary durable, one replication round, commit.
    Commit,
    /// Flush a server's volume (checkpoint; the tail follows the retention policy).
    Flush {
        /// The server.
        server: String,
    },
    /// The master re-sends the current assignments (replicas first, then the primary).
    Reassign,
    /// The master sends `server` a rebuilding assignment.
    Rebuild {
        /// The replica server.
        server: String,
    },
    /// A replica server crashes (its unsynced bytes dropped or torn) and restarts.
    CrashReplica {
        /// The server.
        server: String,
    },
    /// The primary crashes and restarts; then the master either re-sends its assignments at
    /// the same epoch or fails over.
    CrashPrimary {
        /// Fail over instead of restarting in place.
        failover: bool,
    },
    /// An address becomes unreachable.
    Disconnect {
        /// The address.
        addr: String,
    },
    /// An address becomes reachable again.
    Reconnect {
        /// The address.
        addr: String,
    },
    /// A replica server restarts on a new data address; the master bumps the address version
    /// but only tells the primary at its next assignment.
    MoveAddress {
        /// The server.
        server: String,
    },
    /// The master bumps the epoch and tells the primary and some of the replicas.
    EpochBump,
    /// The master fails over to a replica holding the committed prefix.
    Failover {
        /// The replica to promote (`None`: a holder chosen by the seed).
        to: Option<String>,
        /// Writes the old primary accepts before it is fenced.
        zombie_writes: u32,
        /// Replicas the old primary ships those writes to (without committing).
        zombie_ship: Vec<String>,
        /// Whether the old primary also crashes.
        crash_old: bool,
    },
    /// The next primary pin of this kind fails.
    FailPin {
        /// The pin kind.
        kind: engine::PinKind,
    },
    /// The primary's retention drops to nothing and it flushes: history behind the
    /// checkpoint is recycled unless a pin holds it.
    RetentionPressure,
    /// The master re-delivers the assignment at `index` of its history (late or duplicated).
    LateAssignment {
        /// Index into the history (taken modulo its length).
        index: usize,
    },
    /// A request from a stale lineage reaches a replica.
    StaleMessage {
        /// The replica server.
        server: String,
        /// Which request.
        kind: StaleKind,
    },
    /// Engine calls with a session that is no longer current, and a stale intent.
    StaleSession,
    /// Client writes stamped with an old epoch.
    StaleWrite,
    /// A replication round cut short: the primary ships its uncommitted entries to these
    /// replicas (those it holds in sync) and commits nothing.
    ShipUncommitted {
        /// The replicas.
        to: Vec<String>,
    },
    /// One step of the healed phase: the master reconciles and clients keep writing.
    Heal,
}

impl Op {
    /// The operation's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Commit => "commit",
            Op::Flush { .. } => "flush",
            Op::Reassign => "reassign",
            Op::Rebuild { .. } => "rebuild_assignment",
            Op::CrashReplica { .. } => "crash_replica",
            Op::CrashPrimary { .. } => "crash_primary",
            Op::Disconnect { .. } => "disconnect",
            Op::Reconnect { .. } => "reconnect",
            Op::MoveAddress { .. } => "address_change",
            Op::EpochBump => "epoch_bump",
            Op::Failover { .. } => "failover",
            Op::FailPin { .. } => "pin_failure",
            Op::RetentionPressure => "retention_pressure",
            Op::LateAssignment { .. } => "late_assignment",
            Op::StaleMessage { .. } => "stale_message",
            Op::StaleSession => "stale_session",
            Op::StaleWrite => "stale_write",
            Op::ShipUncommitted { .. } => "partial_replication",
            Op::Heal => "heal",
        }
    }

    /// Whether the operation is a fault (counted under faults).
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            Op::Write { .. }
                | Op::Commit
                | Op::Flush { .. }
                | Op::Reassign
                | Op::Rebuild { .. }
                | Op::Reconnect { .. }
                | Op::Heal
        )
    }
}
