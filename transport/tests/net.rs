//! The socket layer against honest and hostile peers, in one process: authentication both ways,
//! lineage fencing and echo checks, pipelining under the credit window, and peers that send
//! garbage, huge lengths, corrupted frames, one byte at a time, or too many connections. Every
//! hostile connection must be closed with a reason the server counts, and must change nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, EntryInfo, Lsn, OpenOptions, Role, Volume};
use bytes::BytesMut;
use transport::net::{
    ClientConfig, ConnectError, RemoteReplica, ReplicaServer, ServerConfig, ServerError,
    ServerStats, Volumes,
};
use transport::wire::{
    AuthRole, Authenticator, CloseCode, DEFAULT_MAX_FRAME, Decoder, FEATURES, Hello, Message,
    Nonce, Reply, Request, VERSION, encode,
};
use v2bridge::{
    ApplyRequest, BarrierRequest, BaseChunkRequest, Lineage, LocalReplica, ReplicaTarget,
    TargetError,
};

const SECRET: &[u8] = b"cluster secret for tests";

fn replica_volume(dir: &std::path::Path, name: &str) -> Arc<Volume> {
    let opts = CreateOptions {
        volume_size_bytes: 64 * 4096,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    };
    let vol = Volume::create(
        dir.join(format!("{name}.vol")),
        &opts,
        &OpenOptions::manual(),
    )
    .expect("create volume");
    vol.assign(Role::Replica, blockvol::Epoch(1))
        .expect("assign replica");
    Arc::new(vol)
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: ReplicaServer,
    vols: Vec<Arc<Volume>>,
}

fn serve(config: ServerConfig, names: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let volumes = Arc::new(Volumes::new());
    let mut vols = Vec::new();
    for name in names {
        let vol = replica_volume(dir.path(), name);
        volumes.insert(name, LocalReplica::new(Arc::clone(&vol)));
        vols.push(vol);
    }
    let server = ReplicaServer::start("127.0.0.1:0".parse().unwrap(), config, volumes)
        .expect("start server");
    Fixture {
        _dir: dir,
        server,
        vols,
    }
}

fn secret_config() -> ServerConfig {
    ServerConfig {
        secret: Some(SECRET.to_vec()),
        ..ServerConfig::default()
    }
}

fn client(secret: Option<&[u8]>) -> ClientConfig {
    ClientConfig {
        secret: secret.map(<[u8]>::to_vec),
        node: "test-client".into(),
        ..ClientConfig::default()
    }
}

/// Waits (bounded) until `counter` reaches `want`.
fn wait_for(counter: &AtomicU64, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = ServerStats::get(counter);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A peer speaking the wire protocol by hand.
struct Raw {
    stream: TcpStream,
    decoder: Decoder,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            stream,
            decoder: Decoder::new(DEFAULT_MAX_FRAME),
        }
    }

    fn send(&mut self, msg: &Message) {
        let mut out = BytesMut::new();
        encode(msg, DEFAULT_MAX_FRAME, &mut out).expect("encode");
        self.stream.write_all(&out).expect("write");
    }

    /// The next message, or `None` when the server closed the connection.
    fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self
                .decoder
                .next_message()
                .expect("valid frame from server")
            {
                return Some(m);
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.feed(&buf[..n]),
            }
        }
    }

    /// Reads until the server's `Close`, returning its code and reason.
    fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.recv() {
                Some(Message::Close(c)) => return (c.code, c.reason),
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Authenticates with `secret`; returns the server's answer to the `Auth`.
    fn authenticate(&mut self, secret: Option<&[u8]>) -> Option<Message> {
        let nonce = Nonce::random().unwrap();
        self.send(&Message::Hello(Hello {
            version: VERSION,
            features: FEATURES,
            nonce,
            node: "raw".into(),
        }));
        let Some(Message::Challenge(c)) = self.recv() else {
            panic!("no challenge");
        };
        let auth = Authenticator::new(secret);
        let tag = auth.sign(AuthRole::Client, &nonce, &c.nonce, c.features);
        self.send(&Message::Auth(tag));
        self.recv()
    }
}

