//! The replica server: one listener, many volumes, one thread per connection.
//!
//! A connection must authenticate before it can send a request; requests name their volume and
//! are dispatched to that volume's [`LocalReplica`], which applies the same lineage admission
//! as in process. Requests on one connection are served in order, so a client may pipeline them
//! (within the credit window the server grants) and match replies by order and ID. Every close
//! is logged with its reason and counted in [`ServerStats`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockvol::{FlushGate, OpenOptions, Volume};
use engine::{FullBasePin, RetentionPin, SnapshotPin, StorageAdapter};
use v2bridge::convert::{entry_info, to_blockvol, to_engine};
use v2bridge::{
    BlockVolStorage, ImageChunk, LocalReplica, LocalSource, PrimarySource, ReplicaTarget,
    TargetError,
};

use super::conn::{Conn, ConnError};
use super::reaper::Reaper;
use crate::wire::{
    AuthRole, Authenticator, Challenge, Close, CloseCode, DEFAULT_MAX_FRAME, FEATURES,
    HistoryReply, ImageChunkReply, Message, Nonce, PinWhat, ProbeReply, Reply, Request, VERSION,
    check_volume_name,
};

/// The longest lease a puller may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(60);
/// Leases one connection may hold at once (a rebuild needs at most two).
pub const MAX_LEASES_PER_CONNECTION: usize = 16;
/// The largest frame accepted before a peer has authenticated (the handshake's frames are
/// small).
pub const HANDSHAKE_MAX_FRAME: u32 = 1024;

/// How a replica server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The cluster secret; without one the server refuses any address but loopback.
    pub secret: Option<Vec<u8>>,
    /// The largest frame payload accepted.
    pub max_frame: u32,
    /// Request bytes a client may have in flight.
    pub window: u32,
    /// Connections served at once; more are refused with `Busy`.
    pub max_connections: usize,
    /// Time a client has to authenticate.
    pub handshake_timeout: Duration,
    /// Time a started frame has to arrive in full.
    pub frame_timeout: Duration,
    /// Time a connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// Data bytes between two durable resume points of a base install a replica volume
    /// receives (0: blockvol's default, a sixteenth of the extent, 4 MiB to 1 GiB).
    pub install_stride: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            secret: None,
            max_frame: DEFAULT_MAX_FRAME,
            window: 4 * DEFAULT_MAX_FRAME,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            install_stride: 0,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Without a secret only loopback addresses are allowed.
    #[error("refusing to listen on {0} without a cluster secret (only loopback is allowed)")]
    NeedsSecret(SocketAddr),
    /// The socket could not be bound.
    #[error("listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

/// The volumes a server serves, by name.
pub struct Volumes {
    dir: Option<PathBuf>,
    open: Mutex<BTreeMap<String, LocalReplica>>,
    /// The primary side of each volume that a puller asked for (history, pins, images).
    storage: Mutex<BTreeMap<String, Arc<BlockVolStorage>>>,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes").field("dir", &self.dir).finish()
    }
}

impl Volumes {
    /// Volumes added with [`insert`](Self::insert) only.
    pub fn new() -> Self {
        Volumes {
            dir: None,
            open: Mutex::new(BTreeMap::new()),
            storage: Mutex::new(BTreeMap::new()),
        }
    }

