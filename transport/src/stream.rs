//! The live replication stream of one primary volume, with durability modes.
//!
//! A [`Replicator`] runs one shipper thread per replica. A shipper connects, joins through the
//! engine (the replica's handshake is planned like any recovery: a zero gap joins at once, a
//! catch-up or truncation runs over the same connection, a replica the primary's WAL cannot
//! bring back is rebuilt from an image), and then streams: every WAL entry after the replica's
//! tip, in order, in batches, each batch anchored on the entry before it so the replica refuses
//! a gap, a duplicate or a divergent history. Writers never wait for a shipper. A
//! [`Replicator::flush`] syncs the primary, asks the shippers for a barrier (one barrier covers
//! every flush that arrived before it: group commit), and returns only when the volume's
//! [`DurabilityMode`] is satisfied; then it raises the primary's committed point to what the
//! mode proved. A replica that fails (connection, refusal, timeout) leaves the stream, is marked
//! degraded, and its shipper joins again through the engine after a backoff, while writes go
//! on; it counts for durability again from its first barrier after it rejoins.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockvol::{EntryInfo, Lsn, Volume};
use engine::{
    AssignmentIntent, CatchUpExecutor, Endpoint, Epoch, ExecutorOptions, PlanStep, RebuildExecutor,
    RecoveryDriver, ReplicaAssignment, ReplicaId, SessionKind,
};
use v2bridge::convert::{handshake, to_blockvol, to_engine};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BlockVolStorage, BridgeIo, Lineage,
    ReplicaTarget,
};

use crate::net::{ClientConfig, RemoteReplica};

/// What a flush must prove before it returns (the master's `durability_mode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DurabilityMode {
    /// The primary's own WAL is synced; replicas follow when they can.
    BestEffort,
    /// Every replica of the volume holds the entries durably; one that cannot fails the flush.
    SyncAll,
    /// The primary plus enough replicas for a majority of the replication factor
    /// (RF = replicas + 1; quorum = RF / 2 + 1).
    SyncQuorum,
}

impl DurabilityMode {
    /// Replicas that must be durable, besides the primary, out of `replicas`.
    pub fn replicas_required(self, replicas: usize) -> usize {
        match self {
            DurabilityMode::BestEffort => 0,
            DurabilityMode::SyncAll => replicas,
            // quorum - 1 = (replicas + 1) / 2 + 1 - 1.
            DurabilityMode::SyncQuorum => replicas.div_ceil(2),
        }
    }

    /// The master's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            DurabilityMode::BestEffort => "best_effort",
            DurabilityMode::SyncAll => "sync_all",
            DurabilityMode::SyncQuorum => "sync_quorum",
        }
    }
}

/// One replica of the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// Its stable replica ID (`<volume>/<server id>`).
    pub id: String,
    /// Its replica server.
    pub addr: SocketAddr,
    /// The volume's name on that server.
    pub volume: String,
}

/// How the stream runs.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// The durability mode.
    pub mode: DurabilityMode,
    /// The primary's server ID (the lineage's driver).
    pub driver: String,
    /// The primary's epoch.
    pub epoch: u64,
    /// How to connect to replicas.
    pub client: ClientConfig,
    /// Most entries in one batch.
    pub max_batch_entries: u32,
    /// Most encoded bytes in one batch.
    pub max_batch_bytes: usize,
    /// Entries a replica may hold beyond its last barrier before the stream asks for one
    /// unasked (and the primary's committed point moves to what the mode then proves): the
    /// replicas' flushers are gated at the committed point, so without it a writer that does
    /// not flush fills their WALs with entries nobody commits.
    pub barrier_window: u64,
    /// Longest a flush waits for its replicas.
    pub flush_timeout: Duration,
    /// Wait before a failed replica is joined again (doubles up to `max_backoff`).
    pub min_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Options of the recoveries a join runs.
    pub recovery: ExecutorOptions,
    /// How long an image a failed rebuild let go of stays pinned, so the next attempt can
    /// pin the same image and the replica resumes its install where it stopped (zero: not
    /// kept). The primary's flusher stays fenced at that image meanwhile, so its WAL grows.
    pub image_linger: Duration,
    /// Whether the primary holds its lease (none: always). Without it no join starts and a
    /// running one is cancelled at its next step: the master may have promoted another server
    /// meanwhile, and the replica be its copy, which a truncation or a rebuild from here would
    /// destroy. Shipping entries goes on: the replicas' lineage fencing refuses them once
    /// they know the newer epoch.
    pub lease: Option<LeaseGate>,
}

/// Tells the stream whether its primary holds its lease (see [`StreamConfig::lease`]).
#[derive(Clone)]
pub struct LeaseGate(Arc<dyn Fn() -> bool + Send + Sync>);

impl LeaseGate {
    /// A gate asking `held`.
    pub fn new(held: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        LeaseGate(Arc::new(held))
    }

    /// Whether the lease is held now.
    pub fn held(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for LeaseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LeaseGate").field(&self.held()).finish()
    }
}

impl StreamConfig {
    /// A configuration for `mode`, driven by server `driver` at `epoch`.
    pub fn new(mode: DurabilityMode, driver: &str, epoch: u64) -> Self {
        StreamConfig {
            mode,
            driver: driver.to_owned(),
            epoch,
            client: ClientConfig {
                node: driver.to_owned(),
                ..ClientConfig::default()
            },
            max_batch_entries: 256,
            max_batch_bytes: 4 << 20,
            barrier_window: 4096,
            flush_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
            recovery: ExecutorOptions::default(),
            image_linger: Duration::from_secs(30),
            lease: None,
        }
    }
}

/// Where a replica stands in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Connecting or joining through the engine.
    Joining,
    /// Receiving the stream.
    Streaming,
    /// Out of the stream after a failure; joined again after a backoff.
    Degraded(String),
}

