//! The HTTP status endpoints (hyper, HTTP/1.1, GET only): a volume server's `/status` (JSON:
//! every volume's role, epoch, lease, head, committed and checkpoint; a primary's replicas with
//! their state and lag) and `/metrics` (Prometheus text), and the master's `/status` (volumes
//! and live servers).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::master::grpc::Master;
use crate::node::Node;

type Body = Full<Bytes>;

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn serve_with<F>(listener: tokio::net::TcpListener, route: F)
where
    F: Fn(&str) -> Option<(String, String)> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let route = Arc::clone(&route);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let route = Arc::clone(&route);
                async move {
                    let r = if req.method() != Method::GET {
                        reply(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "GET only\n".into(),
                        )
                    } else {
                        match route(req.uri().path()) {
                            Some((ct, body)) => reply(StatusCode::OK, &ct, body),
                            None => {
                                reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
                            }
                        }
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("http connection from {peer}: {e}");
            }
        });
    }
}

/// A volume server's status as JSON.
pub fn volume_status(node: &Node) -> serde_json::Value {
    let vols: Vec<serde_json::Value> = node
        .inventory()
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "role": format!("{:?}", v.role).to_lowercase(),
                "epoch": v.epoch,
                "has_lease": v.has_lease,
                "size_bytes": v.size_bytes,
                "durability_mode": v.mode.as_str(),
                "head": v.head,
                "committed": v.committed,
                "checkpoint": v.checkpoint,
                "needs_rebuild": v.needs_rebuild,
                "replicas": v.replica_states.iter().map(|(id, state, durable)| serde_json::json!({
                    "id": id,
                    "state": state,
                    "durable": durable,
                    "lag": v.head.saturating_sub(*durable),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "id": node.id(),
        "repl_addr": node.repl_addr().to_string(),
        "volumes": vols,
    })
}

/// Prometheus text for a volume server.
pub fn volume_metrics(node: &Node) -> String {
    let mut out = String::new();
    let inv = node.inventory();
    let gauge = |out: &mut String, name: &str, help: &str| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
    };
    gauge(
        &mut out,
        "swblock_volume_head_lsn",
        "Last LSN in the volume's WAL.",
    );
    for v in &inv {
        out.push_str(&format!(
            "swblock_volume_head_lsn{{volume=\"{}\"}} {}\n",
            v.name, v.head
        ));
    }
    gauge(&mut out, "swblock_volume_committed_lsn", "Committed LSN.");
    for v in &inv {
        out.push_str(&format!(
            "swblock_volume_committed_lsn{{volume=\"{}\"}} {}\n",
            v.name, v.committed
        ));
    }
    gauge(&mut out, "swblock_volume_epoch", "The volume's epoch.");
    for v in &inv {
        out.push_str(&format!(
            "swblock_volume_epoch{{volume=\"{}\"}} {}\n",
            v.name, v.epoch
        ));
    }
    gauge(
        &mut out,
        "swblock_volume_has_lease",
        "1 when a primary holds a valid lease.",
    );
    for v in &inv {
        out.push_str(&format!(
            "swblock_volume_has_lease{{volume=\"{}\"}} {}\n",
            v.name,
            u8::from(v.has_lease)
        ));
    }
    gauge(
        &mut out,
        "swblock_replica_lag_entries",
        "Entries a replica is behind its primary.",
    );
    for v in &inv {
        for (id, _, durable) in &v.replica_states {
            out.push_str(&format!(
                "swblock_replica_lag_entries{{volume=\"{}\",replica=\"{id}\"}} {}\n",
                v.name,
                v.head.saturating_sub(*durable)
            ));
        }
    }
    out
}

/// Serves a volume server's `/status` and `/metrics` on `listener` forever.
pub async fn serve_volume(listener: tokio::net::TcpListener, node: Arc<Node>) {
    serve_with(listener, move |path| match path {
        "/status" => Some((
            "application/json".into(),
            format!("{:#}\n", volume_status(&node)),
        )),
        "/metrics" => Some(("text/plain; version=0.0.4".into(), volume_metrics(&node))),
        _ => None,
    })
    .await;
}

/// The master's status as JSON: volumes with their placement, and the servers alive.
pub fn master_status(master: &Master) -> serde_json::Value {
    let (persisted, alive) = master.snapshot();
    serde_json::json!({
        "alive": alive,
        "servers": persisted.servers,
        "volumes": persisted.volumes,
    })
}

/// Serves the master's `/status` on `listener` forever.
pub async fn serve_master(listener: tokio::net::TcpListener, master: Arc<Master>) {
    serve_with(listener, move |path| match path {
        "/status" => Some((
            "application/json".into(),
            format!("{:#}\n", master_status(&master)),
        )),
        _ => None,
    })
    .await;
}
