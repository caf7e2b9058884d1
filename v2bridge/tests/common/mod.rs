//! Fixtures shared by the bridge test files: real volume files in temporary directories, the
//! engine wired to them, and small readers over what the volumes hold.
#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use blockvol::{BasePin, FlushGate, Lba, Lsn as BLsn, Role, Volume, WalEntry};
use engine::conformance::replica_id;
use engine::{
    AssignmentIntent, Endpoint, EngineError, Epoch, ExecFailure, ExecutionReport, ExecutorOptions,
    Lsn, RecoveryDriver, RecoveryPlan, ReplicaAssignment, ReplicaHandshake, ReplicaId,
    ReplicaState, SessionId, SessionKind,
};
use v2bridge::convert::{entry_id, to_engine};
use v2bridge::harness::{
    BlockVolHarness, HARNESS_BLOCK_SIZE, HARNESS_BLOCKS, HARNESS_WAL_BYTES, block_pattern,
    volume_options,
};
use v2bridge::{BlockVolStorage, BridgeIo, HandshakeReply, Lineage, LocalReplica, ReplicaTarget};

/// The driver tag the tests' own primaries use in their lineages.
pub const DRIVER: &str = "test-primary";

/// Block size of every test volume.
pub const BS: usize = HARNESS_BLOCK_SIZE as usize;
/// Bytes addressable in every test volume.
pub const VOLUME_BYTES: u64 = HARNESS_BLOCKS * HARNESS_BLOCK_SIZE as u64;
/// Wire bytes of one single-block write entry (64-byte header + one block).
pub const WIRE_ENTRY_BYTES: u64 = blockvol::format::ENTRY_HEADER_SIZE as u64 + BS as u64;

pub fn harness() -> BlockVolHarness {
    BlockVolHarness::new().expect("harness")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("v2bridge-test-")
        .tempdir()
        .expect("temporary directory")
}

/// A new volume file `<dir>/<name>.vol` with the harness geometry, a committed-gated manual
/// flusher, no role yet.
pub fn create_volume(dir: &Path, name: &str) -> Arc<Volume> {
    let create = blockvol::CreateOptions {
        volume_size_bytes: VOLUME_BYTES,
        wal_size_bytes: HARNESS_WAL_BYTES,
        block_size: HARNESS_BLOCK_SIZE,
    };
    Arc::new(
        Volume::create(
            dir.join(format!("{name}.vol")),
            &create,
            &volume_options(FlushGate::Committed),
        )
        .expect("create volume"),
    )
}

/// Reopens `<dir>/<name>.vol` (every handle on it must be dropped first).
pub fn reopen_volume(dir: &Path, name: &str) -> Arc<Volume> {
    Arc::new(
        Volume::open(
            dir.join(format!("{name}.vol")),
            &volume_options(FlushGate::Committed),
        )
        .expect("reopen volume"),
    )
}

/// A primary volume (role primary, epoch 1) and its storage adapter.
pub fn primary(dir: &Path) -> (Arc<Volume>, Arc<BlockVolStorage>) {
    let vol = create_volume(dir, "primary");
    vol.assign(Role::Primary, blockvol::Epoch(1))
        .expect("assign primary");
    let storage = Arc::new(BlockVolStorage::new(Arc::clone(&vol)));
    (vol, storage)
}

/// A replica volume (role replica, epoch 1).
pub fn replica_volume(dir: &Path, name: &str) -> Arc<Volume> {
    let vol = create_volume(dir, name);
    vol.assign(Role::Replica, blockvol::Epoch(1))
        .expect("assign replica");
    vol
}

/// Writes one block per LBA, each with `block_pattern(lsn, salt)`; returns the last LSN.
pub fn write_blocks(vol: &Volume, lbas: impl IntoIterator<Item = u64>, salt: u64) -> Lsn {
    let mut last = to_engine(vol.status().head);
    for lba in lbas {
        let lsn = last.next();
        let got = vol
            .write(Lba(lba), &block_pattern(lsn.get(), salt, BS))
            .expect("primary write");
        assert_eq!(got.0, lsn.get(), "primary assigned an unexpected LSN");
        last = lsn;
    }
    last
}

/// Syncs and sets the replication layer's committed LSN.
pub fn commit(vol: &Volume, lsn: Lsn) {
    vol.sync().expect("sync");
    vol.set_committed(BLsn(lsn.get()));
}

/// The primary's entries `from..=to`, as scanned.
pub fn scan(vol: &Volume, from: u64, to: u64) -> Vec<WalEntry> {
    vol.scan_from(BLsn(from))
        .expect("scan")
        .take((to + 1 - from) as usize)
        .map(|e| e.expect("scan item"))
        .collect()
}

/// Applies the primary's entries `1..=prefix` to a replica volume and makes them durable.
pub fn seed_replica(primary: &Volume, replica: &Volume, prefix: u64) {
    if prefix > 0 {
        for e in scan(primary, 1, prefix) {
            replica.apply(&e).expect("seed apply");
        }
    }
    replica.set_committed(BLsn(prefix));
    replica.sync().expect("seed sync");
}