/// One replica's view, as [`Replicator::status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The replica ID.
    pub id: String,
    /// Its state.
    pub state: StreamState,
    /// The last entry it acknowledged applying.
    pub shipped: Lsn,
    /// The last entry it reported durable (from a barrier since it last joined).
    pub durable: Lsn,
    /// Times it joined (the first join included).
    pub joins: u64,
    /// Joins that moved data through the engine (catch-up, truncation or rebuild).
    pub recoveries: u64,
    /// Entries it reported as duplicates while streaming (must stay 0: the stream resumes at
    /// exactly the next entry).
    pub duplicates: u64,
    /// Entries shipped by the stream (not by joins).
    pub streamed: u64,
    /// Apply batches sent by the stream.
    pub batches: u64,
    /// Barriers answered (each may cover many flushes: group commit).
    pub barriers: u64,
    /// Time spent waiting for barrier replies, in microseconds.
    pub barrier_micros: u64,
    /// Time spent waiting for apply replies, in microseconds.
    pub apply_micros: u64,
    /// Image data bytes rebuilds sent it (all attempts).
    pub base_bytes_sent: u64,
    /// Image bytes rebuilds did not send because it resumed an interrupted install.
    pub base_bytes_resumed: u64,
    /// Recoveries completed by path (counted when the executor finishes, even if the join
    /// then fails): caught up from the primary's WAL.
    pub catch_ups: u64,
    /// A divergent tail truncated (and caught up).
    pub truncations: u64,
    /// Rebuilt from an image (and its tail).
    pub rebuilds: u64,
    /// The path of the last join that completed: `in_sync`, `prefix` (ahead of committed on
    /// the primary's own log), `catch_up`, `truncate` or `rebuild`; empty before the first.
    pub last_path: &'static str,
    /// The recovery running now, if one is.
    pub recovery: Option<RecoveryProgress>,
}

/// How far a running recovery is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryProgress {
    /// `catch_up`, `truncate` or `rebuild`.
    pub path: &'static str,
    /// Time since it started.
    pub elapsed: Duration,
    /// Entries applied so far.
    pub entries_done: u64,
    /// Entries it has to apply (a catch-up's gap to the committed point when it was planned;
    /// 0 for a rebuild, whose tail is known only after its image).
    pub entries_total: u64,
    /// Image bytes the replica holds so far.
    pub base_bytes_done: u64,
    /// The image's size (0 for a catch-up).
    pub base_bytes_total: u64,
}

impl RecoveryProgress {
    /// Done, as a fraction in [0, 1]: by image bytes for a rebuild, by entries for a
    /// catch-up; `None` when there is nothing to measure yet.
    pub fn fraction(&self) -> Option<f64> {
        let (done, total) = if self.base_bytes_total > 0 {
            (self.base_bytes_done, self.base_bytes_total)
        } else {
            (self.entries_done, self.entries_total)
        };
        (total > 0).then(|| (done.min(total) as f64 / total as f64).clamp(0.0, 1.0))
    }

    /// Time left at the rate so far; `None` before anything moved.
    pub fn eta(&self) -> Option<Duration> {
        let f = self.fraction()?;
        if f <= 0.0 {
            return None;
        }
        Some(self.elapsed.mul_f64((1.0 - f) / f))
    }
}

impl std::fmt::Display for RecoveryProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.base_bytes_total > 0 {
            write!(
                f,
                "{} {:.1}/{:.1} MiB",
                self.path,
                self.base_bytes_done as f64 / 1048576.0,
                self.base_bytes_total as f64 / 1048576.0
            )?;
        } else {
            write!(
                f,
                "{} {}/{} entries",
                self.path, self.entries_done, self.entries_total
            )?;
        }
        if let Some(frac) = self.fraction() {
            write!(f, " ({:.0}%)", frac * 100.0)?;
        }
        match self.eta() {
            Some(eta) => write!(f, ", ETA {:.1} s", eta.as_secs_f64()),
            None => write!(f, ", ETA unknown"),
        }
    }
}

/// Why a flush did not return an acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The primary's own sync failed.
    #[error("primary sync: {0}")]
    Primary(String),
    /// The mode needs replicas that are out of the stream.
    #[error("{mode}: {needed} replica(s) must be durable at {lsn}, {available} can be ({detail})")]
    ReplicasUnavailable {
        /// The mode.
        mode: &'static str,
        /// The flush's LSN.
        lsn: Lsn,
        /// Replicas required.
        needed: usize,
        /// Replicas in the stream.
        available: usize,
        /// Which are out, and why.
        detail: String,
    },
    /// The replicas did not report durability in time.
    #[error("{mode}: {durable} of {needed} required replica(s) durable at {lsn} after {waited:?}")]
    Timeout {
        /// The mode.
        mode: &'static str,
        /// The flush's LSN.
        lsn: Lsn,
        /// Replicas required.
        needed: usize,
        /// Replicas durable.
        durable: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The replicator is stopped.
    #[error("the replicator is stopped")]
    Stopped,
}

struct Slot {
    spec: ReplicaSpec,
    status: ReplicaStatus,
    /// The recovery running now: its path, start, counters and entries to apply.
    live: Option<Live>,
}

struct Live {
    path: &'static str,
    started: Instant,
    counters: Arc<v2bridge::Progress>,
    entries_total: u64,
}

impl Live {
    fn progress(&self) -> RecoveryProgress {
        let c = self.counters.snapshot();
        RecoveryProgress {
            path: self.path,
            elapsed: self.started.elapsed(),
            entries_done: c.entries,
            entries_total: self.entries_total,
            base_bytes_done: c.base_done,
            base_bytes_total: c.base_total,
        }
    }
}

struct State {
    slots: Vec<Slot>,
    /// The highest LSN a flush is waiting for.
    flush_want: Lsn,
    stop: bool,
}

struct Shared {
    /// The lineage driver of this run: the server ID and a random nonce, so a restarted
    /// replicator (whose session IDs start at 1 again) is neither fenced by nor confused with
    /// an earlier run at the same epoch.
    run_driver: String,
    primary: Arc<Volume>,
    storage: Arc<BlockVolStorage>,
    driver: RecoveryDriver,
    config: StreamConfig,
    state: Mutex<State>,
    /// Shippers wait here for entries, flush requests or stop.
    work: Condvar,
    /// Flushers wait here for durability.
    acks: Condvar,
    /// Images failed rebuilds let go of, until `image_linger` ends or a rebuild is planned.
    kept: crate::net::Reaper,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut ReplicaStatus)) {
        let mut st = self.lock();
        f(&mut st.slots[i].status);
        drop(st);
        self.acks.notify_all();
    }

    fn stopped(&self) -> bool {
        self.lock().stop
    }
}

