//! Embedding the engine with its in-memory reference store: one primary, one replica that is
//! 30 entries behind, an assignment, a handshake, a plan, the executor, and the status after.
//!
//! Run: `cargo run -p engine --example in_memory`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::{
    AssignmentIntent, CatchUpExecutor, Endpoint, Epoch, Lsn, RecoveryDriver, ReplicaAssignment,
    ReplicaId, SessionKind,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The primary's storage: 100 writes, all committed by the replication layer.
    let primary = MemStorage::new();
    let head = primary.write_n(100);
    primary.commit(head)?;

    // A replica that holds the first 70 entries (it was down for the last 30).
    let replica = Arc::new(Mutex::new(
        ModelReplica::from_primary(&primary, Lsn(70)).ok_or("prefix beyond the primary")?,
    ));

    // One driver (and orchestrator) per volume, over the primary's storage.
    let driver = RecoveryDriver::new(Arc::new(primary.clone()));
    let id = ReplicaId::new("vol1/server-b")?;

    // The control plane's intent at epoch 1: the replica set, and who needs a recovery.
    let intent = AssignmentIntent {
        replicas: vec![ReplicaAssignment {
            replica_id: id.clone(),
            endpoint: Endpoint::new("10.0.0.2:3260", "10.0.0.2:3261", 1),
        }],
        epoch: Epoch(1),
        recovery_targets: BTreeMap::from([(id.clone(), SessionKind::CatchUp)]),
        catch_up_budget: None,
    };
    let assigned = driver.orchestrator().process_assignment(&intent)?;
    println!("sessions created: {:?}", assigned.sessions_created);

    // The replica's handshake (its flushed LSN and the identity of its last entry) decides
    // the plan: here a catch-up of (70, 100], with the primary's WAL pinned.
    let handshake = replica.lock().map_err(|_| "poisoned")?.handshake();
    let plan = driver.plan_recovery(&id, handshake)?;
    println!("plan: {} with {} pin(s)", plan.outcome(), plan.pins_held());

    // The executor moves the entries through the I/O, in chunks, then a durability barrier.
    let mut io = ModelIo::new(primary.clone(), Arc::clone(&replica));
    let report = CatchUpExecutor::new(&driver, plan).execute(&mut io)?;
    println!(
        "{}: {} entries, {} bytes, replica {} at {}",
        report.path,
        report.entries_applied,
        report.bytes_transferred(),
        report.final_state,
        report.durable_lsn.unwrap_or(Lsn::ZERO),
    );
    assert_eq!(
        primary.pins_outstanding(),
        0,
        "the plan's pins were released"
    );

    let status = driver.orchestrator().registry().status();
    println!("in sync: {} of {}", status.in_sync, status.total_count);
    for event in driver.orchestrator().log().events() {
        println!("  {event}");
    }
    Ok(())
}
