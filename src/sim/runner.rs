//! The simulator proper: the servers' services, the master's deliveries, the operations, the
//! step boundary (deferred work, invariant checks, the stream's top-up) and the two phases.

use engine::ReplicaHandshake;
use engine::testing::SenderProtocol;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use controlbridge::{
    AssignmentOutcome, BlockService, BlockVolumeAssignment, RecoveryFailure, RecoveryRecord,
};
use engine::{
    Epoch, ExecutorOptions, Lsn, PinKind, RegistryStatus, ReplicaState, SessionKind, Tick,
};

use super::backend::SimBackend;
use super::world::{
    Deferred, Kind, Master, Shared, StaleKind, VOLUME, VolPrint, World, replica_id,
};
use super::{Bug, Invariant, Op, SimOptions, SimReport, Stats};

type Service = BlockService<SimBackend>;

/// A simulated cluster: the world plus one `BlockService` per server.
pub struct Sim {
    world: Shared,
    services: BTreeMap<String, Service>,
    /// The error of the last assignment a service refused: (server, error).
    last_refusal: Option<(String, String)>,
}

/// What a server's control-plane state looks like, for before/after comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServerPrint {
    registry: RegistryStatus,
    registry_epoch: Epoch,
    role: controlbridge::BlockRole,
    volume: Option<VolPrint>,
}

fn record_name(rec: &RecoveryRecord) -> &'static str {
    match rec {
        RecoveryRecord::ZeroGap => "zero_gap",
        RecoveryRecord::Recovered(r) => r.path.as_str(),
        RecoveryRecord::NeedsRebuild => "needs_rebuild",
        RecoveryRecord::RebuildNotNeeded(_) => "rebuild_not_needed",
        RecoveryRecord::Failed(_) => "failed",
    }
}

impl Sim {
    /// Builds the cluster for `opts` and delivers the first assignments (every replica in sync
    /// at LSN 0).
    pub fn new(opts: SimOptions) -> Result<Sim, String> {
        let world = Rc::new(RefCell::new(World::new(opts)?));
        let mut sim = Sim {
            world,
            services: BTreeMap::new(),
            last_refusal: None,
        };
        let servers = sim.world.borrow().master.servers.clone();
        for s in &servers {
            sim.restart_service(s);
        }
        sim.deliver_all();
        sim.boundary();
        Ok(sim)
    }

    fn service(&self, s: &str) -> Service {
        let w = self.world.borrow();
        BlockService::new(s, SimBackend::new(s, &self.world)).with_executor_options(
            ExecutorOptions {
                max_entries_per_chunk: w.cfg.chunk_entries,
                max_base_chunk_bytes: w.cfg.base_chunk_bytes,
                start_tick: Tick(0),
            },
        )
    }

    fn restart_service(&mut self, s: &str) {
        let svc = self.service(s);
        self.services.insert(s.to_owned(), svc);
        self.world.borrow_mut().orchs.remove(s);
    }

    /// The world's seed-derived configuration, described.
    pub fn config(&self) -> String {
        self.world.borrow().cfg.describe()
    }

    /// Violations found so far.
    pub fn violations(&self) -> Vec<super::Violation> {
        self.world.borrow().violations.clone()
    }

    /// Counts so far.
    pub fn stats(&self) -> Stats {
        let w = self.world.borrow();
        let mut s = w.stats.clone();
        s.committed = w.oracle.committed();
        s.epoch = w.master.epoch;
        s
    }

    /// The last events.
    pub fn trace(&self) -> Vec<String> {
        self.world.borrow().trace.iter().cloned().collect()
    }

    /// The current primary's server.
    pub fn primary(&self) -> String {
        self.world.borrow().master.primary.clone()
    }

    /// The replica servers, in order.
    pub fn replicas(&self) -> Vec<String> {
        self.world.borrow().master.replicas()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.world.borrow().master.epoch
    }

    /// The committed LSN (the oracle's).
    pub fn committed(&self) -> u64 {
        self.world.borrow().oracle.committed()
    }

    /// The digest of the oracle's committed image.
    pub fn committed_digest(&self) -> blockvol::Digest {
        self.world.borrow().oracle.committed_digest()
    }

    /// The primary registry's state of `server`.
    pub fn state_of(&self, server: &str) -> Option<ReplicaState> {
        self.world.borrow().state_of(server)
    }

