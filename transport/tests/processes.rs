//! Recovery between real processes: the primary in this test process, replicas in a
//! `swblock-replicad` process on loopback, every byte crossing a TCP socket.
//!
//! (The engine's conformance scenarios over the network are the `net/` rows of the chain
//! test, `tests/chain.rs` at the workspace root, with the bytes each must move.)
//! - kill -9 of the replica process in the middle of a catch-up and of a base image, then a new
//!   attempt against the restarted process that ends byte-identical to an oracle image.

use std::cell::Cell;
use std::path::Path;

use engine::conformance::Harness;
use engine::{
    AssignmentIntent, CatchUpExecutor, Endpoint, Epoch, ExecutorOptions, Lsn, RebuildExecutor,
    RecoveryDriver, RecoveryPath, ReplicaAssignment, ReplicaId, ReplicaState, SessionKind,
};
use transport::harness::NetHarness;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_swblock-replicad"))
}

fn harness() -> NetHarness {
    NetHarness::new(bin()).expect("start a replica process")
}

fn rid() -> ReplicaId {
    ReplicaId::new("r1").unwrap()
}

fn assign(driver: &RecoveryDriver, epoch: u64, kind: SessionKind) {
    driver
        .orchestrator()
        .process_assignment(&AssignmentIntent {
            replicas: vec![ReplicaAssignment {
                replica_id: rid(),
                endpoint: Endpoint::new("r1.data", "r1.ctrl", 1),
            }],
            epoch: Epoch(epoch),
            recovery_targets: [(rid(), kind)].into(),
            catch_up_budget: None,
        })
        .expect("assignment");
}

fn chunked(entries: u64, base_bytes: u64) -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: entries,
        max_base_chunk_bytes: base_bytes,
        ..ExecutorOptions::default()
    }
}

/// Kills the replica process after `after` steps, from the executor's step hook.
fn killer(h: &mut NetHarness) -> impl FnMut(&engine::StepInfo) + '_ {
    let steps = Cell::new(0u64);
    let process = h.process();
    move |_| {
        steps.set(steps.get() + 1);
        if steps.get() == 2 {
            process.kill();
        }
    }
}

#[test]
fn kill_9_of_the_replica_mid_catch_up_then_recovery_to_identical_bytes() {
    let mut h = harness();
    let head = h.primary_write(200).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", Lsn(20)).unwrap();
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, SessionKind::CatchUp);

    let plan = driver
        .plan_recovery(&rid(), h.replica_handshake("r1").unwrap())
        .unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(1), sid).unwrap();
    let err = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(10, 1 << 20))
        .with_on_step(killer(&mut h))
        .execute(&mut io)
        .expect_err("the replica process died");
    assert!(err.to_string().contains("transport"), "{err}");
    drop(io);
    assert_eq!(
        h.pins_outstanding(),
        0,
        "a failed catch-up releases its pin"
    );
    let sender = driver.orchestrator().sender(&rid()).unwrap();
    assert_ne!(sender.state(), ReplicaState::InSync);

    // The restarted process recovers its volume from its own WAL; a new assignment catches up
    // from wherever the replica made it durable.
    h.process().restart().unwrap();
    assign(&driver, 2, SessionKind::CatchUp);
    let hs = h.replica_handshake("r1").unwrap();
    assert!(hs.flushed() >= Lsn(20) && hs.flushed() < head, "{hs:?}");
    let plan = driver.plan_recovery(&rid(), hs).unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(2), sid).unwrap();
    let report = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(10, 1 << 20))
        .execute(&mut io)
        .expect("catch-up after the restart");
    assert_eq!(report.path, RecoveryPath::CatchUp);
    assert_eq!(report.entries_applied, head.get() - hs.flushed().get());
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    assert_eq!(h.pins_outstanding(), 0);
}

