//! The engine's conformance suite on real volume files through v2bridge.

use engine::conformance::{self, ScenarioReport};
use v2bridge::harness::BlockVolHarness;

fn run(name: &str) -> ScenarioReport {
    let h = BlockVolHarness::new().expect("harness");
    let r = conformance::run_scenario(name, h).expect("known scenario");
    assert!(r.passed, "{name} failed: {:?}", r.failure);
    assert_eq!(r.pins_outstanding, 0, "{name} left pins on the primary");
    assert!(
        r.digest_match,
        "{name}: replica bytes differ from the primary's"
    );
    r
}

#[test]
fn zero_gap() {
    let r = run("zero_gap");
    assert_eq!((r.path.as_str(), r.entries_applied), ("zero_gap", 0));
}

#[test]
fn catch_up() {
    let r = run("catch_up");
    assert_eq!((r.path.as_str(), r.entries_applied), ("catchup", 30));
    assert!(r.bytes_transferred >= 30 * 4096);
}

#[test]
fn truncation() {
    let r = run("truncation");
    assert_eq!((r.path.as_str(), r.entries_applied), ("truncate", 0));
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
    // 100 distinct blocks of 4 KiB were written; zero blocks are not sent.
    assert_eq!(r.bytes_transferred, 100 * 4096);
}

#[test]
fn epoch_bump_mid_execution() {
    let r = run("epoch_bump_mid_execution");
    assert_eq!(
        (r.path.as_str(), r.entries_applied),
        ("catchup+catchup", 60)
    );
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
