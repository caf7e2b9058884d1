//! Two volume servers in this process, each a `Node` with its own data directory and
//! replication listener on loopback: the master's assignments make one primary and one
//! replica, writes flushed under `sync_all` reach the replica's bytes, a lease that runs out
//! stops I/O, an older epoch changes nothing, and a restarted primary comes back fenced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockvol::{Digest, Lba};
use controlbridge::{BlockRole, BlockVolumeAssignment, ReplicaAddr};
use server::node::{Node, NodeConfig, NodeError, VolumeMeta};
use transport::stream::DurabilityMode;

fn node(dir: &std::path::Path, id: &str) -> Arc<Node> {
    Node::start(NodeConfig {
        id: id.into(),
        data: dir.join(id),
        repl_listen: "127.0.0.1:0".parse().unwrap(),
        secret: None,
        scrub: server::scrub::ScrubConfig::default(),
    })
    .expect("node")
}

fn meta(mode: DurabilityMode) -> VolumeMeta {
    VolumeMeta {
        size_bytes: 4 << 20,
        wal_size_bytes: 8 << 20,
        mode,
    }
}

fn primary(
    name: &str,
    epoch: u64,
    lease_ms: u64,
    replicas: &[(&Node, &str)],
) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: name.into(),
        epoch,
        role: BlockRole::Primary.to_wire(),
        lease_ttl_ms: lease_ms,
        replica_addrs: replicas
            .iter()
            .map(|(n, id)| ReplicaAddr {
                data_addr: n.repl_addr().to_string(),
                ctrl_addr: n.repl_addr().to_string(),
                server_id: (*id).into(),
            })
            .collect(),
        ..BlockVolumeAssignment::default()
    }
}

fn replica(name: &str, epoch: u64) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: name.into(),
        epoch,
        role: BlockRole::Replica.to_wire(),
        ..BlockVolumeAssignment::default()
    }
}

fn block(tag: u8) -> Vec<u8> {
    vec![tag; 4096]
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_primary_streams_to_its_replica_and_a_flush_is_durable_there() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "vs1");
    let b = node(dir.path(), "vs2");
    for n in [&a, &b] {
        n.allocate("v1", meta(DurabilityMode::SyncAll)).unwrap();
    }
    b.apply(&replica("v1", 1)).unwrap();
    a.apply(&primary("v1", 1, 10_000, &[(&b, "vs2")])).unwrap();
    let (vol, _) = a.primary("v1").unwrap();
    for i in 0..64u64 {
        vol.write(Lba(i), &block(i as u8 + 1)).unwrap();
    }
    a.notify("v1");
    let lsn = a
        .flush("v1")
        .expect("sync_all flush with the replica streaming");
    assert_eq!(lsn.0, 64);
    let inv = a.inventory();
    assert_eq!(inv[0].role, BlockRole::Primary);
    assert!(inv[0].has_lease);
    assert_eq!(inv[0].replicas.len(), 1);
    // The replica's bytes equal the primary's (read through its own volume file's digest).
    let want = vol.digest().unwrap();
    wait_for("the replica's digest", || {
        b.inventory()[0].head >= 64 && replica_digest(&b) == want
    });
    // The replica refuses I/O: it is not a primary.
    assert!(matches!(
        b.check_io("v1"),
        Err(NodeError::NotServing { .. })
    ));
    a.shutdown();
    b.shutdown();
}

fn replica_digest(n: &Node) -> Digest {
    // A probe over the replication port, as another server would see it.
    let mut r = transport::net::RemoteReplica::connect(
        n.repl_addr(),
        "v1",
        &transport::net::ClientConfig::default(),
    )
    .unwrap();
    Digest(r.probe(true).unwrap().digest.unwrap())
}

