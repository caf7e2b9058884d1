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
    /// Serve NBD on an address other than loopback (NBD has no authentication here: only on
    /// a network you trust, such as a test cluster's network namespaces).
    #[arg(long)]
    pub nbd_allow_remote: bool,
    /// MiB per second a scrub pass reads from this server's copies (each in-sync replica
    /// reads as much); 0 turns scrubbing off.
    #[arg(long, default_value_t = 32)]
    pub scrub_rate_mib: u64,
    /// Seconds from the start of one scrub pass over a volume to the next (the first starts
    /// this long after the server, at most 10 minutes).
    #[arg(long, default_value_t = 86_400.0)]
    pub scrub_interval_s: f64,
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
    /// HTTP status listen address (`swblock block list|status` ask it).
    #[arg(long, default_value = "127.0.0.1:9334")]
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
    /// List every volume the master knows: size, mode, epoch, primary and replicas.
    List {
        /// The master's HTTP status address (`master_http` in cluster.json).
        #[arg(long, default_value = "127.0.0.1:9334")]
        master_http: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One volume as its servers see it: each copy's role, epoch, lease, head, committed and
    /// checkpoint, and from the primary each replica's state, lag and recovery progress.
    Status {
        /// Volume name.
        name: String,
        /// The master's HTTP status address (`master_http` in cluster.json).
        #[arg(long, default_value = "127.0.0.1:9334")]
        master_http: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        scrub: crate::scrub::ScrubConfig {
            rate_bytes: a.scrub_rate_mib.saturating_mul(1 << 20),
            interval: Duration::try_from_secs_f64(a.scrub_interval_s)
                .map_err(|e| format!("--scrub-interval-s {}: {e}", a.scrub_interval_s))?,
            ..crate::scrub::ScrubConfig::default()
        },
    })?;
    let nbd = crate::frontend::start_nbd(Arc::clone(&node), a.nbd, a.nbd_allow_remote)?;
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
    match cmd {
        BlockCommand::List { master_http, json } => {
            let l = block_list(&master_http)?;
            if json {
                println!("{l}");
            } else {
                print!("{}", list_table(&l));
            }
            return Ok(());
        }
        BlockCommand::Status {
            name,
            master_http,
            json,
        } => {
            let st = block_status(&master_http, &name)?;
            if json {
                println!("{st}");
            } else {
                print!("{}", status_text(&st));
            }
            return Ok(());
        }
        _ => {}
    }
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
            BlockCommand::List { .. } | BlockCommand::Status { .. } => {}
        }
        Ok(())
    })
}

/// GETs `path` from the HTTP status server at `addr` and parses its JSON.
fn get_json(addr: &str, path: &str) -> Result<serde_json::Value, Error> {
    let body = crate::cluster::http_get(addr, path)?;
    Ok(serde_json::from_str(&body).map_err(|e| format!("GET {addr}{path}: {e}"))?)
}

/// Every volume the master at `master_http` knows, as JSON:
/// `{"volumes": [{"name", "size_bytes", "durability_mode", "epoch", "primary", "replicas"}],
/// "alive": [server ids]}`.
pub fn block_list(master_http: &str) -> Result<serde_json::Value, Error> {
    let m = get_json(master_http, "/status")?;
    let vols: Vec<serde_json::Value> = m["volumes"]
        .as_object()
        .map(|o| o.values().cloned().collect())
        .unwrap_or_default();
    Ok(serde_json::json!({ "volumes": vols, "alive": m["alive"] }))
}

fn list_table(l: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<24} {:>10} {:<12} {:>6} {:<12} replicas\n",
        "name", "size", "mode", "epoch", "primary"
    );
    for v in l["volumes"].as_array().into_iter().flatten() {
        let replicas: Vec<&str> = v["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:<12} {:>6} {:<12} {}",
            v["name"].as_str().unwrap_or("?"),
            human_bytes(v["size_bytes"].as_u64().unwrap_or(0)),
            v["durability_mode"].as_str().unwrap_or("?"),
            v["epoch"].as_u64().unwrap_or(0),
            v["primary"].as_str().unwrap_or("?"),
            replicas.join(",")
        );
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, m) in UNITS {
        if b >= m && b.is_multiple_of(m) {
            return format!("{}{u}", b / m);
        }
    }
    b.to_string()
}

