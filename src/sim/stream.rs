//! The network in the simulator (issue 13): the transport's live stream, its codec and its
//! replica-side request handling, run under simulated time over simulated connections.
//!
//! # What runs
//!
//! Three servers, each a real blockvol [`Volume`] on a [`SimDisk`] behind a real
//! [`LocalReplica`], and a master. The master names a primary and grants it a lease through
//! heartbeats; the primary streams to the other two with the transport's own stream protocol
//! ([`transport::stream`]): joins through the engine ([`join_replica`]: zero gap, catch-up,
//! truncation at the divergence point, rebuild from an image), batches anchored on the entry
//! before them ([`Link::next_batch`], [`Link::applied`]), barriers ([`Link::barrier_done`]),
//! and the durability verdict of a flush ([`verdict`]). What the simulator supplies instead of
//! the `Replicator`'s threads is the shell around them: an event loop, a client, the master,
//! and a network.
//!
//! Every request and reply is a frame of the real codec ([`wire::encode`], [`wire::Decoder`],
//! CRC32C), served on the replica by the replica server's own handler
//! ([`transport::net::serve_replica_request`]). A connection delivers its frames in order in
//! each direction; different connections are independent, so frames of a connection the
//! primary gave up on still arrive, late, after a newer connection's (reordering across
//! connections). The network delays every frame, may corrupt one (a flipped bit: the decoder
//! must refuse it, or wait for bytes that never come, and the connection dies), may replay a
//! request on a dead connection (duplication: the replica serves it again, the reply is lost),
//! cuts links between any two of the four hosts for a while, and crashes servers (the volume
//! reopens from a crash image of its disk). A primary acknowledges a flush only while its
//! lease, counted from when it sent the heartbeat the master answered, runs; the master
//! promotes another server only after the lease it granted ran out plus a margin.
//!
//! # Checks
//!
//! - **Durable where the mode says.** When a flush is acknowledged, the primary and every
//!   replica the verdict counted are crashed in a copy (only synced bytes survive) and read
//!   back: every block holds the write the flush covers for it, or a newer one.
//! - **Acknowledged flushes survive failover.** A flush is protected across a failover when a
//!   replica it counted is among the master's candidates; the promoted server, and the primary
//!   at the end, hold every protected acknowledged write (or a newer one).
//! - **No write of a superseded epoch is applied.** A write a deposed primary accepted after
//!   another server took over as primary is never read back from a primary.
//! - **No acknowledgement after a promotion.** A primary never acknowledges a flush after the
//!   master promoted another at a newer epoch.
//! - **Liveness.** After the faulty phase everything heals; within a bound of simulated time
//!   the primary's replicas stream with everything durable, every copy reads back the
//!   primary's blocks, and no replica holds a pin.
//!
//! Blocks carry their own identity (block, write ID), so the checks need nothing but the
//! simulator's own log of writes and acknowledgements: no check compares a copy with another
//! copy's say-so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use blockvol::{
    CrashMode, CreateOptions, Epoch as BvEpoch, FlushGate, FlusherMode, Lba, Lsn, OpenOptions,
    RetentionPolicy, Role, SimDisk, Volume,
};
use bytes::BytesMut;
use engine::{ExecutorOptions, RecoveryDriver};
use transport::stream::{
    DurabilityMode, JoinCtx, Link, NoHooks, ReplicaSpec, StreamState, Verdict, barrier_due,
    join_replica, proven, verdict,
};
use transport::wire::{self, Message, Reply, Request};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    BlockVolStorage, HandshakeReply, Lineage, LocalReplica, ReplicaTarget, TargetError,
    TruncateRequest,
};

use super::rng::Rng;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 32;
const WAL_BYTES: u64 = 256 << 10;
const SERVERS: usize = 3;
/// The master's host index for links.
const MASTER: usize = SERVERS;
const VOLUME: &str = "v";
/// Simulated milliseconds.
const HEARTBEAT_MS: u64 = 500;
const LEASE_MS: u64 = 2000;
const MARGIN_MS: u64 = 500;
const REPLY_TIMEOUT_MS: u64 = 1000;
const FLUSH_TIMEOUT_MS: u64 = 3000;
const MIN_BACKOFF_MS: u64 = 20;
const MAX_BACKOFF_MS: u64 = 1000;
const MAX_BATCH_ENTRIES: u32 = 8;
/// The stream's `barrier_window`: a quarter of what the replicas' WALs hold.
const BARRIER_WINDOW: u64 = 16;
const MAX_FRAME: u32 = 1 << 20;

/// A deliberately broken piece of the shell, to show that a check fires.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StreamBug {
    /// A replica counts as durable at what it applied, without a barrier.
    AckOnApply,
    /// A primary acknowledges flushes without a running lease.
    IgnoreLease,
    /// The master promotes the candidate with the shortest log.
    PromoteShortest,
    /// The master ranks candidates by head alone, as `server::master` does.
    PromoteByHeadOnly,
    /// A replica that fails never joins again.
    NeverRejoin,
    /// Servers hear of a new epoch but do not fence their volumes with it.
    NoFence,
    /// A primary starts its stream at the committed point its volume opened with (its
    /// checkpoint), not at its durable head.
    CommittedFromCheckpoint,
    /// A primary back from a restart keeps its epoch (and writes other entries under LSNs a
    /// replica holds at it).
    SameEpochAfterRestart,
}

/// How one run goes.
#[derive(Clone, Debug)]
pub struct StreamSimOptions {
    /// The seed.
    pub seed: u64,
    /// Steps of the faulty phase (each advances 1-40 simulated ms).
    pub steps: u64,
    /// Simulated milliseconds the healed phase may take to converge.
    pub liveness_ms: u64,
    /// The durability mode; `None`: chosen by the seed.
    pub mode: Option<DurabilityMode>,
    /// A bug to switch on.
    pub bug: Option<StreamBug>,
}

