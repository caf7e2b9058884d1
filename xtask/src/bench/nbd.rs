//! The NBD frontend (`nbd_write`): `qemu-img convert` of a random raw image into an export of
//! the `server` crate's `NbdServer` over a `VolumeDevice` (an unreplicated volume), against the
//! same conversion into `qemu-nbd` serving a preallocated raw file in the same directory; and
//! `nbd_write_replicated`, the same conversion into a primary replicating to two replicas
//! under `sync_all`, as a ratio to the unreplicated export.
//!
//! Both servers run with the host page cache (qemu-nbd `--cache=writeback`; the volume's WAL
//! is a shared mapping and its extent is written with `pwrite`), both are reached over TCP on
//! loopback, and both see the same client: `qemu-img convert -n -t writeback`, whose final
//! flush is part of the time (the volume's durable LSN is checked to equal its head after
//! each conversion, so the flush did reach it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, Digest, OpenOptions, Volume};
use server::nbd::{
    BlockDevice, DeviceError, DeviceHook, NbdConfig, NbdServer, StaticExports, VolumeDevice,
};
use transport::stream::{DurabilityMode, Replicator};

use super::measure::{
    MIB, Metric, Target, fmt_num, interleaved, median, mib_per_s, repeated, spread,
};
use super::net::Streamed;
use super::store::plain_file;
use super::{Ctx, Shared};

/// The longest one conversion may take before the benchmark gives up.
const CONVERT_TIMEOUT: Duration = Duration::from_secs(300);

/// A child process killed (and reaped) when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> Result<&'static str, String> {
    let path = match name {
        "qemu-img" => "/usr/bin/qemu-img",
        "qemu-nbd" => "/usr/bin/qemu-nbd",
        _ => return Err(format!("unknown tool {name}")),
    };
    if Path::new(path).is_file() {
        Ok(path)
    } else {
        Err(format!("{path} is missing: nbd_write needs qemu-utils"))
    }
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible and without zero runs, so
/// qemu-img writes every byte.
fn random_image(path: &Path, len: u64) -> Result<Vec<u8>, String> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len as usize);
    std::fs::write(path, &v).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(v)
}

