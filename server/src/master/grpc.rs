//! The development master's gRPC side: the `Seaweed` service volume servers and clients call
//! (heartbeat stream, block volume create, delete, lookup), the `VolumeServer` RPCs it makes
//! (allocate, delete, promotion evidence), a tick that declares dead servers and runs
//! failovers, and its state persisted in `DATA/master.json` after every change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use super::state::{
    Action, Candidate, MasterError, MasterState, Persisted, ServerAddrs, Timing, VolumeRecord,
};
use crate::convert::{assignment_to_proto, volume_name};
use crate::proto::master_pb::seaweed_server::{Seaweed, SeaweedServer};
use crate::proto::master_pb::{
    CreateBlockVolumeRequest, CreateBlockVolumeResponse, DeleteBlockVolumeRequest,
    DeleteBlockVolumeResponse, Heartbeat, HeartbeatResponse, LookupBlockVolumeRequest,
    LookupBlockVolumeResponse,
};
use crate::proto::volume_server_pb::volume_server_client::VolumeServerClient;
use crate::proto::volume_server_pb::{
    AllocateBlockVolumeRequest, QueryBlockPromotionEvidenceRequest,
    VolumeServerDeleteBlockVolumeRequest,
};

/// How long the master waits for one RPC to a volume server.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the master looks for dead servers and failovers.
const TICK: Duration = Duration::from_millis(200);

/// How the master runs.
#[derive(Clone, Debug)]
pub struct MasterOptions {
    /// Where its state lives.
    pub data: PathBuf,
    /// Where it listens (gRPC).
    pub listen: SocketAddr,
    /// Where its HTTP status listens.
    pub http: SocketAddr,
    /// Leases and dead-server detection.
    pub timing: Timing,
}

/// The master: its state and where it is persisted.
pub struct Master {
    state: Mutex<MasterState>,
    file: PathBuf,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn status(e: MasterError) -> Status {
    match e {
        MasterError::UnknownVolume(_) => Status::not_found(e.to_string()),
        MasterError::Exists(_) => Status::already_exists(e.to_string()),
        MasterError::NotEnoughServers { .. } => Status::failed_precondition(e.to_string()),
        MasterError::Invalid(_) => Status::invalid_argument(e.to_string()),
    }
}

impl Master {
    /// Loads the state in `data` (or starts empty).
    pub fn open(data: &Path, timing: Timing) -> std::io::Result<Master> {
        std::fs::create_dir_all(data)?;
        let file = data.join("master.json");
        let persisted: Persisted = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", file.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        log::info!(
            "master state: {} volume(s), {} server(s) known",
            persisted.volumes.len(),
            persisted.servers.len()
        );
        Ok(Master {
            state: Mutex::new(MasterState::new(timing, persisted, Instant::now())),
            file,
        })
    }

