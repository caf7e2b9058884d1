//! `BlockService`: a volume server's side of the control plane. One orchestrator (registry +
//! log) and one driver per volume, never a shared registry, so an assignment for one volume can
//! never touch another volume's senders.
//!
//! The service is generic over a [`VolumeBackend`] that opens volumes and moves data (the
//! workspace's backend does it with blockvol volumes through v2bridge), so this crate depends
//! on the engine only.
//!
//! Who drives what: a primary drives catch-up (and truncation) of its replicas, pushing WAL;
//! a replica assigned `rebuilding` drives its own rebuild, pulling a base image (and tail) from
//! the primary's rebuild endpoint. After a rebuild the primary's next assignment finds the
//! replica at or near committed and completes it with a zero gap or a short catch-up.
//!
//! Processing an assignment never moves data: [`BlockService::process_assignments`] records
//! the role and the volume's registry state and returns the recoveries the assignment calls
//! for as [`PendingRecovery`]s, each bound to the engine session the assignment attached. A
//! caller runs them wherever it likes (worker threads, while it processes further
//! assignments); [`BlockService::process_assignments_inline`] runs them at once, in order, for
//! deterministic callers. A pending recovery whose session a newer assignment (or an epoch
//! fence) replaced or ended before it ran is refused by the engine's session fencing
//! ([`RecoveryFailure::Fenced`]) and moves nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use engine::{
    CatchUpExecutor, Endpoint, EngineError, Epoch, ExecutionReport, ExecutorOptions, Outcome,
    ProofReason, RebuildExecutor, RebuildIo, RecoveryDriver, RecoveryOrchestrator, RecoveryPlan,
    ReplicaHandshake, ReplicaId, ReplicaState, SessionId, SessionKind, StepInfo, StorageAdapter,
};

use crate::assignment::{BlockRole, BlockVolumeAssignment, ControlBridge, SkippedReplica};
use crate::error::{AssignmentError, BackendError, RecoveryFailure, StaleAssignment};

/// Where a transfer goes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// From the local primary to the replica at this endpoint (catch-up, truncation).
    Push {
        /// The replica's endpoint.
        endpoint: &'a Endpoint,
    },
    /// From the primary at this rebuild address into the local volume (rebuild).
    Pull {
        /// The primary's rebuild endpoint.
        rebuild_addr: &'a str,
    },
}

/// What the service needs from the storage and transport of a volume server.
///
/// The service calls [`apply_role`](Self::apply_role) while it processes an assignment; a
/// [`PendingRecovery`] calls the rest while it runs, on whichever backend value it is given.
/// A caller that runs recoveries on worker threads gives each one a backend of its own (for
/// example a clone of a handle onto shared state), so `&mut self` here never serialises two
/// recoveries or a recovery and an assignment.
pub trait VolumeBackend {
    /// The I/O of one recovery session.
    type Io: RebuildIo;

    /// Makes the local volume match the role and epoch (open or create it, fence it).
    fn apply_role(
        &mut self,
        volume: &str,
        role: BlockRole,
        epoch: Epoch,
        lease_ttl_ms: u64,
    ) -> Result<(), BackendError>;

