//! Chain scenario `replica_crash_mid_base_install` on real volume files (see `swblock::scenarios`).

#[test]
fn replica_crash_mid_base_install() {
    let r = swblock::scenarios::run("replica_crash_mid_base_install").expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
