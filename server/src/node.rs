//! One volume server's volumes and what the master told it about each: role, epoch, lease,
//! replica set. A primary streams its WAL to its replicas through a `transport` `Replicator`
//! (which also recovers them through the engine); every volume, whatever its role, is served to
//! other servers' replicators by one `transport` `ReplicaServer`.
//!
//! The master's word arrives as `controlbridge::BlockVolumeAssignment`s ([`Node::apply`]):
//! - an assignment from an older epoch than the volume's changes nothing (`NodeError::Stale`);
//! - `primary` at a new epoch (or with a new replica set) fences the volume at that epoch in its
//!   superblock, restarts the replicator for the new set and grants the lease; at the same
//!   epoch with no addresses it only renews the lease (how the master renews);
//! - `replica`, `rebuilding`, `stale`, `none`, `draining` stop the replicator and drop the lease.
//!
//! A primary serves I/O only while its lease is valid ([`Node::check_io`]): one whose lease ran
//! out (the master unreachable) refuses writes and flushes until renewed, which is what lets the
//! master promote another server once the lease has expired without two primaries
//! acknowledging writes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, Epoch, FlushGate, Lsn, OpenOptions, RetentionPolicy, Role, Volume};
use controlbridge::{BlockRole, BlockVolumeAssignment, ControlBridge};
use transport::net::{ReplicaServer, ServerConfig, Volumes};
use transport::stream::{DurabilityMode, ReplicaSpec, Replicator, StreamConfig, StreamState};
use v2bridge::LocalReplica;

/// Block size of the volumes this server creates.
pub const BLOCK_SIZE: u32 = 4096;
/// WAL size when the master asks for none.
pub const DEFAULT_WAL_BYTES: u64 = 64 << 20;

/// What went wrong, typed so callers can tell a stale master from a broken disk.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No such volume on this server.
    #[error("no volume {0:?} on this server")]
    UnknownVolume(String),
    /// The assignment is from an older epoch than the volume's.
    #[error("volume {name}: assignment at epoch {got} is older than the volume's epoch {have}")]
    Stale {
        /// The volume.
        name: String,
        /// Its epoch.
        have: u64,
        /// The assignment's.
        got: u64,
    },
    /// The request is malformed or conflicts with what exists.
    #[error("{0}")]
    Invalid(String),
    /// The volume refused I/O: not a primary, or its lease ran out.
    #[error("volume {name}: {why}")]
    NotServing {
        /// The volume.
        name: String,
        /// Why.
        why: String,
    },
    /// The volume file or its directory failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A flush the durability mode does not back.
    #[error("flush: {0}")]
    Flush(#[from] transport::stream::FlushError),
}

/// How this server runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The stable server ID the master knows it by.
    pub id: String,
    /// Where its volumes live (`NAME.vol` and `NAME.meta`).
    pub data: PathBuf,
    /// Where the replication server listens.
    pub repl_listen: SocketAddr,
    /// The cluster secret of the replication transport (none: loopback only).
    pub secret: Option<Vec<u8>>,
    /// How the volumes are scrubbed.
    pub scrub: crate::scrub::ScrubConfig,
}

/// A volume's creation parameters and durability mode, kept beside its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Bytes.
    pub size_bytes: u64,
    /// WAL bytes.
    pub wal_size_bytes: u64,
    /// The durability mode its flushes honour.
    pub mode: DurabilityMode,
}

impl VolumeMeta {
    fn encode(&self) -> String {
        format!(
            "size_bytes={}\nwal_size_bytes={}\ndurability_mode={}\n",
            self.size_bytes,
            self.wal_size_bytes,
            self.mode.as_str()
        )
    }

    fn decode(text: &str) -> Result<VolumeMeta, String> {
        let mut size = None;
        let mut wal = None;
        let mut mode = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not key=value"))?;
            match k {
                "size_bytes" => size = Some(v.parse::<u64>().map_err(|e| format!("{k}: {e}"))?),
                "wal_size_bytes" => {
                    wal = Some(v.parse::<u64>().map_err(|e| format!("{k}: {e}"))?);
                }
                "durability_mode" => mode = Some(parse_mode(v)?),
                _ => {} // unknown keys from a newer version are kept out of the way
            }
        }
        Ok(VolumeMeta {
            size_bytes: size.ok_or("size_bytes missing")?,
            wal_size_bytes: wal.ok_or("wal_size_bytes missing")?,
            mode: mode.ok_or("durability_mode missing")?,
        })
    }
}