    /// Volumes in `dir`: volume `NAME` is the file `dir/NAME.vol`, opened as a replica (flusher
    /// gated by the committed point) on its first request and kept open.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Volumes {
            dir: Some(dir.into()),
            open: Mutex::new(BTreeMap::new()),
            storage: Mutex::new(BTreeMap::new()),
        }
    }

    /// Serves `replica` as `name`.
    pub fn insert(&self, name: &str, replica: LocalReplica) {
        self.lock().insert(name.to_owned(), replica);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LocalReplica>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replica named `name`, opened from the directory if needed.
    pub fn get(&self, name: &str) -> Result<LocalReplica, TargetError> {
        check_volume_name(name).map_err(|e| TargetError::Protocol(e.to_string()))?;
        let mut open = self.lock();
        if let Some(r) = open.get(name) {
            return Ok(r.clone());
        }
        let Some(dir) = &self.dir else {
            return Err(TargetError::Protocol(format!("no volume {name:?} here")));
        };
        let path = dir.join(format!("{name}.vol"));
        if !path.is_file() {
            return Err(TargetError::Protocol(format!("no volume {name:?} here")));
        }
        let opts = OpenOptions {
            flush_gate: FlushGate::Committed,
            ..OpenOptions::default()
        };
        let vol = Volume::open(&path, &opts)
            .map_err(|e| TargetError::Storage(format!("open {}: {e}", path.display())))?;
        let replica = LocalReplica::new(Arc::new(vol));
        open.insert(name.to_owned(), replica.clone());
        Ok(replica)
    }

    /// The primary side of volume `name`: its retained history, pins and images, shared by
    /// every connection.
    pub fn storage(&self, name: &str) -> Result<Arc<BlockVolStorage>, TargetError> {
        let replica = self.get(name)?;
        let mut map = self.storage.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Arc::clone(map.entry(name.to_owned()).or_insert_with(
            || Arc::new(BlockVolStorage::new(replica.volume())),
        )))
    }

    /// Stops serving `name`; returns its replica (the volume stays open while others hold it).
    pub fn remove(&self, name: &str) -> Option<LocalReplica> {
        self.storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.lock().remove(name)
    }

    /// Names of the volumes served now.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Closes every open volume (syncing it); used at shutdown.
    pub fn close_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (name, replica) in all {
            if let Err(e) = replica.volume().sync() {
                log::warn!("volume {name}: sync at shutdown: {e}");
            }
        }
    }
}

impl Default for Volumes {
    fn default() -> Self {
        Self::new()
    }
}

/// What the server has seen, by outcome. Every close increments exactly one counter.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections that authenticated.
    pub authenticated: AtomicU64,
    /// Requests served (including refused ones, answered with an error reply).
    pub requests: AtomicU64,
    /// Closed: too many connections.
    pub refused_busy: AtomicU64,
    /// Closed: authentication failed.
    pub auth_failed: AtomicU64,
    /// Closed: a bad frame or a message out of order.
    pub protocol_errors: AtomicU64,
    /// Closed: a deadline passed.
    pub timeouts: AtomicU64,
    /// Closed by the peer or by a socket error.
    pub disconnects: AtomicU64,
    /// Leases that ran out without a renewal (their pins released).
    pub leases_expired: AtomicU64,
    /// Leases granted.
    pub leases_granted: AtomicU64,
    /// Leases of connections that broke (no `Close`), kept until their deadlines so a puller
    /// that reconnects finds its image still pinned.
    pub leases_orphaned: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
}

impl ServerStats {
    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A running replica server. Dropping it stops the listener; connections end at their next
/// deadline or request.
pub struct ReplicaServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    volumes: Arc<Volumes>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReplicaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// The open connections, so stopping the server closes them.
    conns: Mutex<BTreeMap<u64, TcpStream>>,
    config: ServerConfig,
    auth: Authenticator,
    volumes: Arc<Volumes>,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    /// Leases of broken connections, until their deadlines.
    orphans: Reaper,
}