/// The live stream of one primary volume to its replicas.
pub struct Replicator {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("mode", &self.shared.config.mode)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Starts streaming `primary` to `replicas`.
    pub fn start(
        primary: Arc<Volume>,
        replicas: Vec<ReplicaSpec>,
        config: StreamConfig,
    ) -> std::io::Result<Replicator> {
        restore_committed(&primary);
        let storage = Arc::new(BlockVolStorage::new(Arc::clone(&primary)));
        let kept = crate::net::Reaper::start("replicator-images")?;
        let slots = replicas
            .into_iter()
            .map(|spec| Slot {
                status: ReplicaStatus {
                    id: spec.id.clone(),
                    state: StreamState::Joining,
                    shipped: Lsn(0),
                    durable: Lsn(0),
                    joins: 0,
                    recoveries: 0,
                    duplicates: 0,
                    streamed: 0,
                    batches: 0,
                    barriers: 0,
                    barrier_micros: 0,
                    apply_micros: 0,
                    base_bytes_sent: 0,
                    base_bytes_resumed: 0,
                    catch_ups: 0,
                    truncations: 0,
                    rebuilds: 0,
                    last_path: "",
                    recovery: None,
                },
                spec,
                live: None,
            })
            .collect::<Vec<_>>();
        let n = slots.len();
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            run_driver: format!("{}#{:016x}", config.driver, u64::from_le_bytes(nonce)),
            driver: RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn engine::StorageAdapter>),
            storage,
            primary,
            config,
            state: Mutex::new(State {
                slots,
                flush_want: Lsn(0),
                stop: false,
            }),
            work: Condvar::new(),
            acks: Condvar::new(),
            kept,
        });
        if !shared.config.image_linger.is_zero() {
            // Weak: the keeper lives in the storage the shared state owns.
            let weak = Arc::downgrade(&shared);
            shared.storage.set_image_keeper(Some(Arc::new(move |pin| {
                if let Some(sh) = weak.upgrade() {
                    log::info!("keeping the image at {} for a resumed rebuild", pin.lsn());
                    sh.kept
                        .hold(Instant::now() + sh.config.image_linger, Box::new(pin));
                }
            })));
        }
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("shipper-{i}"))
                    .spawn(move || ship(&s, i))?,
            );
        }
        Ok(Replicator {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Tells the shippers that new entries are in the primary's WAL (call after writes; a
    /// flush does it too).
    pub fn notify(&self) {
        // Taking the lock orders this wake-up after a shipper that just found no new entries
        // has started waiting (it checks the primary's head under this lock), so it is not
        // lost.
        drop(self.shared.lock());
        self.shared.work.notify_all();
    }

    /// Makes everything written so far durable as the mode requires; returns the LSN it
    /// covers. Never returns `Ok` for an LSN the mode does not back.
    pub fn flush(&self) -> Result<Lsn, FlushError> {
        let sh = &self.shared;
        // Every write that completed before this call is at or below the head now. The
        // shippers are asked for barriers at it first, so the replicas' syncs run while the
        // primary syncs its own WAL, not after.
        let lsn = sh.primary.status().head;
        let mode = sh.config.mode;
        {
            let mut st = sh.lock();
            if st.stop {
                return Err(FlushError::Stopped);
            }
            if st.flush_want < lsn {
                st.flush_want = lsn;
            }
        }
        sh.work.notify_all();
        let synced = sh
            .primary
            .sync()
            .map_err(|e| FlushError::Primary(e.to_string()))?;
        if synced < lsn {
            return Err(FlushError::Primary(format!(
                "synced to {synced}, below the head {lsn} it had to cover"
            )));
        }
        let mut st = sh.lock();
        let start = Instant::now();
        let committed = loop {
            let slots: Vec<(&StreamState, Lsn)> = st
                .slots
                .iter()
                .map(|s| (&s.status.state, s.status.durable))
                .collect();
            let (durable, needed) = match verdict(mode, &slots, lsn) {
                Verdict::Met { committed, .. } => break committed,
                Verdict::Unavailable { needed, available } => {
                    // Which are out, and why.
                    let out: Vec<String> = st
                        .slots
                        .iter()
                        .filter_map(|s| match &s.status.state {
                            StreamState::Degraded(why) => Some(format!("{}: {why}", s.spec.id)),
                            _ => None,
                        })
                        .collect();
                    return Err(FlushError::ReplicasUnavailable {
                        mode: mode.as_str(),
                        lsn,
                        needed,
                        available,
                        detail: out.join("; "),
                    });
                }
                Verdict::Wait { durable, needed } => (durable, needed),
            };
            let waited = start.elapsed();
            if waited >= sh.config.flush_timeout || st.stop {
                return Err(FlushError::Timeout {
                    mode: mode.as_str(),
                    lsn,
                    needed,
                    durable,
                    waited,
                });
            }
            let left = sh.config.flush_timeout - waited;
            st = sh
                .acks
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        drop(st);
        if committed > sh.primary.status().committed {
            sh.primary.set_committed(committed);
        }
        Ok(lsn)
    }

    /// Every replica's state, with the progress of the recoveries running now.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.shared
            .lock()
            .slots
            .iter()
            .map(|s| {
                let mut st = s.status.clone();
                st.recovery = s.live.as_ref().map(Live::progress);
                st
            })
            .collect()
    }

    /// The engine driver the joins run through (its log explains every join).
    pub fn driver(&self) -> &RecoveryDriver {
        &self.shared.driver
    }

    /// Stops the shippers and waits for them (a flush waiting meanwhile fails with
    /// `Stopped`). Shared callers may stop it through `&self`.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        self.shared.acks.notify_all();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        // Images kept for a resumed rebuild are of no use to a stopped replicator: release them
        // now, not when the last handle on it goes (a demoted primary must hold no pins).
        self.shared.kept.release_all();
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A shipper: join, stream, and on failure back off and join again.
fn ship(sh: &Shared, i: usize) {
    let mut backoff = sh.config.min_backoff;
    while !sh.stopped() {
        if let Some(gate) = &sh.config.lease
            && !gate.held()
        {
            sh.update(i, |s| {
                s.state = StreamState::Degraded("the primary holds no lease: joins wait".into());
            });
            let st = sh.lock();
            let _ = sh.work.wait_timeout_while(st, backoff, |st| !st.stop);
            backoff = (backoff * 2).min(sh.config.max_backoff);
            continue;
        }
        sh.update(i, |s| s.state = StreamState::Joining);
        let result = join(sh, i).and_then(|link| {
            backoff = sh.config.min_backoff;
            stream(sh, i, link)
        });
        let Err(why) = result else {
            return;
        };
        if sh.stopped() {
            return;
        }
        log::warn!(
            "replica {} left the stream: {why}",
            sh.lock().slots[i].spec.id
        );
        sh.update(i, |s| s.state = StreamState::Degraded(why));
        // Back off, waking early only to stop.
        let st = sh.lock();
        let _ = sh.work.wait_timeout_while(st, backoff, |st| !st.stop);
        backoff = (backoff * 2).min(sh.config.max_backoff);
    }
}

fn replica_id(spec: &ReplicaSpec) -> Result<ReplicaId, String> {
    ReplicaId::new(&spec.id).map_err(|e| e.to_string())
}

// ---- the stream's protocol, driven by a caller -------------------------------------------------
//
// The pieces below are everything the stream decides: how a replica joins (through the
// engine), what a batch is and how its reply is checked, what a barrier asks and proves, and
// when a flush may be acknowledged. The `Replicator` drives them from its shipper threads over
// TCP; the deterministic simulator (`swblock::sim::stream`) drives the very same functions
// from its event loop over simulated connections carrying the real codec's frames.

/// Raises a primary's committed point to its durable head when its stream starts.
///
/// blockvol does not persist the committed point: a volume opens with it at its checkpoint,
/// and a replica promoted to primary has whatever its last primary told it. Everything at or
/// below the durable head is this primary's own history from now on, and flushes before a
/// restart may have acknowledged all of it. Left lower, a join plans the replicas against the
/// lower point and truncates (or, when the truncation reaches into a replica's extent,
/// rebuilds) acknowledged entries off a replica that holds them, leaving fewer copies than the
/// mode promised. Found by the network simulator (D52).
pub fn restore_committed(primary: &Volume) {
    let st = primary.status();
    if st.durable > st.committed {
        primary.set_committed(st.durable);
    }
}

/// What a join needs of the primary side.
pub struct JoinCtx<'a> {
    /// The primary's volume.
    pub primary: &'a Arc<Volume>,
    /// Its storage adapter (the driver's).
    pub storage: &'a Arc<BlockVolStorage>,
    /// The engine driver the join plans through.
    pub driver: &'a RecoveryDriver,
    /// The lineage driver of this run of the stream.
    pub run_driver: &'a str,
    /// The primary's epoch.
    pub epoch: u64,
    /// Options of the recoveries a join runs.
    pub recovery: ExecutorOptions,
    /// Every replica of the volume (an assignment names them all).
    pub replicas: &'a [ReplicaSpec],
}

/// What a join tells its caller as it goes (every method has a default that does nothing).
pub trait JoinHooks {
    /// Between two steps of a recovery (a caller that stops cancels the session here).
    fn on_step(&self, _replica: &ReplicaId, _step: &engine::StepInfo) {}
    /// A recovery starts on `path` with `entries_total` entries to apply; the counters it
    /// should report progress into, if any.
    fn started(&self, _path: &'static str, _entries_total: u64) -> Option<Arc<v2bridge::Progress>> {
        None
    }
    /// A recovery on `path` finished.
    fn recovered(&self, _path: &'static str) {}
    /// A rebuild is planned (its plan holds its own image) or finished.
    fn rebuild_planned(&self) {}
    /// A rebuild ended (well or not) having sent and skipped these image bytes.
    fn rebuild_bytes(&self, _sent: u64, _resumed: u64) {}
}

/// Hooks that do nothing.
pub struct NoHooks;

impl JoinHooks for NoHooks {}

/// The assignment that names every replica of the volume, asking for `kind` on replica `i`.
fn assign_replica(ctx: &JoinCtx<'_>, i: usize, kind: SessionKind) -> Result<(), String> {
    let mut replicas = Vec::with_capacity(ctx.replicas.len());
    for spec in ctx.replicas {
        let addr = spec.addr.to_string();
        replicas.push(ReplicaAssignment {
            replica_id: replica_id(spec)?,
            endpoint: Endpoint::new(&addr, &addr, 1),
        });
    }
    let spec = ctx
        .replicas
        .get(i)
        .ok_or_else(|| format!("no replica {i}"))?;
    let intent = AssignmentIntent {
        replicas,
        epoch: Epoch(ctx.epoch),
        recovery_targets: [(replica_id(spec)?, kind)].into(),
        catch_up_budget: None,
    };
    let res = ctx
        .driver
        .orchestrator()
        .process_assignment(&intent)
        .map_err(|e| format!("assignment: {e}"))?;
    if let Some((_, e)) = res.refused.first() {
        return Err(format!("assignment refused: {e}"));
    }
    Ok(())
}

/// A replica that joined: the link to stream on, and the path its join took (`in_sync`,
/// `prefix`, `catch_up`, `truncate` or `rebuild`).
pub struct Joined<T> {
    /// The link.
    pub link: Link<T>,
    /// The join's path.
    pub path: &'static str,
}

/// Brings replica `i` over `conn` to a point the stream can continue from, through the
/// engine: a zero gap joins at once, a gap the primary's WAL covers is caught up, a divergent
/// tail is truncated, anything else is rebuilt from an image. Then checks where the replica
/// stands against the primary and returns the link to stream on.
pub fn join_replica<T: ReplicaTarget>(
    ctx: &JoinCtx<'_>,
    i: usize,
    conn: T,
    hooks: &dyn JoinHooks,
) -> Result<Joined<T>, String> {
    let spec = ctx
        .replicas
        .get(i)
        .ok_or_else(|| format!("no replica {i}"))?;
    let id = replica_id(spec)?;
    let mut conn = conn;
    assign_replica(ctx, i, SessionKind::CatchUp)?;
    let hs = conn.handshake().map_err(|e| format!("handshake: {e}"))?;
    let plan = ctx
        .driver
        .plan_recovery(&id, handshake(&hs))
        .map_err(|e| format!("plan: {e}"))?;
    let sid = plan.session_id().ok_or("plan without a session")?.get();
    let lineage = |sid: u64| Lineage::new(ctx.run_driver, blockvol::Epoch(ctx.epoch), sid);
    let on_step = |step: &engine::StepInfo| hooks.on_step(&id, step);
    let committed = to_engine(ctx.primary.status().committed);
    // A replica ahead of the committed point whose tip is the primary's own entry holds a
    // prefix of the primary's log (every run it applied was anchored on the primary's entry
    // before it): nothing of it needs truncating, and the stream continues from its tip. This
    // matters after a primary restart, whose committed point restarts at its checkpoint: the
    // engine's plan would truncate entries that flushes acknowledged under sync_all.
    let verified_prefix = matches!(plan.step(), PlanStep::Truncate(_))
        && hs.head <= ctx.primary.status().head
        && ctx.primary.entry_info(hs.head).is_ok_and(|e| e == hs.tip);
    if verified_prefix {
        log::info!(
            "replica {} is ahead of committed {committed} on the primary's own log (tip {}): \
             no truncation",
            spec.id,
            hs.head
        );
        ctx.driver
            .cancel_plan(plan, "replica holds a prefix of the primary's log");
        return Link::open(ctx.primary, conn, lineage(sid), Lsn(0)).map(|link| Joined {
            link,
            path: "prefix",
        });
    }
    // A catch-up or truncation whose failure only an image can repair (a truncation below the
    // replica's checkpoint, a log that diverged below the truncation point, entries the
    // primary no longer holds) goes on to the rebuild in the same join: the engine's verdict
    // would otherwise be lost, since every join starts with a catch-up assignment.
    let conn = match plan.step() {
        PlanStep::InSync => {
            return Link::open(ctx.primary, conn, lineage(sid), Lsn(0)).map(|link| Joined {
                link,
                path: "in_sync",
            });
        }
        step @ (PlanStep::CatchUp(_) | PlanStep::Truncate(_)) => {
            let path = if matches!(step, PlanStep::Truncate(_)) {
                "truncate"
            } else {
                "catch_up"
            };
            let mut io = BridgeIo::new(Arc::clone(ctx.storage), conn, lineage(sid), committed);
            if let Some(c) = hooks.started(path, committed.0.saturating_sub(hs.head.0)) {
                io = io.with_progress(c);
            }
            let done = CatchUpExecutor::new(ctx.driver, plan)
                .with_options(ctx.recovery)
                .with_on_step(on_step)
                .execute(&mut io);
            match done {
                Ok(_) => {
                    hooks.recovered(path);
                    return Link::open(
                        ctx.primary,
                        io.into_target(),
                        lineage(sid),
                        to_blockvol(committed),
                    )
                    .map(|link| Joined { link, path });
                }
                Err(engine::EngineError::ExecutionFailed { failure, .. })
                    if failure.requires_rebuild() =>
                {
                    log::warn!(
                        "replica {}: {path} failed ({failure}): rebuilding it from an image",
                        spec.id
                    );
                    io.into_target()
                }
                Err(e) => return Err(format!("{path}: {e}")),
            }
        }
        PlanStep::NeedsRebuild | PlanStep::Rebuild(_) => {
            drop(plan);
            conn
        }
    };
    assign_replica(ctx, i, SessionKind::Rebuild)?;
    let plan = ctx
        .driver
        .plan_rebuild(&id)
        .map_err(|e| format!("plan rebuild: {e}"))?;
    hooks.rebuild_planned();
    let sid = plan.session_id().ok_or("rebuild without a session")?.get();
    let mut io = BridgeIo::new(Arc::clone(ctx.storage), conn, lineage(sid), committed);
    if let Some(c) = hooks.started("rebuild", 0) {
        io = io.with_progress(c);
    }
    let done = RebuildExecutor::new(ctx.driver, plan)
        .with_options(ctx.recovery)
        .with_on_step(on_step)
        .execute(&mut io);
    hooks.rebuild_bytes(io.stats.base_bytes_sent, io.stats.base_bytes_resumed);
    done.map_err(|e| format!("rebuild: {e}"))?;
    hooks.recovered("rebuild");
    hooks.rebuild_planned();
    let path = "rebuild";
    Link::open(
        ctx.primary,
        io.into_target(),
        lineage(sid),
        to_blockvol(committed),
    )
    .map(|link| Joined { link, path })
}

/// One replica in the stream: its connection, the lineage it streams under, the last entry it
/// applied (`tip`) and the last it reported durable. While the link exists, the primary's WAL
/// after the replica's durable point is kept (a slow replica holds the primary back instead of
/// falling out of its WAL and needing an image); dropping the link lets it go.
pub struct Link<T> {
    conn: T,
    lineage: Lineage,
    tip: EntryInfo,
    durable: Lsn,
    pin: blockvol::WalPin,
}

/// A batch ready to send: the request, and the last entry it carries.
pub struct Batch {
    /// The request.
    pub request: ApplyRequest,
    /// The last entry in it.
    pub last: EntryInfo,
}

impl<T: ReplicaTarget> Link<T> {
    /// After a join: checks where the replica stands against the primary (its handshake) and
    /// opens the link there. The stream continues from the replica's tip only if the primary
    /// holds that very entry: the first batch is anchored on the primary's own entry, and the
    /// durability credited is for a prefix of the primary's log.
    ///
    /// `proven` is what the join's recovery proved durable on the replica with a barrier (its
    /// target); `Lsn(0)` when no recovery ran. Beyond it, only the replica's checkpoint is
    /// known durable until a barrier of the stream proves more.
    pub fn open(
        primary: &Volume,
        conn: T,
        lineage: Lineage,
        proven: Lsn,
    ) -> Result<Link<T>, String> {
        let mut conn = conn;
        let hs = conn
            .handshake()
            .map_err(|e| format!("handshake after join: {e}"))?;
        if hs.install_incomplete {
            return Err("replica still incomplete after its join".into());
        }
        let primary_head = primary.status().head;
        if hs.head > primary_head {
            return Err(format!(
                "replica reports head {} beyond the primary's {primary_head} after its join",
                hs.head
            ));
        }
        let primary_tip = if hs.head.0 == 0 {
            EntryInfo::ORIGIN
        } else {
            primary
                .entry_info(hs.head)
                .map_err(|e| format!("primary entry at {}: {e}", hs.head))?
        };
        if primary_tip != hs.tip {
            return Err(format!(
                "replica tip {:?} differs from the primary's entry {primary_tip:?} after its join",
                hs.tip
            ));
        }
        // A handshake reports the replica's head, not what of it is synced: only its
        // checkpoint (in its extent) and what the join's own barrier proved are known durable
        // until a barrier of the stream proves more. Crediting the head after a join that ran
        // no recovery let a flush count a replica whose entries a crash could still take
        // (found by the network simulator, D52).
        // The WAL is kept from the replica's head: the stream ships what follows it.
        let durable = hs.checkpoint.max(proven).min(hs.head);
        let pin = primary
            .pin_wal(hs.head)
            .map_err(|e| format!("pin the WAL after {}: {e}", hs.head))?;
        Ok(Link {
            conn,
            lineage,
            tip: primary_tip,
            durable,
            pin,
        })
    }

    /// The connection.
    pub fn conn(&mut self) -> &mut T {
        &mut self.conn
    }

    /// The connection, to look at.
    pub fn connection(&self) -> &T {
        &self.conn
    }

    /// The lineage the link streams under.
    pub fn lineage(&self) -> Lineage {
        self.lineage
    }

    /// The last entry the replica applied.
    pub fn tip(&self) -> EntryInfo {
        self.tip
    }

    /// The last entry the replica reported durable.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// The next batch after the tip, of at most `max_entries` entries and about `max_bytes`
    /// (at least one entry); `None` when the replica has every entry. `frames` is a buffer
    /// the caller may reuse.
    pub fn next_batch(
        &self,
        primary: &Volume,
        max_entries: u32,
        max_bytes: usize,
        frames: &mut Vec<u8>,
    ) -> Result<Option<Batch>, String> {
        let tip = self.tip;
        let mut scan = primary
            .scan_from(Lsn(tip.lsn.0 + 1))
            .map_err(|e| format!("scan after {}: {e}", tip.lsn))?;
        frames.clear();
        let mut count = 0u32;
        let mut last = tip;
        while count < max_entries && frames.len() < max_bytes {
            let Some(item) = scan.next_encoded(frames) else {
                break;
            };
            let info = item.map_err(|e| format!("read entry after {}: {e}", last.lsn))?;
            if info.lsn.0 != last.lsn.0 + 1 {
                return Err(format!("primary WAL gap: {} after {}", info.lsn, last.lsn));
            }
            last = info;
            count += 1;
        }
        drop(scan);
        if count == 0 {
            return Ok(None);
        }
        Ok(Some(Batch {
            request: ApplyRequest {
                lineage: self.lineage,
                committed: primary.status().committed,
                anchor: tip,
                count,
                frames: std::mem::take(frames),
            },
            last,
        }))
    }

    /// The replica's reply to a batch ending at `last`: it must have applied exactly up to
    /// it. The tip moves there.
    pub fn applied(&mut self, last: EntryInfo, reply: &ApplyReply) -> Result<(), String> {
        if reply.applied_to != last.lsn {
            return Err(format!(
                "replica applied to {}, batch ended at {}",
                reply.applied_to, last.lsn
            ));
        }
        self.tip = last;
        Ok(())
    }

    /// The barrier that asks the replica to make everything up to the tip durable.
    pub fn barrier_request(&self, primary: &Volume) -> BarrierRequest {
        BarrierRequest {
            lineage: self.lineage,
            target: self.tip.lsn,
            expected_tip: Some(self.tip),
            committed: primary.status().committed,
        }
    }

    /// The replica's reply to the barrier `asked`: it must be durable at the barrier's target
    /// with the very entry the barrier named. The durable point moves there (and the WAL the
    /// primary keeps for it with it); returns it.
    pub fn barrier_done(
        &mut self,
        primary: &Volume,
        asked: &BarrierRequest,
        reply: &BarrierReply,
    ) -> Result<Lsn, String> {
        let want = asked.expected_tip.unwrap_or(self.tip);
        if reply.durable < asked.target || reply.tip != want {
            return Err(format!(
                "barrier at {}: replica durable at {} with tip {:?}, expected {want:?}",
                asked.target, reply.durable, reply.tip
            ));
        }
        // A barrier never moves the durable point past what the replica was sent.
        let durable = reply.durable.min(self.tip.lsn);
        if durable > self.durable {
            self.durable = durable;
        }
        if self.durable > self.pin.lsn() {
            self.pin = primary
                .pin_wal(self.durable)
                .map_err(|e| format!("pin the WAL after {}: {e}", self.durable))?;
        }
        Ok(self.durable)
    }

    /// Ships the next batch over the connection and waits for its reply; the reply, or `None`
    /// when there was nothing to ship.
    pub fn ship(
        &mut self,
        primary: &Volume,
        max_entries: u32,
        max_bytes: usize,
        frames: &mut Vec<u8>,
    ) -> Result<Option<ApplyReply>, String> {
        let Some(batch) = self.next_batch(primary, max_entries, max_bytes, frames)? else {
            return Ok(None);
        };
        let anchor = batch.request.anchor.lsn;
        let reply = self
            .conn
            .apply(batch.request)
            .map_err(|e| format!("apply after {anchor}: {e}"))?;
        self.applied(batch.last, &reply)?;
        Ok(Some(reply))
    }

    /// A barrier at the tip over the connection; the durable point it proved.
    pub fn barrier(&mut self, primary: &Volume) -> Result<Lsn, String> {
        let req = self.barrier_request(primary);
        let reply = self
            .conn
            .barrier(req)
            .map_err(|e| format!("barrier at {}: {e}", req.target))?;
        self.barrier_done(primary, &req, &reply)
    }
}

/// What a flush may answer now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The mode is met: acknowledge, and raise the primary's committed point to `committed`.
    Met {
        /// What the mode proved: the needed-th highest durable point of the streaming
        /// replicas (capped by the flush's LSN), or the flush's LSN for best effort.
        committed: Lsn,
        /// The replicas counted (indexes into the slots given).
        counted: Vec<usize>,
    },
    /// Not yet: `durable` of `needed` replicas are durable at the flush's LSN.
    Wait {
        /// Replicas durable at the LSN.
        durable: usize,
        /// Replicas required.
        needed: usize,
    },
    /// It cannot be met: fewer replicas than needed are out of the degraded state.
    Unavailable {
        /// Replicas required.
        needed: usize,
        /// Replicas not degraded.
        available: usize,
    },
}

/// Whether a flush at `lsn` under `mode` may be acknowledged, given every replica's state and
/// durable point. Only a streaming replica counts, and only for what its barriers proved.
pub fn verdict(mode: DurabilityMode, slots: &[(&StreamState, Lsn)], lsn: Lsn) -> Verdict {
    let needed = mode.replicas_required(slots.len());
    let counted: Vec<usize> = slots
        .iter()
        .enumerate()
        .filter(|(_, (st, d))| **st == StreamState::Streaming && *d >= lsn)
        .map(|(i, _)| i)
        .collect();
    if counted.len() >= needed {
        return Verdict::Met {
            committed: proven(mode, slots, lsn),
            counted,
        };
    }
    let available = slots
        .iter()
        .filter(|(st, _)| !matches!(st, StreamState::Degraded(_)))
        .count();
    if available < needed {
        return Verdict::Unavailable { needed, available };
    }
    Verdict::Wait {
        durable: counted.len(),
        needed,
    }
}

/// The point the mode proves durable now: the needed-th highest durable point of the streaming
/// replicas, capped by the primary's own durable point (`primary`), or the primary's for best
/// effort. A primary's committed point may be raised to it at any time, flush or not.
pub fn proven(mode: DurabilityMode, slots: &[(&StreamState, Lsn)], primary: Lsn) -> Lsn {
    let needed = mode.replicas_required(slots.len());
    if needed == 0 {
        return primary;
    }
    let mut d: Vec<Lsn> = slots
        .iter()
        .filter(|(st, _)| **st == StreamState::Streaming)
        .map(|(_, d)| *d)
        .collect();
    d.sort_unstable_by(|a, b| b.cmp(a));
    d.get(needed - 1).copied().unwrap_or(Lsn(0)).min(primary)
}

/// Whether a link should ask its replica for a barrier now: a flush waits for entries the
/// replica holds beyond its durable point and everything the flush covers (or everything
/// there is) is shipped, or the replica holds `window` entries beyond its last barrier.
pub fn barrier_due(tip: Lsn, durable: Lsn, flush_want: Lsn, head: Lsn, window: u64) -> bool {
    tip > durable
        && ((flush_want > durable && (tip >= flush_want || tip >= head))
            || tip.0 - durable.0 >= window)
}

// ---- the threaded shell ----------------------------------------------------------------------

/// The Replicator's join hooks: cancel on stop, progress, counters, kept images.
struct ShipperHooks<'a> {
    sh: &'a Shared,
    i: usize,
    spec_id: String,
    last_log: std::cell::Cell<Instant>,
}

