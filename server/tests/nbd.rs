//! The NBD server against clients we did not write (qemu-io, qemu-img, nbdinfo), and against
//! hostile clients written here with raw sockets. Every server listens on 127.0.0.1 and every
//! child process is killed when its test ends (or after a deadline).
//!
//! The tools are required, not optional: a missing tool fails the test with the package to
//! install (`qemu-utils`, `libnbd-bin`; `.ci/run` installs the latter).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, Epoch, Lba, OpenOptions, Role, Volume};
use server::nbd::proto::{self, NbdErrno};
use server::nbd::{
    BlockDevice, DeviceError, NbdConfig, NbdServer, NbdServerError, NbdStats, StaticExports,
    VolumeDevice,
};

const MIB: u64 = 1 << 20;
/// The longest any client process may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ---------------------------------------------------------------------------------------------
// Volumes, devices and servers.

fn volume(dir: &Path, name: &str, size: u64, wal: u64) -> Arc<Volume> {
    let vol = Volume::create(
        dir.join(name),
        &CreateOptions {
            volume_size_bytes: size,
            wal_size_bytes: wal,
            block_size: 4096,
        },
        &OpenOptions::default(),
    )
    .expect("create volume");
    vol.assign(Role::Primary, Epoch(1)).expect("assign primary");
    Arc::new(vol)
}

fn read_all(vol: &Volume) -> Vec<u8> {
    vol.read(Lba(0), vol.geometry().volume_blocks)
        .expect("read volume")
}

/// What a [`Recorder`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Read(u64, usize),
    Write { offset: u64, len: usize, fua: bool },
    Flush,
    Trim(u64, u64),
    Zeroes { offset: u64, len: u64, fua: bool },
}

/// A device that records every call and passes it on, so a test can assert which path a
/// client's request took.
struct Recorder {
    inner: Arc<dyn BlockDevice>,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn new(inner: Arc<dyn BlockDevice>) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner,
            ops: Mutex::new(Vec::new()),
        })
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn push(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }
}

impl BlockDevice for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.push(Op::Read(offset, buf.len()));
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.push(Op::Write {
            offset,
            len: data.len(),
            fua,
        });
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.push(Op::Flush);
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.push(Op::Trim(offset, len));
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.push(Op::Zeroes { offset, len, fua });
        self.inner.write_zeroes(offset, len, fua)
    }
    fn flush_covers_all_connections(&self) -> bool {
        self.inner.flush_covers_all_connections()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn serve(exports: StaticExports, config: NbdConfig) -> NbdServer {
    NbdServer::start(loopback(), config, Arc::new(exports)).expect("start NBD server")
}

fn uri(server: &NbdServer, export: &str) -> String {
    format!("nbd://127.0.0.1:{}/{export}", server.local_addr().port())
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// The path of a required tool.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is required by these tests: install the Debian package {package}");
}

fn qemu_io() -> PathBuf {
    tool("qemu-io", "qemu-utils")
}

fn qemu_img() -> PathBuf {
    tool("qemu-img", "qemu-utils")
}

fn nbdinfo() -> PathBuf {
    tool("nbdinfo", "libnbd-bin")
}

/// A child process killed (and reaped) when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.status.success()
    }

    fn text(&self) -> String {
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion within [`TOOL_TIMEOUT`] (killed after it), collecting its output.
fn run(cmd: &mut Command) -> Run {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let mut guard = Guard(child);
    let mut out = guard.0.stdout.take().unwrap();
    let mut err = guard.0.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(st) = guard.0.try_wait().expect("wait for child") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "{shown} ran longer than {TOOL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    Run {
        status,
        stdout,
        stderr,
    }
}

/// `qemu-io -f raw -c CMD... URI`.
fn qio(uri: &str, cmds: &[&str]) -> Run {
    let mut c = Command::new(qemu_io());
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    run(&mut c)
}

