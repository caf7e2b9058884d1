//! The simulated processes and network: which process of each server is alive (its volume,
//! its replica endpoint and its primary storage), where it listens, and which addresses are
//! unreachable. A connection is bound to the process incarnation it reached: a request after
//! that process crashed fails as a reset connection, the way a TCP connection does, instead of
//! silently reaching the restarted process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockvol::{BaseChunk, EntryInfo, Lsn as BvLsn, RetentionPolicy, Volume};
use engine::{BaseChunkProgress, BaseRequest, CatchUpIo, EntryId, Lsn, RebuildIo, TransferError};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    BlockVolStorage, BridgeIo, HandshakeReply, Lineage, LocalReplica, ReplicaTarget, TargetError,
    TruncateRequest,
};

/// One live process of a server.
#[derive(Clone)]
pub struct Proc {
    /// Counts restarts of this server's process.
    pub incarnation: u64,
    /// The volume it has open.
    pub vol: Arc<Volume>,
    /// Its replica endpoint (serves pushes to this volume).
    pub replica: LocalReplica,
    /// Its primary storage (serves pulls from this volume).
    pub storage: Arc<BlockVolStorage>,
    /// Where its replica endpoint listens.
    pub data_addr: String,
    /// Where its primary storage listens.
    pub rebuild_addr: String,
    /// Whether the replica endpoint is listening (replica and rebuilding roles).
    pub serves_data: bool,
    /// Whether the primary storage is listening (primary role).
    pub serves_rebuild: bool,
    /// The volume's retention policy (what it was opened with).
    pub retention: RetentionPolicy,
}

#[derive(Default)]
struct NetInner {
    procs: BTreeMap<String, Proc>,
    down: BTreeSet<String>,
    /// Every lineage a replica process accepted a request from: (server, incarnation) ->
    /// lineages.
    accepted: BTreeMap<(String, u64), BTreeSet<Lineage>>,
}

/// Processes and network, shared by every server's backend and every connection.
#[derive(Default)]
pub struct Net {
    inner: Mutex<NetInner>,
}

fn reset(detail: String) -> TargetError {
    TargetError::Protocol(detail)
}

impl Net {
    fn lock(&self) -> MutexGuard<'_, NetInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs (or replaces, after a crash) the process of `server`.
    pub fn set_proc(&self, server: &str, proc: Proc) {
        self.lock().procs.insert(server.to_owned(), proc);
    }

    /// The live process of `server`.
    pub fn proc(&self, server: &str) -> Option<Proc> {
        self.lock().procs.get(server).cloned()
    }

