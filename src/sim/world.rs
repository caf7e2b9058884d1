//! The simulated world outside the services: processes and disks, the master's view, the
//! oracle, the replication stream, faults, and the invariant checks. Everything here is
//! reached through one `Rc<RefCell<World>>`; nothing here calls into a `BlockService`, so the
//! step hook of a running recovery can use it (work that needs a service is deferred).

use engine::testing::SenderProtocol;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use blockvol::{
    BlockVolError, CrashMode, CreateOptions, Digest, EntryInfo, EntryKind, FlushGate, FlusherMode,
    Lba, Lsn as BvLsn, OpenOptions, RetentionPolicy, Role, SimDisk, Volume, WalEntry,
};
use controlbridge::{BlockVolumeAssignment, ReplicaAddr};
use engine::{
    Epoch, InvalidateReason, PinKind, RecoveryDriver, RecoveryOrchestrator, RegistryStatus,
    ReplicaId, ReplicaState, StepInfo, StorageAdapter,
};
use v2bridge::convert::to_engine;
use v2bridge::{
    ApplyRequest, BarrierRequest, BaseBeginRequest, BlockVolStorage, BridgeIo, Lineage,
    LocalReplica, ReplicaTarget, TargetError, TruncateRequest,
};

use super::net::{Dest, Net, Proc, SimTarget};
use super::oracle::Oracle;
use super::rng::Rng;
use super::{Bug, Invariant, SimOptions, Stats, Violation};
use engine::CatchUpIo;

/// The one simulated volume's name.
pub const VOLUME: &str = "vol";
/// Block size of the simulated volumes.
pub(crate) const BLOCK_BYTES: u32 = 512;
/// Blocks per simulated volume.
pub(crate) const BLOCKS: u64 = 64;
/// Replicas that must acknowledge a sync for it to commit.
const MIN_IN_SYNC: usize = 1;
/// Entries per replication-stream chunk.
const STREAM_CHUNK: u64 = 32;
/// Most entries one replication round commits.
const COMMIT_ROUND: u64 = 16;
/// Events kept for the report.
const TRACE: usize = 80;

pub(crate) type Shared = Rc<RefCell<World>>;

/// The replica ID of `server`'s copy of the volume.
pub(crate) fn replica_id(server: &str) -> ReplicaId {
    ReplicaId::new(format!("{VOLUME}/{server}")).unwrap_or_else(|e| panic!("replica id: {e}"))
}

/// The server part of a replica ID.
pub(crate) fn server_of(id: &ReplicaId) -> String {
    id.as_str()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Which request a stale lineage sends.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StaleKind {
    /// An (empty) apply.
    Apply,
    /// A truncation just below the replica's head.
    Truncate,
    /// The start of a base install (would wipe the replica).
    BeginBase,
    /// A barrier.
    Barrier,
}

/// Something that happens while a recovery runs, between two of its steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interleave {
    /// Clients write on the primary.
    Writes(u32),
    /// A client sync (a replication round and commit).
    Commit,
    /// The primary flushes.
    FlushPrimary,
    /// The primary's retention drops to nothing and it flushes (pins still hold).
    RetentionPressure,
    /// The primary revokes every pin (an emergency WAL reclaim) and flushes.
    RevokePins,
    /// The recovering replica's data address becomes unreachable.
    DisconnectTarget,
    /// The recovering replica crashes and restarts (when its own service drives the recovery,
    /// a pull, that service is left a ghost whose remaining calls fail).
    CrashTarget,
    /// Another replica crashes and restarts.
    CrashOther,
    /// The primary crashes, then restarts in place or fails over once the running recovery
    /// returns.
    CrashPrimary {
        /// Fail over instead of restarting in place.
        failover: bool,
    },
    /// The master bumps the epoch: the running registry and the primary's fence now, the
    /// assignments follow.
    EpochBump,
    /// The running recovery is cancelled.
    Cancel,
    /// The primary's next pin of this kind fails.
    FailPin(PinKind),
    /// A request from a stale lineage reaches the recovering replica.
    StaleMessage(StaleKind),
}

/// What the step hook saw when it injected an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The server whose service drives the recovery.
    pub running: String,
    /// The replica being recovered.
    pub target: String,
    /// The step that had just completed.
    pub step: engine::StepKind,
    /// The running registry's state of the replica at that moment.
    pub state: Option<ReplicaState>,
    /// What was injected.
    pub event: Interleave,
}

/// Operation kinds the random schedule draws, with their names.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Write,
    Commit,
    Flush,
    Reassign,
    Rebuild,
    CrashReplica,
    CrashPrimary,
    Disconnect,
    Reconnect,
    MoveAddress,
    EpochBump,
    Failover,
    FailPin,
    RetentionPressure,
    LateAssignment,
    StaleMessage,
    StaleSession,
    StaleWrite,
    PartialReplication,
}

impl Kind {
    pub(crate) const ALL: [Kind; 19] = [
        Kind::Write,
        Kind::Commit,
        Kind::Flush,
        Kind::Reassign,
        Kind::Rebuild,
        Kind::CrashReplica,
        Kind::CrashPrimary,
        Kind::Disconnect,
        Kind::Reconnect,
        Kind::MoveAddress,
        Kind::EpochBump,
        Kind::Failover,
        Kind::FailPin,
        Kind::RetentionPressure,
        Kind::LateAssignment,
        Kind::StaleMessage,
        Kind::StaleSession,
        Kind::StaleWrite,
        Kind::PartialReplication,
    ];

    /// Base weight, and whether the seed may switch the kind off (swarm testing: each run
    /// stresses a different mix).
    fn base(self) -> (u64, bool) {
        match self {
            Kind::Write => (30, false),
            Kind::Commit => (22, false),
            Kind::Flush => (8, false),
            Kind::Reassign => (10, false),
            Kind::Rebuild => (5, false),
            Kind::Reconnect => (6, false),
            Kind::CrashReplica => (3, true),
            Kind::CrashPrimary => (1, true),
            Kind::Disconnect => (4, true),
            Kind::MoveAddress => (2, true),
            Kind::EpochBump => (2, true),
            Kind::Failover => (2, true),
            Kind::FailPin => (2, true),
            Kind::RetentionPressure => (3, true),
            Kind::LateAssignment => (3, true),
            Kind::StaleMessage => (2, true),
            Kind::StaleSession => (2, true),
            Kind::StaleWrite => (1, true),
            Kind::PartialReplication => (2, true),
        }
    }
}

/// What the seed chose for this run.
#[derive(Clone, Debug)]
pub(crate) struct RunConfig {
    pub replicas: usize,
    pub wal_bytes: u64,
    pub retention_keep: u64,
    pub weights: Vec<(Kind, u64)>,
    pub interleave_per_mille: u64,
    pub chunk_entries: u64,
    pub base_chunk_bytes: u64,
}

