//! The simulated [`VolumeBackend`]: one server's volume in the simulated world, reached through
//! the simulated network. Mirrors `crate::cluster::DataDirBackend` (roles fence the volume and
//! decide what the server listens on; pushes go to a replica's data address, pulls come from a
//! primary's rebuild address), with every connection bound to a process incarnation, and the
//! executors' step hook handed to the world.

use std::rc::Rc;
use std::sync::Arc;

use crate::cluster::{blockvol_role, target_error, volume_error};
use controlbridge::{BackendError, BlockRole, Route, VolumeBackend};
use engine::{Endpoint, Epoch, ReplicaHandshake, ReplicaId, SessionId, StepInfo, StorageAdapter};
use v2bridge::convert::{handshake, to_engine};
use v2bridge::{BridgeIo, Lineage, ReplicaTarget};

use super::Bug;
use super::net::{Dest, SimIo, SimTarget, Source};
use super::world::Shared;

/// One server's backend, bound to one run (process incarnation) of the server: once that
/// process has crashed, its service is a ghost and every backend call fails.
pub(crate) struct SimBackend {
    server: String,
    world: Shared,
    incarnation: u64,
}

impl SimBackend {
    pub(crate) fn new(server: &str, world: &Shared) -> SimBackend {
        let incarnation = world.borrow().proc(server).map_or(0, |p| p.incarnation);
        SimBackend {
            server: server.to_owned(),
            world: Rc::clone(world),
            incarnation,
        }
    }

    fn alive(&self) -> Result<(), BackendError> {
        let now = self
            .world
            .borrow()
            .proc(&self.server)
            .map(|p| p.incarnation);
        if now == Some(self.incarnation) {
            Ok(())
        } else {
            Err(BackendError::unavailable(format!(
                "{} run {} has crashed (now {now:?})",
                self.server, self.incarnation
            )))
        }
    }
}

/// Nothing answers: an address that resolves to no live process, a process that is gone.
fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::unavailable(e.to_string())
}

impl VolumeBackend for SimBackend {
    type Io = SimIo;

    fn apply_role(
        &mut self,
        _volume: &str,
        role: BlockRole,
        epoch: Epoch,
        _lease_ttl_ms: u64,
    ) -> Result<(), BackendError> {
        self.alive()?;
        let w = self.world.borrow();
        let p = w
            .proc(&self.server)
            .ok_or_else(|| unavailable(format!("{} has no process", self.server)))?;
        p.vol
            .assign(
                blockvol_role(role),
                v2bridge::convert::epoch_to_blockvol(epoch),
            )
            .map_err(|e| volume_error(format!("assign {}", self.server), &e))?;
        let (data, rebuild) = match role {
            BlockRole::Primary => (false, true),
            BlockRole::Replica | BlockRole::Rebuilding => (true, false),
            BlockRole::None | BlockRole::Stale | BlockRole::Draining => (false, false),
        };
        w.net.set_listening(&self.server, data, rebuild);
        Ok(())
    }

    fn primary_storage(
        &mut self,
        _volume: &str,
        rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        self.alive()?;
        let w = self.world.borrow();
        match rebuild_addr {
            None => {
                let p = w
                    .proc(&self.server)
                    .ok_or_else(|| unavailable(format!("{} has no process", self.server)))?;
                if !p.serves_rebuild {
                    return Err(BackendError::refused(format!(
                        "{} is not a primary",
                        self.server
                    )));
                }
                Ok(p.storage as Arc<dyn StorageAdapter>)
            }
            Some(addr) => {
                let (_, storage, _) = w.net.resolve_rebuild(addr).map_err(unavailable)?;
                Ok(storage as Arc<dyn StorageAdapter>)
            }
        }
    }