fn qio_ok(uri: &str, cmds: &[&str]) -> Run {
    let r = qio(uri, cmds);
    assert!(r.ok(), "qemu-io {cmds:?} on {uri} failed:\n{}", r.text());
    // qemu-io reports some failed commands on stderr/stdout with a zero exit: none may appear.
    for bad in ["failed", "error", "Error"] {
        assert!(
            !r.stdout.contains(bad) && !r.stderr.contains(bad),
            "qemu-io {cmds:?} reported {bad:?}:\n{}",
            r.text()
        );
    }
    r
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------------
// Tests with clients we did not write.

#[test]
fn qemu_io_patterns_round_trip_and_a_wrong_pattern_fails() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 16 * MIB, 8 * MIB);
    let server = serve(
        StaticExports::new().with("vol1", Arc::new(VolumeDevice::new(Arc::clone(&vol)))),
        NbdConfig::default(),
    );
    let u = uri(&server, "vol1");
    qio_ok(&u, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    // The bytes are in the volume, read without NBD.
    let image = read_all(&vol);
    assert!(image[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(image[MIB as usize..].iter().all(|&b| b == 0));
    // A read that expects another pattern must fail: the check above is not vacuous.
    let wrong = qio(&u, &["read -P 0xcd 0 1M"]);
    assert!(!wrong.ok(), "a wrong pattern verified:\n{}", wrong.text());
    assert!(
        wrong.stdout.contains("Pattern verification failed"),
        "{}",
        wrong.text()
    );
    // The same over an nbd+tcp URI.
    let tcp = format!("nbd+tcp://127.0.0.1:{}/vol1", server.local_addr().port());
    qio_ok(&tcp, &["write -P 0x17 1M 64k", "read -P 0x17 1M 64k"]);
    let stats = server.stats();
    assert_eq!(NbdStats::get(&stats.transmissions), 3);
    assert_eq!(NbdStats::get(&stats.closed_protocol), 0);
}

#[test]
fn unaligned_requests_match_an_oracle() {
    init_log();
    // Once with the device's block size as the advertised minimum (qemu does the
    // read-modify-write) and once byte-granular (the server's VolumeDevice does it).
    for byte_granular in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(dir.path(), "v", 4 * MIB, 4 * MIB);
        let rec = Recorder::new(Arc::new(VolumeDevice::new(Arc::clone(&vol))));
        let server = serve(
            StaticExports::new().with("u", Arc::clone(&rec) as Arc<dyn BlockDevice>),
            NbdConfig {
                byte_granular,
                ..NbdConfig::default()
            },
        );
        let u = uri(&server, "u");
        let mut oracle = vec![0u8; 4 * MIB as usize];
        let writes: &[(u8, u64, u64)] = &[
            (0x11, 1000, 3000),
            (0x22, 4095, 2),
            (0x33, 8191, 10000),
            (0x44, 65536 + 512, 512),
            (0x55, 4 * MIB - 7, 7),
            (0x66, 3000, 200),
        ];
        let mut cmds = Vec::new();
        for &(p, off, len) in writes {
            cmds.push(format!("write -P {p:#x} {off} {len}"));
            oracle[off as usize..(off + len) as usize].fill(p);
        }
        // Reads at odd places check what qemu gets back against the same oracle.
        cmds.push("read -P 0x11 1000 2000".into());
        cmds.push("read -P 0x66 3000 200".into());
        cmds.push("read -P 0x11 3200 800".into());
        cmds.push("read -P 0x22 4095 2".into());
        cmds.push("read -P 0x33 8191 10000".into());
        cmds.push("read -P 0 18191 100".into());
        cmds.push("read -P 0x55 4194297 7".into());
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qio_ok(&u, &refs);
        assert_eq!(read_all(&vol), oracle, "byte_granular={byte_granular}");
        let unaligned = rec
            .ops()
            .iter()
            .filter(|op| matches!(op, Op::Write { offset, len, .. } if offset % 4096 != 0 || len % 4096 != 0))
            .count();
        if byte_granular {
            assert!(
                unaligned >= writes.len(),
                "the server's read-modify-write did not run: {:?}",
                rec.ops()
            );
        } else {
            assert_eq!(unaligned, 0, "qemu ignored the minimum block size");
        }
    }
}

#[test]
fn qemu_img_convert_in_and_out_is_byte_equal() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let vol = volume(dir.path(), "v", size, 16 * MIB);
    let server = serve(
        StaticExports::new().with("img", Arc::new(VolumeDevice::new(Arc::clone(&vol)))),
        NbdConfig::default(),
    );
    let src = dir.path().join("random-64MiB.img");
    let data = random_bytes(size as usize, 0x5eed);
    std::fs::write(&src, &data).unwrap();
    let u = uri(&server, "img");
    let r = run(Command::new(qemu_img())
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&u));
    assert!(r.ok(), "convert in:\n{}", r.text());
    assert!(read_all(&vol) == data, "the volume differs from the image");
    let back = dir.path().join("back.img");
    let r = run(Command::new(qemu_img())
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&u)
        .arg(&back));
    assert!(r.ok(), "convert out:\n{}", r.text());
    let out = std::fs::read(&back).unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "the image read back differs");
    // qemu-img compare agrees (a third opinion, from qemu).
    let r = run(Command::new(qemu_img())
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&u));
    assert!(r.ok(), "compare:\n{}", r.text());
}

