//! The crash plan on random workloads: proptest generates operation sequences (writes, trims,
//! barriers, syncs, full and partial flushes, retention changes, pins, truncations, clean
//! reopens and crash-reopens); every sync boundary of every sequence is checked with the crash
//! images and the six invariants of `common/crashplan.rs` (durable-only, all-written, random
//! sectors, a random torn sector, and the last sector of the newest entry torn).
//!
//! A failing sequence is shrunk by proptest and saved under `proptest-regressions/`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockvol::{
    BlockVolError, CrashMode, CreateOptions, Lba, Lsn, OpenOptions, RetentionPolicy, SimDisk,
    Volume, WalPin,
};
use common::crashplan::{Oracle, SharedOracle, ack, checkpointed, install_hook, label, record};
use common::{Model, Op, data, tiny};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

#[derive(Clone, Debug)]
enum Step {
    Write { lba: u64, blocks: u64, tag: u64 },
    Trim { lba: u64, blocks: u64 },
    Barrier,
    Sync,
    Flush,
    FlushTo { back: u64 },
    Retain { keep: u64 },
    Pin { back: u64 },
    Unpin,
    Truncate { back: u64 },
    Reopen,
    Crash { seed: u64, mode: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u64..64, 1u64..9, any::<u64>()).prop_map(|(lba, blocks, tag)| Step::Write { lba, blocks, tag }),
        1 => (0u64..64, 1u64..20).prop_map(|(lba, blocks)| Step::Trim { lba, blocks }),
        1 => Just(Step::Barrier),
        3 => Just(Step::Sync),
        1 => Just(Step::Flush),
        1 => (0u64..8).prop_map(|back| Step::FlushTo { back }),
        1 => (0u64..10).prop_map(|keep| Step::Retain { keep }),
        1 => (0u64..6).prop_map(|back| Step::Pin { back }),
        1 => Just(Step::Unpin),
        1 => (0u64..6).prop_map(|back| Step::Truncate { back }),
        1 => Just(Step::Reopen),
        1 => (any::<u64>(), 0u8..4).prop_map(|(seed, mode)| Step::Crash { seed, mode }),
    ]
}

fn open_opts() -> OpenOptions {
    OpenOptions {
        wal_full_timeout: Duration::from_millis(1),
        ..OpenOptions::manual()
    }
}

/// Counts across every case, reported at the end of the test.
static IMAGES: AtomicUsize = AtomicUsize::new(0);
static TORN_LAST: AtomicUsize = AtomicUsize::new(0);
static BOUNDARIES: AtomicUsize = AtomicUsize::new(0);
static STEPS: AtomicUsize = AtomicUsize::new(0);
static SINGLES: AtomicUsize = AtomicUsize::new(0);

fn head_of(o: &SharedOracle) -> u64 {
    o.lock().expect("oracle").ops.len() as u64
}

