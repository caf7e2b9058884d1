//! A local cluster of real processes (`swblock cluster up`: a development master and three
//! volume servers on loopback) driven by clients we did not write, `qemu-io` and `qemu-img`
//! through `nbd://`: the steps of `server::scenarios` (patterns, a 64 MiB image in and out,
//! a sync_all flush refused with a replica down, a replica back by catch-up, kill -9 of the
//! primary and promotion, the old primary back byte-identical, writes refused once the lease
//! runs out and accepted again after the master restarts). `cargo xtask chain-test` reports
//! the same steps as its `cluster/` rows.

use std::path::Path;

#[test]
fn a_cluster_of_processes_passes_every_step_of_the_scenario() {
    if let Some(missing) = server::scenarios::clients_missing() {
        panic!("{missing}: the cluster test needs the NBD clients (.ci/run installs them)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let reports = server::scenarios::run(Path::new(env!("CARGO_BIN_EXE_swblock")), tmp.path());
    for r in &reports {
        eprintln!(
            "cluster/{:<20} {:<6} {:>7.1} s  {}  [{}] {} bytes{}",
            r.name,
            if r.passed { "ok" } else { "FAILED" },
            r.elapsed.as_secs_f64(),
            r.outcome,
            r.path,
            r.bytes,
            r.failure
                .as_deref()
                .map(|f| format!("\n    failure: {f}"))
                .unwrap_or_default()
        );
    }
    assert_eq!(reports.len(), server::scenarios::STEPS.len());
    let failed: Vec<_> = reports.iter().filter(|r| !r.passed).collect();
    if !failed.is_empty() {
        // Keep the logs of a failed run for whoever reads the failure.
        let kept = tmp.keep();
        panic!(
            "{} step(s) failed, first: cluster/{}: {}; logs in {}",
            failed.len(),
            failed[0].name,
            failed[0].failure.as_deref().unwrap_or(""),
            kept.join("cluster").display()
        );
    }
}
