//! Conformance scenario `epoch_bump_mid_execution` on real blockvol volume files through v2bridge (see
//! `engine::conformance` for what it asserts as it runs).

#[test]
fn epoch_bump_mid_execution() {
    let h = v2bridge::harness::BlockVolHarness::new().expect("harness");
    let r =
        engine::conformance::run_scenario("epoch_bump_mid_execution", h).expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
