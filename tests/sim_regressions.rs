//! Regression tests for the bugs the deterministic simulator found (issue 6). Each reproduces
//! the failing situation directly, through the simulator's scripted operations or the crates'
//! own APIs, and asserts the fixed behaviour.

use std::sync::Arc;

use blockvol::{
    CreateOptions, Epoch, FlushGate, FlusherMode, Lba, OpenOptions, RetentionPolicy, Role, Volume,
};
use controlbridge::BlockRole;
use engine::{CatchUpIo, Lsn, ReplicaState};
use swblock::sim::{Interleave, Op, Sim, SimOptions};
use v2bridge::{BlockVolStorage, BridgeIo, Lineage, LocalReplica, ReplicaTarget, TargetError};

fn sim(replicas: usize) -> Sim {
    let mut o = SimOptions::new(11, 0);
    o.replicas = Some(replicas);
    o.interleave_per_mille = Some(0);
    Sim::new(o).unwrap_or_else(|e| panic!("sim: {e}"))
}

fn assert_clean(sim: &Sim) {
    let v = sim.violations();
    assert!(
        v.is_empty(),
        "violations: {v:?}\n{}",
        sim.trace().join("\n")
    );
}

/// Found by `cargo xtask sim --seed 1 --steps 100` (before the fix): a rebuilding assignment
/// delivered to a replica the primary holds in sync (late, duplicated, or simply mistaken)
/// made the replica wipe itself for a base install while the primary kept reporting it
/// `in_sync` (invariant (a)). The service now declines a rebuild the local copy does not need.
#[test]
fn late_rebuild_assignment_does_not_wipe_an_in_sync_replica() {
    let mut sim = sim(2);
    // s2 falls beyond the primary's retention and is rebuilt for real.
    let addr = sim.data_addr("s2");
    sim.apply(Op::Disconnect { addr: addr.clone() });
    for _ in 0..4 {
        sim.apply(Op::Write { count: 8 });
        sim.apply(Op::Commit);
    }
    sim.apply(Op::RetentionPressure);
    sim.apply(Op::Reconnect { addr });
    sim.apply(Op::Reassign);
    assert_eq!(sim.state_of("s2"), Some(ReplicaState::NeedsRebuild));
    sim.apply(Op::Rebuild {
        server: "s2".into(),
    });
    let rebuilt = sim
        .recoveries()
        .get("rebuild_snapshot_tail")
        .copied()
        .unwrap_or(0)
        + sim
            .recoveries()
            .get("rebuild_full_base")
            .copied()
            .unwrap_or(0);
    assert_eq!(rebuilt, 1, "{:?}", sim.recoveries());
    sim.apply(Op::Reassign);
    assert_eq!(sim.state_of("s2"), Some(ReplicaState::InSync));
    sim.apply(Op::Write { count: 5 });
    sim.apply(Op::Commit);
    let before = sim.volume("s2");

    // The same rebuilding assignment, delivered again now that s2 is in sync.
    let index = sim
        .assignment_history()
        .iter()
        .rposition(|(s, role, _, _)| s == "s2" && *role == BlockRole::Rebuilding.to_wire())
        .expect("a rebuilding assignment was sent");
    sim.apply(Op::LateAssignment { index });
    assert_clean(&sim);
    assert_eq!(
        sim.recoveries().get("rebuild_not_needed").copied(),
        Some(1),
        "{:?}",
        sim.recoveries()
    );
    assert_eq!(sim.state_of("s2"), Some(ReplicaState::InSync));
    assert_eq!(sim.volume("s2"), before, "the in-sync copy was not touched");
    assert_eq!(
        before.and_then(|(_, d)| d),
        Some(sim.committed_digest()),
        "and it holds the committed image"
    );
}

