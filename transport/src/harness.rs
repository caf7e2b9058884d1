//! The conformance [`Harness`] with its replicas in another process (feature `testing`).
//!
//! The primary is a real volume in this process (through `v2bridge`'s harness); the replicas
//! are volume files served by a `swblock-replicad` process, reached through
//! [`RemoteReplica`]. A replica file is made here and handed over before its first request:
//! from then on only the replica process opens it, and every check (handshake, digest, head)
//! asks it over the network.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use blockvol::{Digest, Volume};
use engine::conformance::Harness;
use engine::{Epoch, Lsn, PinKind, ReplicaHandshake, SessionId, StorageAdapter};
use v2bridge::harness::{BlockVolHarness, append_divergent, volume_options};
use v2bridge::{BridgeIo, Lineage, ReplicaTarget};

use crate::net::{ClientConfig, RemoteReplica};

/// A `swblock-replicad` process serving the volumes in one directory. Killed (SIGKILL) and
/// reaped when dropped.
#[derive(Debug)]
pub struct ReplicaProcess {
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    args: Vec<String>,
}

impl ReplicaProcess {
    /// Starts `bin --dir DIR --listen 127.0.0.1:0` and waits for its address.
    pub fn start(bin: &Path, dir: &Path) -> Result<ReplicaProcess, String> {
        Self::start_with(bin, dir, &[])
    }

    /// `start` with more arguments (kept for restarts).
    pub fn start_with(bin: &Path, dir: &Path, args: &[&str]) -> Result<ReplicaProcess, String> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (child, addr) = Self::spawn(bin, dir, "127.0.0.1:0", &args)?;
        Ok(ReplicaProcess {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            child: Some(child),
            addr,
            args,
        })
    }

    fn spawn(
        bin: &Path,
        dir: &Path,
        listen: &str,
        args: &[String],
    ) -> Result<(Child, SocketAddr), String> {
        let mut child = Command::new(bin)
            .arg("--dir")
            .arg(dir)
            .arg("--listen")
            .arg(listen)
            .args(args)
            .env("SWBLOCK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addr = match read {
            Ok(_) => line
                .trim()
                .strip_prefix("listening on ")
                .and_then(|a| a.parse().ok()),
            Err(_) => None,
        };
        match addr {
            Some(a) => Ok((child, a)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("{} did not start: {line:?}", bin.display()))
            }
        }
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it with SIGKILL (no chance to sync or close anything) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it if it runs and starts it again on the same address.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let listen = self.addr.to_string();
        // The port was just released; another process could take it in between, which the
        // error then says.
        let (child, addr) = Self::spawn(&self.bin, &self.dir, &listen, &self.args)?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path of the `swblock-replicad` binary next to the running executable's target
/// directory (`target/<profile>/`), or `SWBLOCK_REPLICAD` when set.
pub fn replicad_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SWBLOCK_REPLICAD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join("swblock-replicad");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(
        "swblock-replicad not found next to this executable: run `cargo build -p transport \
         --bin swblock-replicad` or set SWBLOCK_REPLICAD"
            .into(),
    )
}

/// A primary here, replicas in a replica process.
pub struct NetHarness {
    local: BlockVolHarness,
    dir: PathBuf,
    process: ReplicaProcess,
    client: ClientConfig,
    /// Replicas the process may have opened (no local change after that).
    handed_over: BTreeSet<String>,
    /// Bytes the network moved, over every connection this harness opened.
    pub net_bytes: u64,
    /// Where recovery I/O connects instead of the replica process (a [`FaultProxy`]).
    io_via: Option<SocketAddr>,
}

impl NetHarness {
    /// A fresh primary and a replica process started from `bin`.
    pub fn new(bin: &Path) -> Result<NetHarness, String> {
        Self::with_replica_args(bin, &[])
    }

    /// `new`, with more arguments for the replica process.
    pub fn with_replica_args(bin: &Path, args: &[&str]) -> Result<NetHarness, String> {
        let local = BlockVolHarness::new()?;
        let dir = local.dir().join("replica-server");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let process = ReplicaProcess::start_with(bin, &dir, args)?;
        Ok(NetHarness {
            local,
            dir,
            process,
            client: ClientConfig {
                node: "harness-primary".into(),
                ..ClientConfig::default()
            },
            handed_over: BTreeSet::new(),
            net_bytes: 0,
            io_via: None,
        })
    }

