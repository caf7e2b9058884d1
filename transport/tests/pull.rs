//! Rebuilds pulled across the network, with the primary in a `swblock-replicad` process: the
//! replica plans against the primary's history over one connection, holds the primary's pins
//! under leases, and reads the image and the WAL tail through the engine's unchanged executor.
//! A puller that stops renewing, closes, or is killed with SIGKILL loses its pins on the
//! primary when the lease ends or the connection drops.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockvol::{CreateOptions, Digest, FlushGate, Lba, Lsn, Role, Volume};
use engine::{
    AssignmentIntent, Endpoint, Epoch, RebuildExecutor, RecoveryDriver, ReplicaAssignment,
    ReplicaId, ReplicaState, SessionKind, StorageAdapter,
};
use transport::harness::ReplicaProcess;
use transport::net::{ClientConfig, RemotePrimary, RemoteReplica};
use v2bridge::harness::volume_options;
use v2bridge::{BridgeIo, Lineage, LocalReplica};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 256;

fn create(path: &Path, role: Role) -> Volume {
    let opts = CreateOptions {
        volume_size_bytes: BLOCKS * BLOCK as u64,
        wal_size_bytes: 8 << 20,
        block_size: BLOCK as u32,
    };
    let vol = Volume::create(path, &opts, &volume_options(FlushGate::Committed)).unwrap();
    vol.assign(role, blockvol::Epoch(1)).unwrap();
    vol
}