    /// Every live process, by server.
    pub fn procs(&self) -> Vec<(String, Proc)> {
        self.lock()
            .procs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Gives every process a fresh primary storage adapter, dropping fault injections still
    /// queued in the old ones (pin failures). Only between recoveries: no pin is live then.
    pub fn fresh_storages(&self) {
        for p in self.lock().procs.values_mut() {
            p.storage = Arc::new(BlockVolStorage::new(Arc::clone(&p.vol)));
        }
    }

    /// Changes what `server` listens on.
    pub fn set_listening(&self, server: &str, data: bool, rebuild: bool) {
        if let Some(p) = self.lock().procs.get_mut(server) {
            p.serves_data = data;
            p.serves_rebuild = rebuild;
        }
    }

    /// Moves `server`'s replica endpoint to `addr`.
    pub fn set_data_addr(&self, server: &str, addr: &str) {
        if let Some(p) = self.lock().procs.get_mut(server) {
            p.data_addr = addr.to_owned();
        }
    }

    /// Records that `server`'s run `incarnation` accepted a request from `lineage`.
    pub fn note_accepted(&self, server: &str, incarnation: u64, lineage: Lineage) {
        self.lock()
            .accepted
            .entry((server.to_owned(), incarnation))
            .or_default()
            .insert(lineage);
    }

    /// Lineages `server`'s current run accepted that are older than a newer one it accepted
    /// from the same driver at the same epoch: the replica must refuse them now.
    pub fn superseded_lineages(&self, server: &str) -> Vec<Lineage> {
        let g = self.lock();
        let Some(inc) = g.procs.get(server).map(|p| p.incarnation) else {
            return Vec::new();
        };
        let Some(seen) = g.accepted.get(&(server.to_owned(), inc)) else {
            return Vec::new();
        };
        seen.iter()
            .filter(|l| {
                seen.iter()
                    .any(|n| n.driver == l.driver && n.epoch == l.epoch && n.session > l.session)
            })
            .copied()
            .collect()
    }

    /// Makes `addr` unreachable, or reachable again.
    pub fn set_down(&self, addr: &str, down: bool) {
        let mut g = self.lock();
        if down {
            g.down.insert(addr.to_owned());
        } else {
            g.down.remove(addr);
        }
    }

    /// Every unreachable address.
    pub fn down_addrs(&self) -> Vec<String> {
        self.lock().down.iter().cloned().collect()
    }

    /// Makes every address reachable.
    pub fn heal(&self) {
        self.lock().down.clear();
    }

    /// The server and process listening on the data address `addr`.
    pub fn resolve_data(&self, addr: &str) -> Result<(String, Proc), String> {
        let g = self.lock();
        if g.down.contains(addr) {
            return Err(format!("{addr} unreachable"));
        }
        g.procs
            .iter()
            .find(|(_, p)| p.serves_data && p.data_addr == addr)
            .map(|(s, p)| (s.clone(), p.clone()))
            .ok_or_else(|| format!("nothing listens on {addr}"))
    }

    /// The server, primary storage and incarnation listening on the rebuild address `addr`.
    pub fn resolve_rebuild(
        &self,
        addr: &str,
    ) -> Result<(String, Arc<BlockVolStorage>, u64), String> {
        let g = self.lock();
        if g.down.contains(addr) {
            return Err(format!("{addr} unreachable"));
        }
        g.procs
            .iter()
            .find(|(_, p)| p.serves_rebuild && p.rebuild_addr == addr)
            .map(|(s, p)| (s.clone(), Arc::clone(&p.storage), p.incarnation))
            .ok_or_else(|| format!("no primary listens on {addr}"))
    }
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The replica endpoint at a data address.
    Addr(String),
    /// The local process's own replica endpoint (a rebuild pulls into its own volume).
    Local(String),
}

/// A connection to a replica endpoint, bound to the incarnation it reached.
pub struct SimTarget {
    net: Arc<Net>,
    dest: Dest,
    server: String,
    incarnation: u64,
    /// [`Bug::CorruptBaseBlock`](super::Bug::CorruptBaseBlock): the next base chunk is
    /// written with its first block's bytes inverted.
    corrupt_base: bool,
}

impl SimTarget {
    /// Connects to `dest`.
    pub fn connect(net: &Arc<Net>, dest: Dest) -> Result<SimTarget, String> {
        let (server, incarnation) = match &dest {
            Dest::Addr(a) => {
                let (s, p) = net.resolve_data(a)?;
                (s, p.incarnation)
            }
            Dest::Local(s) => {
                let p = net.proc(s).ok_or_else(|| format!("{s} has no process"))?;
                (s.clone(), p.incarnation)
            }
        };
        Ok(SimTarget {
            net: Arc::clone(net),
            dest,
            server,
            incarnation,
            corrupt_base: false,
        })
    }

    /// The replica behind this connection writes the first base chunk it receives with its
    /// first block's bytes inverted ([`Bug::CorruptBaseBlock`](super::Bug::CorruptBaseBlock)).
    pub fn corrupting_base(mut self) -> SimTarget {
        self.corrupt_base = true;
        self
    }

    /// The server this connection reached.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn live_proc(&self) -> Result<Proc, TargetError> {
        let (server, p) = match &self.dest {
            Dest::Addr(a) => self.net.resolve_data(a).map_err(reset)?,
            Dest::Local(s) => {
                let p = self
                    .net
                    .proc(s)
                    .ok_or_else(|| reset(format!("{s} has no process")))?;
                (s.clone(), p)
            }
        };
        if server != self.server || p.incarnation != self.incarnation {
            return Err(reset(format!(
                "connection reset: {} restarted (incarnation {} -> {})",
                self.server, self.incarnation, p.incarnation
            )));
        }
        Ok(p)
    }

    fn live(&self) -> Result<LocalReplica, TargetError> {
        self.live_proc().map(|p| p.replica)
    }

    fn accepted<T>(&self, lineage: Lineage, r: Result<T, TargetError>) -> Result<T, TargetError> {
        if r.is_ok() {
            self.net
                .note_accepted(&self.server, self.incarnation, lineage);
        }
        r
    }
}

/// The replica's background flusher, emulated where it matters (the simulated volumes have no
/// flusher thread): it keeps half of the ring free ahead of an apply, and a writer that finds
/// the ring full waits for one flush cycle before it gives up.
fn flush_if_half_full(vol: &Volume) {
    let st = vol.status();
    if st.wal_used_bytes * 2 > st.wal_size_bytes {
        let _ = vol.force_flush();
    }
}

/// What the flusher does for a writer waiting for ring space: one flush cycle in which the
/// retention policy yields (it is soft while a writer waits; pins are not).
pub fn flush_for_waiting_writer(vol: &Volume, retention: RetentionPolicy) {
    vol.set_retention(RetentionPolicy::default());
    let _ = vol.force_flush();
    vol.set_retention(retention);
}