fn lineage(epoch: u64, session: u64) -> Lineage {
    Lineage::new("test-primary", blockvol::Epoch(epoch), session)
}

fn barrier(l: Lineage) -> BarrierRequest {
    BarrierRequest {
        lineage: l,
        target: Lsn(0),
        expected_tip: None,
        committed: Lsn(0),
    }
}

#[test]
fn authenticated_client_reaches_every_volume_on_one_listener() {
    let f = serve(secret_config(), &["vol-a", "vol-b"]);
    // Different contents, so a request served by the wrong volume shows.
    for (i, vol) in f.vols.iter().enumerate() {
        vol.assign(Role::Primary, blockvol::Epoch(1)).unwrap();
        vol.write(blockvol::Lba(i as u64), &[i as u8 + 1; 4096])
            .unwrap();
        vol.sync().unwrap();
    }
    assert_ne!(f.vols[0].digest().unwrap(), f.vols[1].digest().unwrap());
    for (i, name) in ["vol-a", "vol-b"].into_iter().enumerate() {
        let mut r = RemoteReplica::connect(f.server.local_addr(), name, &client(Some(SECRET)))
            .expect("connect");
        let hs = r.handshake().expect("handshake");
        assert_eq!((hs.head, hs.install_incomplete), (Lsn(1), false));
        let probe = r.probe(true).expect("probe");
        assert_eq!(probe.digest, Some(f.vols[i].digest().unwrap().0), "{name}");
    }
    // An unknown volume is a typed refusal, and the connection stays usable.
    let mut r = RemoteReplica::connect(f.server.local_addr(), "vol-c", &client(Some(SECRET)))
        .expect("connect");
    assert!(matches!(r.handshake(), Err(TargetError::Protocol(d)) if d.contains("no volume")));
    assert!(matches!(r.probe(false), Err(TargetError::Protocol(_))));
    assert_eq!(ServerStats::get(&f.server.stats().authenticated), 3);
}

#[test]
fn a_server_without_a_secret_listens_on_loopback_only() {
    let err = ReplicaServer::start(
        "0.0.0.0:0".parse().unwrap(),
        ServerConfig::default(),
        Arc::new(Volumes::new()),
    )
    .expect_err("no secret, all interfaces");
    assert!(matches!(err, ServerError::NeedsSecret(_)), "{err}");
    let with_secret = ReplicaServer::start(
        "0.0.0.0:0".parse().unwrap(),
        secret_config(),
        Arc::new(Volumes::new()),
    );
    assert!(with_secret.is_ok());
}