    fn lock(&self) -> MutexGuard<'_, MasterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the persisted state: a temporary file, fsynced, renamed over the old one.
    fn persist(&self, p: &Persisted) {
        let r = (|| -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
            let tmp = self.file.with_extension("json.tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &self.file)?;
            if let Some(dir) = self.file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            log::error!("persisting {}: {e}", self.file.display());
        }
    }

    /// Runs `f` on the state and persists it if `f` changed what is persisted.
    fn update<T>(&self, f: impl FnOnce(&mut MasterState) -> T) -> T {
        let (out, changed) = {
            let mut st = self.lock();
            let before = st.persisted.clone();
            let out = f(&mut st);
            let changed = (st.persisted != before).then(|| st.persisted.clone());
            (out, changed)
        };
        if let Some(p) = changed {
            self.persist(&p);
        }
        out
    }

    /// A snapshot of the persisted state and the live servers (for status output).
    pub fn snapshot(&self) -> (Persisted, Vec<String>) {
        let st = self.lock();
        (st.persisted.clone(), st.alive())
    }

    fn on_heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatResponse, Status> {
        if controlbridge::validate_name(&hb.id).is_err() {
            return Err(Status::invalid_argument(format!(
                "heartbeat without a valid server id ({:?})",
                hb.id
            )));
        }
        let addrs = ServerAddrs {
            grpc: format!("{}:{}", hb.ip, hb.grpc_port),
            http: format!("{}:{}", hb.ip, hb.port),
            data: hb
                .block_volume_infos
                .iter()
                .map(|v| v.replica_data_addr.clone())
                .find(|a| !a.is_empty())
                .unwrap_or_default(),
            nbd: String::new(),
        };
        let full = !hb.block_volume_infos.is_empty() || hb.has_no_block_volumes;
        let inventory = full.then(|| {
            hb.block_volume_infos
                .iter()
                .map(|v| (volume_name(&v.path).to_owned(), v.epoch, v.role))
                .collect()
        });
        let out = self.update(|st| st.heartbeat(&hb.id, addrs, inventory, Instant::now()));
        Ok(HeartbeatResponse {
            block_volume_assignments: out.iter().map(assignment_to_proto).collect(),
            ..Default::default()
        })
    }

    async fn client(
        &self,
        id: &str,
    ) -> Result<VolumeServerClient<tonic::transport::Channel>, Status> {
        let addr = self
            .lock()
            .addrs(id)
            .map(|a| a.grpc)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| Status::unavailable(format!("no address known for server {id}")))?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(RPC_TIMEOUT)
            .timeout(RPC_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("server {id} at {addr}: {e}")))?;
        Ok(VolumeServerClient::new(channel))
    }

    async fn allocate(&self, id: &str, r: &CreateBlockVolumeRequest) -> Result<(), Status> {
        let mut c = self.client(id).await?;
        let resp = c
            .allocate_block_volume(AllocateBlockVolumeRequest {
                name: r.name.clone(),
                size_bytes: r.size_bytes,
                disk_type: r.disk_type.clone(),
                durability_mode: r.durability_mode.clone(),
                wal_size_bytes: r.wal_size_bytes,
            })
            .await?
            .into_inner();
        self.update(|st| {
            st.learn_addrs(
                id,
                &ServerAddrs {
                    data: resp.replica_data_addr.clone(),
                    nbd: resp.iscsi_addr.clone(),
                    ..ServerAddrs::default()
                },
            );
        });
        Ok(())
    }

    async fn delete_on(&self, id: &str, name: &str) -> Result<(), Status> {
        let mut c = self.client(id).await?;
        c.volume_server_delete_block_volume(VolumeServerDeleteBlockVolumeRequest {
            name: name.to_owned(),
        })
        .await?;
        Ok(())
    }

    /// Asks each candidate for its promotion evidence and promotes the best one.
    async fn failover(self: Arc<Self>, volume: String, epoch: u64, candidates: Vec<String>) {
        let mut answers = Vec::new();
        for id in &candidates {
            let r = async {
                let mut c = self.client(id).await?;
                c.query_block_promotion_evidence(QueryBlockPromotionEvidenceRequest {
                    path: volume.clone(),
                    expected_epoch: epoch,
                })
                .await
            }
            .await;
            match r {
                Ok(ev) => {
                    let ev = ev.into_inner();
                    log::info!(
                        "volume {volume}: {id} at epoch {} head {} (of epoch {}) committed {} \
                         eligible {} {}",
                        ev.epoch,
                        ev.wal_head_lsn,
                        ev.last_entry_epoch,
                        ev.committed_lsn,
                        ev.eligible,
                        ev.reason
                    );
                    answers.push(Candidate {
                        server: id.clone(),
                        epoch: ev.epoch,
                        head: ev.wal_head_lsn,
                        last_entry_epoch: ev.last_entry_epoch,
                        committed: ev.committed_lsn,
                        eligible: ev.eligible,
                    });
                }
                Err(e) => log::warn!("volume {volume}: evidence from {id}: {e}"),
            }
        }
        let promoted = self.update(|st| st.promote(&volume, &answers));
        match promoted {
            Some(id) => log::warn!("volume {volume}: {id} promoted"),
            None => log::warn!("volume {volume}: no candidate promoted yet"),
        }
    }

    fn lookup(&self, name: &str) -> Result<LookupBlockVolumeResponse, Status> {
        let st = self.lock();
        let v = st.volume(name).map_err(status)?;
        Ok(LookupBlockVolumeResponse {
            volume_server: v.primary.clone(),
            iscsi_addr: st.addrs(&v.primary).map(|a| a.nbd).unwrap_or_default(),
            capacity_bytes: v.size_bytes,
            replica_server: v.replicas.first().cloned().unwrap_or_default(),
            replica_factor: u32::try_from(v.replicas.len() + 1).unwrap_or(u32::MAX),
            replica_servers: v.replicas.clone(),
            durability_mode: v.durability_mode.clone(),
            ..Default::default()
        })
    }
}

