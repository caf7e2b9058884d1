//! Measurements over the network (issue 11): the engine's catch-up and rebuild to a replica
//! behind a `transport` replica server on loopback, the live stream's replicated writes under
//! `sync_all`, and the time a replica that missed entries needs to rejoin under a writer. Each
//! ratio is against a physical reference measured in the same run: the same bytes through a
//! plain loopback socket into a file with an fdatasync, or the same writes and syncs on local
//! files. The replica server runs on threads of this process (its socket is real; a process
//! boundary adds nothing a socket does not).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockvol::{Role, Volume};
use transport::net::{ClientConfig, RemoteReplica, ReplicaServer, ServerConfig, Volumes};
use transport::stream::{DurabilityMode, ReplicaSpec, Replicator, StreamConfig, StreamState};
use v2bridge::LocalReplica;

use super::Ctx;
use hdrhistogram::Histogram;

use super::measure::{
    MIB, Metric, Target, histogram, interleaved, latency, median, mib_per_s, ms, record, spread,
    timed,
};
use super::recovery::{
    CATCHUP_BLOCKS, catchup_primary, catchup_with, check_catchup, create_gated, rebuild_primary,
    rebuild_replica, rebuild_with, same_image,
};
use super::store::{BS, ENTRY_BYTES, plain_file, source, wal_for};

/// A replica server on loopback serving `vol` as `vol1`.
fn serve(vol: &Arc<Volume>) -> Result<ReplicaServer, String> {
    let volumes = Arc::new(Volumes::new());
    volumes.insert("vol1", LocalReplica::new(Arc::clone(vol)));
    ReplicaServer::start(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        ServerConfig::default(),
        volumes,
    )
    .map_err(|e| e.to_string())
}

fn connect(server: &ReplicaServer) -> Result<RemoteReplica, String> {
    RemoteReplica::connect(server.local_addr(), "vol1", &ClientConfig::default())
        .map_err(|e| e.to_string())
}

/// The physical reference for moving `bytes` to another place: a plain loopback socket
/// written in 1 MiB pieces into a preallocated file, then fdatasync and a one-byte answer.
/// Returns the time.
fn socket_to_file(ctx: &Ctx, bytes: u64) -> Result<Duration, String> {
    let path = ctx.scratch.path("net_socket.base");
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("addr: {e}"))?;
    let file = plain_file(&path, bytes)?;
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = vec![0u8; MIB as usize];
        let mut file = file;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("recv: {e}"))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(|e| format!("write: {e}"))?;
        }
        file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        s.write_all(&[1]).map_err(|e| format!("answer: {e}"))
    });
    let src = source(256);
    let (d, ()) = timed(|| {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let mut off = 0u64;
        while off < bytes {
            let len = (bytes - off).min(MIB) as usize;
            s.write_all(&src[..len]).map_err(|e| format!("send: {e}"))?;
            off += len as u64;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).map_err(|e| format!("answer: {e}"))
    })?;
    receiver
        .join()
        .map_err(|_| "receiver panicked".to_owned())??;
    let _ = std::fs::remove_file(&path);
    Ok(d)
}

fn net_catchup_once(
    ctx: &Ctx,
    storage: &Arc<v2bridge::BlockVolStorage>,
    n: u64,
) -> Result<f64, String> {
    let path = ctx.scratch.path("net_catchup.replica");
    let vol = Arc::new(create_gated(&path, CATCHUP_BLOCKS * BS as u64, wal_for(n))?);
    vol.assign(Role::Replica, blockvol::Epoch(1))
        .map_err(|e| format!("assign replica: {e}"))?;
    let server = serve(&vol)?;
    let (d, report) = catchup_with(storage, connect(&server)?)?;
    check_catchup(&report, n)?;
    if vol.status().durable.0 != n {
        return Err(format!(
            "replica durable at {}, expected {n}",
            vol.status().durable
        ));
    }
    drop(server);
    drop(vol);
    let _ = std::fs::remove_file(&path);
    Ok(mib_per_s(n * BS as u64, d))
}