    /// The replica process.
    pub fn process(&mut self) -> &mut ReplicaProcess {
        &mut self.process
    }

    /// The in-process side (the primary).
    pub fn local(&self) -> &BlockVolHarness {
        &self.local
    }

    /// A connection to replica `name`.
    pub fn connect(&mut self, name: &str) -> Result<RemoteReplica, String> {
        self.handed_over.insert(name.to_owned());
        RemoteReplica::connect(self.process.addr(), name, &self.client)
            .map_err(|e| format!("connect to replica {name}: {e}"))
    }

    /// Routes the connections of [`Harness::io`] through `addr` (a proxy in front of the
    /// replica process); handshakes and probes still connect directly.
    pub fn route_io_via(&mut self, addr: Option<SocketAddr>) {
        self.io_via = addr;
    }

    fn replica_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vol"))
    }
}

impl Harness for NetHarness {
    type Io = BridgeIo<RemoteReplica>;

    fn storage(&self) -> Arc<dyn StorageAdapter> {
        self.local.storage()
    }

    fn primary_write(&mut self, n: u64) -> Result<Lsn, String> {
        self.local.primary_write(n)
    }

    fn primary_commit(&mut self, lsn: Lsn) -> Result<(), String> {
        self.local.primary_commit(lsn)
    }

    fn primary_checkpoint(&mut self, checkpoint: Lsn, tail: Lsn) -> Result<(), String> {
        self.local.primary_checkpoint(checkpoint, tail)
    }

    fn add_replica(&mut self, name: &str, prefix: Lsn) -> Result<(), String> {
        let vol = self.local.create_replica(&self.dir, name, prefix)?;
        vol.close()
            .map_err(|e| format!("close replica {name}: {e}"))?;
        Ok(())
    }

    fn replica_append_divergent(&mut self, name: &str, n: u64) -> Result<Lsn, String> {
        if self.handed_over.contains(name) {
            return Err(format!(
                "replica {name} belongs to the replica process now: no local change"
            ));
        }
        let path = self.replica_path(name);
        let vol = Volume::open(&path, &volume_options(blockvol::FlushGate::Committed))
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let head = append_divergent(&vol, n)?;
        vol.close()
            .map_err(|e| format!("close replica {name}: {e}"))?;
        Ok(head)
    }

    fn replica_handshake(&mut self, name: &str) -> Result<ReplicaHandshake, String> {
        let mut r = self.connect(name)?;
        let reply = r
            .handshake()
            .map_err(|e| format!("handshake with {name}: {e}"))?;
        self.net_bytes += r.stats().bytes_out + r.stats().bytes_in;
        Ok(v2bridge::convert::handshake(&reply))
    }

    fn io(&mut self, name: &str, epoch: Epoch, session: SessionId) -> Result<Self::Io, String> {
        let target = match self.io_via {
            Some(addr) => {
                self.handed_over.insert(name.to_owned());
                RemoteReplica::connect(addr, name, &self.client)
                    .map_err(|e| format!("connect to replica {name} via {addr}: {e}"))?
            }
            None => self.connect(name)?,
        };
        let committed = v2bridge::convert::to_engine(self.local.primary().status().committed);
        Ok(BridgeIo::new(
            Arc::clone(self.local.storage_adapter()),
            target,
            Lineage::new(
                "harness-primary",
                v2bridge::convert::epoch_to_blockvol(epoch),
                session.get(),
            ),
            committed,
        ))
    }

    fn fail_next_pin(&mut self, kind: PinKind) {
        self.local.fail_next_pin(kind);
    }

    fn pins_outstanding(&self) -> usize {
        self.local.pins_outstanding()
    }