/// A primary volume with `n` committed writes, served by a replica-server process.
fn primary_process(dir: &Path, n: u64) -> ReplicaProcess {
    let served = dir.join("server-a");
    std::fs::create_dir_all(&served).unwrap();
    let vol = create(&served.join("vol1.vol"), Role::Primary);
    for i in 0..n {
        let data = vec![(i % 251) as u8 | 1; BLOCK];
        vol.write(Lba(i % BLOCKS), &data).unwrap();
    }
    let head = vol.sync().unwrap();
    vol.set_committed(head);
    // Flushed into the extent: the checkpoint (persisted, unlike the committed point, which
    // the replication protocol re-establishes after a restart) is the image a puller gets.
    vol.force_flush().unwrap();
    vol.close().unwrap();
    let p =
        ReplicaProcess::start(Path::new(env!("CARGO_BIN_EXE_swblock-replicad")), &served).unwrap();
    // Let the server's flusher reach the committed point, so the checkpoint a plan reads is
    // the one it pins.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Tolerates a slow start under load (a refused or timed-out connection is retried
        // until the deadline).
        let caught_up = RemoteReplica::connect(p.addr(), "vol1", &ClientConfig::default())
            .map_err(|e| e.to_string())
            .and_then(|mut r| r.probe(false).map_err(|e| e.to_string()))
            .map(|pr| pr.checkpoint == pr.head);
        match caught_up {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => assert!(Instant::now() < deadline, "probing the primary: {e}"),
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// The primary's head, digest and pins, as its process reports them.
fn probe(p: &ReplicaProcess) -> (Lsn, u128, u32) {
    let mut r = RemoteReplica::connect(p.addr(), "vol1", &ClientConfig::default()).unwrap();
    let pr = r.probe(true).unwrap();
    (pr.head, pr.digest.unwrap(), pr.pins)
}

fn wait_pins(p: &ReplicaProcess, want: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pins = probe(p).2;
        if pins == want || Instant::now() > deadline {
            return pins;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rid() -> ReplicaId {
    ReplicaId::new("vol1/server-b").unwrap()
}

/// A `rebuilding` assignment for this replica.
fn assign_rebuild(driver: &RecoveryDriver) -> Result<(), String> {
    driver
        .orchestrator()
        .process_assignment(&AssignmentIntent {
            replicas: vec![ReplicaAssignment {
                replica_id: rid(),
                endpoint: Endpoint::new("b.data", "b.ctrl", 1),
            }],
            epoch: Epoch(1),
            recovery_targets: [(rid(), SessionKind::Rebuild)].into(),
            catch_up_budget: None,
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Pulls a rebuild of `local` from the primary at `addr` through the engine, calling `step`
/// after every executor step.
fn pull_rebuild(
    addr: std::net::SocketAddr,
    local: &Arc<Volume>,
    chunk_bytes: u64,
    step: impl FnMut(&engine::StepInfo),
) -> Result<engine::ExecutionReport, String> {
    pull_rebuild_stats(addr, local, chunk_bytes, step).0
}

/// `pull_rebuild`, also returning what the I/O moved. The replica records a resume point every
/// 16 KiB of image data.
fn pull_rebuild_stats(
    addr: std::net::SocketAddr,
    local: &Arc<Volume>,
    chunk_bytes: u64,
    step: impl FnMut(&engine::StepInfo),
) -> (Result<engine::ExecutionReport, String>, v2bridge::IoStats) {
    local.set_install_stride(16 << 10);
    let mut stats = v2bridge::IoStats::default();
    let r = pull_rebuild_into(addr, local, chunk_bytes, step, &mut stats);
    (r, stats)
}

fn pull_rebuild_into(
    addr: std::net::SocketAddr,
    local: &Arc<Volume>,
    chunk_bytes: u64,
    step: impl FnMut(&engine::StepInfo),
    stats: &mut v2bridge::IoStats,
) -> Result<engine::ExecutionReport, String> {
    let remote = Arc::new(
        RemotePrimary::connect(
            addr,
            "vol1",
            &ClientConfig::default(),
            Duration::from_secs(2),
        )
        .map_err(|e| e.to_string())?,
    );
    let driver = RecoveryDriver::new(Arc::clone(&remote) as Arc<dyn StorageAdapter>);
    assign_rebuild(&driver)?;
    let plan = driver.plan_rebuild(&rid()).map_err(|e| e.to_string())?;
    let sid = plan.session_id().ok_or("no session")?;
    let committed = plan.target().ok_or("no target")?;
    let mut io = BridgeIo::with_source(
        remote.source(),
        LocalReplica::new(Arc::clone(local)),
        Lineage::new("server-b", blockvol::Epoch(1), sid.get()),
        committed,
    );
    let r = RebuildExecutor::new(&driver, plan)
        .with_options(engine::ExecutorOptions {
            max_base_chunk_bytes: chunk_bytes,
            ..engine::ExecutorOptions::default()
        })
        .with_on_step(step)
        .execute(&mut io)
        .map_err(|e| e.to_string());
    *stats = io.stats;
    r
}

#[test]
fn a_replica_pulls_its_rebuild_from_a_remote_primary() {
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_process(dir.path(), 300);
    let local = Arc::new(create(&dir.path().join("replica.vol"), Role::Replica));

    let remote = Arc::new(
        RemotePrimary::connect(
            primary.addr(),
            "vol1",
            &ClientConfig::default(),
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let driver = RecoveryDriver::new(Arc::clone(&remote) as Arc<dyn StorageAdapter>);
    assign_rebuild(&driver).unwrap();
    let plan = driver.plan_rebuild(&rid()).unwrap();
    assert!(plan.pins_held() >= 1);
    assert_eq!(
        probe(&primary).2 as usize,
        plan.pins_held(),
        "pins live on the primary"
    );
    let sid = plan.session_id().unwrap();
    let committed = plan.target().unwrap();
    let mut io = BridgeIo::with_source(
        remote.source(),
        LocalReplica::new(Arc::clone(&local)),
        Lineage::new("server-b", blockvol::Epoch(1), sid.get()),
        committed,
    );
    let report = RebuildExecutor::new(&driver, plan)
        .execute(&mut io)
        .expect("pulled rebuild");
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(report.base_bytes_sent > 0);
    let (head, digest, pins) = probe(&primary);
    assert_eq!(local.status().head, head);
    assert_eq!(
        local.digest().unwrap(),
        Digest(digest),
        "replica bytes equal the primary's"
    );
    assert_eq!(
        wait_pins(&primary, 0),
        0,
        "the finished rebuild released its pins"
    );
    assert_eq!(pins, 0);
}

/// A puller connected to the primary with leases of `lease`, and the primary's committed
/// point.
fn puller(primary: &ReplicaProcess, lease: Duration) -> (RemotePrimary, engine::Lsn) {
    let remote =
        RemotePrimary::connect(primary.addr(), "vol1", &ClientConfig::default(), lease).unwrap();
    let committed = remote.get_retained_history().unwrap().committed_lsn;
    (remote, committed)
}

#[test]
fn an_unrenewed_lease_releases_the_primarys_pin() {
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_process(dir.path(), 50);
    let (remote, committed) = puller(&primary, Duration::from_millis(400));
    let pin = remote.pin_full_base(committed).unwrap();
    assert_eq!(probe(&primary).2, 1);
    // Renewed, the pin outlives several leases.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(probe(&primary).2, 1, "a renewed lease keeps its pin");
    // A puller that hangs stops renewing: the primary lets go when the lease ends, although
    // the connection is still open.
    remote.pause_renewals(true);
    assert_eq!(
        wait_pins(&primary, 0),
        0,
        "the lease ended and the pin with it"
    );
    drop(pin); // its release finds no lease: logged, harmless
}

#[test]
fn a_puller_that_closes_without_releasing_loses_its_pins() {
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_process(dir.path(), 50);
    let (remote, committed) = puller(&primary, Duration::from_secs(30));
    let pin = remote.pin_wal_retention(committed).unwrap();
    let image = remote.pin_full_base(committed).unwrap();
    assert_eq!(probe(&primary).2, 2);
    // Never released: the connection just goes away.
    std::mem::forget(pin);
    std::mem::forget(image);
    remote.close();
    assert_eq!(
        wait_pins(&primary, 0),
        0,
        "closing the connection released both pins"
    );
}

/// The child half of the kill -9 tests: pins and waits to be killed, or (with
/// `SWBLOCK_PULLER_FILE`) pulls a slow rebuild into that replica file until killed.
#[test]
fn puller_child() {
    let Ok(addr) = std::env::var("SWBLOCK_PULLER_CHILD") else {
        return;
    };
    if let Ok(file) = std::env::var("SWBLOCK_PULLER_FILE") {
        let local = Arc::new(
            Volume::open(&file, &volume_options(FlushGate::Committed)).expect("replica file"),
        );
        // 4 KiB chunks, 20 ms each: the image takes seconds, so the parent kills it midway.
        let _ = pull_rebuild(addr.parse().unwrap(), &local, 4096, |_| {
            std::thread::sleep(Duration::from_millis(20));
        });
        return;
    }
    let remote = RemotePrimary::connect(
        addr.parse().unwrap(),
        "vol1",
        &ClientConfig::default(),
        Duration::from_secs(3),
    )
    .unwrap();
    let committed = remote.get_retained_history().unwrap().committed_lsn;
    let _pin = remote.pin_full_base(committed).unwrap();
    println!("pinned");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_puller_killed_with_sigkill_loses_its_pins() {
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_process(dir.path(), 50);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "puller_child", "--nocapture", "--test-threads=1"])
        .env("SWBLOCK_PULLER_CHILD", primary.addr().to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pinned = wait_pins(&primary, 1);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(pinned, 1, "the child pinned the primary's image");
    // Its connection broke without a goodbye: the lease (3 s, renewed every second, so at
    // least 2 s left at the kill) keeps the pin for a puller that reconnects...
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        probe(&primary).2,
        1,
        "the broken connection's lease holds the pin"
    );
    // ...and ends on its deadline.
    assert_eq!(wait_pins(&primary, 0), 0, "the dead puller's pin came back");
}

#[test]
fn a_puller_killed_mid_rebuild_gives_the_pins_back_and_the_next_pull_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_process(dir.path(), 200);
    let file = dir.path().join("replica.vol");
    create(&file, Role::Replica).close().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "puller_child", "--nocapture", "--test-threads=1"])
        .env("SWBLOCK_PULLER_CHILD", primary.addr().to_string())
        .env("SWBLOCK_PULLER_FILE", &file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child holds the primary's pins (its rebuild is under way), then let it
    // move some of the image and kill it.
    let pinned = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pins = probe(&primary).2;
            if pins > 0 || Instant::now() > deadline {
                break pins;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    std::thread::sleep(Duration::from_millis(600));
    let _ = child.kill();
    let _ = child.wait();
    assert!(pinned > 0, "the child's rebuild pinned the primary");
    // Its replica knows the install was interrupted; the next pull (while the dead puller's
    // leases still hold the image) resumes the install where the child's last durable resume
    // point left it, and finishes it.
    let local = Arc::new(Volume::open(&file, &volume_options(FlushGate::Committed)).unwrap());
    assert!(
        local.status().install_incomplete,
        "the kill landed mid-image"
    );
    let (report, stats) = pull_rebuild_stats(primary.addr(), &local, 64 << 10, |_| {});
    let report = report.expect("second pull");
    assert_eq!(report.final_state, ReplicaState::InSync);
    assert!(
        stats.base_bytes_resumed > 0 && stats.base_bytes_resumed % 4096 == 0,
        "the second pull resumed the image: {stats:?}"
    );
    let (head, digest, _) = probe(&primary);
    assert_eq!(local.status().head, head);
    assert_eq!(local.digest().unwrap(), Digest(digest));
    assert_eq!(
        wait_pins(&primary, 0),
        0,
        "the killed puller's leases ended and the second pull released its own"
    );
}