#[test]
fn nbdcopy_over_several_connections_is_byte_equal() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let vol = volume(dir.path(), "v", size, 16 * MIB);
    let server = serve(
        StaticExports::new().with("mc", Arc::new(VolumeDevice::new(Arc::clone(&vol)))),
        NbdConfig::default(),
    );
    let src = dir.path().join("random.img");
    let data = random_bytes(size as usize, 0xc0ffee);
    std::fs::write(&src, &data).unwrap();
    // nbdcopy opens several connections when the server advertises multi-conn, keeps many
    // requests in flight on each, and flushes at the end.
    let r = run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .args(["--connections=4", "--requests=16", "--flush"])
        .arg(&src)
        .arg(uri(&server, "mc")));
    assert!(r.ok(), "{}", r.text());
    assert!(
        NbdStats::get(&server.stats().transmissions) >= 2,
        "nbdcopy used one connection: multi-conn was not used"
    );
    assert_eq!(
        vol.status().durable,
        vol.status().head,
        "the flush reached the volume"
    );
    assert!(read_all(&vol) == data, "the volume differs from the image");
}

#[test]
fn qemu_img_info_shows_the_size() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 24 * MIB, 4 * MIB);
    let server = serve(
        StaticExports::new().with("sized", Arc::new(VolumeDevice::new(vol))),
        NbdConfig::default(),
    );
    let r = run(Command::new(qemu_img())
        .args(["info", "--output=json"])
        .arg(uri(&server, "sized")));
    assert!(r.ok(), "{}", r.text());
    assert!(
        r.stdout
            .contains(&format!("\"virtual-size\": {}", 24 * MIB)),
        "{}",
        r.text()
    );
}

