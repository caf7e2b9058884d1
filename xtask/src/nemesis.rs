//! `cargo xtask nemesis`: a master and three volume servers as processes (`swblock cluster
//! up`, on loopback), a workload writing self-describing blocks through NBD and recording every
//! acknowledged flush, a seeded nemesis (kill -9 and restart of a primary or a replica, a
//! primary paused past its lease, the master killed and restarted, a primary killed and then
//! the replica promoted in its place), and a checker after every heal:
//! - every block reads back, through NBD from the current primary, as its last acknowledged
//!   write or a newer write of that block, never an older one, never zeros, never a write
//!   that was not issued for it, never a torn mix;
//! - the three copies have the same digest once the primary reports both replicas in sync;
//! - no pin is left beyond the one each streaming replica holds;
//! - the cluster converges within a bound.
//!
//! The report goes to `target/nemesis-report.json`; any violation exits 1. Every wait is
//! bounded; the cluster is brought down when the run ends, also when it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use server::cluster::{ClusterInfo, ServerEntry, alive, http_get};
use server::nbd::client::NbdClient;

use crate::workspace_root;

const VOLUME: &str = "nem";
const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096;
const MAGIC: &[u8; 8] = b"NEMESIS1";
/// The last blocks belong to the stale client (a connection held to a primary that is paused
/// or cut from the master), the rest to the workload.
const STALE_BLOCKS: u64 = 64;
/// How long pins beyond the streams' may outlive convergence.
const PINS_GRACE: Duration = Duration::from_secs(45);
/// The longest the cluster may take to converge after a heal.
const CONVERGE_LIMIT: Duration = Duration::from_secs(90);