/// The flat image a base pin holds, read through its chunked reader.
pub fn image_of(pin: &BasePin) -> Vec<u8> {
    let g = pin.geometry();
    let bs = g.block_size as usize;
    let mut image = vec![0u8; g.volume_bytes() as usize];
    for chunk in pin.reader(64 << 10) {
        let chunk = chunk.expect("image chunk");
        chunk.verify().expect("chunk crc");
        let off = chunk.lba.0 as usize * bs;
        image[off..off + chunk.data.len()].copy_from_slice(&chunk.data);
    }
    image
}

/// The whole visible contents of a volume.
pub fn contents(vol: &Volume) -> Vec<u8> {
    let g = vol.geometry();
    vol.read(Lba(0), g.volume_blocks).expect("read volume")
}

/// What a replica's handshake reply tells the engine.
pub fn to_handshake(r: HandshakeReply) -> ReplicaHandshake {
    if r.install_incomplete {
        ReplicaHandshake::incomplete(to_engine(r.head))
    } else {
        ReplicaHandshake::new(to_engine(r.head), entry_id(r.tip))
    }
}

pub fn handshake(target: &mut impl ReplicaTarget) -> ReplicaHandshake {
    to_handshake(target.handshake().expect("handshake"))
}

pub fn rid(name: &str) -> ReplicaId {
    replica_id(name)
}

pub fn endpoint(name: &str, version: u64) -> Endpoint {
    Endpoint::new(
        format!("{name}.data:3260/v{version}"),
        format!("{name}.ctrl:3261/v{version}"),
        version,
    )
}

/// Sends an assignment: `replicas` at their endpoint versions, `targets` with session kinds.
pub fn assign(
    driver: &RecoveryDriver,
    epoch: u64,
    replicas: &[(&str, u64)],
    targets: &[(&str, SessionKind)],
) {
    let intent = AssignmentIntent {
        replicas: replicas
            .iter()
            .map(|(n, v)| ReplicaAssignment {
                replica_id: rid(n),
                endpoint: endpoint(n, *v),
            })
            .collect(),
        epoch: Epoch(epoch),
        recovery_targets: targets
            .iter()
            .map(|(n, k)| (rid(n), *k))
            .collect::<BTreeMap<_, _>>(),
        catch_up_budget: None,
    };
    driver
        .orchestrator()
        .process_assignment(&intent)
        .expect("assignment accepted");
}

pub fn state(driver: &RecoveryDriver, name: &str) -> ReplicaState {
    driver
        .orchestrator()
        .sender(&rid(name))
        .expect("sender")
        .state()
}

pub fn session_of(plan: &RecoveryPlan) -> SessionId {
    plan.session_id().expect("plan has a session")
}

/// The lineage of a plan's session at the sender's epoch.
pub fn lineage_of(driver: &RecoveryDriver, plan: &RecoveryPlan) -> Lineage {
    let sender = driver
        .orchestrator()
        .sender(plan.replica_id())
        .expect("sender");
    Lineage::new(
        DRIVER,
        v2bridge::convert::epoch_to_blockvol(sender.epoch()),
        session_of(plan).get(),
    )
}

/// Bridge I/O for a plan, to `target`, with the primary's committed LSN.
pub fn io_for<T: ReplicaTarget>(
    driver: &RecoveryDriver,
    storage: &Arc<BlockVolStorage>,
    plan: &RecoveryPlan,
    target: T,
) -> BridgeIo<T> {
    let committed = to_engine(storage.volume().status().committed);
    BridgeIo::new(
        Arc::clone(storage),
        target,
        lineage_of(driver, plan),
        committed,
    )
}

pub fn chunked(entries: u64, base_bytes: u64) -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: entries,
        max_base_chunk_bytes: base_bytes,
        ..ExecutorOptions::default()
    }
}

/// The failure and partial report of an execution that must fail.
pub fn expect_failure(
    result: Result<ExecutionReport, EngineError>,
) -> (ExecFailure, ExecutionReport) {
    match result {
        Ok(r) => panic!("execution succeeded but should have failed: {r:?}"),
        Err(EngineError::ExecutionFailed {
            failure, report, ..
        }) => (*failure, *report),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The detail of the first event of `name` logged for a replica.
pub fn event_detail(driver: &RecoveryDriver, name: &str, event: &str) -> Option<String> {
    driver
        .orchestrator()
        .log()
        .events_for(&rid(name))
        .into_iter()
        .find(|e| e.name() == event)
        .map(|e| e.event.detail())
}

/// Event names logged for a replica, oldest first.
pub fn event_names(driver: &RecoveryDriver, name: &str) -> Vec<&'static str> {
    driver
        .orchestrator()
        .log()
        .events_for(&rid(name))
        .iter()
        .map(|e| e.name())
        .collect()
}

/// `sub` appears in `all` in order (not necessarily adjacent).
pub fn in_order(all: &[&str], sub: &[&str]) -> bool {
    let mut it = all.iter();
    sub.iter().all(|s| it.any(|a| a == s))
}

pub fn digest(vol: &Volume) -> blockvol::Digest {
    vol.digest().expect("digest")
}

pub fn lsn(v: u64) -> Lsn {
    Lsn(v)
}

pub fn blsn(v: u64) -> BLsn {
    BLsn(v)
}

/// A local replica target over a volume.
pub fn local(vol: &Arc<Volume>) -> LocalReplica {
    LocalReplica::new(Arc::clone(vol))
}

pub fn sid(v: u64) -> SessionId {
    SessionId::new(v).expect("non-zero session id")
}
