//! The `swblock` subcommands (argument types and what each runs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::master::grpc::{MasterOptions, serve};
use crate::master::state::Timing;
use crate::node::{Node, NodeConfig};
use crate::proto::master_pb::seaweed_client::SeaweedClient;
use crate::proto::master_pb::{
    CreateBlockVolumeRequest, DeleteBlockVolumeRequest, LookupBlockVolumeRequest,
};
use crate::volume_server::{HeartbeatConfig, VolumeService, heartbeat_loop, serve_grpc};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// `swblock volume`.
#[derive(Args, Debug, Clone)]
pub struct VolumeArgs {
    /// Stable server ID (what the master knows this server by).
    #[arg(long)]
    pub id: String,
    /// Data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// The master's gRPC address.
    #[arg(long, default_value = "127.0.0.1:9333")]
    pub master: String,
    /// gRPC listen address (the master's calls).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc: SocketAddr,
    /// Replication listen address (other servers' replicators).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub repl: SocketAddr,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub nbd: SocketAddr,
    /// HTTP status listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// File holding the cluster secret of the replication transport (without one, loopback
    /// only).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
}

/// `swblock master`.
#[derive(Args, Debug, Clone)]
pub struct MasterArgs {
    /// Data directory (its state file).
    #[arg(long)]
    pub data: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:9333")]
    pub listen: SocketAddr,
    /// HTTP status listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// Lease granted to primaries, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    pub lease_ms: u64,
    /// A server silent this long (ms) is dead.
    #[arg(long, default_value_t = 3000)]
    pub dead_after_ms: u64,
}

/// `swblock block ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum BlockCommand {
    /// Create a volume.
    Create {
        /// Volume name.
        name: String,
        /// Size (bytes, or with K, M, G suffix).
        #[arg(long)]
        size: String,
        /// Copies (primary included).
        #[arg(long, default_value_t = 3)]
        rf: u32,
        /// Durability mode: best_effort, sync_all, sync_quorum.
        #[arg(long, default_value = "sync_all")]
        mode: String,
        /// The master.
        #[arg(long, default_value = "127.0.0.1:9333")]
        master: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Where a volume is served.
    Lookup {
        /// Volume name.
        name: String,
        /// The master.
        #[arg(long, default_value = "127.0.0.1:9333")]
        master: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume.
    Delete {
        /// Volume name.
        name: String,
        /// The master.
        #[arg(long, default_value = "127.0.0.1:9333")]
        master: String,
    },
}

/// Parses `64M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown suffix {c:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map_err(|e| format!("size {s:?}: {e}"))?
        .checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs a volume server until killed. Prints one line when every listener is bound:
/// `ready id=ID grpc=ADDR repl=ADDR nbd=ADDR http=ADDR`.
pub fn run_volume(a: VolumeArgs) -> Result<(), Error> {
    let secret = match &a.secret_file {
        Some(p) => Some(std::fs::read(p)?.trim_ascii().to_vec()),
        None => None,
    };
    let node = Node::start(NodeConfig {
        id: a.id.clone(),
        data: a.data.clone(),
        repl_listen: a.repl,
        secret,
    })?;
    let nbd = crate::frontend::start_nbd(Arc::clone(&node), a.nbd)?;
    let nbd_addr = nbd.local_addr();
    let rt = runtime()?;
    rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(a.grpc).await?;
        let grpc_addr = grpc.local_addr()?;
        let http = tokio::net::TcpListener::bind(a.http).await?;
        let http_addr = http.local_addr()?;
        println!(
            "ready id={} grpc={grpc_addr} repl={} nbd={nbd_addr} http={http_addr}",
            a.id,
            node.repl_addr()
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::spawn(crate::http::serve_volume(http, Arc::clone(&node)));
        tokio::spawn(heartbeat_loop(
            Arc::clone(&node),
            HeartbeatConfig {
                master: a.master.clone(),
                ip: grpc_addr.ip().to_string(),
                grpc_port: grpc_addr.port(),
                http_port: http_addr.port(),
            },
        ));
        serve_grpc(grpc, VolumeService::new(node, nbd_addr.to_string())).await?;
        drop(nbd);
        Ok(())
    })
}

/// Runs the development master until killed. Prints `ready grpc=ADDR` when bound.
pub fn run_master(a: MasterArgs) -> Result<(), Error> {
    let rt = runtime()?;
    rt.block_on(serve(
        MasterOptions {
            data: a.data,
            listen: a.listen,
            http: a.http,
            timing: Timing {
                lease_ttl: Duration::from_millis(a.lease_ms),
                dead_after: Duration::from_millis(a.dead_after_ms),
                ..Timing::default()
            },
        },
        |addr, http| {
            println!("ready grpc={addr} http={http}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
    ))
}

async fn master_client(master: &str) -> Result<SeaweedClient<tonic::transport::Channel>, Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{master}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    Ok(SeaweedClient::new(endpoint.connect().await?))
}

/// Runs an operator command.
pub fn run_block(cmd: BlockCommand) -> Result<(), Error> {
    let rt = runtime()?;
    rt.block_on(async move {
        match cmd {
            BlockCommand::Create {
                name,
                size,
                rf,
                mode,
                master,
                json,
            } => {
                let size_bytes = parse_size(&size)?;
                let mut c = master_client(&master).await?;
                let r = c
                    .create_block_volume(CreateBlockVolumeRequest {
                        name: name.clone(),
                        size_bytes,
                        replica_factor: rf,
                        durability_mode: mode,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": name,
                            "primary": r.volume_server,
                            "replicas": r.replica_servers,
                            "capacity_bytes": r.capacity_bytes,
                            "nbd_uri": nbd_uri(&r.iscsi_addr, &name),
                        })
                    );
                } else {
                    println!(
                        "created {name}: primary {}, replicas {}, {}",
                        r.volume_server,
                        r.replica_servers.join(", "),
                        nbd_uri(&r.iscsi_addr, &name)
                    );
                }
            }
            BlockCommand::Lookup { name, master, json } => {
                let mut c = master_client(&master).await?;
                let r = c
                    .lookup_block_volume(LookupBlockVolumeRequest { name: name.clone() })
                    .await?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": name,
                            "primary": r.volume_server,
                            "replicas": r.replica_servers,
                            "replica_factor": r.replica_factor,
                            "capacity_bytes": r.capacity_bytes,
                            "durability_mode": r.durability_mode,
                            "nbd_uri": nbd_uri(&r.iscsi_addr, &name),
                        })
                    );
                } else {
                    println!(
                        "{name}: primary {}, replicas {}, {} bytes, {}, {}",
                        r.volume_server,
                        r.replica_servers.join(", "),
                        r.capacity_bytes,
                        r.durability_mode,
                        nbd_uri(&r.iscsi_addr, &name)
                    );
                }
            }
            BlockCommand::Delete { name, master } => {
                let mut c = master_client(&master).await?;
                c.delete_block_volume(DeleteBlockVolumeRequest { name: name.clone() })
                    .await?;
                println!("deleted {name}");
            }
        }
        Ok(())
    })
}

/// The NBD URI of export `name` at `addr` (empty when no address is known).
pub fn nbd_uri(addr: &str, name: &str) -> String {
    if addr.is_empty() {
        String::new()
    } else {
        format!("nbd://{addr}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