/// A durability mode by its protocol name (`""` is `best_effort`, the master's default).
pub fn parse_mode(s: &str) -> Result<DurabilityMode, String> {
    match s {
        "" | "best_effort" => Ok(DurabilityMode::BestEffort),
        "sync_all" => Ok(DurabilityMode::SyncAll),
        "sync_quorum" => Ok(DurabilityMode::SyncQuorum),
        other => Err(format!("unknown durability mode {other:?}")),
    }
}

/// One volume's state on this server.
struct Ctl {
    vol: Arc<Volume>,
    meta: VolumeMeta,
    role: BlockRole,
    epoch: u64,
    lease_until: Option<Instant>,
    /// `lease_until`, shared with the volume's replicator: it starts no recovery of a replica
    /// (and cancels a running one) once the lease has run out, since another server may have
    /// been promoted meanwhile and the replica be its copy.
    lease_gate: Arc<Mutex<Option<Instant>>>,
    replicator: Option<Arc<Replicator>>,
    /// The replica set the replicator streams to (IDs and data addresses).
    replicas: Vec<ReplicaSpec>,
    /// The epoch whose full primary assignment `replicas` came from (persisted beside the
    /// volume as `NAME.replicas`), if any: a lease renewal, which carries no replica set, may
    /// make this server primary only at that epoch.
    replicas_epoch: Option<u64>,
    /// The flushes this server acknowledged for the volume, per epoch (since it started).
    acks: BTreeMap<u64, AckSpan>,
}

/// The flushes a server acknowledged for a volume at one epoch: how many, the first and the
/// last (wall clock, milliseconds since the Unix epoch). Two servers acknowledging at the same
/// epoch, or a server acknowledging at an epoch after another acknowledged at a newer one, is
/// a split brain; the nemesis reads these from `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckSpan {
    /// The epoch.
    pub epoch: u64,
    /// Flushes acknowledged.
    pub count: u64,
    /// The first one.
    pub first_unix_ms: u64,
    /// The last one.
    pub last_unix_ms: u64,
}

/// Most epochs a volume keeps `AckSpan`s for (the oldest go first).
const MAX_ACK_EPOCHS: usize = 64;

/// The replica set of a primary's last full assignment: `epoch=E` then `replica=ID@ADDR` lines.
fn encode_replicas(epoch: u64, specs: &[ReplicaSpec]) -> String {
    let mut out = format!("epoch={epoch}\n");
    for r in specs {
        out.push_str(&format!("replica={}@{}\n", r.id, r.addr));
    }
    out
}

fn decode_replicas(text: &str, volume: &str) -> Result<(u64, Vec<ReplicaSpec>), String> {
    let mut epoch = None;
    let mut specs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some(("epoch", v)) => {
                epoch = Some(v.parse::<u64>().map_err(|e| format!("epoch: {e}"))?)
            }
            Some(("replica", v)) => {
                let (id, addr) = v
                    .rsplit_once('@')
                    .ok_or_else(|| format!("replica {v:?} is not ID@ADDR"))?;
                specs.push(ReplicaSpec {
                    id: id.to_owned(),
                    addr: addr.parse().map_err(|e| format!("replica {v:?}: {e}"))?,
                    volume: volume.to_owned(),
                });
            }
            _ => return Err(format!("line {line:?}")),
        }
    }
    Ok((epoch.ok_or("epoch missing")?, specs))
}

