//! The block service's API: typed refusals and failures (stale, invalid, backend; fenced,
//! plan, transfer), and recoveries returned instead of run, so a long recovery of one volume
//! runs on a worker thread while assignments for other volumes are processed, and a recovery
//! returned for epoch E is fenced by the engine when an assignment at E + 1 arrives first.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use controlbridge::*;
use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::{
    Endpoint, EngineError, Epoch, ExecutorOptions, Lsn, RecoveryPath, ReplicaHandshake, ReplicaId,
    ReplicaState, SessionId, SessionPhase, StepInfo, StorageAdapter,
};

const WAIT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

/// Holds the recovery steps of one volume until opened, and counts the steps that reached it.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    volume: Option<String>,
    reached: u64,
    open: bool,
}

impl Gate {
    fn hold(&self, volume: &str) {
        let mut g = lock(&self.state);
        g.volume = Some(volume.to_owned());
        g.open = false;
    }

    /// Called at every recovery step: a step of the held volume waits until the gate opens
    /// (at most `WAIT`, so a broken test fails instead of hanging).
    fn pass(&self, volume: &str) {
        let mut g = lock(&self.state);
        if g.volume.as_deref() != Some(volume) {
            return;
        }
        g.reached += 1;
        self.cv.notify_all();
        let deadline = Instant::now() + WAIT;
        while !g.open && Instant::now() < deadline {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until a held step has been reached.
    fn wait_reached(&self) {
        let mut g = lock(&self.state);
        let deadline = Instant::now() + WAIT;
        while g.reached == 0 {
            assert!(
                Instant::now() < deadline,
                "the held recovery never reached a step"
            );
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn open(&self) {
        lock(&self.state).open = true;
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct Inner {
    /// A primary per volume.
    primaries: BTreeMap<String, MemStorage>,
    /// Model replicas by data address (pushes).
    replicas: BTreeMap<String, Arc<Mutex<ModelReplica>>>,
    /// This server's own copy per volume (pulls).
    local: BTreeMap<String, Arc<Mutex<ModelReplica>>>,
    /// Addresses that do not answer.
    down: Vec<String>,
    /// What `apply_role` fails with, when set.
    apply_role_error: Option<BackendError>,
    /// Every backend call, in order.
    calls: Vec<String>,
    /// Runs once inside the next replica handshake, without the backend's lock: a concurrent
    /// event that lands between a recovery's first authority check and its plan.
    on_handshake: Option<Box<dyn FnOnce() + Send>>,
}

/// A backend over the engine's reference store that is a handle onto shared state: every clone
/// reaches the same volumes, so a worker thread gets its own clone.
#[derive(Clone, Default)]
struct SharedBackend {
    inner: Arc<Mutex<Inner>>,
    gate: Arc<Gate>,
}

impl SharedBackend {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// A primary for `volume` with `n` committed entries.
    fn add_primary(&self, volume: &str, n: u64) -> MemStorage {
        let p = MemStorage::new();
        let head = p.write_n(n);
        p.commit(head).unwrap();
        self.inner().primaries.insert(volume.into(), p.clone());
        p
    }

    /// A replica of `volume` at `addr` holding the primary's first `prefix` entries.
    fn add_replica(&self, volume: &str, addr: &str, prefix: u64) -> Arc<Mutex<ModelReplica>> {
        let p = self.inner().primaries[volume].clone();
        let r = Arc::new(Mutex::new(
            ModelReplica::from_primary(&p, Lsn(prefix)).unwrap(),
        ));
        self.inner().replicas.insert(addr.into(), Arc::clone(&r));
        r
    }

    /// This server's own copy of `volume`, holding the primary's first `prefix` entries.
    fn add_local(&self, volume: &str, prefix: u64) -> Arc<Mutex<ModelReplica>> {
        let p = self.inner().primaries[volume].clone();
        let r = Arc::new(Mutex::new(
            ModelReplica::from_primary(&p, Lsn(prefix)).unwrap(),
        ));
        self.inner().local.insert(volume.into(), Arc::clone(&r));
        r
    }

    fn calls(&self) -> Vec<String> {
        self.inner().calls.clone()
    }
}

impl VolumeBackend for SharedBackend {
    type Io = ModelIo;

    fn apply_role(
        &mut self,
        volume: &str,
        role: BlockRole,
        epoch: Epoch,
        _lease: u64,
    ) -> Result<(), BackendError> {
        let mut g = self.inner();
        g.calls.push(format!("apply_role {volume} {role} {epoch}"));
        match g.apply_role_error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn primary_storage(
        &mut self,
        volume: &str,
        rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        let mut g = self.inner();
        g.calls.push(format!("primary_storage {volume}"));
        if let Some(addr) = rebuild_addr
            && g.down.iter().any(|d| d == addr)
        {
            return Err(BackendError::unavailable(format!("{addr} unreachable")));
        }
        let p = g
            .primaries
            .get(volume)
            .cloned()
            .ok_or_else(|| BackendError::refused(format!("{volume} is not a primary here")))?;
        Ok(Arc::new(p))
    }

    fn replica_handshake(
        &mut self,
        volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        let mut g = self.inner();
        g.calls
            .push(format!("handshake {volume} {}", endpoint.data_addr));
        if g.down.contains(&endpoint.data_addr) {
            return Err(BackendError::unavailable(format!(
                "{} unreachable",
                endpoint.data_addr
            )));
        }
        let r = g
            .replicas
            .get(&endpoint.data_addr)
            .cloned()
            .ok_or_else(|| BackendError::unavailable(format!("no replica at {}", endpoint)))?;
        let hook = g.on_handshake.take();
        drop(g);
        if let Some(hook) = hook {
            hook();
        }
        let hs = lock(&r).handshake();
        Ok(hs)
    }

    fn transfer_io(
        &mut self,
        volume: &str,
        route: Route<'_>,
        _epoch: Epoch,
        _session: SessionId,
    ) -> Result<ModelIo, BackendError> {
        let mut g = self.inner();
        g.calls.push(format!("transfer_io {volume}"));
        let primary = g
            .primaries
            .get(volume)
            .cloned()
            .ok_or_else(|| BackendError::refused("no primary"))?;
        let target = match route {
            Route::Push { endpoint } => g.replicas.get(&endpoint.data_addr).cloned(),
            Route::Pull { .. } => g.local.get(volume).cloned(),
        }
        .ok_or_else(|| BackendError::unavailable("no target"))?;
        Ok(ModelIo::new(primary, target))
    }

    fn on_recovery_step(&mut self, volume: &str, _replica: &ReplicaId, _step: &StepInfo) {
        self.gate.pass(volume);
    }
}

fn primary_assignment(volume: &str, epoch: u64, replica: (&str, &str)) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: volume.into(),
        epoch,
        role: BlockRole::Primary.to_wire(),
        lease_ttl_ms: 30_000,
        replica_addrs: vec![ReplicaAddr {
            data_addr: replica.0.into(),
            ctrl_addr: format!("{}-ctrl", replica.0),
            server_id: replica.1.into(),
        }],
        ..BlockVolumeAssignment::default()
    }
}

fn rebuilding_assignment(volume: &str, epoch: u64) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: volume.into(),
        epoch,
        role: BlockRole::Rebuilding.to_wire(),
        rebuild_addr: "vs1:rebuild".into(),
        ..BlockVolumeAssignment::default()
    }
}

/// WAL chunks of ten entries, so a catch-up of tens of entries takes several steps.
fn chunks_of_ten() -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: 10,
        max_base_chunk_bytes: 64,
        ..ExecutorOptions::default()
    }
}

fn one(mut out: Vec<AssignmentOutcome>) -> AssignmentOutcome {
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn sender_state(svc: &BlockService<SharedBackend>, volume: &str, id: &str) -> ReplicaState {
    svc.orchestrator(volume)
        .unwrap()
        .registry()
        .sender(&rid(id))
        .unwrap()
        .state()
}

// ---- typed refusals ------------------------------------------------------------------------

/// An assignment below the epoch the volume accepted is `Stale(Epoch)`; one at that epoch with
/// an older address version is `Stale(AddressVersion)`. Neither reaches the backend.
#[test]
fn stale_assignments_are_the_stale_variant() {
    let b = SharedBackend::default();
    b.add_primary("vol", 10);
    b.add_replica("vol", "r2", 10);
    let mut svc = BlockService::new("vs1", b.clone());
    let mut a = primary_assignment("vol", 2, ("r2", "vs2"));
    a.addr_version = 3;
    assert!(
        one(svc.process_assignments_inline(std::slice::from_ref(&a)))
            .error
            .is_none()
    );
    let applied = b.calls().len();

    let mut older_epoch = a.clone();
    older_epoch.epoch = 1;
    let out = one(svc.process_assignments(&[older_epoch]));
    assert_eq!(
        out.error,
        Some(AssignmentError::Stale(StaleAssignment::Epoch {
            assignment: Epoch(1),
            accepted: Epoch(2),
        }))
    );
    assert!(out.error.as_ref().is_some_and(AssignmentError::is_stale));
    assert!(out.pending.is_empty() && out.recoveries.is_empty());

    let mut older_version = a.clone();
    older_version.addr_version = 2;
    let out = one(svc.process_assignments(&[older_version]));
    assert_eq!(
        out.error,
        Some(AssignmentError::Stale(StaleAssignment::AddressVersion {
            epoch: Epoch(2),
            assignment: 2,
            accepted: 3,
        }))
    );
    assert!(out.pending.is_empty());
    assert_eq!(
        b.calls().len(),
        applied,
        "a stale assignment reached the backend"
    );
}

/// A malformed assignment (a bad volume name, an unknown role, a bad local server ID) is
/// `Invalid` with the conversion's own error, and creates nothing.
#[test]
fn malformed_assignments_are_the_invalid_variant() {
    let b = SharedBackend::default();
    let mut svc = BlockService::new("vs1", b.clone());
    let bad_name = primary_assignment("a/b", 1, ("r2", "vs2"));
    let out = one(svc.process_assignments(&[bad_name]));
    assert_eq!(
        out.error,
        Some(AssignmentError::Invalid(ControlError::InvalidVolume {
            name: "a/b".into(),
            reason: NameError::ContainsSlash,
        }))
    );
    assert_eq!(out.role, None);
    let mut bad_role = primary_assignment("vol", 1, ("r2", "vs2"));
    bad_role.role = 77;
    let out = one(svc.process_assignments(&[bad_role]));
    assert_eq!(
        out.error,
        Some(AssignmentError::Invalid(ControlError::UnknownRole(77)))
    );

    let mut nameless = BlockService::new("", b.clone());
    let out = one(nameless.process_assignments(&[rebuilding_assignment("vol", 1)]));
    assert!(matches!(
        out.error,
        Some(AssignmentError::Invalid(
            ControlError::InvalidLocalServerId { .. }
        ))
    ));
    assert!(svc.volumes().is_empty() && nameless.volumes().is_empty());
    assert!(b.calls().is_empty());
}

/// The backend failing to apply the role is `Backend` with the backend's own kind, and the
/// registry is left as it was; a backend failure during a recovery is a failed record with
/// `RecoveryFailure::Backend`, not a refused assignment.
#[test]
fn backend_failures_are_the_backend_variant() {
    let b = SharedBackend::default();
    b.add_primary("vol", 10);
    let mut svc = BlockService::new("vs1", b.clone());
    lock(&b.inner).apply_role_error = Some(BackendError::io("open vol.vol: disk on fire"));
    let out = one(svc.process_assignments(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    assert_eq!(
        out.error,
        Some(AssignmentError::Backend(BackendError::Io {
            message: "open vol.vol: disk on fire".into()
        }))
    );
    assert!(out.pending.is_empty());
    assert!(svc.orchestrator("vol").unwrap().registry().is_empty());
    assert_eq!(svc.role("vol"), Some(BlockRole::None));

    // The role applies; the replica does not answer: the assignment is accepted, its recovery
    // fails with the backend's kind, and the session is cancelled.
    lock(&b.inner).apply_role_error = None;
    lock(&b.inner).down.push("r2".into());
    b.add_replica("vol", "r2", 4);
    let out = one(svc.process_assignments_inline(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    assert_eq!(out.error, None);
    match &out.recoveries[..] {
        [(id, RecoveryRecord::Failed(RecoveryFailure::Backend(e)))] => {
            assert_eq!(id, &rid("vol/vs2"));
            assert!(matches!(e, BackendError::Unavailable { .. }), "{e:?}");
            assert_eq!(e.message(), "r2 unreachable");
        }
        other => panic!("expected a backend failure, got {other:?}"),
    }
    let sender = svc
        .orchestrator("vol")
        .unwrap()
        .registry()
        .sender(&rid("vol/vs2"))
        .unwrap();
    assert!(!sender.has_active_session());
}

/// A rebuilding assignment without a rebuild address settles its record at once, typed.
#[test]
fn rebuilding_without_an_address_is_a_typed_failure() {
    let b = SharedBackend::default();
    let mut svc = BlockService::new("vs2", b.clone());
    let mut a = rebuilding_assignment("vol", 1);
    a.rebuild_addr.clear();
    let out = one(svc.process_assignments(&[a]));
    assert_eq!(out.error, None);
    assert!(out.pending.is_empty());
    assert_eq!(
        out.recoveries,
        vec![(
            rid("vol/vs2"),
            RecoveryRecord::Failed(RecoveryFailure::NoRebuildAddress)
        )]
    );
    assert_eq!(
        out.recoveries[0].1.to_string(),
        "failed: rebuilding assignment without a rebuild address"
    );
}

// ---- returned recoveries ---------------------------------------------------------------------

/// Volume A's catch-up is returned, not run. It runs on a spawned thread and is held mid-way
/// (after its first chunk); meanwhile the service processes volume B's assignment and B's
/// recovery completes, and a re-delivery of A's assignment returns no second recovery for the
/// session A's worker holds. Released, A's recovery completes with the expected record.
#[test]
fn a_returned_recovery_runs_on_a_thread_while_other_volumes_are_assigned() {
    let b = SharedBackend::default();
    let pa = b.add_primary("vol-a", 100);
    let ra = b.add_replica("vol-a", "a2", 40);
    let pb = b.add_primary("vol-b", 10);
    let rb = b.add_replica("vol-b", "b2", 4);
    let mut svc = BlockService::new("vs1", b.clone()).with_executor_options(chunks_of_ten());

    let assign_a = primary_assignment("vol-a", 1, ("a2", "vs2"));
    let mut out_a = one(svc.process_assignments(std::slice::from_ref(&assign_a)));
    assert_eq!(out_a.error, None);
    assert!(
        out_a.recoveries.is_empty(),
        "process_assignments ran a recovery"
    );
    assert_eq!(out_a.pending.len(), 1);
    let recovery_a = out_a.pending.remove(0);
    assert_eq!(recovery_a.volume(), "vol-a");
    assert_eq!(recovery_a.replica(), &rid("vol-a/vs2"));
    assert_eq!(recovery_a.epoch(), Epoch(1));
    assert_eq!(
        recovery_a.route(),
        &RecoveryRoute::Push {
            endpoint: Endpoint::new("a2", "a2-ctrl", 0)
        }
    );
    let session_a = recovery_a
        .session()
        .expect("the assignment attached a session");
    // Returned, not run: nothing moved, no handshake yet.
    assert_eq!(lock(&ra).head(), Lsn(40));
    assert!(!b.calls().iter().any(|c| c.starts_with("handshake")));

    b.gate.hold("vol-a");
    let mut worker_backend = b.clone();
    let worker = thread::spawn(move || recovery_a.run(&mut worker_backend));
    b.gate.wait_reached();
    // A is mid-transfer: one chunk applied, held before the next.
    assert_eq!(lock(&ra).head(), Lsn(50));

    let out_b =
        one(svc.process_assignments_inline(&[primary_assignment("vol-b", 1, ("b2", "vs2"))]));
    assert_eq!(out_b.error, None);
    match &out_b.recoveries[..] {
        [(id, RecoveryRecord::Recovered(r))] => {
            assert_eq!(id, &rid("vol-b/vs2"));
            assert_eq!((r.path, r.entries_applied), (RecoveryPath::CatchUp, 6));
        }
        other => panic!("volume B was not recovered: {other:?}"),
    }
    assert_eq!(
        sender_state(&svc, "vol-b", "vol-b/vs2"),
        ReplicaState::InSync
    );
    assert_eq!(Some(lock(&rb).state()), pb.state_at(Lsn(10)));

    // A is still held.
    assert!(!worker.is_finished());
    assert_eq!(lock(&ra).head(), Lsn(50));
    assert_ne!(
        sender_state(&svc, "vol-a", "vol-a/vs2"),
        ReplicaState::InSync
    );
    // A duplicate of A's assignment keeps the session the worker holds: no second recovery.
    let dup = one(svc.process_assignments(std::slice::from_ref(&assign_a)));
    assert_eq!(dup.error, None);
    assert!(dup.pending.is_empty(), "{dup:?}");
    assert_eq!(dup.running, vec![(rid("vol-a/vs2"), session_a)]);

    b.gate.open();
    let record = worker.join().expect("the worker panicked");
    match &record {
        RecoveryRecord::Recovered(r) => {
            assert_eq!((r.path, r.entries_applied), (RecoveryPath::CatchUp, 60));
            assert_eq!(r.final_state, ReplicaState::InSync);
        }
        other => panic!("volume A was not recovered: {other:?}"),
    }
    assert_eq!(
        sender_state(&svc, "vol-a", "vol-a/vs2"),
        ReplicaState::InSync
    );
    assert_eq!(Some(lock(&ra).state()), pa.state_at(Lsn(100)));
    assert_eq!(pa.pins_outstanding(), 0);

    // Finished, the session is released: the next delivery returns a recovery again, which
    // finds the replica in sync.
    let again = one(svc.process_assignments_inline(&[assign_a]));
    assert!(again.running.is_empty());
    assert_eq!(
        again.recoveries,
        vec![(rid("vol-a/vs2"), RecoveryRecord::ZeroGap)]
    );
}

/// A catch-up returned for epoch 1 that has not run when the epoch-2 assignment arrives is
/// fenced: the engine refuses its session, it makes no backend call and moves nothing, and the
/// epoch-2 session is left as the assignment made it. The epoch-2 recovery then completes.
#[test]
fn a_recovery_returned_for_an_older_epoch_is_fenced() {
    let b = SharedBackend::default();
    let p = b.add_primary("vol", 100);
    let r = b.add_replica("vol", "r2", 40);
    let mut svc = BlockService::new("vs1", b.clone()).with_executor_options(chunks_of_ten());

    let mut out1 = one(svc.process_assignments(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    let old = out1.pending.remove(0);
    let mut out2 = one(svc.process_assignments(&[primary_assignment("vol", 2, ("r2", "vs2"))]));
    assert_eq!(out2.error, None);
    let new = out2.pending.remove(0);
    let (s1, s2) = (old.session().unwrap(), new.session().unwrap());
    assert_ne!(s1, s2);
    assert_eq!((old.epoch(), new.epoch()), (Epoch(1), Epoch(2)));

    let calls = b.calls().len();
    let mut worker_backend = b.clone();
    let record = thread::spawn(move || old.run(&mut worker_backend))
        .join()
        .unwrap();
    assert_eq!(
        record,
        RecoveryRecord::Failed(RecoveryFailure::Fenced(EngineError::SessionIdMismatch {
            replica: rid("vol/vs2"),
            given: s1,
            current: s2,
        }))
    );
    assert_eq!(
        b.calls().len(),
        calls,
        "the fenced recovery called the backend"
    );
    assert_eq!(lock(&r).head(), Lsn(40));
    let sender = svc
        .orchestrator("vol")
        .unwrap()
        .registry()
        .sender(&rid("vol/vs2"))
        .unwrap();
    let snap = sender.session_snapshot().unwrap();
    assert_eq!((snap.id, snap.phase), (s2, SessionPhase::Init));

    match svc.run_pending(new) {
        RecoveryRecord::Recovered(rep) => assert_eq!(rep.entries_applied, 60),
        other => panic!("the epoch-2 recovery failed: {other:?}"),
    }
    assert_eq!(
        (sender.state(), sender.epoch()),
        (ReplicaState::InSync, Epoch(2))
    );
    assert_eq!(Some(lock(&r).state()), p.state_at(Lsn(100)));
    assert_eq!(p.pins_outstanding(), 0);
}

/// The race the engine closes: the epoch-2 assignment lands after the epoch-1 recovery's
/// first authority check passed, while it is talking to the replica (inside its handshake).
/// Its plan names the epoch-1 session, so the engine refuses it atomically instead of running
/// the handshake under the epoch-2 session; the epoch-2 session is left in `init` for its own
/// recovery.
#[test]
fn an_assignment_landing_during_the_handshake_fences_the_plan() {
    let b = SharedBackend::default();
    let p = b.add_primary("vol", 100);
    let r = b.add_replica("vol", "r2", 40);
    let mut svc = BlockService::new("vs1", b.clone());
    let mut out1 = one(svc.process_assignments(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    let old = out1.pending.remove(0);
    let s1 = old.session().unwrap();
    let orch = svc.orchestrator("vol").unwrap();
    let newer = ControlBridge
        .convert_assignment(&primary_assignment("vol", 2, ("r2", "vs2")), "vs1")
        .unwrap()
        .intent;
    let concurrent = Arc::clone(&orch);
    lock(&b.inner).on_handshake = Some(Box::new(move || {
        concurrent.process_assignment(&newer).unwrap();
    }));
    let record = svc.run_pending(old);
    let sender = orch.registry().sender(&rid("vol/vs2")).unwrap();
    let snap = sender.session_snapshot().unwrap();
    assert_ne!(snap.id, s1);
    assert_eq!(
        record,
        RecoveryRecord::Failed(RecoveryFailure::Fenced(EngineError::SessionIdMismatch {
            replica: rid("vol/vs2"),
            given: s1,
            current: snap.id,
        }))
    );
    assert_eq!((snap.phase, snap.epoch), (SessionPhase::Init, Epoch(2)));
    assert_eq!(lock(&r).head(), Lsn(40));
    assert_eq!(p.pins_outstanding(), 0);
    assert!(!b.calls().iter().any(|c| c.starts_with("transfer_io")));
}

/// An epoch fence on the volume (a failover's bump, before any new assignment) fences a
/// returned recovery just the same.
#[test]
fn a_recovery_returned_before_an_epoch_fence_is_fenced() {
    let b = SharedBackend::default();
    b.add_primary("vol", 100);
    let r = b.add_replica("vol", "r2", 40);
    let mut svc = BlockService::new("vs1", b.clone());
    let mut out = one(svc.process_assignments(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    let pending = out.pending.remove(0);
    svc.orchestrator("vol").unwrap().advance_epoch(Epoch(2));
    let record = svc.run_pending(pending);
    assert!(
        matches!(
            record,
            RecoveryRecord::Failed(RecoveryFailure::Fenced(EngineError::NoActiveSession { .. }))
        ),
        "{record:?}"
    );
    assert_eq!(lock(&r).head(), Lsn(40));
}

/// A fence that lands while the recovery runs (the epoch-2 assignment processed while the
/// epoch-1 catch-up is held after its first chunk) stops it at its next authority check: its
/// record is a transfer failure, and the epoch-2 recovery then completes.
#[test]
fn an_assignment_for_a_newer_epoch_stops_a_running_recovery() {
    let b = SharedBackend::default();
    let p = b.add_primary("vol", 100);
    let r = b.add_replica("vol", "r2", 40);
    let mut svc = BlockService::new("vs1", b.clone()).with_executor_options(chunks_of_ten());
    let mut out1 = one(svc.process_assignments(&[primary_assignment("vol", 1, ("r2", "vs2"))]));
    let old = out1.pending.remove(0);
    b.gate.hold("vol");
    let mut worker_backend = b.clone();
    let worker = thread::spawn(move || old.run(&mut worker_backend));
    b.gate.wait_reached();

    let mut out2 = one(svc.process_assignments(&[primary_assignment("vol", 2, ("r2", "vs2"))]));
    assert_eq!(out2.error, None);
    assert!(out2.running.is_empty());
    let new = out2.pending.remove(0);
    b.gate.open();
    let record = worker.join().unwrap();
    assert!(
        matches!(
            &record,
            RecoveryRecord::Failed(RecoveryFailure::Transfer(
                EngineError::ExecutionFailed { .. }
            ))
        ),
        "{record:?}"
    );
    assert_eq!(lock(&r).head(), Lsn(50), "the fenced catch-up moved on");
    assert_eq!(p.pins_outstanding(), 0);

    lock(&b.gate.state).volume = None;
    match svc.run_pending(new) {
        RecoveryRecord::Recovered(rep) => assert_eq!(rep.entries_applied, 50),
        other => panic!("the epoch-2 recovery failed: {other:?}"),
    }
    assert_eq!(Some(lock(&r).state()), p.state_at(Lsn(100)));
}

/// The pull side: a rebuild returned for epoch 1 that has not run when the epoch-2 rebuilding
/// assignment arrives is fenced and leaves the local copy untouched; the epoch-2 rebuild runs.
#[test]
fn a_rebuild_returned_for_an_older_epoch_is_fenced() {
    let b = SharedBackend::default();
    let p = b.add_primary("vol", 20);
    let local = b.add_local("vol", 3);
    let before = lock(&local).clone();
    let mut svc = BlockService::new("vs2", b.clone()).with_executor_options(chunks_of_ten());
    let mut out1 = one(svc.process_assignments(&[rebuilding_assignment("vol", 1)]));
    let old = out1.pending.remove(0);
    assert!(
        matches!(old.route(), RecoveryRoute::Pull { rebuild_addr } if rebuild_addr == "vs1:rebuild")
    );
    let mut out2 = one(svc.process_assignments(&[rebuilding_assignment("vol", 2)]));
    let new = out2.pending.remove(0);

    let record = svc.run_pending(old);
    assert!(
        matches!(
            record,
            RecoveryRecord::Failed(RecoveryFailure::Fenced(
                EngineError::SessionIdMismatch { .. }
            ))
        ),
        "{record:?}"
    );
    assert_eq!(*lock(&local), before, "the fenced rebuild touched the copy");
    match svc.run_pending(new) {
        RecoveryRecord::Recovered(rep) => assert_eq!(rep.base_lsn, Some(Lsn(20))),
        other => panic!("the epoch-2 rebuild failed: {other:?}"),
    }
    assert_eq!(Some(lock(&local).state()), p.state_at(Lsn(20)));
    assert_eq!(p.pins_outstanding(), 0);
}

/// A recovery dropped unrun releases its hold: the next delivery returns one again, for the
/// same session.
#[test]
fn a_dropped_recovery_releases_its_session() {
    let b = SharedBackend::default();
    b.add_primary("vol", 10);
    b.add_replica("vol", "r2", 4);
    let mut svc = BlockService::new("vs1", b.clone());
    let a = primary_assignment("vol", 1, ("r2", "vs2"));
    let mut first = one(svc.process_assignments(std::slice::from_ref(&a)));
    let sid = first.pending[0].session();
    let held = one(svc.process_assignments(std::slice::from_ref(&a)));
    assert!(held.pending.is_empty() && held.running.len() == 1);
    first.pending.clear();
    let mut again = one(svc.process_assignments(&[a]));
    assert_eq!(again.pending.len(), 1);
    assert_eq!(again.pending[0].session(), sid);
    let record = svc.run_pending(again.pending.remove(0));
    assert!(matches!(record, RecoveryRecord::Recovered(_)), "{record:?}");
}
