//! Tests that close gaps mutation testing found in the bridge (`cargo mutants`, see
//! docs/TESTING.md).

mod common;

use common::*;
use engine::CatchUpIo;
use engine::conformance::Harness;
use v2bridge::Lineage;

/// Lineages carry a stable tag of the driving server's ID: FNV-1a 64, pinned to its published
/// values, so different servers never share one by a weak hash.
#[test]
fn driver_tags_are_fnv1a_of_the_server_id() {
    assert_eq!(Lineage::driver_tag(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(Lineage::driver_tag("a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(Lineage::driver_tag("foobar"), 0x8594_4171_f739_67e8);
    assert_ne!(Lineage::driver_tag("vs1"), Lineage::driver_tag("vs2"));
}

/// A replica volume fenced (`stale`, as a restarted server leaves it) at the request's epoch
/// takes the replica role when its primary's session ships entries at that epoch, and applies
/// them.
#[test]
fn a_fenced_replica_at_the_same_epoch_accepts_its_primarys_entries() {
    let mut h = harness();
    let head = h.primary_write(20).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", lsn(10)).unwrap();
    let vol = h.replica("r1").unwrap().volume();
    let epoch = vol.status().epoch;
    vol.assign(blockvol::Role::Stale, epoch).unwrap();
    let mut io = h
        .io("r1", v2bridge::convert::epoch_to_engine(epoch), sid(1))
        .unwrap();
    let chunk = io.stream_wal_chunk(lsn(10), head, 100).unwrap();
    assert_eq!(chunk.applied_to, head);
    assert_eq!(vol.status().role, blockvol::Role::Replica);
}

/// The bridge's handles print what they are (they end up in logs and assertion messages).
#[test]
fn storage_and_replica_handles_print_their_type() {
    let dir = tempdir();
    let (_p, storage) = primary(dir.path());
    assert!(format!("{storage:?}").starts_with("BlockVolStorage"));
    let mut h = harness();
    h.add_replica("r1", lsn(0)).unwrap();
    let r = h.replica("r1").unwrap();
    assert!(format!("{r:?}").starts_with("LocalReplica"));
}
