//! Measurements of the volume file alone: appends, durable writes, reads, scans, recovery.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, Lba, Lsn, OpenOptions, Volume};

use hdrhistogram::Histogram;

use super::measure::{
    MIB, Metric, Target, fmt_num, histogram, interleaved, latency, median, mib_per_s, ms, record,
    spread, timed,
};
use super::{Ctx, Shared, raw};

pub const BS: usize = 4096;
/// Bytes one 4 KiB write entry takes in the ring (64-byte header + payload, 8-aligned).
pub const ENTRY_BYTES: u64 = 64 + BS as u64;

/// A deterministic, non-zero, non-repeating 4 KiB block for `(lba, version)`.
pub fn block(lba: u64, version: u64, out: &mut [u8]) {
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x |= 1;
    for c in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&(x | 1).to_le_bytes());
    }
}

/// A source buffer of `blocks` distinct blocks, cycled through by the append loops (both
/// sides of a ratio copy exactly these bytes).
pub fn source(blocks: usize) -> Vec<u8> {
    let mut v = vec![0u8; blocks * BS];
    for (i, c) in v.chunks_exact_mut(BS).enumerate() {
        block(i as u64, 7, c);
    }
    v
}

/// WAL bytes that hold `entries` 4 KiB entries with room to spare (page-aligned).
pub fn wal_for(entries: u64) -> u64 {
    let raw = entries * ENTRY_BYTES + 2 * MIB;
    raw.div_ceil(4096) * 4096
}

/// Creates a volume with the manual flusher (no background thread, nothing moves unless the
/// benchmark asks).
pub fn create(path: &Path, volume_bytes: u64, wal_bytes: u64) -> Result<Volume, String> {
    Volume::create(
        path,
        &CreateOptions::new(volume_bytes, wal_bytes),
        &OpenOptions::manual(),
    )
    .map_err(|e| format!("create {}: {e}", path.display()))
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// A new, preallocated plain file (as a volume file is preallocated).
pub fn plain_file(path: &Path, len: u64) -> Result<File, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    raw::preallocate(&f, len).map_err(|e| format!("fallocate {}: {e}", path.display()))?;
    Ok(f)
}

/// A deterministic generator for random block addresses (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- wal_append ---------------------------------------------------------------------------

/// `total` bytes of 4 KiB writes at sequential LBAs into a new volume, no sync. MiB/s.
fn append_volume(ctx: &Ctx, total: u64, src: &[u8]) -> Result<f64, String> {
    let n = total / BS as u64;
    let path = ctx.scratch.path("wal_append.vol");
    let vol = create(&path, total, wal_for(n))?;
    let src_blocks = (src.len() / BS) as u64;
    let (d, ()) = timed(|| {
        for i in 0..n {
            let s = ((i % src_blocks) as usize) * BS;
            vol.write(Lba(i), &src[s..s + BS])
                .map_err(|e| format!("write {i}: {e}"))?;
        }
        Ok(())
    })?;
    drop(vol);
    remove(&path);
    Ok(mib_per_s(total, d))
}

/// The same bytes copied 4 KiB at a time into a shared mmap of a new preallocated file of
/// the same size. MiB/s.
fn append_mmap(ctx: &Ctx, total: u64, src: &[u8]) -> Result<f64, String> {
    let path = ctx.scratch.path("wal_append.base");
    let f = plain_file(&path, total)?;
    let mut map = raw::map_shared(&f, total as usize).map_err(|e| format!("mmap: {e}"))?;
    let src_blocks = src.len() / BS;
    let n = total as usize / BS;
    let (d, ()) = timed(|| {
        for i in 0..n {
            let s = (i % src_blocks) * BS;
            map[i * BS..(i + 1) * BS].copy_from_slice(&src[s..s + BS]);
        }
        Ok(())
    })?;
    drop(map);
    drop(f);
    remove(&path);
    Ok(mib_per_s(total, d))
}

