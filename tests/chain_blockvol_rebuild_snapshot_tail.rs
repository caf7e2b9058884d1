//! Conformance scenario `rebuild_snapshot_tail` on real blockvol volume files through v2bridge (see
//! `engine::conformance` for what it asserts as it runs; the chain runner also checks the WAL
//! entries and bytes it moved, `swblock::chain::expected_moved`).

use swblock::chain::Store;

#[test]
fn rebuild_snapshot_tail() {
    let r = swblock::chain::run_conformance(Store::Blockvol, "rebuild_snapshot_tail")
        .expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
