//! [`RemoteReplica`]: a [`ReplicaTarget`] in another process, reached over one authenticated
//! connection.
//!
//! Base chunks are pipelined: each is sent as soon as the bytes in flight (sent, not yet
//! acknowledged) leave room for it under the credit window the server granted, and its
//! acknowledgement is collected later; a refused chunk fails the next call. Every other request
//! first collects the outstanding acknowledgements, then waits for its own reply, so its result
//! covers everything sent before it. Replies must come back in order, with the request's ID and
//! lineage; anything else breaks the connection, and a broken connection fails every later call
//! with [`TargetError::Transport`] (the engine then invalidates the session, and the next
//! attempt connects again).

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use blockvol::{EntryInfo, Lba, Lsn, RepairOutcome, ScrubReport};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, ReplicaTarget, TargetError, TruncateRequest,
};

use super::conn::{Conn, ConnError};
use crate::wire::{
    AuthRole, Authenticator, Close, CloseCode, DEFAULT_MAX_FRAME, FEATURES, Hello, Message, Nonce,
    ProbeReply, Reply, Request, VERSION, check_volume_name,
};

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The cluster secret (must match the server's).
    pub secret: Option<Vec<u8>>,
    /// This node's name, for the server's log.
    pub node: String,
    /// Time to connect and authenticate.
    pub connect_timeout: Duration,
    /// Time a reply may take.
    pub reply_timeout: Duration,
    /// The largest reply payload accepted.
    pub max_frame: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            secret: None,
            node: "swblock".to_owned(),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(60),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// What a client moved.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Requests sent.
    pub requests: u64,
    /// Bytes written to the socket.
    pub bytes_out: u64,
    /// Bytes read from it.
    pub bytes_in: u64,
    /// Most request bytes in flight at once.
    pub max_in_flight: u64,
    /// Base chunks sent while earlier ones were still unacknowledged.
    pub pipelined: u64,
}

struct Pending {
    id: u64,
    bytes: u64,
    lineage: Lineage,
}

/// A replica volume served by a [`ReplicaServer`](super::ReplicaServer) in another process.
pub struct RemoteReplica {
    conn: Conn,
    volume: String,
    reply_timeout: Duration,
    window: u64,
    next_id: u64,
    pending: VecDeque<Pending>,
    in_flight: u64,
    /// A refusal of a pipelined chunk, reported by the next call.
    deferred: Option<TargetError>,
    /// Refusals of chunks sent before this request ID are consequences of one already
    /// reported (the caller stopped at that one), so they are not reported again.
    report_from: u64,
    /// Why the connection can no longer be used.
    broken: Option<String>,
    stats: ClientStats,
}