pub fn wal_append(ctx: &Ctx, shared: &mut Shared) -> Result<Metric, String> {
    let total = ctx.size(256 * MIB, 16 * MIB);
    let src = source(1024);
    let (b, s) = interleaved(
        ctx.plan(),
        || append_mmap(ctx, total, &src),
        || append_volume(ctx, total, &src),
    )?;
    let (bm, sm) = (median(&b), median(&s));
    shared.wal_append_mib_s = Some(sm);
    Ok(Metric {
        name: "wal_append",
        unit: "MiB/s",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtLeast(0.5),
        ceiling: None,
        ceiling_what: String::new(),
        latency_us: None,
        what: format!(
            "Volume::write of {} MiB as 4 KiB writes at sequential LBAs into a new volume \
             (manual flusher), no sync",
            total / MIB
        ),
        baseline_what: "the same bytes copied 4 KiB at a time into a shared mmap of a new \
                        preallocated (posix_fallocate) file of the same size, no sync"
            .into(),
        detail: format!(
            "{} reps (median); volume {} MiB/s, mmap memcpy {} MiB/s",
            s.len(),
            spread(&s),
            spread(&b)
        ),
    })
}

// ---- durable_1 / durable_16 ---------------------------------------------------------------

/// `ops` pwrite + fdatasync of 4 KiB at sequential offsets of a new preallocated file. ops/s.
fn durable_plain(ctx: &Ctx, ops: u64, src: &[u8]) -> Result<f64, String> {
    let path = ctx.scratch.path("durable.base");
    let f = plain_file(&path, ops * BS as u64)?;
    let src_blocks = (src.len() / BS) as u64;
    let (d, ()) = timed(|| {
        for i in 0..ops {
            let s = ((i % src_blocks) as usize) * BS;
            f.write_all_at(&src[s..s + BS], i * BS as u64)
                .map_err(|e| format!("pwrite: {e}"))?;
            f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        }
        Ok(())
    })?;
    drop(f);
    remove(&path);
    Ok(ops as f64 / d.as_secs_f64())
}

/// The disk's ceiling for group commit: `ops` x pwrite 4 KiB on a plain preallocated file,
/// with one fdatasync per `batch` writes (contiguous), no threads, no other work. ops/s.
fn durable_plain_batched(ctx: &Ctx, ops: u64, batch: u64, src: &[u8]) -> Result<f64, String> {
    let path = ctx.scratch.path("durable.batched");
    let f = plain_file(&path, ops * BS as u64)?;
    let src_blocks = (src.len() / BS) as u64;
    let (d, ()) = timed(|| {
        for i in 0..ops {
            let s = ((i % src_blocks) as usize) * BS;
            f.write_all_at(&src[s..s + BS], i * BS as u64)
                .map_err(|e| format!("pwrite: {e}"))?;
            if (i + 1) % batch == 0 || i + 1 == ops {
                f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
            }
        }
        Ok(())
    })?;
    drop(f);
    remove(&path);
    Ok(ops as f64 / d.as_secs_f64())
}

