//! An in-process cluster of volume servers: each server is a [`BlockService`] over a
//! [`DataDirBackend`] that keeps its volumes as blockvol files in its own data directory, and
//! servers reach each other's volumes through a shared [`Fabric`] keyed by address, the seam
//! where a network transport would go.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockvol::{BlockVolError, CreateOptions, FlushGate, OpenOptions, Role, Volume};
use controlbridge::{
    BackendError, BlockRole, BlockService, BlockVolumeAssignment, ReplicaAddr, Route, VolumeBackend,
};
use engine::{Endpoint, Epoch, ReplicaHandshake, SessionId, StorageAdapter};
use v2bridge::convert::{handshake, to_engine};
use v2bridge::{BlockVolStorage, BridgeIo, Lineage, LocalReplica, ReplicaTarget, TargetError};

#[derive(Default)]
struct FabricInner {
    replicas: BTreeMap<(String, String), LocalReplica>,
    primaries: BTreeMap<(String, String), Arc<BlockVolStorage>>,
    down: BTreeSet<String>,
}

/// The in-process "network": which replica volume answers at a data address, which primary
/// answers at a rebuild address, and which addresses are down.
#[derive(Default)]
pub struct Fabric {
    inner: Mutex<FabricInner>,
}

impl Fabric {
    /// An empty fabric.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, FabricInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `addr` unreachable (or reachable again).
    pub fn set_down(&self, addr: &str, down: bool) {
        let mut g = self.lock();
        if down {
            g.down.insert(addr.to_owned());
        } else {
            g.down.remove(addr);
        }
    }

    fn reachable(g: &FabricInner, addr: &str) -> Result<(), BackendError> {
        if g.down.contains(addr) {
            return Err(BackendError::unavailable(format!("{addr} unreachable")));
        }
        Ok(())
    }

    fn replica(&self, addr: &str, volume: &str) -> Result<LocalReplica, BackendError> {
        let g = self.lock();
        Self::reachable(&g, addr)?;
        g.replicas
            .get(&(addr.to_owned(), volume.to_owned()))
            .cloned()
            .ok_or_else(|| BackendError::unavailable(format!("no replica of {volume} at {addr}")))
    }

    fn primary(&self, addr: &str, volume: &str) -> Result<Arc<BlockVolStorage>, BackendError> {
        let g = self.lock();
        Self::reachable(&g, addr)?;
        g.primaries
            .get(&(addr.to_owned(), volume.to_owned()))
            .cloned()
            .ok_or_else(|| BackendError::unavailable(format!("no primary of {volume} at {addr}")))
    }
}

/// One server's identity, addresses and volume geometry.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Stable server ID (the master's registry key; never an address).
    pub server_id: String,
    /// Where this server's replicas receive data.
    pub data_addr: String,
    /// Where this server's primaries serve rebuilds.
    pub rebuild_addr: String,
    /// Data directory.
    pub dir: PathBuf,
    /// Geometry of volumes this server creates.
    pub create: CreateOptions,
    /// How volumes are opened; the flush gate is always `Committed` (see `open_or_create`).
    pub open: OpenOptions,
}

/// A volume server's backend: blockvol files in `dir`, reached through the fabric.
pub struct DataDirBackend {
    cfg: ServerConfig,
    fabric: Arc<Fabric>,
    volumes: BTreeMap<String, Arc<Volume>>,
    storages: BTreeMap<String, Arc<BlockVolStorage>>,
    replicas: BTreeMap<String, LocalReplica>,
    /// Tells this backend instance (this run of the server) apart from earlier ones: part of
    /// the driver in every lineage it stamps (see `lineage`).
    instance: u64,
}

