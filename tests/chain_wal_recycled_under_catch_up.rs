//! Chain scenario `wal_recycled_under_catch_up` on real volume files (see `swblock::scenarios`).

#[test]
fn wal_recycled_under_catch_up() {
    let r = swblock::scenarios::run("wal_recycled_under_catch_up").expect("known scenario");
    assert!(r.passed, "{}: {:?}", r.name, r.failure);
    assert_eq!(r.pins_outstanding, 0, "pins left on the primary");
    assert!(
        r.digest_match,
        "replica bytes differ from the primary's at the target"
    );
    assert!(!r.path.is_empty(), "no recovery path ran");
}