impl RunConfig {
    fn from_seed(rng: &mut Rng, replicas: Option<usize>) -> RunConfig {
        let replicas = replicas.unwrap_or(if rng.chance(500) { 2 } else { 3 });
        let wal_bytes = if rng.chance(500) { 64 << 10 } else { 128 << 10 };
        let retention_keep = rng.below(49);
        let weights = Kind::ALL
            .iter()
            .map(|k| {
                let (w, optional) = k.base();
                let w = if optional && rng.chance(250) {
                    0
                } else {
                    w * rng.range(1, 3)
                };
                (*k, w)
            })
            .collect();
        RunConfig {
            replicas,
            wal_bytes,
            retention_keep,
            weights,
            interleave_per_mille: rng.below(500),
            chunk_entries: rng.range(2, 24),
            base_chunk_bytes: 512 * rng.range(4, 24),
        }
    }

    pub(crate) fn describe(&self) -> String {
        let off: Vec<&str> = self
            .weights
            .iter()
            .filter(|(_, w)| *w == 0)
            .map(|(k, _)| kind_name(*k))
            .collect();
        format!(
            "replicas={} wal={}KiB retention_keep={} interleave={}/1000 chunk={} entries/{} B off=[{}]",
            self.replicas,
            self.wal_bytes >> 10,
            self.retention_keep,
            self.interleave_per_mille,
            self.chunk_entries,
            self.base_chunk_bytes,
            off.join(",")
        )
    }
}

pub(crate) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Write => "write",
        Kind::Commit => "commit",
        Kind::Flush => "flush",
        Kind::Reassign => "reassign",
        Kind::Rebuild => "rebuild_assignment",
        Kind::CrashReplica => "crash_replica",
        Kind::CrashPrimary => "crash_primary",
        Kind::Disconnect => "disconnect",
        Kind::Reconnect => "reconnect",
        Kind::MoveAddress => "address_change",
        Kind::EpochBump => "epoch_bump",
        Kind::Failover => "failover",
        Kind::FailPin => "pin_failure",
        Kind::RetentionPressure => "retention_pressure",
        Kind::LateAssignment => "late_assignment",
        Kind::StaleMessage => "stale_message",
        Kind::StaleSession => "stale_session",
        Kind::StaleWrite => "stale_write",
        Kind::PartialReplication => "partial_replication",
    }
}

/// The master: epoch, roles, addresses, and every assignment it ever sent.
#[derive(Clone, Debug)]
pub(crate) struct Master {
    pub epoch: u64,
    pub primary: String,
    pub servers: Vec<String>,
    pub data_port: BTreeMap<String, u32>,
    pub addr_version: u64,
    pub history: Vec<(String, BlockVolumeAssignment)>,
    /// Per server, the (epoch, address version) of the newest assignment it accepted.
    pub accepted: BTreeMap<String, (u64, u64)>,
}

impl Master {
    pub(crate) fn replicas(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| **s != self.primary)
            .cloned()
            .collect()
    }

    pub(crate) fn data_addr(&self, s: &str) -> String {
        format!("{s}:{}", self.data_port.get(s).copied().unwrap_or(3260))
    }

    fn ctrl_addr(&self, s: &str) -> String {
        format!("{s}:{}", self.data_port.get(s).copied().unwrap_or(3260) + 1)
    }

    pub(crate) fn rebuild_addr(s: &str) -> String {
        format!("{s}:3270")
    }

    pub(crate) fn primary_assignment(&self) -> BlockVolumeAssignment {
        BlockVolumeAssignment {
            path: VOLUME.into(),
            epoch: self.epoch,
            role: 1,
            lease_ttl_ms: 30_000,
            replica_addrs: self
                .replicas()
                .iter()
                .map(|r| ReplicaAddr {
                    data_addr: self.data_addr(r),
                    ctrl_addr: self.ctrl_addr(r),
                    server_id: r.clone(),
                })
                .collect(),
            addr_version: self.addr_version,
            ..BlockVolumeAssignment::default()
        }
    }

    pub(crate) fn replica_assignment(&self, s: &str) -> BlockVolumeAssignment {
        BlockVolumeAssignment {
            path: VOLUME.into(),
            epoch: self.epoch,
            role: 2,
            replica_data_addr: self.data_addr(s),
            replica_ctrl_addr: self.ctrl_addr(s),
            replica_server_id: s.to_owned(),
            addr_version: self.addr_version,
            ..BlockVolumeAssignment::default()
        }
    }

    pub(crate) fn rebuild_assignment(&self, s: &str) -> BlockVolumeAssignment {
        BlockVolumeAssignment {
            role: 4,
            rebuild_addr: Self::rebuild_addr(&self.primary),
            ..self.replica_assignment(s)
        }
    }
}

/// Work that needs a `BlockService`, queued by code that runs inside one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Deferred {
    /// The server's process restarted: a fresh service (empty registry).
    RestartService(String),
    /// The master sends every server its current assignment.
    DeliverAll,
    /// The primary crashed inside another server's recovery: restart in place or fail over.
    PrimaryCrashed { failover: bool },
}

/// What a server's volume looks like, for before/after comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VolPrint {
    head: u64,
    durable: u64,
    checkpoint: u64,
    tail: u64,
    epoch: blockvol::Epoch,
    role: Role,
    generation: u64,
    install_incomplete: bool,
    digest: Option<Digest>,
}

/// Everything outside the services.
pub(crate) struct World {
    pub opts: SimOptions,
    pub cfg: RunConfig,
    pub rng: Rng,
    pub net: Arc<Net>,
    pub disks: BTreeMap<String, SimDisk>,
    pub oracle: Oracle,
    pub master: Master,
    /// Each server's orchestrator for the volume, as of its last assignment.
    pub orchs: BTreeMap<String, Arc<RecoveryOrchestrator>>,
    /// Replicas that acknowledged the committed LSN and were not wiped since.
    pub holders: BTreeSet<String>,
    /// Per replica, the evidence an in-sync claim must stand on: the committed LSN when the
    /// primary last handshook with it (its recovery target) or replicated to it. Cleared when
    /// the replica is seen out of sync outside a recovery (at a step boundary, or demoted), so
    /// a later claim needs new evidence.
    pub basis: BTreeMap<String, u64>,
    /// Per server, the highest epoch the master knows it accepted.
    pub known_epoch: BTreeMap<String, u64>,
    /// Lineages recovery sessions used, by target server.
    pub lineages: Vec<(String, Lineage)>,
    /// Sessions seen: (server, replica, session).
    pub sessions: BTreeSet<(String, String, u64)>,
    pub deferred: VecDeque<Deferred>,
    pub stats: Stats,
    pub violations: Vec<Violation>,
    pub trace: VecDeque<String>,
    pub step: u64,
    /// The server whose service is running right now.
    pub running: Option<String>,
    pub healing: bool,
    /// Pins leaked on purpose by [`Bug::LeakPin`].
    pub leaked: Vec<engine::RetentionPin>,
    /// Events a test scheduled for the next recovery steps.
    pub scripted: VecDeque<Interleave>,
    /// What the step hook injected, and when.
    pub observed: Vec<Observation>,
}

