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

use std::collections::BTreeMap;
use std::sync::Arc;

use engine::{
    CatchUpExecutor, Endpoint, EngineError, Epoch, ExecutionReport, ExecutorOptions, Outcome,
    RebuildExecutor, RebuildIo, RecoveryDriver, RecoveryOrchestrator, RecoveryPlan,
    ReplicaHandshake, ReplicaId, ReplicaState, SessionId, SessionKind, StepInfo, StorageAdapter,
};

use crate::assignment::{
    BlockRole, BlockVolumeAssignment, ControlBridge, ControlError, SkippedReplica,
};

/// A backend failure, described by the backend.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("backend: {0}")]
pub struct BackendError(pub String);

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

/// What happened to one replica's recovery during an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryRecord {
    /// Already in sync (zero gap).
    ZeroGap,
    /// Recovered by an executor.
    Recovered(Box<ExecutionReport>),
    /// Needs a rebuild; waits for a rebuild assignment.
    NeedsRebuild,
    /// A rebuilding assignment was declined: the local copy does not need one (its log matches
    /// the primary's and the primary's retained history can catch it up). The text is the
    /// recoverability proof's reason.
    RebuildNotNeeded(String),
    /// Planning or execution failed.
    Failed(String),
}

/// The service's answer to one assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignmentOutcome {
    /// The volume (or the raw path when conversion failed).
    pub volume: String,
    /// The role, when conversion succeeded.
    pub role: Option<BlockRole>,
    /// Conversion failure, or a stale intent refused by the volume's registry.
    pub error: Option<String>,
    /// Replicas skipped for missing or malformed identity.
    pub skipped: Vec<SkippedReplica>,
    /// Recoveries attempted, by replica.
    pub recoveries: Vec<(ReplicaId, RecoveryRecord)>,
}

struct VolumeState {
    orchestrator: Arc<RecoveryOrchestrator>,
    role: BlockRole,
    /// The (epoch, address version) of the newest assignment accepted for this volume.
    accepted: (u64, u64),
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

    /// Sets the executors' tunables.
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

    /// Converts and applies each assignment in order, then drives the recoveries it calls
    /// for (see the module docs for who drives what).
    pub fn process_assignments(
        &mut self,
        assignments: &[BlockVolumeAssignment],
    ) -> Vec<AssignmentOutcome> {
        assignments.iter().map(|a| self.process_one(a)).collect()
    }

