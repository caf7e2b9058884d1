//! The generated gRPC clients and servers work together over a real loopback socket: a
//! `Seaweed` server whose `SendHeartbeat` answers every heartbeat with an assignment built from
//! it, and a `VolumeServer` whose `AllocateBlockVolume` answers from its request; every other
//! RPC is `Unimplemented`. Every wait is bounded.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use server::proto::master_pb::seaweed_client::SeaweedClient;
use server::proto::master_pb::seaweed_server::{Seaweed, SeaweedServer};
use server::proto::master_pb::{
    BlockVolumeAssignment, BlockVolumeShortInfoMessage, CreateBlockVolumeRequest,
    CreateBlockVolumeResponse, DeleteBlockVolumeRequest, DeleteBlockVolumeResponse, Heartbeat,
    HeartbeatResponse, LookupBlockVolumeRequest, LookupBlockVolumeResponse,
};
use server::proto::volume_server_pb::volume_server_client::VolumeServerClient;
use server::proto::volume_server_pb::volume_server_server::{VolumeServer, VolumeServerServer};
use server::proto::volume_server_pb::{
    AllocateBlockVolumeRequest, AllocateBlockVolumeResponse, QueryBlockPromotionEvidenceRequest,
    QueryBlockPromotionEvidenceResponse, VolumeServerDeleteBlockVolumeRequest,
    VolumeServerDeleteBlockVolumeResponse,
};

/// The bound on every single wait (connect, send, receive, shutdown).
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A master that answers each heartbeat with one primary assignment: the first new block
/// volume's path, at an epoch counting the heartbeats of the stream.
struct EchoMaster;

type HeartbeatResponses = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Seaweed for EchoMaster {
    type SendHeartbeatStream = HeartbeatResponses;

    async fn send_heartbeat(
        &self,
        request: Request<Streaming<Heartbeat>>,
    ) -> Result<Response<HeartbeatResponses>, Status> {
        let mut heartbeats = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut epoch = 0;
            loop {
                let reply = match heartbeats.message().await {
                    Ok(Some(hb)) => {
                        epoch += 1;
                        let path = hb
                            .new_block_volumes
                            .first()
                            .map(|v| v.path.clone())
                            .unwrap_or_default();
                        Ok(HeartbeatResponse {
                            leader: String::new(),
                            duplicated_uuids: Vec::new(),
                            block_volume_assignments: vec![BlockVolumeAssignment {
                                path,
                                epoch,
                                role: 1,
                                lease_ttl_ms: 30_000,
                                replica_server_id: hb.id,
                                ..Default::default()
                            }],
                        })
                    }
                    // The volume server closed its side: close ours.
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_block_volume(
        &self,
        _: Request<CreateBlockVolumeRequest>,
    ) -> Result<Response<CreateBlockVolumeResponse>, Status> {
        Err(Status::unimplemented("CreateBlockVolume"))
    }

    async fn delete_block_volume(
        &self,
        _: Request<DeleteBlockVolumeRequest>,
    ) -> Result<Response<DeleteBlockVolumeResponse>, Status> {
        Err(Status::unimplemented("DeleteBlockVolume"))
    }

    async fn lookup_block_volume(
        &self,
        _: Request<LookupBlockVolumeRequest>,
    ) -> Result<Response<LookupBlockVolumeResponse>, Status> {
        Err(Status::unimplemented("LookupBlockVolume"))
    }
}

/// A volume server that allocates by name: the path and addresses follow from the request.
struct EchoVolumeServer;

#[tonic::async_trait]
impl VolumeServer for EchoVolumeServer {
    async fn allocate_block_volume(
        &self,
        request: Request<AllocateBlockVolumeRequest>,
    ) -> Result<Response<AllocateBlockVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("empty volume name"));
        }
        Ok(Response::new(AllocateBlockVolumeResponse {
            path: format!("/data/vs1/blk/{}.blk", req.name),
            replica_data_addr: "127.0.0.1:4260".into(),
            replica_ctrl_addr: "127.0.0.1:4261".into(),
            rebuild_listen_addr: "127.0.0.1:4262".into(),
            ..Default::default()
        }))
    }

    async fn volume_server_delete_block_volume(
        &self,
        _: Request<VolumeServerDeleteBlockVolumeRequest>,
    ) -> Result<Response<VolumeServerDeleteBlockVolumeResponse>, Status> {
        Err(Status::unimplemented("VolumeServerDeleteBlockVolume"))
    }

    async fn query_block_promotion_evidence(
        &self,
        _: Request<QueryBlockPromotionEvidenceRequest>,
    ) -> Result<Response<QueryBlockPromotionEvidenceResponse>, Status> {
        Err(Status::unimplemented("QueryBlockPromotionEvidence"))
    }
}

