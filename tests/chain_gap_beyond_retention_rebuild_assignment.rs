//! Chain scenario `gap_beyond_retention_rebuild_assignment` on real volume files (see `swblock::scenarios`).

#[test]
fn gap_beyond_retention_rebuild_assignment() {
    let r =
        swblock::scenarios::run("gap_beyond_retention_rebuild_assignment").expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