/// A value that differs between backend instances: a process-wide counter mixed with the
/// process ID and the time, so two runs of a server never share one.
fn instance_nonce() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl DataDirBackend {
    /// A backend for `cfg` on `fabric`.
    pub fn new(cfg: ServerConfig, fabric: Arc<Fabric>) -> Self {
        DataDirBackend {
            cfg,
            fabric,
            volumes: BTreeMap::new(),
            storages: BTreeMap::new(),
            replicas: BTreeMap::new(),
            instance: instance_nonce(),
        }
    }

    /// The server's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// An open volume.
    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.get(name).cloned()
    }

    /// The path of a volume's file.
    pub fn volume_path(&self, name: &str) -> PathBuf {
        self.cfg.dir.join(format!("{name}.vol"))
    }

    /// Forgets an open volume (and its fabric registrations), as a process crash would: the
    /// file keeps whatever was written. The next assignment reopens it.
    pub fn crash_volume(&mut self, name: &str) {
        self.volumes.remove(name);
        self.storages.remove(name);
        self.replicas.remove(name);
        let mut g = self.fabric.lock();
        g.replicas
            .remove(&(self.cfg.data_addr.clone(), name.to_owned()));
        g.primaries
            .remove(&(self.cfg.rebuild_addr.clone(), name.to_owned()));
    }

    fn open_or_create(&mut self, name: &str) -> Result<Arc<Volume>, BackendError> {
        if let Some(v) = self.volumes.get(name) {
            return Ok(Arc::clone(v));
        }
        let path = self.volume_path(name);
        // Every volume flushes only up to the committed LSN the replication layer sets, so a
        // replica can always truncate an uncommitted tail and a primary can always pin a full
        // base exactly at committed.
        let opts = OpenOptions {
            flush_gate: FlushGate::Committed,
            ..self.cfg.open.clone()
        };
        let vol = if path.exists() {
            Volume::open(&path, &opts)
        } else {
            Volume::create(&path, &self.cfg.create, &opts)
        }
        .map_err(|e| volume_error(format!("open {}", path.display()), &e))?;
        let vol = Arc::new(vol);
        self.volumes.insert(name.to_owned(), Arc::clone(&vol));
        Ok(vol)
    }

    fn local_storage(&self, volume: &str) -> Result<Arc<BlockVolStorage>, BackendError> {
        self.storages
            .get(volume)
            .cloned()
            .ok_or_else(|| BackendError::refused(format!("{volume} is not a primary here")))
    }

    /// The lineage of a session this server drives. Session IDs are only ordered within one
    /// registry, and a restarted server has a new registry whose IDs start again at 1, so the
    /// driver is this backend instance, not just the server: otherwise every replica that had
    /// accepted a higher session from the server's previous run would refuse the new run's
    /// recoveries at the same epoch (found by the simulator).
    fn lineage(&self, epoch: Epoch, session: SessionId) -> Lineage {
        let driver = format!("{}#{:016x}", self.cfg.server_id, self.instance);
        Lineage::new(
            &driver,
            v2bridge::convert::epoch_to_blockvol(epoch),
            session.get(),
        )
    }
}

/// A blockvol failure as a backend error: a refusal when the volume refused the request in
/// its current state (a stale or regressing epoch, a wrong role, a closed or read-only volume),
/// an I/O error otherwise (the file, its checksums, its recovery).
pub(crate) fn volume_error(context: String, e: &BlockVolError) -> BackendError {
    let message = format!("{context}: {e}");
    match e {
        BlockVolError::StaleEpoch { .. }
        | BlockVolError::EpochRegression { .. }
        | BlockVolError::WrongRole { .. }
        | BlockVolError::Closed
        | BlockVolError::ReadOnly
        | BlockVolError::InvalidArgument(_) => BackendError::refused(message),
        _ => BackendError::io(message),
    }
}

/// A replica's answer as a backend error: unavailable when it could not be reached, refused
/// when it fenced the request, an I/O error when its storage or the data failed.
pub(crate) fn target_error(context: String, e: &TargetError) -> BackendError {
    let message = format!("{context}: {e}");
    match e {
        TargetError::Transport(_) => BackendError::unavailable(message),
        TargetError::Fenced(_) | TargetError::Protocol(_) => BackendError::refused(message),
        _ => BackendError::io(message),
    }
}

/// The blockvol role that carries a control-plane role.
pub(crate) fn blockvol_role(role: BlockRole) -> Role {
    match role {
        BlockRole::None => Role::None,
        BlockRole::Primary => Role::Primary,
        BlockRole::Replica => Role::Replica,
        BlockRole::Stale => Role::Stale,
        BlockRole::Rebuilding => Role::Rebuilding,
        BlockRole::Draining => Role::Draining,
    }
}

impl VolumeBackend for DataDirBackend {
    type Io = BridgeIo<LocalReplica>;

