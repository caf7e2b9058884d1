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
use transport::stream::StreamState;

use crate::node::{Node, VolumeInfo};

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

/// One replica of a primary, as JSON.
fn replica_json(head: u64, r: &transport::stream::ReplicaStatus) -> serde_json::Value {
    let state = match &r.state {
        StreamState::Joining => "joining".to_owned(),
        StreamState::Streaming => "streaming".to_owned(),
        StreamState::Degraded(_) => "degraded".to_owned(),
    };
    let recovery = r.recovery.as_ref().map(|p| {
        let (done, total, unit) = if p.base_bytes_total > 0 {
            (p.base_bytes_done, p.base_bytes_total, "bytes")
        } else {
            (p.entries_done, p.entries_total, "entries")
        };
        serde_json::json!({
            "path": p.path,
            "done": done,
            "total": total,
            "unit": unit,
            "percent": p.fraction().map(|f| (f * 1000.0).round() / 10.0),
            "elapsed_secs": p.elapsed.as_secs_f64(),
            "eta_secs": p.eta().map(|d| d.as_secs_f64()),
            "entries_applied": p.entries_done,
            "base_bytes_done": p.base_bytes_done,
            "base_bytes_total": p.base_bytes_total,
        })
    });
    serde_json::json!({
        "id": r.id,
        "state": state,
        "degraded_reason": match &r.state {
            StreamState::Degraded(why) => Some(why.as_str()),
            _ => None,
        },
        "shipped": r.shipped.0,
        "durable": r.durable.0,
        "lag": head.saturating_sub(r.durable.0),
        "joins": r.joins,
        "last_path": r.last_path,
        "recoveries": {
            "catch_up": r.catch_ups,
            "truncate": r.truncations,
            "rebuild": r.rebuilds,
        },
        "streamed_entries": r.streamed,
        "barriers": r.barriers,
        "rebuild_bytes_sent": r.base_bytes_sent,
        "rebuild_bytes_resumed": r.base_bytes_resumed,
        "recovery": recovery,
    })
}

/// One volume of a server, as JSON (`/status` and `swblock block status`).
pub fn volume_json(v: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "role": format!("{:?}", v.role).to_lowercase(),
        "epoch": v.epoch,
        "has_lease": v.has_lease,
        "lease_left_ms": v.lease_left_ms,
        "size_bytes": v.size_bytes,
        "durability_mode": v.mode.as_str(),
        "head": v.head,
        "committed": v.committed,
        "checkpoint": v.checkpoint,
        "wal_used_bytes": v.wal_used_bytes,
        "wal_size_bytes": v.wal_size_bytes,
        "pins": v.pins,
        "needs_rebuild": v.needs_rebuild,
        "checksum_errors": v.checksum_errors,
        "acks": v.acks.iter().map(|a| serde_json::json!({
            "epoch": a.epoch,
            "count": a.count,
            "first_unix_ms": a.first_unix_ms,
            "last_unix_ms": a.last_unix_ms,
        })).collect::<Vec<_>>(),
        "scrub": {
            "damaged": v.scrub.damaged,
            "found": v.scrub.found,
            "repaired": v.scrub.repaired,
            "passes": v.scrub.passes,
            "last_pass_unix": v.scrub.last_pass_unix,
        },
        "replicas": v.replica_states.iter().map(|r| replica_json(v.head, r)).collect::<Vec<_>>(),
    })
}

/// A volume server's status as JSON.
pub fn volume_status(node: &Node) -> serde_json::Value {
    let vols: Vec<serde_json::Value> = node.inventory().iter().map(volume_json).collect();
    serde_json::json!({
        "id": node.id(),
        "repl_addr": node.repl_addr().to_string(),
        "volumes": vols,
    })
}

/// Prometheus (OpenMetrics) text for a volume server.
pub fn volume_metrics(node: &Node) -> String {
    crate::metrics::render(node.io_metrics(), &node.inventory())
}

/// Serves a volume server's `/status` and `/metrics` on `listener` forever.
pub async fn serve_volume(listener: tokio::net::TcpListener, node: Arc<Node>) {
    serve_with(listener, move |path| match path {
        "/status" => Some((
            "application/json".into(),
            format!("{:#}\n", volume_status(&node)),
        )),
        "/metrics" => Some((
            "application/openmetrics-text; version=1.0.0; charset=utf-8".into(),
            volume_metrics(&node),
        )),
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