impl JoinHooks for ShipperHooks<'_> {
    fn on_step(&self, replica: &ReplicaId, step: &engine::StepInfo) {
        // A replicator that stops cancels the join's session, so a long recovery ends at its
        // next step instead of holding `stop` up.
        if self.sh.stopped() {
            self.sh
                .driver
                .cancel_session(replica, step.session_id, "replicator stopped");
        } else if self.sh.config.lease.as_ref().is_some_and(|g| !g.held()) {
            self.sh
                .driver
                .cancel_session(replica, step.session_id, "the primary's lease ran out");
        }
        // It also logs a long recovery's progress, at most every `PROGRESS_LOG_EVERY`.
        if self.last_log.get().elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log.set(Instant::now());
            if let Some(p) = self.sh.lock().slots[self.i]
                .live
                .as_ref()
                .map(Live::progress)
            {
                log::info!("replica {}: {p}", self.spec_id);
            }
        }
    }

    fn started(&self, path: &'static str, entries_total: u64) -> Option<Arc<v2bridge::Progress>> {
        let counters = Arc::new(v2bridge::Progress::default());
        self.sh.lock().slots[self.i].live = Some(Live {
            path,
            started: Instant::now(),
            counters: Arc::clone(&counters),
            entries_total,
        });
        Some(counters)
    }

    fn recovered(&self, path: &'static str) {
        self.sh.update(self.i, |s| match path {
            "truncate" => s.truncations += 1,
            "rebuild" => s.rebuilds += 1,
            _ => s.catch_ups += 1,
        });
    }

    fn rebuild_planned(&self) {
        // The plan holds its own image now (the same one as a kept image when the primary
        // kept it in place), or the rebuild finished: kept images have done their work.
        self.sh.kept.release_all();
    }

    fn rebuild_bytes(&self, sent: u64, resumed: u64) {
        let mut st = self.sh.lock();
        let s = &mut st.slots[self.i].status;
        s.base_bytes_sent = s.base_bytes_sent.saturating_add(sent);
        s.base_bytes_resumed = s.base_bytes_resumed.saturating_add(resumed);
    }
}