fn listening_for(role: Role) -> (bool, bool) {
    match role {
        Role::Primary => (false, true),
        Role::Replica | Role::Rebuilding => (true, false),
        Role::None | Role::Stale | Role::Draining => (false, false),
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl World {
    pub(crate) fn new(opts: SimOptions) -> Result<World, String> {
        let mut rng = Rng::new(opts.seed);
        let mut cfg = RunConfig::from_seed(&mut rng, opts.replicas);
        if let Some(p) = opts.interleave_per_mille {
            cfg.interleave_per_mille = p;
        }
        let servers: Vec<String> = (1..=cfg.replicas + 1).map(|i| format!("s{i}")).collect();
        let master = Master {
            epoch: 1,
            primary: servers[0].clone(),
            servers: servers.clone(),
            data_port: servers.iter().map(|s| (s.clone(), 3260)).collect(),
            addr_version: 1,
            history: Vec::new(),
            accepted: BTreeMap::new(),
        };
        let mut w = World {
            opts,
            cfg,
            rng,
            net: Arc::new(Net::default()),
            disks: BTreeMap::new(),
            oracle: Oracle::new(BLOCK_BYTES as usize, BLOCKS),
            master,
            orchs: BTreeMap::new(),
            holders: servers[1..].iter().cloned().collect(),
            basis: BTreeMap::new(),
            known_epoch: BTreeMap::new(),
            lineages: Vec::new(),
            sessions: BTreeSet::new(),
            deferred: VecDeque::new(),
            stats: Stats::default(),
            violations: Vec::new(),
            trace: VecDeque::new(),
            step: 0,
            running: None,
            healing: false,
            leaked: Vec::new(),
            scripted: VecDeque::new(),
            observed: Vec::new(),
        };
        let create = CreateOptions {
            volume_size_bytes: BLOCKS * u64::from(BLOCK_BYTES),
            wal_size_bytes: w.cfg.wal_bytes,
            block_size: BLOCK_BYTES,
        };
        for s in &servers {
            let (vol, disk) = Volume::create_sim(&create, &w.open_options())
                .map_err(|e| format!("create {s}: {e}"))?;
            let vol = Arc::new(vol);
            w.disks.insert(s.clone(), disk);
            w.net.set_proc(
                s,
                Proc {
                    incarnation: 1,
                    replica: LocalReplica::new(Arc::clone(&vol)),
                    storage: Arc::new(BlockVolStorage::new(Arc::clone(&vol))),
                    vol,
                    data_addr: w.master.data_addr(s),
                    rebuild_addr: Master::rebuild_addr(s),
                    serves_data: false,
                    serves_rebuild: false,
                    retention: w.open_options().retention,
                },
            );
        }
        Ok(w)
    }

    pub(crate) fn open_options(&self) -> OpenOptions {
        OpenOptions {
            flush_gate: FlushGate::Committed,
            retention: RetentionPolicy {
                keep_entries: self.cfg.retention_keep,
                keep_bytes: 0,
            },
            flusher: FlusherMode::Manual,
            // A full WAL fails the write at once instead of waiting: no clock in a run.
            wal_full_timeout: Duration::ZERO,
            repair: false,
        }
    }

    // ---- bookkeeping ------------------------------------------------------------------------

    pub(crate) fn note(&mut self, line: impl Into<String>) {
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        let line = line.into();
        self.trace.push_back(format!("[{}] {line}", self.step));
    }

    pub(crate) fn violate(&mut self, invariant: Invariant, detail: impl Into<String>) {
        let v = Violation {
            step: self.step,
            invariant,
            detail: detail.into(),
        };
        self.note(format!("VIOLATION {v}"));
        self.violations.push(v);
    }

    pub(crate) fn fault(&mut self, name: &'static str) {
        *self.stats.faults.entry(name).or_default() += 1;
    }

    pub(crate) fn count_op(&mut self, name: &'static str) {
        *self.stats.ops.entry(name).or_default() += 1;
    }

    pub(crate) fn bug(&self, b: Bug) -> bool {
        self.opts.bug == Some(b)
    }

    pub(crate) fn proc(&self, s: &str) -> Option<Proc> {
        self.net.proc(s)
    }

    pub(crate) fn primary_proc(&self) -> Option<Proc> {
        self.net.proc(&self.master.primary)
    }

    /// The primary registry's view of `server`.
    pub(crate) fn state_of(&self, server: &str) -> Option<ReplicaState> {
        let orch = self.orchs.get(&self.master.primary)?;
        orch.registry()
            .sender(&replica_id(server))
            .map(|s| s.state())
    }

    fn in_sync_replicas(&self) -> Vec<String> {
        self.master
            .replicas()
            .into_iter()
            .filter(|r| self.state_of(r) == Some(ReplicaState::InSync))
            .collect()
    }

    pub(crate) fn vol_print(&self, s: &str) -> Option<VolPrint> {
        let p = self.proc(s)?;
        let st = p.vol.status();
        Some(VolPrint {
            head: st.head.0,
            durable: st.durable.0,
            checkpoint: st.checkpoint.0,
            tail: st.tail.0,
            epoch: st.epoch,
            role: st.role,
            generation: st.generation,
            install_incomplete: st.install_incomplete,
            digest: if st.install_incomplete {
                None
            } else {
                p.vol.digest().ok()
            },
        })
    }

    // ---- clients ----------------------------------------------------------------------------

    /// Clients write `count` times on the primary at the primary's epoch.
    pub(crate) fn client_writes(&mut self, count: u32) {
        let Some(p) = self.primary_proc() else { return };
        let st = p.vol.status();
        if st.role != Role::Primary {
            self.note(format!(
                "writes refused: {} is {}",
                self.master.primary,
                st.role.name()
            ));
            return;
        }
        // The primary's background flusher, emulated: make room when the ring is 3/4 full.
        if st.wal_used_bytes * 4 > st.wal_size_bytes * 3 {
            let _ = p.vol.force_flush();
        }
        let bs = BLOCK_BYTES as usize;
        let mut accepted = 0;
        for _ in 0..count {
            let lsn = self.oracle.head() + 1;
            let kind = if self.rng.chance(820) {
                let blocks = self.rng.range(1, 3);
                let lba = self.rng.below(BLOCKS - blocks + 1);
                let mut data = vec![0u8; blocks as usize * bs];
                self.rng.fill(&mut data);
                EntryKind::Write {
                    lba: Lba(lba),
                    data,
                }
            } else {
                let blocks = self.rng.range(1, 8);
                let lba = self.rng.below(BLOCKS - blocks + 1);
                EntryKind::Trim {
                    lba: Lba(lba),
                    blocks,
                }
            };
            let write = |kind: &EntryKind| match kind {
                EntryKind::Write { lba, data } => p.vol.write_in_epoch(st.epoch, *lba, data),
                EntryKind::Trim { lba, blocks } => p.vol.trim_in_epoch(st.epoch, *lba, *blocks),
                EntryKind::Barrier => p.vol.barrier(),
            };
            let r = match write(&kind) {
                // The writer waits for one cycle of the (emulated) background flusher.
                Err(BlockVolError::WalFull { .. }) => {
                    super::net::flush_for_waiting_writer(&p.vol, p.retention);
                    write(&kind)
                }
                other => other,
            };
            match r {
                Ok(got) => {
                    let entry = WalEntry {
                        lsn: BvLsn(lsn),
                        epoch: st.epoch,
                        kind,
                    };
                    if got.0 != lsn {
                        self.violate(
                            Invariant::CommittedNeverLost,
                            format!("primary assigned lsn {got}, the oracle expected {lsn}"),
                        );
                        return;
                    }
                    if let Err(e) = self.oracle.record(entry) {
                        self.violate(Invariant::CommittedNeverLost, e);
                        return;
                    }
                    self.stats.writes += 1;
                    accepted += 1;
                }
                Err(BlockVolError::WalFull { .. }) => {
                    self.stats.wal_full += 1;
                    break;
                }
                Err(e) => {
                    self.note(format!("write refused: {e}"));
                    break;
                }
            }
        }
        if accepted > 0 {
            self.note(format!(
                "{accepted} writes on {} -> head {}",
                self.master.primary,
                self.oracle.head()
            ));
        }
    }

    // ---- replication ------------------------------------------------------------------------

    /// Ships the primary's log up to `d` to `r` through the real replica path: handshake, WAL
    /// chunks anchored on the primary's entry, barrier with a tip check.
    pub(crate) fn ship(&mut self, pserver: &str, p: &Proc, r: &str, d: u64) -> Result<(), String> {
        let orch = self
            .orchs
            .get(pserver)
            .cloned()
            .ok_or("the primary has no registry")?;
        let sender = orch
            .registry()
            .sender(&replica_id(r))
            .ok_or_else(|| format!("no sender for {r}"))?;
        // The primary's view of where the replica is, which may be stale.
        let addr = sender.endpoint().data_addr;
        let mut target = SimTarget::connect(&self.net, Dest::Addr(addr.clone()))?;
        if target.server() != r {
            return Err(format!(
                "{addr} is answered by {}, not {r}",
                target.server()
            ));
        }
        let hs = target.handshake().map_err(err)?;
        if hs.install_incomplete {
            return Err("replica holds an incomplete install".into());
        }
        if hs.head.0 > d {
            return Err(format!(
                "replica head {} is ahead of the primary's durable {d}",
                hs.head
            ));
        }
        let st = p.vol.status();
        let lineage = Lineage::new(&format!("{pserver}/stream"), st.epoch, 1);
        let mut io = BridgeIo::new(
            Arc::clone(&p.storage),
            target,
            lineage,
            to_engine(st.committed),
        );
        let mut at = engine::Lsn(hs.head.0);
        while at.0 < d {
            let chunk = io
                .stream_wal_chunk(at, engine::Lsn(d), STREAM_CHUNK)
                .map_err(err)?;
            if chunk.applied_to <= at {
                return Err(format!("stream made no progress at {at}"));
            }
            at = chunk.applied_to;
        }
        let durable = io.barrier(engine::Lsn(d)).map_err(err)?;
        if durable.0 != d {
            return Err(format!("barrier reported {durable}, wanted {d}"));
        }
        Ok(())
    }

    fn demote(&mut self, r: &str, why: &str) {
        let Some(orch) = self.orchs.get(&self.master.primary).cloned() else {
            return;
        };
        if let Some(s) = orch.registry().sender(&replica_id(r)) {
            s.invalidate_session(
                InvalidateReason::Other(format!("replication_failed: {why}")),
                engine::Demotion::Degraded,
            );
        }
        self.basis.remove(r);
        self.stats.demotions += 1;
        self.note(format!("demoted {r}: {why}"));
    }

    /// A client sync: the primary durable to `d`, then replication rounds to the in-sync
    /// replicas, each committing what every remaining in-sync replica acknowledged (at least
    /// one must). Rounds carry at most [`COMMIT_ROUND`] entries, as a pipelined stream would:
    /// a replica learns the committed point with the next round and can flush up to it, so a
    /// backlog larger than its ring still gets through.
    pub(crate) fn commit(&mut self) -> bool {
        let pserver = self.master.primary.clone();
        let Some(p) = self.primary_proc() else {
            return false;
        };
        if p.vol.status().role != Role::Primary {
            return false;
        }
        let d = match p.vol.sync() {
            Ok(l) => l.0,
            Err(e) => {
                self.note(format!("primary sync failed: {e}"));
                return false;
            }
        };
        self.oracle.note_synced(d);
        let start = self.oracle.committed();
        loop {
            let c = self.oracle.committed();
            let t = if d > c { d.min(c + COMMIT_ROUND) } else { c };
            let mut acked = Vec::new();
            for r in self.in_sync_replicas() {
                if !self.check_in_sync(&r, "before a replication round") {
                    continue;
                }
                match self.ship(&pserver, &p, &r, t) {
                    Ok(()) => acked.push(r),
                    Err(e) => self.demote(&r, &e),
                }
            }
            if acked.len() < MIN_IN_SYNC {
                if d > c {
                    self.stats.commits_refused += 1;
                    self.note(format!("sync to {d} stopped at {c}: no replica in sync"));
                }
                return false;
            }
            for r in &acked {
                self.basis.insert(r.clone(), t);
            }
            if t > c {
                p.vol.set_committed(BvLsn(t));
                self.oracle.commit(t);
                self.holders = acked.iter().cloned().collect();
            } else {
                self.holders.extend(acked.iter().cloned());
            }
            if t >= d {
                if d > start {
                    self.stats.commits += 1;
                    self.note(format!("committed {d} on {pserver} + {acked:?}"));
                }
                return true;
            }
        }
    }

    /// A replication round cut short: the primary makes its log durable and ships it to `to`
    /// (those of them it holds in sync), then dies or loses them before committing anything.
    pub(crate) fn ship_uncommitted(&mut self, to: &[String]) {
        let pserver = self.master.primary.clone();
        let Some(p) = self.primary_proc() else { return };
        let Ok(d) = p.vol.sync() else { return };
        let d = d.0;
        self.oracle.note_synced(d);
        for r in to {
            if self.state_of(r) == Some(ReplicaState::InSync) {
                let res = self.ship(&pserver, &p, r, d);
                self.note(format!(
                    "{pserver} ships up to {d} to {r} without committing: {res:?}"
                ));
                if let Err(e) = res {
                    // A replica that missed the round may hold part of it, not synced.
                    self.demote(r, &e);
                }
            }
        }
    }

    /// Brings every in-sync replica to the committed LSN (a replica that finished a recovery
    /// at its frozen target joins the stream there).
    pub(crate) fn top_up(&mut self) {
        let pserver = self.master.primary.clone();
        let Some(p) = self.primary_proc() else { return };
        if p.vol.status().role != Role::Primary {
            return;
        }
        let c = self.oracle.committed();
        for r in self.in_sync_replicas() {
            match self.ship(&pserver, &p, &r, c) {
                Ok(()) => {
                    self.basis.insert(r.clone(), c);
                    self.holders.insert(r);
                }
                Err(e) => self.demote(&r, &e),
            }
        }
    }

    // ---- faults -----------------------------------------------------------------------------

    /// Crashes `server`'s process: the volume reopens from a crash image of its disk (unsynced
    /// sectors dropped, kept or torn), with a new incarnation; its service restarts (deferred).
    pub(crate) fn crash(&mut self, server: &str) -> bool {
        let Some(old) = self.proc(server) else {
            return false;
        };
        let Some(disk) = self.disks.get(server).cloned() else {
            return false;
        };
        let seed = self.rng.next_u64();
        let mode = match self.rng.below(4) {
            0 => CrashMode::DurableOnly,
            1 => CrashMode::AllWritten,
            2 => CrashMode::RandomSectors,
            _ => CrashMode::RandomSectorsTorn,
        };
        let image = disk.crash_image_with(seed, mode);
        let new_disk = SimDisk::from_image(image);
        let vol = match Volume::open_sim(&new_disk, &self.open_options()) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                self.violate(
                    Invariant::CommittedNeverLost,
                    format!("{server}'s crash image ({mode:?}) does not open: {e}"),
                );
                return false;
            }
        };
        let st = vol.status();
        let (data, rebuild) = listening_for(st.role);
        self.net.set_proc(
            server,
            Proc {
                incarnation: old.incarnation + 1,
                replica: LocalReplica::new(Arc::clone(&vol)),
                storage: Arc::new(BlockVolStorage::new(Arc::clone(&vol))),
                vol,
                data_addr: old.data_addr.clone(),
                rebuild_addr: old.rebuild_addr.clone(),
                serves_data: data,
                serves_rebuild: rebuild,
                retention: self.open_options().retention,
            },
        );
        drop(old);
        self.disks.insert(server.to_owned(), new_disk);
        self.orchs.remove(server);
        // The restarted process remembers its persisted epoch, not the address version.
        if let Some(a) = self.master.accepted.get_mut(server) {
            a.1 = 0;
        }
        self.deferred
            .push_back(Deferred::RestartService(server.to_owned()));
        self.note(format!(
            "crashed {server} ({mode:?}): reopened at head {} durable {} checkpoint {} role {}",
            st.head,
            st.durable,
            st.checkpoint,
            st.role.name()
        ));
        if server == self.master.primary {
            self.after_primary_restart();
        }
        true
    }

    /// A restarted primary must still hold every entry it acknowledged as synced; whatever
    /// unsynced tail survived is exactly the oracle's; the coordinator restores committed.
    fn after_primary_restart(&mut self) {
        let Some(p) = self.primary_proc() else { return };
        let st = p.vol.status();
        let (synced, c) = (self.oracle.synced(), self.oracle.committed());
        if st.head.0 < synced {
            self.violate(
                Invariant::CommittedNeverLost,
                format!(
                    "primary {} lost synced entries: recovered head {} < last sync {synced} (committed {c})",
                    self.master.primary, st.head
                ),
            );
            return;
        }
        if st.head.0 > self.oracle.head() {
            self.violate(
                Invariant::CommittedNeverLost,
                format!(
                    "primary {} recovered head {} beyond every accepted write ({})",
                    self.master.primary,
                    st.head,
                    self.oracle.head()
                ),
            );
            return;
        }
        self.oracle.truncate_pending(st.head.0);
        p.vol.set_committed(BvLsn(c));
        self.check_primary("after the primary restarted");
    }

    /// The primary-side part of a failover that needs no service: promote `to` by dropping its
    /// uncommitted tail (which may be the old primary's zombie writes) and check it holds the
    /// committed image. Returns false when the promoted node cannot serve.
    pub(crate) fn promote(&mut self, to: &str) -> bool {
        let c = self.oracle.committed();
        let Some(p) = self.proc(to) else { return false };
        if let Err(e) = p.vol.truncate_after(BvLsn(c)) {
            self.violate(
                Invariant::CommittedNeverLost,
                format!("promoted {to} cannot drop its tail after committed {c}: {e}"),
            );
            return false;
        }
        let st = p.vol.status();
        let mut bad = Vec::new();
        if st.install_incomplete {
            bad.push("holds an incomplete install".to_owned());
        } else {
            if st.head.0 != c {
                bad.push(format!("head {} after truncation to {c}", st.head));
            }
            let want = self.oracle.info(c);
            match p.vol.entry_info(BvLsn(c)) {
                Ok(i) if Some(i) == want => {}
                other => bad.push(format!("entry at {c}: {other:?}, oracle {want:?}")),
            }
            match p.vol.digest() {
                Ok(d) if d == self.oracle.committed_digest() => {}
                other => bad.push(format!(
                    "digest {other:?}, oracle committed image {}",
                    self.oracle.committed_digest()
                )),
            }
        }
        if !bad.is_empty() {
            self.violate(
                Invariant::CommittedNeverLost,
                format!(
                    "promoted {to} does not hold the committed prefix {c}: {}",
                    bad.join("; ")
                ),
            );
            return false;
        }
        self.oracle.truncate_pending(c);
        p.vol.set_committed(BvLsn(c));
        self.holders.remove(to);
        true
    }

    /// Retention pressure: history behind the checkpoint is recycled unless a pin holds it.
    pub(crate) fn retention_pressure(&mut self) {
        let Some(p) = self.primary_proc() else { return };
        p.vol.set_retention(RetentionPolicy {
            keep_entries: self.rng.below(3),
            keep_bytes: 0,
        });
        let r = p.vol.force_flush();
        p.vol.set_retention(RetentionPolicy {
            keep_entries: self.cfg.retention_keep,
            keep_bytes: 0,
        });
        let st = p.vol.status();
        self.note(format!(
            "retention pressure on {}: {r:?}, tail {} checkpoint {} head {}",
            self.master.primary, st.tail, st.checkpoint, st.head
        ));
    }

    pub(crate) fn flush(&mut self, server: &str) {
        if let Some(p) = self.proc(server) {
            let r = p.vol.force_flush();
            self.note(format!("flush {server}: {r:?}"));
        }
    }

    pub(crate) fn fail_pin(&mut self, kind: PinKind) {
        if let Some(p) = self.primary_proc() {
            p.storage.fail_next_pin(kind);
            self.note(format!("next {kind} pin on the primary fails"));
        }
    }

    /// Moves `server`'s replica endpoint to a new port; the master learns it and bumps the
    /// address version (it tells the primary at its next assignment).
    pub(crate) fn move_address(&mut self, server: &str) {
        let port = self.master.data_port.get(server).copied().unwrap_or(3260) + 10;
        self.master.data_port.insert(server.to_owned(), port);
        self.master.addr_version += 1;
        let addr = self.master.data_addr(server);
        self.net.set_data_addr(server, &addr);
        self.note(format!(
            "{server} moved to {addr} (address version {})",
            self.master.addr_version
        ));
    }

    // ---- stale operations (c) ---------------------------------------------------------------

    /// A request from a lineage older than what `server` was assigned. It must be refused as
    /// fenced and leave the volume exactly as it was.
    pub(crate) fn stale_message(&mut self, server: &str, kind: StaleKind) {
        let Some(p) = self.proc(server) else { return };
        if p.serves_rebuild {
            return; // a primary's replica endpoint does not listen
        }
        // Stale by the simulator's own record: an epoch below one the master assigned this
        // server, or a session older than one this run of the replica accepted from the same
        // driver at the same epoch.
        let known = self.known_epoch.get(server).copied().unwrap_or(0);
        let mut stale: Vec<Lineage> = self
            .lineages
            .iter()
            .filter(|(s, l)| s == server && l.epoch < blockvol::Epoch(known))
            .map(|(_, l)| *l)
            .collect();
        stale.extend(self.net.superseded_lineages(server));
        let picked = self.rng.pick(&stale).copied();
        let mut lineage = match picked {
            Some(l) => l,
            None if known > 0 => Lineage::new(
                &self.master.primary,
                blockvol::Epoch(known - 1),
                1 + self.rng.below(5),
            ),
            None => return,
        };
        if self.bug(Bug::StaleStampedCurrent) {
            lineage.epoch = p.vol.status().epoch;
        }
        let before = self.vol_print(server);
        let st = p.vol.status();
        let mut replica = p.replica.clone();
        let result = match kind {
            StaleKind::Apply => replica
                .apply(ApplyRequest {
                    lineage,
                    committed: BvLsn(0),
                    anchor: EntryInfo::ORIGIN,
                    count: 0,
                    frames: Vec::new(),
                })
                .map(|_| ()),
            StaleKind::Truncate => replica
                .truncate(TruncateRequest {
                    lineage,
                    after: BvLsn(st.checkpoint.0.max(st.head.0.saturating_sub(1))),
                    committed: BvLsn(0),
                })
                .map(|_| ()),
            StaleKind::BeginBase => replica
                .begin_base(BaseBeginRequest {
                    lineage,
                    base_lsn: BvLsn(0),
                    base_entry: EntryInfo::ORIGIN,
                    geometry: p.vol.geometry(),
                })
                .map(|_| ()),
            StaleKind::Barrier => replica
                .barrier(BarrierRequest {
                    lineage,
                    target: BvLsn(0),
                    expected_tip: None,
                    committed: BvLsn(0),
                })
                .map(|_| ()),
        };
        let after = self.vol_print(server);
        self.stats.stale_checks += 1;
        let fenced = matches!(result, Err(TargetError::Fenced(_)));
        if !fenced || before != after {
            self.violate(
                Invariant::StaleChangesNothing,
                format!(
                    "{kind:?} from stale lineage {lineage:?} (server assigned epoch {known}, or a newer session of the driver accepted) to {server}: {result:?}; volume before {before:?} after {after:?}"
                ),
            );
        } else {
            self.note(format!(
                "stale {kind:?} (epoch {} session {}) to {server}: fenced",
                lineage.epoch, lineage.session
            ));
        }
    }

    /// Engine calls with sessions that are no longer current, and an intent below the
    /// registry's epoch: all refused, the registry unchanged.
    pub(crate) fn stale_session(&mut self) {
        let candidates: Vec<(String, String, u64)> = self
            .sessions
            .iter()
            .filter(|(s, rid, sid)| {
                let Some(orch) = self.orchs.get(s) else {
                    return false;
                };
                let Ok(id) = ReplicaId::new(rid.clone()) else {
                    return false;
                };
                orch.registry()
                    .sender(&id)
                    .is_some_and(|snd| snd.session_id().map(|x| x.get()) != Some(*sid))
            })
            .cloned()
            .collect();
        let Some((server, rid, sid)) = self.rng.pick(&candidates).cloned() else {
            return;
        };
        let Some(orch) = self.orchs.get(&server).cloned() else {
            return;
        };
        let (Ok(id), Some(sid)) = (ReplicaId::new(rid.clone()), engine::SessionId::new(sid)) else {
            return;
        };
        let Some(sender) = orch.registry().sender(&id) else {
            return;
        };
        let before: (RegistryStatus, Epoch) = (orch.registry().status(), orch.registry().epoch());
        let c = engine::Lsn(self.oracle.committed());
        let mut accepted = Vec::new();
        if sender.record_catch_up_progress(sid, c, None).is_ok() {
            accepted.push("record_catch_up_progress");
        }
        if sender.record_barrier(sid, c).is_ok() {
            accepted.push("record_barrier");
        }
        if sender.complete_session_by_id(sid).is_ok() {
            accepted.push("complete_session_by_id");
        }
        if let Some(p) = self.primary_proc() {
            let driver = RecoveryDriver::with_orchestrator(
                Arc::clone(&orch),
                Arc::clone(&p.storage) as Arc<dyn StorageAdapter>,
            );
            if driver.cancel_session(&id, sid, "stale_cancel") {
                accepted.push("cancel_session");
            }
        }
        let reg_epoch = orch.registry().epoch();
        if reg_epoch.get() > 0 {
            let intent = engine::AssignmentIntent {
                replicas: Vec::new(),
                epoch: Epoch(reg_epoch.get() - 1),
                recovery_targets: BTreeMap::new(),
                catch_up_budget: None,
            };
            if orch.process_assignment(&intent).is_ok() {
                accepted.push("process_assignment(stale intent)");
            }
        }
        let after = (orch.registry().status(), orch.registry().epoch());
        self.stats.stale_checks += 1;
        if !accepted.is_empty() || before != after {
            self.violate(
                Invariant::StaleChangesNothing,
                format!(
                    "stale session {sid} of {rid} on {server}: accepted {accepted:?}; registry before {before:?} after {after:?}"
                ),
            );
        } else {
            self.note(format!("stale session {sid} of {rid} on {server}: refused"));
        }
    }

    /// Client writes stamped with an epoch older than the volume's, on the primary and on
    /// every former primary: refused, nothing changes.
    pub(crate) fn stale_write(&mut self) {
        for s in self.master.servers.clone() {
            let Some(p) = self.proc(&s) else { continue };
            let st = p.vol.status();
            if s != self.master.primary
                && st.role != Role::Primary
                && st.epoch == blockvol::Epoch(0)
            {
                continue;
            }
            let old = blockvol::Epoch(st.epoch.0.saturating_sub(1 + self.rng.below(2)));
            if old == st.epoch {
                continue;
            }
            let before = self.vol_print(&s);
            let data = vec![0xEE; BLOCK_BYTES as usize];
            let r = p.vol.write_in_epoch(old, Lba(0), &data);
            let after = self.vol_print(&s);
            self.stats.stale_checks += 1;
            if r.is_ok() || before != after {
                self.violate(
                    Invariant::StaleChangesNothing,
                    format!(
                        "write at epoch {old} on {s} (epoch {}): {r:?}; before {before:?} after {after:?}",
                        st.epoch
                    ),
                );
                return;
            }
        }
        self.note("stale writes refused");
    }

    // ---- the step hook ----------------------------------------------------------------------

    /// Runs between two steps of a recovery `running`'s service drives for `replica`: a
    /// scheduled event first, otherwise, with the seed's probability, a random one.
    pub(crate) fn interleave(&mut self, running: &str, replica: &ReplicaId, step: &StepInfo) {
        self.stats.recovery_steps += 1;
        let target = server_of(replica);
        let what = match self.scripted.pop_front() {
            Some(x) => x,
            None => {
                if !self.rng.chance(self.cfg.interleave_per_mille) {
                    return;
                }
                self.random_interleave()
            }
        };
        let state = self
            .orchs
            .get(running)
            .and_then(|o| o.registry().sender(replica))
            .map(|s| s.state());
        self.observed.push(Observation {
            running: running.to_owned(),
            target: target.clone(),
            step: step.kind,
            state,
            event: what.clone(),
        });
        self.stats.interleaved += 1;
        self.note(format!(
            "inside {running}'s recovery of {target} ({:?} step {} session {}, {}): {what:?}",
            step.kind,
            step.step,
            step.session_id,
            state.map_or("no sender", |s| s.as_str())
        ));
        self.perform(what, running, replica, step);
    }

    fn random_interleave(&mut self) -> Interleave {
        let choices: &[(u8, u64)] = if self.healing {
            &[(0, 3), (1, 2)]
        } else {
            &[
                (0, 30),
                (1, 20),
                (2, 6),
                (3, 5),
                (4, 2),
                (5, 5),
                (6, 4),
                (7, 3),
                (8, 2),
                (9, 4),
                (10, 3),
                (11, 3),
                (12, 3),
            ]
        };
        let weights: Vec<u64> = choices.iter().map(|c| c.1).collect();
        match choices[self.rng.weighted(&weights)].0 {
            0 => Interleave::Writes(self.rng.range(1, 4) as u32),
            1 => Interleave::Commit,
            2 => Interleave::FlushPrimary,
            3 => Interleave::RetentionPressure,
            4 => Interleave::RevokePins,
            5 => Interleave::DisconnectTarget,
            6 => Interleave::CrashTarget,
            7 => Interleave::CrashOther,
            8 => Interleave::CrashPrimary {
                failover: self.rng.chance(500),
            },
            9 => Interleave::EpochBump,
            10 => Interleave::Cancel,
            11 => Interleave::FailPin(
                *self
                    .rng
                    .pick(&[PinKind::WalRetention, PinKind::Snapshot, PinKind::FullBase])
                    .unwrap_or(&PinKind::WalRetention),
            ),
            _ => Interleave::StaleMessage(
                *self
                    .rng
                    .pick(&[
                        StaleKind::Apply,
                        StaleKind::Truncate,
                        StaleKind::BeginBase,
                        StaleKind::Barrier,
                    ])
                    .unwrap_or(&StaleKind::Apply),
            ),
        }
    }

    fn perform(&mut self, what: Interleave, running: &str, replica: &ReplicaId, step: &StepInfo) {
        let target = server_of(replica);
        let primary = self.master.primary.clone();
        match what {
            Interleave::Writes(n) => self.client_writes(n),
            Interleave::Commit => {
                self.commit();
            }
            Interleave::FlushPrimary => self.flush(&primary),
            Interleave::RetentionPressure => {
                self.fault("retention_pressure");
                self.retention_pressure();
            }
            Interleave::RevokePins => {
                // Emergency reclaim: the primary revokes every pin to free its WAL.
                if let Some(p) = self.primary_proc() {
                    self.fault("pins_revoked");
                    let n = p.vol.revoke_wal_pins("simulated WAL emergency");
                    self.note(format!("revoked {n} pins on {primary}"));
                    self.retention_pressure();
                }
            }
            Interleave::DisconnectTarget => {
                let addr = self.proc(&target).map(|p| p.data_addr).unwrap_or_default();
                self.fault("disconnect");
                self.net.set_down(&addr, true);
                self.note(format!("{addr} unreachable"));
            }
            Interleave::CrashTarget => {
                // Even the running server's own process (a pull): its service becomes a ghost
                // whose remaining calls fail, and restarts once the running call returns.
                if target != primary {
                    self.fault("crash_replica");
                    self.crash(&target);
                }
            }
            Interleave::CrashOther => {
                let others: Vec<String> = self
                    .master
                    .replicas()
                    .into_iter()
                    .filter(|s| *s != target)
                    .collect();
                if let Some(s) = self.rng.pick(&others).cloned() {
                    self.fault("crash_replica");
                    self.crash(&s);
                }
            }
            Interleave::CrashPrimary { failover } => {
                // Also when the primary's own service is the one pushing this recovery.
                self.fault("crash_primary");
                if self.crash(&primary) {
                    self.deferred
                        .push_back(Deferred::PrimaryCrashed { failover });
                }
            }
            Interleave::EpochBump => {
                // The master bumps the epoch; the running server and the primary hear of it
                // first (their registries fence), the assignments follow.
                self.fault("epoch_bump");
                self.master.epoch += 1;
                let e = Epoch(self.master.epoch);
                for s in [running.to_owned(), primary.clone()] {
                    if let Some(o) = self.orchs.get(&s) {
                        o.advance_epoch(e);
                    }
                }
                self.deferred.push_back(Deferred::DeliverAll);
                self.note(format!("epoch bumped to {e} mid-recovery"));
            }
            Interleave::Cancel => {
                if let (Some(o), Some(p)) = (self.orchs.get(running).cloned(), self.primary_proc())
                {
                    self.fault("cancel");
                    let driver = RecoveryDriver::with_orchestrator(
                        o,
                        Arc::clone(&p.storage) as Arc<dyn StorageAdapter>,
                    );
                    let done = driver.cancel_session(replica, step.session_id, "sim_cancel");
                    self.note(format!("cancel session {}: {done}", step.session_id));
                }
            }
            Interleave::FailPin(kind) => {
                self.fault("pin_failure");
                self.fail_pin(kind);
            }
            Interleave::StaleMessage(kind) => {
                self.fault("stale_message");
                self.stale_message(&target, kind);
            }
        }
    }

    // ---- invariants -------------------------------------------------------------------------

    /// (a) for one replica the primary reports in sync.
    pub(crate) fn check_in_sync(&mut self, r: &str, when: &str) -> bool {
        self.stats.checks += 1;
        let c = self.oracle.committed();
        let Some(lower) = self.basis.get(r).copied() else {
            self.violate(
                Invariant::InSyncHoldsCommitted,
                format!(
                    "{r} is in sync in {}'s registry ({when}) with no handshake or replication round since it was last out of sync",
                    self.master.primary
                ),
            );
            return false;
        };
        let Some(p) = self.proc(r) else {
            self.violate(
                Invariant::InSyncHoldsCommitted,
                format!("{r} is in sync but has no process ({when})"),
            );
            return false;
        };
        let st = p.vol.status();
        let mut bad = Vec::new();
        if st.install_incomplete {
            bad.push("its volume holds an incomplete install".to_owned());
        } else {
            let h = st.head.0;
            if st.durable != st.head {
                bad.push(format!("head {h} but durable {}", st.durable));
            }
            // It may hold entries the primary shipped in a round that did not commit (yet):
            // never beyond what the primary made durable, and always the primary's.
            let upper = self.oracle.synced().max(c);
            if h > upper {
                bad.push(format!(
                    "head {h} beyond the primary's durable log {upper} (committed {c})"
                ));
            }
            if h < lower {
                bad.push(format!("head {h} below its recovery target {lower}"));
            }
            if h <= upper {
                let want = self.oracle.info(h);
                match p.vol.entry_info(st.head) {
                    Ok(i) if Some(i) == want => {}
                    other => bad.push(format!("entry at {h}: {other:?}, oracle {want:?}")),
                }
                let want = self.oracle.digest_at(h);
                match p.vol.digest() {
                    Ok(d) if d == want => {}
                    other => bad.push(format!("digest {other:?}, oracle image at {h} {want}")),
                }
            }
        }
        if bad.is_empty() {
            return true;
        }
        self.violate(
            Invariant::InSyncHoldsCommitted,
            format!(
                "{r} is in sync in {}'s registry ({when}) but {} (committed {c})",
                self.master.primary,
                bad.join("; ")
            ),
        );
        false
    }

    /// (b) for the primary: it holds exactly the oracle's log.
    pub(crate) fn check_primary(&mut self, when: &str) -> bool {
        self.stats.checks += 1;
        let pserver = self.master.primary.clone();
        let Some(p) = self.proc(&pserver) else {
            return true;
        };
        let st = p.vol.status();
        let c = self.oracle.committed();
        let mut bad = Vec::new();
        if st.install_incomplete {
            bad.push("holds an incomplete install".to_owned());
        } else {
            if st.head.0 < c {
                bad.push(format!("head {} below committed {c}", st.head));
            }
            if st.head.0 != self.oracle.head() {
                bad.push(format!(
                    "head {} but the oracle accepted {} writes",
                    st.head,
                    self.oracle.head()
                ));
            }
            let want = self.oracle.info(c);
            match p.vol.entry_info(BvLsn(c)) {
                Ok(i) if Some(i) == want => {}
                other => bad.push(format!(
                    "entry at committed {c}: {other:?}, oracle {want:?}"
                )),
            }
            if bad.is_empty() {
                let want = self.oracle.head_digest();
                match p.vol.digest() {
                    Ok(d) if d == want => {}
                    other => bad.push(format!("digest {other:?}, oracle {want}")),
                }
            }
        }
        if bad.is_empty() {
            return true;
        }
        self.violate(
            Invariant::CommittedNeverLost,
            format!("primary {pserver} ({when}): {}", bad.join("; ")),
        );
        false
    }

    /// (b) for the holders: each still holds the oracle's entry at the committed LSN.
    pub(crate) fn check_holders(&mut self) -> bool {
        let c = self.oracle.committed();
        let want = self.oracle.info(c);
        for h in self.holders.clone() {
            if h == self.master.primary {
                continue;
            }
            self.stats.checks += 1;
            let Some(p) = self.proc(&h) else { continue };
            let st = p.vol.status();
            let got = if st.install_incomplete {
                Err(BlockVolError::InvalidArgument("incomplete install".into()))
            } else {
                p.vol.entry_info(BvLsn(c))
            };
            if st.head.0 < c || got.as_ref().ok() != want.as_ref() {
                self.violate(
                    Invariant::CommittedNeverLost,
                    format!(
                        "{h} acknowledged committed {c} but now has head {} and entry {got:?} (oracle {want:?})",
                        st.head
                    ),
                );
                return false;
            }
        }
        true
    }

    /// (d) no pin outstanding on any volume, no image held by any storage.
    pub(crate) fn check_pins(&mut self) -> bool {
        for (s, p) in self.net.procs() {
            self.stats.checks += 1;
            let pins = p.vol.status().pins_outstanding;
            let images = p.storage.images_held();
            if pins != 0 || images != 0 {
                self.violate(
                    Invariant::NoPinWithoutRecovery,
                    format!(
                        "{s} has {pins} pins and {images} base images outstanding with no recovery running"
                    ),
                );
                return false;
            }
        }
        true
    }

    /// After the stream's top-up every in-sync replica is exactly at the committed LSN.
    pub(crate) fn check_topped_up(&mut self) -> bool {
        let c = self.oracle.committed();
        for r in self.in_sync_replicas() {
            let Some(p) = self.proc(&r) else { continue };
            let h = p.vol.status().head.0;
            if h != c {
                self.violate(
                    Invariant::InSyncHoldsCommitted,
                    format!("{r} is in sync at {h} after the replication round to {c}"),
                );
                return false;
            }
        }
        true
    }

    /// Forgets the evidence of every replica the primary does not hold in sync (called at the
    /// end of a step boundary, outside any recovery).
    pub(crate) fn forget_out_of_sync(&mut self) {
        for (r, s) in self.replica_states() {
            if s != Some(ReplicaState::InSync) {
                self.basis.remove(&r);
            }
        }
    }

    /// Every replica the master assigned, as the primary's registry sees it.
    pub(crate) fn replica_states(&self) -> Vec<(String, Option<ReplicaState>)> {
        self.master
            .replicas()
            .into_iter()
            .map(|r| {
                let s = self.state_of(&r);
                (r, s)
            })
            .collect()
    }
}