#[test]
fn an_expired_lease_stops_io_until_renewed_and_an_older_epoch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "vs1");
    a.allocate("v1", meta(DurabilityMode::BestEffort)).unwrap();
    a.apply(&primary("v1", 3, 300, &[])).unwrap();
    a.check_io("v1").expect("serving under its lease");
    a.flush("v1").expect("flush under the lease");
    std::thread::sleep(Duration::from_millis(400));
    let e = a.check_io("v1").expect_err("the lease ran out");
    assert!(e.to_string().contains("lease"), "{e}");
    assert!(
        a.flush("v1").is_err(),
        "no flush is acknowledged without a lease"
    );
    assert!(!a.inventory()[0].has_lease);
    // A renewal (same epoch, no addresses) brings it back.
    a.apply(&primary("v1", 3, 10_000, &[])).unwrap();
    a.check_io("v1").expect("renewed");
    // An assignment from an older epoch is refused and changes nothing.
    let e = a.apply(&replica("v1", 2)).expect_err("stale");
    assert!(
        matches!(
            e,
            NodeError::Stale {
                have: 3,
                got: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(a.inventory()[0].role, BlockRole::Primary);
    // A newer epoch demotes it.
    a.apply(&replica("v1", 4)).unwrap();
    assert!(a.check_io("v1").is_err());
    assert_eq!(a.inventory()[0].epoch, 4);
    a.shutdown();
}

#[test]
fn a_restarted_primary_comes_back_fenced_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let want = {
        let a = node(dir.path(), "vs1");
        a.allocate("v1", meta(DurabilityMode::BestEffort)).unwrap();
        a.apply(&primary("v1", 1, 10_000, &[])).unwrap();
        let (vol, _) = a.primary("v1").unwrap();
        vol.write(Lba(7), &block(0x5a)).unwrap();
        a.flush("v1").unwrap();
        let d = vol.digest().unwrap();
        drop(vol);
        a.shutdown();
        d
    };
    let a = node(dir.path(), "vs1");
    let inv = a.inventory();
    assert_eq!(inv.len(), 1);
    assert_eq!(
        inv[0].role,
        BlockRole::Stale,
        "a restarted primary is fenced"
    );
    assert_eq!(inv[0].epoch, 1);
    assert!(a.check_io("v1").is_err());
    let ev = a.evidence("v1", 1).unwrap();
    assert_eq!((ev.head, ev.last_entry_epoch), (1, 1));
    // Assigned again, it serves the same bytes.
    a.apply(&primary("v1", 2, 10_000, &[])).unwrap();
    let (vol, _) = a.primary("v1").unwrap();
    assert_eq!(vol.digest().unwrap(), want);
    // Its next entry is of epoch 2, and the evidence says so.
    vol.write(Lba(8), &block(0x5b)).unwrap();
    a.flush("v1").unwrap();
    let ev = a.evidence("v1", 2).unwrap();
    assert_eq!((ev.head, ev.last_entry_epoch), (2, 2));
    drop(vol);
    a.shutdown();
    // Deleting removes its files.
    a.delete("v1").unwrap();
    assert!(!dir.path().join("vs1").join("v1.vol").exists());
}

#[test]
fn a_restarted_primary_renewed_serves_with_its_replica_set_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let b = node(dir.path(), "vs2");
    b.allocate("v1", meta(DurabilityMode::SyncAll)).unwrap();
    b.apply(&replica("v1", 3)).unwrap();
    {
        let a = node(dir.path(), "vs1");
        a.allocate("v1", meta(DurabilityMode::SyncAll)).unwrap();
        a.apply(&primary("v1", 3, 10_000, &[(&b, "vs2")])).unwrap();
        assert_eq!(a.inventory()[0].replicas.len(), 1);
        a.shutdown();
    }
    // The master renews the lease of the primary it still believes in; the renewal names no
    // replicas. The restarted server serves with the set of epoch 3's full assignment.
    let renewal = primary("v1", 3, 10_000, &[]);
    let a = node(dir.path(), "vs1");
    assert_eq!(a.inventory()[0].role, BlockRole::Stale);
    a.apply(&renewal).unwrap();
    let inv = a.inventory();
    assert_eq!(inv[0].role, BlockRole::Primary);
    assert_eq!(
        inv[0].replicas,
        vec![("v1/vs2".to_owned(), b.repl_addr().to_string())],
        "the replica set of its full assignment"
    );
    let (vol, _) = a.primary("v1").unwrap();
    vol.write(Lba(1), &block(0x11)).unwrap();
    a.flush("v1")
        .expect("a sync_all flush through the remembered replica");
    drop(vol);
    a.shutdown();
    drop(a);
    // Without that set (lost), a renewal at the same epoch must not make it a primary that
    // acknowledges flushes alone.
    std::fs::remove_file(dir.path().join("vs1").join("v1.replicas")).unwrap();
    let a = node(dir.path(), "vs1");
    assert!(matches!(a.apply(&renewal), Err(NodeError::Invalid(_))));
    assert_eq!(a.inventory()[0].role, BlockRole::Stale);
    assert!(a.check_io("v1").is_err());
    assert!(a.flush("v1").is_err());
    // The full assignment makes it primary again.
    a.apply(&primary("v1", 3, 10_000, &[(&b, "vs2")])).unwrap();
    assert!(a.check_io("v1").is_ok());
    a.shutdown();
    b.shutdown();
}