impl ReplicaTarget for SimTarget {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        self.live()?.handshake()
    }
    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        let p = self.live_proc()?;
        flush_if_half_full(&p.vol);
        let lineage = req.lineage;
        let r = match p.replica.clone().apply(req.clone()) {
            Err(TargetError::Storage(e)) if e.contains("WAL full") => {
                // An apply is idempotent (entries the replica already holds are acknowledged as
                // duplicates), so the waiting writer simply tries again after the flush.
                flush_for_waiting_writer(&p.vol, p.retention);
                p.replica.clone().apply(req)
            }
            other => other,
        };
        self.accepted(lineage, r)
    }
    fn truncate(&mut self, req: TruncateRequest) -> Result<EntryInfo, TargetError> {
        let lineage = req.lineage;
        let r = self.live()?.truncate(req);
        self.accepted(lineage, r)
    }
    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<blockvol::Lba, TargetError> {
        let lineage = req.lineage;
        let r = self.live()?.begin_base(req);
        self.accepted(lineage, r)
    }
    fn base_chunk(&mut self, mut req: BaseChunkRequest) -> Result<(), TargetError> {
        let lineage = req.lineage;
        if self.corrupt_base
            && let Ok(mut chunk) = BaseChunk::decode(&req.frame)
            && chunk.blocks > 0
        {
            // The bug: the bytes of one block go wrong on the replica's side, after the frame's
            // checksum was verified; the install keeps its LSN and entry identity.
            self.corrupt_base = false;
            let block = chunk.data.len() / chunk.blocks as usize;
            chunk.data[..block].iter_mut().for_each(|b| *b = !*b);
            if let Ok(frame) = BaseChunk::new(chunk.lba, chunk.blocks, chunk.data).encode() {
                req.frame = frame;
            }
        }
        let r = self.live()?.base_chunk(req);
        self.accepted(lineage, r)
    }
    fn finish_base(&mut self, lineage: Lineage) -> Result<BvLsn, TargetError> {
        let r = self.live()?.finish_base(lineage);
        self.accepted(lineage, r)
    }
    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        let lineage = req.lineage;
        let r = self.live()?.barrier(req);
        self.accepted(lineage, r)
    }
}

/// The primary a transfer reads from, bound to the incarnation the plan pinned: over the
/// network for a pull (`addr`), or the local process for a push.
pub struct Source {
    /// The network.
    pub net: Arc<Net>,
    /// The primary's rebuild address, for a pull.
    pub addr: Option<String>,
    /// The primary's server.
    pub server: String,
    /// The incarnation the plan pinned.
    pub incarnation: u64,
}

impl Source {
    fn check(&self) -> Result<(), TransferError> {
        let now = match &self.addr {
            Some(addr) => self
                .net
                .resolve_rebuild(addr)
                .map(|(s, _, inc)| (s, inc))
                .map_err(|detail| TransferError::Transport { detail })?,
            None => (
                self.server.clone(),
                self.net.proc(&self.server).map_or(0, |p| p.incarnation),
            ),
        };
        if now == (self.server.clone(), self.incarnation) {
            return Ok(());
        }
        Err(TransferError::Transport {
            detail: format!(
                "source {} incarnation {} is gone (now {} incarnation {})",
                self.server, self.incarnation, now.0, now.1
            ),
        })
    }
}

/// Called when a base install starts on the target (the target's copy is about to be wiped).
pub type OnBaseBegin = Box<dyn FnMut(&str)>;

/// The I/O of one recovery session: the bridge's real I/O over a simulated connection, plus a
/// check that a pull's source is still the process it pinned.
pub struct SimIo {
    inner: BridgeIo<SimTarget>,
    source: Option<Source>,
    on_base_begin: OnBaseBegin,
}

impl SimIo {
    /// Wraps the bridge's I/O.
    pub fn new(
        inner: BridgeIo<SimTarget>,
        source: Option<Source>,
        on_base_begin: OnBaseBegin,
    ) -> SimIo {
        SimIo {
            inner,
            source,
            on_base_begin,
        }
    }

    fn check(&self) -> Result<(), TransferError> {
        self.source.as_ref().map_or(Ok(()), Source::check)
    }
}

impl CatchUpIo for SimIo {
    fn truncate_after(&mut self, lsn: Lsn) -> Result<EntryId, TransferError> {
        self.check()?;
        self.inner.truncate_after(lsn)
    }
    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        up_to: Lsn,
        max_entries: u64,
    ) -> Result<engine::WalChunk, TransferError> {
        self.check()?;
        self.inner.stream_wal_chunk(after, up_to, max_entries)
    }
    fn barrier(&mut self, target: Lsn) -> Result<Lsn, TransferError> {
        self.check()?;
        self.inner.barrier(target)
    }
}

impl RebuildIo for SimIo {
    fn begin_base(&mut self, base: &BaseRequest) -> Result<u64, TransferError> {
        self.check()?;
        let server = self.inner.target().server().to_owned();
        (self.on_base_begin)(&server);
        self.inner.begin_base(base)
    }
    fn transfer_base_chunk(&mut self, max_bytes: u64) -> Result<BaseChunkProgress, TransferError> {
        self.check()?;
        self.inner.transfer_base_chunk(max_bytes)
    }
    fn finish_base(&mut self) -> Result<Lsn, TransferError> {
        self.check()?;
        self.inner.finish_base()
    }
}