/// One volume as its servers report it, as JSON: the master's record (`epoch`, `primary`,
/// `replicas`, `durability_mode`, `size_bytes`) and `copies`, one per server holding it:
/// `{"server", "alive", "status", "error"}` where `status` is that server's `/status` entry
/// for the volume (role, epoch, lease, head, committed, checkpoint and, on the primary, each
/// replica's state, lag and recovery progress), or `null` with `error` when the server
/// cannot be reached.
pub fn block_status(master_http: &str, name: &str) -> Result<serde_json::Value, Error> {
    let m = get_json(master_http, "/status")?;
    let rec = m["volumes"]
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no volume named {name:?}"))?;
    let alive: Vec<&str> = m["alive"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let mut servers: Vec<String> = rec["primary"]
        .as_str()
        .map(str::to_owned)
        .into_iter()
        .collect();
    servers.extend(
        rec["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned)),
    );
    let mut copies = Vec::new();
    for id in servers {
        let http = m["servers"][&id]["http"].as_str().unwrap_or_default();
        let found = get_json(http, "/status").and_then(|s| {
            s["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == name)
                .cloned()
                .ok_or_else(|| format!("server {id} does not hold {name}").into())
        });
        let (status, error) = match found {
            Ok(v) => (v, serde_json::Value::Null),
            Err(e) => (serde_json::Value::Null, e.to_string().into()),
        };
        copies.push(serde_json::json!({
            "server": id,
            "alive": alive.contains(&id.as_str()),
            "status": status,
            "error": error,
        }));
    }
    let mut out = rec;
    out["copies"] = copies.into();
    Ok(out)
}

fn status_text(st: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} {}, epoch {}, primary {}",
        st["name"].as_str().unwrap_or("?"),
        human_bytes(st["size_bytes"].as_u64().unwrap_or(0)),
        st["durability_mode"].as_str().unwrap_or("?"),
        st["epoch"].as_u64().unwrap_or(0),
        st["primary"].as_str().unwrap_or("?"),
    );
    for c in st["copies"].as_array().into_iter().flatten() {
        let id = c["server"].as_str().unwrap_or("?");
        let s = &c["status"];
        if s.is_null() {
            let _ = writeln!(
                out,
                "  {id:<12} unreachable ({}): {}",
                if c["alive"] == true { "alive" } else { "dead" },
                c["error"].as_str().unwrap_or("")
            );
            continue;
        }
        let wal = match (s["wal_used_bytes"].as_u64(), s["wal_size_bytes"].as_u64()) {
            (Some(u), Some(t)) if t > 0 => format!("{:.0}%", u as f64 * 100.0 / t as f64),
            _ => "?".into(),
        };
        let lease = if s["has_lease"] == true {
            format!(
                ", lease {:.1} s",
                s["lease_left_ms"].as_u64().unwrap_or(0) as f64 / 1e3
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {id:<12} {:<8} epoch {} head {} committed {} checkpoint {} wal {wal}{lease}",
            s["role"].as_str().unwrap_or("?"),
            s["epoch"].as_u64().unwrap_or(0),
            s["head"].as_u64().unwrap_or(0),
            s["committed"].as_u64().unwrap_or(0),
            s["checkpoint"].as_u64().unwrap_or(0),
        );
        for r in s["replicas"].as_array().into_iter().flatten() {
            let mut line = format!(
                "    -> {:<20} {:<10} lag {} durable {}",
                r["id"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["lag"].as_u64().unwrap_or(0),
                r["durable"].as_u64().unwrap_or(0),
            );
            if let Some(why) = r["degraded_reason"].as_str() {
                let _ = write!(line, " ({why})");
            }
            let p = &r["recovery"];
            if !p.is_null() {
                let _ = write!(
                    line,
                    "; {} {}/{} {}",
                    p["path"].as_str().unwrap_or("?"),
                    p["done"].as_u64().unwrap_or(0),
                    p["total"].as_u64().unwrap_or(0),
                    p["unit"].as_str().unwrap_or(""),
                );
                if let Some(pc) = p["percent"].as_f64() {
                    let _ = write!(line, " ({pc:.1}%)");
                }
                match p["eta_secs"].as_f64() {
                    Some(eta) => {
                        let _ = write!(line, ", ETA {eta:.1} s");
                    }
                    None => line.push_str(", ETA unknown"),
                }
            } else if let Some(path) = r["last_path"].as_str().filter(|p| !p.is_empty()) {
                let _ = write!(line, "; joined by {path}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
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