/// The coordination reference for group commit: `writers` threads on a plain file, each
/// `ops / writers` times a 4 KiB pwrite at its own offset, then the simplest correct group
/// commit (a mutex and a condition variable: the first waiter to find no fdatasync running
/// runs one for every write completed so far, the others wait for it). What 16 threads that
/// each wait for their own write cost on this machine's cores, with nothing of a store; ops/s.
fn durable_plain_grouped(ctx: &Ctx, ops: u64, writers: u64, src: &[u8]) -> Result<f64, String> {
    struct Commit {
        /// Writes completed (each knows its number).
        written: u64,
        /// Writes an fdatasync covered.
        durable: u64,
        syncing: bool,
    }
    let path = ctx.scratch.path("durable.grouped");
    let f = plain_file(&path, ops * BS as u64)?;
    let per = ops / writers;
    let src_blocks = (src.len() / BS) as u64;
    let state = std::sync::Mutex::new(Commit {
        written: 0,
        durable: 0,
        syncing: false,
    });
    let cond = std::sync::Condvar::new();
    let start = Barrier::new(writers as usize + 1);
    let d = std::thread::scope(|sc| -> Result<Duration, String> {
        let mut hs = Vec::new();
        for w in 0..writers {
            let (f, state, cond, start) = (&f, &state, &cond, &start);
            hs.push(sc.spawn(move || -> Result<(), String> {
                start.wait();
                for i in 0..per {
                    let n = w * per + i;
                    let s = ((n % src_blocks) as usize) * BS;
                    f.write_all_at(&src[s..s + BS], n * BS as u64)
                        .map_err(|e| format!("pwrite: {e}"))?;
                    let mut st = state.lock().map_err(|_| "poisoned")?;
                    st.written += 1;
                    let mine = st.written;
                    while st.durable < mine {
                        if st.syncing {
                            st = cond.wait(st).map_err(|_| "poisoned")?;
                            continue;
                        }
                        st.syncing = true;
                        let to = st.written;
                        drop(st);
                        let r = f.sync_data();
                        st = state.lock().map_err(|_| "poisoned")?;
                        st.syncing = false;
                        st.durable = st.durable.max(to);
                        cond.notify_all();
                        r.map_err(|e| format!("fdatasync: {e}"))?;
                    }
                }
                Ok(())
            }));
        }
        start.wait();
        let t = Instant::now();
        for h in hs {
            h.join().map_err(|_| "writer panicked".to_owned())??;
        }
        Ok(t.elapsed())
    })?;
    drop(f);
    remove(&path);
    Ok(ops as f64 / d.as_secs_f64())
}

/// `writers` threads, each `ops / writers` times Volume::write of 4 KiB then Volume::sync,
/// on a new volume. ops/s, and each write+sync's latency (the writers' histograms merged).
fn durable_volume(
    ctx: &Ctx,
    ops: u64,
    writers: u64,
    src: &[u8],
) -> Result<(f64, Histogram<u64>), String> {
    let path = ctx.scratch.path("durable.vol");
    let vol = Arc::new(create(&path, ops * BS as u64, wal_for(ops))?);
    let per = ops / writers;
    let src_blocks = (src.len() / BS) as u64;
    let start = Arc::new(Barrier::new(writers as usize + 1));
    let (d, lat) = std::thread::scope(|sc| -> Result<(Duration, Histogram<u64>), String> {
        let mut hs = Vec::new();
        for w in 0..writers {
            let vol = Arc::clone(&vol);
            let start = Arc::clone(&start);
            hs.push(sc.spawn(move || -> Result<Histogram<u64>, String> {
                let mut lat = histogram();
                start.wait();
                for i in 0..per {
                    let lba = w * per + i;
                    let s = ((lba % src_blocks) as usize) * BS;
                    let t = Instant::now();
                    vol.write(Lba(lba), &src[s..s + BS])
                        .map_err(|e| format!("write {lba}: {e}"))?;
                    vol.sync().map_err(|e| format!("sync: {e}"))?;
                    record(&mut lat, t.elapsed());
                }
                Ok(lat)
            }));
        }
        start.wait();
        let t = Instant::now();
        let mut all = histogram();
        for h in hs {
            let lat = h.join().map_err(|_| "writer panicked".to_string())??;
            all.add(&lat)
                .map_err(|e| format!("merge latencies: {e:?}"))?;
        }
        Ok((t.elapsed(), all))
    })?;
    drop(vol);
    remove(&path);
    Ok(((per * writers) as f64 / d.as_secs_f64(), lat))
}

