//! The crash plan of reference-blockvol.md 10.6, shared by the scripted (`crash.rs`) and the
//! random (`crash_random.rs`) workloads.
//!
//! A workload runs on a simulated disk that keeps written and synced bytes apart. A hook fires
//! before and after every sync (WAL msyncs, extent fdatasyncs, superblock writes, recovery and
//! truncation syncs); at each of those boundaries crash images are built, reopened and checked
//! against the six invariants:
//!
//! 1. every LSN at or below the last sync-acknowledged LSN is readable with its data;
//! 2. the recovered contents equal the model at the recovered head (a prefix state);
//! 3. the recovered head is at least the acknowledged LSN, at most the appended one, and the
//!    retained LSNs scan contiguously with the model's operations;
//! 4. writing after reopen never changes data at LSNs at or below the recovered head;
//! 5. reopening twice gives the same state;
//! 6. the checkpoint never decreases across reopen.
//!
//! The images at each boundary: only synced bytes; every written byte (a process crash);
//! a random subset of unsynced sectors; the same with one random sector torn; and the
//! "torn last sector" images: every written byte except the sector holding the end of the
//! most recently appended entry, which is torn at several cut points (the crash lands while
//! the last write is reaching the media).

use std::sync::{Arc, Mutex};

use blockvol::format::entry_size;
use blockvol::{CrashMode, CreateOptions, Lba, Lsn, SimDisk, SyncPoint, Volume};

use super::{Model, Op, data, manual};

/// What the workload has told the checker so far.
#[derive(Default)]
pub struct Oracle {
    /// Every appended operation, in LSN order (LSN = index + 1).
    pub ops: Vec<Op>,
    /// The highest LSN a `sync` (or a flush, or a clean close) has acknowledged.
    pub acked: u64,
    /// The highest checkpoint a flush has returned.
    pub checkpoint_floor: u64,
    /// Crash images built and checked.
    pub images_checked: usize,
    /// Of those, torn-last-sector images.
    pub torn_last_checked: usize,
    /// Sync boundaries seen (before and after each sync).
    pub boundaries: usize,
    /// Names the workload in failure messages.
    pub label: String,
    /// File range `[start, end)` of the most recently appended entry.
    pub last_entry: Option<(u64, u64)>,
    /// Mixed into every crash-image seed so random workloads do not share images.
    pub seed: u64,
    /// Also check, when at most [`EXHAUSTIVE_MAX_SECTORS`] sectors are unsynced, every image
    /// where exactly one of them reached the media and every image where exactly one did not.
    pub exhaustive: bool,
    /// Of the images checked, single-sector ones.
    pub single_sector_checked: usize,
}

/// The most unsynced sectors for which single-sector images are enumerated.
pub const EXHAUSTIVE_MAX_SECTORS: usize = 16;

/// The oracle as the hook and the workload share it.
pub type SharedOracle = Arc<Mutex<Oracle>>;

/// Cut points (bytes of the new contents that reached the sector) of a torn last sector.
const TORN_CUTS: [usize; 4] = [0, 8, 200, 511];