#[test]
fn with_a_cluster_secret_the_replicator_proves_it_to_its_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let with_secret = |id: &str| {
        Node::start(NodeConfig {
            id: id.into(),
            data: dir.path().join(id),
            repl_listen: "127.0.0.1:0".parse().unwrap(),
            secret: Some(b"the cluster secret".to_vec()),
            scrub: server::scrub::ScrubConfig::default(),
        })
        .expect("node")
    };
    let a = with_secret("vs1");
    let b = with_secret("vs2");
    for n in [&a, &b] {
        n.allocate("v1", meta(DurabilityMode::SyncAll)).unwrap();
    }
    b.apply(&replica("v1", 1)).unwrap();
    a.apply(&primary("v1", 1, 10_000, &[(&b, "vs2")])).unwrap();
    let (vol, _) = a.primary("v1").unwrap();
    vol.write(Lba(3), &block(0x33)).unwrap();
    a.notify("v1");
    // Under sync_all the flush needs the replica: the replicator must authenticate.
    a.flush("v1")
        .expect("a sync_all flush through a replica that demands the secret");
    let st = &a.inventory()[0].replica_states[0];
    assert_eq!(
        st.state,
        transport::stream::StreamState::Streaming,
        "{st:?}"
    );
    drop(vol);
    a.shutdown();
    b.shutdown();
}

fn layout(path: &std::path::Path) -> (u64, u64) {
    server::scenarios::volume_layout(path).unwrap()
}

fn flip(path: &std::path::Path, offset: u64) {
    server::scenarios::flip_byte(path, offset).unwrap();
}

