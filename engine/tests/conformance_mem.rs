//! The conformance suite on the in-memory reference store and model replicas.

use engine::conformance::{self, ScenarioReport};
use engine::testing::MemHarness;

fn run(name: &str) -> ScenarioReport {
    let r = conformance::run_scenario(name, MemHarness::new()).expect("known scenario");
    assert!(r.passed, "{name} failed: {:?}", r.failure);
    assert_eq!(r.pins_outstanding, 0, "{name} left pins");
    assert!(
        r.digest_match,
        "{name}: replica data differs from the primary"
    );
    r
}

#[test]
fn zero_gap() {
    let r = run("zero_gap");
    assert_eq!(r.path, "zero_gap");
    assert_eq!(r.entries_applied, 0);
}

#[test]
fn catch_up() {
    let r = run("catch_up");
    assert_eq!(r.path, "catchup");
    assert_eq!(r.entries_applied, 30);
}

#[test]
fn truncation() {
    let r = run("truncation");
    assert_eq!(r.path, "truncate");
}

#[test]
fn rebuild_snapshot_tail() {
    let r = run("rebuild_snapshot_tail");
    assert_eq!(r.path, "rebuild_snapshot_tail");
    assert_eq!(r.entries_applied, 50);
}

#[test]
fn rebuild_full_base() {
    let r = run("rebuild_full_base");
    assert_eq!(r.path, "rebuild_full_base");
    assert!(r.bytes_transferred > 0);
}

#[test]
fn epoch_bump_mid_execution() {
    let r = run("epoch_bump_mid_execution");
    assert_eq!(r.path, "catchup+catchup");
    assert_eq!(r.entries_applied, 60);
}

#[test]
fn endpoint_change_mid_execution() {
    let r = run("endpoint_change_mid_execution");
    assert_eq!(r.path, "catchup+catchup");
}

#[test]
fn pin_failure() {
    let r = run("pin_failure");
    assert_eq!(
        r.path,
        "catchup+rebuild_snapshot_tail+rebuild_snapshot_tail"
    );
}

#[test]
fn budget_escalation() {
    let r = run("budget_escalation");
    assert_eq!(r.path, "catchup+rebuild_full_base");
}

#[test]
fn every_scenario_has_a_test_here() {
    let names: Vec<&str> = conformance::scenarios::<MemHarness>()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(names.len(), 9);
    conformance::assert_all_pass(|_| MemHarness::new());
}