    fn replica_handshake(
        &mut self,
        _volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        self.alive()?;
        let mut w = self.world.borrow_mut();
        let mut target = SimTarget::connect(&w.net, Dest::Addr(endpoint.data_addr.clone()))
            .map_err(unavailable)?;
        let reply = target
            .handshake()
            .map_err(|e| target_error(format!("handshake with {}", endpoint.data_addr), &e))?;
        // The committed LSN the plan will read right after this handshake: the recovery target
        // an in-sync claim from this handshake stands on (invariant (a)).
        if let Some(p) = w.proc(&self.server) {
            let c = p.vol.status().committed.0;
            let r = target.server().to_owned();
            w.basis.insert(r, c);
        }
        Ok(
            if !reply.install_incomplete && w.bug(Bug::UnverifiedHandshake) {
                ReplicaHandshake::unverified(to_engine(reply.head))
            } else {
                handshake(&reply)
            },
        )
    }

    fn transfer_io(
        &mut self,
        _volume: &str,
        route: Route<'_>,
        epoch: Epoch,
        session: SessionId,
    ) -> Result<Self::Io, BackendError> {
        self.alive()?;
        let mut w = self.world.borrow_mut();
        // The driver is this run of the server (its process incarnation), as in
        // `DataDirBackend::lineage`: session IDs restart with a restarted registry.
        let incarnation = w.proc(&self.server).map_or(0, |p| p.incarnation);
        let driver = format!("{}#{incarnation}", self.server);
        let lineage = Lineage::new(
            &driver,
            v2bridge::convert::epoch_to_blockvol(epoch),
            session.get(),
        );
        let (storage, target, source) = match route {
            Route::Push { endpoint } => {
                let p = w
                    .proc(&self.server)
                    .ok_or_else(|| unavailable(format!("{} has no process", self.server)))?;
                if !p.serves_rebuild {
                    return Err(BackendError::refused(format!(
                        "{} is not a primary",
                        self.server
                    )));
                }
                let target = SimTarget::connect(&w.net, Dest::Addr(endpoint.data_addr.clone()))
                    .map_err(unavailable)?;
                let source = Source {
                    net: Arc::clone(&w.net),
                    addr: None,
                    server: self.server.clone(),
                    incarnation: p.incarnation,
                };
                (p.storage, target, Some(source))
            }
            Route::Pull { rebuild_addr } => {
                let (srv, storage, inc) =
                    w.net.resolve_rebuild(rebuild_addr).map_err(unavailable)?;
                let target = SimTarget::connect(&w.net, Dest::Local(self.server.clone()))
                    .map_err(unavailable)?;
                let source = Source {
                    net: Arc::clone(&w.net),
                    addr: Some(rebuild_addr.to_owned()),
                    server: srv,
                    incarnation: inc,
                };
                (storage, target, Some(source))
            }
        };
        let target = if w.bug(Bug::CorruptBaseBlock) {
            target.corrupting_base()
        } else {
            target
        };
        let to = target.server().to_owned();
        w.lineages.push((to.clone(), lineage));
        w.sessions.insert((
            self.server.clone(),
            format!("{}/{to}", super::VOLUME),
            session.get(),
        ));
        if w.bug(Bug::LeakPin) {
            let c = storage.volume().status().committed;
            if let Ok(pin) = storage.pin_wal_retention(to_engine(c)) {
                w.leaked.push(pin);
            }
        }
        let committed = to_engine(storage.volume().status().committed);
        let world = Rc::clone(&self.world);
        let on_base_begin = Box::new(move |server: &str| {
            // The target's copy is about to be wiped: it no longer holds the committed prefix.
            let mut w = world.borrow_mut();
            if w.holders.remove(server) {
                w.note(format!(
                    "{server} starts a base install: no longer a holder"
                ));
            }
        });
        Ok(SimIo::new(
            BridgeIo::new(storage, target, lineage, committed),
            source,
            on_base_begin,
        ))
    }

    fn local_handshake(&mut self, _volume: &str) -> Option<ReplicaHandshake> {
        self.alive().ok()?;
        let p = self.world.borrow().proc(&self.server)?;
        let reply = p.replica.clone().handshake().ok()?;
        Some(handshake(&reply))
    }

    fn on_recovery_step(&mut self, _volume: &str, replica: &ReplicaId, step: &StepInfo) {
        if self.alive().is_err() {
            return;
        }
        self.world
            .borrow_mut()
            .interleave(&self.server, replica, step);
    }
}