#[test]
fn a_client_with_the_wrong_secret_is_refused_by_both_sides() {
    let f = serve(secret_config(), &["vol-a"]);
    // The client checks the server first: a server that cannot prove the client's secret is
    // not talked to.
    let err = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(b"wrong")))
        .expect_err("wrong secret");
    assert!(matches!(err, ConnectError::ServerNotAuthentic(_)), "{err}");
    // A peer that skips that check and answers anyway is refused by the server.
    let mut raw = Raw::connect(f.server.local_addr());
    match raw.authenticate(Some(b"wrong")) {
        Some(Message::Close(c)) => {
            assert_eq!(c.code, CloseCode::AuthFailed as u16);
            assert!(c.reason.contains("secret"), "{}", c.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(wait_for(&f.server.stats().auth_failed, 1), 1);
    // No secret at all against a server with one: refused the same way.
    let mut raw = Raw::connect(f.server.local_addr());
    assert!(matches!(raw.authenticate(None), Some(Message::Close(_))));
    assert_eq!(wait_for(&f.server.stats().auth_failed, 2), 2);
    assert_eq!(ServerStats::get(&f.server.stats().requests), 0);
}

#[test]
fn random_bytes_and_huge_lengths_are_closed_before_anything_is_allocated() {
    let f = serve(secret_config(), &["vol-a"]);
    // Not this protocol at all.
    let mut raw = Raw::connect(f.server.local_addr());
    raw.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (code, reason) = raw.expect_close();
    assert_eq!(code, CloseCode::Protocol as u16, "{reason}");
    // A valid header type announcing 4 GiB: refused from the header alone.
    let mut raw = Raw::connect(f.server.local_addr());
    let mut header = [0u8; 12];
    header[0] = 0x01;
    header[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    raw.stream.write_all(&header).unwrap();
    let (code, reason) = raw.expect_close();
    assert_eq!(code, CloseCode::Protocol as u16);
    assert!(reason.contains("exceeds the maximum"), "{reason}");
    // Before authenticating, even 2 KiB is more than a handshake frame may be.
    let mut raw = Raw::connect(f.server.local_addr());
    header[4..8].copy_from_slice(&2048u32.to_be_bytes());
    raw.stream.write_all(&header).unwrap();
    let (_, reason) = raw.expect_close();
    assert!(reason.contains("maximum of 1024"), "{reason}");
    assert_eq!(wait_for(&f.server.stats().protocol_errors, 3), 3);
    // The server still serves.
    let mut r = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(SECRET)))
        .expect("connect after hostile peers");
    r.handshake().expect("handshake");
}

#[test]
fn a_peer_trickling_one_byte_at_a_time_is_timed_out() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(400),
        ..secret_config()
    };
    let f = serve(config, &["vol-a"]);
    let mut raw = Raw::connect(f.server.local_addr());
    let mut hello = BytesMut::new();
    encode(
        &Message::Hello(Hello {
            version: VERSION,
            features: FEATURES,
            nonce: Nonce::random().unwrap(),
            node: "slow".into(),
        }),
        DEFAULT_MAX_FRAME,
        &mut hello,
    )
    .unwrap();
    let start = Instant::now();
    for b in hello.iter().take(20) {
        if raw.stream.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, reason) = raw.expect_close();
    assert_eq!(code, CloseCode::Timeout as u16, "{reason}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(wait_for(&f.server.stats().timeouts, 1), 1);
}

#[test]
fn a_flood_of_connections_is_refused_and_others_are_served_after() {
    let config = ServerConfig {
        max_connections: 4,
        handshake_timeout: Duration::from_millis(500),
        ..secret_config()
    };
    let f = serve(config, &["vol-a"]);
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(f.server.local_addr()).unwrap())
        .collect();
    assert_eq!(wait_for(&f.server.stats().refused_busy, 6), 6);
    // The idle ones time out in their handshake, which frees the slots.
    assert_eq!(wait_for(&f.server.stats().timeouts, 4), 4);
    drop(idle);
    let mut r = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(SECRET)))
        .expect("served after the flood");
    r.handshake().expect("handshake");
}

#[test]
fn a_corrupted_frame_closes_the_connection_and_applies_nothing() {
    let f = serve(secret_config(), &["vol-a"]);
    let mut raw = Raw::connect(f.server.local_addr());
    assert!(matches!(
        raw.authenticate(Some(SECRET)),
        Some(Message::Ready)
    ));
    let msg = Message::Request {
        id: 1,
        volume: "vol-a".into(),
        body: Request::Apply(ApplyRequest {
            lineage: lineage(1, 1),
            committed: Lsn(0),
            anchor: EntryInfo::ORIGIN,
            count: 1,
            frames: vec![0xAB; 4200],
        }),
    };
    let mut out = BytesMut::new();
    encode(&msg, DEFAULT_MAX_FRAME, &mut out).unwrap();
    // One flipped bit deep in the payload.
    out[3000] ^= 0x10;
    raw.stream.write_all(&out).unwrap();
    let (code, reason) = raw.expect_close();
    assert_eq!(code, CloseCode::Protocol as u16);
    assert!(reason.contains("crc32c"), "{reason}");
    assert_eq!(f.vols[0].status().head, Lsn(0), "nothing applied");
    assert_eq!(ServerStats::get(&f.server.stats().requests), 0);
}