    /// The primary's storage for `volume`: the local volume (`rebuild_addr` = `None`) or the
    /// primary reached at `rebuild_addr`.
    fn primary_storage(
        &mut self,
        volume: &str,
        rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError>;

    /// What the replica at `endpoint` reports at a handshake.
    fn replica_handshake(
        &mut self,
        volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError>;

    /// The I/O for one recovery session.
    fn transfer_io(
        &mut self,
        volume: &str,
        route: Route<'_>,
        epoch: Epoch,
        session: SessionId,
    ) -> Result<Self::Io, BackendError>;

    /// Called after each step of a recovery the service drives for `replica` (truncation, WAL
    /// chunk, base chunk, base installed, tail chunk), before the executor re-checks the
    /// session's authority, so anything done here that fences the session stops the executor
    /// before its next step moves data. A deployment can report progress here; the workspace's
    /// simulator injects concurrent events (writes, faults, epoch bumps) at this point. The
    /// default does nothing.
    fn on_recovery_step(&mut self, volume: &str, replica: &ReplicaId, step: &StepInfo) {
        let _ = (volume, replica, step);
    }

    /// What this server's own copy of `volume` reports at a handshake, read locally (no
    /// network), when it holds one. A rebuilding assignment uses it to decline a rebuild the
    /// copy does not need. The default (`None`: unknown) always rebuilds.
    fn local_handshake(&mut self, volume: &str) -> Option<ReplicaHandshake> {
        let _ = volume;
        None
    }
}

/// What happened to one replica's recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryRecord {
    /// Already in sync (zero gap).
    ZeroGap,
    /// Recovered by an executor.
    Recovered(Box<ExecutionReport>),
    /// Needs a rebuild; waits for a rebuild assignment.
    NeedsRebuild,
    /// A rebuilding assignment was declined: the local copy does not need one (its log matches
    /// the primary's and the primary's retained history can catch it up). Carries the
    /// recoverability proof's reason.
    RebuildNotNeeded(ProofReason),
    /// The recovery failed, and why.
    Failed(RecoveryFailure),
}

impl fmt::Display for RecoveryRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryRecord::ZeroGap => f.write_str("zero gap"),
            RecoveryRecord::Recovered(r) => write!(
                f,
                "recovered by {} to {} ({} entries, {} base bytes)",
                r.path, r.target, r.entries_applied, r.base_bytes_sent
            ),
            RecoveryRecord::NeedsRebuild => f.write_str("needs rebuild"),
            RecoveryRecord::RebuildNotNeeded(r) => write!(f, "rebuild not needed: {r}"),
            RecoveryRecord::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Where a pending recovery moves data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryRoute {
    /// The local primary catches up (or truncates) the replica at this endpoint.
    Push {
        /// The replica's endpoint, as the assignment gave it.
        endpoint: Endpoint,
    },
    /// The local copy is rebuilt from the primary at this rebuild address.
    Pull {
        /// The primary's rebuild endpoint.
        rebuild_addr: String,
    },
}

/// The sessions of one volume that a returned [`PendingRecovery`] holds and has not finished.
type InFlight = Arc<Mutex<BTreeSet<(ReplicaId, SessionId)>>>;

/// A returned recovery's hold on its session: while it lives, a re-delivered assignment that
/// keeps the session returns no second recovery for it. Released when the recovery finishes or
/// is dropped.
#[derive(Debug)]
struct Claim {
    set: InFlight,
    key: (ReplicaId, SessionId),
}

impl Claim {
    /// Claims `key` in `set`; `None` when a returned recovery already holds it.
    fn take(set: &InFlight, key: (ReplicaId, SessionId)) -> Option<Claim> {
        let mut g = set.lock().unwrap_or_else(PoisonError::into_inner);
        g.insert(key.clone()).then(|| Claim {
            set: Arc::clone(set),
            key,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// One replica's recovery that an assignment called for, not yet run. It owns what it needs
/// (the volume's orchestrator, the replica, the session the assignment attached, the route and
/// the executor options) and is `Send`: run it with [`run`](Self::run) on any thread, with any
/// backend value that reaches the volume's storage and transport.
///
/// It is bound to the session the assignment attached. If that session is no longer the
/// sender's current, active session with its authority intact when the recovery runs (a newer
/// assignment replaced it, an epoch fence or a cancel ended it), the engine refuses it
/// ([`RecoveryFailure::Fenced`]) and nothing moves; the check and the session's claim are one
/// step under the sender's lock ([`RecoveryDriver::plan_recovery_in`],
/// [`RecoveryDriver::plan_rebuild_in`]). Once running, the executor re-checks authority after
/// every step, so a fence that lands mid-transfer stops it before its next step moves data.
///
/// Dropping it unrun leaves the session as the assignment made it; a re-delivery of the
/// assignment returns a new recovery for it.
#[derive(Debug)]
#[must_use = "a pending recovery does nothing until it is run"]
pub struct PendingRecovery {
    volume: String,
    orchestrator: Arc<RecoveryOrchestrator>,
    replica: ReplicaId,
    session: Option<SessionId>,
    epoch: Epoch,
    route: RecoveryRoute,
    options: ExecutorOptions,
    /// Held while the recovery lives (only when it has a session).
    _claim: Option<Claim>,
}

// A pending recovery is meant to be moved to a worker thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<PendingRecovery>();
};

impl PendingRecovery {
    /// The volume.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The replica it recovers.
    pub fn replica(&self) -> &ReplicaId {
        &self.replica
    }

    /// The session the assignment left the sender with, when it had an active one. Without
    /// one, running it moves nothing: a push reports the replica's state (in sync, needs a
    /// rebuild), a pull can only decline (the copy needs no rebuild) or fail.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The epoch it belongs to.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Where it moves data.
    pub fn route(&self) -> &RecoveryRoute {
        &self.route
    }

    /// Runs the recovery through `backend`: for a push, handshake, plan and catch-up (or
    /// truncation) of the replica; for a pull, the "rebuild not needed" check, then plan and
    /// rebuild of the local copy. Logs and returns what happened.
    pub fn run<B: VolumeBackend>(self, backend: &mut B) -> RecoveryRecord {
        let rec = match &self.route {
            RecoveryRoute::Push { endpoint } => self.push(backend, endpoint),
            RecoveryRoute::Pull { rebuild_addr } => self.pull(backend, rebuild_addr),
        };
        match &rec {
            RecoveryRecord::Failed(e) => log::warn!(
                "volume {} epoch {}: recovery of {} failed: {e}",
                self.volume,
                self.epoch,
                self.replica
            ),
            rec => log::info!(
                "volume {} epoch {}: recovery of {}: {rec}",
                self.volume,
                self.epoch,
                self.replica
            ),
        }
        rec
    }

    fn fenced(&self, e: EngineError) -> RecoveryRecord {
        RecoveryRecord::Failed(RecoveryFailure::Fenced(e))
    }

    fn sender_gone(&self) -> RecoveryRecord {
        self.fenced(EngineError::SenderNotFound {
            replica: self.replica.clone(),
        })
    }

    /// Primary side: handshake, plan, and run the catch-up (or truncation) of one replica.
    fn push<B: VolumeBackend>(&self, backend: &mut B, endpoint: &Endpoint) -> RecoveryRecord {
        let (volume, id) = (self.volume.as_str(), &self.replica);
        let Some(sender) = self.orchestrator.registry().sender(id) else {
            return self.sender_gone();
        };
        let Some(sid) = self.session else {
            // No session to drive (the replica was in sync, or waits for a rebuild, when the
            // assignment was applied): report where the replica stands now. Nothing is moved,
            // so there is nothing to fence.
            return match sender.state() {
                ReplicaState::InSync => RecoveryRecord::ZeroGap,
                ReplicaState::NeedsRebuild => RecoveryRecord::NeedsRebuild,
                state => RecoveryRecord::Failed(RecoveryFailure::NoSession { state }),
            };
        };
        // Cheap early refusal before any network work; the plan re-checks atomically.
        if let Err(e) = sender.check_authority(sid) {
            return self.fenced(e);
        }
        let storage = match backend.primary_storage(volume, None) {
            Ok(s) => s,
            Err(e) => return RecoveryRecord::Failed(RecoveryFailure::Backend(e)),
        };
        let driver = RecoveryDriver::with_orchestrator(Arc::clone(&self.orchestrator), storage);
        let hs = match backend.replica_handshake(volume, endpoint) {
            Ok(h) => h,
            Err(e) => {
                driver.cancel_session(id, sid, "handshake_unreachable");
                return RecoveryRecord::Failed(RecoveryFailure::Backend(e));
            }
        };
        let plan = match driver.plan_recovery_in(id, sid, hs) {
            Ok(p) => p,
            Err(e) => return RecoveryRecord::Failed(RecoveryFailure::from_plan(e)),
        };
        match plan.outcome() {
            Outcome::ZeroGap => RecoveryRecord::ZeroGap,
            Outcome::NeedsRebuild => RecoveryRecord::NeedsRebuild,
            Outcome::CatchUp => {
                let route = Route::Push { endpoint };
                match plan_io(backend, &driver, volume, route, self.epoch, plan) {
                    Ok((mut io, plan)) => executed(
                        CatchUpExecutor::new(&driver, plan)
                            .with_options(self.options)
                            .with_on_step(|s| backend.on_recovery_step(volume, id, s))
                            .execute(&mut io),
                    ),
                    Err(rec) => rec,
                }
            }
        }
    }

    /// Rebuilding replica side: plan against the primary's storage and pull the rebuild.
    fn pull<B: VolumeBackend>(&self, backend: &mut B, rebuild_addr: &str) -> RecoveryRecord {
        let (volume, id) = (self.volume.as_str(), &self.replica);
        let Some(sender) = self.orchestrator.registry().sender(id) else {
            return self.sender_gone();
        };
        if let Some(sid) = self.session
            && let Err(e) = sender.check_authority(sid)
        {
            return self.fenced(e);
        }
        let storage = match backend.primary_storage(volume, Some(rebuild_addr)) {
            Ok(s) => s,
            Err(e) => return RecoveryRecord::Failed(RecoveryFailure::Backend(e)),
        };
        let driver = RecoveryDriver::with_orchestrator(Arc::clone(&self.orchestrator), storage);
        if let Some(reason) = rebuild_not_needed(backend, volume, driver.storage().as_ref()) {
            // A rebuild wipes the local copy first. A rebuilding assignment that arrives late or
            // twice must not wipe a replica that has recovered since: the primary may already
            // count it in sync, and its catch-up can do whatever is left.
            if let Some(sid) = self.session {
                driver.cancel_session(id, sid, "rebuild_not_needed");
            }
            return RecoveryRecord::RebuildNotNeeded(reason);
        }
        // Without a session from the assignment there is nothing to plan under; planning
        // against whatever session the sender holds now could claim a newer assignment's.
        let Some(sid) = self.session else {
            return RecoveryRecord::Failed(RecoveryFailure::Plan(EngineError::NoSession {
                replica: id.clone(),
            }));
        };
        let plan = match driver.plan_rebuild_in(id, sid) {
            Ok(p) => p,
            Err(e) => return RecoveryRecord::Failed(RecoveryFailure::from_plan(e)),
        };
        let route = Route::Pull { rebuild_addr };
        match plan_io(backend, &driver, volume, route, self.epoch, plan) {
            Ok((mut io, plan)) => executed(
                RebuildExecutor::new(&driver, plan)
                    .with_options(self.options)
                    .with_on_step(|s| backend.on_recovery_step(volume, id, s))
                    .execute(&mut io),
            ),
            Err(rec) => rec,
        }
    }
}

/// `Some(reason)` when the local copy's log matches the primary's at its head (entry identity,
/// not just the LSN) and the primary's retained history can bring it to committed without a
/// base image: zero gap, or a gap within retention with no hole.
fn rebuild_not_needed<B: VolumeBackend>(
    backend: &mut B,
    volume: &str,
    storage: &dyn StorageAdapter,
) -> Option<ProofReason> {
    let hs = backend.local_handshake(volume)?;
    let tip = hs.tip().filter(|_| !hs.is_incomplete())?;
    let history = storage.get_retained_history().ok()?;
    if hs.flushed() > history.committed_lsn {
        return None;
    }
    let primary = storage.entry_id(hs.flushed()).ok()??;
    if primary != tip {
        return None;
    }
    let proof = history.prove_with_anchor(&hs, Some(primary));
    proof.recoverable.then_some(proof.reason)
}

/// The I/O for the plan's session. When the transport cannot provide one, the plan is
/// cancelled (pins released, session invalidated) rather than left half-alive.
fn plan_io<B: VolumeBackend>(
    backend: &mut B,
    driver: &RecoveryDriver,
    volume: &str,
    route: Route<'_>,
    epoch: Epoch,
    plan: RecoveryPlan,
) -> Result<(B::Io, RecoveryPlan), RecoveryRecord> {
    let Some(sid) = plan.session_id() else {
        let replica = plan.replica_id().clone();
        driver.cancel_plan(plan, "plan_without_session");
        return Err(RecoveryRecord::Failed(RecoveryFailure::Plan(
            EngineError::NoSession { replica },
        )));
    };
    match backend.transfer_io(volume, route, epoch, sid) {
        Ok(io) => Ok((io, plan)),
        Err(e) => {
            driver.cancel_plan(plan, "transport_unavailable");
            Err(RecoveryRecord::Failed(RecoveryFailure::Backend(e)))
        }
    }
}

fn executed(r: Result<ExecutionReport, EngineError>) -> RecoveryRecord {
    match r {
        Ok(r) => RecoveryRecord::Recovered(Box::new(r)),
        Err(e) => RecoveryRecord::Failed(RecoveryFailure::Transfer(e)),
    }
}

/// The service's answer to one assignment.
#[derive(Debug)]
pub struct AssignmentOutcome {
    /// The volume (or the raw path when conversion failed).
    pub volume: String,
    /// The role, when conversion succeeded.
    pub role: Option<BlockRole>,
    /// Why the assignment was refused, when it was.
    pub error: Option<AssignmentError>,
    /// Replicas skipped for missing or malformed identity.
    pub skipped: Vec<SkippedReplica>,
    /// Recoveries the assignment calls for, in order, not yet run.
    /// [`BlockService::process_assignments_inline`] runs them and leaves this empty.
    pub pending: Vec<PendingRecovery>,
    /// Recoveries settled, by replica: those decided while processing the assignment (a
    /// rebuilding assignment without a rebuild address) and, after
    /// [`BlockService::process_assignments_inline`], those it ran, in order.
    pub recoveries: Vec<(ReplicaId, RecoveryRecord)>,
    /// Recovery targets whose session a recovery returned earlier still holds (not finished):
    /// the assignment kept that session, and no second recovery is returned for it.
    pub running: Vec<(ReplicaId, SessionId)>,
}

impl AssignmentOutcome {
    fn new(volume: &str, role: Option<BlockRole>) -> Self {
        AssignmentOutcome {
            volume: volume.to_owned(),
            role,
            error: None,
            skipped: Vec::new(),
            pending: Vec::new(),
            recoveries: Vec::new(),
            running: Vec::new(),
        }
    }

    fn refused(mut self, e: AssignmentError) -> Self {
        log::warn!("assignment for {:?} refused: {e}", self.volume);
        self.error = Some(e);
        self
    }
}

struct VolumeState {
    orchestrator: Arc<RecoveryOrchestrator>,
    role: BlockRole,
    /// The (epoch, address version) of the newest assignment accepted for this volume.
    accepted: (u64, u64),
    /// Sessions held by returned recoveries that have not finished.
    in_flight: InFlight,
}

/// A volume server's control-plane service.
pub struct BlockService<B: VolumeBackend> {
    local_server_id: String,
    bridge: ControlBridge,
    backend: B,
    volumes: BTreeMap<String, VolumeState>,
    options: ExecutorOptions,
}

impl<B: VolumeBackend> BlockService<B> {
    /// A service for the server `local_server_id` (its stable ID, never its address).
    pub fn new(local_server_id: impl Into<String>, backend: B) -> Self {
        BlockService {
            local_server_id: local_server_id.into(),
            bridge: ControlBridge,
            backend,
            volumes: BTreeMap::new(),
            options: ExecutorOptions::default(),
        }
    }

    /// Sets the executors' tunables (carried by every recovery returned from then on).
    pub fn with_executor_options(mut self, options: ExecutorOptions) -> Self {
        self.options = options;
        self
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// This server's stable ID.
    pub fn local_server_id(&self) -> &str {
        &self.local_server_id
    }

    /// The orchestrator of `volume`, once an assignment created it.
    pub fn orchestrator(&self, volume: &str) -> Option<Arc<RecoveryOrchestrator>> {
        self.volumes
            .get(volume)
            .map(|v| Arc::clone(&v.orchestrator))
    }

    /// The role the last accepted assignment gave `volume`.
    pub fn role(&self, volume: &str) -> Option<BlockRole> {
        self.volumes.get(volume).map(|v| v.role)
    }

    /// Volumes with an orchestrator.
    pub fn volumes(&self) -> Vec<String> {
        self.volumes.keys().cloned().collect()
    }

    /// Converts and applies each assignment in order: fences stale ones, applies the role
    /// through the backend and the intent to the volume's orchestrator, and returns the
    /// recoveries it calls for in [`AssignmentOutcome::pending`], not run (see the module docs
    /// for who drives what). Nothing here moves data, so a long recovery of one volume never
    /// holds up assignments for another.
    pub fn process_assignments(
        &mut self,
        assignments: &[BlockVolumeAssignment],
    ) -> Vec<AssignmentOutcome> {
        assignments.iter().map(|a| self.process_one(a)).collect()
    }

    /// [`process_assignments`](Self::process_assignments), running each assignment's
    /// recoveries at once, in order, through this service's backend, before the next
    /// assignment: their records are in [`AssignmentOutcome::recoveries`]. For deterministic
    /// callers (the simulator, tests, single-threaded tools).
    pub fn process_assignments_inline(
        &mut self,
        assignments: &[BlockVolumeAssignment],
    ) -> Vec<AssignmentOutcome> {
        assignments
            .iter()
            .map(|a| {
                let mut out = self.process_one(a);
                for p in std::mem::take(&mut out.pending) {
                    let id = p.replica().clone();
                    let rec = self.run_pending(p);
                    out.recoveries.push((id, rec));
                }
                out
            })
            .collect()
    }

    /// Runs one returned recovery through this service's backend.
    pub fn run_pending(&mut self, recovery: PendingRecovery) -> RecoveryRecord {
        recovery.run(&mut self.backend)
    }

    fn process_one(&mut self, a: &BlockVolumeAssignment) -> AssignmentOutcome {
        let conv = match self.bridge.convert_assignment(a, &self.local_server_id) {
            Ok(c) => c,
            Err(e) => {
                return AssignmentOutcome::new(&a.path, None).refused(AssignmentError::Invalid(e));
            }
        };
        let mut out = AssignmentOutcome::new(&conv.volume, Some(conv.role));
        out.skipped = conv.skipped.clone();
        let state = self
            .volumes
            .entry(conv.volume.clone())
            .or_insert_with(|| VolumeState {
                orchestrator: Arc::new(RecoveryOrchestrator::new()),
                role: BlockRole::None,
                accepted: (0, 0),
                in_flight: InFlight::default(),
            });
        let orch = Arc::clone(&state.orchestrator);
        let in_flight = Arc::clone(&state.in_flight);
        // Within one epoch the master's address version only grows: an assignment carrying an
        // older one was delivered late, and applying it would move senders back to addresses
        // the master has already replaced (and demote replicas that are in sync).
        let accepted = state.accepted;
        if a.epoch == accepted.0 && a.addr_version < accepted.1 {
            return out.refused(AssignmentError::Stale(StaleAssignment::AddressVersion {
                epoch: Epoch(a.epoch),
                assignment: a.addr_version,
                accepted: accepted.1,
            }));
        }
        // Fence first: an assignment older than what this volume's registry accepted must not
        // reach the volume either.
        let registry_epoch = orch.registry().epoch();
        if conv.intent.epoch < registry_epoch {
            return out.refused(AssignmentError::Stale(StaleAssignment::Epoch {
                assignment: conv.intent.epoch,
                accepted: registry_epoch,
            }));
        }
        if let Err(e) = self.backend.apply_role(
            &conv.volume,
            conv.role,
            conv.intent.epoch,
            conv.lease_ttl_ms,
        ) {
            return out.refused(AssignmentError::Backend(e));
        }
        let result = match orch.process_assignment(&conv.intent) {
            Ok(r) => r,
            Err(EngineError::StaleIntent { intent, registry }) => {
                return out.refused(AssignmentError::Stale(StaleAssignment::Epoch {
                    assignment: intent,
                    accepted: registry,
                }));
            }
            Err(e) => return out.refused(AssignmentError::Engine(e)),
        };
        if let Some(v) = self.volumes.get_mut(&conv.volume) {
            v.role = conv.role;
            v.accepted = v.accepted.max((a.epoch, a.addr_version));
        }
        log::info!(
            "volume {} role {} epoch {}: added {:?} removed {:?} created {} superseded {} kept {} failed {}",
            conv.volume,
            conv.role,
            conv.intent.epoch,
            result.added,
            result.removed,
            result.sessions_created.len(),
            result.sessions_superseded.len(),
            result.sessions_kept.len(),
            result.sessions_failed.len()
        );
        let pending = |id: &ReplicaId, route: RecoveryRoute, out: &mut AssignmentOutcome| {
            // The session the assignment left the sender with (created, superseded or kept);
            // the recovery is bound to it.
            let session = orch
                .registry()
                .sender(id)
                .and_then(|s| s.session_snapshot())
                .filter(|s| s.active);
            let claim = match &session {
                Some(s) => match Claim::take(&in_flight, (id.clone(), s.id)) {
                    Some(c) => Some(c),
                    None => {
                        log::info!(
                            "volume {}: recovery of {id} under session {} is already running",
                            conv.volume,
                            s.id
                        );
                        out.running.push((id.clone(), s.id));
                        return;
                    }
                },
                None => None,
            };
            out.pending.push(PendingRecovery {
                volume: conv.volume.clone(),
                orchestrator: Arc::clone(&orch),
                replica: id.clone(),
                session: session.as_ref().map(|s| s.id),
                epoch: session.as_ref().map_or(conv.intent.epoch, |s| s.epoch),
                route,
                options: self.options,
                _claim: claim,
            });
        };
        match conv.role {
            BlockRole::Primary => {
                for r in &conv.intent.replicas {
                    if conv.intent.recovery_targets.get(&r.replica_id)
                        != Some(&SessionKind::CatchUp)
                    {
                        continue;
                    }
                    let route = RecoveryRoute::Push {
                        endpoint: r.endpoint.clone(),
                    };
                    pending(&r.replica_id, route, &mut out);
                }
            }
            BlockRole::Rebuilding => {
                for (id, kind) in &conv.intent.recovery_targets {
                    if *kind != SessionKind::Rebuild {
                        continue;
                    }
                    match &conv.rebuild_addr {
                        Some(addr) => {
                            let route = RecoveryRoute::Pull {
                                rebuild_addr: addr.clone(),
                            };
                            pending(id, route, &mut out);
                        }
                        None => {
                            log::warn!(
                                "volume {}: rebuilding assignment for {id} without a rebuild address",
                                conv.volume
                            );
                            out.recoveries.push((
                                id.clone(),
                                RecoveryRecord::Failed(RecoveryFailure::NoRebuildAddress),
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
        out
    }
}