/// Found by `cargo xtask sim --seed 20 --steps 150` (before the fix): an assignment re-delivered
/// late at the same epoch but with an older address version was applied: the primary's
/// registry moved a replica back to the address it had left and demoted it (invariant (c)).
/// The service now refuses it whole.
#[test]
fn late_assignment_with_an_older_address_version_is_refused() {
    let mut sim = sim(2);
    sim.apply(Op::Write { count: 5 });
    sim.apply(Op::Commit);
    let old_addr = sim.data_addr("s3");
    sim.apply(Op::MoveAddress {
        server: "s3".into(),
    });
    sim.apply(Op::Reassign);
    let new_addr = sim.data_addr("s3");
    assert_ne!(old_addr, new_addr);
    assert_eq!(sim.state_of("s3"), Some(ReplicaState::InSync));
    let (index, version) = sim
        .assignment_history()
        .iter()
        .enumerate()
        .find(|(_, (s, role, _, _))| s == "s1" && *role == BlockRole::Primary.to_wire())
        .map(|(i, (_, _, _, v))| (i, *v))
        .expect("the first primary assignment");
    sim.apply(Op::LateAssignment { index });
    assert_clean(&sim);
    let (server, why) = sim.last_refusal().expect("the late assignment was refused");
    assert_eq!(server, "s1");
    assert!(why.contains("address version"), "{why}");
    let newest = sim.assignment_history().iter().map(|h| h.3).max();
    assert!(Some(version) < newest, "{version} vs {newest:?}");
    assert_eq!(sim.endpoint_of("s3").map(|e| e.data_addr), Some(new_addr));
    assert_eq!(sim.state_of("s3"), Some(ReplicaState::InSync));
}

/// Found by the simulator (seed 131 with 150 steps, before the fix): a replica whose ring was
/// full of entries it had verified but had not yet been told were committed could never take
/// the next chunk, because it only raised its committed point (which gates its flusher) after
/// appending the chunk. A background flusher could not help either: nothing below the committed
/// point was left to flush. It now raises its committed point over the anchor-verified prefix
/// before appending.
#[test]
fn replica_ring_full_of_unannounced_commits_takes_the_next_chunk() {
    let open = OpenOptions {
        flush_gate: FlushGate::Committed,
        retention: RetentionPolicy::default(),
        flusher: FlusherMode::Manual,
        wal_full_timeout: std::time::Duration::ZERO,
        repair: false,
    };
    let geometry = |wal| CreateOptions {
        volume_size_bytes: 64 * 512,
        wal_size_bytes: wal,
        block_size: 512,
    };
    let (primary, _pd) = Volume::create_sim(&geometry(512 << 10), &open).expect("primary");
    let primary = Arc::new(primary);
    primary.assign(Role::Primary, Epoch(1)).expect("assign");
    let (replica, _rd) = Volume::create_sim(&geometry(64 << 10), &open).expect("replica");
    let replica = Arc::new(replica);
    replica.assign(Role::Replica, Epoch(1)).expect("assign");
    for i in 0..150u64 {
        primary
            .write(Lba(i % 64), &vec![(i % 251) as u8 + 1; 512])
            .expect("write");
    }
    primary.sync().expect("sync");
    primary.set_committed(blockvol::Lsn(150));
    let storage = Arc::new(BlockVolStorage::new(Arc::clone(&primary)));
    let lineage = Lineage::new("s1", Epoch(1), 1);

    // The stream fills the replica's ring without telling it anything is committed.
    let mut unannounced = BridgeIo::new(
        Arc::clone(&storage),
        LocalReplica::new(Arc::clone(&replica)),
        lineage,
        Lsn(0),
    );
    let mut at = Lsn(0);
    while let Ok(c) = unannounced.stream_wal_chunk(at, Lsn(150), 8) {
        at = c.applied_to;
    }
    // A chunk that failed half-way still appended its first entries.
    let full_at = Lsn(replica.status().head.0);
    assert!(
        full_at >= at && full_at.get() < 150,
        "ring filled at {full_at}"
    );
    assert_eq!(replica.status().committed.0, 0);
    let used = replica.status().wal_used_bytes;
    replica.force_flush().expect("flush");
    assert_eq!(
        replica.status().wal_used_bytes,
        used,
        "nothing below the committed point to flush"
    );

    // The next chunk carries the committed point. The replica takes it on the anchor-verified
    // prefix before it needs the room, so one flush cycle frees the ring.
    let mut announced = BridgeIo::new(
        storage,
        LocalReplica::new(Arc::clone(&replica)),
        lineage,
        Lsn(150),
    );
    let first = announced.stream_wal_chunk(full_at, Lsn(150), 8);
    assert!(
        replica.status().committed.0 >= full_at.get(),
        "committed point not raised over the verified prefix: {:?} ({first:?})",
        replica.status().committed
    );
    replica.force_flush().expect("flush");
    let next = announced
        .stream_wal_chunk(full_at, Lsn(150), 8)
        .expect("the chunk fits after one flush cycle");
    assert!(next.applied_to > full_at);
}