/// Runs `durable_volume` as the subject of an interleaved measurement and keeps the latency
/// histograms of the recorded rounds (not the warm-up's).
fn durable_subject<'a>(
    ctx: &'a Ctx,
    ops: u64,
    writers: u64,
    src: &'a [u8],
    lats: &'a mut Vec<Histogram<u64>>,
) -> impl FnMut() -> Result<f64, String> + 'a {
    let mut round = 0usize;
    let warmup = ctx.plan().warmup;
    move || {
        let (rate, lat) = durable_volume(ctx, ops, writers, src)?;
        if round >= warmup {
            lats.push(lat);
        }
        round += 1;
        Ok(rate)
    }
}

pub fn durable_1(ctx: &Ctx) -> Result<Metric, String> {
    let ops = ctx.size(1000, 50);
    let src = source(256);
    let mut lats = Vec::new();
    let (b, s) = interleaved(
        ctx.plan(),
        || durable_plain(ctx, ops, &src),
        durable_subject(ctx, ops, 1, &src, &mut lats),
    )?;
    let (bm, sm) = (median(&b), median(&s));
    let lat = latency(&lats);
    Ok(Metric {
        name: "durable_1",
        // The baseline is the disk's own: one pwrite and one fdatasync per write.
        ceiling: Some(bm),
        ceiling_what: "the baseline itself (pwrite + fdatasync per 4 KiB on a plain file)".into(),
        latency_us: lat,
        unit: "ops/s",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtLeast(0.8),
        what: format!(
            "1 writer, {ops} x (Volume::write 4 KiB at the next LBA, then Volume::sync) on a \
             new volume"
        ),
        baseline_what: format!(
            "{ops} x (pwrite 4 KiB at the next offset, then fdatasync) on a new preallocated \
             plain file in the same directory"
        ),
        detail: format!(
            "{} reps (median); volume {} ops/s, plain {} ops/s; {}",
            s.len(),
            spread(&s),
            spread(&b),
            lat.map_or_else(
                || "no latency recorded".into(),
                |l| l.describe("write+sync")
            )
        ),
    })
}

pub fn durable_16(ctx: &Ctx) -> Result<Metric, String> {
    let writers = 16;
    let ops = ctx.size(4000, 160);
    let base_ops = ctx.size(1000, 50);
    let src = source(256);
    let mut lats = Vec::new();
    let (b, s) = interleaved(
        ctx.plan(),
        || durable_plain(ctx, base_ops, &src),
        durable_subject(ctx, ops, writers, &src, &mut lats),
    )?;
    let lat = latency(&lats);
    let (bm, sm) = (median(&b), median(&s));
    // The physical reference: with every writer's 4 KiB batched into one fdatasync, and no
    // coordination at all, the disk itself allows this many ops/s. Group commit cannot beat it.
    let mut ceiling = Vec::new();
    for _ in 0..ctx.size(3, 1) {
        ceiling.push(durable_plain_batched(ctx, ops, writers, &src)?);
    }
    let cm = median(&ceiling);
    let mut grouped = Vec::new();
    for _ in 0..ctx.size(3, 1) {
        grouped.push(durable_plain_grouped(ctx, ops, writers, &src)?);
    }
    let gm = median(&grouped);
    Ok(Metric {
        name: "durable_16",
        unit: "ops/s",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        // Group commit against what the disk allows for the same batching (issue 14).
        target: Target::CeilingAtLeast(0.6),
        ceiling: Some(cm),
        ceiling_what: format!(
            "the same writes on a plain file, {writers} per fdatasync, one thread (group \
             commit's disk ceiling)"
        ),
        latency_us: lat,
        what: format!(
            "{writers} writer threads, {} x (Volume::write 4 KiB, then Volume::sync) each, \
             on one new volume (group commit)",
            ops / writers
        ),
        baseline_what: format!(
            "the naive 1-writer loop: {base_ops} x (pwrite 4 KiB, then fdatasync) on a new \
             preallocated plain file"
        ),
        detail: format!(
            "{} reps (median); volume {} ops/s, plain {} ops/s; physical reference (the same \
             writes on a plain file, {writers} per fdatasync, one thread, no coordination): \
             {cm:.0} ops/s, i.e. at most {:.2} of the baseline; coordination reference (the \
             same {writers} threads on a plain file, each pwrite then the simplest group commit, \
             mutex + condition variable + one fdatasync per group): {} ops/s, {:.2} of the \
             physical reference, and this row is {:.2} of it; {}",
            s.len(),
            spread(&s),
            spread(&b),
            cm / bm,
            spread(&grouped),
            gm / cm,
            sm / gm,
            lat.map_or_else(
                || "no latency recorded".into(),
                |l| l.describe("write+sync")
            )
        ),
    })
}