#[test]
fn a_scrub_pass_repairs_each_copy_from_the_other_and_reports_a_block_damaged_on_both() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "vs1");
    let b = node(dir.path(), "vs2");
    for n in [&a, &b] {
        n.allocate("v1", meta(DurabilityMode::SyncAll)).unwrap();
    }
    b.apply(&replica("v1", 1)).unwrap();
    a.apply(&primary("v1", 1, 60_000, &[(&b, "vs2")])).unwrap();
    let (vol, _) = a.primary("v1").unwrap();
    for i in 0..64u64 {
        vol.write(Lba(i), &block(i as u8 + 1)).unwrap();
    }
    a.notify("v1");
    a.flush("v1").expect("flush");
    vol.force_flush().expect("primary extent");
    // One more write carries the committed point to the replica, whose flusher follows it.
    vol.write(Lba(100), &block(0xEE)).unwrap();
    a.notify("v1");
    a.flush("v1").expect("flush");
    vol.force_flush().expect("primary extent");
    wait_for("the replica's checkpoint", || {
        b.inventory()[0].checkpoint >= 64
    });
    let pa = a.data_dir().join("v1.vol");
    let pb = b.data_dir().join("v1.vol");
    let (ext, csum) = layout(&pa);
    assert_eq!(layout(&pb), (ext, csum), "same geometry, same layout");
    // Primary: block 3's data and block 4's checksum; replica: block 5; both: block 9.
    flip(&pa, ext + 3 * 4096 + 100);
    flip(&pa, csum + 4 * 4 + 1);
    flip(&pb, ext + 5 * 4096 + 7);
    flip(&pa, ext + 9 * 4096);
    flip(&pb, ext + 9 * 4096 + 4095);
    assert!(vol.read(Lba(3), 1).is_err(), "the damage is seen");
    let cfg = server::scrub::ScrubConfig {
        rate_bytes: 1 << 30,
        ..server::scrub::ScrubConfig::default()
    };
    let r = a
        .scrub_now("v1", &cfg)
        .expect("pass")
        .expect("the primary scrubs");
    assert_eq!(r.checked, 1024, "every block of the 4 MiB volume");
    assert_eq!((r.damaged_here, r.damaged_peers), (3, 2), "{r:?}");
    assert_eq!((r.repaired_here, r.repaired_peers), (2, 1), "{r:?}");
    let mut lost: Vec<(String, u64)> = r
        .unrepairable
        .iter()
        .map(|(c, l)| (c.clone(), l.0))
        .collect();
    lost.sort();
    assert_eq!(lost, vec![("v1/vs2".to_owned(), 9), ("vs1".to_owned(), 9)]);
    // Repaired blocks read back as written on both copies; block 9 fails on both, never
    // returning invented bytes.
    let mut remote = transport::net::RemoteReplica::connect(
        b.repl_addr(),
        "v1",
        &transport::net::ClientConfig::default(),
    )
    .unwrap();
    for i in 0..64u64 {
        let want = block(i as u8 + 1);
        if i == 9 {
            assert!(vol.read(Lba(9), 1).is_err());
            assert!(remote.read_block(Lba(9), 4096).is_err());
            continue;
        }
        assert_eq!(vol.read(Lba(i), 1).unwrap(), want, "primary block {i}");
        assert_eq!(
            remote.read_block(Lba(i), 4096).unwrap(),
            want,
            "replica block {i}"
        );
    }
    let (sa, sb) = (
        a.inventory()[0].scrub.clone(),
        b.inventory()[0].scrub.clone(),
    );
    assert_eq!(
        (sa.damaged, sa.found, sa.repaired, sa.passes),
        (1, 3, 2, 1),
        "{sa:?}"
    );
    assert_eq!(
        (sb.damaged, sb.found, sb.repaired, sb.passes),
        (1, 2, 1, 1),
        "{sb:?}"
    );
    assert!(sa.last_pass_unix > 0 && sb.last_pass_unix > 0);
    // The heartbeat reports what is still damaged.
    let hb = server::convert::volume_info(&a.inventory()[0], "x");
    assert_eq!(
        (hb.scrub_errors, hb.last_scrub_time),
        (1, sa.last_pass_unix as i64)
    );
    assert!(hb.health_score < 1.0);
    // Rewriting block 9 heals it everywhere; the next pass finds nothing.
    vol.write(Lba(9), &block(10)).unwrap();
    a.notify("v1");
    a.flush("v1").expect("flush");
    vol.force_flush().expect("primary extent");
    vol.write(Lba(101), &block(0xEF)).unwrap();
    a.notify("v1");
    a.flush("v1").expect("flush");
    // The replica learns a commit with the next entry: block 9's is the one before the head.
    wait_for("the replica's flush of block 9", || {
        b.inventory()[0].checkpoint >= vol.status().head.0 - 1
    });
    let r = a
        .scrub_now("v1", &cfg)
        .expect("pass")
        .expect("the primary scrubs");
    assert_eq!(
        (r.damaged_here, r.damaged_peers, r.unrepairable.len()),
        (0, 0, 0),
        "{r:?}"
    );
    assert_eq!(a.inventory()[0].scrub.damaged, 0);
    assert_eq!(b.inventory()[0].scrub.damaged, 0);
    assert_eq!(remote.read_block(Lba(9), 4096).unwrap(), block(10));
    remote.close("done");
    // A replica does not scrub on its own: its primary does.
    assert_eq!(b.scrub_now("v1", &cfg), Ok(None));
    a.shutdown();
    b.shutdown();
}

