//! The conformance scenarios on the engine's in-memory reference store, as the chain runner
//! runs them: each must pass and move exactly the WAL entries and bytes
//! `swblock::chain::expected_moved` gives (the engine's own tests run the same scenarios
//! without the byte check).

use swblock::chain::{Store, expected_moved, run_conformance};

#[test]
fn memory_conformance_scenarios_move_their_expected_entries_and_bytes() {
    let names: Vec<&str> = engine::conformance::scenarios::<engine::testing::MemHarness>()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.len() >= 9, "{names:?}");
    for name in names {
        assert!(
            expected_moved(Store::Memory, name).is_some(),
            "no expectation for memory/{name}"
        );
        let r = run_conformance(Store::Memory, name).expect("known scenario");
        assert!(r.passed, "memory/{}: {:?}", r.name, r.failure);
        assert_eq!(r.pins_outstanding, 0, "memory/{name}: pins left");
        assert!(r.digest_match, "memory/{name}: data differs");
    }
}