/// `qemu-img convert -n -t writeback -f raw -O raw SRC URI`, timed.
fn convert(src: &Path, uri: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = Guard(
        Command::new(tool("qemu-img")?)
            .args(["convert", "-n", "-t", "writeback", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn qemu-img: {e}"))?,
    );
    // Bounded by CONVERT_TIMEOUT; the child is killed on the way out if it overran.
    let status = loop {
        if let Some(s) = child.0.try_wait().map_err(|e| format!("wait: {e}"))? {
            break s;
        }
        if t.elapsed() > CONVERT_TIMEOUT {
            return Err(format!(
                "qemu-img convert into {uri} took over {CONVERT_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = t.elapsed();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!("qemu-img convert into {uri}: {status}: {err}"));
    }
    Ok(took)
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| format!("addr: {e}"))?.port())
}

/// `qemu-nbd` serving `file` as export `img` on a loopback port, once it accepts connections.
fn qemu_nbd(file: &Path) -> Result<(Guard, String), String> {
    let port = free_port()?;
    let child = Guard(
        Command::new(tool("qemu-nbd")?)
            .args([
                "-f",
                "raw",
                "--persistent",
                "--cache=writeback",
                "--aio=threads",
            ])
            .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-x", "img"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn qemu-nbd: {e}"))?,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // At most 500 attempts 10 ms apart.
    for _ in 0..500 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok((child, format!("nbd://127.0.0.1:{port}/img")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("qemu-nbd did not start listening within 5 s".into())
}

/// A device that does nothing: the NBD path's own cost (sockets, parsing, one request at a
/// time) with no storage under it.
struct NullDevice(u64);

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        self.0
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// `NbdServer` on a loopback port serving `device` as `img`; returns the server and its URI.
fn our_server(device: Arc<dyn BlockDevice>) -> Result<(NbdServer, String), String> {
    let server = NbdServer::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        NbdConfig::default(),
        Arc::new(StaticExports::new().with("img", device)),
    )
    .map_err(|e| e.to_string())?;
    let uri = format!("nbd://127.0.0.1:{}/img", server.local_addr().port());
    Ok((server, uri))
}

/// A new unreplicated volume (role none, background flusher) of `size` bytes with a WAL of
/// `wal` bytes.
fn subject_volume(path: &Path, size: u64, wal: u64) -> Result<Arc<Volume>, String> {
    Volume::create(
        path,
        &CreateOptions::new(size, wal),
        &OpenOptions::default(),
    )
    .map(Arc::new)
    .map_err(|e| format!("create {}: {e}", path.display()))
}

/// One timed conversion into `vol` behind `uri` (MiB/s). Afterwards, untimed, the volume's
/// durable LSN must equal its head (qemu-img's final flush arrived), and the flusher is
/// drained into the extent so the next round (of either side) starts on a quiet disk.
fn convert_into_volume(src: &Path, uri: &str, vol: &Volume, size: u64) -> Result<f64, String> {
    let d = convert(src, uri)?;
    let st = vol.status();
    if st.durable != st.head {
        return Err(format!(
            "after qemu-img convert the volume is durable at {} of {}: no flush arrived",
            st.durable, st.head
        ));
    }
    vol.force_flush().map_err(|e| format!("drain: {e}"))?;
    Ok(mib_per_s(size, d))
}

/// The physical reference for a conversion of `src` (`size` bytes): the same conversion into
/// `qemu-nbd` serving a preallocated raw file, `repeated` (MiB/s samples).
fn qemu_nbd_reference(ctx: &Ctx, src: &Path, size: u64) -> Result<Vec<f64>, String> {
    let raw = ctx.scratch.path("nbd_reference.raw");
    drop(plain_file(&raw, size)?);
    let (qemu, uri) = qemu_nbd(&raw)?;
    let r = repeated(ctx.plan(), || Ok(mib_per_s(size, convert(src, &uri)?)));
    drop(qemu);
    let _ = std::fs::remove_file(&raw);
    r
}

pub fn nbd_write(ctx: &Ctx, shared: &mut Shared) -> Result<Metric, String> {
    let size = ctx.size(256 * MIB, 16 * MIB);
    // The reference implementation's default WAL: four times smaller than the image, so the
    // WAL recycles during the conversion and the flusher's copy into the extent is paid for
    // inside the measurement.
    let wal = ctx.size(64 * MIB, 8 * MIB);
    let src = ctx.scratch.path("nbd_source.raw");
    let data = random_image(&src, size)?;
    let want = Digest::of_image(&data);

    // The baseline: qemu-nbd on a preallocated raw file.
    let raw = ctx.scratch.path("nbd_baseline.raw");
    drop(plain_file(&raw, size)?);
    let (qemu, qemu_uri) = qemu_nbd(&raw)?;

    // The subject: NbdServer over a VolumeDevice.
    let vpath = ctx.scratch.path("nbd_subject.vol");
    let vol = subject_volume(&vpath, size, wal)?;
    let (server, ours) = our_server(Arc::new(VolumeDevice::new(Arc::clone(&vol))))?;
    let (base, subject) = interleaved(
        ctx.plan(),
        || Ok(mib_per_s(size, convert(&src, &qemu_uri)?)),
        || convert_into_volume(&src, &ours, &vol, size),
    )?;
    let requests = server.stats().requests.load(Ordering::SeqCst);
    drop(server);
    let got = vol.digest().map_err(|e| format!("digest: {e}"))?;
    if got != want {
        return Err(format!(
            "the volume's digest {got} is not the image's {want}"
        ));
    }
    drop(vol);
    let _ = std::fs::remove_file(&vpath);
    drop(qemu);
    let back = std::fs::read(&raw).map_err(|e| format!("read {}: {e}", raw.display()))?;
    if back != data {
        return Err("qemu-nbd's file differs from the image".into());
    }
    let _ = std::fs::remove_file(&raw);

    // Context for the detail line (why the ratio is what it is): the same conversion into a
    // volume whose WAL holds the whole image (the flusher's second write is no longer on the
    // critical path), and into a device that stores nothing (the NBD path alone).
    let bpath = ctx.scratch.path("nbd_burst.vol");
    let burst_vol = subject_volume(&bpath, size, 2 * size)?;
    let (burst_server, burst_uri) =
        our_server(Arc::new(VolumeDevice::new(Arc::clone(&burst_vol))))?;
    let burst = repeated(ctx.plan(), || {
        convert_into_volume(&src, &burst_uri, &burst_vol, size)
    })?;
    drop(burst_server);
    if burst_vol.digest().map_err(|e| format!("digest: {e}"))? != want {
        return Err("the burst volume differs from the image".into());
    }
    drop(burst_vol);
    let _ = std::fs::remove_file(&bpath);
    let (null_server, null_uri) = our_server(Arc::new(NullDevice(size)))?;
    let null = repeated(ctx.plan(), || {
        Ok(mib_per_s(size, convert(&src, &null_uri)?))
    })?;
    drop(null_server);
    let _ = std::fs::remove_file(&src);

    let (b, s) = (median(&base), median(&subject));
    shared.qemu_nbd_mib_s = Some(b);
    Ok(Metric {
        name: "nbd_write",
        unit: "MiB/s",
        value: s,
        baseline: Some(b),
        ratio: s / b,
        target: Target::AtLeast(0.8),
        ceiling: Some(b),
        ceiling_what: "the baseline itself (qemu-nbd serving a plain raw file)".into(),
        latency_us: None,
        what: format!(
            "qemu-img convert -n -t writeback of a {} MiB random raw image into NbdServer \
             (nbd://127.0.0.1, TCP) over a VolumeDevice on an unreplicated volume ({} MiB WAL, \
             background flusher), including the final flush (the volume's durable LSN equals \
             its head afterwards; the flusher is drained between rounds, untimed)",
            size / MIB,
            wal / MIB
        ),
        baseline_what: "the same conversion into qemu-nbd -f raw --cache=writeback \
                        --aio=threads serving a preallocated raw file in the same directory \
                        (TCP on loopback; both sides write through the page cache and make \
                        the data durable at the final flush)"
            .into(),
        detail: format!(
            "{} MiB: ours {} MiB/s ({}), qemu-nbd {} MiB/s ({}), ratio {}; {} NBD requests \
             served; both images checked byte-equal to the source. Context: into a volume \
             whose WAL holds the whole image ({} MiB) {} MiB/s ({}), ratio {}; into a device \
             that stores nothing (the NBD path alone) {} MiB/s ({})",
            size / MIB,
            fmt_num(s),
            spread(&subject),
            fmt_num(b),
            spread(&base),
            fmt_num(s / b),
            requests,
            2 * size / MIB,
            fmt_num(median(&burst)),
            spread(&burst),
            fmt_num(median(&burst) / b),
            fmt_num(median(&null)),
            spread(&null),
        ),
    })
}

/// A primary's volume as an NBD device the way the volume server serves it: a flush is the
/// replicator's (the durability mode's proof), and writes wake the shippers.
struct ReplicatedDevice {
    inner: VolumeDevice,
    replicator: Arc<Replicator>,
}

impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let r = self.inner.write(offset, data, fua);
        self.replicator.notify();
        r
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let r = self.inner.trim(offset, len);
        self.replicator.notify();
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        let r = self.inner.write_zeroes(offset, len, fua);
        self.replicator.notify();
        r
    }
}

pub fn nbd_write_replicated(ctx: &Ctx, shared: &mut Shared) -> Result<Metric, String> {
    let size = ctx.size(256 * MIB, 16 * MIB);
    let wal = ctx.size(64 * MIB, 8 * MIB);
    let src = ctx.scratch.path("nbdr_source.raw");
    let data = random_image(&src, size)?;
    let want = Digest::of_image(&data);

    // The reference: the unreplicated export of `nbd_write`.
    let vpath = ctx.scratch.path("nbdr_single.vol");
    let single = subject_volume(&vpath, size, wal)?;
    let (single_server, single_uri) = our_server(Arc::new(VolumeDevice::new(Arc::clone(&single))))?;

    // The subject: a primary streaming to two replicas (replica servers over loopback TCP)
    // under sync_all; every flush returns only once all three copies are durable.
    let cluster = Streamed::new(ctx, "nbdr", size, wal)?;
    let replicator = Arc::new(cluster.replicator(DurabilityMode::SyncAll)?);
    let r = Arc::clone(&replicator);
    let flush: DeviceHook = Arc::new(move || {
        r.flush()
            .map(|_| ())
            .map_err(|e| DeviceError::Io(e.to_string()))
    });
    let device = ReplicatedDevice {
        inner: VolumeDevice::with_flush(Arc::clone(&cluster.primary), flush),
        replicator: Arc::clone(&replicator),
    };
    let (repl_server, repl_uri) = our_server(Arc::new(device))?;
    // The committer the volume server runs for each primary: under FlushGate::Committed the
    // primary's flusher may only copy what a flush committed, so without periodic flushes a
    // client that flushes only at the end would fill the WAL.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = {
        let (r, stop) = (Arc::clone(&replicator), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = r.flush();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let primary = Arc::clone(&cluster.primary);
    let (base, subject) = interleaved(
        ctx.plan(),
        || convert_into_volume(&src, &single_uri, &single, size),
        || {
            let speed = convert_into_volume(&src, &repl_uri, &primary, size)?;
            // Untimed: the replicas drain too, so the next round starts on a quiet disk.
            for rep in &cluster.replicas {
                rep.force_flush()
                    .map_err(|e| format!("drain a replica: {e}"))?;
            }
            Ok(speed)
        },
    )?;
    drop(single_server);
    drop(repl_server);
    stop.store(true, Ordering::SeqCst);
    let _ = committer.join();
    let status = replicator.status();
    replicator.stop();
    for (what, vol) in std::iter::once(("the unreplicated volume", &single))
        .chain(std::iter::once(("the primary", &cluster.primary)))
        .chain(cluster.replicas.iter().map(|r| ("a replica", r)))
    {
        let got = vol.digest().map_err(|e| format!("digest: {e}"))?;
        if got != want {
            return Err(format!("{what}'s digest {got} is not the image's {want}"));
        }
    }
    drop(single);
    let _ = std::fs::remove_file(&vpath);
    drop(primary);
    cluster.cleanup();
    // The physical ceiling: one copy through qemu-nbd into a raw file (nbd_write's baseline
    // when it ran in this run, otherwise measured here).
    let qemu = match shared.qemu_nbd_mib_s {
        Some(q) => q,
        None => {
            let q = median(&qemu_nbd_reference(ctx, &src, size)?);
            shared.qemu_nbd_mib_s = Some(q);
            q
        }
    };
    let _ = std::fs::remove_file(&src);
    let barriers: u64 = status.iter().map(|s| s.barriers).sum();
    let streamed: u64 = status.iter().map(|s| s.streamed).sum();

    let (b, s) = (median(&base), median(&subject));
    Ok(Metric {
        name: "nbd_write_replicated",
        unit: "MiB/s",
        value: s,
        baseline: Some(b),
        ratio: s / b,
        // Three copies of every byte on one disk (the primary's and two replicas' WAL and
        // extent writes): a third of the unreplicated run is what this machine allows.
        target: Target::AtLeast(0.3),
        ceiling: Some(qemu),
        ceiling_what: "the same conversion into qemu-nbd serving one plain raw file (one copy \
                       where this row writes three; nbd_write's baseline when it ran)"
            .into(),
        latency_us: None,
        what: format!(
            "the nbd_write conversion ({} MiB image, {} MiB WALs) into a primary streaming \
             to two replicas (replica servers on loopback TCP, same disk) under sync_all, \
             the final flush acknowledged only once all three copies are durable",
            size / MIB,
            wal / MIB
        ),
        baseline_what: "the same conversion into the unreplicated export of nbd_write, \
                        interleaved in the same run"
            .into(),
        detail: format!(
            "replicated {} MiB/s ({}), unreplicated {} MiB/s ({}), ratio {}; {streamed} \
             entries streamed and {barriers} barriers over both replicas; the primary, both \
             replicas and the unreplicated volume checked byte-equal to the source",
            fmt_num(s),
            spread(&subject),
            fmt_num(b),
            spread(&base),
            fmt_num(s / b),
        ),
    })
}