impl ReplicaServer {
    /// Binds `addr` and serves `volumes` on a background thread.
    pub fn start(
        addr: SocketAddr,
        config: ServerConfig,
        volumes: Arc<Volumes>,
    ) -> Result<ReplicaServer, ServerError> {
        if config.secret.as_deref().is_none_or(<[u8]>::is_empty) && !addr.ip().is_loopback() {
            return Err(ServerError::NeedsSecret(addr));
        }
        let listener =
            TcpListener::bind(addr).map_err(|error| ServerError::Bind { addr, error })?;
        let local = listener
            .local_addr()
            .map_err(|error| ServerError::Bind { addr, error })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let shared = Arc::new(Shared {
            conns: Mutex::new(BTreeMap::new()),
            auth: Authenticator::new(config.secret.as_deref()),
            config,
            volumes: Arc::clone(&volumes),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            orphans: Reaper::start(&format!("replica-leases-{}", local.port()))
                .map_err(|error| ServerError::Bind { addr, error })?,
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("replica-accept-{}", local.port()))
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|error| ServerError::Bind { addr, error })?;
        log::info!("replica server listening on {local}");
        Ok(ReplicaServer {
            addr: local,
            shared,
            stop,
            stats,
            volumes,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has seen.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The volumes it serves.
    pub fn volumes(&self) -> &Arc<Volumes> {
        &self.volumes
    }

    /// Stops accepting connections, closes the open ones (their peers see the connection
    /// end) and waits for the listener thread.
    pub fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(
            &mut *self
                .shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (_, c) in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // A stopped server holds no pins.
        self.shared.orphans.release_all();
    }

    /// Leases of broken connections still held (until their deadlines).
    pub fn orphaned_leases(&self) -> usize {
        self.shared.orphans.len()
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let open = shared.stats.open.fetch_add(1, Ordering::SeqCst);
        if open >= shared.config.max_connections {
            shared.stats.open.fetch_sub(1, Ordering::SeqCst);
            shared.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            log::warn!("closing connection from {peer}: busy ({open} connections open)");
            if let Ok(mut conn) = Conn::new(stream, shared.config.max_frame) {
                let _ = conn.send(
                    &close(CloseCode::Busy, "too many connections"),
                    Duration::from_millis(100),
                );
            }
            continue;
        }
        let key = shared.stats.accepted.load(Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, clone);
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("replica-conn-{peer}"))
            .spawn(move || {
                serve(stream, &peer, &conn_shared);
                conn_shared
                    .conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                conn_shared.stats.open.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            shared.stats.open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("cannot start a connection thread: {e}");
        }
    }
}

fn close(code: CloseCode, reason: &str) -> Message {
    Message::Close(Close {
        code: code as u16,
        reason: reason.to_owned(),
    })
}

/// How a served connection ended.
enum End {
    Auth(String),
    Protocol(String),
    Timeout(String),
    Gone(String),
    Version(String),
    Shutdown,
}

fn serve(stream: TcpStream, peer: &str, shared: &Shared) {
    let mut conn = match Conn::new(stream, shared.config.max_frame) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("connection from {peer}: {e}");
            shared.stats.disconnects.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let end = match handshake(&mut conn, shared) {
        Ok(node) => {
            shared.stats.authenticated.fetch_add(1, Ordering::Relaxed);
            log::info!("connection from {peer} authenticated as {node:?}");
            requests(&mut conn, shared)
        }
        Err(end) => end,
    };
    let stats = &shared.stats;
    let (counter, code, reason) = match &end {
        End::Auth(r) => (&stats.auth_failed, CloseCode::AuthFailed, r.clone()),
        End::Protocol(r) => (&stats.protocol_errors, CloseCode::Protocol, r.clone()),
        End::Version(r) => (&stats.protocol_errors, CloseCode::Version, r.clone()),
        End::Timeout(r) => (&stats.timeouts, CloseCode::Timeout, r.clone()),
        End::Gone(r) => (&stats.disconnects, CloseCode::Protocol, r.clone()),
        End::Shutdown => (
            &stats.disconnects,
            CloseCode::Shutdown,
            "shutdown".to_owned(),
        ),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if matches!(end, End::Gone(_)) {
        log::info!("connection from {peer} ended: {reason}");
    } else {
        log::warn!("closing connection from {peer}: {reason}");
        let _ = conn.send(&close(code, &reason), Duration::from_millis(200));
    }
}

fn conn_end(e: ConnError) -> End {
    match e {
        ConnError::Wire(w) => End::Protocol(w.to_string()),
        ConnError::Timeout(what) => End::Timeout(format!("timed out waiting for {what}")),
        e @ (ConnError::Eof { .. } | ConnError::Io(_)) => End::Gone(e.to_string()),
    }
}

/// Runs the server side of the authentication; returns the client's node name.
fn handshake(conn: &mut Conn, shared: &Shared) -> Result<String, End> {
    // One deadline for the whole exchange, and frames no larger than the handshake needs
    // until the peer has proven itself: an unauthenticated peer can make the server buffer
    // at most a kilobyte, for at most the handshake timeout.
    conn.set_recv_max(HANDSHAKE_MAX_FRAME);
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let budget = left();
    let hello = match conn.recv(budget, budget, "hello").map_err(conn_end)? {
        Message::Hello(h) => h,
        other => {
            return Err(End::Protocol(format!(
                "expected hello, got {}",
                other.frame_type().name()
            )));
        }
    };
    if hello.version != VERSION {
        return Err(End::Version(format!(
            "client speaks version {}, this server {VERSION}",
            hello.version
        )));
    }
    let nonce = Nonce::random().map_err(|e| End::Gone(format!("random source: {e}")))?;
    let features = hello.features & FEATURES;
    let mac = shared
        .auth
        .sign(AuthRole::Server, &hello.nonce, &nonce, features);
    let challenge = Message::Challenge(Challenge {
        version: VERSION,
        features,
        nonce,
        mac,
        max_frame: shared.config.max_frame,
        window: shared.config.window,
    });
    conn.send(&challenge, left()).map_err(conn_end)?;
    let budget = left();
    let tag = match conn.recv(budget, budget, "auth").map_err(conn_end)? {
        Message::Auth(tag) => tag,
        Message::Close(c) => return Err(End::Gone(format!("client closed: {}", c.reason))),
        other => {
            return Err(End::Protocol(format!(
                "expected auth, got {}",
                other.frame_type().name()
            )));
        }
    };
    if !shared
        .auth
        .verify(AuthRole::Client, &hello.nonce, &nonce, features, &tag)
    {
        return Err(End::Auth(format!(
            "client {:?} does not know the cluster secret",
            hello.node
        )));
    }
    conn.send(&Message::Ready, left()).map_err(conn_end)?;
    conn.set_recv_max(shared.config.max_frame);
    Ok(hello.node)
}

/// A pin a puller holds under a lease.
enum Held {
    Wal(#[allow(dead_code)] RetentionPin),
    Snapshot(SnapshotPin),
    Full(FullBasePin),
}

impl Held {
    fn image_pin(&self) -> Option<engine::PinId> {
        match self {
            Held::Wal(_) => None,
            Held::Snapshot(p) => Some(p.pin_id),
            Held::Full(p) => Some(p.pin_id),
        }
    }
}

struct Lease {
    volume: String,
    held: Held,
    deadline: Instant,
}

/// What one connection holds of the primary side: leased pins and open sources. Dropped with
/// the connection, which releases every pin (a puller that closes or dies).
#[derive(Default)]
struct PrimarySide {
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    sources: BTreeMap<String, LocalSource>,
    /// The lease whose image each volume's source has open: the image is closed with it.
    open_images: BTreeMap<String, u64>,
}

impl PrimarySide {
    fn earliest(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    /// Releases the pins of expired leases; returns how many.
    fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            if let Some(l) = self.release(*id) {
                log::warn!("lease {id} on volume {} expired: pin released", l.volume);
            }
        }
        expired.len()
    }

    /// Ends lease `id`: its pin is released, and an image open under it is closed (a source
    /// must not keep reading an image that is no longer pinned).
    fn release(&mut self, id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if self.open_images.get(&lease.volume) == Some(&id) {
            self.open_images.remove(&lease.volume);
            if let Some(src) = self.sources.get_mut(&lease.volume) {
                src.close_image();
            }
        }
        Some(lease)
    }

    fn source(&mut self, volumes: &Volumes, name: &str) -> Result<&mut LocalSource, TargetError> {
        if !self.sources.contains_key(name) {
            let storage = volumes.storage(name)?;
            self.sources
                .insert(name.to_owned(), LocalSource::new(storage));
        }
        self.sources
            .get_mut(name)
            .ok_or_else(|| TargetError::Protocol("source vanished".into()))
    }
}

/// Payload bytes a reply may carry besides its fields.
fn reply_budget(shared: &Shared) -> usize {
    (shared.config.max_frame as usize)
        .saturating_sub(4096)
        .max(4096)
}

fn lease_of(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms).max(1)).min(MAX_LEASE)
}

fn transfer(e: engine::TransferError) -> TargetError {
    TargetError::Storage(e.to_string())
}

fn storage_err(e: engine::StorageError) -> TargetError {
    TargetError::Storage(e.to_string())
}

/// Serves a request against the volume's primary side.
fn primary_request(
    side: &mut PrimarySide,
    shared: &Shared,
    volume: &str,
    body: Request,
) -> Result<Reply, TargetError> {
    let volumes = &shared.volumes;
    Ok(match body {
        Request::History => {
            let h = volumes
                .storage(volume)?
                .get_retained_history()
                .map_err(storage_err)?;
            Reply::History(HistoryReply {
                head: to_blockvol(h.head_lsn),
                tail: to_blockvol(h.tail_lsn),
                committed: to_blockvol(h.committed_lsn),
                checkpoint: h.checkpoint_lsn.map(to_blockvol),
                checkpoint_trusted: h.checkpoint_trusted,
                missing: h
                    .missing
                    .iter()
                    .map(|r| (to_blockvol(r.after), to_blockvol(r.to)))
                    .collect(),
            })
        }
        Request::EntryId(lsn) => Reply::EntryId(
            volumes
                .storage(volume)?
                .entry_id(to_engine(lsn))
                .map_err(storage_err)?
                .map(entry_info),
        ),
        Request::Pin {
            what,
            lsn,
            lease_ms,
        } => {
            if side.leases.len() >= MAX_LEASES_PER_CONNECTION {
                return Err(TargetError::Protocol(format!(
                    "{MAX_LEASES_PER_CONNECTION} leases are held on this connection already"
                )));
            }
            let storage = volumes.storage(volume)?;
            let at = to_engine(lsn);
            let (held, pinned) = match what {
                PinWhat::Wal => {
                    let p = storage.pin_wal_retention(at).map_err(storage_err)?;
                    let start = p.start_lsn;
                    (Held::Wal(p), start)
                }
                PinWhat::Snapshot => {
                    let p = storage.pin_snapshot(at).map_err(storage_err)?;
                    let l = p.lsn;
                    (Held::Snapshot(p), l)
                }
                PinWhat::FullBase => {
                    let p = storage.pin_full_base(at).map_err(storage_err)?;
                    let l = p.committed_lsn;
                    (Held::Full(p), l)
                }
            };
            side.next_lease += 1;
            let lease = side.next_lease;
            side.leases.insert(
                lease,
                Lease {
                    volume: volume.to_owned(),
                    held,
                    deadline: Instant::now() + lease_of(lease_ms),
                },
            );
            shared.stats.leases_granted.fetch_add(1, Ordering::Relaxed);
            Reply::Pinned {
                lease,
                lsn: to_blockvol(pinned),
            }
        }
        Request::Renew { lease_ms } => {
            let now = Instant::now();
            let deadline = now + lease_of(lease_ms);
            for l in side.leases.values_mut().filter(|l| l.deadline > now) {
                l.deadline = deadline;
            }
            Reply::Done
        }
        Request::Release(lease) => {
            side.release(lease)
                .ok_or_else(|| TargetError::Protocol(format!("no lease {lease}")))?;
            Reply::Done
        }
        Request::ReadWal { want: 0, .. } => {
            return Err(TargetError::Protocol("a WAL read of zero entries".into()));
        }
        Request::ReadWal { after, want } => {
            // What one reply may carry bounds what is read, whatever the peer asked for.
            let budget = reply_budget(shared);
            let mut frames = Vec::new();
            let count = side
                .source(volumes, volume)?
                .read_entries_bounded(to_engine(after), u64::from(want), budget, &mut frames)
                .map_err(transfer)?;
            if frames.len() > budget {
                return Err(TargetError::Protocol(format!(
                    "the entry after {after} does not fit one reply"
                )));
            }
            Reply::Wal { count, frames }
        }
        Request::ImageOpen { lease, lsn, from } => {
            let pin = side
                .leases
                .get(&lease)
                .filter(|l| l.volume == volume)
                .and_then(|l| l.held.image_pin())
                .ok_or_else(|| TargetError::Protocol(format!("lease {lease} holds no image")))?;
            let spec = side
                .source(volumes, volume)?
                .open_image(pin, to_engine(lsn), from)
                .map_err(transfer)?;
            side.open_images.insert(volume.to_owned(), lease);
            Reply::ImageOpen {
                base_lsn: spec.base_lsn,
                base_entry: spec.base_entry,
                geometry: spec.geometry,
            }
        }
        Request::ImageRead(max) => {
            let ImageChunk {
                frame,
                scanned,
                sent,
            } = side
                .source(volumes, volume)?
                .next_image_chunk(u64::from(max).clamp(1, reply_budget(shared) as u64))
                .map_err(transfer)?;
            Reply::ImageChunk(ImageChunkReply {
                frame,
                scanned,
                sent,
            })
        }
        other => {
            return Err(TargetError::Protocol(format!(
                "{} is not a primary-side request",
                Message::Request {
                    id: 0,
                    volume: String::new(),
                    body: other
                }
                .frame_type()
                .name()
            )));
        }
    })
}

/// Serves requests until the connection ends. A puller that says goodbye (`Close`) or a
/// server that stops releases the connection's pins at once; a connection that breaks (reset,
/// cut, killed puller, timeout, bad frame) leaves its leases to run out on their own deadlines,
/// so a puller that reconnects within its lease still finds the image it was reading pinned
/// and its replica can resume the install. No lease outlives its deadline either way.
fn requests(conn: &mut Conn, shared: &Shared) -> End {
    let mut side = PrimarySide::default();
    let end = serve_requests(conn, shared, &mut side);
    let clean = matches!(&end, End::Gone(r) if r.starts_with(CLIENT_CLOSED))
        || matches!(end, End::Shutdown);
    if !clean && !side.leases.is_empty() {
        let now = Instant::now();
        side.expire(now);
        let n = side.leases.len();
        for (_, lease) in std::mem::take(&mut side.leases) {
            shared.orphans.hold(lease.deadline, Box::new(lease.held));
        }
        shared
            .stats
            .leases_orphaned
            .fetch_add(n as u64, Ordering::Relaxed);
        log::info!("connection broke holding {n} leases: kept until their deadlines");
    }
    end
}

const CLIENT_CLOSED: &str = "client closed";

fn serve_requests(conn: &mut Conn, shared: &Shared, side: &mut PrimarySide) -> End {
    let cfg = &shared.config;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return End::Shutdown;
        }
        // Wake for the earliest lease deadline, so an unrenewed lease ends on time even
        // while the puller is silent.
        let now = Instant::now();
        let expired = side.expire(now);
        shared
            .stats
            .leases_expired
            .fetch_add(expired as u64, Ordering::Relaxed);
        let idle = side.earliest().map_or(cfg.idle_timeout, |d| {
            d.saturating_duration_since(now).min(cfg.idle_timeout)
        });
        let msg = match conn.recv(idle, cfg.frame_timeout, "a request") {
            Ok(m) => m,
            Err(ConnError::Timeout(_)) if !conn.mid_frame() && side.earliest().is_some() => {
                continue;
            }
            Err(e) => return conn_end(e),
        };
        let (id, volume, body) = match msg {
            Message::Request { id, volume, body } => (id, volume, body),
            Message::Close(c) => return End::Gone(format!("{CLIENT_CLOSED}: {}", c.reason)),
            other => {
                return End::Protocol(format!(
                    "expected a request, got {}",
                    other.frame_type().name()
                ));
            }
        };
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        // A lease that ran out while the request arrived is over before the request is
        // served: a late renewal cannot bring it back, and its image cannot be read.
        let expired = side.expire(Instant::now());
        shared
            .stats
            .leases_expired
            .fetch_add(expired as u64, Ordering::Relaxed);
        let lineage = body.lineage();
        let reply = if body.is_primary_side() {
            primary_request(side, shared, &volume, body)
        } else {
            shared.volumes.get(&volume).and_then(|mut replica| {
                if cfg.install_stride > 0 && matches!(body, Request::BaseBegin(_)) {
                    replica.volume().set_install_stride(cfg.install_stride);
                }
                dispatch(&mut replica, body)
            })
        }
        .unwrap_or_else(|e| Reply::Error(lineage, e));
        // A reply the peer does not read in time ends the connection; with leases held, "in
        // time" is also before the earliest lease runs out, so a puller that stopped reading
        // (SIGSTOP) cannot keep its pins past their lease by leaving a reply unread.
        let now = Instant::now();
        let send_budget = side.earliest().map_or(cfg.frame_timeout, |d| {
            d.saturating_duration_since(now)
                .clamp(Duration::from_millis(1), cfg.frame_timeout)
        });
        if let Err(e) = conn.send(&Message::Reply { id, body: reply }, send_budget) {
            return conn_end(e);
        }
    }
}