    fn apply_role(
        &mut self,
        volume: &str,
        role: BlockRole,
        epoch: Epoch,
        _lease_ttl_ms: u64,
    ) -> Result<(), BackendError> {
        let vol = self.open_or_create(volume)?;
        vol.assign(
            blockvol_role(role),
            v2bridge::convert::epoch_to_blockvol(epoch),
        )
        .map_err(|e| volume_error(format!("assign {volume}"), &e))?;
        let key_data = (self.cfg.data_addr.clone(), volume.to_owned());
        let key_rebuild = (self.cfg.rebuild_addr.clone(), volume.to_owned());
        let mut g = self.fabric.lock();
        g.replicas.remove(&key_data);
        g.primaries.remove(&key_rebuild);
        match role {
            BlockRole::Primary => {
                self.replicas.remove(volume);
                let storage = self
                    .storages
                    .entry(volume.to_owned())
                    .or_insert_with(|| Arc::new(BlockVolStorage::new(Arc::clone(&vol))));
                g.primaries.insert(key_rebuild, Arc::clone(storage));
            }
            BlockRole::Replica | BlockRole::Rebuilding => {
                self.storages.remove(volume);
                let replica = self
                    .replicas
                    .entry(volume.to_owned())
                    .or_insert_with(|| LocalReplica::new(Arc::clone(&vol)));
                g.replicas.insert(key_data, replica.clone());
            }
            BlockRole::None | BlockRole::Stale | BlockRole::Draining => {
                self.storages.remove(volume);
                self.replicas.remove(volume);
            }
        }
        Ok(())
    }

    fn primary_storage(
        &mut self,
        volume: &str,
        rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        let s = match rebuild_addr {
            None => self.local_storage(volume)?,
            Some(addr) => self.fabric.primary(addr, volume)?,
        };
        Ok(s as Arc<dyn StorageAdapter>)
    }

    fn replica_handshake(
        &mut self,
        volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        let mut target = self.fabric.replica(&endpoint.data_addr, volume)?;
        let reply = target
            .handshake()
            .map_err(|e| target_error(format!("handshake with {}", endpoint.data_addr), &e))?;
        Ok(handshake(&reply))
    }

    fn local_handshake(&mut self, volume: &str) -> Option<ReplicaHandshake> {
        let reply = self.replicas.get(volume)?.clone().handshake().ok()?;
        Some(handshake(&reply))
    }

    fn transfer_io(
        &mut self,
        volume: &str,
        route: Route<'_>,
        epoch: Epoch,
        session: SessionId,
    ) -> Result<Self::Io, BackendError> {
        let lineage = self.lineage(epoch, session);
        let (storage, target) = match route {
            Route::Push { endpoint } => (
                self.local_storage(volume)?,
                self.fabric.replica(&endpoint.data_addr, volume)?,
            ),
            Route::Pull { rebuild_addr } => {
                let target = self.replicas.get(volume).cloned().ok_or_else(|| {
                    BackendError::refused(format!("{volume} is not a replica here"))
                })?;
                (self.fabric.primary(rebuild_addr, volume)?, target)
            }
        };
        let committed = to_engine(storage.volume().status().committed);
        Ok(BridgeIo::new(storage, target, lineage, committed))
    }
}

/// A volume server: its block service over a data-directory backend.
pub type Server = BlockService<DataDirBackend>;

/// Builds a server named `server_id` with its data directory under `root`.
pub fn server(
    root: &Path,
    server_id: &str,
    create: CreateOptions,
    open: OpenOptions,
    fabric: &Arc<Fabric>,
) -> Result<Server, String> {
    let dir = root.join(server_id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let cfg = ServerConfig {
        server_id: server_id.to_owned(),
        data_addr: format!("{server_id}:3260"),
        rebuild_addr: format!("{server_id}:3270"),
        dir,
        create,
        open,
    };
    Ok(BlockService::new(
        server_id,
        DataDirBackend::new(cfg, Arc::clone(fabric)),
    ))
}

/// The master's assignment of `volume` at `epoch` with wire role `role` (1 primary, 2 replica,
/// 4 rebuilding), listing `replicas` by server ID at the addresses [`server`] gives them.
pub fn assignment(volume: &str, epoch: u64, role: u32, replicas: &[&str]) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: volume.into(),
        epoch,
        role,
        lease_ttl_ms: 30_000,
        replica_addrs: replicas
            .iter()
            .map(|r| ReplicaAddr {
                data_addr: format!("{r}:3260"),
                ctrl_addr: format!("{r}:3261"),
                server_id: (*r).to_owned(),
            })
            .collect(),
        ..BlockVolumeAssignment::default()
    }
}