/// Writes `dir/NAME.replicas` durably (temporary file, fsync, rename, fsync of the directory).
fn persist_replicas(
    dir: &Path,
    name: &str,
    epoch: u64,
    specs: &[ReplicaSpec],
) -> Result<(), NodeError> {
    use std::io::Write as _;
    let path = dir.join(format!("{name}.replicas"));
    let tmp = dir.join(format!("{name}.replicas.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(encode_replicas(epoch, specs).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| storage(path.display(), e))
}

/// What a volume looks like to the master and to people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Bytes.
    pub size_bytes: u64,
    /// Block size.
    pub block_size: u32,
    /// Epoch.
    pub epoch: u64,
    /// Role (the master's wire value).
    pub role: BlockRole,
    /// Last LSN in its WAL.
    pub head: u64,
    /// Committed LSN.
    pub committed: u64,
    /// Checkpoint LSN.
    pub checkpoint: u64,
    /// A primary with a valid lease.
    pub has_lease: bool,
    /// How long the lease still runs, in milliseconds (0 without a valid lease).
    pub lease_left_ms: u64,
    /// Bytes of the WAL ring in use.
    pub wal_used_bytes: u64,
    /// The WAL ring's size.
    pub wal_size_bytes: u64,
    /// Pins holding the volume's WAL or images (a streaming replica holds one).
    pub pins: usize,
    /// The durability mode.
    pub mode: DurabilityMode,
    /// Replica IDs and data addresses (a primary's set).
    pub replicas: Vec<(String, String)>,
    /// A replica of a primary is out of the stream.
    pub replica_degraded: bool,
    /// The volume holds an unfinished base install.
    pub needs_rebuild: bool,
    /// Per replica of a primary: its stream state, counters and running recovery.
    pub replica_states: Vec<transport::stream::ReplicaStatus>,
    /// What scrubbing found on this copy (`scrub_errors` = `damaged`, `last_scrub_time` =
    /// `last_pass_unix` in the heartbeat).
    pub scrub: v2bridge::ScrubStats,
    /// Extent blocks that failed their checksum on any read since the volume was opened.
    pub checksum_errors: u64,
    /// The flushes this server acknowledged for the volume, per epoch, oldest first.
    pub acks: Vec<AckSpan>,
}

/// Facts a master reads before promoting this server's copy of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// Epoch.
    pub epoch: u64,
    /// Committed LSN as this copy knows it.
    pub committed: u64,
    /// Last durable LSN in its WAL.
    pub head: u64,
    /// The epoch of the entry at `head` (0 for an empty log).
    pub last_entry_epoch: u64,
    /// Checkpoint.
    pub checkpoint: u64,
    /// Whether it may be promoted.
    pub eligible: bool,
    /// Why not, when not.
    pub reason: String,
}

/// The volume server's volumes.
pub struct Node {
    cfg: NodeConfig,
    volumes: Arc<Volumes>,
    repl: Mutex<Option<ReplicaServer>>,
    repl_addr: SocketAddr,
    state: Mutex<BTreeMap<String, Ctl>>,
    io: crate::metrics::IoMetrics,
    scrub_stop: Arc<AtomicBool>,
    scrubber: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Ctl {
    fn set_lease(&mut self, until: Option<Instant>) {
        self.lease_until = until;
        *self
            .lease_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.cfg.id)
            .field("data", &self.cfg.data)
            .finish_non_exhaustive()
    }
}

/// Options for a volume whose WAL ring is `wal_size_bytes`.
fn volume_options(wal_size_bytes: u64) -> OpenOptions {
    OpenOptions {
        // Nothing reaches the extent before the durability mode committed it, so a replica or
        // an old primary can always truncate what was never committed.
        flush_gate: FlushGate::Committed,
        // Keep up to half the ring of flushed entries (D45): a replica that was away for a
        // while (restarted, partitioned) is caught up from them instead of rebuilt from an
        // image. The retention yields to writers: it never holds space a writer waits for,
        // so a replica that never returns costs no write stalls, only the rebuild it then
        // needs.
        retention: RetentionPolicy {
            keep_entries: 0,
            keep_bytes: wal_size_bytes / 2,
        },
        ..OpenOptions::default()
    }
}

fn storage(what: impl std::fmt::Display, e: impl std::fmt::Display) -> NodeError {
    NodeError::Storage(format!("{what}: {e}"))
}

fn blockvol_role(r: BlockRole) -> Role {
    match r {
        BlockRole::None => Role::None,
        BlockRole::Primary => Role::Primary,
        BlockRole::Replica => Role::Replica,
        BlockRole::Stale => Role::Stale,
        BlockRole::Rebuilding => Role::Rebuilding,
        BlockRole::Draining => Role::Draining,
    }
}

fn block_role(r: Role) -> BlockRole {
    match r {
        Role::None => BlockRole::None,
        Role::Primary => BlockRole::Primary,
        Role::Replica => BlockRole::Replica,
        Role::Stale => BlockRole::Stale,
        Role::Rebuilding => BlockRole::Rebuilding,
        Role::Draining => BlockRole::Draining,
    }
}