/// Connects and joins replica `i` through the engine; returns its link.
fn join(sh: &Shared, i: usize) -> Result<Link<RemoteReplica>, String> {
    let specs: Vec<ReplicaSpec> = sh.lock().slots.iter().map(|s| s.spec.clone()).collect();
    let spec = specs[i].clone();
    let conn = RemoteReplica::connect(spec.addr, &spec.volume, &sh.config.client)
        .map_err(|e| e.to_string())?;
    let ctx = JoinCtx {
        primary: &sh.primary,
        storage: &sh.storage,
        driver: &sh.driver,
        run_driver: &sh.run_driver,
        epoch: sh.config.epoch,
        recovery: sh.config.recovery,
        replicas: &specs,
    };
    let hooks = ShipperHooks {
        sh,
        i,
        spec_id: spec.id.clone(),
        last_log: std::cell::Cell::new(Instant::now()),
    };
    // The recovery's live counters are cleared however the join ends.
    let _clear = ClearLive(sh, i);
    let Joined { link, path } = join_replica(&ctx, i, conn, &hooks)?;
    sh.update(i, |s| {
        s.state = StreamState::Streaming;
        s.shipped = link.tip().lsn;
        s.durable = link.durable();
        s.joins += 1;
        s.last_path = path;
        if matches!(path, "catch_up" | "truncate" | "rebuild") {
            s.recoveries += 1;
        }
    });
    Ok(link)
}

