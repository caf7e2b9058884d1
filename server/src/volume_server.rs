//! The volume server process (`swblock volume`): a [`Node`] with its replication listener, the
//! `VolumeServer` gRPC service the master calls (allocate, delete, promotion evidence), the
//! heartbeat stream to the master that carries assignments and leases back, and the NBD
//! frontend that serves each primary's volume while its lease is valid.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::convert::{assignment_from_proto, volume_info, volume_name};
use crate::node::{Node, NodeError, VolumeMeta, parse_mode};
use crate::proto::master_pb::seaweed_client::SeaweedClient;
use crate::proto::master_pb::{BlockVolumeShortInfoMessage, Heartbeat};
use crate::proto::volume_server_pb::volume_server_server::{VolumeServer, VolumeServerServer};
use crate::proto::volume_server_pb::{
    AllocateBlockVolumeRequest, AllocateBlockVolumeResponse, QueryBlockPromotionEvidenceRequest,
    QueryBlockPromotionEvidenceResponse, VolumeServerDeleteBlockVolumeRequest,
    VolumeServerDeleteBlockVolumeResponse,
};

/// Time between heartbeats.
pub const PULSE: Duration = Duration::from_millis(500);
/// A full inventory every this many heartbeats (deltas between).
const FULL_EVERY: u32 = 5;

fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::UnknownVolume(_) => Status::not_found(e.to_string()),
        NodeError::Stale { .. } => Status::failed_precondition(e.to_string()),
        NodeError::Invalid(_) => Status::invalid_argument(e.to_string()),
        NodeError::NotServing { .. } => Status::failed_precondition(e.to_string()),
        NodeError::Storage(_) | NodeError::Flush(_) => Status::internal(e.to_string()),
    }
}

/// The `VolumeServer` service over a [`Node`].
#[derive(Debug, Clone)]
pub struct VolumeService {
    node: Arc<Node>,
    /// The NBD address answered as the frontend address of every volume.
    nbd_addr: String,
}

impl VolumeService {
    /// The service for `node`, whose NBD frontend listens at `nbd_addr`.
    pub fn new(node: Arc<Node>, nbd_addr: String) -> Self {
        VolumeService { node, nbd_addr }
    }
}

#[tonic::async_trait]
impl VolumeServer for VolumeService {
    async fn allocate_block_volume(
        &self,
        request: Request<AllocateBlockVolumeRequest>,
    ) -> Result<Response<AllocateBlockVolumeResponse>, Status> {
        let r = request.into_inner();
        let mode = parse_mode(&r.durability_mode).map_err(Status::invalid_argument)?;
        let meta = VolumeMeta {
            size_bytes: r.size_bytes,
            wal_size_bytes: if r.wal_size_bytes == 0 {
                crate::node::DEFAULT_WAL_BYTES
            } else {
                r.wal_size_bytes
            },
            mode,
        };
        let node = Arc::clone(&self.node);
        let name = r.name.clone();
        let path = tokio::task::spawn_blocking(move || node.allocate(&name, meta))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(node_status)?;
        let data = self.node.repl_addr().to_string();
        Ok(Response::new(AllocateBlockVolumeResponse {
            path: path.display().to_string(),
            iscsi_addr: self.nbd_addr.clone(),
            replica_data_addr: data.clone(),
            replica_ctrl_addr: data.clone(),
            rebuild_listen_addr: data,
            ..Default::default()
        }))
    }

    async fn volume_server_delete_block_volume(
        &self,
        request: Request<VolumeServerDeleteBlockVolumeRequest>,
    ) -> Result<Response<VolumeServerDeleteBlockVolumeResponse>, Status> {
        let name = request.into_inner().name;
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || node.delete(volume_name(&name)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(node_status)?;
        Ok(Response::new(VolumeServerDeleteBlockVolumeResponse {}))
    }

    async fn query_block_promotion_evidence(
        &self,
        request: Request<QueryBlockPromotionEvidenceRequest>,
    ) -> Result<Response<QueryBlockPromotionEvidenceResponse>, Status> {
        let r = request.into_inner();
        let ev = self
            .node
            .evidence(volume_name(&r.path), r.expected_epoch)
            .map_err(node_status)?;
        Ok(Response::new(QueryBlockPromotionEvidenceResponse {
            path: r.path,
            epoch: ev.epoch,
            committed_lsn: ev.committed,
            wal_head_lsn: ev.head,
            checkpoint_lsn: ev.checkpoint,
            eligible: ev.eligible,
            reason: ev.reason,
            health_score: if ev.eligible { 1.0 } else { 0.0 },
            last_entry_epoch: ev.last_entry_epoch,
            ..Default::default()
        }))
    }
}

/// Where the heartbeats go and what they say about this server.
#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    /// The master's gRPC address.
    pub master: String,
    /// This server's advertised host.
    pub ip: String,
    /// Its gRPC port.
    pub grpc_port: u16,
    /// Its HTTP port.
    pub http_port: u16,
}

