//! The replica's committed point (`LocalReplica`): it gates the replica's flusher, so it may
//! only rise to entries the replica has verified against the sender (an anchor that matched
//! plus the entries applied on it, or a barrier whose target and tip matched). A committed
//! point above the verified head lets the flusher move whatever lands there next into the
//! extent, where a truncation can no longer remove it.

mod common;

use blockvol::{EntryInfo, EntryKind, Epoch, Lba, Volume, WalEntry};
use common::*;
use v2bridge::{ApplyRequest, BarrierRequest, Lineage, LocalReplica, ReplicaTarget};

/// The primary's committed LSN in every test: far above what the replica is sent.
const PRIMARY_COMMITTED: u64 = 40;
/// The prefix the replica starts with (applied, durable, committed).
const SEEDED: u64 = 10;

struct Fixture {
    _dir: tempfile::TempDir,
    primary: std::sync::Arc<Volume>,
    replica: std::sync::Arc<Volume>,
    target: LocalReplica,
}

/// A primary with 40 committed entries and a replica holding (and committed at) the first 10.
fn fixture() -> Fixture {
    let dir = tempdir();
    let (p, _storage) = primary(dir.path());
    write_blocks(&p, 0..PRIMARY_COMMITTED, 0);
    commit(&p, lsn(PRIMARY_COMMITTED));
    let replica = replica_volume(dir.path(), "r1");
    seed_replica(&p, &replica, SEEDED);
    assert_eq!(replica.status().committed, blsn(SEEDED));
    let target = local(&replica);
    Fixture {
        _dir: dir,
        primary: p,
        replica,
        target,
    }
}

fn lineage() -> Lineage {
    Lineage::new(DRIVER, Epoch(1), 1)
}

/// The primary's entries `from..=to` on top of its entry at `from - 1`, told that
/// `PRIMARY_COMMITTED` is committed.
fn apply_req(p: &Volume, from: u64, to: u64) -> ApplyRequest {
    let mut frames = Vec::new();
    let entries = scan(p, from, to);
    for e in &entries {
        e.encode_into(&mut frames).unwrap();
    }
    ApplyRequest {
        lineage: lineage(),
        committed: blsn(PRIMARY_COMMITTED),
        anchor: p.entry_info(blsn(from - 1)).unwrap(),
        count: entries.len() as u32,
        frames,
    }
}

/// Appends `n` entries that the primary never wrote (a divergent, unverified tail).
fn append_unverified(vol: &Volume, n: u64) {
    let mut head = vol.status().head.0;
    for _ in 0..n {
        head += 1;
        vol.apply(&WalEntry {
            lsn: blsn(head),
            epoch: Epoch(1),
            kind: EntryKind::Write {
                lba: Lba(head % 256),
                data: block_pattern_of(head),
            },
        })
        .expect("divergent apply");
    }
    vol.sync().expect("sync");
}

fn block_pattern_of(lsn: u64) -> Vec<u8> {
    v2bridge::harness::block_pattern(lsn, 0xD1FF, BS)
}

/// An apply told a committed point beyond the run it carries raises the replica's committed
/// point to the run's last entry and no further; an unverified tail appended afterwards stays
/// above it, so the flusher leaves it in the WAL and a truncation still removes it.
#[test]
fn apply_raises_the_replica_committed_point_no_further_than_the_verified_head() {
    let mut fx = fixture();
    let reply = fx.target.apply(apply_req(&fx.primary, 11, 15)).unwrap();
    assert_eq!((reply.applied_to, reply.applied), (blsn(15), 5));
    assert_eq!(
        fx.replica.status().committed,
        blsn(15),
        "the replica's committed point must stop at the head it verified (15), \
         not the sender's committed point ({PRIMARY_COMMITTED})"
    );

    // What the bound protects: entries beyond the verified head that the sender never sent.
    append_unverified(&fx.replica, 3);
    fx.replica.force_flush().unwrap();
    assert_eq!(fx.replica.status().checkpoint, blsn(15));
    fx.replica
        .truncate_after(blsn(15))
        .expect("the unverified tail became permanent");
    assert_eq!(
        fx.replica.entry_info(blsn(15)).unwrap(),
        fx.primary.entry_info(blsn(15)).unwrap()
    );
}

/// A barrier whose target and expected tip match the replica's durable head raises the
/// committed point to that target, never to the sender's larger committed point.
#[test]
fn barrier_raises_the_replica_committed_point_no_further_than_its_matched_target() {
    let fx = fixture();
    // The replica holds 11..=15 durably, committed still at 10.
    seed_replica_from(&fx.primary, &fx.replica, SEEDED + 1, 15);
    let mut target = fx.target.clone();
    assert_eq!(fx.replica.status().committed, blsn(SEEDED));
    let reply = target
        .barrier(BarrierRequest {
            lineage: lineage(),
            target: blsn(15),
            expected_tip: Some(fx.primary.entry_info(blsn(15)).unwrap()),
            committed: blsn(PRIMARY_COMMITTED),
        })
        .unwrap();
    assert_eq!(reply.durable, blsn(15));
    assert_eq!(
        fx.replica.status().committed,
        blsn(15),
        "a matched barrier at 15 must raise the committed point to 15, \
         not the sender's committed point ({PRIMARY_COMMITTED})"
    );
}

/// A barrier that does not verify the replica's head leaves the committed point alone: a target
/// beyond the replica's durable head, a tip that differs, or no tip to compare.
#[test]
fn barrier_that_does_not_verify_the_head_leaves_the_replica_committed_point() {
    let fx = fixture();
    seed_replica_from(&fx.primary, &fx.replica, SEEDED + 1, 15);
    let mut target = fx.target.clone();
    let at = |l: u64| fx.primary.entry_info(blsn(l)).unwrap();
    let wrong_tip = EntryInfo {
        content_crc: at(15).content_crc ^ 1,
        ..at(15)
    };
    let cases: [(&str, u64, Option<EntryInfo>); 5] = [
        ("target beyond the durable head", 20, Some(at(20))),
        (
            "target beyond the durable head, tip of the head",
            20,
            Some(at(15)),
        ),
        ("target below the durable head", 12, Some(at(12))),
        ("a different tip at the head", 15, Some(wrong_tip)),
        ("no tip to compare", 15, None),
    ];
    for (what, tgt, expected_tip) in cases {
        let reply = target
            .barrier(BarrierRequest {
                lineage: lineage(),
                target: blsn(tgt),
                expected_tip,
                committed: blsn(PRIMARY_COMMITTED),
            })
            .unwrap();
        assert_eq!(reply.durable, blsn(15), "{what}");
        assert_eq!(
            fx.replica.status().committed,
            blsn(SEEDED),
            "{what}: the barrier raised the committed point past what it verified"
        );
    }
}

/// Applies the primary's entries `from..=to` straight to the replica volume (no committed
/// point raised) and makes them durable.
fn seed_replica_from(p: &Volume, replica: &Volume, from: u64, to: u64) {
    for e in scan(p, from, to) {
        replica.apply(&e).expect("seed apply");
    }
    replica.sync().expect("seed sync");
}