/// How often a long recovery logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Clears a slot's live recovery when a join ends, however it ends.
struct ClearLive<'a>(&'a Shared, usize);

impl Drop for ClearLive<'_> {
    fn drop(&mut self) {
        self.0.lock().slots[self.1].live = None;
    }
}

/// Streams entries after the link's tip and answers flushes with barriers until something
/// fails.
fn stream(sh: &Shared, i: usize, mut link: Link<RemoteReplica>) -> Result<(), String> {
    let mut frames = Vec::new();
    let cfg = &sh.config;
    // A replica that joined holding entries no barrier proved (an `in_sync` or `prefix`
    // join) is asked for one at once: its durable point is known without waiting for the next
    // flush.
    if link.tip().lsn > link.durable() {
        barrier(sh, i, &mut link)?;
    }
    loop {
        // Wait for entries to ship, a flush to answer, or stop. A replica left holding
        // entries no barrier proved when the stream goes quiet (writes with no flush after
        // them) is asked for one after half a second idle, so its durable point and the
        // committed point catch up without a flush (the nemesis saw convergence wait forever
        // on one such entry).
        let mut idle = false;
        let flush_want = {
            let mut st = sh.lock();
            loop {
                if st.stop {
                    return Ok(());
                }
                let head = sh.primary.status().head;
                let (tip, durable) = (link.tip().lsn, link.durable());
                if head > tip
                    || barrier_due(tip, durable, st.flush_want, head, cfg.barrier_window)
                    || (idle && tip > durable)
                {
                    break st.flush_want;
                }
                let (g, waited) = sh
                    .work
                    .wait_timeout(st, Duration::from_millis(500))
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
                idle = waited.timed_out();
            }
        };
        if sh.primary.status().head > link.tip().lsn {
            let asked = Instant::now();
            if let Some(reply) = link.ship(
                &sh.primary,
                cfg.max_batch_entries,
                cfg.max_batch_bytes,
                &mut frames,
            )? {
                let tip = link.tip().lsn;
                let took = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
                sh.update(i, |s| {
                    s.shipped = tip;
                    s.streamed = s.streamed.saturating_add(reply.applied);
                    s.duplicates = s.duplicates.saturating_add(reply.duplicates);
                    s.batches += 1;
                    s.apply_micros = s.apply_micros.saturating_add(took);
                });
            }
        }
        // A barrier once everything a waiting flush covers is shipped (or everything there
        // is): one barrier answers every flush that arrived before it. Also one unasked every
        // `barrier_window` entries, after which the committed point moves to what the mode
        // proves, so the replicas' flushers can make room.
        let head = sh.primary.status().head;
        let tip = link.tip().lsn;
        if barrier_due(tip, link.durable(), flush_want, head, cfg.barrier_window)
            || (idle && tip >= head && tip > link.durable())
        {
            barrier(sh, i, &mut link)?;
        }
    }
}

