//! The chain scenarios, one rstest case each: the engine's conformance scenarios on real
//! blockvol volume files through v2bridge, over TCP to a replica process, and on the in-memory
//! store (each must move exactly
//! the WAL entries and bytes `swblock::chain::expected_moved` gives), and the chain scenarios
//! of `swblock::scenarios` on real volume files across crates. `cargo xtask chain-test` runs
//! the same scenarios and prints a row for each.

use engine::conformance::ScenarioReport;
use rstest::rstest;
use swblock::chain::{Store, expected_moved, run_conformance};

fn assert_clean(r: &ScenarioReport) {
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(
        r.pins_outstanding, 0,
        "{}: pins left on the primary",
        r.name
    );
    assert!(
        r.digest_match,
        "{}: replica bytes differ from the primary's at the target",
        r.name
    );
    assert!(!r.path.is_empty(), "{}: no recovery path ran", r.name);
}

/// Each conformance scenario on real volume files in this process (`Store::Blockvol`) and with
/// the replicas in a `swblock-replicad` process, every byte crossing a TCP socket and the
/// replica process itself reporting the digest checked against the oracle (`Store::Net`).
#[rstest]
#[case::budget_escalation("budget_escalation")]
#[case::catch_up("catch_up")]
#[case::endpoint_change_mid_execution("endpoint_change_mid_execution")]
#[case::epoch_bump_mid_execution("epoch_bump_mid_execution")]
#[case::pin_failure("pin_failure")]
#[case::rebuild_full_base("rebuild_full_base")]
#[case::rebuild_snapshot_tail("rebuild_snapshot_tail")]
#[case::truncation("truncation")]
#[case::zero_gap("zero_gap")]
fn conformance_on_volumes(#[case] name: &str, #[values(Store::Blockvol, Store::Net)] store: Store) {
    assert!(
        expected_moved(store, name).is_some(),
        "no expectation for {}/{name}",
        store.as_str()
    );
    assert_clean(&run_conformance(store, name).expect("known scenario"));
}

#[rstest]
#[case::cancel_mid_execution("cancel_mid_execution")]
#[case::epoch_bump_every_chunk_catch_up("epoch_bump_every_chunk_catch_up")]
#[case::epoch_bump_every_chunk_rebuild("epoch_bump_every_chunk_rebuild")]
#[case::gap_beyond_retention_rebuild_assignment("gap_beyond_retention_rebuild_assignment")]
#[case::recovery_with_concurrent_writer("recovery_with_concurrent_writer")]
#[case::replica_crash_mid_base_install("replica_crash_mid_base_install")]
#[case::three_replicas_three_outcomes("three_replicas_three_outcomes")]
#[case::wal_recycled_under_catch_up("wal_recycled_under_catch_up")]
fn chain(#[case] name: &str) {
    assert_clean(&swblock::scenarios::run(name).expect("known scenario"));
}

/// Every conformance scenario has a case above, and every one passes on the in-memory store
/// with its expected entries and bytes.
#[test]
fn every_conformance_scenario_has_a_case_and_passes_in_memory() {
    let names: Vec<&str> = engine::conformance::scenarios::<engine::testing::MemHarness>()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let covered = [
        "budget_escalation",
        "catch_up",
        "endpoint_change_mid_execution",
        "epoch_bump_mid_execution",
        "pin_failure",
        "rebuild_full_base",
        "rebuild_snapshot_tail",
        "truncation",
        "zero_gap",
    ];
    for name in &names {
        assert!(covered.contains(name), "no blockvol case for {name}");
        assert!(
            expected_moved(Store::Memory, name).is_some(),
            "no expectation for memory/{name}"
        );
        assert_clean(&run_conformance(Store::Memory, name).expect("known scenario"));
    }
    assert_eq!(names.len(), covered.len());
}

/// Every chain scenario has a case above.
#[test]
fn every_chain_scenario_has_a_case() {
    let covered = [
        "cancel_mid_execution",
        "epoch_bump_every_chunk_catch_up",
        "epoch_bump_every_chunk_rebuild",
        "gap_beyond_retention_rebuild_assignment",
        "recovery_with_concurrent_writer",
        "replica_crash_mid_base_install",
        "three_replicas_three_outcomes",
        "wal_recycled_under_catch_up",
    ];
    let names: Vec<&str> = swblock::scenarios::all()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), covered.len(), "{names:?}");
    for n in names {
        assert!(covered.contains(&n), "no case for {n}");
    }
}