/// Runs one workload with the crash-plan hook on every disk it lives on.
fn run_workload(opts: &CreateOptions, seed: u64, steps: &[Step]) -> Result<(), TestCaseError> {
    let bs = opts.block_size;
    let oracle: SharedOracle = std::sync::Arc::new(std::sync::Mutex::new(Oracle {
        seed,
        exhaustive: true,
        ..Oracle::default()
    }));
    label(&oracle, &format!("random workload seed {seed}"));
    let (mut v, mut disk) = Volume::create_sim(opts, &open_opts()).expect("create");
    install_hook(&disk, opts, &oracle);
    let mut pins: Vec<WalPin> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        label(
            &oracle,
            &format!("random workload seed {seed}, step {i} {s:?}"),
        );
        match *s {
            Step::Write { lba, blocks, tag } => {
                let blocks = blocks.min(64 - lba);
                let d = data(tag, blocks, bs);
                match v.write(Lba(lba), &d) {
                    Ok(lsn) => record(&oracle, &v, lsn, Op::Write { lba, data: d }),
                    Err(BlockVolError::WalFull { .. }) => {
                        prop_assert_eq!(v.status().head.0, head_of(&oracle));
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
            Step::Trim { lba, blocks } => {
                let blocks = blocks.min(64 - lba);
                match v.trim(Lba(lba), blocks) {
                    Ok(lsn) => record(&oracle, &v, lsn, Op::Trim { lba, blocks }),
                    Err(BlockVolError::WalFull { .. }) => {}
                    Err(e) => panic!("trim: {e}"),
                }
            }
            Step::Barrier => match v.barrier() {
                Ok(lsn) => record(&oracle, &v, lsn, Op::Barrier),
                Err(BlockVolError::WalFull { .. }) => {}
                Err(e) => panic!("barrier: {e}"),
            },
            Step::Sync => {
                let d = v.sync().expect("sync");
                prop_assert_eq!(d.0, head_of(&oracle));
                ack(&oracle, d);
            }
            Step::Flush => {
                let cp = v.force_flush().expect("flush");
                ack(&oracle, v.status().durable);
                checkpointed(&oracle, cp);
            }
            Step::FlushTo { back } => {
                let target = Lsn(head_of(&oracle).saturating_sub(back));
                let cp = v.force_flush_to(target).expect("flush_to");
                ack(&oracle, v.status().durable);
                checkpointed(&oracle, cp);
            }
            Step::Retain { keep } => v.set_retention(RetentionPolicy {
                keep_entries: keep,
                keep_bytes: 0,
            }),
            Step::Pin { back } => {
                let st = v.status();
                let after = Lsn(st.head.0.saturating_sub(back).max(st.tail.0));
                pins.push(v.pin_wal(after).expect("pin at or above the tail"));
            }
            Step::Unpin => {
                pins.pop();
            }
            Step::Truncate { back } => {
                let st = v.status();
                let target = st.head.0.saturating_sub(back);
                // While the truncation runs, a crash may leave the old log or the truncated
                // one: acknowledgements above the target no longer bind.
                let saved = {
                    let mut g = oracle.lock().expect("oracle");
                    let saved = g.acked;
                    g.acked = g.acked.min(target);
                    saved
                };
                match v.truncate_after(Lsn(target)) {
                    Ok(()) => {
                        let mut g = oracle.lock().expect("oracle");
                        g.ops.truncate(target as usize);
                        g.last_entry = None;
                        prop_assert_eq!(v.status().head.0, target);
                    }
                    Err(BlockVolError::BelowCheckpoint { .. }) => {
                        prop_assert!(target < st.checkpoint.0);
                        oracle.lock().expect("oracle").acked = saved;
                    }
                    Err(e) => panic!("truncate_after({target}): {e}"),
                }
            }
            Step::Reopen => {
                pins.clear();
                v.close().expect("close");
                ack(&oracle, Lsn(head_of(&oracle)));
                v = Volume::open_sim(&disk, &open_opts()).expect("reopen");
                prop_assert_eq!(v.status().head.0, head_of(&oracle));
                checkpointed(&oracle, v.status().checkpoint);
            }
            Step::Crash { seed: s, mode } => {
                pins.clear();
                let mode = [
                    CrashMode::DurableOnly,
                    CrashMode::RandomSectors,
                    CrashMode::RandomSectorsTorn,
                    CrashMode::AllWritten,
                ][mode as usize];
                let img = disk.crash_image_with(s, mode);
                drop(v);
                disk.set_sync_hook(None);
                disk = SimDisk::from_image(img);
                // Recovery's own syncs are boundaries too: the hook checks them against the
                // oracle as it stands (any state in [acked, appended]).
                install_hook(&disk, opts, &oracle);
                v = Volume::open_sim(&disk, &open_opts()).expect("reopen after crash");
                let st = v.status();
                let (acked, appended) = {
                    let g = oracle.lock().expect("oracle");
                    (g.acked, g.ops.len() as u64)
                };
                prop_assert!(
                    st.head.0 >= acked && st.head.0 <= appended,
                    "crash recovered head {} outside [{}, {}]",
                    st.head,
                    acked,
                    appended
                );
                let mut g = oracle.lock().expect("oracle");
                g.ops.truncate(st.head.0 as usize);
                g.acked = st.head.0;
                g.checkpoint_floor = g.checkpoint_floor.max(st.checkpoint.0);
                g.last_entry = None;
                let m = Model::at(opts, &g.ops, st.head.0);
                drop(g);
                prop_assert_eq!(v.digest().expect("digest"), m.digest());
            }
        }
        let st = v.status();
        prop_assert!(st.tail <= st.checkpoint && st.checkpoint <= st.durable);
        prop_assert!(st.durable <= st.head);
        prop_assert_eq!(st.head.0, head_of(&oracle));
    }
    let d = v.sync().expect("final sync");
    ack(&oracle, d);
    disk.set_sync_hook(None);
    let g = oracle.lock().expect("oracle");
    let m = Model::at(opts, &g.ops, g.ops.len() as u64);
    prop_assert_eq!(v.digest().expect("digest"), m.digest());
    IMAGES.fetch_add(g.images_checked, Ordering::Relaxed);
    TORN_LAST.fetch_add(g.torn_last_checked, Ordering::Relaxed);
    BOUNDARIES.fetch_add(g.boundaries, Ordering::Relaxed);
    STEPS.fetch_add(steps.len(), Ordering::Relaxed);
    SINGLES.fetch_add(g.single_sector_checked, Ordering::Relaxed);
    Ok(())
}

#[test]
fn random_workloads_hold_the_six_invariants_at_every_sync_boundary() {
    let cases = 128;
    let mut runner = TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    });
    let opts = tiny();
    let strategy = (any::<u64>(), proptest::collection::vec(step(), 1..70));
    let result = runner.run(&strategy, |(seed, steps)| run_workload(&opts, seed, &steps));
    if let Err(e) = result {
        panic!("{e}");
    }
    let images = IMAGES.load(Ordering::Relaxed);
    let torn = TORN_LAST.load(Ordering::Relaxed);
    let boundaries = BOUNDARIES.load(Ordering::Relaxed);
    let steps = STEPS.load(Ordering::Relaxed);
    let singles = SINGLES.load(Ordering::Relaxed);
    eprintln!(
        "crash_random: {cases} workloads (passing runs), {steps} steps, {boundaries} sync boundaries, {images} crash images checked ({torn} torn-last-sector, {singles} single-sector)"
    );
    assert!(
        boundaries > 500 && torn > 50,
        "too few boundaries ({boundaries}) or torn-last images ({torn}) were checked"
    );
}
