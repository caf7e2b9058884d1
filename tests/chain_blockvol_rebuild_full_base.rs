//! Conformance scenario `rebuild_full_base` on real blockvol volume files through v2bridge (see
//! `engine::conformance` for what it asserts as it runs; the chain runner also checks the WAL
//! entries and bytes it moved, `swblock::chain::expected_moved`).

use swblock::chain::Store;

#[test]
fn rebuild_full_base() {
    let r = swblock::chain::run_conformance(Store::Blockvol, "rebuild_full_base")
        .expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