impl StreamSimOptions {
    /// The defaults for `seed`.
    pub fn new(seed: u64) -> Self {
        StreamSimOptions {
            seed,
            steps: 1000,
            liveness_ms: 30_000,
            mode: None,
            bug: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct StreamSimReport {
    /// The mode it ran.
    pub mode: &'static str,
    /// Simulated milliseconds.
    pub sim_ms: u64,
    /// Client writes accepted.
    pub writes: u64,
    /// Flushes acknowledged.
    pub acked: u64,
    /// Flushes failed (unavailable, timed out, lease gone, primary gone).
    pub flush_failed: u64,
    /// Frames sent, corrupted, replayed, dropped on cut links.
    pub frames: u64,
    /// Frames corrupted.
    pub corrupted: u64,
    /// Requests replayed.
    pub replayed: u64,
    /// Frames lost on a cut link or to a dead server.
    pub dropped: u64,
    /// Joins by path.
    pub joins: BTreeMap<&'static str, u64>,
    /// Joins that failed.
    pub join_failures: u64,
    /// Failovers.
    pub failovers: u64,
    /// Server crashes.
    pub crashes: u64,
    /// Link cuts.
    pub cuts: u64,
    /// Crash images checked at acknowledgements.
    pub durability_checks: u64,
    /// Writes a deposed primary accepted after another took over.
    pub superseded_writes: u64,
    /// The violations (empty: the run passed).
    pub violations: Vec<String>,
}

// ---- blocks that name their write -------------------------------------------------------------

fn pattern(block: u64, id: u64) -> Vec<u8> {
    let mut b = vec![(id as u8) | 1; BLOCK];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&id.to_le_bytes());
    b[16..24].copy_from_slice(&(block ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    b
}

/// The (block, write ID) a block holds; `None` for zeros; an error for a torn block.
fn parse(buf: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if buf.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
    let (block, id) = (word(0), word(8));
    if word(16) != block ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        || buf[24..].iter().any(|b| *b != (id as u8) | 1)
    {
        return Err("torn or foreign block".into());
    }
    Ok(Some((block, id)))
}

// ---- the network ------------------------------------------------------------------------------

struct Node {
    disk: SimDisk,
    vol: Arc<Volume>,
    replica: LocalReplica,
    incarnation: u64,
    alive: bool,
}

struct Conn {
    /// The primary's host and the replica's.
    from: usize,
    to: usize,
    /// The replica's process the connection reached.
    server_inc: u64,
    dead: bool,
    server_dec: wire::Decoder,
    client_dec: wire::Decoder,
    /// When the last frame each way is due (a connection delivers in order).
    last_to_server: u64,
    last_to_client: u64,
    next_id: u64,
}

enum Ev {
    ToServer {
        conn: u64,
        bytes: Vec<u8>,
        replay: bool,
    },
    ToClient {
        conn: u64,
        bytes: Vec<u8>,
    },
    HbToMaster {
        node: usize,
        sent: u64,
        /// The volume's epoch, and the epoch of the primary run it serves, if any.
        epoch: u64,
        serving: Option<u64>,
    },
    HbToNode {
        node: usize,
        inc: u64,
        sent: u64,
        epoch: u64,
        primary: usize,
    },
    Restart {
        node: usize,
    },
    Heal {
        a: usize,
        b: usize,
    },
}

/// Per-seed fault settings (swarm testing: a seed switches some off).
struct Faults {
    max_latency: u64,
    corrupt_per_mille: u64,
    replay_per_mille: u64,
    enabled: bool,
}

struct Net {
    now: u64,
    rng: Rng,
    nodes: Vec<Node>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    cut: BTreeSet<(usize, usize)>,
    events: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    faults: Faults,
    stats: StreamSimReport,
    /// Per server: the newest epoch the master told it (the simulator's own record).
    told: Vec<u64>,
    /// Print what the replicas do.
    trace: bool,
    /// Requests of a superseded epoch a server accepted (violations).
    stale_accepted: Vec<String>,
}

fn link(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn flush_if_half_full(vol: &Volume) {
    let st = vol.status();
    if st.wal_used_bytes * 2 > st.wal_size_bytes {
        let _ = vol.force_flush();
    }
}

fn reset(detail: impl Into<String>) -> TargetError {
    TargetError::Protocol(detail.into())
}

impl Net {
    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((time, self.seq), ev);
    }

    fn up(&self, a: usize, b: usize) -> bool {
        !self.cut.contains(&link(a, b))
    }

    fn latency(&mut self) -> u64 {
        1 + self.rng.below(self.faults.max_latency)
    }

    fn encode(&mut self, msg: &Message) -> Vec<u8> {
        let mut out = BytesMut::new();
        // Every message the simulator sends is far below the frame limit.
        let _ = wire::encode(msg, MAX_FRAME, &mut out);
        let mut bytes = out.to_vec();
        self.stats.frames += 1;
        if self.faults.enabled && self.rng.chance(self.faults.corrupt_per_mille) {
            let bit = self.rng.below(bytes.len() as u64 * 8);
            bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
            self.stats.corrupted += 1;
        }
        bytes
    }

    fn connect(&mut self, from: usize, to: usize) -> u64 {
        self.next_conn += 1;
        let id = self.next_conn;
        let inc = self.nodes[to].incarnation;
        let dead = !self.nodes[to].alive || !self.up(from, to);
        self.conns.insert(
            id,
            Conn {
                from,
                to,
                server_inc: inc,
                dead,
                server_dec: wire::Decoder::new(MAX_FRAME),
                client_dec: wire::Decoder::new(MAX_FRAME),
                last_to_server: 0,
                last_to_client: 0,
                next_id: 0,
            },
        );
        id
    }

    /// Whether the replica side of `conn` can serve now; kills the connection if not.
    fn server_reachable(&mut self, conn: u64) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        let (from, to, inc) = (c.from, c.to, c.server_inc);
        let ok = !c.dead
            && self.nodes[to].alive
            && self.nodes[to].incarnation == inc
            && self.up(from, to);
        if !ok && let Some(c) = self.conns.get_mut(&conn) {
            c.dead = true;
        }
        ok
    }

    /// The replica serves `bytes` on `conn` (its decoder); the reply, if it produced one.
    fn serve(&mut self, conn: u64, bytes: &[u8], replay: bool) -> Option<Message> {
        let to = self.conns.get(&conn)?.to;
        let decoded = if replay {
            // A retransmission on a stale connection: its own byte stream.
            let mut d = wire::Decoder::new(MAX_FRAME);
            d.feed(bytes);
            d.next_message()
        } else {
            let c = self.conns.get_mut(&conn)?;
            c.server_dec.feed(bytes);
            c.server_dec.next_message()
        };
        let (id, body) = match decoded {
            Ok(Some(Message::Request { id, body, .. })) => (id, body),
            // A corrupted length waits for bytes that never come; anything else is refused.
            // Either way the connection is over.
            Ok(_) | Err(_) => {
                if !replay && let Some(c) = self.conns.get_mut(&conn) {
                    c.dead = true;
                }
                return None;
            }
        };
        let node = &self.nodes[to];
        let mut replica = node.replica.clone();
        if matches!(body, Request::Apply(_) | Request::BaseChunk(_)) {
            flush_if_half_full(&node.vol);
        }
        let stale = body.lineage().filter(|l| l.epoch.0 < self.told[to]);
        let kind = format!("{:?}", std::mem::discriminant(&body));
        let begin = match &body {
            Request::BaseBegin(b) if self.trace => Some((b.lineage, b.base_lsn)),
            _ => None,
        };
        let reply = transport::net::serve_replica_request(&mut replica, body);
        if let Some((l, lsn)) = begin {
            eprintln!(
                "t={} s{to} base begin at {lsn} lineage {l:?} (replay {replay}): {}",
                self.now,
                if matches!(reply, Reply::Error(..)) {
                    "refused"
                } else {
                    "accepted"
                }
            );
        }
        // No write of a superseded epoch is applied: a server the master told about epoch E
        // refuses every mutating request of a lineage below E.
        if let Some(l) = stale
            && !matches!(reply, Reply::Error(..))
        {
            self.stale_accepted.push(format!(
                "s{to}, told epoch {}, accepted a request ({kind}) of epoch {}",
                self.told[to], l.epoch.0
            ));
        }
        Some(Message::Reply { id, body: reply })
    }

    /// One request and its reply, now (the joins run inside one step).
    fn call(&mut self, conn: u64, body: Request) -> Result<Reply, TargetError> {
        if !self.server_reachable(conn) {
            return Err(reset("connection reset"));
        }
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or_else(|| reset("no connection"))?;
        c.next_id += 1;
        let id = c.next_id;
        let lineage = body.lineage();
        let msg = Message::Request {
            id,
            volume: VOLUME.into(),
            body,
        };
        let bytes = self.encode(&msg);
        let now = self.now;
        self.maybe_replay(conn, &bytes, now);
        let Some(reply) = self.serve(conn, &bytes, false) else {
            return Err(reset("connection closed by the replica (bad frame)"));
        };
        let bytes = self.encode(&reply);
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or_else(|| reset("no connection"))?;
        c.client_dec.feed(&bytes);
        match c.client_dec.next_message() {
            Ok(Some(Message::Reply { id: got, body })) if got == id => {
                if lineage.is_some() && body.lineage() != lineage {
                    c.dead = true;
                    return Err(reset("reply echoes another lineage"));
                }
                match body {
                    Reply::Error(_, e) => Err(e),
                    other => Ok(other),
                }
            }
            other => {
                c.dead = true;
                Err(reset(format!("bad reply: {other:?}")))
            }
        }
    }

    /// Sometimes (by seed) schedules a replay of `bytes` on `conn`'s dead connection, up to
    /// 2 s after `after`: the replica serves it again and its reply is lost.
    fn maybe_replay(&mut self, conn: u64, bytes: &[u8], after: u64) {
        if self.faults.enabled && self.rng.chance(self.faults.replay_per_mille) {
            let t = after + 1 + self.rng.below(2000);
            self.at(
                t,
                Ev::ToServer {
                    conn,
                    bytes: bytes.to_vec(),
                    replay: true,
                },
            );
            self.stats.replayed += 1;
        }
    }

    /// Sends a request on `conn` without waiting; its ID.
    fn send(&mut self, conn: u64, body: Request) -> Option<u64> {
        let c = self.conns.get_mut(&conn)?;
        if c.dead {
            return None;
        }
        c.next_id += 1;
        let id = c.next_id;
        let (from, to) = (c.from, c.to);
        let msg = Message::Request {
            id,
            volume: VOLUME.into(),
            body,
        };
        let bytes = self.encode(&msg);
        if !self.up(from, to) {
            self.stats.dropped += 1;
            return Some(id);
        }
        let lat = self.latency();
        let c = self.conns.get_mut(&conn)?;
        let t = (self.now + lat).max(c.last_to_server);
        c.last_to_server = t;
        self.maybe_replay(conn, &bytes, t);
        self.at(
            t,
            Ev::ToServer {
                conn,
                bytes,
                replay: false,
            },
        );
        Some(id)
    }
}

/// The network, shared by the loop and the connections a join holds.
struct Shared(Mutex<Net>);

impl Shared {
    fn borrow(&self) -> MutexGuard<'_, Net> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn borrow_mut(&self) -> MutexGuard<'_, Net> {
        self.borrow()
    }
}

/// A connection for the synchronous calls of a join (and the link's identity afterwards).
struct SimConn {
    net: Arc<Shared>,
    conn: u64,
}

impl SimConn {
    fn call(&mut self, body: Request) -> Result<Reply, TargetError> {
        self.net.borrow_mut().call(self.conn, body)
    }
}

fn unexpected(r: &Reply) -> TargetError {
    reset(format!("unexpected reply {r:?}"))
}

impl ReplicaTarget for SimConn {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        match self.call(Request::Handshake)? {
            Reply::Handshake(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }
    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        match self.call(Request::Apply(req))? {
            Reply::Apply(_, r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
    fn truncate(&mut self, req: TruncateRequest) -> Result<blockvol::EntryInfo, TargetError> {
        match self.call(Request::Truncate(req))? {
            Reply::Truncate(_, tip) => Ok(tip),
            other => Err(unexpected(&other)),
        }
    }
    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<Lba, TargetError> {
        match self.call(Request::BaseBegin(req))? {
            Reply::BaseBegun(_, from) => Ok(from),
            other => Err(unexpected(&other)),
        }
    }
    fn base_chunk(&mut self, req: BaseChunkRequest) -> Result<(), TargetError> {
        match self.call(Request::BaseChunk(req))? {
            Reply::Ack(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
    fn finish_base(&mut self, lineage: Lineage) -> Result<Lsn, TargetError> {
        match self.call(Request::BaseFinish(lineage))? {
            Reply::BaseFinish(_, lsn) => Ok(lsn),
            other => Err(unexpected(&other)),
        }
    }
    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        match self.call(Request::Barrier(req))? {
            Reply::Barrier(_, r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
}

// ---- the primary's shell ----------------------------------------------------------------------

enum Wait {
    Apply {
        id: u64,
        last: blockvol::EntryInfo,
        deadline: u64,
    },
    Barrier {
        id: u64,
        req: BarrierRequest,
        deadline: u64,
    },
}

enum ShipState {
    Backoff {
        until: u64,
    },
    Streaming {
        link: Link<SimConn>,
        wait: Option<Wait>,
        /// Joined holding entries no barrier proved: one is asked for first.
        fresh: bool,
    },
}

struct Shipper {
    node: usize,
    state: ShipState,
    status: StreamState,
    durable: Lsn,
    backoff: u64,
}

struct Pending {
    lsn: Lsn,
    deadline: u64,
}

struct Run {
    /// Counts runs, so writes know which run's log they are in.
    id: u64,
    epoch: u64,
    lease_until: u64,
    storage: Arc<BlockVolStorage>,
    driver: RecoveryDriver,
    run_driver: String,
    specs: Vec<ReplicaSpec>,
    shippers: Vec<Shipper>,
    pending: Vec<Pending>,
    flush_want: Lsn,
}

struct Write {
    block: u64,
    run: u64,
    lsn: Lsn,
}

struct Ack {
    counted: Vec<usize>,
    /// Per block: the newest write this flush covers (0: none).
    ids: Vec<u64>,
}

/// The master: epoch, primary, what it last heard from each server.
struct Master {
    epoch: u64,
    primary: usize,
    /// Per server: when it was last heard.
    heard: Vec<Option<u64>>,
    /// (epoch, time) of every promotion.
    promotions: Vec<(u64, u64)>,
}

/// One run of the simulation.
pub struct StreamSim {
    opts: StreamSimOptions,
    mode: DurabilityMode,
    rng: Rng,
    net: Arc<Shared>,
    master: Master,
    runs: BTreeMap<usize, Run>,
    next_run: u64,
    /// Per server: the epoch it knows and whether it is a replica of it.
    known_epoch: Vec<u64>,
    writes: BTreeMap<u64, Write>,
    next_write: u64,
    issued: Vec<BTreeSet<u64>>,
    acks: Vec<Ack>,
    superseded: BTreeSet<u64>,
    /// When a server first acted as primary of each epoch.
    took_over: BTreeMap<u64, u64>,
    check_every: u64,
    /// `SWBLOCK_NETSIM_TRACE` set: every decision goes to stderr.
    trace: bool,
}

fn open_options() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Committed,
        retention: RetentionPolicy {
            keep_entries: 16,
            keep_bytes: 0,
        },
        flusher: FlusherMode::Manual,
        wal_full_timeout: Duration::ZERO,
        repair: false,
    }
}

fn spec(node: usize) -> ReplicaSpec {
    ReplicaSpec {
        id: format!("{VOLUME}/s{node}"),
        addr: SocketAddr::from(([10, 0, 0, node as u8 + 1], 7000)),
        volume: VOLUME.into(),
    }
}

impl StreamSim {
    /// A fresh cluster for `opts`.
    pub fn new(opts: StreamSimOptions) -> Result<StreamSim, String> {
        let mut rng = Rng::new(opts.seed);
        let mode = opts.mode.unwrap_or(match rng.below(3) {
            0 => DurabilityMode::BestEffort,
            1 => DurabilityMode::SyncAll,
            _ => DurabilityMode::SyncQuorum,
        });
        let faults = Faults {
            max_latency: *rng.pick(&[2, 20, 200]).unwrap_or(&20),
            corrupt_per_mille: *rng.pick(&[0, 2, 20]).unwrap_or(&0),
            replay_per_mille: *rng.pick(&[0, 10, 50]).unwrap_or(&0),
            enabled: true,
        };
        let create = CreateOptions {
            volume_size_bytes: BLOCKS * BLOCK as u64,
            wal_size_bytes: WAL_BYTES,
            block_size: BLOCK as u32,
        };
        let mut nodes = Vec::new();
        for s in 0..SERVERS {
            let (vol, disk) = Volume::create_sim(&create, &open_options())
                .map_err(|e| format!("create s{s}: {e}"))?;
            let vol = Arc::new(vol);
            let role = if s == 0 { Role::Primary } else { Role::Replica };
            vol.assign(role, BvEpoch(1))
                .map_err(|e| format!("assign s{s}: {e}"))?;
            nodes.push(Node {
                disk,
                replica: LocalReplica::new(Arc::clone(&vol)),
                vol,
                incarnation: 1,
                alive: true,
            });
        }
        let net = Net {
            now: 0,
            rng: Rng::new(rng.next_u64()),
            nodes,
            conns: BTreeMap::new(),
            next_conn: 0,
            cut: BTreeSet::new(),
            events: BTreeMap::new(),
            seq: 0,
            faults,
            stats: StreamSimReport {
                mode: mode.as_str(),
                ..StreamSimReport::default()
            },
            told: vec![1; SERVERS],
            trace: std::env::var_os("SWBLOCK_NETSIM_TRACE").is_some(),
            stale_accepted: Vec::new(),
        };
        let check_every = *rng.pick(&[1, 2, 4]).unwrap_or(&1);
        let mut sim = StreamSim {
            opts,
            mode,
            rng,
            net: Arc::new(Shared(Mutex::new(net))),
            master: Master {
                epoch: 1,
                primary: 0,
                heard: vec![Some(0); SERVERS],
                promotions: vec![(1, 0)],
            },
            runs: BTreeMap::new(),
            next_run: 0,
            known_epoch: vec![1; SERVERS],
            writes: BTreeMap::new(),
            next_write: 1,
            issued: vec![BTreeSet::new(); BLOCKS as usize],
            acks: Vec::new(),
            superseded: BTreeSet::new(),
            took_over: BTreeMap::new(),
            check_every,
            trace: std::env::var_os("SWBLOCK_NETSIM_TRACE").is_some(),
        };
        sim.start_run(0, 1, LEASE_MS);
        for n in 0..SERVERS {
            let t = sim.rng.below(HEARTBEAT_MS);
            sim.schedule_heartbeat(n, t);
        }
        Ok(sim)
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("t={} {}", self.now(), what());
        }
    }

    fn now(&self) -> u64 {
        self.net.borrow().now
    }

    fn violate(&mut self, what: String) {
        let mut net = self.net.borrow_mut();
        if net.stats.violations.len() < 20 {
            let now = net.now;
            net.stats.violations.push(format!("t={now} ms: {what}"));
        }
    }

    fn bug(&self, b: StreamBug) -> bool {
        self.opts.bug == Some(b)
    }

    fn vol(&self, node: usize) -> Arc<Volume> {
        Arc::clone(&self.net.borrow().nodes[node].vol)
    }

    fn alive(&self, node: usize) -> bool {
        self.net.borrow().nodes[node].alive
    }

    // ---- primary runs --------------------------------------------------------------------

    fn start_run(&mut self, node: usize, epoch: u64, lease_until: u64) {
        let vol = self.vol(node);
        if !self.bug(StreamBug::CommittedFromCheckpoint) {
            transport::stream::restore_committed(&vol);
        }
        let storage = Arc::new(BlockVolStorage::new(Arc::clone(&vol)));
        let driver = RecoveryDriver::new(Arc::clone(&storage) as Arc<dyn engine::StorageAdapter>);
        self.next_run += 1;
        let others: Vec<usize> = (0..SERVERS).filter(|n| *n != node).collect();
        let inc = self.net.borrow().nodes[node].incarnation;
        let run = Run {
            id: self.next_run,
            epoch,
            lease_until,
            storage,
            driver,
            run_driver: format!("s{node}#{inc}.{}", self.next_run),
            specs: others.iter().map(|n| spec(*n)).collect(),
            shippers: others
                .iter()
                .map(|n| Shipper {
                    node: *n,
                    state: ShipState::Backoff { until: 0 },
                    status: StreamState::Joining,
                    durable: Lsn(0),
                    backoff: MIN_BACKOFF_MS,
                })
                .collect(),
            pending: Vec::new(),
            flush_want: Lsn(0),
        };
        let now = self.now();
        self.took_over.entry(epoch).or_insert(now);
        self.runs.insert(node, run);
    }

    fn end_run(&mut self, node: usize) {
        if let Some(run) = self.runs.remove(&node) {
            let n = run.pending.len() as u64;
            self.net.borrow_mut().stats.flush_failed += n;
        }
    }

    // ---- heartbeats and the master -------------------------------------------------------

    fn schedule_heartbeat(&mut self, node: usize, at: u64) {
        // A heartbeat is an event to the server itself: it sends when the time comes.
        self.net.borrow_mut().at(
            at,
            Ev::HbToNode {
                node,
                inc: 0,
                sent: u64::MAX,
                epoch: 0,
                primary: usize::MAX,
            },
        );
    }

    fn send_heartbeat(&mut self, node: usize) {
        let now = self.now();
        self.schedule_heartbeat(node, now + HEARTBEAT_MS);
        if !self.alive(node) {
            return;
        }
        let epoch = self.vol(node).status().epoch.0;
        let serving = self.runs.get(&node).map(|r| r.epoch);
        let mut net = self.net.borrow_mut();
        if !net.up(node, MASTER) {
            return;
        }
        let lat = net.latency();
        net.at(
            now + lat,
            Ev::HbToMaster {
                node,
                sent: now,
                epoch,
                serving,
            },
        );
    }

    fn master_heard(&mut self, node: usize, sent: u64, epoch: u64, serving: Option<u64>) {
        let now = self.now();
        self.master.heard[node] = Some(now);
        // The primary back at the volume's epoch but not serving it restarted (as
        // `server::master` does): the next epoch, so the LSNs it writes now never name other
        // entries than a replica holds at the old one.
        if node == self.master.primary
            && epoch == self.master.epoch
            && serving != Some(self.master.epoch)
            && !self.bug(StreamBug::SameEpochAfterRestart)
        {
            self.master.epoch += 1;
            self.master.promotions.push((self.master.epoch, now));
            self.trace(|| format!("master: s{node} restarted, epoch {}", self.master.epoch));
        }
        let (epoch, primary) = (self.master.epoch, self.master.primary);
        let mut net = self.net.borrow_mut();
        if !net.up(node, MASTER) {
            return;
        }
        let lat = net.latency();
        let inc = net.nodes[node].incarnation;
        net.at(
            now + lat,
            Ev::HbToNode {
                node,
                inc,
                sent,
                epoch,
                primary,
            },
        );
    }

    /// The master fails over once the primary's lease (as the master granted it) ran out.
    fn master_tick(&mut self) {
        let now = self.now();
        let p = self.master.primary;
        let last = self.master.heard[p].unwrap_or(0);
        if now <= last + LEASE_MS + MARGIN_MS {
            return;
        }
        // Evidence is collected live, as the master's `CollectEvidence` does: every other
        // server it can reach answers with its epoch, head and committed point, and whether it
        // may be promoted (no unfinished base install).
        let answers: Vec<(usize, (u64, u64))> = (0..SERVERS)
            .filter(|n| *n != p)
            .filter_map(|n| {
                let net = self.net.borrow();
                if !net.nodes[n].alive || !net.up(n, MASTER) {
                    return None;
                }
                let vol = &net.nodes[n].vol;
                let st = vol.status();
                // Ranked by the epoch of the last entry, then the head (raft's rule): a longer
                // log of an older epoch must not beat a shorter one of the newer epoch, which
                // may hold writes acknowledged in it. `server::master` ranks by head alone
                // (its evidence message has no field for the last entry's epoch): see D52.
                // The durable head, as the volume server answers: unsynced entries are not
                // evidence.
                let last_epoch = vol.entry_info(st.durable).map_or(0, |e| e.epoch.0);
                (st.epoch.0 == self.master.epoch && !st.install_incomplete)
                    .then_some((n, (last_epoch, st.durable.0)))
            })
            .collect();
        // Enough answers that one holds every acknowledged write (`answers_needed` of the
        // master): under sync_quorum with two replicas, both.
        let needed = match self.mode {
            DurabilityMode::SyncQuorum => {
                let replicas = SERVERS - 1;
                let rf = replicas + 1;
                let quorum = rf / 2 + 1;
                rf.saturating_sub(quorum - 1).clamp(1, replicas)
            }
            _ => 1,
        };
        if answers.len() < needed {
            return;
        }
        let candidates = answers;
        let pick = if self.bug(StreamBug::PromoteShortest) {
            candidates.iter().min_by_key(|c| (c.1, c.0))
        } else if self.bug(StreamBug::PromoteByHeadOnly) {
            candidates
                .iter()
                .max_by_key(|c| (c.1.1, std::cmp::Reverse(c.0)))
        } else {
            candidates
                .iter()
                .max_by_key(|c| (c.1, std::cmp::Reverse(c.0)))
        };
        let Some(&(new, _)) = pick else {
            return;
        };
        self.master.epoch += 1;
        self.master.primary = new;
        self.trace(|| {
            format!(
                "master: promote s{new} at epoch {} from {candidates:?}",
                self.master.epoch
            )
        });
        self.master.promotions.push((self.master.epoch, now));
        self.net.borrow_mut().stats.failovers += 1;
        // What the mode still promises: a flush one of whose counted replicas is a candidate.
        let cands: BTreeSet<usize> = if self.mode == DurabilityMode::BestEffort {
            BTreeSet::new()
        } else {
            candidates.iter().map(|c| c.0).collect()
        };
        self.acks
            .retain(|a| a.counted.iter().any(|n| cands.contains(n)));
    }

    /// A server hears from the master: it follows the master's word on its role.
    fn node_heard(&mut self, node: usize, sent: u64, epoch: u64, primary: usize) {
        if epoch < self.known_epoch[node] {
            return;
        }
        {
            let mut net = self.net.borrow_mut();
            net.told[node] = net.told[node].max(epoch);
        }
        let vol = self.vol(node);
        if primary == node {
            let fresh = self.runs.get(&node).is_none_or(|r| r.epoch < epoch);
            if fresh {
                self.trace(|| format!("s{node} becomes primary at epoch {epoch}"));
                self.end_run(node);
                if vol.assign(Role::Primary, BvEpoch(epoch)).is_err() {
                    return;
                }
                self.known_epoch[node] = epoch;
                let prior = self.took_over.contains_key(&epoch);
                self.start_run(node, epoch, sent + LEASE_MS);
                if !prior {
                    self.check_primary(node, "promoted");
                }
            } else if let Some(run) = self.runs.get_mut(&node) {
                run.lease_until = run.lease_until.max(sent + LEASE_MS);
            }
        } else {
            self.end_run(node);
            if self.known_epoch[node] < epoch || vol.status().role == Role::Primary {
                if !self.bug(StreamBug::NoFence) {
                    let _ = vol.assign(Role::Replica, BvEpoch(epoch));
                }
                self.known_epoch[node] = epoch;
            }
        }
    }

    // ---- the client ----------------------------------------------------------------------

    fn client_node(&mut self) -> Option<usize> {
        let stale: Vec<usize> = self
            .runs
            .keys()
            .copied()
            .filter(|n| *n != self.master.primary)
            .collect();
        if !stale.is_empty() && self.rng.chance(300) {
            return self.rng.pick(&stale).copied();
        }
        self.runs
            .contains_key(&self.master.primary)
            .then_some(self.master.primary)
    }

    fn client_write(&mut self) {
        let Some(node) = self.client_node() else {
            return;
        };
        if !self.alive(node) {
            return;
        }
        let block = self.rng.below(BLOCKS);
        let id = self.next_write;
        let vol = self.vol(node);
        let Some(run) = self.runs.get(&node) else {
            return;
        };
        // The lease is the I/O gate (as the volume server's NBD export has it): a primary
        // whose lease ran out takes no writes.
        if run.lease_until <= self.now() && !self.bug(StreamBug::IgnoreLease) {
            return;
        }
        let (run_id, epoch) = (run.id, run.epoch);
        let Ok(lsn) = vol.write_in_epoch(BvEpoch(epoch), Lba(block), &pattern(block, id)) else {
            flush_if_half_full(&vol);
            return;
        };
        self.next_write += 1;
        self.issued[block as usize].insert(id);
        self.writes.insert(
            id,
            Write {
                block,
                run: run_id,
                lsn,
            },
        );
        self.net.borrow_mut().stats.writes += 1;
        // Another server already acts as primary of a newer epoch: this write must never be
        // read back from a primary.
        if self
            .took_over
            .range(epoch + 1..)
            .next()
            .is_some_and(|(_, t)| *t <= self.now())
        {
            self.superseded.insert(id);
            self.net.borrow_mut().stats.superseded_writes += 1;
        }
    }

    fn client_flush(&mut self) {
        let Some(node) = self.client_node() else {
            return;
        };
        if !self.alive(node) {
            return;
        }
        let vol = self.vol(node);
        let lsn = vol.status().head;
        if vol.sync().is_err() {
            return;
        }
        let now = self.now();
        if let Some(run) = self.runs.get_mut(&node) {
            run.pending.push(Pending {
                lsn,
                deadline: now + FLUSH_TIMEOUT_MS,
            });
            run.flush_want = run.flush_want.max(lsn);
        }
    }

    // ---- the shippers --------------------------------------------------------------------

    fn fail(&mut self, node: usize, i: usize, why: String) {
        let now = self.now();
        self.trace(|| format!("s{node} shipper {i} fails: {why}"));
        let never = self.bug(StreamBug::NeverRejoin);
        if let Some(run) = self.runs.get_mut(&node) {
            let s = &mut run.shippers[i];
            s.status = StreamState::Degraded(why);
            s.state = ShipState::Backoff {
                until: if never { u64::MAX } else { now + s.backoff },
            };
            s.backoff = (s.backoff * 2).min(MAX_BACKOFF_MS);
        }
    }

    fn poll_runs(&mut self) {
        let nodes: Vec<usize> = self.runs.keys().copied().collect();
        for node in nodes {
            if !self.alive(node) {
                continue;
            }
            for i in 0..SERVERS - 1 {
                self.poll_shipper(node, i);
            }
            self.poll_flushes(node);
        }
    }

    fn poll_shipper(&mut self, node: usize, i: usize) {
        if let Err(why) = self.try_poll_shipper(node, i) {
            self.fail(node, i, why);
        }
    }

    fn try_poll_shipper(&mut self, node: usize, i: usize) -> Result<(), String> {
        let now = self.now();
        let vol = self.vol(node);
        let Some(run) = self.runs.get_mut(&node) else {
            return Ok(());
        };
        let target = run.shippers[i].node;
        let flush_want = run.flush_want;
        match &mut run.shippers[i].state {
            ShipState::Backoff { until } => {
                if now < *until {
                    return Ok(());
                }
                // As the stream's lease gate: no join without the lease.
                if run.lease_until <= now
                    && !self.opts.bug.is_some_and(|b| b == StreamBug::IgnoreLease)
                {
                    return Err("the primary holds no lease: joins wait".into());
                }
                run.shippers[i].status = StreamState::Joining;
                let conn = self.net.borrow_mut().connect(node, target);
                let sc = SimConn {
                    net: Arc::clone(&self.net),
                    conn,
                };
                let ctx = JoinCtx {
                    primary: &vol,
                    storage: &run.storage,
                    driver: &run.driver,
                    run_driver: &run.run_driver,
                    epoch: run.epoch,
                    recovery: ExecutorOptions::default(),
                    replicas: &run.specs,
                };
                match join_replica(&ctx, i, sc, &NoHooks) {
                    Ok(j) => {
                        let s = &mut run.shippers[i];
                        s.status = StreamState::Streaming;
                        s.durable = j.link.durable();
                        s.backoff = MIN_BACKOFF_MS;
                        let fresh = j.link.tip().lsn > j.link.durable();
                        s.state = ShipState::Streaming {
                            link: j.link,
                            wait: None,
                            fresh,
                        };
                        *self.net.borrow_mut().stats.joins.entry(j.path).or_default() += 1;
                        if self.trace {
                            eprintln!(
                                "t={now} s{node} joined s{target} by {} at {:?}",
                                j.path, run.shippers[i].durable
                            );
                        }
                        Ok(())
                    }
                    Err(e) => {
                        self.net.borrow_mut().stats.join_failures += 1;
                        Err(format!("join: {e}"))
                    }
                }
            }
            ShipState::Streaming { link, wait, fresh } => {
                let conn = link.connection().conn;
                if let Some(w) = wait {
                    let deadline = match w {
                        Wait::Apply { deadline, .. } | Wait::Barrier { deadline, .. } => *deadline,
                    };
                    let dead = self.net.borrow().conns.get(&conn).is_none_or(|c| c.dead);
                    if now >= deadline || dead {
                        return Err("no reply".into());
                    }
                    return Ok(());
                }
                let head = vol.status().head;
                let (tip, durable) = (link.tip().lsn, link.durable());
                let barrier = *fresh || barrier_due(tip, durable, flush_want, head, BARRIER_WINDOW);
                // Ship first, unless a barrier is owed first: right after a join that proved
                // nothing, or with the window full.
                let owed = *fresh || (barrier && tip.0 - durable.0 >= BARRIER_WINDOW);
                if head > tip && !owed {
                    let mut frames = Vec::new();
                    if let Some(batch) =
                        link.next_batch(&vol, MAX_BATCH_ENTRIES, 1 << 20, &mut frames)?
                    {
                        let last = batch.last;
                        let id = self
                            .net
                            .borrow_mut()
                            .send(conn, Request::Apply(batch.request))
                            .ok_or("connection dead")?;
                        *wait = Some(Wait::Apply {
                            id,
                            last,
                            deadline: now + REPLY_TIMEOUT_MS,
                        });
                    } else if self.trace {
                        eprintln!(
                            "t={now} s{node} -> s{target}: head {head} > tip {tip} but no batch"
                        );
                    }
                    return Ok(());
                }
                if barrier {
                    *fresh = false;
                    let req = link.barrier_request(&vol);
                    let id = self
                        .net
                        .borrow_mut()
                        .send(conn, Request::Barrier(req))
                        .ok_or("connection dead")?;
                    *wait = Some(Wait::Barrier {
                        id,
                        req,
                        deadline: now + REPLY_TIMEOUT_MS,
                    });
                }
                Ok(())
            }
        }
    }

    /// A reply arrived on `conn`: the shipper waiting on it takes it.
    fn on_reply(&mut self, conn: u64, bytes: Vec<u8>) {
        let msg = {
            let mut net = self.net.borrow_mut();
            let Some(c) = net.conns.get_mut(&conn) else {
                return;
            };
            if c.dead {
                return;
            }
            c.client_dec.feed(&bytes);
            match c.client_dec.next_message() {
                Ok(Some(m)) => Some(m),
                Ok(None) | Err(_) => {
                    c.dead = true;
                    None
                }
            }
        };
        let owner = self.runs.iter().find_map(|(n, r)| {
            r.shippers
                .iter()
                .position(|s| {
                    matches!(&s.state, ShipState::Streaming { link, .. }
                        if link.connection().conn == conn)
                })
                .map(|i| (*n, i))
        });
        let Some((node, i)) = owner else {
            return;
        };
        if let Err(why) = self.take_reply(node, i, msg) {
            self.fail(node, i, why);
        }
    }

    fn take_reply(&mut self, node: usize, i: usize, msg: Option<Message>) -> Result<(), String> {
        let ack_on_apply = self.bug(StreamBug::AckOnApply);
        let vol = self.vol(node);
        let Some(run) = self.runs.get_mut(&node) else {
            return Ok(());
        };
        let s = &mut run.shippers[i];
        let ShipState::Streaming { link, wait, .. } = &mut s.state else {
            return Ok(());
        };
        let msg = msg.ok_or("connection closed")?;
        let Message::Reply { id: got, body } = msg else {
            return Err("not a reply".into());
        };

        match (wait.take(), body) {
            (Some(Wait::Apply { id, last, .. }), Reply::Apply(_, r)) if id == got => {
                link.applied(last, &r)?;
                if ack_on_apply {
                    s.durable = s.durable.max(r.applied_to);
                }
                Ok(())
            }
            (Some(Wait::Barrier { id, req, .. }), Reply::Barrier(_, r)) if id == got => {
                let d = link.barrier_done(&vol, &req, &r)?;
                s.durable = s.durable.max(d);
                // The committed point moves to what the mode proves now, flush or not.
                let slots: Vec<(&StreamState, Lsn)> = run
                    .shippers
                    .iter()
                    .map(|s| (&s.status, s.durable))
                    .collect();
                let point = proven(self.mode, &slots, vol.status().durable);
                if point > vol.status().committed {
                    vol.set_committed(point);
                }
                Ok(())
            }
            (_, Reply::Error(_, e)) => Err(format!("refused: {e}")),
            (w, other) => Err(format!(
                "reply {got} {other:?} does not answer {}",
                if w.is_some() {
                    "the request"
                } else {
                    "anything"
                }
            )),
        }
    }

    fn poll_flushes(&mut self, node: usize) {
        let now = self.now();
        let ignore_lease = self.bug(StreamBug::IgnoreLease);
        let Some(run) = self.runs.get_mut(&node) else {
            return;
        };
        let mut done = Vec::new();
        for (k, p) in run.pending.iter().enumerate() {
            let slots: Vec<(&StreamState, Lsn)> = run
                .shippers
                .iter()
                .map(|s| (&s.status, s.durable))
                .collect();
            match verdict(self.mode, &slots, p.lsn) {
                Verdict::Met { committed, counted } => {
                    if now < run.lease_until || ignore_lease {
                        let counted: Vec<usize> =
                            counted.iter().map(|c| run.shippers[*c].node).collect();
                        done.push((k, Some((p.lsn, committed, counted))));
                    } else {
                        done.push((k, None));
                    }
                }
                Verdict::Unavailable { .. } => done.push((k, None)),
                Verdict::Wait { .. } if now >= p.deadline => done.push((k, None)),
                Verdict::Wait { .. } => {}
            }
        }
        let (run_id, epoch) = (run.id, run.epoch);
        for (k, _) in done.iter().rev() {
            run.pending.remove(*k);
        }
        let vol = self.vol(node);
        for (_, outcome) in done {
            let Some((lsn, committed, counted)) = outcome else {
                self.net.borrow_mut().stats.flush_failed += 1;
                continue;
            };
            if committed > vol.status().committed {
                vol.set_committed(committed);
            }
            self.acknowledged(node, run_id, epoch, lsn, counted);
        }
    }

    /// A flush at `lsn` was acknowledged by `node` (run `run_id`, `epoch`), counting `counted`.
    fn acknowledged(
        &mut self,
        node: usize,
        run_id: u64,
        epoch: u64,
        lsn: Lsn,
        counted: Vec<usize>,
    ) {
        let now = self.now();
        self.net.borrow_mut().stats.acked += 1;
        if let Some((e, t)) = self
            .master
            .promotions
            .iter()
            .find(|(e, t)| *e > epoch && *t <= now)
        {
            self.violate(format!(
                "s{node} acknowledged a flush at epoch {epoch} after the master promoted epoch \
                 {e} at t={t}"
            ));
        }
        let mut ids = vec![0u64; BLOCKS as usize];
        for (id, w) in &self.writes {
            if w.run == run_id && w.lsn <= lsn {
                ids[w.block as usize] = ids[w.block as usize].max(*id);
            }
        }
        self.trace(|| format!("s{node} acks flush at {lsn} epoch {epoch} counting {counted:?}"));
        let check = self.rng.below(self.check_every) == 0;
        self.acks.push(Ack {
            counted: counted.clone(),
            ids: ids.clone(),
        });
        if !check {
            return;
        }
        // Durable where the mode says: crash a copy of each and read it back.
        for n in std::iter::once(node).chain(counted) {
            let image = {
                let net = self.net.borrow();
                net.nodes[n]
                    .disk
                    .crash_image_with(self.rng.next_u64(), CrashMode::DurableOnly)
            };
            self.net.borrow_mut().stats.durability_checks += 1;
            let vol = match Volume::open_sim(&SimDisk::from_image(image), &open_options()) {
                Ok(v) => v,
                Err(e) => {
                    self.violate(format!("s{n}'s crash image does not open: {e}"));
                    continue;
                }
            };
            let what = format!("s{n}'s crash image after a flush at {lsn} (epoch {epoch})");
            self.check_blocks(&vol, &ids, &what);
        }
    }

    /// Every block of `vol` holds a write issued for it, at least as new as `want`.
    fn check_blocks(&mut self, vol: &Volume, want: &[u64], what: &str) {
        for b in 0..BLOCKS {
            let buf = match vol.read(Lba(b), 1) {
                Ok(d) => d,
                Err(e) => {
                    self.violate(format!("{what}: block {b} unreadable: {e}"));
                    return;
                }
            };
            let need = want[b as usize];
            match parse(&buf) {
                Ok(None) if need > 0 => {
                    self.violate(format!(
                        "{what}: block {b} is zeros, write {need} was acknowledged"
                    ));
                }
                Ok(None) => {}
                Ok(Some((bb, id))) if bb != b || !self.issued[b as usize].contains(&id) => {
                    self.violate(format!("{what}: block {b} holds write {id} of block {bb}"));
                }
                Ok(Some((_, id))) if id < need => {
                    self.violate(format!(
                        "{what}: block {b} holds write {id}, older than acknowledged {need}"
                    ));
                }
                Ok(Some(_)) => {}
                Err(e) => self.violate(format!("{what}: block {b}: {e}")),
            }
        }
    }

    fn acked_now(&self) -> Vec<u64> {
        let mut want = vec![0u64; BLOCKS as usize];
        for a in &self.acks {
            for (w, id) in want.iter_mut().zip(&a.ids) {
                *w = (*w).max(*id);
            }
        }
        want
    }

    fn check_primary(&mut self, node: usize, why: &str) {
        let want = self.acked_now();
        let vol = self.vol(node);
        self.check_blocks(&vol, &want, &format!("s{node} {why}"));
    }

    // ---- faults --------------------------------------------------------------------------

    fn crash(&mut self, node: usize) {
        let now = self.now();
        {
            let mut net = self.net.borrow_mut();
            if !net.nodes[node].alive {
                return;
            }
            net.nodes[node].alive = false;
            net.stats.crashes += 1;
            if self.trace {
                eprintln!("t={now} crash s{node}");
            }
            let back = now + 100 + net.rng.below(4000);
            net.at(back, Ev::Restart { node });
        }
        self.end_run(node);
    }

    fn restart(&mut self, node: usize) {
        let mut net = self.net.borrow_mut();
        if net.nodes[node].alive {
            return;
        }
        let seed = net.rng.next_u64();
        let mode = match net.rng.below(4) {
            0 => CrashMode::DurableOnly,
            1 => CrashMode::AllWritten,
            2 => CrashMode::RandomSectors,
            _ => CrashMode::RandomSectorsTorn,
        };
        let image = net.nodes[node].disk.crash_image_with(seed, mode);
        let disk = SimDisk::from_image(image);
        let vol = match Volume::open_sim(&disk, &open_options()) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                drop(net);
                self.violate(format!(
                    "s{node}'s crash image ({mode:?}) does not open: {e}"
                ));
                return;
            }
        };
        if self.trace {
            let st = vol.status();
            eprintln!(
                "t={} restart s{node} ({mode:?}): head {} checkpoint {} epoch {}",
                net.now, st.head, st.checkpoint, st.epoch.0
            );
        }
        let n = &mut net.nodes[node];
        n.incarnation += 1;
        n.replica = LocalReplica::new(Arc::clone(&vol));
        n.vol = vol;
        n.disk = disk;
        n.alive = true;
        // The restarted server waits for the master's word: it acts as nothing until then.
        drop(net);
        self.known_epoch[node] = self.known_epoch[node].min(self.vol(node).status().epoch.0);
    }

    fn cut(&mut self, a: usize, b: usize) {
        let now = self.now();
        let mut net = self.net.borrow_mut();
        if a == b || !net.cut.insert(link(a, b)) {
            return;
        }
        net.stats.cuts += 1;
        let heal = now + 200 + net.rng.below(6000);
        net.at(heal, Ev::Heal { a, b });
    }

    fn inject(&mut self) {
        let hosts = SERVERS as u64 + 1;
        match self.rng.below(1000) {
            0..=4 => {
                let n = self.rng.below(SERVERS as u64) as usize;
                self.crash(n);
            }
            5..=14 => {
                let a = self.rng.below(hosts) as usize;
                let b = self.rng.below(hosts) as usize;
                self.cut(a, b);
            }
            15..=16 => {
                // Isolate one host.
                let a = self.rng.below(hosts) as usize;
                for b in 0..SERVERS + 1 {
                    self.cut(a, b);
                }
            }
            17..=19 => {
                // The primary: crash it, or cut it from the master.
                let p = self.master.primary;
                if self.rng.chance(500) {
                    self.crash(p);
                } else {
                    self.cut(p, MASTER);
                }
            }
            _ => {}
        }
    }

    // ---- the loop ------------------------------------------------------------------------

    fn deliver(&mut self, ev: Ev) {
        match ev {
            Ev::ToServer {
                conn,
                bytes,
                replay,
            } => {
                let mut net = self.net.borrow_mut();
                if !net.server_reachable(conn) && !replay {
                    net.stats.dropped += 1;
                    return;
                }
                if replay {
                    // Served only while the replica's process runs and the link is up.
                    let Some(c) = net.conns.get(&conn) else {
                        return;
                    };
                    let (from, to, inc) = (c.from, c.to, c.server_inc);
                    if !net.nodes[to].alive || net.nodes[to].incarnation != inc || !net.up(from, to)
                    {
                        return;
                    }
                }
                let Some(reply) = net.serve(conn, &bytes, replay) else {
                    return;
                };
                if replay {
                    return;
                }
                let bytes = net.encode(&reply);
                let Some(c) = net.conns.get(&conn) else {
                    return;
                };
                let (from, to, last) = (c.from, c.to, c.last_to_client);
                if !net.up(from, to) {
                    net.stats.dropped += 1;
                    return;
                }
                let t = (net.now + net.latency()).max(last);
                if let Some(c) = net.conns.get_mut(&conn) {
                    c.last_to_client = t;
                }
                net.at(t, Ev::ToClient { conn, bytes });
            }
            Ev::ToClient { conn, bytes } => self.on_reply(conn, bytes),
            Ev::HbToMaster {
                node,
                sent,
                epoch,
                serving,
            } => self.master_heard(node, sent, epoch, serving),
            Ev::HbToNode {
                node,
                inc,
                sent,
                epoch,
                primary,
            } => {
                if sent == u64::MAX {
                    self.send_heartbeat(node);
                } else if self.alive(node) && self.net.borrow().nodes[node].incarnation == inc {
                    self.node_heard(node, sent, epoch, primary);
                }
            }
            Ev::Restart { node } => self.restart(node),
            Ev::Heal { a, b } => {
                self.net.borrow_mut().cut.remove(&link(a, b));
            }
        }
    }

    /// Advances simulated time by `dt`, delivering what falls due.
    fn advance(&mut self, dt: u64) {
        let end = self.now() + dt;
        loop {
            let next = {
                let mut net = self.net.borrow_mut();
                match net.events.first_key_value() {
                    Some((&(t, _), _)) if t <= end => {
                        net.now = net.now.max(t);
                        net.events.pop_first().map(|(_, ev)| ev)
                    }
                    _ => None,
                }
            };
            let Some(ev) = next else { break };
            self.deliver(ev);
            let stale = std::mem::take(&mut self.net.borrow_mut().stale_accepted);
            for v in stale {
                self.violate(v);
            }
            self.master_tick();
            self.poll_runs();
        }
        self.net.borrow_mut().now = end;
        self.master_tick();
        self.poll_runs();
        // The servers' flushers.
        for n in 0..SERVERS {
            if self.alive(n) {
                flush_if_half_full(&self.vol(n));
            }
        }
    }

    fn client_step(&mut self) {
        match self.rng.below(10) {
            0..=5 => self.client_write(),
            6..=7 => self.client_flush(),
            _ => {}
        }
    }

    /// Whether the cluster is healed and caught up: the master's primary acts with a lease,
    /// and both replicas stream with everything durable.
    fn converged(&self) -> bool {
        let p = self.master.primary;
        let Some(run) = self.runs.get(&p) else {
            return false;
        };
        let head = self.vol(p).status().head;
        self.runs.len() == 1
            && run.lease_until > self.now()
            && run.pending.is_empty()
            && run.shippers.iter().all(|s| {
                s.status == StreamState::Streaming
                    && s.durable == head
                    && matches!(&s.state, ShipState::Streaming { wait: None, .. })
            })
    }

    /// Runs the faulty phase, then the healed phase and the final checks.
    pub fn run(mut self) -> StreamSimReport {
        for _ in 0..self.opts.steps {
            self.inject();
            self.client_step();
            let dt = 1 + self.rng.below(40);
            self.advance(dt);
        }
        // Healed: no more faults, every host back.
        {
            let mut net = self.net.borrow_mut();
            net.faults.enabled = false;
            net.cut.clear();
        }
        for n in 0..SERVERS {
            self.restart(n);
        }
        let start = self.now();
        let mut converged = false;
        while self.now() < start + self.opts.liveness_ms {
            // Writes go on for the first 5 s (one request in flight per replica cannot keep
            // up with any write rate over 200 ms links, so convergence is judged after them).
            if self.now() < start + 5_000 && self.rng.chance(300) {
                self.client_write();
            }
            self.client_flush();
            self.advance(50);
            if self.converged() {
                converged = true;
                break;
            }
        }
        if !converged {
            let p = self.master.primary;
            let states: Vec<String> = self
                .runs
                .get(&p)
                .map(|r| {
                    r.shippers
                        .iter()
                        .map(|s| {
                            let link = match &s.state {
                                ShipState::Streaming { link, wait, .. } => format!(
                                    " (tip {}, link durable {}, waiting {})",
                                    link.tip().lsn,
                                    link.durable(),
                                    wait.is_some()
                                ),
                                ShipState::Backoff { until } => format!(" (backoff until {until})"),
                            };
                            format!("s{}: {:?} durable {}{link}", s.node, s.status, s.durable)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let want = self.runs.get(&p).map(|r| r.flush_want);
            self.violate(format!(
                "no convergence within {} simulated ms of healing (primary s{p}, runs on {:?}, \
                 head {}, flush wanted {want:?}): {}",
                self.opts.liveness_ms,
                self.runs.keys().collect::<Vec<_>>(),
                self.vol(p).status().head,
                states.join("; ")
            ));
        } else {
            self.final_checks();
        }
        let now = self.now();
        let mut net = self.net.borrow_mut();
        let mut report = std::mem::take(&mut net.stats);
        report.sim_ms = now;
        report
    }

    fn final_checks(&mut self) {
        let p = self.master.primary;
        self.check_primary(p, "at the end");
        let primary = self.vol(p);
        let mut blocks = Vec::new();
        for b in 0..BLOCKS {
            blocks.push(primary.read(Lba(b), 1).unwrap_or_default());
        }
        for n in (0..SERVERS).filter(|n| *n != p) {
            let vol = self.vol(n);
            // The replica's copy: what its extent and WAL give for every block.
            for (b, want) in blocks.iter().enumerate() {
                let got = vol.read(Lba(b as u64), 1).unwrap_or_default();
                if got != *want {
                    let g = parse(&got);
                    let w = parse(want);
                    self.violate(format!(
                        "s{n} block {b} holds {g:?}, the primary s{p} {w:?}"
                    ));
                    break;
                }
            }
            let pins = vol.status().pins_outstanding;
            if pins > 0 {
                self.violate(format!("replica s{n} holds {pins} pins at the end"));
            }
        }
    }
}

/// Runs one seed.
pub fn run_stream_seed(opts: StreamSimOptions) -> Result<StreamSimReport, String> {
    Ok(StreamSim::new(opts)?.run())
}