#[test]
fn flush_fua_discard_and_write_zeroes_take_their_paths() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 4 * MIB, 4 * MIB);
    let syncs = Arc::new(AtomicU64::new(0));
    let (s, v) = (Arc::clone(&syncs), Arc::clone(&vol));
    let dev = VolumeDevice::with_flush(
        Arc::clone(&vol),
        Arc::new(move || {
            s.fetch_add(1, Ordering::SeqCst);
            v.sync()
                .map(|_| ())
                .map_err(|e| DeviceError::Io(e.to_string()))
        }),
    );
    let rec = Recorder::new(Arc::new(dev));
    let server = serve(
        StaticExports::new().with("z", Arc::clone(&rec) as Arc<dyn BlockDevice>),
        NbdConfig::default(),
    );
    let u = uri(&server, "z");
    qio_ok(
        &u,
        &[
            "write -P 0x5a 0 256k",
            "flush",
            "write -f -P 0x66 64k 4k",
            "discard 0 8k",
            "write -z 16k 8k",
            "write -z -u 32k 8k",
            "read -P 0 16k 8k",
            "read -P 0 32k 8k",
            "read -P 0x66 64k 4k",
            "read -P 0x5a 68k 188k",
        ],
    );
    let ops = rec.ops();
    assert!(
        ops.contains(&Op::Flush),
        "no flush reached the device: {ops:?}"
    );
    assert!(
        ops.contains(&Op::Write {
            offset: 64 << 10,
            len: 4096,
            fua: true
        }),
        "the FUA write arrived without FUA: {ops:?}"
    );
    assert!(ops.contains(&Op::Trim(0, 8192)), "no trim: {ops:?}");
    assert!(
        ops.iter().any(|op| matches!(
            op,
            Op::Zeroes {
                offset: 16384,
                len: 8192,
                ..
            }
        )),
        "write -z did not arrive as NBD_CMD_WRITE_ZEROES: {ops:?}"
    );
    // The flush and the FUA write each called the hook (qemu also flushes when it closes).
    assert!(syncs.load(Ordering::SeqCst) >= 2);
    assert_eq!(vol.status().durable, vol.status().head);
    let image = read_all(&vol);
    let k = 1024;
    assert!(
        image[..8 * k].iter().all(|&b| b == 0),
        "trimmed blocks read as zeros"
    );
    assert!(image[8 * k..16 * k].iter().all(|&b| b == 0x5a));
    assert!(image[16 * k..24 * k].iter().all(|&b| b == 0));
    assert!(image[32 * k..40 * k].iter().all(|&b| b == 0));
    assert!(image[64 * k..68 * k].iter().all(|&b| b == 0x66));
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let a = volume(dir.path(), "a", 8 * MIB, 4 * MIB);
    let b = volume(dir.path(), "b", 12 * MIB, 4 * MIB);
    let server = serve(
        StaticExports::new()
            .with("alpha", Arc::new(VolumeDevice::new(a)))
            .with("beta", Arc::new(VolumeDevice::new(b))),
        NbdConfig::default(),
    );
    let base = format!("nbd://127.0.0.1:{}", server.local_addr().port());
    let r = run(Command::new(nbdinfo()).arg("--list").arg(&base));
    assert!(r.ok(), "{}", r.text());
    assert!(r.stdout.contains("export=\"alpha\""), "{}", r.text());
    assert!(r.stdout.contains("export=\"beta\""), "{}", r.text());
    assert!(r.stdout.contains("export-size: 12582912"), "{}", r.text());

    let r = run(Command::new(nbdinfo())
        .arg("--json")
        .arg(format!("{base}/alpha")));
    assert!(r.ok(), "{}", r.text());
    let j = r.stdout.replace([' ', '\t', '\n'], "");
    for field in [
        "\"protocol\":\"newstyle-fixed\"",
        "\"structured\":true",
        "\"export-name\":\"alpha\"",
        "\"export-size\":8388608",
        "\"is_read_only\":false",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_multi_conn\":true",
        "\"can_df\":true",
        "\"can_fast_zero\":false",
        "\"block_size_minimum\":4096",
        "\"block_size_preferred\":4096",
        "\"block_size_maximum\":33554432",
    ] {
        assert!(
            j.contains(field),
            "nbdinfo --json lacks {field}:\n{}",
            r.text()
        );
    }
    let r = run(Command::new(nbdinfo()).arg(format!("{base}/gamma")));
    assert!(!r.ok(), "an unknown export was described:\n{}", r.text());
}

#[test]
fn unknown_exports_are_refused_and_the_server_keeps_serving() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 4 * MIB, 4 * MIB);
    let server = serve(
        StaticExports::new().with("here", Arc::new(VolumeDevice::new(vol))),
        NbdConfig::default(),
    );
    for name in ["nosuch", "", "here/x"] {
        let r = qio(&uri(&server, name), &["read 0 4k"]);
        assert!(!r.ok(), "export {name:?} was served:\n{}", r.text());
        assert!(
            r.stderr.contains("not available") || r.stderr.contains("no export"),
            "{}",
            r.text()
        );
    }
    qio_ok(
        &uri(&server, "here"),
        &["write -P 3 0 4k", "read -P 3 0 4k"],
    );
    // Refused names ended as refused options, not as closed connections.
    assert_eq!(NbdStats::get(&server.stats().closed_protocol), 0);
}

#[test]
fn a_gate_that_refuses_fails_qemu_writes_and_changes_nothing() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 4 * MIB, 4 * MIB);
    let primary = Arc::new(AtomicBool::new(true));
    let p = Arc::clone(&primary);
    let dev = VolumeDevice::new(Arc::clone(&vol)).gated(Arc::new(move || {
        if p.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(DeviceError::NotPermitted(
                "not the primary (lease expired)".into(),
            ))
        }
    }));
    let server = serve(
        StaticExports::new().with("g", Arc::new(dev)),
        NbdConfig::default(),
    );
    let u = uri(&server, "g");
    qio_ok(&u, &["write -P 0x42 0 64k"]);
    vol.sync().unwrap();
    let before = (vol.status().head, vol.digest().unwrap());
    primary.store(false, Ordering::SeqCst);
    let r = qio(&u, &["write -P 0x99 0 64k"]);
    assert!(
        !r.ok() || r.stdout.contains("failed") || r.stderr.contains("failed"),
        "a refused write looked successful:\n{}",
        r.text()
    );
    assert!(
        r.stdout.contains("Operation not permitted")
            || r.stderr.contains("Operation not permitted"),
        "{}",
        r.text()
    );
    assert_eq!((vol.status().head, vol.digest().unwrap()), before);
    // Reads are refused too, and the server answered with errors without closing.
    let r = qio(&u, &["read -P 0x42 0 64k"]);
    assert!(
        r.stdout.contains("Operation not permitted")
            || r.stderr.contains("Operation not permitted"),
        "{}",
        r.text()
    );
    assert!(NbdStats::get(&server.stats().error_replies) >= 2);
    primary.store(true, Ordering::SeqCst);
    qio_ok(&u, &["read -P 0x42 0 64k"]);
}