    /// `server`'s volume head and digest.
    pub fn volume(&self, server: &str) -> Option<(u64, Option<blockvol::Digest>)> {
        let p = self.world.borrow().proc(server)?;
        let st = p.vol.status();
        Some((
            st.head.0,
            (!st.install_incomplete)
                .then(|| p.vol.digest().ok())
                .flatten(),
        ))
    }

    /// The role `server`'s service last accepted for the volume.
    pub fn role_of(&self, server: &str) -> Option<controlbridge::BlockRole> {
        self.services.get(server).and_then(|s| s.role(VOLUME))
    }

    /// The current data address of `server`.
    pub fn data_addr(&self, server: &str) -> String {
        self.world.borrow().master.data_addr(server)
    }

    /// The primary's rebuild address.
    pub fn rebuild_addr(&self) -> String {
        Master::rebuild_addr(&self.primary())
    }

    /// Every assignment the master sent: (server, role wire value, epoch, address version).
    pub fn assignment_history(&self) -> Vec<(String, u32, u64, u64)> {
        self.world
            .borrow()
            .master
            .history
            .iter()
            .map(|(s, a)| (s.clone(), a.role, a.epoch, a.addr_version))
            .collect()
    }

    /// The last assignment a server refused, and why.
    pub fn last_refusal(&self) -> Option<(String, String)> {
        self.last_refusal.clone()
    }

    /// Where the primary's registry believes `server`'s replica is.
    pub fn endpoint_of(&self, server: &str) -> Option<engine::Endpoint> {
        let w = self.world.borrow();
        let orch = w.orchs.get(&w.master.primary)?;
        orch.registry()
            .sender(&replica_id(server))
            .map(|s| s.endpoint())
    }

    /// Schedules `what` for the next recovery step (before any random event).
    pub fn at_next_recovery_step(&mut self, what: super::Interleave) {
        self.world.borrow_mut().scripted.push_back(what);
    }

    /// What the step hook injected so far.
    pub fn observations(&self) -> Vec<super::Observation> {
        self.world.borrow().observed.clone()
    }

    /// The primary's volume.
    pub fn primary_volume(&self) -> Option<std::sync::Arc<blockvol::Volume>> {
        self.world.borrow().primary_proc().map(|p| p.vol)
    }

    /// The primary's storage adapter (what the engine plans against).
    pub fn primary_storage(&self) -> Option<std::sync::Arc<v2bridge::BlockVolStorage>> {
        self.world.borrow().primary_proc().map(|p| p.storage)
    }

