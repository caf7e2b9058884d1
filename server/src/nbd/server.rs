//! The NBD server's sockets: one listener thread, one thread per connection, blocking std
//! sockets with deadlines (as the `transport` crate's replica server does; nothing polls).
//!
//! A connection negotiates (fixed newstyle; [`NbdConfig::handshake_timeout`] for the whole
//! negotiation), then serves one request at a time in order: read a header (and a write's
//! payload), check it ([`Request::check`]), run it on the export's [`BlockDevice`], reply.
//! Replies therefore go out in request order. A request that started arriving must arrive in
//! full within [`NbdConfig::request_timeout`]; between requests a connection may be silent for
//! [`NbdConfig::idle_timeout`] (none by default: a VM's disk can be idle for hours, and
//! [`NbdServer::stop`] closes idle connections anyway).
//!
//! What closes a connection, always with a `log::warn!` naming the peer and the reason:
//! a violation of a mandatory rule ([`ProtoError`]: bad magic, unknown client flags, an option
//! longer than [`MAX_OPTION_DATA`], a write payload above [`MAX_PAYLOAD`], an
//! `NBD_OPT_EXPORT_NAME` that cannot be served), a deadline, too many options. Everything
//! else (unknown options, unknown exports, out-of-range or unsupported requests, device errors)
//! is answered with an error and the connection continues.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::device::{BlockDevice, DeviceError, ExportError, Exports};
use super::proto::{
    self, BlockSizes, ClientFlags, ClientOption, Command, INFO_NAME, InfoQuery, MAX_OPTION_DATA,
    MAX_PAYLOAD, NbdErrno, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPTION_HEADER_LEN, OptionHeader,
    ProtoError, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REQUEST_HEADER_LEN, Refusal, Request, Transmission,
};

/// Options a client may send before it must have chosen an export.
pub const MAX_OPTIONS: u32 = 256;
/// Bytes read from the socket at a time (larger payloads are read straight into place).
const READ_CHUNK: usize = 64 << 10;

/// How an NBD server runs.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// Listen on addresses other than loopback. NBD has no authentication here (no TLS), so
    /// the default refuses anything but loopback.
    pub allow_remote: bool,
    /// Connections served at once; more are closed at once (with a warning).
    pub max_connections: usize,
    /// Time from accepting a connection to the end of its negotiation.
    pub handshake_timeout: Duration,
    /// Time a request has, from its first byte, to arrive in full (header and payload).
    pub request_timeout: Duration,
    /// Time a connection may be silent between requests (`None`: no limit).
    pub idle_timeout: Option<Duration>,
    /// Time a reply has to be written (a client that stops reading is closed).
    pub reply_timeout: Duration,
    /// Advertise a minimum block size of 1 and serve unaligned requests by read-modify-write
    /// in the device, instead of advertising the device's block size as the minimum (clients
    /// then do their own read-modify-write).
    pub byte_granular: bool,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            allow_remote: false,
            max_connections: 32,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: None,
            reply_timeout: Duration::from_secs(30),
            byte_granular: false,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdServerError {
    /// Only loopback addresses are allowed without [`NbdConfig::allow_remote`].
    #[error("refusing to serve NBD on {0}: not a loopback address and allow_remote is off")]
    NotLoopback(SocketAddr),
    /// The socket could not be bound.
    #[error("listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// The listener thread could not be started.
    #[error("start the listener thread: {0}")]
    Thread(std::io::Error),
}

/// What the server has seen. Every connection that ends increments exactly one of the
/// `closed_*` / `ended_*` counters.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections that entered transmission.
    pub transmissions: AtomicU64,
    /// Requests answered (successes and error replies).
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub error_replies: AtomicU64,
    /// Closed at once: too many connections.
    pub closed_busy: AtomicU64,
    /// Closed: the client broke a mandatory rule (bad magic, flags, lengths).
    pub closed_protocol: AtomicU64,
    /// Closed: a deadline passed.
    pub closed_timeout: AtomicU64,
    /// Closed: `NBD_OPT_EXPORT_NAME` for an export that cannot be served.
    pub closed_refused: AtomicU64,
    /// Ended by the client: `NBD_OPT_ABORT`, `NBD_CMD_DISC` or closing the socket.
    pub ended_by_client: AtomicU64,
    /// Ended by a socket error or by [`NbdServer::stop`].
    pub ended_other: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
}