#[test]
fn after_an_epoch_bump_the_superseded_lineage_changes_nothing() {
    let f = serve(secret_config(), &["vol-a"]);
    let mut old = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(SECRET)))
        .expect("connect");
    let mut new = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(SECRET)))
        .expect("connect");
    old.barrier(barrier(lineage(1, 1)))
        .expect("epoch 1 admitted");
    new.barrier(barrier(lineage(2, 5)))
        .expect("epoch 2 admitted");
    let err = old.barrier(barrier(lineage(1, 1))).expect_err("superseded");
    assert!(matches!(err, TargetError::Fenced(_)), "{err}");
    let err = old
        .truncate(v2bridge::TruncateRequest {
            lineage: lineage(1, 1),
            after: Lsn(0),
            committed: Lsn(0),
        })
        .expect_err("superseded truncate");
    assert!(matches!(err, TargetError::Fenced(_)), "{err}");
    // A refusal is an answer, not a broken connection.
    new.barrier(barrier(lineage(2, 5)))
        .expect("current lineage still served");
}

#[test]
fn base_chunks_pipeline_under_the_window_and_a_refusal_fails_the_next_call() {
    let config = ServerConfig {
        window: 8 << 10,
        ..secret_config()
    };
    let f = serve(config, &["vol-a"]);
    let mut r = RemoteReplica::connect(f.server.local_addr(), "vol-a", &client(Some(SECRET)))
        .expect("connect");
    // No install was begun, so the replica refuses every chunk; the client learns it from the
    // acknowledgements it collects while the pipeline runs.
    let mut first_err = None;
    for i in 0..12 {
        let res = r.base_chunk(BaseChunkRequest {
            lineage: lineage(1, 1),
            frame: vec![i; 2000],
        });
        if let Err(e) = res {
            first_err = Some((i, e));
            break;
        }
    }
    let (at, err) = first_err.expect("a refused chunk surfaces");
    assert!(matches!(err, TargetError::Protocol(ref d) if d.contains("without an install")));
    assert!(
        at >= 1,
        "the first chunk was sent without waiting for its answer"
    );
    let stats = r.stats();
    assert!(stats.pipelined >= 1, "{stats:?}");
    assert!(stats.max_in_flight <= (8 << 10) + 2100, "{stats:?}");
    // The connection is still good.
    r.handshake().expect("handshake after a refused pipeline");
}

/// A server that authenticates (no secret) and then answers every request with `reply`.
fn lying_server(reply: Reply) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut raw = Raw {
            stream,
            decoder: Decoder::new(DEFAULT_MAX_FRAME),
        };
        let Some(Message::Hello(h)) = raw.recv() else {
            return;
        };
        let nonce = Nonce::random().unwrap();
        let auth = Authenticator::new(None);
        raw.send(&Message::Challenge(transport::wire::Challenge {
            version: VERSION,
            features: h.features,
            nonce,
            mac: auth.sign(AuthRole::Server, &h.nonce, &nonce, h.features),
            max_frame: DEFAULT_MAX_FRAME,
            window: DEFAULT_MAX_FRAME,
        }));
        let _ = raw.recv();
        raw.send(&Message::Ready);
        while let Some(Message::Request { id, .. }) = raw.recv() {
            raw.send(&Message::Reply {
                id,
                body: reply.clone(),
            });
        }
    });
    addr
}

#[test]
fn a_reply_that_echoes_another_lineage_is_refused_and_breaks_the_connection() {
    let addr = lying_server(Reply::Barrier(
        lineage(9, 9),
        v2bridge::BarrierReply {
            durable: Lsn(0),
            tip: EntryInfo::ORIGIN,
        },
    ));
    let mut r = RemoteReplica::connect(addr, "vol-a", &client(None)).expect("connect");
    let err = r
        .barrier(barrier(lineage(1, 1)))
        .expect_err("echo mismatch");
    assert!(
        matches!(err, TargetError::Transport(ref d) if d.contains("echoes lineage")),
        "{err}"
    );
    let err = r.handshake().expect_err("broken connection");
    assert!(matches!(err, TargetError::Transport(_)));
}