// ---- read_random --------------------------------------------------------------------------

pub fn read_random(ctx: &Ctx) -> Result<Metric, String> {
    let blocks: u64 = ctx.size(16384, 2048);
    let reads: u64 = ctx.size(200_000, 5_000);
    let path = ctx.scratch.path("read_random.vol");
    let vol = create(&path, blocks * BS as u64, wal_for(blocks + blocks / 2))?;
    let mut buf = vec![0u8; BS];
    // Every block at version 1, flushed into the extent ...
    for lba in 0..blocks {
        block(lba, 1, &mut buf);
        vol.write(Lba(lba), &buf)
            .map_err(|e| format!("write: {e}"))?;
    }
    vol.force_flush().map_err(|e| format!("flush: {e}"))?;
    // ... then a random half rewritten at version 2, synced but not flushed: those reads are
    // served from the WAL through the dirty map.
    let mut dirty = vec![false; blocks as usize];
    let mut rng = Rng::new(42);
    let mut n_dirty = 0;
    while n_dirty < blocks / 2 {
        let lba = rng.below(blocks);
        if !dirty[lba as usize] {
            dirty[lba as usize] = true;
            n_dirty += 1;
        }
    }
    for lba in 0..blocks {
        if dirty[lba as usize] {
            block(lba, 2, &mut buf);
            vol.write(Lba(lba), &buf)
                .map_err(|e| format!("write: {e}"))?;
        }
    }
    vol.sync().map_err(|e| format!("sync: {e}"))?;
    // The plain file holds the same logical image.
    let bpath = ctx.scratch.path("read_random.base");
    let plain = plain_file(&bpath, blocks * BS as u64)?;
    for lba in 0..blocks {
        block(lba, if dirty[lba as usize] { 2 } else { 1 }, &mut buf);
        plain
            .write_all_at(&buf, lba * BS as u64)
            .map_err(|e| format!("pwrite: {e}"))?;
    }
    plain.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    let lbas: Vec<u64> = {
        let mut r = Rng::new(7);
        (0..reads).map(|_| r.below(blocks)).collect()
    };
    let mut fold_v = 0u64;
    let mut fold_b = 0u64;
    let (b, s) = interleaved(
        ctx.plan(),
        || {
            let mut buf = vec![0u8; BS];
            let mut fold = 0u64;
            let (d, ()) = timed(|| {
                for &lba in &lbas {
                    plain
                        .read_exact_at(&mut buf, lba * BS as u64)
                        .map_err(|e| format!("pread: {e}"))?;
                    fold = fold
                        .wrapping_add(u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()));
                }
                Ok(())
            })?;
            fold_b = fold;
            Ok(reads as f64 / d.as_secs_f64())
        },
        || {
            let mut buf = vec![0u8; BS];
            let mut fold = 0u64;
            let (d, ()) = timed(|| {
                for &lba in &lbas {
                    vol.read_into(Lba(lba), &mut buf)
                        .map_err(|e| format!("read {lba}: {e}"))?;
                    fold = fold
                        .wrapping_add(u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()));
                }
                Ok(())
            })?;
            fold_v = fold;
            Ok(reads as f64 / d.as_secs_f64())
        },
    )?;
    if fold_v != fold_b {
        return Err("read_random: the volume and the plain file returned different bytes".into());
    }
    let hits = lbas.iter().filter(|l| dirty[**l as usize]).count();
    drop(vol);
    drop(plain);
    remove(&path);
    remove(&bpath);
    let (bm, sm) = (median(&b), median(&s));
    Ok(Metric {
        name: "read_random",
        unit: "reads/s",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtLeast(0.7),
        ceiling: Some(bm),
        ceiling_what: "the baseline itself (pread of the same blocks from a plain file in the \
                       page cache)"
            .into(),
        latency_us: None,
        what: format!(
            "{reads} Volume::read_into of one 4 KiB block at random LBAs of a {} MiB volume whose \
             blocks are half in the dirty map (synced WAL, not flushed) and half in the extent",
            blocks * BS as u64 / MIB
        ),
        baseline_what: "pread of 4 KiB at the same offsets, in the same order, of a plain file \
                        holding the same image (both files in the page cache)"
            .into(),
        detail: format!(
            "{} reps (median); {:.1}% of reads hit the dirty map; volume {} reads/s, pread {} \
             reads/s; both sides returned the same bytes",
            s.len(),
            100.0 * hits as f64 / reads as f64,
            spread(&s),
            spread(&b)
        ),
    })
}

