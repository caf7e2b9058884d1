//! A primary and a replica volume file, each owned by a volume server with its own data
//! directory, recovered through `controlbridge` (the master's assignments) and `v2bridge` (the
//! engine's storage and I/O on real blockvol files): the replica misses 100 writes while it is
//! unreachable, and the next assignment catches it up; both files then hold the same bytes.
//!
//! Run: `cargo run --example primary_and_replica`.

use blockvol::{CreateOptions, Lba, OpenOptions};
use controlbridge::{BlockVolumeAssignment, RecoveryRecord};
use swblock::cluster::{Fabric, server};

const VOLUME: &str = "vol1";

/// The master's assignment of `VOLUME` at `epoch`: `role` 1 is primary, 2 replica.
fn assignment(epoch: u64, role: u32, replicas: &[&str]) -> BlockVolumeAssignment {
    swblock::cluster::assignment(VOLUME, epoch, role, replicas)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // Stands in for the network between the two servers (in one process here).
    let fabric = Fabric::new();
    let create = CreateOptions {
        volume_size_bytes: 4 << 20,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    };
    let mut vs1 = server(
        dir.path(),
        "vs1",
        create.clone(),
        OpenOptions::manual(),
        &fabric,
    )?;
    let mut vs2 = server(dir.path(), "vs2", create, OpenOptions::manual(), &fabric)?;

    // Epoch 1: vs2 holds the replica, vs1 the primary (both volumes are created empty). Each
    // assignment's recoveries run at once (`_inline`).
    let out = vs2.process_assignments_inline(&[assignment(1, 2, &[])]);
    assert!(out[0].error.is_none(), "{:?}", out[0].error);
    let out = vs1.process_assignments_inline(&[assignment(1, 1, &["vs2"])]);
    for (id, record) in &out[0].recoveries {
        println!("epoch 1: {id}: {record}");
    }

    // vs2 is cut off while the primary takes 100 writes, durable and committed.
    fabric.set_down("vs2:3260", true);
    let primary = vs1.backend().volume(VOLUME).ok_or("no primary volume")?;
    for lba in 0..100u64 {
        primary.write(Lba(lba), &vec![lba as u8 + 1; 4096])?;
    }
    primary.sync()?;
    primary.set_committed(primary.status().head);
    fabric.set_down("vs2:3260", false);

    // Epoch 2: the master re-assigns; the primary hands vs2 to the engine, which plans a
    // catch-up from vs2's handshake and ships the missing entries through v2bridge. Processing
    // the assignment only returns the recovery it calls for; a server would run it on a worker
    // thread while it goes on with other assignments. Here it runs right after.
    let out = vs2.process_assignments_inline(&[assignment(2, 2, &[])]);
    assert!(out[0].error.is_none(), "{:?}", out[0].error);
    let mut out = vs1.process_assignments(&[assignment(2, 1, &["vs2"])]);
    assert!(out[0].error.is_none(), "{:?}", out[0].error);
    let pending = std::mem::take(&mut out[0].pending);
    for recovery in pending {
        let id = recovery.replica().clone();
        let record = vs1.run_pending(recovery);
        match &record {
            RecoveryRecord::Recovered(r) => println!(
                "{id}: {} of {} entries, {} bytes, now {}",
                r.path,
                r.entries_applied,
                r.bytes_transferred(),
                r.final_state
            ),
            other => println!("{id}: {other}"),
        }
    }

    let replica = vs2.backend().volume(VOLUME).ok_or("no replica volume")?;
    let (p, r) = (primary.digest()?, replica.digest()?);
    println!("primary digest {p}, replica digest {r}");
    assert_eq!(p, r, "the replica holds the primary's bytes");
    Ok(())
}