#[test]
fn only_loopback_without_allow_remote() {
    let err = NbdServer::start(
        "0.0.0.0:0".parse().unwrap(),
        NbdConfig::default(),
        Arc::new(StaticExports::new()),
    )
    .unwrap_err();
    assert!(matches!(err, NbdServerError::NotLoopback(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Hostile clients, written here.

/// A raw NBD client: just enough of the protocol to misbehave on purpose.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(server: &NbdServer) -> Raw {
        let s = TcpStream::connect(server.local_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// Reads the greeting and answers with `flags`.
    fn greet(&mut self, flags: u32) {
        let g = self.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        self.s.write_all(&flags.to_be_bytes()).unwrap();
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// One option reply: (option, reply type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), proto::OPTION_REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        assert!(len < 1 << 16, "option reply of {len} bytes");
        (option, kind, self.read_n(len))
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        d
    }

    /// `NBD_OPT_GO` for `name`; returns (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.send_option(proto::OPT_GO, &Self::go_data(name));
        let mut export = None;
        // Bounded: a GO has at most a handful of info replies.
        for _ in 0..8 {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, proto::OPT_GO);
            match kind {
                proto::REP_INFO => {
                    if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT {
                        export = Some((
                            u64::from_be_bytes(data[2..10].try_into().unwrap()),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                }
                proto::REP_ACK => return export.expect("GO acknowledged without export info"),
                other => panic!("GO answered {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
        panic!("GO never acknowledged");
    }

    fn request(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, handle).
    fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    /// One structured chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), proto::STRUCTURED_REPLY_MAGIC);
        let fk = self.u32();
        let handle = self.u64();
        let len = self.u32() as usize;
        assert!(len <= proto::MAX_PAYLOAD as usize + 8);
        ((fk >> 16) as u16, fk as u16, handle, self.read_n(len))
    }

    /// Asserts the server closes the connection within `within` (reads until end of stream,
    /// discarding anything the server still sends, e.g. a refusal).
    fn assert_closed(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the server did not close the connection in {within:?}"
            );
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

fn hostile_fixture(config: NbdConfig) -> (tempfile::TempDir, Arc<Volume>, NbdServer) {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "v", 4 * MIB, 4 * MIB);
    let server = serve(
        StaticExports::new().with("vol", Arc::new(VolumeDevice::new(Arc::clone(&vol)))),
        config,
    );
    (dir, vol, server)
}

/// A well-behaved client still gets served.
fn still_serves(server: &NbdServer) {
    let mut c = Raw::connect(server);
    c.greet(3);
    c.go("vol");
    c.request(0, proto::CMD_WRITE, 1, 8192, 4096, &[0x77; 4096]);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(0, proto::CMD_READ, 2, 8192, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(c.read_n(4096), vec![0x77; 4096]);
    c.request(0, proto::CMD_DISC, 3, 0, 0, &[]);
    c.assert_closed(Duration::from_secs(5));
}

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn hostile_handshakes_are_closed() {
    let (_dir, _vol, server) = hostile_fixture(NbdConfig::default());
    // Unknown client flags.
    let mut c = Raw::connect(&server);
    c.greet(0x8000_0001);
    c.assert_closed(CLOSE_WITHIN);
    // A wrong option magic.
    let mut c = Raw::connect(&server);
    c.greet(3);
    c.s.write_all(b"NOTANOPT\0\0\0\x07\0\0\0\0").unwrap();
    c.assert_closed(CLOSE_WITHIN);
    // An option of 4 GiB (nothing follows; the server must not wait for or allocate it).
    let mut c = Raw::connect(&server);
    c.greet(3);
    let mut h = Vec::new();
    h.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).unwrap();
    c.assert_closed(CLOSE_WITHIN);
    // NBD_OPT_EXPORT_NAME of an unknown export cannot be answered with an error.
    let mut c = Raw::connect(&server);
    c.greet(3);
    c.send_option(proto::OPT_EXPORT_NAME, b"missing");
    c.assert_closed(CLOSE_WITHIN);
    let stats = server.stats();
    assert_eq!(NbdStats::get(&stats.closed_protocol), 3);
    assert_eq!(NbdStats::get(&stats.closed_refused), 1);
    still_serves(&server);
}

#[test]
fn unsupported_options_are_refused_and_negotiation_continues() {
    let (_dir, _vol, server) = hostile_fixture(NbdConfig::default());
    let mut c = Raw::connect(&server);
    c.greet(3);
    for code in [
        proto::OPT_EXTENDED_HEADERS,
        proto::OPT_STARTTLS,
        proto::OPT_SET_META_CONTEXT,
        proto::OPT_LIST_META_CONTEXT,
        4242,
    ] {
        c.send_option(code, b"\0\0\0\x03vol\0\0\0\0");
        let (opt, kind, _) = c.option_reply();
        assert_eq!((opt, kind), (code, proto::REP_ERR_UNSUP), "option {code}");
    }
    // Malformed data of a known option: invalid, and still no close.
    c.send_option(proto::OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, proto::REP_ERR_INVALID);
    c.send_option(proto::OPT_GO, b"\0\0\0\x09vol");
    assert_eq!(c.option_reply().1, proto::REP_ERR_INVALID);
    // Unknown export over GO and INFO.
    c.send_option(proto::OPT_INFO, &Raw::go_data("nope"));
    assert_eq!(c.option_reply().1, proto::REP_ERR_UNKNOWN);
    // LIST, STRUCTURED_REPLY, INFO, then GO.
    c.send_option(proto::OPT_LIST, &[]);
    let (_, kind, data) = c.option_reply();
    assert_eq!(kind, proto::REP_SERVER);
    assert_eq!(&data[4..], b"vol");
    assert_eq!(c.option_reply().1, proto::REP_ACK);
    c.send_option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, proto::REP_ACK);
    let (size, flags) = c.go("vol");
    assert_eq!(size, 4 * MIB);
    for f in [
        proto::FLAG_HAS_FLAGS,
        proto::FLAG_SEND_FLUSH,
        proto::FLAG_SEND_FUA,
        proto::FLAG_SEND_TRIM,
        proto::FLAG_SEND_WRITE_ZEROES,
        proto::FLAG_SEND_DF,
        proto::FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(
            flags & f,
            0,
            "transmission flag {f:#x} missing from {flags:#x}"
        );
    }
    assert_eq!(
        flags & (proto::FLAG_READ_ONLY | proto::FLAG_SEND_FAST_ZERO),
        0
    );

    // Structured replies: a read is one OFFSET_DATA chunk marked done; errors are error
    // chunks; an out-of-range request does not close the connection.
    c.request(0, proto::CMD_WRITE, 10, 4096, 4096, &[5u8; 4096]);
    assert_eq!(c.simple_reply(), (0, 10));
    c.request(0, proto::CMD_READ, 11, 4096, 4096, &[]);
    let (fl, kind, handle, payload) = c.chunk();
    assert_eq!(
        (fl, kind, handle),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 11)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 4096);
    assert_eq!(&payload[8..], &[5u8; 4096][..]);
    c.request(0, proto::CMD_READ, 12, 4 * MIB, 1, &[]);
    let (fl, kind, handle, payload) = c.chunk();
    assert_eq!(
        (fl, kind, handle),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 12)
    );
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        NbdErrno::Inval.code()
    );
    c.request(0, proto::CMD_WRITE, 13, 4 * MIB - 1, 2, &[1, 2]);
    let (_, kind, _, payload) = c.chunk();
    assert_eq!(kind, proto::REPLY_TYPE_ERROR);
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        NbdErrno::NoSpc.code()
    );
    c.request(0, proto::CMD_BLOCK_STATUS, 14, 0, 4096, &[]);
    assert_eq!(c.chunk().1, proto::REPLY_TYPE_ERROR);
    c.request(0, proto::CMD_READ, 15, 0, 0, &[]);
    assert_eq!(c.chunk().1, proto::REPLY_TYPE_NONE);
    c.request(proto::CMD_FLAG_FUA, proto::CMD_FLUSH, 16, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 16));
    c.request(0, proto::CMD_DISC, 17, 0, 0, &[]);
    c.assert_closed(CLOSE_WITHIN);
    assert_eq!(NbdStats::get(&server.stats().closed_protocol), 0);
    assert_eq!(NbdStats::get(&server.stats().ended_by_client), 1);
}

#[test]
fn hostile_requests_are_closed_and_others_keep_being_served() {
    let (_dir, vol, server) = hostile_fixture(NbdConfig::default());
    let before = read_all(&vol);
    // A write above the payload bound: closed before any payload is read.
    let mut c = Raw::connect(&server);
    c.greet(3);
    c.go("vol");
    c.request(0, proto::CMD_WRITE, 1, 0, proto::MAX_PAYLOAD + 1, &[]);
    c.assert_closed(CLOSE_WITHIN);
    // Garbage after the handshake.
    let mut c = Raw::connect(&server);
    c.greet(3);
    c.go("vol");
    c.s.write_all(&[0xa5; 64]).unwrap();
    c.assert_closed(CLOSE_WITHIN);
    // Old-style export name without zeroes, then a bad magic.
    let mut c = Raw::connect(&server);
    c.greet(3);
    c.send_option(proto::OPT_EXPORT_NAME, b"vol");
    assert_eq!(c.u64(), 4 * MIB);
    let _flags = c.read_n(2);
    c.request(0, proto::CMD_READ, 5, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 5));
    assert_eq!(c.read_n(4096), before[..4096]);
    c.s.write_all(&[0u8; 28]).unwrap();
    c.assert_closed(CLOSE_WITHIN);
    assert_eq!(NbdStats::get(&server.stats().closed_protocol), 3);
    assert_eq!(
        read_all(&vol),
        before,
        "a refused request changed the volume"
    );
    still_serves(&server);
}