impl std::fmt::Debug for RemoteReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReplica")
            .field("volume", &self.volume)
            .field("peer", &self.conn.stream().peer_addr().ok())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The volume name is not valid.
    #[error("{0}")]
    BadVolume(String),
    /// The server could not be reached or the connection failed.
    #[error("connect to {addr}: {error}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// What failed.
        error: ConnError,
    },
    /// The server's answer does not prove it knows the secret.
    #[error("server {0} does not know the cluster secret")]
    ServerNotAuthentic(SocketAddr),
    /// The server closed the connection during the handshake.
    #[error("server {addr} refused the connection: {reason}")]
    Refused {
        /// The server.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The server answered with something else.
    #[error("server {addr}: {detail}")]
    Protocol {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
}

impl From<ConnectError> for TargetError {
    fn from(e: ConnectError) -> Self {
        TargetError::Transport(e.to_string())
    }
}

impl RemoteReplica {
    /// Connects to the server at `addr`, authenticates both ways, and addresses `volume`.
    pub fn connect(
        addr: SocketAddr,
        volume: &str,
        config: &ClientConfig,
    ) -> Result<RemoteReplica, ConnectError> {
        check_volume_name(volume).map_err(|e| ConnectError::BadVolume(e.to_string()))?;
        let io = |error: ConnError| ConnectError::Connect { addr, error };
        let stream = TcpStream::connect_timeout(&addr, config.connect_timeout)
            .map_err(|e| io(ConnError::Io(e)))?;
        let mut conn = Conn::new(stream, config.max_frame).map_err(|e| io(ConnError::Io(e)))?;
        // Until the server has proven itself, its frames are handshake-sized.
        conn.set_recv_max(crate::net::server::HANDSHAKE_MAX_FRAME);
        let auth = Authenticator::new(config.secret.as_deref());
        let nonce = Nonce::random().map_err(|e| io(ConnError::Io(e)))?;
        let t = config.connect_timeout;
        conn.send(
            &Message::Hello(Hello {
                version: VERSION,
                features: FEATURES,
                nonce,
                node: config.node.clone(),
            }),
            t,
        )
        .map_err(io)?;
        let refused = |m: Message| match m {
            Message::Close(c) => ConnectError::Refused {
                addr,
                reason: c.reason,
            },
            other => ConnectError::Protocol {
                addr,
                detail: format!("unexpected {}", other.frame_type().name()),
            },
        };
        let challenge = match conn.recv(t, t, "the challenge").map_err(io)? {
            Message::Challenge(c) => c,
            other => return Err(refused(other)),
        };
        if challenge.version != VERSION {
            return Err(ConnectError::Protocol {
                addr,
                detail: format!("server speaks version {}", challenge.version),
            });
        }
        if !auth.verify(
            AuthRole::Server,
            &nonce,
            &challenge.nonce,
            challenge.features,
            &challenge.mac,
        ) {
            return Err(ConnectError::ServerNotAuthentic(addr));
        }
        let tag = auth.sign(
            AuthRole::Client,
            &nonce,
            &challenge.nonce,
            challenge.features,
        );
        conn.send(&Message::Auth(tag), t).map_err(io)?;
        match conn.recv(t, t, "ready").map_err(io)? {
            Message::Ready => {}
            other => return Err(refused(other)),
        }
        conn.set_send_max(challenge.max_frame);
        conn.set_recv_max(config.max_frame);
        Ok(RemoteReplica {
            conn,
            volume: volume.to_owned(),
            reply_timeout: config.reply_timeout,
            window: u64::from(challenge.window.max(1)),
            next_id: 1,
            pending: VecDeque::new(),
            in_flight: 0,
            deferred: None,
            report_from: 0,
            broken: None,
            stats: ClientStats::default(),
        })
    }

    /// What this connection moved.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            bytes_out: self.conn.bytes_out,
            bytes_in: self.conn.bytes_in,
            ..self.stats
        }
    }

    /// Says goodbye (a `Close` frame with code `Done`), then shuts the connection down: the
    /// server releases whatever the connection held at once instead of at its lease deadlines.
    pub fn close(&mut self, reason: &str) {
        if self.broken.is_none() && self.pending.is_empty() {
            let bye = Message::Close(Close {
                code: CloseCode::Done as u16,
                reason: reason.to_owned(),
            });
            if let Err(e) = self.conn.send(&bye, Duration::from_millis(500)) {
                log::debug!("goodbye to {}: {e}", self.volume);
            }
        }
        self.shutdown();
    }

    /// Closes the connection at once (both directions); later calls fail as `Transport`.
    pub fn shutdown(&mut self) {
        let _ = self.conn.stream().shutdown(std::net::Shutdown::Both);
        self.broken.get_or_insert_with(|| "shut down".into());
    }

    /// The volume addressed.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The replica's state, and its digest if `digest` (reads its whole image).
    pub fn probe(&mut self, digest: bool) -> Result<ProbeReply, TargetError> {
        match self.call(Request::Probe { digest })? {
            Reply::Probe(p) => Ok(p),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Verifies `count` blocks from `from` on the peer's copy (at most
    /// [`crate::wire::MAX_SCRUB_BLOCKS`]); the peer records what it found.
    pub fn scrub(&mut self, from: Lba, count: u32) -> Result<ScrubReport, TargetError> {
        match self.call(Request::Scrub { from, count })? {
            Reply::Scrub(r) => Ok(r),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Block `lba` of the peer's copy, verified there; `block_size` bytes or an error.
    pub fn read_block(&mut self, lba: Lba, block_size: usize) -> Result<Vec<u8>, TargetError> {
        match self.call(Request::ReadBlock(lba))? {
            Reply::Block(l, data) if l == lba && data.len() == block_size => Ok(data),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Offers the peer `data`, this side's verified copy of block `lba`, to repair its copy.
    pub fn repair(
        &mut self,
        lineage: Lineage,
        lba: Lba,
        data: Vec<u8>,
    ) -> Result<RepairOutcome, TargetError> {
        match self.call(Request::Repair { lineage, lba, data })? {
            Reply::Repair(l, o) if l == lineage => Ok(o),
            other => Err(self.unexpected(&other)),
        }
    }

    fn break_with(&mut self, why: String) -> TargetError {
        if self.broken.is_none() {
            log::warn!("connection for volume {} broken: {why}", self.volume);
            self.broken = Some(why.clone());
            // Closed at once: a server that sees the connection end releases what it held.
            let _ = self.conn.stream().shutdown(std::net::Shutdown::Both);
        }
        TargetError::Transport(why)
    }

    fn unexpected(&mut self, reply: &Reply) -> TargetError {
        self.break_with(format!("unexpected reply {reply:?}"))
    }

    fn check_usable(&mut self) -> Result<(), TargetError> {
        if let Some(why) = &self.broken {
            return Err(TargetError::Transport(format!("connection broken: {why}")));
        }
        Ok(())
    }

    /// Sends `body` without waiting; returns its ID and size.
    fn send(&mut self, body: Request) -> Result<(u64, u64), TargetError> {
        self.check_usable()?;
        let id = self.next_id;
        self.next_id += 1;
        let msg = Message::Request {
            id,
            volume: self.volume.clone(),
            body,
        };
        // Too large for the server: refused before anything is sent (the connection stays
        // usable).
        let size = self
            .conn
            .queue(&msg)
            .map_err(|e| TargetError::Protocol(format!("request not sent: {e}")))?;
        if let Err(e) = self.conn.flush(self.reply_timeout) {
            return Err(self.break_with(format!("send: {e}")));
        }
        self.stats.requests += 1;
        Ok((id, size as u64))
    }

    /// Waits for the reply to request `id` (the next one due).
    fn receive(&mut self, id: u64, lineage: Option<Lineage>) -> Result<Reply, TargetError> {
        let t = self.reply_timeout;
        let msg = match self.conn.recv(t, t, "a reply") {
            Ok(m) => m,
            Err(e) => return Err(self.break_with(format!("receive: {e}"))),
        };
        let (got, body) = match msg {
            Message::Reply { id, body } => (id, body),
            Message::Close(c) => {
                return Err(self.break_with(format!("server closed: {}", c.reason)));
            }
            other => {
                let name = other.frame_type().name();
                return Err(self.break_with(format!("expected a reply, got {name}")));
            }
        };
        if got != id {
            return Err(self.break_with(format!("reply to request {got}, expected {id}")));
        }
        if lineage.is_some() && body.lineage() != lineage {
            return Err(self.break_with(format!(
                "reply echoes lineage {:?}, the request had {lineage:?}",
                body.lineage()
            )));
        }
        Ok(body)
    }

    /// Collects the oldest outstanding acknowledgement.
    fn collect_one(&mut self) -> Result<(), TargetError> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        self.in_flight -= p.bytes;
        match self.receive(p.id, Some(p.lineage))? {
            Reply::Ack(_) => Ok(()),
            Reply::Error(_, e) => {
                if p.id >= self.report_from {
                    self.deferred.get_or_insert(e);
                } else {
                    log::debug!("chunk {} also refused: {e}", p.id);
                }
                Ok(())
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// Collects every outstanding acknowledgement, then reports a deferred refusal.
    fn settle(&mut self) -> Result<(), TargetError> {
        while !self.pending.is_empty() {
            self.collect_one()?;
        }
        self.report_deferred()
    }

    /// Reports a deferred refusal once; chunks already sent are not reported again.
    fn report_deferred(&mut self) -> Result<(), TargetError> {
        match self.deferred.take() {
            Some(e) => {
                self.report_from = self.next_id;
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// One request and its reply, after everything sent before it is settled.
    pub(crate) fn call(&mut self, body: Request) -> Result<Reply, TargetError> {
        self.check_usable()?;
        self.settle()?;
        let lineage = body.lineage();
        let (id, _) = self.send(body)?;
        match self.receive(id, lineage)? {
            Reply::Error(_, e) => Err(e),
            reply => Ok(reply),
        }
    }
}

impl ReplicaTarget for RemoteReplica {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        match self.call(Request::Handshake)? {
            Reply::Handshake(h) => Ok(h),
            other => Err(self.unexpected(&other)),
        }
    }

    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        match self.call(Request::Apply(req))? {
            Reply::Apply(_, r) => Ok(r),
            other => Err(self.unexpected(&other)),
        }
    }

    fn truncate(&mut self, req: TruncateRequest) -> Result<EntryInfo, TargetError> {
        match self.call(Request::Truncate(req))? {
            Reply::Truncate(_, tip) => Ok(tip),
            other => Err(self.unexpected(&other)),
        }
    }

    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<Lba, TargetError> {
        match self.call(Request::BaseBegin(req))? {
            Reply::BaseBegun(_, from) => Ok(from),
            other => Err(self.unexpected(&other)),
        }
    }

    fn base_chunk(&mut self, req: BaseChunkRequest) -> Result<(), TargetError> {
        self.check_usable()?;
        self.report_deferred()?;
        let lineage = req.lineage;
        let size = req.frame.len() as u64;
        // Room under the window: collect acknowledgements until this chunk fits (an empty
        // pipeline always has room, whatever the chunk's size).
        while !self.pending.is_empty() && self.in_flight + size > self.window {
            self.collect_one()?;
        }
        self.report_deferred()?;
        if !self.pending.is_empty() {
            self.stats.pipelined += 1;
        }
        let (id, bytes) = self.send(Request::BaseChunk(req))?;
        self.in_flight += bytes;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight);
        self.pending.push_back(Pending { id, bytes, lineage });
        Ok(())
    }

    fn finish_base(&mut self, lineage: Lineage) -> Result<Lsn, TargetError> {
        match self.call(Request::BaseFinish(lineage))? {
            Reply::BaseFinish(_, lsn) => Ok(lsn),
            other => Err(self.unexpected(&other)),
        }
    }

    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        match self.call(Request::Barrier(req))? {
            Reply::Barrier(_, r) => Ok(r),
            other => Err(self.unexpected(&other)),
        }
    }
}
