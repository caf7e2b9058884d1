//! Recovery through a fault proxy between the primary and a replica process: a flipped bit in
//! a request or a reply, a cut in the middle of a frame, duplicated bytes. Each must stop the
//! recovery with a typed error, apply nothing from the damaged frame (the replica's bytes equal
//! the oracle at whatever head it reached), release the pins, leave the replica out of sync,
//! and let the next attempt finish byte-identical. A slow link only slows the recovery.

use std::path::Path;
use std::time::Duration;

use engine::conformance::Harness;
use engine::{
    AssignmentIntent, CatchUpExecutor, Endpoint, Epoch, ExecutorOptions, Lsn, RecoveryDriver,
    ReplicaAssignment, ReplicaId, ReplicaState, SessionKind,
};
use transport::harness::{Direction, Fault, FaultProxy, NetHarness};
use transport::net::{ClientConfig, RemoteReplica};

fn rid() -> ReplicaId {
    ReplicaId::new("r1").unwrap()
}

fn assign(driver: &RecoveryDriver, epoch: u64) {
    driver
        .orchestrator()
        .process_assignment(&AssignmentIntent {
            replicas: vec![ReplicaAssignment {
                replica_id: rid(),
                endpoint: Endpoint::new("r1.data", "r1.ctrl", 1),
            }],
            epoch: Epoch(epoch),
            recovery_targets: [(rid(), SessionKind::CatchUp)].into(),
            catch_up_budget: None,
        })
        .expect("assignment");
}

fn chunked() -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: 10,
        ..ExecutorOptions::default()
    }
}

/// The replica's head, asked directly (not through the proxy).
fn replica_head(h: &mut NetHarness) -> Lsn {
    let addr = h.process().addr();
    let mut r = RemoteReplica::connect(addr, "r1", &ClientConfig::default()).expect("connect");
    engine::Lsn(r.probe(false).expect("probe").head.0)
}

/// Runs a catch-up of 180 entries through a proxy with `fault`; returns whether the first
/// attempt failed. Checks the replica after it and after a clean second attempt.
fn catch_up_through(direction: Direction, fault: Fault) -> bool {
    let bin = Path::new(env!("CARGO_BIN_EXE_swblock-replicad"));
    let mut h = NetHarness::new(bin).expect("harness");
    let head = h.primary_write(200).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", Lsn(20)).unwrap();
    let proxy = FaultProxy::start(h.process().addr()).expect("proxy");
    h.route_io_via(Some(proxy.addr()));
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1);

    let plan = driver
        .plan_recovery(&rid(), h.replica_handshake("r1").unwrap())
        .unwrap();
    let sid = plan.session_id().unwrap();
    proxy.set(direction, fault);
    let mut io = h.io("r1", Epoch(1), sid).unwrap();
    let first = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked())
        .execute(&mut io);
    drop(io);
    let failed = first.is_err();
    if let Err(e) = &first {
        let text = e.to_string();
        assert!(
            text.contains("transport") || text.contains("bad frame") || text.contains("crc"),
            "{text}"
        );
        assert_eq!(
            h.pins_outstanding(),
            0,
            "a failed catch-up releases its pin"
        );
        let sender = driver.orchestrator().sender(&rid()).unwrap();
        assert_ne!(sender.state(), ReplicaState::InSync);
        // Nothing from a damaged frame was applied: what the replica holds is exactly the
        // primary's first `at` entries.
        let at = replica_head(&mut h);
        assert!(at >= Lsn(20) && at < head, "replica at {at}");
        assert!(
            h.replica_matches_primary("r1", at).unwrap(),
            "replica bytes at {at} differ from the oracle"
        );
    }
    // The next attempt, with no fault, finishes.
    assign(&driver, 2);
    let plan = driver
        .plan_recovery(&rid(), h.replica_handshake("r1").unwrap())
        .unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(2), sid).unwrap();
    let report = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked())
        .execute(&mut io)
        .expect("recovery after the fault");
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    assert_eq!(h.pins_outstanding(), 0);
    if !matches!(fault, Fault::None | Fault::Delay(_)) {
        assert_eq!(proxy.fired(), 1, "the fault fired");
    }
    failed
}

#[test]
fn a_flipped_bit_in_a_request_is_refused_and_recovery_resumes() {
    // Byte 20,000 of the client's stream is inside the first apply frame (each is about 41 KB).
    assert!(catch_up_through(Direction::Up, Fault::FlipBit(20_000)));
}

#[test]
fn a_flipped_bit_in_a_reply_is_refused_and_recovery_resumes() {
    // Past the challenge and ready frames, inside the replies to the first requests.
    assert!(catch_up_through(Direction::Down, Fault::FlipBit(300)));
}

#[test]
fn a_cut_in_the_middle_of_a_frame_and_recovery_resumes() {
    assert!(catch_up_through(Direction::Up, Fault::CutAfter(60_000)));
}

#[test]
fn duplicated_bytes_are_refused_and_recovery_resumes() {
    assert!(catch_up_through(
        Direction::Up,
        Fault::Duplicate(30_000, 100)
    ));
}

#[test]
fn a_slow_link_only_slows_the_recovery() {
    assert!(!catch_up_through(
        Direction::Up,
        Fault::Delay(Duration::from_millis(2))
    ));
}