#[test]
fn a_client_that_stalls_mid_request_is_timed_out() {
    let (_dir, _vol, server) = hostile_fixture(NbdConfig {
        request_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(1),
        ..NbdConfig::default()
    });
    // Half a request header, then silence.
    let mut mid = Raw::connect(&server);
    mid.greet(3);
    mid.go("vol");
    mid.s
        .write_all(&proto::REQUEST_MAGIC.to_be_bytes())
        .unwrap();
    mid.s.write_all(&[0u8; 10]).unwrap();
    // Half a handshake, then silence.
    let mut hs = Raw::connect(&server);
    hs.greet(3);
    hs.s.write_all(&proto::IHAVEOPT.to_be_bytes()).unwrap();
    // A write whose payload stops half way.
    let mut pay = Raw::connect(&server);
    pay.greet(3);
    pay.go("vol");
    pay.request(0, proto::CMD_WRITE, 1, 0, 8192, &[1u8; 4096]);
    // While they stall, others are served.
    still_serves(&server);
    let t = Instant::now();
    mid.assert_closed(CLOSE_WITHIN);
    hs.assert_closed(CLOSE_WITHIN);
    pay.assert_closed(CLOSE_WITHIN);
    assert!(t.elapsed() < CLOSE_WITHIN);
    assert_eq!(NbdStats::get(&server.stats().closed_timeout), 3);
}

#[test]
fn max_connections_and_stop_close_connections() {
    let (_dir, _vol, mut server) = hostile_fixture(NbdConfig {
        max_connections: 2,
        ..NbdConfig::default()
    });
    let mut a = Raw::connect(&server);
    a.greet(3);
    a.go("vol");
    let mut b = Raw::connect(&server);
    b.greet(3);
    let c = Raw::connect(&server);
    c.assert_closed(CLOSE_WITHIN);
    assert_eq!(NbdStats::get(&server.stats().closed_busy), 1);
    // An idle connection in transmission and one in negotiation both see the end at stop.
    let t = Instant::now();
    server.stop();
    assert!(t.elapsed() < CLOSE_WITHIN, "stop took {:?}", t.elapsed());
    a.assert_closed(CLOSE_WITHIN);
    b.assert_closed(CLOSE_WITHIN);
    assert_eq!(NbdStats::get(&server.stats().ended_other), 2);
    assert_eq!(server.stats().open.load(Ordering::SeqCst), 0);
    assert!(TcpStream::connect_timeout(&server.local_addr(), Duration::from_secs(1)).is_err());
}