// ---- scan_independent_of_wal --------------------------------------------------------------

/// A volume whose WAL retains `history` bytes of 4 KiB entries (nothing flushed), synced.
fn history_volume(
    ctx: &Ctx,
    name: &str,
    history: u64,
    src: &[u8],
) -> Result<(Volume, std::path::PathBuf), String> {
    let n = history / BS as u64;
    let blocks = 16384u64;
    let path = ctx.scratch.path(name);
    let vol = create(&path, blocks * BS as u64, wal_for(n))?;
    let src_blocks = (src.len() / BS) as u64;
    for i in 0..n {
        let s = ((i % src_blocks) as usize) * BS;
        vol.write(Lba(i % blocks), &src[s..s + BS])
            .map_err(|e| format!("write: {e}"))?;
    }
    vol.sync().map_err(|e| format!("sync: {e}"))?;
    Ok((vol, path))
}

/// Scans the newest `gap` entries `rounds` times; ms per scan.
fn scan_gap(vol: &Volume, gap: u64, rounds: u32) -> Result<f64, String> {
    let head = vol.status().head.0;
    let (d, ()) = timed(|| {
        for _ in 0..rounds {
            let scan = vol
                .scan_from(Lsn(head - gap + 1))
                .map_err(|e| format!("scan: {e}"))?;
            let mut n = 0u64;
            for item in scan {
                let e = item.map_err(|e| format!("scan item: {e}"))?;
                std::hint::black_box(&e);
                n += 1;
            }
            if n != gap {
                return Err(format!("scan yielded {n} entries, expected {gap}"));
            }
        }
        Ok(())
    })?;
    Ok(ms(d) / f64::from(rounds))
}

pub fn scan_independent_of_wal(ctx: &Ctx) -> Result<Metric, String> {
    let small = ctx.size(16 * MIB, 4 * MIB);
    let large = ctx.size(1024 * MIB, 64 * MIB);
    let gap = 1000u64;
    let rounds = ctx.size(20, 2);
    let src = source(1024);
    let (vs, ps) = history_volume(ctx, "scan_small.vol", small, &src)?;
    let (vl, pl) = history_volume(ctx, "scan_large.vol", large, &src)?;
    let (b, s) = interleaved(
        ctx.plan(),
        || scan_gap(&vs, gap, rounds),
        || scan_gap(&vl, gap, rounds),
    )?;
    let (rs, rl) = (vs.status(), vl.status());
    drop(vs);
    drop(vl);
    remove(&ps);
    remove(&pl);
    let (bm, sm) = (median(&b), median(&s));
    Ok(Metric {
        name: "scan_independent_of_wal",
        unit: "ms",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtMost(1.2),
        ceiling: None,
        ceiling_what: String::new(),
        latency_us: None,
        what: format!(
            "Volume::scan_from over the newest {gap} entries (4 KiB writes), fully iterated, \
             with {} MiB of history retained ({} entries)",
            large / MIB,
            rl.head.0 - rl.tail.0
        ),
        baseline_what: format!(
            "the same scan with {} MiB of history retained ({} entries)",
            small / MIB,
            rs.head.0 - rs.tail.0
        ),
        detail: format!(
            "{} reps (median) of {rounds} scans each; large {} ms, small {} ms per scan",
            s.len(),
            spread(&s),
            spread(&b)
        ),
    })
}