impl Node {
    /// Opens every volume in the data directory and starts the replication server.
    pub fn start(cfg: NodeConfig) -> Result<Arc<Node>, NodeError> {
        controlbridge::validate_name(&cfg.id)
            .map_err(|e| NodeError::Invalid(format!("server id {:?}: {e}", cfg.id)))?;
        std::fs::create_dir_all(&cfg.data).map_err(|e| storage(cfg.data.display(), e))?;
        let volumes = Arc::new(Volumes::new());
        let mut state = BTreeMap::new();
        let mut names: Vec<String> = std::fs::read_dir(&cfg.data)
            .map_err(|e| storage(cfg.data.display(), e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".vol").map(str::to_owned)
            })
            .collect();
        names.sort();
        for name in names {
            let ctl = open_volume(&cfg.data, &name)?;
            volumes.insert(&name, LocalReplica::new(Arc::clone(&ctl.vol)));
            log::info!(
                "volume {name}: opened, role {:?}, epoch {}",
                ctl.role,
                ctl.epoch
            );
            state.insert(name, ctl);
        }
        let server_cfg = ServerConfig {
            secret: cfg.secret.clone(),
            ..ServerConfig::default()
        };
        let repl = ReplicaServer::start(cfg.repl_listen, server_cfg, Arc::clone(&volumes))
            .map_err(|e| storage("replication listener", e))?;
        let repl_addr = repl.local_addr();
        log::info!("server {}: replication on {repl_addr}", cfg.id);
        let scrub = cfg.scrub.clone();
        let node = Arc::new(Node {
            cfg,
            volumes,
            repl: Mutex::new(Some(repl)),
            repl_addr,
            state: Mutex::new(state),
            io: crate::metrics::IoMetrics::default(),
            scrub_stop: Arc::new(AtomicBool::new(false)),
            scrubber: Mutex::new(None),
        });
        if scrub.rate_bytes > 0 {
            let h = crate::scrub::spawn(Arc::downgrade(&node), scrub, Arc::clone(&node.scrub_stop))
                .map_err(|e| storage("scrubber thread", e))?;
            *node.scrubber.lock().unwrap_or_else(PoisonError::into_inner) = Some(h);
        }
        Ok(node)
    }

    /// What a scrub of `name` works with now: this copy, its role and epoch, and the
    /// replicas the live stream holds in sync.
    pub(crate) fn scrub_target(&self, name: &str) -> Option<crate::scrub::ScrubTarget> {
        let local = self.volumes.get(name).ok()?;
        let st = self.lock();
        let c = st.get(name)?;
        let in_sync: Vec<String> = c
            .replicator
            .as_ref()
            .map(|r| r.status())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.state == StreamState::Streaming)
            .map(|r| r.id)
            .collect();
        Some(crate::scrub::ScrubTarget {
            local,
            role: c.role,
            epoch: c.epoch,
            peers: c
                .replicas
                .iter()
                .filter(|r| in_sync.contains(&r.id))
                .cloned()
                .collect(),
        })
    }

    /// How this server connects to its peers' replication servers.
    pub(crate) fn client_config(&self) -> transport::net::ClientConfig {
        transport::net::ClientConfig {
            node: self.cfg.id.clone(),
            secret: self.cfg.secret.clone(),
            ..transport::net::ClientConfig::default()
        }
    }

    /// Runs one scrub pass over `name` now, at `cfg`'s rate (`None`: this server does not
    /// scrub it, a replica's primary does).
    pub fn scrub_now(
        &self,
        name: &str,
        cfg: &crate::scrub::ScrubConfig,
    ) -> Result<Option<crate::scrub::PassReport>, String> {
        crate::scrub::run_pass(self, name, cfg, &self.scrub_stop)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Ctl>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the frontend measured (see [`crate::metrics`]).
    pub fn io_metrics(&self) -> &crate::metrics::IoMetrics {
        &self.io
    }

    /// The server ID.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Where other servers' replicators reach this server's volumes.
    pub fn repl_addr(&self) -> SocketAddr {
        self.repl_addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data
    }

    /// Names of the volumes here.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Creates volume `name` (idempotent when it exists with the same size and mode).
    pub fn allocate(&self, name: &str, meta: VolumeMeta) -> Result<PathBuf, NodeError> {
        controlbridge::validate_name(name)
            .map_err(|e| NodeError::Invalid(format!("volume name {name:?}: {e}")))?;
        let path = self.cfg.data.join(format!("{name}.vol"));
        let mut st = self.lock();
        if let Some(c) = st.get(name) {
            if c.meta.size_bytes == meta.size_bytes && c.meta.mode == meta.mode {
                return Ok(path);
            }
            return Err(NodeError::Invalid(format!(
                "volume {name} exists with {} bytes, {}",
                c.meta.size_bytes,
                c.meta.mode.as_str()
            )));
        }
        if meta.size_bytes == 0 || !meta.size_bytes.is_multiple_of(u64::from(BLOCK_SIZE)) {
            return Err(NodeError::Invalid(format!(
                "size {} is not a positive multiple of {BLOCK_SIZE}",
                meta.size_bytes
            )));
        }
        let opts = CreateOptions {
            volume_size_bytes: meta.size_bytes,
            wal_size_bytes: meta.wal_size_bytes,
            block_size: BLOCK_SIZE,
        };
        let meta_path = self.cfg.data.join(format!("{name}.meta"));
        std::fs::write(&meta_path, meta.encode()).map_err(|e| storage(meta_path.display(), e))?;
        let vol = Volume::create(&path, &opts, &volume_options(meta.wal_size_bytes))
            .map_err(|e| storage(path.display(), e))?;
        let vol = Arc::new(vol);
        self.volumes
            .insert(name, LocalReplica::new(Arc::clone(&vol)));
        st.insert(
            name.to_owned(),
            Ctl {
                vol,
                meta,
                role: BlockRole::None,
                epoch: 0,
                lease_until: None,
                lease_gate: Arc::default(),
                replicator: None,
                replicas: Vec::new(),
                replicas_epoch: None,
                acks: BTreeMap::new(),
            },
        );
        log::info!("volume {name}: created at {}", path.display());
        Ok(path)
    }

    /// Deletes volume `name` and its files (idempotent).
    pub fn delete(&self, name: &str) -> Result<(), NodeError> {
        let ctl = self.lock().remove(name);
        let Some(ctl) = ctl else {
            return Ok(());
        };
        if let Some(r) = &ctl.replicator {
            r.stop();
        }
        self.volumes.remove(name);
        drop(ctl);
        for ext in ["vol", "meta", "replicas"] {
            let p = self.cfg.data.join(format!("{name}.{ext}"));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(storage(p.display(), e)),
            }
        }
        log::info!("volume {name}: deleted");
        Ok(())
    }

    /// Applies the master's assignment for one volume.
    pub fn apply(&self, a: &BlockVolumeAssignment) -> Result<(), NodeError> {
        let conv = ControlBridge
            .convert_assignment(a, &self.cfg.id)
            .map_err(|e| NodeError::Invalid(format!("assignment for {}: {e}", a.path)))?;
        for s in &conv.skipped {
            log::warn!(
                "volume {}: replica left out of the assignment: {s:?}",
                a.path
            );
        }
        let now = Instant::now();
        let to_stop;
        let mut to_start = None;
        {
            let mut st = self.lock();
            let ctl = st
                .get_mut(&a.path)
                .ok_or_else(|| NodeError::UnknownVolume(a.path.clone()))?;
            if a.epoch < ctl.epoch {
                return Err(NodeError::Stale {
                    name: a.path.clone(),
                    have: ctl.epoch,
                    got: a.epoch,
                });
            }
            let lease = Duration::from_millis(a.lease_ttl_ms);
            let addressless = a.replica_addrs.is_empty() && a.replica_data_addr.is_empty();
            if conv.role == BlockRole::Primary {
                let specs = replica_specs(a, &conv)?;
                let same_set = specs == ctl.replicas || addressless;
                if a.epoch == ctl.epoch && ctl.role == BlockRole::Primary && same_set {
                    // A renewal (or the same assignment again): only the lease moves.
                    ctl.set_lease(Some(now + lease));
                    return Ok(());
                }
                // An assignment that names no replicas is a renewal at the epoch whose full
                // assignment this server holds the set of, or the full assignment of a new
                // epoch of a volume without replicas (the protocol does not tell them apart).
                // At an epoch whose set this server does not know and that is not newer than
                // its own (a restarted primary that lost it), serving would acknowledge
                // flushes on this copy alone whatever the mode: wait for the full assignment.
                let renewal = addressless && ctl.replicas_epoch == Some(a.epoch);
                if addressless && !renewal && a.epoch <= ctl.epoch {
                    return Err(NodeError::Invalid(format!(
                        "volume {}: a primary assignment at epoch {} without replicas, and no \
                         replica set known for that epoch: waiting for the full assignment",
                        a.path, a.epoch
                    )));
                }
                if !renewal {
                    persist_replicas(&self.cfg.data, &a.path, a.epoch, &specs)?;
                    ctl.replicas_epoch = Some(a.epoch);
                }
                ctl.vol
                    .assign(Role::Primary, Epoch(a.epoch))
                    .map_err(|e| storage(format!("volume {}: assign primary", a.path), e))?;
                to_stop = ctl.replicator.take();
                let specs = if renewal {
                    // The set of this epoch's full assignment.
                    ctl.replicas.clone()
                } else {
                    specs
                };
                ctl.role = BlockRole::Primary;
                ctl.epoch = a.epoch;
                ctl.set_lease(Some(now + lease));
                ctl.replicas = specs.clone();
                to_start = Some((
                    Arc::clone(&ctl.vol),
                    specs,
                    ctl.meta.mode,
                    a.epoch,
                    Arc::clone(&ctl.lease_gate),
                ));
            } else {
                ctl.vol
                    .assign(blockvol_role(conv.role), Epoch(a.epoch))
                    .map_err(|e| {
                        storage(format!("volume {}: assign {:?}", a.path, conv.role), e)
                    })?;
                to_stop = ctl.replicator.take();
                ctl.role = conv.role;
                ctl.epoch = a.epoch;
                ctl.set_lease(None);
                ctl.replicas.clear();
                ctl.replicas_epoch = None;
            }
        }
        if let Some(r) = to_stop {
            r.stop();
        }
        if let Some((vol, specs, mode, epoch, gate)) = to_start {
            let mut config = StreamConfig::new(mode, &self.cfg.id, epoch);
            config.lease = Some(transport::stream::LeaseGate::new(move || {
                gate.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_some_and(|t| t > Instant::now())
            }));
            // The replicas' servers demand the cluster secret when there is one (any address
            // but loopback): the replicator proves it with the same secret.
            config.client.secret.clone_from(&self.cfg.secret);
            let n = specs.len();
            let r = Replicator::start(vol, specs, config)
                .map_err(|e| storage(format!("volume {}: replicator", a.path), e))?;
            let mut st = self.lock();
            match st.get_mut(&a.path) {
                // Still the primary at this epoch (nothing newer arrived meanwhile).
                Some(ctl) if ctl.role == BlockRole::Primary && ctl.epoch == epoch => {
                    let r = Arc::new(r);
                    spawn_committer(&a.path, &r, Arc::clone(&ctl.vol));
                    ctl.replicator = Some(r);
                }
                _ => r.stop(),
            }
            log::info!(
                "volume {}: primary at epoch {epoch}, {n} replica(s), {}",
                a.path,
                mode.as_str()
            );
        }
        Ok(())
    }

    /// Refuses I/O unless `name` is a primary with a valid lease.
    pub fn check_io(&self, name: &str) -> Result<(), NodeError> {
        let st = self.lock();
        let ctl = st
            .get(name)
            .ok_or_else(|| NodeError::UnknownVolume(name.to_owned()))?;
        let not = |why: String| {
            Err(NodeError::NotServing {
                name: name.to_owned(),
                why,
            })
        };
        if ctl.role != BlockRole::Primary {
            return not(format!("not a primary (role {:?})", ctl.role));
        }
        match ctl.lease_until {
            Some(t) if t > Instant::now() => Ok(()),
            _ => not("the primary's lease has expired".into()),
        }
    }

    /// The primary volume `name` and its replicator, for a frontend (checked like
    /// [`Node::check_io`]).
    pub fn primary(&self, name: &str) -> Result<(Arc<Volume>, Option<Arc<Replicator>>), NodeError> {
        self.check_io(name)?;
        let st = self.lock();
        let ctl = st
            .get(name)
            .ok_or_else(|| NodeError::UnknownVolume(name.to_owned()))?;
        Ok((Arc::clone(&ctl.vol), ctl.replicator.clone()))
    }

    /// Makes everything written to `name` durable as its mode requires (only while serving).
    pub fn flush(&self, name: &str) -> Result<Lsn, NodeError> {
        let (vol, replicator) = self.primary(name)?;
        let lsn = match replicator {
            Some(r) => r.flush()?,
            None => vol
                .sync()
                .map_err(|e| storage(format!("volume {name}: sync"), e))?,
        };
        // A lease that ran out while the flush waited: the acknowledgement is withheld.
        self.check_io(name)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(c) = self.lock().get_mut(name) {
            let span = c.acks.entry(c.epoch).or_insert(AckSpan {
                epoch: c.epoch,
                count: 0,
                first_unix_ms: now,
                last_unix_ms: now,
            });
            span.count += 1;
            span.last_unix_ms = now;
            while c.acks.len() > MAX_ACK_EPOCHS {
                c.acks.pop_first();
            }
        }
        Ok(lsn)
    }

    /// Wakes `name`'s shippers after writes.
    pub fn notify(&self, name: &str) {
        let r = self.lock().get(name).and_then(|c| c.replicator.clone());
        if let Some(r) = r {
            r.notify();
        }
    }

    /// Every volume, as the master and people see it.
    pub fn inventory(&self) -> Vec<VolumeInfo> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(name, c)| {
                let s = c.vol.status();
                let states = c
                    .replicator
                    .as_ref()
                    .map(|r| r.status())
                    .unwrap_or_default();
                VolumeInfo {
                    name: name.clone(),
                    path: self.cfg.data.join(format!("{name}.vol")),
                    size_bytes: c.meta.size_bytes,
                    block_size: BLOCK_SIZE,
                    epoch: c.epoch,
                    role: c.role,
                    head: s.head.0,
                    committed: s.committed.0,
                    checkpoint: s.checkpoint.0,
                    has_lease: c.role == BlockRole::Primary
                        && c.lease_until.is_some_and(|t| t > now),
                    lease_left_ms: c
                        .lease_until
                        .filter(|_| c.role == BlockRole::Primary)
                        .map_or(0, |t| {
                            u64::try_from(t.saturating_duration_since(now).as_millis())
                                .unwrap_or(u64::MAX)
                        }),
                    wal_used_bytes: s.wal_used_bytes,
                    wal_size_bytes: s.wal_size_bytes,
                    pins: s.pins_outstanding,
                    mode: c.meta.mode,
                    replicas: c
                        .replicas
                        .iter()
                        .map(|r| (r.id.clone(), r.addr.to_string()))
                        .collect(),
                    replica_degraded: states.iter().any(|r| r.state != StreamState::Streaming),
                    needs_rebuild: s.install_incomplete,
                    replica_states: states,
                    scrub: self
                        .volumes
                        .get(name)
                        .map(|l| l.scrub_stats())
                        .unwrap_or_default(),
                    checksum_errors: s.checksum_errors,
                    acks: c.acks.values().copied().collect(),
                }
            })
            .collect()
    }

    /// What the master reads before promoting this copy of `name` at `expected_epoch`.
    pub fn evidence(&self, name: &str, expected_epoch: u64) -> Result<Evidence, NodeError> {
        let st = self.lock();
        let c = st
            .get(name)
            .ok_or_else(|| NodeError::UnknownVolume(name.to_owned()))?;
        let s = c.vol.status();
        let mut reason = String::new();
        if s.install_incomplete {
            reason = "an unfinished base install".into();
        } else if c.epoch != expected_epoch {
            reason = format!("at epoch {}, expected {expected_epoch}", c.epoch);
        } else if !matches!(c.role, BlockRole::Replica | BlockRole::Primary) {
            reason = format!("role {:?}", c.role);
        }
        // The epoch of the last durable entry ranks candidates first (D53): without it a
        // deposed primary's longer log of an older epoch could win over a shorter one holding
        // newer acknowledged writes.
        let last_entry_epoch = match c.vol.entry_info(s.durable) {
            Ok(e) => e.epoch.0,
            Err(e) => {
                if reason.is_empty() {
                    reason = format!("the epoch of entry {} is unknown: {e}", s.durable.0);
                }
                0
            }
        };
        Ok(Evidence {
            epoch: c.epoch,
            committed: s.committed.0,
            // The durable head, not the head: entries this copy has not synced are not
            // evidence (a crash between the answer and the promotion drops them, and the
            // promoted copy then truncates a replica that holds them durably, acknowledged
            // writes with them; found by the network simulator, D52).
            head: s.durable.0,
            last_entry_epoch,
            checkpoint: s.checkpoint.0,
            eligible: reason.is_empty(),
            reason,
        })
    }

    /// Stops every replicator and the replication server, and closes the volumes.
    pub fn shutdown(&self) {
        self.scrub_stop.store(true, Ordering::SeqCst);
        let scrubber = self
            .scrubber
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = scrubber
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
        let replicators: Vec<Arc<Replicator>> = self
            .lock()
            .values_mut()
            .filter_map(|c| c.replicator.take())
            .collect();
        for r in replicators {
            r.stop();
        }
        if let Some(mut s) = self
            .repl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            s.stop();
        }
        self.volumes.close_all();
    }
}