/// Builds one heartbeat: a full inventory, or the deltas since `known` (which it updates).
fn heartbeat(
    node: &Node,
    cfg: &HeartbeatConfig,
    full: bool,
    known: &mut BTreeSet<String>,
) -> Heartbeat {
    let data = node.repl_addr().to_string();
    let inv = node.inventory();
    let names: BTreeSet<String> = inv.iter().map(|v| v.name.clone()).collect();
    let short = |name: &str| BlockVolumeShortInfoMessage {
        path: name.to_owned(),
        ..Default::default()
    };
    let mut hb = Heartbeat {
        ip: cfg.ip.clone(),
        port: u32::from(cfg.http_port),
        grpc_port: u32::from(cfg.grpc_port),
        id: node.id().to_owned(),
        ..Default::default()
    };
    if full {
        hb.block_volume_infos = inv.iter().map(|v| volume_info(v, &data)).collect();
        hb.has_no_block_volumes = inv.is_empty();
        hb.block_volume_inventory_authoritative = Some(true);
    } else {
        hb.new_block_volumes = names.difference(known).map(|n| short(n)).collect();
        hb.deleted_block_volumes = known.difference(&names).map(|n| short(n)).collect();
    }
    *known = names;
    hb
}

/// Keeps a heartbeat stream to the master open for as long as the process runs: a full
/// inventory on connect and every few pulses, deltas between, assignments applied as they
/// arrive, and a reconnect with backoff (100 ms doubling to 2 s) when the stream breaks.
pub async fn heartbeat_loop(node: Arc<Node>, cfg: HeartbeatConfig) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match heartbeat_once(&node, &cfg).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => log::warn!("heartbeat to {}: {e}", cfg.master),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn heartbeat_once(
    node: &Arc<Node>,
    cfg: &HeartbeatConfig,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.master))?
        .connect_timeout(Duration::from_secs(2));
    let mut client = SeaweedClient::new(endpoint.connect().await?);
    let (tx, rx) = mpsc::channel::<Heartbeat>(4);
    let mut known = BTreeSet::new();
    tx.send(heartbeat(node, cfg, true, &mut known)).await?;
    let mut replies = client
        .send_heartbeat(ReceiverStream::new(rx))
        .await?
        .into_inner();
    log::info!("heartbeat stream to {} open", cfg.master);
    let sender_node = Arc::clone(node);
    let sender_cfg = cfg.clone();
    let sender = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            tokio::time::sleep(PULSE).await;
            n += 1;
            let hb = heartbeat(
                &sender_node,
                &sender_cfg,
                n.is_multiple_of(FULL_EVERY),
                &mut known,
            );
            if tx.send(hb).await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        match replies.message().await {
            Ok(Some(resp)) => {
                for a in &resp.block_volume_assignments {
                    let a = assignment_from_proto(a);
                    let node = Arc::clone(node);
                    let applied =
                        tokio::task::spawn_blocking(move || node.apply(&a).map(|()| a)).await;
                    match applied {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => log::warn!("assignment refused: {e}"),
                        Err(e) => log::error!("assignment task: {e}"),
                    }
                }
            }
            Ok(None) => break Err("the master closed the stream".into()),
            Err(e) => break Err(e.into()),
        }
    };
    sender.abort();
    result
}

/// Serves the `VolumeServer` service on `listener` until the process ends.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    service: VolumeService,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .serve_with_incoming(
            VolumeServerServer::new(service),
            TcpListenerStream::new(listener),
        )
        .await
}
