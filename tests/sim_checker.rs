//! The checker can fail: each test-only [`Bug`] switch makes the simulated system misbehave in
//! one way, and the matching invariant must be reported (and, run without the switch, the same
//! scenario must be clean, so the report comes from the misbehaviour and not from the scenario).

use engine::ReplicaState;
use swblock::sim::{Bug, Invariant, Op, Sim, SimOptions, StaleKind};

fn sim(replicas: usize, bug: Option<Bug>) -> Sim {
    let mut o = SimOptions::new(3, 0);
    o.replicas = Some(replicas);
    o.interleave_per_mille = Some(0);
    o.bug = bug;
    Sim::new(o).unwrap_or_else(|e| panic!("sim: {e}"))
}

fn write_and_commit(sim: &mut Sim, n: u32) {
    sim.apply(Op::Write { count: n });
    sim.apply(Op::Commit);
}

/// Runs `scenario` without and with `bug`: clean without, `expected` reported with.
fn caught(bug: Bug, replicas: usize, expected: Invariant, scenario: impl Fn(&mut Sim)) -> String {
    let mut good = sim(replicas, None);
    scenario(&mut good);
    assert!(
        good.violations().is_empty(),
        "without the bug: {:?}\n{}",
        good.violations(),
        good.trace().join("\n")
    );
    let mut bad = sim(replicas, Some(bug));
    scenario(&mut bad);
    let v = bad.violations();
    assert!(
        v.iter().any(|x| x.invariant == expected),
        "{bug:?} was not reported as {expected:?}: {v:?}\n{}",
        bad.trace().join("\n")
    );
    v.iter()
        .find(|x| x.invariant == expected)
        .map(|x| x.detail.clone())
        .unwrap_or_default()
}

/// A replica whose divergent tail ends exactly at the new committed LSN, recovered by a
/// handshake that compares LSNs only (the reference's behaviour), is declared in sync with
/// different bytes: (a).
#[test]
fn handshake_without_log_matching_is_caught() {
    let detail = caught(
        Bug::UnverifiedHandshake,
        3,
        Invariant::InSyncHoldsCommitted,
        |sim| {
            write_and_commit(sim, 10);
            sim.apply(Op::Write { count: 4 });
            sim.apply(Op::ShipUncommitted {
                to: vec!["s3".into()],
            });
            let addr = sim.data_addr("s3");
            sim.apply(Op::Disconnect { addr: addr.clone() });
            sim.apply(Op::Failover {
                to: Some("s2".into()),
                zombie_writes: 0,
                zombie_ship: Vec::new(),
                crash_old: false,
            });
            write_and_commit(sim, 4);
            sim.apply(Op::Reconnect { addr });
            sim.apply(Op::Reassign);
        },
    );
    assert!(detail.contains("s3 is in sync"), "{detail}");
}

/// A lagging replica declared in sync without any recovery: (a).
#[test]
fn in_sync_without_recovery_is_caught() {
    let detail = caught(
        Bug::FalseInSync,
        2,
        Invariant::InSyncHoldsCommitted,
        |sim| {
            write_and_commit(sim, 5);
            let addr = sim.data_addr("s2");
            sim.apply(Op::Disconnect { addr });
            write_and_commit(sim, 9);
            sim.apply(Op::Commit);
        },
    );
    assert!(detail.contains("s2 is in sync"), "{detail}");
}

/// A failover to a replica that missed committed writes: (b).
#[test]
fn promotion_without_the_committed_prefix_is_caught() {
    let detail = caught(
        Bug::DesperatePromotion,
        2,
        Invariant::CommittedNeverLost,
        |sim| {
            write_and_commit(sim, 5);
            let addr = sim.data_addr("s3");
            sim.apply(Op::Disconnect { addr });
            write_and_commit(sim, 5);
            sim.apply(Op::Failover {
                to: None,
                zombie_writes: 0,
                zombie_ship: Vec::new(),
                crash_old: false,
            });
        },
    );
    assert!(
        detail.contains("does not hold the committed prefix"),
        "{detail}"
    );
}