/// A seeded xorshift64* generator: the same seed, the same run of faults and writes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The bytes write `id` puts in `block`: a header naming both, then a stream derived from them,
/// so a read names the write it returns and a torn block fails to regenerate.
fn pattern(block: u64, id: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = (block << 32) ^ id ^ 0x5eed_0000_0000_0001;
    for chunk in b[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// What a block read back holds: `None` for zeros, the (block, write) it names, or why it is
/// neither.
fn parse(buf: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if buf.len() != BLOCK || &buf[..8] != MAGIC {
        return Err("not a workload block".into());
    }
    let block = u64::from_le_bytes(buf[8..16].try_into().map_err(|_| "short")?);
    let id = u64::from_le_bytes(buf[16..24].try_into().map_err(|_| "short")?);
    if pattern(block, id) != buf {
        return Err(format!("torn: header says block {block} write {id}"));
    }
    Ok(Some((block, id)))
}

/// What the workload did, as the checker needs it.
#[derive(Default)]
struct History {
    /// Per block: every write ID issued for it (ascending: IDs only grow).
    issued: Vec<Vec<u64>>,
    /// Per block: the highest write ID a flush acknowledged (0: none).
    acked: Vec<u64>,
    /// Writes sent to a superseded primary after another server had taken over as primary:
    /// none of them may ever be read back.
    superseded: std::collections::BTreeSet<u64>,
    writes_sent: u64,
    writes_acked: u64,
    flushes_acked: u64,
    flush_errors: u64,
    write_errors: u64,
    connects: u64,
}

struct Workload {
    history: Mutex<History>,
    stop: AtomicBool,
    pause: AtomicBool,
    /// Set by the workload when it is parked (no request in flight).
    parked: AtomicBool,
    next_id: AtomicU64,
}

impl Workload {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The NBD address of the volume's primary, as the master says.
fn primary_addr(swblock: &Path, master: &str) -> Option<(String, SocketAddr)> {
    let out = Command::new(swblock)
        .args(["block", "lookup", VOLUME, "--json", "--master", master])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let uri = v["nbd_uri"].as_str()?;
    let hostport = uri.strip_prefix("nbd://")?.split('/').next()?;
    Some((v["primary"].as_str()?.to_owned(), hostport.parse().ok()?))
}

fn run_workload(w: &Workload, swblock: &Path, master: &str, seed: u64) {
    let mut rng = Rng::new(seed ^ 0x00c0_ffee);
    let mut client: Option<NbdClient> = None;
    let mut pending: Vec<(u64, u64)> = Vec::new();
    while !w.stop.load(Ordering::SeqCst) {
        if w.pause.load(Ordering::SeqCst) {
            // Parked: the connection is dropped so the checker's reads and a failover see no
            // request of ours in flight; unflushed writes stay unacknowledged.
            client = None;
            pending.clear();
            w.parked.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        w.parked.store(false, Ordering::SeqCst);
        let Some(c) = client.as_mut() else {
            match primary_addr(swblock, master)
                .and_then(|(_, a)| NbdClient::connect(a, VOLUME, Duration::from_secs(2)).ok())
            {
                Some(c) => {
                    w.history().connects += 1;
                    client = Some(c);
                }
                None => std::thread::sleep(Duration::from_millis(200)),
            }
            continue;
        };
        let block = rng.below(BLOCKS - STALE_BLOCKS);
        let id = w.next_id.fetch_add(1, Ordering::SeqCst);
        {
            // Issued before it is sent: a write may land even if its reply is lost.
            let mut h = w.history();
            h.issued[block as usize].push(id);
            h.writes_sent += 1;
        }
        if c.write(block * BLOCK as u64, &pattern(block, id)).is_err() {
            w.history().write_errors += 1;
            client = None;
            pending.clear();
            continue;
        }
        pending.push((block, id));
        if rng.below(8) == 0 || pending.len() >= 32 {
            match c.flush() {
                Ok(()) => {
                    let mut h = w.history();
                    h.flushes_acked += 1;
                    h.writes_acked += pending.len() as u64;
                    for (b, id) in pending.drain(..) {
                        let a = &mut h.acked[b as usize];
                        *a = (*a).max(id);
                    }
                }
                Err(_) => {
                    w.history().flush_errors += 1;
                    client = None;
                    pending.clear();
                }
            }
        }
    }
}

/// A client that keeps writing and flushing through one connection to one primary (retrying
/// the same server, never looking up another) while that primary is paused or cut from the
/// master: every flush it gets acknowledged is recorded like the workload's, with the time the
/// acknowledgement arrived.
struct StaleClient {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<StaleRecord>,
}

/// What a stale client did: when each acknowledgement arrived, and each write it sent (ID,
/// when it was sent).
#[derive(Default)]
struct StaleRecord {
    acks: Vec<Instant>,
    writes: Vec<(u64, Instant)>,
}

impl StaleClient {
    fn start(addr: SocketAddr, w: &Arc<Workload>, seed: u64) -> StaleClient {
        let stop = Arc::new(AtomicBool::new(false));
        let (w, halt) = (Arc::clone(w), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x0057_a1e0);
            let mut rec = StaleRecord::default();
            let mut client: Option<NbdClient> = None;
            while !halt.load(Ordering::SeqCst) {
                let Some(c) = client.as_mut() else {
                    // Long timeouts: a request to a paused server waits for it to wake.
                    match NbdClient::connect(addr, VOLUME, Duration::from_secs(20)) {
                        Ok(c) => client = Some(c),
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                    continue;
                };
                let block = BLOCKS - STALE_BLOCKS + rng.below(STALE_BLOCKS);
                let id = w.next_id.fetch_add(1, Ordering::SeqCst);
                w.history().issued[block as usize].push(id);
                rec.writes.push((id, Instant::now()));
                let ok =
                    c.write(block * BLOCK as u64, &pattern(block, id)).is_ok() && c.flush().is_ok();
                if ok {
                    rec.acks.push(Instant::now());
                    let mut h = w.history();
                    let a = &mut h.acked[block as usize];
                    *a = (*a).max(id);
                } else {
                    client = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            rec
        });
        StaleClient { stop, thread }
    }

    /// Stops it; what it did.
    fn finish(self) -> StaleRecord {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

/// When, during a fault on the old primary, another primary was named and took over.
#[derive(Copy, Clone, Default)]
struct Takeover {
    /// The master named another primary.
    promoted: Option<Instant>,
    /// Another server reported itself primary and every server but the old primary reported
    /// its epoch (from then on the old primary's epoch can change nothing on them).
    took_over: Option<Instant>,
}

/// Holds a fault on `old` primary for `hold`, noting when the master names another primary
/// and when that server says it is primary.
fn hold_and_watch(c: &Cluster, old: &str, hold: Duration) -> Takeover {
    let end = Instant::now() + hold;
    let mut seen = Takeover::default();
    while Instant::now() < end {
        if seen.promoted.is_none() && c.primary().is_some_and(|p| p != old) {
            seen.promoted = Some(Instant::now());
        }
        if seen.took_over.is_none() {
            // Taken over once another server is primary with a lease and every server but the
            // old primary is at that server's epoch: none of them accepts the old epoch then,
            // so a write sent to the old primary afterwards lives on its own copy only, which
            // is cut back at the divergence point when it rejoins.
            let asked = Instant::now();
            let others: Vec<serde_json::Value> = c
                .servers()
                .iter()
                .filter(|s| s.id != old)
                .filter_map(|s| c.status(s))
                .collect();
            let new_epoch = others
                .iter()
                .find(|v| v["role"] == "primary" && v["has_lease"] == true)
                .and_then(|v| v["epoch"].as_u64());
            let all_moved = others.len() == 2
                && new_epoch.is_some_and(|e| others.iter().all(|v| v["epoch"].as_u64() == Some(e)));
            if all_moved {
                // The status was read some time in [asked, now]: the earlier bound is the
                // safe one to judge writes sent after it.
                seen.took_over = Some(asked);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

/// The faults the nemesis injects.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Fault {
    KillPrimary,
    KillReplica,
    PausePrimary,
    RestartMaster,
    KillPromoted,
    /// Network namespaces only: the primary's link down past its lease.
    IsolatePrimary,
    /// Network namespaces only: a replica's link down.
    IsolateReplica,
    /// Network namespaces only: the primary cut from the master (both directions) past its
    /// lease, while it still reaches its replicas and its clients.
    SplitPrimaryFromMaster,
    /// Network namespaces only: the four hosts split into two halves of two (the primary
    /// with the master or with one replica) past the lease.
    SplitHalves,
    /// Root only: a server's data directory (a small file system of its own) filled to the
    /// last byte, and half the time the server killed and restarted while it is full.
    FillDisk,
}

impl Fault {
    const PROCESS: [Fault; 5] = [
        Fault::KillPrimary,
        Fault::KillReplica,
        Fault::PausePrimary,
        Fault::RestartMaster,
        Fault::KillPromoted,
    ];
    const NETWORK: [Fault; 5] = [
        Fault::IsolatePrimary,
        Fault::IsolateReplica,
        Fault::SplitPrimaryFromMaster,
        Fault::SplitHalves,
        Fault::FillDisk,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill_primary",
            Fault::KillReplica => "kill_replica",
            Fault::PausePrimary => "pause_primary_past_lease",
            Fault::RestartMaster => "restart_master",
            Fault::KillPromoted => "kill_primary_then_promoted",
            Fault::IsolatePrimary => "isolate_primary",
            Fault::IsolateReplica => "isolate_replica",
            Fault::SplitPrimaryFromMaster => "split_primary_from_master",
            Fault::SplitHalves => "split_halves",
            Fault::FillDisk => "fill_disk",
        }
    }
}

/// Violations and counts of one run.
#[derive(Default)]
struct Tally {
    faults: Vec<(&'static str, u64)>,
    lost: u64,
    stale: u64,
    phantom: u64,
    torn: u64,
    diverged: u64,
    pins_left: u64,
    unconverged: u64,
    /// Writes a stale client sent to a superseded primary after another had taken over.
    superseded_sent: u64,
    /// Such writes read back: a write of a superseded epoch was applied.
    superseded_applied: u64,
    /// Checker attempts that failed to observe (a refused or cut read-back) and were retried
    /// after converging again.
    check_retries: u64,
    /// Flushes a superseded primary acknowledged after another was promoted.
    split_brain: u64,
    /// Per (server, epoch): the first and last flush the server says it acknowledged
    /// (`/status` `acks`, wall-clock ms), merged over the run.
    acks: std::collections::BTreeMap<(String, u64), (u64, u64)>,
    /// Epochs in which the servers' own records show two primaries acknowledging.
    split_epochs: std::collections::BTreeSet<u64>,
    longest_convergence: Duration,
    /// The first few violations, for people.
    examples: Vec<String>,
}

impl Tally {
    fn violation(&mut self, what: String) {
        eprintln!("nemesis: VIOLATION: {what}");
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }

    fn violations(&self) -> u64 {
        self.lost
            + self.stale
            + self.phantom
            + self.torn
            + self.diverged
            + self.pins_left
            + self.unconverged
            + self.split_brain
            + self.superseded_applied
            + self.split_epochs.len() as u64
    }

    fn count(&mut self, f: Fault) {
        match self.faults.iter_mut().find(|(n, _)| *n == f.name()) {
            Some((_, c)) => *c += 1,
            None => self.faults.push((f.name(), 1)),
        }
    }
}

struct Cluster {
    swblock: PathBuf,
    dir: PathBuf,
    info: ClusterInfo,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A paused process would not act on SIGTERM: wake everything first.
        if let Ok(info) = ClusterInfo::load(&self.dir) {
            for pid in info.servers.iter().map(|s| s.pid).chain([info.master_pid]) {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .output();
            }
        }
        let _ = Command::new(&self.swblock)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

impl Cluster {
    fn swblock(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.swblock)
            .args(args)
            .output()
            .map_err(|e| format!("swblock {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "swblock {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn servers(&self) -> Vec<ServerEntry> {
        ClusterInfo::load(&self.dir)
            .map(|i| i.servers)
            .unwrap_or_default()
    }

    fn server(&self, id: &str) -> Option<ServerEntry> {
        self.servers().into_iter().find(|s| s.id == id)
    }

    fn primary(&self) -> Option<String> {
        primary_addr(&self.swblock, &self.info.master).map(|(p, _)| p)
    }

    fn signal(&self, pid: u32, sig: &str) {
        let _ = Command::new("kill").args([sig, &pid.to_string()]).output();
    }

    fn kill(&self, s: &ServerEntry) {
        self.signal(s.pid, "-KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(s.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn restart(&self, id: &str) -> Result<(), String> {
        let d = self.dir.display().to_string();
        self.swblock(&["cluster", "restart", "--dir", &d, "--server", id])
            .map(|_| ())
    }

    /// The volume's `/status` entry on `s`.
    fn status(&self, s: &ServerEntry) -> Option<serde_json::Value> {
        let body = http_get(&s.http, "/status").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == VOLUME)
            .cloned()
    }

    /// Waits until every process runs, the master names a primary that holds a lease, and
    /// that primary reports both replicas streaming and durable at its head.
    fn converge(&self) -> Result<(ServerEntry, Duration), String> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < CONVERGE_LIMIT {
            let servers = self.servers();
            let master_up = ClusterInfo::load(&self.dir).is_ok_and(|i| alive(i.master_pid));
            let primary = (master_up && servers.iter().all(|s| alive(s.pid)))
                .then(|| self.primary().and_then(|id| self.server(&id)))
                .flatten();
            if let Some(p) = primary
                && let Some(st) = self.status(&p)
            {
                let head = st["head"].as_u64().unwrap_or(0);
                let reps = st["replicas"].as_array().cloned().unwrap_or_default();
                let ok = st["role"] == "primary"
                    && st["has_lease"] == true
                    && reps.len() == 2
                    && reps
                        .iter()
                        .all(|r| r["state"] == "streaming" && r["durable"].as_u64() == Some(head));
                // And every other copy knows it is a replica of this epoch (a demoted primary
                // applies its replica assignment only at its next heartbeat).
                let epoch = st["epoch"].as_u64();
                let others_follow = servers.iter().filter(|s| s.id != p.id).all(|s| {
                    self.status(s)
                        .is_some_and(|v| v["role"] == "replica" && v["epoch"].as_u64() == epoch)
                });
                if ok && others_follow {
                    return Ok((p, start.elapsed()));
                }
                last = st.to_string();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no convergence in {CONVERGE_LIMIT:?}; last primary status {last}"
        ))
    }

    fn digest(&self, s: &ServerEntry) -> Result<u128, String> {
        let addr = s.repl.parse().map_err(|e| format!("{}: {e}", s.repl))?;
        let secret = self
            .info
            .secret_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| b.trim_ascii().to_vec());
        let config = transport::net::ClientConfig {
            secret,
            ..transport::net::ClientConfig::default()
        };
        let mut r = transport::net::RemoteReplica::connect(addr, VOLUME, &config)
            .map_err(|e| format!("connect {}: {e}", s.id))?;
        r.probe(true)
            .map_err(|e| format!("probe {}: {e}", s.id))?
            .digest
            .ok_or_else(|| format!("{} sent no digest", s.id))
    }
}

/// A stale client on `primary`'s NBD export, once it serves.
fn stale_client(primary: &ServerEntry, w: &Arc<Workload>, rng: &mut Rng) -> Option<StaleClient> {
    let addr: SocketAddr = primary.nbd.parse().ok()?;
    let s = StaleClient::start(addr, w, rng.next());
    // Let it connect and get a few flushes through while the primary is healthy.
    std::thread::sleep(Duration::from_millis(300));
    Some(s)
}

/// After the fault on `old` healed: a flush it acknowledged after another primary was
/// promoted is a split brain (its lease had run out before the master promoted anyone).
///
/// A write it sent after another server had taken over (reported itself primary with a lease)
/// must never be read back: that server refuses the old epoch, and the old primary's own tail
/// is cut at the divergence point when it rejoins. The checker looks for them in every later
/// read-back.
fn judge_stale(old: &str, stale: Option<StaleClient>, seen: Takeover, w: &Workload, t: &mut Tally) {
    let Some(stale) = stale else { return };
    // Give the old primary time to answer what waited on it, then stop the client.
    std::thread::sleep(Duration::from_secs(2));
    let StaleRecord { acks, writes } = stale.finish();
    if let Some(at) = seen.took_over {
        let mut h = w.history();
        for (id, _) in writes.iter().filter(|(_, sent)| *sent > at) {
            h.superseded.insert(*id);
        }
        t.superseded_sent += writes.iter().filter(|(_, sent)| *sent > at).count() as u64;
    }
    if let Some(p) = seen.promoted {
        let late = acks.iter().filter(|a| **a > p).count();
        if late > 0 {
            t.split_brain += late as u64;
            t.violation(format!(
                "{late} flush(es) acknowledged by {old} after another primary was promoted"
            ));
        }
    }
}

/// Injects `fault`; returns once it is healed.
fn inject(
    c: &Cluster,
    fault: Fault,
    rng: &mut Rng,
    w: &Arc<Workload>,
    t: &mut Tally,
) -> Result<String, String> {
    let primary = c
        .primary()
        .and_then(|id| c.server(&id))
        .ok_or("no primary to act on")?;
    match fault {
        Fault::KillPrimary => {
            c.kill(&primary);
            std::thread::sleep(rng.millis(500, 7000));
            c.restart(&primary.id)?;
            Ok(format!("killed primary {}", primary.id))
        }
        Fault::KillReplica => {
            let reps: Vec<ServerEntry> = c
                .servers()
                .into_iter()
                .filter(|s| s.id != primary.id)
                .collect();
            let victim = reps
                .get(rng.below(reps.len() as u64) as usize)
                .cloned()
                .ok_or("no replica")?;
            c.kill(&victim);
            std::thread::sleep(rng.millis(500, 4000));
            c.restart(&victim.id)?;
            Ok(format!("killed replica {}", victim.id))
        }
        Fault::PausePrimary => {
            // Past the lease (4 s) and the master's margin: a replica is promoted meanwhile,
            // and the paused primary must not acknowledge anything when it wakes, not even
            // the requests a client left waiting on it.
            let stale = stale_client(&primary, w, rng);
            c.signal(primary.pid, "-STOP");
            let promoted = hold_and_watch(c, &primary.id, rng.millis(6000, 9000));
            c.signal(primary.pid, "-CONT");
            judge_stale(&primary.id, stale, promoted, w, t);
            Ok(format!("paused primary {}", primary.id))
        }
        Fault::RestartMaster => {
            let info = ClusterInfo::load(&c.dir).map_err(|e| e.to_string())?;
            c.signal(info.master_pid, "-KILL");
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(info.master_pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(rng.millis(500, 6000));
            let d = c.dir.display().to_string();
            c.swblock(&["cluster", "restart", "--dir", &d, "--master"])?;
            Ok("restarted the master".into())
        }
        Fault::IsolatePrimary | Fault::IsolateReplica | Fault::SplitPrimaryFromMaster => {
            let n = c.info.netns.as_ref().ok_or("no network namespaces")?;
            let victim = if fault == Fault::IsolateReplica {
                let reps: Vec<ServerEntry> = c
                    .servers()
                    .into_iter()
                    .filter(|s| s.id != primary.id)
                    .collect();
                reps.get(rng.below(reps.len() as u64) as usize)
                    .cloned()
                    .ok_or("no replica")?
            } else {
                primary.clone()
            };
            let host = server::netns::Netns::host_of(&victim.id);
            let hold = if fault == Fault::IsolateReplica {
                rng.millis(1000, 5000)
            } else {
                // Past the lease (4 s) and the master's margin (1 s).
                rng.millis(6000, 9000)
            };
            let cut = |on: bool| match fault {
                Fault::SplitPrimaryFromMaster => n.split(&host, "m", on),
                _ => n.isolate(&host, on),
            };
            // Cut from the master, the primary still reaches its clients: one keeps writing
            // to it. (Not for a host taken off the network: its replies could arrive late.)
            let stale = (fault == Fault::SplitPrimaryFromMaster)
                .then(|| stale_client(&victim, w, rng))
                .flatten();
            cut(true).map_err(|e| e.to_string())?;
            let promoted = hold_and_watch(c, &victim.id, hold);
            cut(false).map_err(|e| e.to_string())?;
            judge_stale(&victim.id, stale, promoted, w, t);
            Ok(format!("{} {}", fault.name(), victim.id))
        }
        Fault::SplitHalves => {
            let n = c.info.netns.as_ref().ok_or("no network namespaces")?;
            let host = server::netns::Netns::host_of;
            let others: Vec<String> = std::iter::once("m".to_owned())
                .chain(
                    c.servers()
                        .iter()
                        .filter(|s| s.id != primary.id)
                        .map(|s| host(&s.id)),
                )
                .collect();
            let partner = others[rng.below(others.len() as u64) as usize].clone();
            let near = [host(&primary.id), partner.clone()];
            let far: Vec<String> = others.into_iter().filter(|h| *h != partner).collect();
            let cut = |on: bool| -> Result<(), String> {
                for a in &near {
                    for b in &far {
                        n.split(a, b, on).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            };
            // The primary keeps reaching its clients: one writes to it throughout, and what it
            // acknowledges after another primary was promoted is a split brain.
            let stale = stale_client(&primary, w, rng);
            let hold = rng.millis(6000, 9000);
            let result = cut(true);
            let promoted = hold_and_watch(
                c,
                &primary.id,
                if result.is_ok() { hold } else { Duration::ZERO },
            );
            // Healed whatever happened (a failed cut may have left some routes).
            let healed = cut(false);
            judge_stale(&primary.id, stale, promoted, w, t);
            result.and(healed)?;
            Ok(format!(
                "split {{{}}} from {{{}}}",
                near.join(", "),
                far.join(", ")
            ))
        }
        Fault::FillDisk => {
            let servers = c.servers();
            let victim = servers
                .get(rng.below(servers.len() as u64) as usize)
                .cloned()
                .ok_or("no server")?;
            let filler = victim.data.join("filler");
            let filled = fill(&filler);
            let restarted = rng.below(2) == 0;
            let outcome = (|| -> Result<(), String> {
                filled.as_ref().map_err(Clone::clone)?;
                if restarted {
                    c.kill(&victim);
                    std::thread::sleep(rng.millis(200, 2000));
                    c.restart(&victim.id)?;
                }
                std::thread::sleep(rng.millis(2000, 6000));
                Ok(())
            })();
            // Freed whatever happened.
            let _ = std::fs::remove_file(&filler);
            outcome?;
            Ok(format!(
                "filled {}'s disk ({} MiB){}",
                victim.id,
                filled.unwrap_or(0) >> 20,
                if restarted {
                    ", killed and restarted it full"
                } else {
                    ""
                }
            ))
        }
        Fault::KillPromoted => {
            c.kill(&primary);
            // Wait (bounded) for the promotion, then kill the promoted server too: two of
            // three down, during or right after a failover.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut second = None;
            while Instant::now() < deadline {
                if let Some(p) = c.primary().filter(|p| *p != primary.id) {
                    second = c.server(&p);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(s) = &second {
                std::thread::sleep(rng.millis(0, 1500));
                c.kill(s);
            }
            std::thread::sleep(rng.millis(500, 3000));
            c.restart(&primary.id)?;
            if let Some(s) = &second {
                c.restart(&s.id)?;
            }
            Ok(format!(
                "killed primary {} then promoted {}",
                primary.id,
                second.map_or("(none in 30 s)".into(), |s| s.id)
            ))
        }
    }
}

/// Writes zeros to `path` until its file system has no byte left; the bytes written.
fn fill(path: &Path) -> Result<u64, String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let big = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for chunk in [&big[..], &big[..4096]] {
        loop {
            match f.write(chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// The small file systems (tmpfs) the servers' data directories are mounted on, unmounted
/// when dropped (after the cluster, which is declared later, is down).
struct Mounts(Vec<PathBuf>);

impl Mounts {
    /// Mounts a `size_mib` tmpfs on `dir/vs1`..`dir/vs{n}`.
    fn create(dir: &Path, n: usize, size_mib: u64) -> Result<Mounts, String> {
        let mut m = Mounts(Vec::new());
        for i in 1..=n {
            let p = dir.join(format!("vs{i}"));
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let out = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size_mib}m"),
                    "swblock-nemesis",
                ])
                .arg(&p)
                .output()
                .map_err(|e| format!("mount: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "mount tmpfs on {}: {}",
                    p.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            m.0.push(p);
        }
        Ok(m)
    }

    /// Unmounts whatever an earlier, interrupted run left mounted under `dir`.
    fn clear(dir: &Path) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = dir.display().to_string();
        for line in mounts.lines() {
            if let Some(p) = line.split_whitespace().nth(1)
                && p.starts_with(&prefix)
            {
                let _ = Command::new("umount").args(["-l", p]).output();
            }
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(p).output();
        }
    }
}

/// Reads every server's record of the flushes it acknowledged, per epoch, and flags a split
/// brain: two servers acknowledging at one epoch, or a server acknowledging at an epoch after
/// another server had acknowledged at a newer one (all processes share this machine's clock).
fn judge_acks(c: &Cluster, t: &mut Tally, round: u64) {
    for s in c.servers() {
        let Some(st) = c.status(&s) else { continue };
        for a in st["acks"].as_array().into_iter().flatten() {
            let (Some(e), Some(first), Some(last)) = (
                a["epoch"].as_u64(),
                a["first_unix_ms"].as_u64(),
                a["last_unix_ms"].as_u64(),
            ) else {
                continue;
            };
            let span = t.acks.entry((s.id.clone(), e)).or_insert((first, last));
            span.0 = span.0.min(first);
            span.1 = span.1.max(last);
        }
    }
    for (epoch, what) in split_brains(&t.acks) {
        if t.split_epochs.insert(epoch) {
            t.violation(format!("round {round}: split brain: {what}"));
        }
    }
}

/// The epochs (with what happened) in which the acknowledgement spans per (server, epoch)
/// show a split brain: two servers at one epoch, or a server acknowledging at an epoch after
/// another had acknowledged at a newer one.
fn split_brains(
    acks: &std::collections::BTreeMap<(String, u64), (u64, u64)>,
) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for ((a, ea), (a_first, a_last)) in acks {
        for ((b, eb), (b_first, _)) in acks {
            if a < b && ea == eb {
                out.push((
                    *ea,
                    format!(
                        "{a} and {b} both acknowledged flushes at epoch {ea} (from {a_first} \
                         and {b_first} ms)"
                    ),
                ));
            } else if ea < eb && a_last > b_first {
                out.push((
                    *ea,
                    format!(
                        "{a} acknowledged a flush at epoch {ea} at {a_last} ms, after {b} had \
                         acknowledged one at epoch {eb} at {b_first} ms"
                    ),
                ));
            }
        }
    }
    out
}

/// Checks the cluster after a heal (the workload parked).
/// How many times the checker converges again after a read-back or digest request failed on
/// the wire (a lease that ran out between convergence and the read: the primary rightly
/// refuses NBD then). Only a failure on every attempt is a violation; data read back is judged
/// once, whatever attempt read it.
const CHECK_ATTEMPTS: u32 = 3;

/// What one attempt of the checker read from a converged cluster.
struct Observed {
    primary: ServerEntry,
    took: Duration,
    digests: Vec<(String, u128)>,
    data: Vec<u8>,
}

/// Converges, then reads every copy's digest and every block from the primary. An error is
/// a failure to observe (connection refused or cut), not a judgement of the data.
fn observe(c: &Cluster) -> Result<Observed, String> {
    let (primary, took) = c.converge()?;
    let mut digests = Vec::new();
    for s in c.servers() {
        digests.push((s.id.clone(), c.digest(&s)?));
    }
    let (_, addr) = primary_addr(&c.swblock, &c.info.master)
        .ok_or_else(|| "no NBD address for the primary".to_owned())?;
    let mut client = NbdClient::connect(addr, VOLUME, Duration::from_secs(5))
        .map_err(|e| format!("connect to the primary: {e}"))?;
    const SPAN: u64 = 64;
    let mut data = Vec::with_capacity(BLOCKS as usize * BLOCK);
    for first in (0..BLOCKS).step_by(SPAN as usize) {
        let d = client
            .read(first * BLOCK as u64, (SPAN as usize * BLOCK) as u32)
            .map_err(|e| format!("read at block {first}: {e}"))?;
        data.extend_from_slice(&d);
    }
    client.disconnect();
    Ok(Observed {
        primary,
        took,
        digests,
        data,
    })
}

fn check(c: &Cluster, w: &Workload, t: &mut Tally, round: u64) {
    judge_acks(c, t, round);
    let mut attempt = 0;
    let seen = loop {
        attempt += 1;
        match observe(c) {
            Ok(o) => break o,
            Err(e) if attempt < CHECK_ATTEMPTS => {
                t.check_retries += 1;
                eprintln!(
                    "round {round}: checker attempt {attempt} failed ({e}); converging again"
                );
            }
            Err(e) => {
                t.unconverged += 1;
                t.violation(format!("round {round}: after {attempt} attempts: {e}"));
                return;
            }
        }
    };
    let Observed {
        primary,
        took,
        digests,
        data,
    } = seen;
    t.longest_convergence = t.longest_convergence.max(took);
    // Every copy has the primary's bytes.
    let servers = c.servers();
    let want = digests
        .iter()
        .find(|(id, _)| *id == primary.id)
        .map(|(_, d)| *d);
    for (id, d) in &digests {
        if Some(*d) != want {
            t.diverged += 1;
            t.violation(format!(
                "round {round}: copy on {id} has digest {d:032x}, the primary {} has {want:?}",
                primary.id
            ));
        }
    }
    // No pin left: one per streaming replica on the primary, none on the replicas. A demoted
    // primary reports itself a replica before its shipper threads have ended (one blocked on
    // a peer that was cut off waits out its reply timeout), so pins get a while to go.
    let excess = || -> Vec<(String, u64)> {
        servers
            .iter()
            .filter_map(|s| {
                let pins = c.status(s).and_then(|v| v["pins"].as_u64()).unwrap_or(0);
                let allowed = if s.id == primary.id { 2 } else { 0 };
                (pins > allowed).then(|| (s.id.clone(), pins))
            })
            .collect()
    };
    let since = Instant::now();
    let mut left = excess();
    while !left.is_empty() && since.elapsed() < PINS_GRACE {
        std::thread::sleep(Duration::from_millis(250));
        left = excess();
    }
    for (id, pins) in left {
        t.pins_left += 1;
        t.violation(format!(
            "round {round}: {id} still holds {pins} pins {PINS_GRACE:?} after convergence"
        ));
    }
    // Every block as the workload left it.
    let h = w.history();
    for (i, buf) in data.chunks(BLOCK).enumerate() {
        let b = i as u64;
        let acked = h.acked[i];
        let issued = &h.issued[i];
        match parse(buf) {
            Ok(None) if acked > 0 => {
                t.lost += 1;
                t.violation(format!(
                    "round {round}: block {b} reads zeros, write {acked} was acknowledged"
                ));
            }
            Ok(None) => {}
            Ok(Some((bb, id))) if bb != b || issued.binary_search(&id).is_err() => {
                t.phantom += 1;
                t.violation(format!(
                    "round {round}: block {b} holds write {id} of block {bb}, never issued here"
                ));
            }
            Ok(Some((_, id))) if h.superseded.contains(&id) => {
                t.superseded_applied += 1;
                t.violation(format!(
                    "round {round}: block {b} holds write {id}, sent to a superseded primary \
                     after another had taken over"
                ));
            }
            Ok(Some((_, id))) if id < acked => {
                t.stale += 1;
                t.violation(format!(
                    "round {round}: block {b} holds write {id}, older than acknowledged {acked}"
                ));
            }
            Ok(Some(_)) => {}
            Err(e) => {
                t.torn += 1;
                t.violation(format!("round {round}: block {b}: {e}"));
            }
        }
    }
}

struct Options {
    /// Stay on loopback even where namespaces are available.
    loopback: bool,
    seed: u64,
    rounds: u64,
    minutes: Option<u64>,
    json: PathBuf,
    /// Only these faults (`--faults a,b`), by name.
    faults: Option<Vec<String>>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        loopback: false,
        seed: 1,
        rounds: 12,
        minutes: None,
        json: workspace_root().join("target").join("nemesis-report.json"),
        faults: None,
    };
    let mut it = args.iter();
    let num = |v: Option<&String>, what: &str| -> Result<u64, String> {
        v.ok_or(format!("{what} needs a value"))?
            .parse()
            .map_err(|e| format!("{what}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.rounds = 6,
            "--loopback" => o.loopback = true,
            "--seed" => o.seed = num(it.next(), "--seed")?,
            "--rounds" => o.rounds = num(it.next(), "--rounds")?,
            "--minutes" => o.minutes = Some(num(it.next(), "--minutes")?),
            "--json" => o.json = PathBuf::from(it.next().ok_or("--json needs a path")?),
            "--faults" => {
                let list = it.next().ok_or("--faults needs fault names")?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                let known: Vec<&str> = Fault::PROCESS
                    .iter()
                    .chain(Fault::NETWORK.iter())
                    .map(|f| f.name())
                    .collect();
                if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
                    return Err(format!(
                        "nemesis: unknown fault {bad}; known: {}",
                        known.join(", ")
                    ));
                }
                o.faults = Some(names);
            }
            other => return Err(format!("nemesis: unknown option {other}")),
        }
    }
    Ok(o)
}

pub fn nemesis(args: &[String]) -> Result<ExitCode, String> {
    let o = parse_args(args)?;
    crate::build_bin("server", "swblock")?;
    let swblock = server::scenarios::swblock_path()?;
    let dir = workspace_root().join("target").join("nemesis");
    let _ = Command::new(&swblock)
        .args(["cluster", "down", "--dir"])
        .arg(&dir)
        .output();
    Mounts::clear(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    // Interrupted (SIGINT, SIGTERM, SIGHUP), it takes the cluster down before it goes: the
    // processes, the namespaces and their bridge, the mounts.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("signal handlers: {e}"))?;
    {
        let (sw, d) = (swblock.clone(), dir.clone());
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("nemesis: signal {sig}: taking the cluster down");
                let _ = Command::new(&sw)
                    .args(["cluster", "down", "--dir"])
                    .arg(&d)
                    .output();
                Mounts::clear(&d);
                std::process::exit(128 + sig);
            }
        });
    }
    let network = if !o.loopback && server::netns::Netns::available() {
        "netns"
    } else {
        "loopback"
    };
    // As root, every server's data directory is a small file system of its own (a 16 MiB
    // volume and its 64 MiB WAL fit with room), so a fault can fill it.
    let mounts = if network == "netns" {
        Some(Mounts::create(&dir, 3, 160)?)
    } else {
        None
    };
    let mut up = Command::new(&swblock);
    up.args(["cluster", "up", "--servers", "3", "--dir"])
        .arg(&dir);
    if network == "netns" {
        up.args(["--netns", &format!("sw{}", std::process::id() % 100_000)]);
    }
    let out = up.output().map_err(|e| format!("cluster up: {e}"))?;
    let info: ClusterInfo = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "cluster up: {e}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let c = Cluster {
        swblock: swblock.clone(),
        dir: dir.clone(),
        info,
    };
    println!(
        "nemesis: seed {}, {} rounds{}, network: {}",
        o.seed,
        o.rounds,
        o.minutes
            .map(|m| format!(" or {m} min"))
            .unwrap_or_default(),
        if network == "netns" {
            "a network namespace per process (link faults on)"
        } else {
            "loopback (no network namespaces here: process faults only)"
        }
    );
    c.swblock(&[
        "block",
        "create",
        VOLUME,
        "--size",
        "16M",
        "--rf",
        "3",
        "--mode",
        "sync_quorum",
        "--master",
        &c.info.master,
    ])?;
    c.converge()?;
    let w = Arc::new(Workload {
        history: Mutex::new(History {
            issued: vec![Vec::new(); BLOCKS as usize],
            acked: vec![0; BLOCKS as usize],
            ..History::default()
        }),
        stop: AtomicBool::new(false),
        pause: AtomicBool::new(false),
        parked: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
    });
    let worker = {
        let (w, swblock, master, seed) = (
            Arc::clone(&w),
            swblock.clone(),
            c.info.master.clone(),
            o.seed,
        );
        std::thread::spawn(move || run_workload(&w, &swblock, &master, seed))
    };
    let mut rng = Rng::new(o.seed);
    let mut t = Tally::default();
    let start = Instant::now();
    let deadline = o.minutes.map(|m| start + Duration::from_secs(m * 60));
    let mut rounds = 0;
    for round in 1..=o.rounds.max(1) * if deadline.is_some() { 1000 } else { 1 } {
        if deadline.is_some_and(|d| Instant::now() >= d) || (deadline.is_none() && round > o.rounds)
        {
            break;
        }
        std::thread::sleep(rng.millis(1000, 3000));
        let kinds: Vec<Fault> = Fault::PROCESS
            .into_iter()
            .chain(if network == "netns" {
                Fault::NETWORK.to_vec()
            } else {
                Vec::new()
            })
            .filter(|f| {
                o.faults
                    .as_ref()
                    .is_none_or(|l| l.iter().any(|n| n == f.name()))
            })
            .collect();
        if kinds.is_empty() {
            return Err(format!(
                "none of the faults {:?} can run here ({network})",
                o.faults
            ));
        }
        let fault = kinds[rng.below(kinds.len() as u64) as usize];
        t.count(fault);
        let what = inject(&c, fault, &mut rng, &w, &mut t)
            .unwrap_or_else(|e| format!("{}: {e}", fault.name()));
        // Park the workload, then check.
        w.pause.store(true, Ordering::SeqCst);
        let park = Instant::now();
        while !w.parked.load(Ordering::SeqCst) && park.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = t.violations();
        check(&c, &w, &mut t, round);
        let h = w.history();
        println!(
            "round {round:>3}: {what}; converged; {} writes acked in {} flushes so far; {}",
            h.writes_acked,
            h.flushes_acked,
            if t.violations() == before {
                "ok"
            } else {
                "VIOLATIONS"
            }
        );
        drop(h);
        w.pause.store(false, Ordering::SeqCst);
        rounds = round;
    }
    w.stop.store(true, Ordering::SeqCst);
    let _ = worker.join();
    drop(c);
    drop(mounts);
    let h = w.history();
    let report = serde_json::json!({
        "seed": o.seed,
        "rounds": rounds,
        "network": network,
        "volume": {"name": VOLUME, "blocks": BLOCKS, "block_size": BLOCK, "mode": "sync_quorum"},
        "faults": t.faults.iter().map(|(n, c)| (n.to_string(), serde_json::json!(c))).collect::<serde_json::Map<_, _>>(),
        "writes_sent": h.writes_sent,
        "writes_acknowledged": h.writes_acked,
        "flushes_acknowledged": h.flushes_acked,
        "write_errors": h.write_errors,
        "flush_errors": h.flush_errors,
        "connections": h.connects,
        "lost": t.lost,
        "stale_reads": t.stale,
        "phantom_reads": t.phantom,
        "torn_blocks": t.torn,
        "diverged_replicas": t.diverged,
        "pins_left": t.pins_left,
        "unconverged": t.unconverged,
        "check_retries": t.check_retries,
        "superseded_writes_sent": t.superseded_sent,
        "superseded_writes_applied": t.superseded_applied,
        "split_brain_acks": t.split_brain,
        "split_brain_epochs": t.split_epochs,
        "ack_spans": t
            .acks
            .iter()
            .map(|((s, e), (f, l))| serde_json::json!({"server": s, "epoch": e, "first_unix_ms": f, "last_unix_ms": l}))
            .collect::<Vec<_>>(),
        "longest_convergence_secs": t.longest_convergence.as_secs_f64(),
        "elapsed_secs": start.elapsed().as_secs_f64(),
        "violations": t.violations(),
        "examples": t.examples,
        "replay": format!(
            "cargo xtask nemesis --seed {} --rounds {rounds}{}{}",
            o.seed,
            o.faults
                .as_ref()
                .map(|f| format!(" --faults {}", f.join(",")))
                .unwrap_or_default(),
            if o.loopback { " --loopback" } else { "" }
        ),
    });
    if let Some(d) = o.json.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(&o.json, format!("{report:#}\n"))
        .map_err(|e| format!("write {}: {e}", o.json.display()))?;
    println!(
        "nemesis: {rounds} rounds, {} writes acknowledged in {} flushes, {} violations, longest \
         convergence {:.1} s; report: {}",
        h.writes_acked,
        h.flushes_acked,
        t.violations(),
        t.longest_convergence.as_secs_f64(),
        o.json.display()
    );
    if t.violations() == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("logs kept in {}", dir.display());
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_brains_are_found_in_the_servers_acknowledgement_spans() {
        let spans = |v: &[(&str, u64, u64, u64)]| {
            v.iter()
                .map(|(s, e, f, l)| (((*s).to_owned(), *e), (*f, *l)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        // A clean handover: vs1 at epoch 1 until 1000, vs2 at epoch 2 from 5000, vs1 back as
        // primary at epoch 3 later still.
        let clean = spans(&[
            ("vs1", 1, 10, 1000),
            ("vs2", 2, 5000, 9000),
            ("vs1", 3, 9500, 9900),
        ]);
        assert!(split_brains(&clean).is_empty());
        // The old primary acknowledged after the new one had.
        let late = spans(&[("vs1", 1, 10, 6000), ("vs2", 2, 5000, 9000)]);
        let found = split_brains(&late);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 1);
        assert!(found[0].1.contains("after vs2"), "{}", found[0].1);
        // Two primaries at one epoch, whenever.
        let twice = spans(&[("vs1", 4, 10, 20), ("vs3", 4, 30, 40)]);
        assert_eq!(
            split_brains(&twice).iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![4]
        );
    }

    #[test]
    fn blocks_name_their_write_and_a_torn_block_is_caught() {
        let b = pattern(7, 42);
        assert_eq!(parse(&b), Ok(Some((7, 42))));
        assert_eq!(parse(&[0u8; BLOCK]), Ok(None));
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&pattern(7, 43)[2048..]);
        assert!(parse(&torn).is_err());
        assert!(parse(&[1u8; BLOCK]).is_err());
        assert_ne!(pattern(7, 42), pattern(8, 42));
    }

    #[test]
    fn the_same_seed_gives_the_same_faults() {
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        let xs: Vec<u64> = (0..16).map(|_| a.below(5)).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.below(5)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|&x| x != xs[0]));
    }
}
