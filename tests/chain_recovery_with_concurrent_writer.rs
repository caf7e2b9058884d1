//! Chain scenario `recovery_with_concurrent_writer` on real volume files (see `swblock::scenarios`).

#[test]
fn recovery_with_concurrent_writer() {
    let r = swblock::scenarios::run("recovery_with_concurrent_writer").expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