/// How often a primary's committer moves the committed point when nobody flushes.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A background group commit for a primary: every `COMMIT_INTERVAL`, when entries are written
/// beyond the committed point, a flush through the replicator makes them durable as the mode
/// requires and moves the committed point, so the flusher (gated by it) can move them to the
/// extent and the WAL does not fill while a client writes a long run without flushing. A flush
/// the mode cannot back (a replica out under `sync_all`) leaves the point where it is. Ends
/// when the replicator is gone.
fn spawn_committer(name: &str, r: &Arc<Replicator>, vol: Arc<Volume>) {
    let weak = Arc::downgrade(r);
    let label = name.to_owned();
    // Weak too: a committer must never be what keeps a volume file open (and locked).
    let vol = Arc::downgrade(&vol);
    let name = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!("committer-{name}"))
        .spawn(move || {
            loop {
                std::thread::sleep(COMMIT_INTERVAL);
                let (Some(r), Some(vol)) = (weak.upgrade(), vol.upgrade()) else {
                    return;
                };
                let s = vol.status();
                drop(vol);
                if s.head > s.committed
                    && let Err(e) = r.flush()
                {
                    if matches!(e, transport::stream::FlushError::Stopped) {
                        return;
                    }
                    log::debug!("volume {name}: background commit: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("volume {label}: no committer thread: {e}");
    }
}

/// The replicator's replica set from a primary assignment: replica `<volume>/<server_id>` at its
/// data address.
fn replica_specs(
    a: &BlockVolumeAssignment,
    conv: &controlbridge::Conversion,
) -> Result<Vec<ReplicaSpec>, NodeError> {
    conv.intent
        .replicas
        .iter()
        .map(|r| {
            let data = &r.endpoint.data_addr;
            let addr = data.parse::<SocketAddr>().map_err(|e| {
                NodeError::Invalid(format!(
                    "replica {} data address {data:?}: {e}",
                    r.replica_id.as_str()
                ))
            })?;
            Ok(ReplicaSpec {
                id: r.replica_id.as_str().to_owned(),
                addr,
                volume: a.path.clone(),
            })
        })
        .collect()
}

fn open_volume(dir: &Path, name: &str) -> Result<Ctl, NodeError> {
    let meta_path = dir.join(format!("{name}.meta"));
    let text = std::fs::read_to_string(&meta_path).map_err(|e| storage(meta_path.display(), e))?;
    let meta = VolumeMeta::decode(&text).map_err(|e| storage(meta_path.display(), e))?;
    let path = dir.join(format!("{name}.vol"));
    let vol = Volume::open(&path, &volume_options(meta.wal_size_bytes))
        .map_err(|e| storage(path.display(), e))?;
    let s = vol.status();
    // The replica set of the last full primary assignment, if it was for this epoch.
    let rpath = dir.join(format!("{name}.replicas"));
    let known = match std::fs::read_to_string(&rpath) {
        Ok(text) => Some(decode_replicas(&text, name).map_err(|e| storage(rpath.display(), e))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(storage(rpath.display(), e)),
    }
    // At the volume's epoch, or newer (the assignment was recorded, the crash came before
    // the volume file was fenced at its epoch).
    .filter(|(e, _)| *e >= s.epoch.0);
    let (replicas_epoch, replicas) = match known {
        Some((e, specs)) => (Some(e), specs),
        None => (None, Vec::new()),
    };
    Ok(Ctl {
        vol: Arc::new(vol),
        meta,
        // A restarted primary comes back fenced (blockvol reports it stale) until the master
        // says otherwise.
        role: block_role(s.role),
        epoch: s.epoch.0,
        lease_until: None,
        lease_gate: Arc::default(),
        replicator: None,
        replicas,
        replicas_epoch,
        acks: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_refuses_garbage() {
        let m = VolumeMeta {
            size_bytes: 1 << 30,
            wal_size_bytes: 64 << 20,
            mode: DurabilityMode::SyncQuorum,
        };
        assert_eq!(VolumeMeta::decode(&m.encode()).unwrap(), m);
        assert!(VolumeMeta::decode("size_bytes=x").is_err());
        assert!(VolumeMeta::decode("garbage").is_err());
        assert!(VolumeMeta::decode("size_bytes=1\nwal_size_bytes=2").is_err());
        assert!(parse_mode("sync_most").is_err());
    }
}