/// Found by the simulator (a primary restarted in place at the same epoch, before the fix):
/// session IDs are only ordered within one registry and a restarted server's registry starts
/// again at 1, but replicas fenced lineages per server, so they refused every recovery of the
/// restarted primary until its session counter passed the old one (invariant (e)). The driver
/// in a lineage is now one run of a server.
#[test]
fn primary_restarted_at_the_same_epoch_recovers_its_replicas() {
    let mut sim = sim(2);
    for _ in 0..25 {
        let addr = sim.data_addr("s2");
        sim.apply(Op::Disconnect { addr: addr.clone() });
        sim.apply(Op::Write { count: 3 });
        sim.apply(Op::Commit);
        sim.apply(Op::Reconnect { addr });
        sim.apply(Op::Reassign);
    }
    let catchups = sim.recoveries().get("catchup").copied().unwrap_or(0);
    assert!(catchups >= 20, "{:?}", sim.recoveries());
    let epoch = sim.epoch();
    sim.apply(Op::CrashPrimary { failover: false });
    assert_eq!(sim.epoch(), epoch, "restarted in place");
    let addr = sim.data_addr("s2");
    sim.apply(Op::Disconnect { addr: addr.clone() });
    sim.apply(Op::Write { count: 3 });
    sim.apply(Op::Commit);
    sim.apply(Op::Reconnect { addr });
    sim.apply(Op::Reassign);
    assert_clean(&sim);
    assert_eq!(
        sim.recoveries().get("catchup").copied(),
        Some(catchups + 1),
        "{}",
        sim.trace().join("\n")
    );
    assert_eq!(sim.state_of("s2"), Some(ReplicaState::InSync));
    sim.run_healed_phase();
    assert_clean(&sim);
}

/// The other half of the fix above: with lineages fenced per run of a server, a late request
/// from a run that no longer exists is not ordered against the new run's sessions, so a replica
/// refuses a truncation below the committed point it was told (only an uncommitted tail is ever
/// truncated); the sender sees it as a truncation that needs a rebuild.
#[test]
fn truncation_below_the_replicas_committed_point_is_refused() {
    let open = OpenOptions {
        flush_gate: FlushGate::Committed,
        flusher: FlusherMode::Manual,
        wal_full_timeout: std::time::Duration::ZERO,
        ..OpenOptions::default()
    };
    let create = CreateOptions {
        volume_size_bytes: 64 * 512,
        wal_size_bytes: 256 << 10,
        block_size: 512,
    };
    let (primary, _pd) = Volume::create_sim(&create, &open).expect("primary");
    let primary = Arc::new(primary);
    primary.assign(Role::Primary, Epoch(1)).expect("assign");
    for i in 0..20u64 {
        primary
            .write(Lba(i), &vec![i as u8 + 1; 512])
            .expect("write");
    }
    primary.sync().expect("sync");
    primary.set_committed(blockvol::Lsn(20));
    let (replica, _rd) = Volume::create_sim(&create, &open).expect("replica");
    let replica = Arc::new(replica);
    replica.assign(Role::Replica, Epoch(1)).expect("assign");
    let mut io = BridgeIo::new(
        Arc::new(BlockVolStorage::new(Arc::clone(&primary))),
        LocalReplica::new(Arc::clone(&replica)),
        Lineage::new("s1#2", Epoch(1), 4),
        Lsn(20),
    );
    let c = io.stream_wal_chunk(Lsn(0), Lsn(20), 64).expect("stream");
    assert_eq!(c.applied_to, Lsn(20));
    io.barrier(Lsn(20)).expect("barrier");
    assert_eq!(replica.status().committed.0, 20);
    let digest = replica.digest().expect("digest");

    // A truncation from the previous run of the same server, delivered late.
    let mut late = LocalReplica::new(Arc::clone(&replica));
    let r = late.truncate(v2bridge::TruncateRequest {
        lineage: Lineage::new("s1#1", Epoch(1), 9),
        after: blockvol::Lsn(12),
        committed: blockvol::Lsn(12),
    });
    assert!(
        matches!(
            r,
            Err(TargetError::BelowCommitted { requested, committed })
                if requested.0 == 12 && committed.0 == 20
        ),
        "{r:?}"
    );
    assert_eq!(replica.status().head.0, 20);
    assert_eq!(replica.digest().expect("digest"), digest);
}