/// A barrier at the link's tip: the replica's durable point, and the primary's committed
/// point to what the mode then proves.
fn barrier(sh: &Shared, i: usize, link: &mut Link<RemoteReplica>) -> Result<(), String> {
    let asked = Instant::now();
    let durable = link.barrier(&sh.primary)?;
    let waited = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut st = sh.lock();
    {
        let s = &mut st.slots[i].status;
        s.durable = durable;
        s.barriers += 1;
        s.barrier_micros = s.barrier_micros.saturating_add(waited);
    }
    let slots: Vec<(&StreamState, Lsn)> = st
        .slots
        .iter()
        .map(|s| (&s.status.state, s.status.durable))
        .collect();
    let point = proven(sh.config.mode, &slots, sh.primary.status().durable);
    drop(st);
    sh.acks.notify_all();
    if point > sh.primary.status().committed {
        sh.primary.set_committed(point);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: u64, base: bool) -> RecoveryProgress {
        RecoveryProgress {
            path: if base { "rebuild" } else { "catch_up" },
            elapsed: Duration::from_secs(10),
            entries_done: if base { 7 } else { done },
            entries_total: if base { 0 } else { total },
            base_bytes_done: if base { done } else { 0 },
            base_bytes_total: if base { total } else { 0 },
        }
    }

    #[test]
    fn progress_measures_a_rebuild_by_image_bytes_and_a_catch_up_by_entries() {
        let p = progress(1 << 20, 4 << 20, true);
        assert_eq!(p.fraction(), Some(0.25));
        // A quarter in ten seconds: thirty to go.
        assert_eq!(p.eta(), Some(Duration::from_secs(30)));
        assert_eq!(p.to_string(), "rebuild 1.0/4.0 MiB (25%), ETA 30.0 s");
        let p = progress(500, 1000, false);
        assert_eq!(p.eta(), Some(Duration::from_secs(10)));
        assert_eq!(p.to_string(), "catch_up 500/1000 entries (50%), ETA 10.0 s");
        // Nothing moved yet, nothing to measure, more done than planned.
        assert_eq!(progress(0, 1000, false).eta(), None);
        assert_eq!(progress(0, 0, false).fraction(), None);
        assert_eq!(
            progress(0, 0, false).to_string(),
            "catch_up 0/0 entries, ETA unknown"
        );
        assert_eq!(progress(2000, 1000, false).fraction(), Some(1.0));
        assert_eq!(progress(2000, 1000, false).eta(), Some(Duration::ZERO));
    }
}