#[test]
fn remote_primary_reads_are_bounded_by_one_reply_whatever_is_asked() {
    let config = ServerConfig {
        max_frame: 64 << 10,
        ..secret_config()
    };
    let f = serve(config, &["vol-a"]);
    let vol = &f.vols[0];
    vol.assign(Role::Primary, blockvol::Epoch(2)).unwrap();
    for i in 0..100u64 {
        vol.write(blockvol::Lba(i % 64), &[7u8; 4096]).unwrap();
    }
    vol.sync().unwrap();
    let mut raw = Raw::connect(f.server.local_addr());
    raw.decoder = Decoder::new(64 << 10);
    assert!(matches!(
        raw.authenticate(Some(SECRET)),
        Some(Message::Ready)
    ));
    let ask = |raw: &mut Raw, id: u64, body: Request| {
        raw.send(&Message::Request {
            id,
            volume: "vol-a".into(),
            body,
        });
        match raw.recv() {
            Some(Message::Reply { id: got, body }) if got == id => body,
            other => panic!("expected a reply, got {other:?}"),
        }
    };
    // Four billion entries asked for: one reply's worth comes back.
    match ask(
        &mut raw,
        1,
        Request::ReadWal {
            after: Lsn(0),
            want: u32::MAX,
        },
    ) {
        Reply::Wal { count, frames } => {
            assert!((1..100).contains(&count), "{count}");
            assert!(frames.len() <= 64 << 10, "{}", frames.len());
        }
        other => panic!("{other:?}"),
    }
    // A 4 GiB image chunk with no image open: refused, nothing allocated.
    assert!(matches!(
        ask(&mut raw, 2, Request::ImageRead(u32::MAX)),
        Reply::Error(None, TargetError::Storage(_))
    ));
    // A lease on nothing cannot be released.
    assert!(matches!(
        ask(&mut raw, 3, Request::Release(99)),
        Reply::Error(None, TargetError::Protocol(_))
    ));
    // An open image read with a 4 GiB budget: one frame's worth comes back.
    let head = vol.status().head;
    vol.set_committed(head);
    let lease = match ask(
        &mut raw,
        5,
        Request::Pin {
            what: transport::wire::PinWhat::FullBase,
            lsn: head,
            lease_ms: 10_000,
        },
    ) {
        Reply::Pinned { lease, .. } => lease,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        ask(
            &mut raw,
            6,
            Request::ImageOpen {
                lease,
                lsn: head,
                from: blockvol::Lba(0)
            }
        ),
        Reply::ImageOpen { .. }
    ));
    match ask(&mut raw, 7, Request::ImageRead(u32::MAX)) {
        Reply::ImageChunk(c) => {
            let frame = c.frame.expect("the image has data");
            assert!(frame.len() <= 64 << 10, "{}", frame.len());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ask(&mut raw, 8, Request::Release(lease)),
        Reply::Done
    ));
    // A WAL read of nothing is refused.
    assert!(matches!(
        ask(
            &mut raw,
            4,
            Request::ReadWal {
                after: Lsn(0),
                want: 0
            }
        ),
        Reply::Error(None, TargetError::Protocol(_))
    ));
    // At most 16 leases per connection.
    let pin = || Request::Pin {
        what: transport::wire::PinWhat::Wal,
        lsn: Lsn(100),
        lease_ms: 10_000,
    };
    for id in 0..16 {
        assert!(matches!(
            ask(&mut raw, 10 + id, pin()),
            Reply::Pinned { .. }
        ));
    }
    assert!(matches!(
        ask(&mut raw, 40, pin()),
        Reply::Error(None, TargetError::Protocol(_))
    ));
    // And the connection still serves.
    assert!(matches!(
        ask(&mut raw, 41, Request::History),
        Reply::History(_)
    ));
}