/// The `Seaweed` service over a shared [`Master`].
#[derive(Debug, Clone)]
pub struct SeaweedService {
    master: Arc<Master>,
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Seaweed for SeaweedService {
    type SendHeartbeatStream = HeartbeatStream;

    async fn send_heartbeat(
        &self,
        request: Request<tonic::Streaming<Heartbeat>>,
    ) -> Result<Response<Self::SendHeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let master = Arc::clone(&self.master);
        tokio::spawn(async move {
            loop {
                let hb = match inbound.message().await {
                    Ok(Some(hb)) => hb,
                    Ok(None) => break,
                    Err(e) => {
                        log::info!("heartbeat stream ended: {e}");
                        break;
                    }
                };
                let reply = master.on_heartbeat(&hb);
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_block_volume(
        &self,
        request: Request<CreateBlockVolumeRequest>,
    ) -> Result<Response<CreateBlockVolumeResponse>, Status> {
        let r = request.into_inner();
        crate::node::parse_mode(&r.durability_mode).map_err(Status::invalid_argument)?;
        if r.size_bytes == 0
            || !r
                .size_bytes
                .is_multiple_of(u64::from(crate::node::BLOCK_SIZE))
        {
            return Err(Status::invalid_argument(format!(
                "size {} is not a positive multiple of {}",
                r.size_bytes,
                crate::node::BLOCK_SIZE
            )));
        }
        let mode = if r.durability_mode.is_empty() {
            "best_effort".to_owned()
        } else {
            r.durability_mode.clone()
        };
        let m = &self.master;
        let existing = m.lock().volume(&r.name).ok().cloned();
        if let Some(v) = existing {
            if v.size_bytes == r.size_bytes && v.durability_mode == mode {
                return Ok(Response::new(create_response(m, &v)));
            }
            return Err(status(MasterError::Exists(r.name)));
        }
        let rf = usize::try_from(r.replica_factor.max(1)).unwrap_or(1);
        let servers = m.lock().place(&r.name, rf).map_err(status)?;
        let mut done: Vec<String> = Vec::new();
        for id in &servers {
            if let Err(e) = m.allocate(id, &r).await {
                for d in &done {
                    let _ = m.delete_on(d, &r.name).await;
                }
                return Err(Status::unavailable(format!("allocating on {id}: {e}")));
            }
            done.push(id.clone());
        }
        let rec = VolumeRecord {
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            wal_size_bytes: if r.wal_size_bytes == 0 {
                crate::node::DEFAULT_WAL_BYTES
            } else {
                r.wal_size_bytes
            },
            durability_mode: mode,
            epoch: 1,
            primary: servers[0].clone(),
            replicas: servers[1..].to_vec(),
        };
        m.update(|st| st.created(rec.clone()));
        log::info!(
            "volume {}: created, primary {}, replicas {:?}",
            rec.name,
            rec.primary,
            rec.replicas
        );
        Ok(Response::new(create_response(m, &rec)))
    }

    async fn delete_block_volume(
        &self,
        request: Request<DeleteBlockVolumeRequest>,
    ) -> Result<Response<DeleteBlockVolumeResponse>, Status> {
        let name = request.into_inner().name;
        let m = &self.master;
        let v = m.lock().volume(&name).cloned().map_err(status)?;
        for id in std::iter::once(&v.primary).chain(&v.replicas) {
            if let Err(e) = m.delete_on(id, &name).await {
                log::warn!("volume {name}: delete on {id}: {e} (its copy stays)");
            }
        }
        m.update(|st| st.deleted(&name));
        Ok(Response::new(DeleteBlockVolumeResponse {}))
    }

    async fn lookup_block_volume(
        &self,
        request: Request<LookupBlockVolumeRequest>,
    ) -> Result<Response<LookupBlockVolumeResponse>, Status> {
        Ok(Response::new(
            self.master.lookup(&request.into_inner().name)?,
        ))
    }
}

fn create_response(m: &Master, v: &VolumeRecord) -> CreateBlockVolumeResponse {
    let st = m.lock();
    CreateBlockVolumeResponse {
        volume_id: v.name.clone(),
        volume_server: v.primary.clone(),
        iscsi_addr: st.addrs(&v.primary).map(|a| a.nbd).unwrap_or_default(),
        capacity_bytes: v.size_bytes,
        replica_server: v.replicas.first().cloned().unwrap_or_default(),
        replica_servers: v.replicas.clone(),
        ..Default::default()
    }
}

/// Runs the master until the process ends: binds `opts.listen` and `opts.http`, calls `ready`
/// with the bound gRPC and HTTP addresses, then serves.
pub async fn serve(
    opts: MasterOptions,
    ready: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let master = Arc::new(Master::open(&opts.data, opts.timing)?);
    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    let http = tokio::net::TcpListener::bind(opts.http).await?;
    let http_addr = http.local_addr()?;
    tokio::spawn(crate::http::serve_master(http, Arc::clone(&master)));
    ready(addr, http_addr);
    let ticker = Arc::clone(&master);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let actions = ticker.lock().tick(Instant::now());
            for a in actions {
                let Action::CollectEvidence {
                    volume,
                    epoch,
                    candidates,
                } = a;
                tokio::spawn(Arc::clone(&ticker).failover(volume, epoch, candidates));
            }
        }
    });
    tonic::transport::Server::builder()
        .serve_with_incoming(
            SeaweedServer::new(SeaweedService { master }),
            TcpListenerStream::new(listener),
        )
        .await?;
    Ok(())
}