// ---- open_recovery ------------------------------------------------------------------------

pub fn open_recovery(ctx: &Ctx) -> Result<Metric, String> {
    let wal = ctx.size(64 * MIB, 8 * MIB);
    let blocks = 16384u64;
    let path = ctx.scratch.path("open_recovery.vol");
    let src = source(1024);
    let entries;
    {
        let vol = create(&path, blocks * BS as u64, wal)?;
        // Fill the ring: as many 4 KiB entries as fit in one lap.
        let n = wal / ENTRY_BYTES - 1;
        for i in 0..n {
            let s = ((i % 1024) as usize) * BS;
            vol.write(Lba(i % blocks), &src[s..s + BS])
                .map_err(|e| format!("write: {e}"))?;
        }
        entries = n;
        vol.close().map_err(|e| format!("close: {e}"))?;
    }
    let wal_bytes = entries * ENTRY_BYTES;
    let cold = |f: &File| raw::drop_cache(f).map_err(|e| format!("fadvise: {e}"));
    let (b, s) = interleaved(
        ctx.plan(),
        || {
            let f = File::open(&path).map_err(|e| format!("open: {e}"))?;
            cold(&f)?;
            let mut buf = vec![0u8; MIB as usize];
            let (d, ()) = timed(|| {
                let mut off = 0u64;
                while off < wal_bytes {
                    let n = (wal_bytes - off).min(MIB) as usize;
                    f.read_exact_at(&mut buf[..n], 8192 + off)
                        .map_err(|e| format!("read: {e}"))?;
                    off += n as u64;
                }
                Ok(())
            })?;
            Ok(ms(d))
        },
        || {
            {
                let f = File::open(&path).map_err(|e| format!("open: {e}"))?;
                cold(&f)?;
            }
            let (d, vol) = timed(|| {
                Volume::open(&path, &OpenOptions::manual()).map_err(|e| format!("open: {e}"))
            })?;
            let head = vol.status().head.0;
            drop(vol);
            if head != entries {
                return Err(format!("recovered {head} entries, expected {entries}"));
            }
            Ok(ms(d))
        },
    )?;
    remove(&path);
    let (bm, sm) = (median(&b), median(&s));
    Ok(Metric {
        name: "open_recovery",
        unit: "ms",
        value: sm,
        baseline: Some(bm),
        ratio: sm / bm,
        target: Target::AtMost(3.0),
        ceiling: Some(bm),
        ceiling_what: "the baseline itself (a cold sequential read of the same WAL bytes)".into(),
        latency_us: None,
        what: format!(
            "Volume::open of a volume whose {} MiB WAL is full ({entries} 4 KiB entries, nothing \
             flushed): replay, index and dirty-map rebuild, msync, superblock write; the file's \
             pages dropped from the page cache first (cold)",
            wal / MIB
        ),
        baseline_what: format!(
            "sequential pread of the same {} MiB of WAL bytes from the same file with a 1 MiB \
             buffer, its pages dropped from the page cache first (cold)",
            fmt_num(wal_bytes as f64 / MIB as f64)
        ),
        detail: format!(
            "{} reps (median); open {} ms, read {} ms",
            s.len(),
            spread(&s),
            spread(&b)
        ),
    })
}