/// Issue 15's divergence-point test between two servers over TCP: the old primary comes back
/// with 20 entries the new primary never had, below the new primary's committed point; it is
/// truncated where the logs part and caught up with the new primary's 30 entries, with no
/// image moved, and holds the new primary's bytes.
#[test]
fn an_old_primary_with_a_divergent_tail_is_truncated_at_the_divergence_point_not_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "vs1");
    let b = node(dir.path(), "vs2");
    // best_effort: the new primary commits without its replica, so the old primary's tail
    // ends below the new committed point (the case a truncation to committed cannot fix).
    for n in [&a, &b] {
        n.allocate("v1", meta(DurabilityMode::BestEffort)).unwrap();
    }
    b.apply(&replica("v1", 1)).unwrap();
    a.apply(&primary("v1", 1, 60_000, &[(&b, "vs2")])).unwrap();
    let (va, _) = a.primary("v1").unwrap();
    for i in 0..64u64 {
        va.write(Lba(i), &block(i as u8 + 1)).unwrap();
    }
    a.notify("v1");
    a.flush("v1").unwrap();
    wait_for("the replica at 64", || b.inventory()[0].head >= 64);
    // The replica's server goes away; the primary takes 20 writes nobody else gets.
    b.shutdown();
    drop(b);
    for i in 0..20u64 {
        va.write(Lba(200 + i), &block(0xA0)).unwrap();
    }
    va.sync().unwrap();
    assert_eq!(va.status().head.0, 84);
    drop(va);
    // Failover: vs2 comes back and is promoted at epoch 2; vs1 is its replica, kept away
    // until the new primary has committed 30 writes of its own.
    let b = node(dir.path(), "vs2");
    a.apply(&replica("v1", 2)).unwrap();
    b.apply(&primary("v1", 2, 60_000, &[])).unwrap();
    let (vb, _) = b.primary("v1").unwrap();
    for i in 0..30u64 {
        vb.write(Lba(300 + i), &block(0xB0)).unwrap();
    }
    b.flush("v1").unwrap();
    assert_eq!(vb.status().head.0, 94);
    // Now with vs1 as its replica (a full assignment at the same epoch).
    b.apply(&primary("v1", 2, 60_000, &[(&a, "vs1")])).unwrap();
    b.notify("v1");
    wait_for("vs1 in sync at 94", || {
        b.inventory()[0].replica_states.first().is_some_and(|r| {
            r.state == transport::stream::StreamState::Streaming && r.durable.0 >= 94
        })
    });
    let r = b.inventory()[0].replica_states[0].clone();
    assert_eq!(
        (r.rebuilds, r.base_bytes_sent),
        (0, 0),
        "no image moved: {r:?}"
    );
    assert!(r.catch_ups >= 1, "{r:?}");
    // vs1 holds vs2's bytes: its 20 writes are gone, vs2's 30 are there.
    assert_eq!(replica_digest(&a), vb.digest().unwrap());
    let mut remote = transport::net::RemoteReplica::connect(
        a.repl_addr(),
        "v1",
        &transport::net::ClientConfig::default(),
    )
    .unwrap();
    assert_eq!(remote.read_block(Lba(200), 4096).unwrap(), vec![0; 4096]);
    assert_eq!(remote.read_block(Lba(300), 4096).unwrap(), block(0xB0));
    remote.close("done");
    a.shutdown();
    b.shutdown();
}