/// Serves one replica-side request against `replica` exactly as a connection of the replica
/// server does: a refusal becomes `Reply::Error` echoing the request's lineage. The
/// deterministic simulator serves the frames of its simulated connections through this.
pub fn serve_replica_request(replica: &mut LocalReplica, body: Request) -> Reply {
    let lineage = body.lineage();
    dispatch(replica, body).unwrap_or_else(|e| Reply::Error(lineage, e))
}

fn dispatch(replica: &mut LocalReplica, body: Request) -> Result<Reply, TargetError> {
    Ok(match body {
        Request::Handshake => Reply::Handshake(replica.handshake()?),
        Request::Probe { digest } => {
            let vol = replica.volume();
            let st = vol.status();
            let digest = if digest {
                Some(
                    vol.digest()
                        .map_err(|e| TargetError::Storage(format!("digest: {e}")))?
                        .0,
                )
            } else {
                None
            };
            Reply::Probe(ProbeReply {
                head: st.head,
                checkpoint: st.checkpoint,
                committed: st.committed,
                epoch: st.epoch,
                install_incomplete: st.install_incomplete,
                digest,
                pins: u32::try_from(st.pins_outstanding).unwrap_or(u32::MAX),
            })
        }
        Request::Apply(r) => {
            let l = r.lineage;
            Reply::Apply(l, replica.apply(r)?)
        }
        Request::Truncate(r) => {
            let l = r.lineage;
            Reply::Truncate(l, replica.truncate(r)?)
        }
        Request::BaseBegin(r) => {
            let l = r.lineage;
            Reply::BaseBegun(l, replica.begin_base(r)?)
        }
        Request::BaseChunk(r) => {
            let l = r.lineage;
            replica.base_chunk(r)?;
            Reply::Ack(l)
        }
        Request::BaseFinish(l) => Reply::BaseFinish(l, replica.finish_base(l)?),
        Request::Barrier(r) => {
            let l = r.lineage;
            Reply::Barrier(l, replica.barrier(r)?)
        }
        Request::Scrub { from, count } => Reply::Scrub(replica.scrub(from, u64::from(count))?),
        Request::ReadBlock(lba) => Reply::Block(lba, replica.read_block(lba)?),
        Request::Repair { lineage, lba, data } => {
            Reply::Repair(lineage, replica.repair(lineage.epoch, lba, &data)?)
        }
        _ => return Err(TargetError::Protocol("not a replica request".into())),
    })
}