    fn process_one(&mut self, a: &BlockVolumeAssignment) -> AssignmentOutcome {
        let conv = match self.bridge.convert_assignment(a, &self.local_server_id) {
            Ok(c) => c,
            Err(e) => return failed(&a.path, None, &e),
        };
        let mut out = AssignmentOutcome {
            volume: conv.volume.clone(),
            role: Some(conv.role),
            error: None,
            skipped: conv.skipped.clone(),
            recoveries: Vec::new(),
        };
        let orch = Arc::clone(
            &self
                .volumes
                .entry(conv.volume.clone())
                .or_insert_with(|| VolumeState {
                    orchestrator: Arc::new(RecoveryOrchestrator::new()),
                    role: BlockRole::None,
                    accepted: (0, 0),
                })
                .orchestrator,
        );
        // Within one epoch the master's address version only grows: an assignment carrying an
        // older one was delivered late, and applying it would move senders back to addresses
        // the master has already replaced (and demote replicas that are in sync).
        let accepted = self
            .volumes
            .get(&conv.volume)
            .map_or((0, 0), |v| v.accepted);
        if a.epoch == accepted.0 && a.addr_version < accepted.1 {
            out.error = Some(format!(
                "stale assignment: address version {} at epoch {}, version {} already accepted",
                a.addr_version, a.epoch, accepted.1
            ));
            return out;
        }
        // Fence first: an assignment older than what this volume's registry accepted must not
        // reach the volume either.
        if conv.intent.epoch < orch.registry().epoch() {
            out.error = Some(
                EngineError::StaleIntent {
                    intent: conv.intent.epoch,
                    registry: orch.registry().epoch(),
                }
                .to_string(),
            );
            return out;
        }
        if let Err(e) = self.backend.apply_role(
            &conv.volume,
            conv.role,
            conv.intent.epoch,
            conv.lease_ttl_ms,
        ) {
            out.error = Some(e.to_string());
            return out;
        }
        let result = match orch.process_assignment(&conv.intent) {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
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
        match conv.role {
            BlockRole::Primary => {
                for r in &conv.intent.replicas {
                    if conv.intent.recovery_targets.get(&r.replica_id)
                        != Some(&SessionKind::CatchUp)
                    {
                        continue;
                    }
                    let rec = self.recover_replica(&conv.volume, &orch, &r.replica_id, &r.endpoint);
                    out.recoveries.push((r.replica_id.clone(), rec));
                }
            }
            BlockRole::Rebuilding => {
                for (id, kind) in &conv.intent.recovery_targets {
                    if *kind != SessionKind::Rebuild {
                        continue;
                    }
                    let rec = match conv.rebuild_addr.as_deref() {
                        Some(addr) => self.rebuild_local(&conv.volume, &orch, id, addr),
                        None => RecoveryRecord::Failed(
                            "rebuilding assignment without a rebuild address".into(),
                        ),
                    };
                    out.recoveries.push((id.clone(), rec));
                }
            }
            _ => {}
        }
        out
    }

    /// Primary side: handshake, plan, and run the catch-up (or truncation) of one replica.
    fn recover_replica(
        &mut self,
        volume: &str,
        orch: &Arc<RecoveryOrchestrator>,
        id: &ReplicaId,
        endpoint: &Endpoint,
    ) -> RecoveryRecord {
        let Some(sender) = orch.registry().sender(id) else {
            return RecoveryRecord::Failed(format!("no sender for {id}"));
        };
        if !sender.has_active_session() {
            return match sender.state() {
                ReplicaState::InSync => RecoveryRecord::ZeroGap,
                ReplicaState::NeedsRebuild => RecoveryRecord::NeedsRebuild,
                s => RecoveryRecord::Failed(format!("no session for {id} (state {s})")),
            };
        }
        let storage = match self.backend.primary_storage(volume, None) {
            Ok(s) => s,
            Err(e) => return RecoveryRecord::Failed(e.to_string()),
        };
        let driver = RecoveryDriver::with_orchestrator(Arc::clone(orch), storage);
        let hs = match self.backend.replica_handshake(volume, endpoint) {
            Ok(h) => h,
            Err(e) => {
                if let Some(sid) = sender.session_id() {
                    driver.cancel_session(id, sid, "handshake_unreachable");
                }
                return RecoveryRecord::Failed(e.to_string());
            }
        };
        let plan = match driver.plan_recovery(id, hs) {
            Ok(p) => p,
            Err(e) => return RecoveryRecord::Failed(e.to_string()),
        };
        match plan.outcome() {
            Outcome::ZeroGap => RecoveryRecord::ZeroGap,
            Outcome::NeedsRebuild => RecoveryRecord::NeedsRebuild,
            Outcome::CatchUp => {
                let route = Route::Push { endpoint };
                match self.plan_io(&driver, volume, route, sender.epoch(), plan) {
                    Ok((mut io, plan)) => {
                        let backend = &mut self.backend;
                        executed(
                            CatchUpExecutor::new(&driver, plan)
                                .with_options(self.options)
                                .with_on_step(|s| backend.on_recovery_step(volume, id, s))
                                .execute(&mut io),
                        )
                    }
                    Err(rec) => rec,
                }
            }
        }
    }

    /// Rebuilding replica side: plan against the primary's storage and pull the rebuild.
    fn rebuild_local(
        &mut self,
        volume: &str,
        orch: &Arc<RecoveryOrchestrator>,
        id: &ReplicaId,
        rebuild_addr: &str,
    ) -> RecoveryRecord {
        let Some(sender) = orch.registry().sender(id) else {
            return RecoveryRecord::Failed(format!("no sender for {id}"));
        };
        let storage = match self.backend.primary_storage(volume, Some(rebuild_addr)) {
            Ok(s) => s,
            Err(e) => return RecoveryRecord::Failed(e.to_string()),
        };
        if let Some(reason) = self.rebuild_not_needed(volume, storage.as_ref()) {
            // A rebuild wipes the local copy first. A rebuilding assignment that arrives late or
            // twice must not wipe a replica that has recovered since: the primary may already
            // count it in sync, and its catch-up can do whatever is left.
            let driver = RecoveryDriver::with_orchestrator(Arc::clone(orch), storage);
            if let Some(sid) = sender.session_id() {
                driver.cancel_session(id, sid, "rebuild_not_needed");
            }
            log::info!("volume {volume}: rebuild of {id} declined: {reason}");
            return RecoveryRecord::RebuildNotNeeded(reason);
        }
        let driver = RecoveryDriver::with_orchestrator(Arc::clone(orch), storage);
        let plan = match driver.plan_rebuild(id) {
            Ok(p) => p,
            Err(e) => return RecoveryRecord::Failed(e.to_string()),
        };
        let route = Route::Pull { rebuild_addr };
        match self.plan_io(&driver, volume, route, sender.epoch(), plan) {
            Ok((mut io, plan)) => {
                let backend = &mut self.backend;
                executed(
                    RebuildExecutor::new(&driver, plan)
                        .with_options(self.options)
                        .with_on_step(|s| backend.on_recovery_step(volume, id, s))
                        .execute(&mut io),
                )
            }
            Err(rec) => rec,
        }
    }

    /// `Some(reason)` when the local copy's log matches the primary's at its head (entry
    /// identity, not just the LSN) and the primary's retained history can bring it to committed
    /// without a base image: zero gap, or a gap within retention with no hole.
    fn rebuild_not_needed(&mut self, volume: &str, storage: &dyn StorageAdapter) -> Option<String> {
        let hs = self.backend.local_handshake(volume)?;
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
        proof.recoverable.then(|| proof.reason.to_string())
    }

    /// The I/O for the plan's session. When the transport cannot provide one, the plan is
    /// cancelled (pins released, session invalidated) rather than left half-alive.
    fn plan_io(
        &mut self,
        driver: &RecoveryDriver,
        volume: &str,
        route: Route<'_>,
        epoch: Epoch,
        plan: RecoveryPlan,
    ) -> Result<(B::Io, RecoveryPlan), RecoveryRecord> {
        let Some(sid) = plan.session_id() else {
            return Err(RecoveryRecord::Failed("plan without a session".into()));
        };
        match self.backend.transfer_io(volume, route, epoch, sid) {
            Ok(io) => Ok((io, plan)),
            Err(e) => {
                driver.cancel_plan(plan, "transport_unavailable");
                Err(RecoveryRecord::Failed(e.to_string()))
            }
        }
    }
}

fn executed(r: Result<ExecutionReport, EngineError>) -> RecoveryRecord {
    match r {
        Ok(r) => RecoveryRecord::Recovered(Box::new(r)),
        Err(e) => RecoveryRecord::Failed(e.to_string()),
    }
}

fn failed(volume: &str, role: Option<BlockRole>, e: &ControlError) -> AssignmentOutcome {
    log::warn!("assignment for {volume:?} refused: {e}");
    AssignmentOutcome {
        volume: volume.to_owned(),
        role,
        error: Some(e.to_string()),
        skipped: Vec::new(),
        recoveries: Vec::new(),
    }
}