/// A recovery that leaves a WAL pin behind: (d).
#[test]
fn leaked_pin_is_caught() {
    let detail = caught(Bug::LeakPin, 2, Invariant::NoPinWithoutRecovery, |sim| {
        write_and_commit(sim, 5);
        let addr = sim.data_addr("s2");
        sim.apply(Op::Disconnect { addr: addr.clone() });
        write_and_commit(sim, 5);
        sim.apply(Op::Reconnect { addr });
        sim.apply(Op::Reassign);
    });
    assert!(detail.contains("s1 has 1 pins"), "{detail}");
}

/// A "stale" request stamped with the replica's current epoch gets through and wipes it: (c).
#[test]
fn stale_request_that_changes_state_is_caught() {
    let detail = caught(
        Bug::StaleStampedCurrent,
        2,
        Invariant::StaleChangesNothing,
        |sim| {
            write_and_commit(sim, 5);
            sim.apply(Op::EpochBump);
            write_and_commit(sim, 5);
            sim.apply(Op::StaleMessage {
                server: "s2".into(),
                kind: StaleKind::BeginBase,
            });
        },
    );
    assert!(detail.contains("BeginBase"), "{detail}");
}

/// A master that never sends rebuilding assignments leaves a replica beyond retention out of
/// sync forever: (e).
#[test]
fn healing_that_never_converges_is_caught() {
    let detail = caught(Bug::NoRebuildAssignments, 2, Invariant::Liveness, |sim| {
        write_and_commit(sim, 5);
        let addr = sim.data_addr("s2");
        sim.apply(Op::Disconnect { addr });
        for _ in 0..3 {
            write_and_commit(sim, 8);
        }
        sim.apply(Op::RetentionPressure);
        sim.run_healed_phase();
    });
    assert!(detail.contains("not every replica in sync"), "{detail}");
}

/// A replica that installs a rebuild's base image with one block of wrong bytes ends at the
/// right LSN with the right entry identity: only the digest comparison can see it, and it must
/// (a).
#[test]
fn install_with_wrong_bytes_at_the_right_tip_is_caught() {
    let detail = caught(
        Bug::CorruptBaseBlock,
        2,
        Invariant::InSyncHoldsCommitted,
        |sim| {
            write_and_commit(sim, 5);
            let addr = sim.data_addr("s2");
            sim.apply(Op::Disconnect { addr: addr.clone() });
            for _ in 0..3 {
                write_and_commit(sim, 8);
            }
            sim.apply(Op::RetentionPressure);
            sim.apply(Op::Reconnect { addr });
            sim.apply(Op::Reassign);
            assert_eq!(sim.state_of("s2"), Some(ReplicaState::NeedsRebuild));
            sim.apply(Op::Rebuild {
                server: "s2".into(),
            });
            sim.apply(Op::Reassign);
            write_and_commit(sim, 3);
        },
    );
    assert!(detail.contains("s2 is in sync"), "{detail}");
    assert!(detail.contains("digest"), "{detail}");
    // Nothing but the bytes is wrong: head, durability and the entry at the head all match.
    assert!(!detail.contains("entry at"), "{detail}");
    assert!(!detail.contains("head "), "{detail}");
}

/// The bugs are the only difference: the default run of the same scenario leaves the replica
/// in sync after healing.
#[test]
fn healed_phase_rebuilds_what_needs_a_rebuild() {
    let mut s = sim(2, None);
    write_and_commit(&mut s, 5);
    let addr = s.data_addr("s2");
    s.apply(Op::Disconnect { addr });
    for _ in 0..3 {
        write_and_commit(&mut s, 8);
    }
    s.apply(Op::RetentionPressure);
    s.run_healed_phase();
    assert!(s.violations().is_empty(), "{:?}", s.violations());
    assert_eq!(s.state_of("s2"), Some(ReplicaState::InSync));
    assert!(s.recoveries().keys().any(|k| k.starts_with("rebuild_")));
}