    /// The engine's recovery log of `server`'s registry: (replica, event name, detail).
    pub fn event_log(&self, server: &str) -> Vec<(String, &'static str, String)> {
        self.services
            .get(server)
            .and_then(|s| s.orchestrator(VOLUME))
            .map(|o| {
                o.log()
                    .events()
                    .into_iter()
                    .map(|e| (e.replica_id.as_str().to_owned(), e.name(), e.event.detail()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Recovery outcomes so far, by path.
    pub fn recoveries(&self) -> BTreeMap<&'static str, u64> {
        self.world.borrow().stats.recoveries.clone()
    }

    /// The engine's recovery-log event names on `server`'s registry.
    pub fn events(&self, server: &str) -> Vec<&'static str> {
        self.services
            .get(server)
            .and_then(|s| s.orchestrator(VOLUME))
            .map(|o| o.log().names())
            .unwrap_or_default()
    }

    // ---- the master ---------------------------------------------------------------------------

    fn server_print(&self, s: &str) -> ServerPrint {
        let svc = self.services.get(s);
        let orch = svc.and_then(|x| x.orchestrator(VOLUME));
        ServerPrint {
            registry: orch
                .as_ref()
                .map(|o| o.registry().status())
                .unwrap_or_default(),
            registry_epoch: orch
                .as_ref()
                .map(|o| o.registry().epoch())
                .unwrap_or_default(),
            // A service that never accepted an assignment for the volume and one that holds an
            // empty entry for it (a refused assignment creates one) are the same state.
            role: svc
                .and_then(|x| x.role(VOLUME))
                .unwrap_or(controlbridge::BlockRole::None),
            volume: self.world.borrow().vol_print(s),
        }
    }

    /// Delivers one assignment to one server and records what it did. An assignment older than
    /// one the server accepted must change nothing (invariant (c)).
    fn deliver(&mut self, s: &str, a: BlockVolumeAssignment) -> Option<AssignmentOutcome> {
        if !self.services.contains_key(s) {
            return None;
        }
        let stale = {
            let mut w = self.world.borrow_mut();
            w.master.history.push((s.to_owned(), a.clone()));
            let (e, v) = w.master.accepted.get(s).copied().unwrap_or((0, 0));
            (a.epoch, a.addr_version) < (e, v)
        };
        let before = stale.then(|| self.server_print(s));
        let incarnation = {
            let mut w = self.world.borrow_mut();
            w.running = Some(s.to_owned());
            w.proc(s).map(|p| p.incarnation)
        };
        let svc = self.services.get_mut(s)?;
        let out = svc
            .process_assignments_inline(std::slice::from_ref(&a))
            .pop();
        let orch = svc.orchestrator(VOLUME);
        {
            let mut w = self.world.borrow_mut();
            w.running = None;
            if let Some(out) = &out {
                for (id, rec) in &out.recoveries {
                    *w.stats.recoveries.entry(record_name(rec)).or_default() += 1;
                    if let RecoveryRecord::Failed(e) = rec {
                        let cause = failure_cause(e);
                        w.stats
                            .failure_examples
                            .entry(cause.clone())
                            .or_insert_with(|| e.to_string());
                        *w.stats.failures.entry(cause).or_default() += 1;
                    }
                    w.note(format!("  {id}: {}", describe(rec)));
                }
            }
            if w.proc(s).map(|p| p.incarnation) != incarnation {
                // The server crashed during the call: what its old run accepted died with it.
                w.note(format!("  {s} crashed while processing the assignment"));
                drop(w);
                self.drain();
                return out;
            }
            match orch {
                Some(o) => {
                    for snd in o.registry().status().senders {
                        if let Some(sess) = snd.session {
                            w.sessions.insert((
                                s.to_owned(),
                                snd.replica_id.as_str().to_owned(),
                                sess.id.get(),
                            ));
                        }
                    }
                    w.orchs.insert(s.to_owned(), o);
                }
                None => {
                    w.orchs.remove(s);
                }
            }
            if let Some(out) = &out {
                match &out.error {
                    None => {
                        let acc = w.master.accepted.entry(s.to_owned()).or_default();
                        *acc = (*acc).max((a.epoch, a.addr_version));
                        let k = w.known_epoch.entry(s.to_owned()).or_default();
                        *k = (*k).max(a.epoch);
                    }
                    Some(e) => {
                        w.note(format!("  refused: {e}"));
                        self.last_refusal = Some((s.to_owned(), e.to_string()));
                    }
                }
            }
        }
        if let Some(before) = before {
            let after = self.server_print(s);
            let mut w = self.world.borrow_mut();
            w.stats.stale_checks += 1;
            let refused = out.as_ref().is_some_and(|o| o.error.is_some());
            if before != after {
                w.violate(
                    Invariant::StaleChangesNothing,
                    format!(
                        "stale assignment (epoch {} role {} addr_version {}) to {s} changed its state (refused: {refused}): before {before:?} after {after:?}",
                        a.epoch, a.role, a.addr_version
                    ),
                );
            }
        }
        self.drain();
        out
    }

    /// The master sends `s` an assignment from its current view of the cluster. One that
    /// contradicts that view (a primary assignment to a server that is not the primary, a
    /// replica or rebuilding role to the primary, an epoch other than the current one) is a bug
    /// of the simulated master, not of the crates: it is reported as a harness violation and
    /// not sent.
    fn send(&mut self, s: &str, a: BlockVolumeAssignment, what: &str) {
        {
            let mut w = self.world.borrow_mut();
            let (epoch, primary) = (w.master.epoch, w.master.primary.clone());
            let as_primary = a.role == controlbridge::BlockRole::Primary.to_wire();
            if a.epoch != epoch || as_primary != (s == primary) {
                w.violate(
                    Invariant::Harness,
                    format!(
                        "the master sent {s} a {what} (role {} epoch {}) while its view is primary {primary} at epoch {epoch}",
                        a.role, a.epoch
                    ),
                );
                return;
            }
        }
        self.deliver_logged(s, a, what);
    }

    fn deliver_logged(&mut self, s: &str, a: BlockVolumeAssignment, what: &str) {
        self.world.borrow_mut().note(format!(
            "deliver {what} to {s} (epoch {} version {})",
            a.epoch, a.addr_version
        ));
        self.deliver(s, a);
    }

    /// The master's view of the cluster that one batch of assignments is sent from.
    fn view(&self) -> (u64, String) {
        let w = self.world.borrow();
        (w.master.epoch, w.master.primary.clone())
    }

    /// The master sends every replica its role, then the primary its assignment, all from one
    /// view. Each delivery drains the deferred work, and work queued behind this batch (a
    /// failover after a primary crash, another epoch bump) may change the view and send the
    /// new one itself: the rest of this batch is then superseded and is not sent (it would
    /// give the new primary a replica role and the old one a primary assignment).
    fn deliver_all(&mut self) {
        let view = self.view();
        let mut batch: Vec<(String, bool)> = self
            .world
            .borrow()
            .master
            .replicas()
            .into_iter()
            .map(|r| (r, false))
            .collect();
        batch.push((view.1.clone(), true));
        for (s, primary) in batch {
            let now = self.view();
            if now != view {
                self.world.borrow_mut().note(format!(
                    "assignments of epoch {} (primary {}) superseded by epoch {} (primary {}): {s} and the rest not sent",
                    view.0, view.1, now.0, now.1
                ));
                return;
            }
            if primary {
                let a = self.world.borrow().master.primary_assignment();
                self.send(&s, a, "primary assignment");
            } else {
                let a = self.world.borrow().master.replica_assignment(&s);
                self.send(&s, a, "replica role");
            }
        }
    }

    fn drain(&mut self) {
        for _ in 0..32 {
            let next = self.world.borrow_mut().deferred.pop_front();
            match next {
                None => return,
                Some(Deferred::RestartService(s)) => self.restart_service(&s),
                Some(Deferred::DeliverAll) => self.deliver_all(),
                Some(Deferred::PrimaryCrashed { failover }) => {
                    if failover {
                        self.failover(None, 0, &[], false);
                    } else {
                        self.deliver_all();
                    }
                }
            }
        }
        let mut w = self.world.borrow_mut();
        if !w.deferred.is_empty() {
            w.violate(Invariant::Harness, "deferred work does not drain");
        }
    }

    // ---- operations ---------------------------------------------------------------------------

    fn failover(&mut self, to: Option<String>, zombie_writes: u32, ship: &[String], crash: bool) {
        let old = self.primary();
        {
            let mut w = self.world.borrow_mut();
            // The old primary keeps accepting writes nobody will acknowledge, and may ship some
            // of them to a few replicas before it is cut off.
            if zombie_writes > 0 {
                w.client_writes(zombie_writes);
                w.ship_uncommitted(ship);
            }
            if crash {
                w.crash(&old);
            }
        }
        self.drain();
        let chosen = {
            let mut w = self.world.borrow_mut();
            let replicas = w.master.replicas();
            let holders: Vec<String> = replicas
                .iter()
                .filter(|r| w.holders.contains(*r))
                .cloned()
                .collect();
            let others: Vec<String> = replicas
                .iter()
                .filter(|r| !w.holders.contains(*r))
                .cloned()
                .collect();
            let desperate = w.bug(Bug::DesperatePromotion);
            match to {
                // The master's eligibility rule: only a holder of the committed prefix.
                Some(t) if holders.contains(&t) || desperate => Some(t),
                Some(t) => {
                    w.note(format!(
                        "promotion of {t} refused: it does not hold the committed prefix"
                    ));
                    None
                }
                None if desperate && !others.is_empty() => w.rng.pick(&others).cloned(),
                None => w.rng.pick(&holders).cloned(),
            }
        };
        let Some(new) = chosen else {
            self.world.borrow_mut().note(format!(
                "failover from {old}: no replica holds the committed prefix"
            ));
            return;
        };
        {
            let mut w = self.world.borrow_mut();
            w.master.epoch += 1;
            w.master.primary = new.clone();
            let line = format!(
                "failover {old} -> {new} at epoch {} (committed {})",
                w.master.epoch,
                w.oracle.committed()
            );
            w.note(line);
            if !w.promote(&new) {
                return;
            }
        }
        self.deliver_all();
    }

    /// Applies one operation, then the step boundary.
    pub fn apply(&mut self, op: Op) {
        {
            let mut w = self.world.borrow_mut();
            w.count_op(op.name());
            if op.is_fault() {
                w.fault(op.name());
            }
            w.note(format!("op {op:?}"));
        }
        match op {
            Op::Write { count } => self.world.borrow_mut().client_writes(count),
            Op::Commit => {
                self.world.borrow_mut().commit();
            }
            Op::Flush { server } => self.world.borrow_mut().flush(&server),
            Op::Reassign => {
                let (replicas, accepted, current) = {
                    let w = self.world.borrow();
                    (
                        w.master.replicas(),
                        w.master.accepted.clone(),
                        (w.master.epoch, w.master.addr_version),
                    )
                };
                for r in replicas {
                    if accepted.get(&r) != Some(&current) {
                        let a = self.world.borrow().master.replica_assignment(&r);
                        self.send(&r, a, "replica role");
                    }
                }
                let (p, a) = {
                    let w = self.world.borrow();
                    (w.master.primary.clone(), w.master.primary_assignment())
                };
                self.send(&p, a, "primary assignment");
            }
            Op::Rebuild { server } => {
                let a = self.world.borrow().master.rebuild_assignment(&server);
                self.send(&server, a, "rebuilding role");
            }
            Op::CrashReplica { server } => {
                if server != self.primary() {
                    self.world.borrow_mut().crash(&server);
                }
            }
            Op::CrashPrimary { failover } => {
                let p = self.primary();
                let crashed = self.world.borrow_mut().crash(&p);
                self.drain();
                if crashed {
                    if failover {
                        self.failover(None, 0, &[], false);
                    } else {
                        self.deliver_all();
                    }
                }
            }
            Op::Disconnect { addr } => {
                let w = self.world.borrow();
                w.net.set_down(&addr, true);
            }
            Op::Reconnect { addr } => {
                let w = self.world.borrow();
                w.net.set_down(&addr, false);
            }
            Op::MoveAddress { server } => self.world.borrow_mut().move_address(&server),
            Op::EpochBump => {
                let (replicas, primary, skip) = {
                    let mut w = self.world.borrow_mut();
                    w.master.epoch += 1;
                    let replicas = w.master.replicas();
                    // Some replicas hear of the new epoch late (a slow control plane).
                    let skip: Vec<bool> = replicas.iter().map(|_| w.rng.chance(300)).collect();
                    (replicas, w.master.primary.clone(), skip)
                };
                for (r, skip) in replicas.iter().zip(skip) {
                    if !skip {
                        let a = self.world.borrow().master.replica_assignment(r);
                        self.send(r, a, "replica role");
                    }
                }
                let a = self.world.borrow().master.primary_assignment();
                self.send(&primary, a, "primary assignment");
            }
            Op::Failover {
                to,
                zombie_writes,
                zombie_ship,
                crash_old,
            } => {
                self.failover(to, zombie_writes, &zombie_ship, crash_old);
            }
            Op::FailPin { kind } => self.world.borrow_mut().fail_pin(kind),
            Op::RetentionPressure => self.world.borrow_mut().retention_pressure(),
            Op::LateAssignment { index } => {
                let item = {
                    let w = self.world.borrow();
                    let n = w.master.history.len();
                    (n > 0).then(|| w.master.history[index % n].clone())
                };
                if let Some((s, a)) = item {
                    self.deliver_logged(&s, a, "late assignment");
                }
            }
            Op::StaleMessage { server, kind } => {
                self.world.borrow_mut().stale_message(&server, kind)
            }
            Op::StaleSession => self.world.borrow_mut().stale_session(),
            Op::ShipUncommitted { to } => self.world.borrow_mut().ship_uncommitted(&to),
            Op::StaleWrite => self.world.borrow_mut().stale_write(),
            Op::Heal => self.heal(),
        }
        self.drain();
        self.boundary();
    }

    /// One step of the healed phase: every address reachable, the master reconciles, clients
    /// keep writing.
    fn heal(&mut self) {
        let (replicas, primary, accepted, current, no_rebuild) = {
            let w = self.world.borrow_mut();
            w.net.heal();
            (
                w.master.replicas(),
                w.master.primary.clone(),
                w.master.accepted.clone(),
                (w.master.epoch, w.master.addr_version),
                w.bug(Bug::NoRebuildAssignments),
            )
        };
        for r in &replicas {
            let needs = self.state_of(r) == Some(ReplicaState::NeedsRebuild);
            if needs && !no_rebuild {
                let a = self.world.borrow().master.rebuild_assignment(r);
                self.send(r, a, "rebuilding role");
            } else if accepted.get(r) != Some(&current) {
                let a = self.world.borrow().master.replica_assignment(r);
                self.send(r, a, "replica role");
            }
        }
        let lagging = replicas
            .iter()
            .any(|r| self.state_of(r) != Some(ReplicaState::InSync));
        let no_registry = !self.world.borrow().orchs.contains_key(&primary);
        if lagging || no_registry || accepted.get(&primary) != Some(&current) {
            let a = self.world.borrow().master.primary_assignment();
            self.send(&primary, a, "primary assignment");
        }
        let mut w = self.world.borrow_mut();
        let n = w.rng.range(1, 4) as u32;
        w.client_writes(n);
        w.commit();
        for s in w.master.servers.clone() {
            if let Some(p) = w.proc(&s) {
                let st = p.vol.status();
                if st.wal_used_bytes * 2 > st.wal_size_bytes {
                    let _ = p.vol.force_flush();
                }
            }
        }
    }

    /// The step boundary: deferred work, the deliberate misbehaviours, the invariants before
    /// the stream's top-up, the top-up, and the check after it.
    fn boundary(&mut self) {
        self.drain();
        self.inject_bugs();
        let mut w = self.world.borrow_mut();
        w.stats.steps += 1;
        if w.violations.is_empty() {
            let in_sync: Vec<String> = w
                .replica_states()
                .into_iter()
                .filter(|(_, s)| *s == Some(ReplicaState::InSync))
                .map(|(r, _)| r)
                .collect();
            let mut ok = true;
            for r in in_sync {
                ok &= w.check_in_sync(&r, "at the step boundary");
            }
            ok = ok && w.check_primary("at the step boundary");
            ok = ok && w.check_holders();
            ok = ok && w.check_pins();
            if ok {
                w.top_up();
                w.check_topped_up();
            }
        }
        w.forget_out_of_sync();
        w.step += 1;
    }

    /// Makes the system misbehave on purpose ([`Bug`]), once the situation for it exists.
    fn inject_bugs(&mut self) {
        let mut w = self.world.borrow_mut();
        if !w.bug(Bug::FalseInSync) {
            return;
        }
        let c = w.oracle.committed();
        let primary = w.master.primary.clone();
        let Some(orch) = w.orchs.get(&primary).cloned() else {
            return;
        };
        let Some(p) = w.primary_proc() else { return };
        for (r, state) in w.replica_states() {
            if state == Some(ReplicaState::InSync) || c == 0 {
                continue;
            }
            let Ok(sender) = orch.sender(&replica_id(&r)) else {
                continue;
            };
            if !sender.has_active_session()
                && sender
                    .attach_session(
                        sender.epoch(),
                        SessionKind::CatchUp,
                        engine::SessionOptions::default(),
                    )
                    .is_err()
            {
                continue;
            }
            use engine::StorageAdapter;
            let Ok(history) = p.storage.get_retained_history() else {
                continue;
            };
            // The bug: a zero gap claimed from the primary's own committed LSN, never asked of
            // the replica, with nothing moved.
            let r2 = orch.execute_recovery(
                &replica_id(&r),
                ReplicaHandshake::unverified(Lsn(c)),
                &history,
            );
            w.note(format!(
                "BUG false in-sync for {r}: {:?}",
                r2.map(|x| x.outcome)
            ));
            return;
        }
    }

    // ---- the random schedule --------------------------------------------------------------------

    fn random_op(&mut self) -> Op {
        let mut w = self.world.borrow_mut();
        let weights: Vec<u64> = w.cfg.weights.iter().map(|(_, x)| *x).collect();
        let i = w.rng.weighted(&weights);
        let kind = w.cfg.weights[i].0;
        let replicas = w.master.replicas();
        let pick = |w: &mut World, v: &[String]| w.rng.pick(v).cloned().unwrap_or_default();
        match kind {
            Kind::Write => Op::Write {
                count: w.rng.range(1, 8) as u32,
            },
            Kind::Commit => Op::Commit,
            Kind::Flush => {
                let servers = w.master.servers.clone();
                Op::Flush {
                    server: pick(&mut w, &servers),
                }
            }
            Kind::Reassign => Op::Reassign,
            Kind::Rebuild => {
                let needing: Vec<String> = replicas
                    .iter()
                    .filter(|r| w.state_of(r) == Some(ReplicaState::NeedsRebuild))
                    .cloned()
                    .collect();
                let from = if needing.is_empty() || w.rng.chance(200) {
                    replicas.clone()
                } else {
                    needing
                };
                Op::Rebuild {
                    server: pick(&mut w, &from),
                }
            }
            Kind::CrashReplica => Op::CrashReplica {
                server: pick(&mut w, &replicas),
            },
            Kind::CrashPrimary => Op::CrashPrimary {
                failover: w.rng.chance(500),
            },
            Kind::Disconnect => {
                let mut addrs: Vec<String> =
                    replicas.iter().map(|r| w.master.data_addr(r)).collect();
                addrs.push(Master::rebuild_addr(&w.master.primary));
                Op::Disconnect {
                    addr: pick(&mut w, &addrs),
                }
            }
            Kind::Reconnect => {
                let down = w.net.down_addrs();
                if down.is_empty() {
                    Op::Commit
                } else {
                    Op::Reconnect {
                        addr: pick(&mut w, &down),
                    }
                }
            }
            Kind::MoveAddress => Op::MoveAddress {
                server: pick(&mut w, &replicas),
            },
            Kind::EpochBump => Op::EpochBump,
            Kind::Failover => {
                let ship: Vec<String> = replicas
                    .iter()
                    .filter(|_| w.rng.chance(400))
                    .cloned()
                    .collect();
                Op::Failover {
                    to: None,
                    zombie_writes: w.rng.below(5) as u32,
                    zombie_ship: ship,
                    crash_old: w.rng.chance(400),
                }
            }
            Kind::FailPin => Op::FailPin {
                kind: *w
                    .rng
                    .pick(&[PinKind::WalRetention, PinKind::Snapshot, PinKind::FullBase])
                    .unwrap_or(&PinKind::WalRetention),
            },
            Kind::RetentionPressure => Op::RetentionPressure,
            Kind::LateAssignment => Op::LateAssignment {
                index: w.rng.below(1 << 20) as usize,
            },
            Kind::StaleMessage => Op::StaleMessage {
                server: pick(&mut w, &replicas),
                kind: *w
                    .rng
                    .pick(&[
                        StaleKind::Apply,
                        StaleKind::Truncate,
                        StaleKind::BeginBase,
                        StaleKind::Barrier,
                    ])
                    .unwrap_or(&StaleKind::Apply),
            },
            Kind::StaleSession => Op::StaleSession,
            Kind::PartialReplication => {
                let to: Vec<String> = replicas
                    .iter()
                    .filter(|_| w.rng.chance(500))
                    .cloned()
                    .collect();
                Op::ShipUncommitted { to }
            }
            Kind::StaleWrite => Op::StaleWrite,
        }
    }

    /// One step of the faulty phase, drawn from the seed.
    pub fn random_step(&mut self) {
        let op = self.random_op();
        self.apply(op);
    }

    /// Runs the healed phase: (e) every replica in sync within the bound, and staying there;
    /// then everything committed and every volume equal to the oracle's committed image.
    pub fn run_healed_phase(&mut self) {
        let (steps, bound) = {
            let mut w = self.world.borrow_mut();
            w.healing = true;
            // No fault may outlive the faulty phase: drop the pin failures still queued.
            w.net.fresh_storages();
            w.note("healed phase: no more faults");
            (w.opts.heal_steps, w.opts.liveness_bound)
        };
        let mut converged_at = None;
        for i in 1..=steps {
            if !self.world.borrow().violations.is_empty() {
                return;
            }
            self.apply(Op::Heal);
            let states = self.world.borrow().replica_states();
            let all = states.iter().all(|(_, s)| *s == Some(ReplicaState::InSync));
            let w = &mut *self.world.borrow_mut();
            match (all, converged_at) {
                (true, None) => {
                    converged_at = Some(i);
                    w.note(format!("all replicas in sync after {i} healed steps"));
                }
                (false, Some(at)) => {
                    w.violate(
                        Invariant::Liveness,
                        format!(
                            "replicas left in sync at healed step {i} (converged at {at}) without any fault: {states:?}"
                        ),
                    );
                    return;
                }
                (false, None) if i >= bound => {
                    w.violate(
                        Invariant::Liveness,
                        format!("not every replica in sync after {i} healed steps: {states:?}"),
                    );
                    return;
                }
                _ => {}
            }
        }
        self.final_check();
    }

    /// Everything committed; every volume equal to the oracle's committed image.
    fn final_check(&mut self) {
        let mut w = self.world.borrow_mut();
        if !w.violations.is_empty() {
            return;
        }
        w.commit();
        let c = w.oracle.committed();
        let want = w.oracle.committed_digest();
        if w.oracle.head() != c {
            let h = w.oracle.head();
            w.violate(
                Invariant::Liveness,
                format!("the final sync left {h} accepted but only {c} committed"),
            );
            return;
        }
        for s in w.master.servers.clone() {
            let got = w.proc(&s).map(|p| (p.vol.status().head.0, p.vol.digest()));
            match got {
                Some((h, Ok(d))) if h == c && d == want => {}
                other => {
                    w.violate(
                        Invariant::InSyncHoldsCommitted,
                        format!(
                            "at the end {s} has {other:?}, the oracle's committed image is {c} / {want}"
                        ),
                    );
                    return;
                }
            }
        }
        w.note(format!("final: every volume at {c} with digest {want}"));
    }

    fn report(&self) -> SimReport {
        let w = self.world.borrow();
        SimReport {
            seed: w.opts.seed,
            steps: w.opts.steps,
            config: w.cfg.describe(),
            stats: self.stats(),
            violations: w.violations.clone(),
            trace: w.trace.iter().cloned().collect(),
        }
    }
}

/// The cause of a failed recovery without the parts that vary (replica, step, LSNs):
/// `io_stream_failed: transport`, `wal_pin_failed`, `handshake with ...: unreachable`. A
/// transfer failure is named by the executor's release reason alone.
fn failure_cause(failure: &RecoveryFailure) -> String {
    let text = match failure {
        RecoveryFailure::Transfer(e) => e.to_string(),
        other => other.to_string(),
    };
    let msg = text
        .split_once(" failed: ")
        .filter(|(head, _)| head.starts_with("execution for"))
        .map_or(text.as_str(), |(_, rest)| rest);
    let parts: Vec<&str> = msg.split(": ").take(2).collect();
    parts
        .iter()
        .map(|p| {
            let p = p.split(" (").next().unwrap_or(p);
            let words: Vec<&str> = p
                .split(['_', ' '])
                .filter(|w| !w.is_empty() && !w.chars().any(|c| c.is_ascii_digit()))
                .take(6)
                .collect();
            words.join("_")
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn describe(rec: &RecoveryRecord) -> String {
    match rec {
        RecoveryRecord::ZeroGap => "zero_gap".into(),
        RecoveryRecord::Recovered(r) => format!(
            "{} to {} ({} entries, {} base bytes)",
            r.path, r.target, r.entries_applied, r.base_bytes_sent
        ),
        RecoveryRecord::NeedsRebuild => "needs_rebuild".into(),
        RecoveryRecord::RebuildNotNeeded(r) => format!("rebuild not needed: {r}"),
        RecoveryRecord::Failed(e) => format!("failed: {e}"),
    }
}

/// Runs one seed: the faulty phase, then the healed phase. A panic anywhere is reported as a
/// harness violation with the seed.
pub fn run(opts: &SimOptions) -> SimReport {
    if opts.print {
        println!("seed={}", opts.seed);
    }
    let o = opts.clone();
    let result = catch_unwind(AssertUnwindSafe(move || -> Result<SimReport, String> {
        let mut sim = Sim::new(o.clone())?;
        for _ in 0..o.steps {
            if !sim.world.borrow().violations.is_empty() {
                break;
            }
            sim.random_step();
        }
        if sim.world.borrow().violations.is_empty() {
            sim.run_healed_phase();
        }
        Ok(sim.report())
    }));
    let report = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => failed_report(opts, format!("setup failed: {e}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".into());
            failed_report(opts, format!("panic: {msg}"))
        }
    };
    if opts.print && !report.passed() {
        for v in &report.violations {
            println!("seed={} VIOLATION {v}", report.seed);
        }
        println!("rerun: {}", report.rerun_command());
    }
    report
}

fn failed_report(opts: &SimOptions, detail: String) -> SimReport {
    SimReport {
        seed: opts.seed,
        steps: opts.steps,
        config: String::new(),
        stats: Stats::default(),
        violations: vec![super::Violation {
            step: 0,
            invariant: Invariant::Harness,
            detail,
        }],
        trace: Vec::new(),
    }
}