impl NbdStats {
    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

struct Shared {
    config: NbdConfig,
    exports: Arc<dyn Exports>,
    stats: Arc<NbdStats>,
    stop: AtomicBool,
    /// Each open connection's socket, so stopping the server can close it.
    conns: Mutex<BTreeMap<u64, TcpStream>>,
    /// Connection threads, joined when finished (on the next accept) or at stop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A running NBD server. Dropping it stops it.
pub struct NbdServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Binds `addr` (port 0 picks one) and serves `exports` from a listener thread.
    pub fn start(
        addr: SocketAddr,
        config: NbdConfig,
        exports: Arc<dyn Exports>,
    ) -> Result<NbdServer, NbdServerError> {
        if !config.allow_remote && !addr.ip().is_loopback() {
            return Err(NbdServerError::NotLoopback(addr));
        }
        let listener =
            TcpListener::bind(addr).map_err(|error| NbdServerError::Bind { addr, error })?;
        let local = listener
            .local_addr()
            .map_err(|error| NbdServerError::Bind { addr, error })?;
        let shared = Arc::new(Shared {
            config,
            exports,
            stats: Arc::new(NbdStats::default()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(BTreeMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("nbd-accept-{}", local.port()))
            .spawn(move || accept_loop(&listener, &accept_shared))
            .map_err(NbdServerError::Thread)?;
        log::info!("NBD server listening on {local}");
        Ok(NbdServer {
            addr: local,
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has seen.
    pub fn stats(&self) -> &NbdStats {
        &self.shared.stats
    }

    /// Stops accepting, closes every connection (a request being served finishes its device
    /// call first) and waits for the listener and connection threads.
    pub fn stop(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept with a connection of our own.
        let wake = match self.addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
            }
            a => a,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (_, c) in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
        log::info!("NBD server on {} stopped", self.addr);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id: u64 = 0;
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: back off a little instead of spinning.
                log::warn!("NBD accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Join the threads of connections that ended.
        lock(&shared.threads).retain(|t| !t.is_finished());
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        shared.stats.accepted.fetch_add(1, Ordering::SeqCst);
        let open = shared.stats.open.fetch_add(1, Ordering::SeqCst);
        if open >= shared.config.max_connections {
            shared.stats.open.fetch_sub(1, Ordering::SeqCst);
            shared.stats.closed_busy.fetch_add(1, Ordering::SeqCst);
            log::warn!("NBD: closing connection from {peer}: {open} connections open (the limit)");
            continue;
        }
        next_id += 1;
        let id = next_id;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(id, clone);
        }
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{peer}"))
            .spawn(move || {
                serve(stream, &peer, &conn_shared);
                lock(&conn_shared.conns).remove(&id);
                conn_shared.stats.open.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(t) => lock(&shared.threads).push(t),
            Err(e) => {
                lock(&shared.conns).remove(&id);
                shared.stats.open.fetch_sub(1, Ordering::SeqCst);
                log::warn!("NBD: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Why a socket operation stopped.
#[derive(Debug)]
enum ConnError {
    /// The peer closed the connection (`mid`: in the middle of a message).
    Eof { mid: bool },
    /// A deadline passed while waiting for `what`.
    Timeout(&'static str),
    /// The socket failed.
    Io(std::io::Error),
}

/// How a connection ended.
enum End {
    /// The client broke a mandatory rule.
    Protocol(String),
    /// A deadline passed.
    Timeout(String),
    /// `NBD_OPT_EXPORT_NAME` for an export that cannot be served.
    Refused(String),
    /// The client ended it (abort, disconnect, closed socket between messages).
    Client(&'static str),
    /// A socket error, or the server is stopping.
    Other(String),
}

impl From<ConnError> for End {
    fn from(e: ConnError) -> End {
        match e {
            ConnError::Eof { mid: false } => End::Client("closed the connection"),
            ConnError::Eof { mid: true } => {
                End::Other("the client closed the connection in the middle of a message".into())
            }
            ConnError::Timeout(what) => End::Timeout(format!("timed out waiting for {what}")),
            ConnError::Io(e) => End::Other(format!("socket: {e}")),
        }
    }
}

impl From<ProtoError> for End {
    fn from(e: ProtoError) -> End {
        End::Protocol(e.to_string())
    }
}

/// A blocking socket with a read buffer and deadlines.
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        })
    }

    /// One read from the socket into `dst`, waiting at most until `deadline` (`None`: no
    /// limit). Returns the bytes read (0 at end of stream).
    fn read_some(
        stream: &mut TcpStream,
        dst: &mut [u8],
        deadline: Option<Instant>,
        what: &'static str,
    ) -> Result<usize, ConnError> {
        // Each pass either reads, or fails, or finds the deadline passed: bounded by the
        // deadline (interrupted system calls retry within it).
        loop {
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ConnError::Timeout(what));
                    }
                    Some(left)
                }
                None => None,
            };
            stream.set_read_timeout(timeout).map_err(ConnError::Io)?;
            match stream.read(dst) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    /// Waits until at least one byte is buffered, at most `idle` (`None`: no limit). The end
    /// of the stream here is a clean end (between messages).
    fn wait_message(&mut self, idle: Option<Duration>) -> Result<(), ConnError> {
        if self.start < self.end {
            return Ok(());
        }
        let deadline = idle.map(|d| Instant::now() + d);
        self.start = 0;
        self.end = Self::read_some(&mut self.stream, &mut self.buf, deadline, "a request")?;
        if self.end == 0 {
            return Err(ConnError::Eof { mid: false });
        }
        Ok(())
    }

    /// Fills `dst` completely by `deadline`. `started`: `dst` continues a message already
    /// begun (the end of the stream is then always in the middle of a message).
    fn read_exact(
        &mut self,
        dst: &mut [u8],
        deadline: Instant,
        what: &'static str,
        started: bool,
    ) -> Result<(), ConnError> {
        let mut done = (self.end - self.start).min(dst.len());
        dst[..done].copy_from_slice(&self.buf[self.start..self.start + done]);
        self.start += done;
        // Bounded: every pass adds at least one byte or returns.
        while done < dst.len() {
            let n = if dst.len() - done >= self.buf.len() {
                // Large payloads go straight into place.
                Self::read_some(&mut self.stream, &mut dst[done..], Some(deadline), what)?
            } else {
                self.start = 0;
                self.end = Self::read_some(&mut self.stream, &mut self.buf, Some(deadline), what)?;
                let n = self.end.min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.buf[..n]);
                self.start = n;
                n
            };
            if n == 0 {
                // Between messages (nothing of this one read yet) the end is a clean one.
                return Err(ConnError::Eof {
                    mid: started || done > 0,
                });
            }
            done += n;
        }
        Ok(())
    }

    /// Writes all of `parts` by `deadline` (in total, not per system call).
    fn write_all(&mut self, parts: &[&[u8]], deadline: Instant) -> Result<(), ConnError> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        // Bounded: every pass writes at least one byte or returns.
        while !bufs.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnError::Timeout("the client to read a reply"));
            }
            self.stream
                .set_write_timeout(Some(left))
                .map_err(ConnError::Io)?;
            match self.stream.write_vectored(bufs) {
                Ok(0) => return Err(ConnError::Eof { mid: true }),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ConnError::Timeout("the client to read a reply"));
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }
}

fn serve(stream: TcpStream, peer: &str, shared: &Shared) {
    let stats = &shared.stats;
    let end = match Conn::new(stream) {
        Err(e) => End::Other(format!("socket setup: {e}")),
        Ok(mut conn) => match negotiate(&mut conn, peer, shared) {
            Ok(Some(session)) => {
                stats.transmissions.fetch_add(1, Ordering::SeqCst);
                log::info!(
                    "NBD: {peer} serves export {:?} ({} bytes, structured replies {})",
                    session.name,
                    session.device.size(),
                    session.structured
                );
                transmit(&mut conn, peer, &session, shared)
            }
            Ok(None) => End::Client("aborted the negotiation"),
            Err(end) => end,
        },
    };
    // A connection the server closed while stopping looks to its thread like a client that
    // went away; it is counted and logged as the stop.
    let end = match end {
        End::Client(_) | End::Other(_) if shared.stop.load(Ordering::SeqCst) => {
            End::Other("the server is stopping".into())
        }
        end => end,
    };
    match end {
        End::Protocol(r) => {
            stats.closed_protocol.fetch_add(1, Ordering::SeqCst);
            log::warn!("NBD: closing connection from {peer}: protocol violation: {r}");
        }
        End::Timeout(r) => {
            stats.closed_timeout.fetch_add(1, Ordering::SeqCst);
            log::warn!("NBD: closing connection from {peer}: {r}");
        }
        End::Refused(r) => {
            stats.closed_refused.fetch_add(1, Ordering::SeqCst);
            log::warn!("NBD: closing connection from {peer}: {r}");
        }
        End::Client(r) => {
            stats.ended_by_client.fetch_add(1, Ordering::SeqCst);
            log::info!("NBD: connection from {peer} ended: the client {r}");
        }
        End::Other(r) => {
            stats.ended_other.fetch_add(1, Ordering::SeqCst);
            log::warn!("NBD: connection from {peer} ended: {r}");
        }
    }
}

/// What the negotiation agreed on.
struct Session {
    name: String,
    device: Arc<dyn BlockDevice>,
    structured: bool,
}

/// The option reply code and message for an export that cannot be opened.
fn export_refusal(e: &ExportError) -> u32 {
    match e {
        ExportError::Unknown(_) => REP_ERR_UNKNOWN,
        ExportError::Refused { .. } => REP_ERR_POLICY,
        ExportError::Shutdown => REP_ERR_SHUTDOWN,
    }
}

/// Runs the fixed newstyle negotiation. `Ok(None)`: the client aborted.
fn negotiate(conn: &mut Conn, peer: &str, shared: &Shared) -> Result<Option<Session>, End> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    conn.write_all(&[&proto::greeting()], deadline)?;
    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags, deadline, "the client flags", false)?;
    let client = ClientFlags::parse(u32::from_be_bytes(flags))?;
    let mut structured = false;
    let mut out = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        conn.read_exact(&mut h, deadline, "an option", false)?;
        let header = OptionHeader::parse(&h)?;
        // Bounded by MAX_OPTION_DATA in `OptionHeader::parse`.
        let mut data = vec![0u8; header.len as usize];
        conn.read_exact(&mut data, deadline, "option data", true)?;
        let option = header.option;
        out.clear();
        if shared.stop.load(Ordering::SeqCst) {
            proto::put_option_error(&mut out, option, REP_ERR_SHUTDOWN, "server shutting down");
            conn.write_all(&[&out], deadline)?;
            continue;
        }
        let parsed = match proto::parse_option(option, &data) {
            Ok(p) => p,
            Err(invalid) if option == OPT_EXPORT_NAME => {
                return Err(End::from(ProtoError::BadExportName(invalid.0)));
            }
            Err(invalid) => {
                log::debug!(
                    "NBD: {peer}: {} refused as invalid: {invalid}",
                    proto::option_name(option)
                );
                proto::put_option_error(&mut out, option, REP_ERR_INVALID, &invalid.0);
                conn.write_all(&[&out], deadline)?;
                continue;
            }
        };
        match parsed {
            ClientOption::Abort => {
                proto::put_option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already have gone; the abort stands either way.
                let _ = conn.write_all(&[&out], deadline);
                return Ok(None);
            }
            ClientOption::List => {
                for name in shared.exports.list() {
                    if name.len() > proto::MAX_STRING {
                        log::warn!("NBD: export name of {} bytes is not listed", name.len());
                        continue;
                    }
                    proto::put_rep_server(&mut out, &name);
                }
                proto::put_option_reply(&mut out, option, REP_ACK, &[]);
            }
            ClientOption::StructuredReply => {
                structured = true;
                proto::put_option_reply(&mut out, option, REP_ACK, &[]);
            }
            ClientOption::Info(q) | ClientOption::Go(q) => match shared.exports.open(&q.name) {
                Err(e) => {
                    log::info!(
                        "NBD: {peer}: {} for {:?} refused: {e}",
                        proto::option_name(option),
                        q.name
                    );
                    proto::put_option_error(&mut out, option, export_refusal(&e), &e.to_string());
                }
                Ok(device) => {
                    put_infos(&mut out, option, &q, device.as_ref(), structured, shared);
                    proto::put_option_reply(&mut out, option, REP_ACK, &[]);
                    if option == OPT_GO {
                        conn.write_all(&[&out], deadline)?;
                        return Ok(Some(Session {
                            name: q.name,
                            device,
                            structured,
                        }));
                    }
                    debug_assert_eq!(option, OPT_INFO);
                }
            },
            ClientOption::ExportName(name) => {
                let device = shared
                    .exports
                    .open(&name)
                    .map_err(|e| End::Refused(format!("NBD_OPT_EXPORT_NAME {name:?}: {e}")))?;
                let flags =
                    proto::transmission_flags(structured, device.flush_covers_all_connections());
                let reply = proto::export_name_reply(device.size(), flags, client.no_zeroes);
                conn.write_all(&[&reply], deadline)?;
                return Ok(Some(Session {
                    name,
                    device,
                    structured,
                }));
            }
            ClientOption::Unsupported(code) => {
                log::debug!(
                    "NBD: {peer}: option {code} ({}) unsupported",
                    proto::option_name(code)
                );
                let msg = format!(
                    "option {code} ({}) is not supported by this server",
                    proto::option_name(code)
                );
                proto::put_option_error(&mut out, option, REP_ERR_UNSUP, &msg);
            }
        }
        conn.write_all(&[&out], deadline)?;
    }
    Err(End::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// The `NBD_REP_INFO` replies for an export: the mandatory export info, the block sizes
/// (always: the server states its maximum), and the name if asked. A description is never
/// sent (the protocol lets a server ignore that request).
fn put_infos(
    out: &mut Vec<u8>,
    option: u32,
    q: &InfoQuery,
    device: &dyn BlockDevice,
    structured: bool,
    shared: &Shared,
) {
    let flags = proto::transmission_flags(structured, device.flush_covers_all_connections());
    proto::put_info_export(out, option, device.size(), flags);
    proto::put_info_block_size(
        out,
        option,
        BlockSizes::for_device(device.block_size(), shared.config.byte_granular),
    );
    if q.wants(INFO_NAME) {
        proto::put_info_name(out, option, &q.name);
    }
    debug_assert!(option == OPT_INFO || option == OPT_GO);
}

/// Serves requests until the client disconnects or breaks a rule.
fn transmit(conn: &mut Conn, peer: &str, s: &Session, shared: &Shared) -> End {
    let t = Transmission {
        size: s.device.size(),
        structured: s.structured,
    };
    let cfg = &shared.config;
    let stats = &shared.stats;
    // One buffer for payloads and read data, at most MAX_PAYLOAD bytes, kept for the
    // connection's life (so at most max_connections x 32 MiB in all).
    let mut data: Vec<u8> = Vec::new();
    // Bounded by the connection: each pass consumes one request or ends it.
    loop {
        if let Err(e) = conn.wait_message(cfg.idle_timeout) {
            return e.into();
        }
        let deadline = Instant::now() + cfg.request_timeout;
        let mut h = [0u8; REQUEST_HEADER_LEN];
        if let Err(e) = conn.read_exact(&mut h, deadline, "a request header", true) {
            return e.into();
        }
        let req = match Request::parse(&h) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let payload = match req.payload_len() {
            Ok(n) => n,
            Err(e) => return e.into(),
        };
        if req.command == Command::Disc {
            return End::Client("disconnected (NBD_CMD_DISC)");
        }
        // Old contents are overwritten: only a growing buffer is filled (no per-request
        // memset of the payload).
        data.resize(payload, 0);
        if let Err(e) = conn.read_exact(&mut data, deadline, "a write payload", true) {
            return e.into();
        }
        let result = req.check(&t).and_then(|()| execute(&req, s, &mut data));
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let reply_deadline = Instant::now() + cfg.reply_timeout;
        let sent = match result {
            Ok(()) => send_success(conn, &req, s.structured, &data, reply_deadline),
            Err(refusal) => {
                stats.error_replies.fetch_add(1, Ordering::SeqCst);
                if refusal.errno == NbdErrno::Io {
                    log::warn!(
                        "NBD: {peer}: {:?} at {} (+{}) failed: {}: {}",
                        req.command,
                        req.offset,
                        req.len,
                        refusal.errno.name(),
                        refusal.message
                    );
                } else {
                    log::debug!(
                        "NBD: {peer}: {:?} at {} (+{}) refused: {}: {}",
                        req.command,
                        req.offset,
                        req.len,
                        refusal.errno.name(),
                        refusal.message
                    );
                }
                send_error(conn, &req, s.structured, &refusal, reply_deadline)
            }
        };
        if let Err(e) = sent {
            return e.into();
        }
    }
}

fn device_refusal(e: DeviceError) -> Refusal {
    Refusal {
        errno: e.errno(),
        message: e.to_string(),
    }
}

/// Runs one checked request on the device. A read leaves its data in `data`.
fn execute(req: &Request, s: &Session, data: &mut Vec<u8>) -> Result<(), Refusal> {
    let dev = s.device.as_ref();
    let len = u64::from(req.len);
    let r = match req.command {
        Command::Read => {
            // `check` bounded the length by MAX_PAYLOAD; the device overwrites all of it.
            data.resize(req.len as usize, 0);
            dev.read(req.offset, data)
        }
        Command::Write => dev.write(req.offset, data, req.fua()),
        Command::Flush => dev.flush(),
        Command::Trim => dev
            .trim(req.offset, len)
            .and_then(|()| if req.fua() { dev.flush() } else { Ok(()) }),
        // NO_HOLE needs nothing: zeroed blocks stay allocated (see `VolumeDevice`).
        Command::WriteZeroes => dev.write_zeroes(req.offset, len, req.fua()),
        Command::Disc | Command::Other(_) => Err(DeviceError::Unsupported),
    };
    r.map_err(device_refusal)
}

fn send_success(
    conn: &mut Conn,
    req: &Request,
    structured: bool,
    data: &[u8],
    deadline: Instant,
) -> Result<(), ConnError> {
    match req.command {
        Command::Read if structured && !data.is_empty() => {
            debug_assert!(data.len() <= MAX_PAYLOAD as usize);
            let h = proto::offset_data_header(req.handle, req.offset, data.len() as u32);
            conn.write_all(&[&h, data], deadline)
        }
        Command::Read if structured => conn.write_all(&[&proto::none_chunk(req.handle)], deadline),
        Command::Read => conn.write_all(&[&proto::simple_reply(0, req.handle), data], deadline),
        // With structured replies a simple reply is still allowed for anything but a read.
        _ => conn.write_all(&[&proto::simple_reply(0, req.handle)], deadline),
    }
}

fn send_error(
    conn: &mut Conn,
    req: &Request,
    structured: bool,
    refusal: &Refusal,
    deadline: Instant,
) -> Result<(), ConnError> {
    if structured {
        let chunk = proto::error_chunk(req.handle, refusal.errno, &refusal.message);
        conn.write_all(&[&chunk], deadline)
    } else {
        conn.write_all(
            &[&proto::simple_reply(refusal.errno.code(), req.handle)],
            deadline,
        )
    }
}

/// The largest option data this server reads, restated for the docs.
const _: () = assert!(MAX_OPTION_DATA as usize >= 4 + proto::MAX_STRING + 2);
