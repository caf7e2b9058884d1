//! proptest: random operation sequences (writes, trims, syncs, flushes, pins, clean reopen and
//! crash-reopen) against an in-memory model of the visible contents.

mod common;

use std::time::Duration;

use blockvol::{BlockVolError, CrashMode, Lba, Lsn, OpenOptions, SimDisk, Volume, WalPin};
use common::{Model, Op, data, tiny};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Write { lba: u64, blocks: u64, tag: u64 },
    Trim { lba: u64, blocks: u64 },
    Sync,
    Flush,
    FlushTo { back: u64 },
    Pin { back: u64 },
    Unpin,
    Read { lba: u64, blocks: u64 },
    Reopen,
    Crash { seed: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..64, 1u64..9, any::<u64>()).prop_map(|(lba, blocks, tag)| Step::Write { lba, blocks, tag }),
        1 => (0u64..64, 1u64..20).prop_map(|(lba, blocks)| Step::Trim { lba, blocks }),
        2 => Just(Step::Sync),
        1 => Just(Step::Flush),
        1 => (0u64..8).prop_map(|back| Step::FlushTo { back }),
        1 => (0u64..6).prop_map(|back| Step::Pin { back }),
        1 => Just(Step::Unpin),
        2 => (0u64..64, 1u64..8).prop_map(|(lba, blocks)| Step::Read { lba, blocks }),
        1 => Just(Step::Reopen),
        1 => any::<u64>().prop_map(|seed| Step::Crash { seed }),
    ]
}

fn opts() -> OpenOptions {
    OpenOptions {
        wal_full_timeout: Duration::from_millis(1),
        ..OpenOptions::manual()
    }
}

fn check_invariants(v: &Volume) {
    let s = v.status();
    assert!(s.tail <= s.checkpoint, "{s:?}");
    assert!(s.checkpoint <= s.durable, "{s:?}");
    assert!(s.durable <= s.head, "{s:?}");
    assert_eq!(s.retained_start, Lsn(s.tail.0 + 1));
    assert!(s.wal_used_bytes <= s.wal_size_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(steps in proptest::collection::vec(step(), 1..120)) {
        let o = tiny();
        let bs = o.block_size;
        let (mut v, mut disk) = Volume::create_sim(&o, &opts()).expect("create");
        let mut ops: Vec<Op> = Vec::new();
        let mut acked = 0u64;
        let mut last_cp = Lsn(0);
        let mut pins: Vec<WalPin> = Vec::new();
        for s in steps {
            match s {
                Step::Write { lba, blocks, tag } => {
                    let blocks = blocks.min(64 - lba);
                    let d = data(tag, blocks, bs);
                    match v.write(Lba(lba), &d) {
                        Ok(l) => {
                            prop_assert_eq!(l.0, ops.len() as u64 + 1);
                            ops.push(Op::Write { lba, data: d });
                        }
                        Err(BlockVolError::WalFull { .. }) => {
                            prop_assert_eq!(v.status().head.0, ops.len() as u64);
                        }
                        Err(e) => panic!("write: {e}"),
                    }
                }
                Step::Trim { lba, blocks } => {
                    let blocks = blocks.min(64 - lba);
                    match v.trim(Lba(lba), blocks) {
                        Ok(l) => {
                            prop_assert_eq!(l.0, ops.len() as u64 + 1);
                            ops.push(Op::Trim { lba, blocks });
                        }
                        Err(BlockVolError::WalFull { .. }) => {}
                        Err(e) => panic!("trim: {e}"),
                    }
                }
                Step::Sync => {
                    acked = v.sync().expect("sync").0;
                    prop_assert_eq!(acked, ops.len() as u64);
                }
                Step::Flush => {
                    let cp = v.force_flush().expect("flush");
                    prop_assert!(cp >= last_cp);
                    prop_assert_eq!(cp.0, ops.len() as u64);
                    last_cp = cp;
                    acked = ops.len() as u64;
                }
                Step::FlushTo { back } => {
                    let target = Lsn((ops.len() as u64).saturating_sub(back));
                    let cp = v.force_flush_to(target).expect("flush_to");
                    prop_assert!(cp >= last_cp);
                    prop_assert_eq!(cp, target.max(last_cp));
                    last_cp = cp;
                    acked = ops.len() as u64;
                }
                Step::Pin { back } => {
                    let st = v.status();
                    let after = Lsn(st.head.0.saturating_sub(back).max(st.tail.0));
                    pins.push(v.pin_wal(after).expect("pin at or above the tail"));
                    if st.tail.0 > 0 {
                        prop_assert!(
                            matches!(v.pin_wal(Lsn(st.tail.0 - 1)), Err(BlockVolError::Recycled { .. })),
                            "pinning below the tail must be refused"
                        );
                    }
                }
                Step::Unpin => {
                    pins.pop();
                }
                Step::Read { lba, blocks } => {
                    let blocks = blocks.min(64 - lba);
                    let m = Model::at(&o, &ops, ops.len() as u64);
                    prop_assert_eq!(v.read(Lba(lba), blocks).expect("read"), m.read(lba, blocks).to_vec());
                }
                Step::Reopen => {
                    pins.clear();
                    v.close().expect("close");
                    v = Volume::open_sim(&disk, &opts()).expect("reopen");
                    prop_assert_eq!(v.status().head.0, ops.len() as u64);
                    prop_assert!(v.status().checkpoint >= last_cp);
                    acked = ops.len() as u64;
                }
                Step::Crash { seed } => {
                    pins.clear();
                    let mode = if seed % 2 == 0 { CrashMode::DurableOnly } else { CrashMode::RandomSectorsTorn };
                    let img = disk.crash_image_with(seed, mode);
                    drop(v);
                    disk = SimDisk::from_image(img);
                    v = Volume::open_sim(&disk, &opts()).expect("reopen after crash");
                    let head = v.status().head.0;
                    prop_assert!(head >= acked && head <= ops.len() as u64, "head {} acked {} appended {}", head, acked, ops.len());
                    prop_assert!(v.status().checkpoint >= last_cp);
                    ops.truncate(head as usize);
                    acked = head;
                    last_cp = v.status().checkpoint;
                }
            }
            check_invariants(&v);
        }
        let m = Model::at(&o, &ops, ops.len() as u64);
        prop_assert_eq!(v.digest().expect("digest"), m.digest());
    }
}