    fn replica_matches_primary(&mut self, name: &str, at: Lsn) -> Result<bool, String> {
        let mut r = self.connect(name)?;
        let probe = r.probe(true).map_err(|e| format!("probe {name}: {e}"))?;
        if probe.install_incomplete || v2bridge::convert::to_engine(probe.head) != at {
            return Ok(false);
        }
        let want = Digest::of_image(&self.local.oracle_image(at));
        let primary = self.local.primary();
        if v2bridge::convert::to_engine(primary.status().head) == at {
            let own = primary
                .digest()
                .map_err(|e| format!("primary digest: {e}"))?;
            if own != want {
                return Err(format!(
                    "the primary's own digest {own} differs from the oracle {want}"
                ));
            }
        }
        Ok(probe.digest == Some(want.0))
    }
}

/// A fault to inject into the byte stream of one direction of a proxied connection, at a byte
/// offset counted from the start of that direction (the handshake included).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Flip one bit of the byte at this offset.
    FlipBit(u64),
    /// Close both sides once this many bytes were forwarded (a cut, possibly mid-frame).
    CutAfter(u64),
    /// Send the `len` bytes starting at this offset twice.
    Duplicate(u64, u64),
    /// Hold every piece of data this long before forwarding it.
    Delay(std::time::Duration),
}

/// Which way bytes flow through the proxy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (requests).
    Up,
    /// Server to client (replies).
    Down,
}

#[derive(Debug, Default)]
struct ProxyState {
    up: Option<Fault>,
    down: Option<Fault>,
    /// Faults every new connection takes (after a one-shot fault, if one is set).
    every_up: Option<Fault>,
    every_down: Option<Fault>,
    /// Faults apply to connections accepted after they were set, once each.
    connections: u64,
    faults_fired: u64,
}

/// A TCP proxy on loopback that forwards to one address and injects [`Fault`]s, for tests
/// (feature `testing`). Each accepted connection takes the faults set at that moment; its two
/// directions run on their own threads and end when either side closes.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<std::sync::Mutex<ProxyState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// A proxy in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sp.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (up, down) = {
                    let mut s = st.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    s.connections += 1;
                    (s.up.take().or(s.every_up), s.down.take().or(s.every_down))
                };
                let pipe = |from: &std::net::TcpStream, to: &std::net::TcpStream, f| {
                    let (from, to) = (from.try_clone(), to.try_clone());
                    let st = Arc::clone(&st);
                    if let (Ok(from), Ok(to)) = (from, to) {
                        std::thread::spawn(move || forward(from, to, f, &st));
                    }
                };
                pipe(&client, &server, up.unwrap_or(Fault::None));
                pipe(&server, &client, down.unwrap_or(Fault::None));
            }
        });
        Ok(FaultProxy { addr, state, stop })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault for the next connection's `direction`.
    pub fn set(&self, direction: Direction, fault: Fault) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match direction {
            Direction::Up => s.up = Some(fault),
            Direction::Down => s.down = Some(fault),
        }
    }

    /// Sets (or with `None` clears) a fault every later connection takes in `direction`:
    /// a link that keeps failing the same way.
    pub fn set_every(&self, direction: Direction, fault: Option<Fault>) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match direction {
            Direction::Up => s.every_up = fault,
            Direction::Down => s.every_down = fault,
        }
    }

    /// Faults that fired so far (a bit flipped, a cut, a duplicate sent).
    pub fn fired(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .faults_fired
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn forward(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    fault: Fault,
    state: &std::sync::Mutex<ProxyState>,
) {
    use std::io::{Read, Write};
    let fired = || {
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .faults_fired += 1;
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    let mut done = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let (start, end) = (pos, pos + n as u64);
        pos = end;
        let mut extra: Option<Vec<u8>> = None;
        match fault {
            Fault::FlipBit(at) if !done && (start..end).contains(&at) => {
                chunk[(at - start) as usize] ^= 0x04;
                done = true;
                fired();
            }
            Fault::CutAfter(at) if !done && end > at => {
                let keep = (at - start) as usize;
                let _ = to.write_all(&chunk[..keep]);
                fired();
                break;
            }
            Fault::Duplicate(at, len) if !done && (start..end).contains(&at) => {
                let from_i = (at - start) as usize;
                let to_i = (from_i + len as usize).min(n);
                extra = Some(chunk[from_i..to_i].to_vec());
                done = true;
                fired();
            }
            Fault::Delay(d) => std::thread::sleep(d),
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        if let Some(e) = extra
            && to.write_all(&e).is_err()
        {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