/// Reopens `img` and checks the six invariants against `ops`, `acked` and `cp_floor`.
pub fn check_image(
    opts: &CreateOptions,
    img: Vec<u8>,
    ops: &[Op],
    acked: u64,
    cp_floor: u64,
    what: &str,
) {
    let disk = SimDisk::from_image(img);
    let v =
        Volume::open_sim(&disk, &manual()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let s = v.status();
    let head = s.head.0;
    let appended = ops.len() as u64;
    assert!(
        head >= acked,
        "{what}: recovered head {head} below the acknowledged {acked}"
    );
    assert!(
        head <= appended,
        "{what}: recovered head {head} beyond the appended {appended}"
    );
    assert!(
        s.checkpoint.0 >= cp_floor,
        "{what}: checkpoint {} below the persisted {cp_floor}",
        s.checkpoint
    );
    assert!(
        s.tail <= s.checkpoint && s.checkpoint <= s.durable && s.durable == s.head,
        "{what}: {s:?}"
    );
    assert!(
        s.checkpoint_trusted,
        "{what}: a crash alone must not make the checkpoint untrusted"
    );
    assert!(
        v.retained_gaps().is_empty(),
        "{what}: the recovered LSN index has holes"
    );
    let model = Model::at(opts, ops, head);
    assert_eq!(
        v.digest().expect("digest"),
        model.digest(),
        "{what}: contents differ from the model at lsn {head}"
    );
    // Every flushed block agrees with its checksum (the digest read them; the scrub checks
    // every one the extent holds, and that nothing was counted).
    super::assert_scrub_clean(&v, what);
    // The retained range scans contiguously and matches the model's operations.
    let mut expect = s.retained_start.0;
    for e in v.scan_from(s.retained_start).expect("scan") {
        let e = e.unwrap_or_else(|err| panic!("{what}: scan failed at {expect}: {err}"));
        assert_eq!(e.lsn.0, expect, "{what}: scan not contiguous");
        assert_eq!(
            Op::from_entry(&e),
            ops[(expect - 1) as usize],
            "{what}: entry {expect} differs"
        );
        expect += 1;
    }
    assert_eq!(expect, head + 1, "{what}: scan ended early");
    drop(v);
    // Invariant 5: a second open sees exactly the same state.
    let v = Volume::open_sim(&disk, &manual()).expect("second reopen");
    let s2 = v.status();
    assert_eq!(
        (s2.head, s2.tail, s2.checkpoint, s2.generation),
        (s.head, s.tail, s.checkpoint, s.generation),
        "{what}: second reopen differs"
    );
    assert_eq!(
        v.digest().expect("digest"),
        model.digest(),
        "{what}: second reopen contents differ"
    );
    // Invariant 4: a write after recovery lands at head + 1 and changes nothing older.
    let extra = data(0xE0E0 + head, 1, opts.block_size);
    let lsn = v.write(Lba(5), &extra).expect("write after reopen");
    assert_eq!(
        lsn,
        Lsn(head + 1),
        "{what}: the first write after recovery must take head + 1"
    );
    v.sync().expect("sync after reopen");
    drop(v);
    let after = SimDisk::from_image(disk.crash_image_with(0, CrashMode::DurableOnly));
    let v = Volume::open_sim(&after, &manual()).expect("reopen after the post-recovery write");
    assert_eq!(
        v.status().head,
        Lsn(head + 1),
        "{what}: post-recovery write lost"
    );
    assert!(
        v.status().checkpoint >= s.checkpoint,
        "{what}: checkpoint went backwards"
    );
    let mut m = model.clone();
    m.apply(&Op::Write {
        lba: 5,
        data: extra,
    });
    assert_eq!(
        v.digest().expect("digest"),
        m.digest(),
        "{what}: post-recovery write changed older data"
    );
}

/// The torn-last-sector images of `d`: every written byte, except that the sector holding
/// the last byte of `last` (a file range) is torn at each of [`TORN_CUTS`]. Empty when that
/// sector is already durable (nothing to tear).
pub fn torn_last_images(d: &SimDisk, last: Option<(u64, u64)>) -> Vec<(usize, Vec<u8>)> {
    let Some((_, end)) = last else {
        return Vec::new();
    };
    let durable = d.durable_image();
    let written = d.written_image();
    let a = ((end - 1) / 512 * 512) as usize;
    let b = (a + 512).min(written.len());
    if durable[a..b] == written[a..b] {
        return Vec::new();
    }
    TORN_CUTS
        .iter()
        .map(|&cut| {
            let mut img = written.clone();
            let c = (a + cut).min(b);
            img[c..b].copy_from_slice(&durable[c..b]);
            (cut, img)
        })
        .collect()
}

/// When at most [`EXHAUSTIVE_MAX_SECTORS`] sectors differ between the durable and the written
/// views: for each of them, the durable image plus that sector alone (`true`), and the written
/// image without it (`false`).
pub fn single_sector_images(d: &SimDisk) -> Vec<(usize, bool, Vec<u8>)> {
    let durable = d.durable_image();
    let written = d.written_image();
    let sectors: Vec<usize> = (0..durable.len().div_ceil(512))
        .filter(|s| {
            let (a, b) = (s * 512, ((s + 1) * 512).min(durable.len()));
            durable[a..b] != written[a..b]
        })
        .collect();
    if sectors.len() > EXHAUSTIVE_MAX_SECTORS {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &s in &sectors {
        let (a, b) = (s * 512, ((s + 1) * 512).min(durable.len()));
        let mut alone = durable.clone();
        alone[a..b].copy_from_slice(&written[a..b]);
        out.push((s, true, alone));
        if sectors.len() > 1 {
            let mut without = written.clone();
            without[a..b].copy_from_slice(&durable[a..b]);
            out.push((s, false, without));
        }
    }
    out
}

/// Installs the checking hook on `disk`.
pub fn install_hook(disk: &SimDisk, opts: &CreateOptions, oracle: &SharedOracle) {
    let o = oracle.clone();
    let opts = opts.clone();
    disk.set_sync_hook(Some(Arc::new(move |d: &SimDisk, p: &SyncPoint| {
        let (ops, acked, cp, label, last, base_seed, exhaustive) = {
            let g = o.lock().unwrap_or_else(|p| p.into_inner());
            (
                g.ops.clone(),
                g.acked,
                g.checkpoint_floor,
                g.label.clone(),
                g.last_entry,
                g.seed,
                g.exhaustive,
            )
        };
        let seed = base_seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(p.index * 2 + u64::from(p.after));
        let when = if p.after { "after" } else { "before" };
        let modes = [
            CrashMode::DurableOnly,
            CrashMode::AllWritten,
            CrashMode::RandomSectors,
            CrashMode::RandomSectorsTorn,
        ];
        for mode in modes {
            let what = format!(
                "{label}: sync #{} ({when}, range {}+{}), {mode:?}, seed {seed}",
                p.index, p.offset, p.len
            );
            check_image(
                &opts,
                d.crash_image_with(seed, mode),
                &ops,
                acked,
                cp,
                &what,
            );
        }
        let torn = torn_last_images(d, last);
        for (cut, img) in &torn {
            let what = format!(
                "{label}: sync #{} ({when}), last entry {last:?} torn after {cut} bytes of its last sector",
                p.index
            );
            check_image(&opts, img.clone(), &ops, acked, cp, &what);
        }
        let singles = if exhaustive {
            single_sector_images(d)
        } else {
            Vec::new()
        };
        for (sector, alone, img) in &singles {
            let what = format!(
                "{label}: sync #{} ({when}), unsynced sector {sector} {}",
                p.index,
                if *alone {
                    "alone reached the media"
                } else {
                    "alone was lost"
                }
            );
            check_image(&opts, img.clone(), &ops, acked, cp, &what);
        }
        let mut g = o.lock().unwrap_or_else(|p| p.into_inner());
        g.single_sector_checked += singles.len();
        g.images_checked += modes.len() + torn.len() + singles.len();
        g.torn_last_checked += torn.len();
        g.boundaries += 1;
    })));
}

/// Runs `workload` on a new simulated volume with the checking hook installed; returns the
/// oracle (with its counts) when the workload is done.
pub fn run_crash_plan(
    opts: CreateOptions,
    open: blockvol::OpenOptions,
    workload: impl FnOnce(&Volume, &SharedOracle),
) -> SharedOracle {
    let (v, disk) = Volume::create_sim(&opts, &open).expect("create");
    let oracle: SharedOracle = Arc::new(Mutex::new(Oracle::default()));
    install_hook(&disk, &opts, &oracle);
    workload(&v, &oracle);
    disk.set_sync_hook(None);
    oracle
}

/// Records an appended operation (checking LSN contiguity) and where its entry lies.
pub fn record(o: &SharedOracle, v: &Volume, lsn: Lsn, op: Op) {
    let size = match &op {
        Op::Write { data, .. } => entry_size(data.len() as u64),
        _ => entry_size(0),
    };
    let start = v.entry_file_offset(lsn).expect("offset of a fresh entry");
    let mut g = o.lock().expect("oracle");
    assert_eq!(lsn.0, g.ops.len() as u64 + 1, "LSNs must be contiguous");
    g.ops.push(op);
    g.last_entry = Some((start, start + size));
}

/// Records a sync acknowledgement.
pub fn ack(o: &SharedOracle, durable: Lsn) {
    let mut g = o.lock().expect("oracle");
    g.acked = g.acked.max(durable.0);
}

/// Records a returned checkpoint.
pub fn checkpointed(o: &SharedOracle, cp: Lsn) {
    let mut g = o.lock().expect("oracle");
    g.checkpoint_floor = g.checkpoint_floor.max(cp.0);
}

/// Names the workload in failure messages.
pub fn label(o: &SharedOracle, l: &str) {
    o.lock().expect("oracle").label = l.to_string();
}