/// Found by `cargo xtask sim --seed 4242001668 --steps 300` and `--seed 4242012909` (before the
/// fix): inside a rebuild, the master bumped the epoch (queueing a delivery of every
/// assignment) and then the primary crashed and the master failed over (queued behind it). The
/// simulator's deferred work is drained again inside each delivery, so the failover ran (and
/// delivered the new roles) in the middle of the queued delivery, which then went on with the
/// roles it had read before: the new primary got a replica role and the old primary a primary
/// assignment, both at the new epoch. The old primary's service took it, stopped listening on
/// its data address, and was never told otherwise (the master re-sends only what a server has
/// not accepted at the current epoch and address version), so every recovery of it failed with
/// "nothing listens on" and it never came back in sync (invariant (e)). A batch of deliveries
/// now stops once the master's view has moved on, and a delivery that contradicts the master's
/// current view is a harness violation.
#[test]
fn failover_during_a_queued_delivery_sends_no_stale_roles() {
    let mut sim = sim(2);
    sim.apply(Op::Write { count: 5 });
    sim.apply(Op::Commit);
    // s2 falls beyond the primary's retention; s3 alone holds the committed prefix.
    let addr = sim.data_addr("s2");
    sim.apply(Op::Disconnect { addr: addr.clone() });
    for _ in 0..4 {
        sim.apply(Op::Write { count: 8 });
        sim.apply(Op::Commit);
    }
    sim.apply(Op::RetentionPressure);
    sim.apply(Op::Reconnect { addr });
    // Its restarted service has no registry the step hook could fence, so its rebuild goes on
    // after the epoch bump, as in both seeds.
    sim.apply(Op::CrashReplica {
        server: "s2".into(),
    });
    assert_clean(&sim);
    let epoch = sim.epoch();
    sim.at_next_recovery_step(Interleave::EpochBump);
    sim.at_next_recovery_step(Interleave::CrashPrimary { failover: true });
    sim.apply(Op::Rebuild {
        server: "s2".into(),
    });
    assert_clean(&sim);
    let events: Vec<Interleave> = sim.observations().into_iter().map(|o| o.event).collect();
    assert_eq!(
        events,
        [
            Interleave::EpochBump,
            Interleave::CrashPrimary { failover: true }
        ],
        "{}",
        sim.trace().join("\n")
    );
    assert_eq!(sim.primary(), "s3", "failed over to the only holder");
    assert_eq!(sim.epoch(), epoch + 2);
    assert_eq!(sim.role_of("s3"), Some(BlockRole::Primary));
    assert_eq!(sim.role_of("s1"), Some(BlockRole::Replica));
    assert_eq!(sim.role_of("s2"), Some(BlockRole::Replica));
    sim.run_healed_phase();
    assert_clean(&sim);
    assert_eq!(sim.state_of("s1"), Some(ReplicaState::InSync));
    assert_eq!(sim.state_of("s2"), Some(ReplicaState::InSync));
}