#[test]
fn kill_9_of_the_replica_mid_image_then_a_rebuild_to_identical_bytes() {
    let mut h = harness();
    let head = h.primary_write(150).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", Lsn(0)).unwrap();
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, SessionKind::Rebuild);

    let plan = driver.plan_rebuild(&rid()).unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(1), sid).unwrap();
    let err = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 64 << 10))
        .with_on_step(killer(&mut h))
        .execute(&mut io)
        .expect_err("the replica process died mid-image");
    assert!(err.to_string().contains("transport"), "{err}");
    drop(io);
    assert_eq!(
        h.pins_outstanding(),
        0,
        "a failed rebuild releases its image pin"
    );

    // After the restart the replica knows its install was interrupted: it is not a copy.
    h.process().restart().unwrap();
    let hs = h.replica_handshake("r1").unwrap();
    assert!(hs.is_incomplete(), "{hs:?}");
    assign(&driver, 2, SessionKind::Rebuild);
    let plan = driver.plan_rebuild(&rid()).unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(2), sid).unwrap();
    let report = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 64 << 10))
        .execute(&mut io)
        .expect("rebuild after the restart");
    // The first attempt's pin let the primary flush, so the second may start from its
    // checkpoint image; either way an image crosses the network again.
    assert!(
        matches!(
            report.path,
            RecoveryPath::RebuildFullBase | RecoveryPath::RebuildSnapshotTail
        ),
        "{:?}",
        report.path
    );
    assert!(report.base_lsn.is_some_and(|b| b <= head));
    assert!(report.base_bytes_sent > 0);
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    assert_eq!(h.pins_outstanding(), 0);
}

/// Resumable base: the replica process is killed mid-image; the primary keeps the image it
/// let go of (its image keeper), so the next rebuild pins the very same image, and the
/// restarted replica resumes its install at its last durable resume point: fewer image bytes
/// cross the network the second time, the ones skipped are reported as resumed, and the
/// replica ends byte-identical to the primary.
#[test]
fn kill_9_mid_image_then_the_next_rebuild_resumes_on_the_same_image() {
    use std::sync::{Arc, Mutex};
    let mut h = NetHarness::with_replica_args(bin(), &["--install-stride", "16384"])
        .expect("start a replica process");
    let head = h.primary_write(200).unwrap();
    h.primary_commit(head).unwrap();
    h.add_replica("r1", Lsn(0)).unwrap();
    let storage = Arc::clone(h.local().storage_adapter());
    let kept = Arc::new(Mutex::new(Vec::new()));
    let k2 = Arc::clone(&kept);
    storage.set_image_keeper(Some(Arc::new(move |pin| k2.lock().unwrap().push(pin))));
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, SessionKind::Rebuild);

    let plan = driver.plan_rebuild(&rid()).unwrap();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(1), sid).unwrap();
    let steps = Cell::new(0u64);
    let err = {
        let process = h.process();
        RebuildExecutor::new(&driver, plan)
            .with_options(chunked(16, 16 << 10))
            .with_on_step(|_| {
                // Chunks are pipelined: pace them so the replica applies (and makes durable)
                // a good part of what was sent before it dies.
                std::thread::sleep(std::time::Duration::from_millis(10));
                steps.set(steps.get() + 1);
                if steps.get() == 30 {
                    process.kill();
                }
            })
            .execute(&mut io)
            .expect_err("the replica process died mid-image")
    };
    assert!(err.to_string().contains("transport"), "{err}");
    let first = io.stats;
    drop(io);
    assert_eq!(kept.lock().unwrap().len(), 1, "the keeper holds the image");

    h.process().restart().unwrap();
    assert!(h.replica_handshake("r1").unwrap().is_incomplete());
    assign(&driver, 2, SessionKind::Rebuild);
    let plan = driver.plan_rebuild(&rid()).unwrap();
    // The plan holds its own pin on the same image now.
    kept.lock().unwrap().clear();
    let sid = plan.session_id().unwrap();
    let mut io = h.io("r1", Epoch(2), sid).unwrap();
    let report = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(16, 16 << 10))
        .execute(&mut io)
        .expect("rebuild after the restart");
    let second = io.stats;
    drop(io);
    eprintln!(
        "first attempt {first:?}, second {second:?}, {:?}",
        report.path
    );
    assert!(
        second.base_bytes_resumed > 0,
        "the second attempt resumed: {second:?}"
    );
    assert!(
        second.base_bytes_resumed <= first.base_bytes_sent,
        "it resumed no further than the first attempt sent: {first:?} {second:?}"
    );
    assert!(
        second.base_bytes_sent + second.base_bytes_resumed >= report.base_bytes_sent,
        "{second:?} {report:?}"
    );
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(h.replica_matches_primary("r1", head).unwrap());
    storage.set_image_keeper(None);
    assert_eq!(
        kept.lock().unwrap().len(),
        1,
        "the finished rebuild's image, kept"
    );
    kept.lock().unwrap().clear();
    assert_eq!(h.pins_outstanding(), 0);
}