pub fn net_catchup(ctx: &Ctx) -> Result<Metric, String> {
    let sizes: [u64; 2] = ctx.size([10_000, 100_000], [1_000, 4_000]);
    let mut rows = Vec::new();
    for n in sizes {
        let (storage, ppath) = catchup_primary(ctx, n)?;
        let (base, s) = interleaved(
            ctx.plan(),
            || {
                Ok(mib_per_s(
                    n * BS as u64,
                    socket_to_file(ctx, n * ENTRY_BYTES)?,
                ))
            },
            || net_catchup_once(ctx, &storage, n),
        )?;
        drop(storage);
        let _ = std::fs::remove_file(&ppath);
        rows.push((n, median(&s), s, median(&base)));
    }
    // The table's row is the size with the lower ratio.
    let (n, value, _, base) = rows
        .iter()
        .min_by(|a, b| (a.1 / a.3).total_cmp(&(b.1 / b.3)))
        .cloned()
        .ok_or("no size ran")?;
    let detail = rows
        .iter()
        .map(|(n, m, s, b)| {
            format!(
                "{n} entries: {} MiB/s ({}), socket reference {} MiB/s, ratio {}",
                super::measure::fmt_num(*m),
                spread(s),
                super::measure::fmt_num(*b),
                super::measure::fmt_num(m / b)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Metric {
        name: "net_catchup",
        unit: "MiB/s",
        value,
        baseline: Some(base),
        ratio: value / base,
        target: Target::AtLeast(0.7),
        ceiling: Some(base),
        ceiling_what: "the baseline itself (a plain loopback socket into a file + fdatasync)"
            .into(),
        latency_us: None,
        what: format!(
            "engine catch-up over TCP (CatchUpExecutor over BridgeIo and RemoteReplica to a \
             replica server on loopback) of an empty replica to {n} committed 4 KiB entries, \
             handshake to final barrier (the worse of {} and {} entries)",
            sizes[0], sizes[1]
        ),
        baseline_what: "the same ring bytes (entries x 4160) through a plain loopback socket \
                        into a preallocated file, fdatasync, one-byte answer"
            .into(),
        detail,
    })
}

pub fn net_rebuild_full(ctx: &Ctx) -> Result<Metric, String> {
    let volume = ctx.size(1024 * MIB, 32 * MIB);
    let (storage, ppath, _) = rebuild_primary(ctx, "net_rebuild.primary", volume, |_| true)?;
    let (replica, rpath) = rebuild_replica(ctx, "net_rebuild.replica", volume)?;
    let server = serve(&replica)?;
    let mut last = None;
    let (b, s) = interleaved(
        ctx.plan(),
        || Ok(ms(socket_to_file(ctx, volume)?)),
        || {
            let r = rebuild_with(&storage, connect(&server)?)?;
            let took = ms(r.took);
            last = Some(r.report);
            Ok(took)
        },
    )?;
    same_image(storage.volume(), &replica)?;
    let rep = last.ok_or("no rebuild ran")?;
    drop(server);
    drop(replica);
    drop(storage);
    let _ = std::fs::remove_file(&ppath);
    let _ = std::fs::remove_file(&rpath);
    let (bm, sm) = (median(&b), median(&s));
    let rate = |t_ms: f64| volume as f64 / MIB as f64 / (t_ms / 1e3);
    Ok(Metric {
        name: "net_rebuild_full",
        unit: "MiB/s",
        value: rate(sm),
        baseline: Some(rate(bm)),
        ratio: bm / sm,
        target: Target::AtLeast(0.7),
        ceiling: Some(rate(bm)),
        ceiling_what: "the baseline itself (a plain loopback socket into a file + fdatasync)"
            .into(),
        latency_us: None,
        what: format!(
            "engine full rebuild over TCP (RebuildExecutor over BridgeIo and RemoteReplica, base \
             chunks pipelined under the credit window) of a {} MiB volume with every block \
             written (path {}, {} chunks)",
            volume / MIB,
            rep.path,
            rep.steps
        ),
        baseline_what: format!(
            "{} MiB through a plain loopback socket into a preallocated file, fdatasync",
            volume / MIB
        ),
        detail: format!(
            "{} reps (median); rebuild {} ms, socket copy {} ms; replica digest equals the \
             primary's",
            s.len(),
            spread(&s),
            spread(&b)
        ),
    })
}

/// A volume as a server runs it: the background flusher on, gated by the committed point.
fn create_served(
    path: &std::path::Path,
    volume_bytes: u64,
    wal_bytes: u64,
) -> Result<Volume, String> {
    let opts = blockvol::OpenOptions {
        flush_gate: blockvol::FlushGate::Committed,
        ..blockvol::OpenOptions::default()
    };
    Volume::create(
        path,
        &blockvol::CreateOptions::new(volume_bytes, wal_bytes),
        &opts,
    )
    .map_err(|e| format!("create {}: {e}", path.display()))
}

/// A primary and two replicas behind their own replica servers, streaming under `mode`.
pub(super) struct Streamed {
    pub(super) primary: Arc<Volume>,
    pub(super) replicas: Vec<Arc<Volume>>,
    servers: Vec<ReplicaServer>,
    paths: Vec<PathBuf>,
}

impl Streamed {
    pub(super) fn new(ctx: &Ctx, name: &str, volume: u64, wal: u64) -> Result<Streamed, String> {
        let mut paths = Vec::new();
        let p = ctx.scratch.path(&format!("{name}.primary"));
        let primary = Arc::new(create_served(&p, volume, wal)?);
        primary
            .assign(Role::Primary, blockvol::Epoch(1))
            .map_err(|e| format!("assign: {e}"))?;
        paths.push(p);
        let mut replicas = Vec::new();
        let mut servers = Vec::new();
        for i in 0..2 {
            let p = ctx.scratch.path(&format!("{name}.replica{i}"));
            let r = Arc::new(create_served(&p, volume, wal)?);
            r.assign(Role::Replica, blockvol::Epoch(1))
                .map_err(|e| format!("assign: {e}"))?;
            servers.push(serve(&r)?);
            replicas.push(r);
            paths.push(p);
        }
        Ok(Streamed {
            primary,
            replicas,
            servers,
            paths,
        })
    }

    pub(super) fn replicator(&self, mode: DurabilityMode) -> Result<Replicator, String> {
        let specs = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| ReplicaSpec {
                id: format!("vol1/r{i}"),
                addr: s.local_addr(),
                volume: "vol1".into(),
            })
            .collect();
        let r = Replicator::start(
            Arc::clone(&self.primary),
            specs,
            StreamConfig::new(mode, "bench-primary", 1),
        )
        .map_err(|e| format!("replicator: {e}"))?;
        wait_streaming(&r, 0, 1)?;
        wait_streaming(&r, 1, 1)?;
        Ok(r)
    }

    pub(super) fn cleanup(self) {
        drop(self.servers);
        drop(self.replicas);
        drop(self.primary);
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn wait_streaming(r: &Replicator, i: usize, joins: u64) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let s = &r.status()[i];
        if s.state == StreamState::Streaming && s.joins >= joins {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!("replica {i} did not stream: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 16 writers, each writing a block and flushing; ops/s over `secs`, and each op's latency
/// (write, notify, flush; the writers' histograms merged).
fn replicated_writes(
    r: &Replicator,
    primary: &Arc<Volume>,
    secs: f64,
) -> Result<(f64, Histogram<u64>), String> {
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let src = source(16);
    let start = Instant::now();
    let lats = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for w in 0..16u64 {
            let (stop, ops, failed, src) = (&stop, &ops, &failed, &src);
            hs.push(s.spawn(move || {
                let mut lat = histogram();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let lba = (w * 64 + i % 64) % 4096;
                    let off = (w as usize % 16) * BS;
                    let t = Instant::now();
                    if primary
                        .write(blockvol::Lba(lba), &src[off..off + BS])
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    r.notify();
                    if r.flush().is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    record(&mut lat, t.elapsed());
                    ops.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                lat
            }));
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = histogram();
    for h in lats {
        let h = h.map_err(|_| "writer panicked".to_owned())?;
        lat.add(&h).map_err(|e| format!("merge latencies: {e:?}"))?;
    }
    if failed.load(Ordering::Relaxed) > 0 {
        return Err(format!(
            "{} writer(s) failed a write or flush",
            failed.load(Ordering::Relaxed)
        ));
    }
    Ok((ops.load(Ordering::Relaxed) as f64 / elapsed, lat))
}

/// The reference for replicated writes: rounds of 16 block writes to each of three local
/// files (pwrite), then an fdatasync of each, from one thread; ops/s (16 per round).
fn three_files(ctx: &Ctx, secs: f64) -> Result<f64, String> {
    use std::os::unix::fs::FileExt;
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| ctx.scratch.path(&format!("replicated_write.base{i}")))
        .collect();
    let files = paths
        .iter()
        .map(|p| plain_file(p, 64 * MIB))
        .collect::<Result<Vec<_>, String>>()?;
    let src = source(16);
    let start = Instant::now();
    let mut ops = 0u64;
    let mut off = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for f in &files {
            for k in 0..16u64 {
                let at = (off + k * BS as u64) % (64 * MIB);
                f.write_all_at(&src[(k as usize) * BS..(k as usize + 1) * BS], at)
                    .map_err(|e| format!("pwrite: {e}"))?;
            }
        }
        for f in &files {
            f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        }
        off += 16 * BS as u64;
        ops += 16;
    }
    let rate = ops as f64 / start.elapsed().as_secs_f64();
    drop(files);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(rate)
}

pub fn replicated_write(ctx: &Ctx) -> Result<Metric, String> {
    let secs = ctx.size(3.0, 0.5);
    let cluster = Streamed::new(ctx, "replicated_write", 4096 * BS as u64, 256 * MIB)?;
    let r = cluster.replicator(DurabilityMode::SyncAll)?;
    let primary = Arc::clone(&cluster.primary);
    let mut lats = Vec::new();
    let mut round = 0usize;
    let (b, s) = interleaved(
        ctx.plan(),
        || three_files(ctx, secs),
        || {
            let (rate, lat) = replicated_writes(&r, &primary, secs)?;
            // The warm-up round's latencies are not kept.
            if round >= ctx.plan().warmup {
                lats.push(lat);
            }
            round += 1;
            Ok(rate)
        },
    )?;
    let lat = latency(&lats);
    // Every replica holds what the last flush acknowledged.
    let last = r.flush().map_err(|e| format!("final flush: {e}"))?;
    for (i, rep) in cluster.replicas.iter().enumerate() {
        if rep.status().durable < last {
            return Err(format!("replica {i} is not durable at {last}"));
        }
    }
    same_image(&cluster.primary, &cluster.replicas[0])?;
    same_image(&cluster.primary, &cluster.replicas[1])?;
    let st = r.status();
    let (batches, barriers) = (st[0].batches, st[0].barriers);
    let per = |us: u64, n: u64| us as f64 / n.max(1) as f64 / 1000.0;
    let (barrier_ms, apply_ms) = (
        per(st[0].barrier_micros, barriers),
        per(st[0].apply_micros, batches),
    );
    drop(r);
    cluster.cleanup();
    let (bm, sm) = (median(&b), median(&s));
    Ok(Metric {
        name: "replicated_write",
        unit: "ops/s",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtLeast(0.5),
        ceiling: Some(bm),
        ceiling_what: "the baseline itself (the same writes + fdatasyncs on three plain files)"
            .into(),
        latency_us: lat,
        what: "16 writer threads, each a 4 KiB Volume::write then Replicator::flush under \
               sync_all with two replicas behind replica servers on loopback (every ack is \
               durable on the primary and both replicas)"
            .into(),
        baseline_what: "rounds of 16 4 KiB pwrites to each of three local files, then an \
                        fdatasync of each, from one thread (16 ops per round)"
            .into(),
        detail: format!(
            "{:.1} s per rep; stream {} ops/s, three files {} ops/s; replica 0 got {batches} \
             batches ({apply_ms:.2} ms each) and {barriers} barriers ({barrier_ms:.2} ms each); \
             both replicas' digests equal the primary's; {}",
            secs,
            spread(&s),
            spread(&b),
            lat.map_or_else(
                || "no latency recorded".into(),
                |l| l.describe("write+flush")
            )
        ),
    })
}

/// The time a replica that missed `n` entries needs to stream again, while a writer keeps
/// writing (reported; no physical reference).
pub fn net_rejoin(ctx: &Ctx) -> Result<Metric, String> {
    let n: u64 = ctx.size(10_000, 2_000);
    let cluster = Streamed::new(
        ctx,
        "net_rejoin",
        CATCHUP_BLOCKS * BS as u64,
        wal_for(4 * n),
    )?;
    let r = cluster.replicator(DurabilityMode::SyncQuorum)?;
    // Replica 1 leaves: its server stops, so the stream fails and the shipper backs off.
    let mut servers = cluster.servers;
    let addr1 = servers[1].local_addr();
    servers[1].stop();
    let src = source(64);
    let write = |i: u64| {
        let off = ((i % 64) as usize) * BS;
        cluster
            .primary
            .write(blockvol::Lba(i % CATCHUP_BLOCKS), &src[off..off + BS])
            .map(|_| ())
            .map_err(|e| format!("write: {e}"))
    };
    for i in 0..n {
        write(i)?;
        if i.is_multiple_of(256) {
            r.notify();
        }
    }
    r.notify();
    r.flush()
        .map_err(|e| format!("flush with one replica: {e}"))?;
    // It comes back on the same address; a writer keeps writing while it rejoins.
    let volumes = Arc::new(Volumes::new());
    volumes.insert("vol1", LocalReplica::new(Arc::clone(&cluster.replicas[1])));
    let back = ReplicaServer::start(addr1, ServerConfig::default(), volumes)
        .map_err(|e| format!("restart replica server: {e}"))?;
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let took = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = n;
            while !stop.load(Ordering::Relaxed) && i < 3 * n {
                if write(i).is_err() {
                    return;
                }
                i += 1;
                written.fetch_add(1, Ordering::Relaxed);
                if i.is_multiple_of(64) {
                    r.notify();
                }
            }
        });
        let t = wait_streaming(&r, 1, 2);
        stop.store(true, Ordering::Relaxed);
        t
    })?;
    r.notify();
    r.flush()
        .map_err(|e| format!("flush after the rejoin: {e}"))?;
    let st = r.status();
    drop(r);
    drop(back);
    let during = written.load(Ordering::Relaxed);
    let paths = cluster.paths;
    drop(servers);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(Metric {
        name: "net_rejoin",
        unit: "ms",
        value: ms(took),
        baseline: None,
        ratio: ms(took),
        target: Target::AtMost(f64::INFINITY),
        ceiling: None,
        ceiling_what: String::new(),
        latency_us: None,
        what: format!(
            "a replica that missed {n} 4 KiB entries (sync_quorum, two replicas) rejoins the \
             stream through the engine while one writer keeps writing: from its server's \
             restart to streaming again"
        ),
        baseline_what: "none (reported)".into(),
        detail: format!(
            "{during} entries written during the rejoin; joins {}, recoveries {}, duplicates {}",
            st[1].joins, st[1].recoveries, st[1].duplicates
        ),
    })
}