/// A server for one service on 127.0.0.1 (an ephemeral port); dropping or sending on
/// `shutdown` stops it.
struct Running {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.shutdown.send(());
        bounded("server shutdown", self.task)
            .await
            .expect("server task")
            .expect("server ran without error");
    }

    async fn channel(&self) -> Channel {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint URI")
            .connect_timeout(WAIT);
        bounded("connect", endpoint.connect())
            .await
            .expect("connects")
    }
}

macro_rules! serve {
    ($service:expr) => {{
        let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into()).expect("bind 127.0.0.1:0");
        let addr = incoming.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(Server::builder().serve_with_incoming_shutdown(
            $service,
            incoming,
            async {
                let _ = stop.await;
            },
        ));
        Running {
            addr,
            shutdown,
            task,
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// Tests

fn heartbeat(id: &str, new_volume: &str) -> Heartbeat {
    Heartbeat {
        ip: "127.0.0.1".into(),
        port: 8080,
        id: id.into(),
        new_block_volumes: vec![BlockVolumeShortInfoMessage {
            path: new_volume.into(),
            volume_size: 1 << 30,
            block_size: 4096,
            disk_type: "ssd".into(),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn heartbeat_stream_two_heartbeats_two_assignments() {
    let master = serve!(SeaweedServer::new(EchoMaster));
    let mut client = SeaweedClient::new(master.channel().await);

    let (heartbeats, outbound) = mpsc::channel(4);
    let mut responses = bounded(
        "open SendHeartbeat",
        client.send_heartbeat(ReceiverStream::new(outbound)),
    )
    .await
    .expect("SendHeartbeat opens")
    .into_inner();

    // One at a time: each assignment answers the heartbeat just sent.
    for (epoch, path) in [(1, "/data/vs1/blk/a.blk"), (2, "/data/vs1/blk/b.blk")] {
        bounded("send", heartbeats.send(heartbeat("vs1", path)))
            .await
            .expect("stream open");
        let response = bounded("receive", responses.message())
            .await
            .expect("no stream error")
            .expect("a response per heartbeat");
        assert_eq!(
            response.block_volume_assignments,
            vec![BlockVolumeAssignment {
                path: path.into(),
                epoch,
                role: 1,
                lease_ttl_ms: 30_000,
                replica_server_id: "vs1".into(),
                ..Default::default()
            }]
        );
    }

    // Closing our side ends the master's.
    drop(heartbeats);
    let end = bounded("end of stream", responses.message())
        .await
        .expect("clean end");
    assert_eq!(end, None);

    drop(client);
    master.stop().await;
}

#[tokio::test]
async fn master_rpcs_not_served_are_unimplemented() {
    let master = serve!(SeaweedServer::new(EchoMaster));
    let channel = master.channel().await;
    let mut client = SeaweedClient::new(channel.clone());
    let status = bounded(
        "CreateBlockVolume",
        client.create_block_volume(CreateBlockVolumeRequest {
            name: "vol1".into(),
            size_bytes: 1 << 30,
            ..Default::default()
        }),
    )
    .await
    .expect_err("not implemented");
    assert_eq!(status.code(), Code::Unimplemented);

    // A service the server does not serve at all (here: the volume server's) gets the same.
    let mut wrong = VolumeServerClient::new(channel);
    let status = bounded(
        "AllocateBlockVolume at a master",
        wrong.allocate_block_volume(AllocateBlockVolumeRequest::default()),
    )
    .await
    .expect_err("no such service here");
    assert_eq!(status.code(), Code::Unimplemented);

    drop((client, wrong));
    master.stop().await;
}

#[tokio::test]
async fn allocate_block_volume_round_trip() {
    let vs = serve!(VolumeServerServer::new(EchoVolumeServer));
    let mut client = VolumeServerClient::new(vs.channel().await);

    let response = bounded(
        "AllocateBlockVolume",
        client.allocate_block_volume(AllocateBlockVolumeRequest {
            name: "vol1".into(),
            size_bytes: 1 << 30,
            disk_type: "ssd".into(),
            durability_mode: "sync_all".into(),
            wal_size_bytes: 64 << 20,
        }),
    )
    .await
    .expect("allocated")
    .into_inner();
    assert_eq!(response.path, "/data/vs1/blk/vol1.blk");
    assert_eq!(response.rebuild_listen_addr, "127.0.0.1:4262");

    // The server's own error reaches the client as sent.
    let status = bounded(
        "AllocateBlockVolume without a name",
        client.allocate_block_volume(AllocateBlockVolumeRequest::default()),
    )
    .await
    .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "empty volume name");

    let status = bounded(
        "QueryBlockPromotionEvidence",
        client.query_block_promotion_evidence(QueryBlockPromotionEvidenceRequest {
            path: response.path,
            expected_epoch: 1,
        }),
    )
    .await
    .expect_err("not implemented");
    assert_eq!(status.code(), Code::Unimplemented);

    drop(client);
    vs.stop().await;
}
