//! The development master's decisions, without sockets or clocks: time arrives as an
//! `Instant`, answers go out as assignments queued per server. The gRPC layer (`master::grpc`)
//! feeds it heartbeats and the results of the RPCs it makes (allocation, promotion evidence).
//!
//! What it guarantees:
//! - **One primary per epoch.** A volume's epoch rises by one at each promotion; every
//!   assignment carries it, and volume servers refuse older ones.
//! - **No promotion under a live lease.** The primary's lease is renewed in each heartbeat
//!   response; a server missing heartbeats for `dead_after` is declared dead, and its
//!   volumes fail over only once the last lease granted to it plus `lease_margin` has passed
//!   (the margin covers the delay between the master granting a lease and the server
//!   receiving it, from which the server counts).
//! - **The promoted copy holds every committed write.** Candidates are the live replicas that
//!   report themselves eligible at the volume's epoch. They rank as raft's voters do: by the
//!   epoch of their last durable entry, then by their durable head (then committed point).
//!   Under `sync_all` every acknowledged flush is on every replica; under `sync_quorum` on a
//!   majority, so the best-ranked among any majority-sized set of answers holds it; under
//!   `best_effort` nothing more can be promised. Ranking by head alone would lose writes: a
//!   deposed primary that never rejoined keeps a long tail of its older epoch, and could win
//!   over a shorter log holding the newer epoch's acknowledged writes (D53).
//! - **The old primary comes back as a replica** of the new epoch (the new primary's
//!   replicator then truncates what it never committed and catches it up, or rebuilds it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use controlbridge::{BlockRole, BlockVolumeAssignment, ReplicaAddr};
use serde::{Deserialize, Serialize};

/// Timing of the master's decisions.
#[derive(Copy, Clone, Debug)]
pub struct Timing {
    /// Lease granted to a primary at each heartbeat.
    pub lease_ttl: Duration,
    /// A server silent this long is dead.
    pub dead_after: Duration,
    /// Added to a lease before its server's volumes may fail over.
    pub lease_margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_ttl: Duration::from_secs(4),
            dead_after: Duration::from_secs(3),
            lease_margin: Duration::from_secs(1),
        }
    }
}

/// How a volume server is reached (from its heartbeats and its allocation answers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAddrs {
    /// Its gRPC address (`VolumeServer` RPCs).
    pub grpc: String,
    /// Its replication address (replicas' data address).
    pub data: String,
    /// Its NBD address.
    pub nbd: String,
    /// Its HTTP status address.
    pub http: String,
}

/// A volume server the master has heard from.
#[derive(Clone, Debug)]
pub struct ServerRecord {
    /// Addresses.
    pub addrs: ServerAddrs,
    /// The last heartbeat.
    pub last_seen: Instant,
    /// Declared dead (no heartbeat for `dead_after`) and not back since.
    pub dead: bool,
    /// Per volume: the epoch and role it last reported.
    pub reported: BTreeMap<String, (u64, u32)>,
}

/// A volume's placement, persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name.
    pub name: String,
    /// Bytes.
    pub size_bytes: u64,
    /// WAL bytes.
    pub wal_size_bytes: u64,
    /// Durability mode (protocol name).
    pub durability_mode: String,
    /// Epoch of the current primary.
    pub epoch: u64,
    /// The primary's server ID.
    pub primary: String,
    /// The replicas' server IDs.
    pub replicas: Vec<String>,
}

/// The master's persisted state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// Volumes by name.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Server addresses by ID (so a restarted master can place and look up before the first
    /// heartbeats).
    pub servers: BTreeMap<String, ServerAddrs>,
}

/// What the gRPC layer must do after a tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask these servers for promotion evidence of `volume` at `epoch`, then call
    /// [`MasterState::promote`] with the answers.
    CollectEvidence {
        /// The volume.
        volume: String,
        /// Its current epoch.
        epoch: u64,
        /// Live replicas to ask.
        candidates: Vec<String>,
    },
}

/// One candidate's answer to a promotion-evidence query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Server ID.
    pub server: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its durable head.
    pub head: u64,
    /// The epoch of the entry at `head` (0: not reported, as by an upstream volume server).
    pub last_entry_epoch: u64,
    /// Its committed point.
    pub committed: u64,
    /// Whether it says it may be promoted.
    pub eligible: bool,
}

/// Errors a client sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MasterError {
    /// No such volume.
    #[error("no volume {0:?}")]
    UnknownVolume(String),
    /// It exists already (with other parameters).
    #[error("volume {0:?} exists")]
    Exists(String),
    /// Not enough live servers for the replication factor.
    #[error("{want} servers needed, {have} alive")]
    NotEnoughServers {
        /// Needed.
        want: usize,
        /// Alive.
        have: usize,
    },
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
}

/// The master's state.
#[derive(Debug)]
pub struct MasterState {
    timing: Timing,
    /// Persisted part.
    pub persisted: Persisted,
    servers: BTreeMap<String, ServerRecord>,
    /// Assignments waiting for each server's next heartbeat.
    pending: BTreeMap<String, Vec<BlockVolumeAssignment>>,
    /// Per volume: when its primary's last lease, as granted, ends.
    lease_ends: BTreeMap<String, Instant>,
    /// Volumes whose evidence is being collected (no second collection meanwhile).
    failing_over: BTreeMap<String, Instant>,
}

impl MasterState {
    /// A master with `persisted` state (empty for a new one), started at `now`. Volumes whose
    /// primary may hold a lease from before a restart are treated as leased until a full lease
    /// (and margin) from now.
    pub fn new(timing: Timing, persisted: Persisted, now: Instant) -> MasterState {
        let lease_ends = persisted
            .volumes
            .keys()
            .map(|v| (v.clone(), now + timing.lease_ttl + timing.lease_margin))
            .collect();
        MasterState {
            timing,
            persisted,
            servers: BTreeMap::new(),
            pending: BTreeMap::new(),
            lease_ends,
            failing_over: BTreeMap::new(),
        }
    }

    /// Timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Server IDs alive now.
    pub fn alive(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|(_, s)| !s.dead)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A server's addresses (known from a heartbeat, an allocation or the persisted state).
    pub fn addrs(&self, id: &str) -> Option<ServerAddrs> {
        self.servers
            .get(id)
            .map(|s| s.addrs.clone())
            .or_else(|| self.persisted.servers.get(id).cloned())
    }

    /// Records a heartbeat from `id`; `inventory` is a full report of (volume, epoch, role)
    /// when the heartbeat carried one. Returns the assignments to send back: queued ones, lease
    /// renewals for the volumes it is primary of, and corrections for copies it reports at an
    /// older epoch than the volume's.
    pub fn heartbeat(
        &mut self,
        id: &str,
        addrs: ServerAddrs,
        inventory: Option<Vec<(String, u64, u32)>>,
        now: Instant,
    ) -> Vec<BlockVolumeAssignment> {
        // A server first heard from since this master started starts from the addresses the
        // persisted state knows: the heartbeat does not carry the NBD address (only
        // AllocateBlockVolume's reply does), so a restarted master would otherwise look its
        // volumes up with no export address.
        let persisted_addrs = self.persisted.servers.get(id).cloned().unwrap_or_default();
        let rec = self
            .servers
            .entry(id.to_owned())
            .or_insert_with(|| ServerRecord {
                addrs: persisted_addrs,
                last_seen: now,
                dead: false,
                reported: BTreeMap::new(),
            });
        if rec.dead {
            log::info!("server {id} is back");
        }
        rec.dead = false;
        rec.last_seen = now;
        let known_data = self
            .persisted
            .servers
            .get(id)
            .map(|a| a.data.clone())
            .unwrap_or_default();
        let moved = !addrs.data.is_empty() && !known_data.is_empty() && addrs.data != known_data;
        merge_addrs(&mut rec.addrs, &addrs);
        let known = self.persisted.servers.entry(id.to_owned()).or_default();
        merge_addrs(known, &rec.addrs);
        if let Some(inv) = inventory {
            rec.reported = inv.into_iter().map(|(n, e, r)| (n, (e, r))).collect();
        }
        let reported = rec.reported.clone();
        if moved {
            // The server came back on another replication address: every primary it is a
            // replica of gets its assignment again, with the new address.
            log::info!("server {id}: replication address now {}", addrs.data);
            let recs: Vec<VolumeRecord> = self
                .persisted
                .volumes
                .values()
                .filter(|v| v.replicas.iter().any(|r| r == id))
                .cloned()
                .collect();
            for v in recs {
                let a = self.primary_assignment(&v);
                let q = self.pending.entry(v.primary.clone()).or_default();
                q.retain(|x| x.path != v.name);
                q.push(a);
            }
        }
        // A primary back fenced at the volume's epoch restarted: it may have lost entries it
        // had not synced, and the LSNs it writes next would then name other entries than a
        // replica that received the lost ones holds at the same epoch (two entries, one LSN
        // and epoch: promotion evidence and the divergence point both assume that cannot
        // be). It gets the next epoch, and its replicas with it (found by the network
        // simulator, D52).
        let restarted: Vec<VolumeRecord> = self
            .persisted
            .volumes
            .iter()
            .filter(|(name, v)| {
                v.primary == id
                    && !self.failing_over.contains_key(*name)
                    && reported
                        .get(*name)
                        .is_some_and(|(e, r)| *e == v.epoch && *r != BlockRole::Primary.to_wire())
            })
            .map(|(_, v)| VolumeRecord {
                epoch: v.epoch + 1,
                ..v.clone()
            })
            .collect();
        for rec in restarted {
            log::warn!(
                "volume {}: primary {id} restarted; epoch {} -> {}",
                rec.name,
                rec.epoch - 1,
                rec.epoch
            );
            self.queue_epoch(&rec);
            self.persisted.volumes.insert(rec.name.clone(), rec);
        }
        let mut out = self.pending.remove(id).unwrap_or_default();
        for (name, v) in &self.persisted.volumes {
            let in_set = v.primary == id || v.replicas.iter().any(|r| r == id);
            if !in_set {
                continue;
            }
            let queued = out.iter().any(|a| a.path == *name);
            if v.primary == id && !self.failing_over.contains_key(name) {
                let serving = reported
                    .get(name)
                    .is_none_or(|(e, r)| *e == v.epoch && *r == BlockRole::Primary.to_wire());
                if !queued && !serving {
                    // The primary reports the volume at another epoch or role (restarted, it
                    // comes back fenced): the full assignment, with its replica set, not a
                    // renewal that names no replicas.
                    out.push(self.primary_assignment(v));
                } else if !queued {
                    // Renewal: path, epoch, role and lease only.
                    out.push(BlockVolumeAssignment {
                        path: name.clone(),
                        epoch: v.epoch,
                        role: BlockRole::Primary.to_wire(),
                        lease_ttl_ms: self.timing.lease_ttl.as_millis() as u64,
                        ..BlockVolumeAssignment::default()
                    });
                }
                self.lease_ends
                    .insert(name.clone(), now + self.timing.lease_ttl);
            } else if !queued
                && v.primary != id
                && reported
                    .get(name)
                    .is_some_and(|(e, r)| *e < v.epoch || *r == BlockRole::Primary.to_wire())
            {
                // A copy behind the volume's epoch (an old primary back after a failover, or
                // a replica that missed its assignment): it becomes a replica of this epoch.
                out.push(replica_assignment(name, v.epoch));
            }
        }
        // The primary's assignment after its replicas': a replica must accept the new epoch
        // before the primary's replicator reaches it (it would also accept it from the
        // primary's lineage, so this is about clean logs, not safety).
        out.sort_by_key(|a| a.role == BlockRole::Primary.to_wire());
        out
    }

    /// Declares silent servers dead and starts failovers whose leases have ended.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        for (id, s) in &mut self.servers {
            if !s.dead && now.duration_since(s.last_seen) > self.timing.dead_after {
                log::warn!(
                    "server {id}: no heartbeat for {:?}, declared dead",
                    self.timing.dead_after
                );
                s.dead = true;
            }
        }
        let mut actions = Vec::new();
        for (name, v) in &self.persisted.volumes {
            let primary_dead = self.servers.get(&v.primary).is_none_or(|s| s.dead);
            if !primary_dead || self.failing_over.contains_key(name) {
                continue;
            }
            let lease_end = self.lease_ends.get(name).copied().unwrap_or(now);
            if now < lease_end + self.timing.lease_margin {
                continue; // the old primary may still be acknowledging writes
            }
            let candidates: Vec<String> = v
                .replicas
                .iter()
                .filter(|r| self.servers.get(*r).is_some_and(|s| !s.dead))
                .cloned()
                .collect();
            if candidates.is_empty() {
                continue; // nothing to promote; wait for a server to come back
            }
            actions.push(Action::CollectEvidence {
                volume: name.clone(),
                epoch: v.epoch,
                candidates,
            });
        }
        for a in &actions {
            let Action::CollectEvidence { volume, .. } = a;
            self.failing_over.insert(volume.clone(), now);
        }
        actions
    }

    /// Promotes the best eligible candidate of `volume` (the answers to a
    /// `CollectEvidence`); returns its ID, or `None` when no candidate may be promoted (the
    /// failover is retried at a later tick).
    pub fn promote(&mut self, volume: &str, answers: &[Candidate]) -> Option<String> {
        self.failing_over.remove(volume);
        let v = self.persisted.volumes.get(volume)?.clone();
        let eligible: Vec<&Candidate> = answers
            .iter()
            .filter(|c| c.eligible && c.epoch == v.epoch && v.replicas.contains(&c.server))
            .collect();
        let needed = answers_needed(&v.durability_mode, v.replicas.len());
        if eligible.len() < needed {
            log::warn!(
                "volume {volume}: {} eligible answer(s), {needed} needed under {} to be sure \
                 one holds every acknowledged write; retrying later",
                eligible.len(),
                v.durability_mode
            );
            return None;
        }
        let best = eligible
            .into_iter()
            .max_by_key(|c| (c.last_entry_epoch, c.head, c.committed))?
            .server
            .clone();
        let epoch = v.epoch + 1;
        let mut replicas: Vec<String> =
            v.replicas.iter().filter(|r| **r != best).cloned().collect();
        replicas.push(v.primary.clone());
        log::warn!(
            "volume {volume}: promoting {best} at epoch {epoch} (old primary {} becomes a replica)",
            v.primary
        );
        let rec = VolumeRecord {
            epoch,
            primary: best.clone(),
            replicas,
            ..v
        };
        self.queue_epoch(&rec);
        self.persisted.volumes.insert(volume.to_owned(), rec);
        Some(best)
    }

    /// Where a new volume of `rf` copies goes: `rf` distinct live servers, fewest volumes
    /// first (the first is the primary).
    pub fn place(&self, name: &str, rf: usize) -> Result<Vec<String>, MasterError> {
        controlbridge::validate_name(name)
            .map_err(|e| MasterError::Invalid(format!("volume name {name:?}: {e}")))?;
        if self.persisted.volumes.contains_key(name) {
            return Err(MasterError::Exists(name.to_owned()));
        }
        let rf = rf.max(1);
        let mut alive: Vec<(usize, String)> = self
            .alive()
            .into_iter()
            .map(|id| {
                let load = self
                    .persisted
                    .volumes
                    .values()
                    .filter(|v| v.primary == id || v.replicas.contains(&id))
                    .count();
                (load, id)
            })
            .collect();
        if alive.len() < rf {
            return Err(MasterError::NotEnoughServers {
                want: rf,
                have: alive.len(),
            });
        }
        alive.sort();
        Ok(alive.into_iter().take(rf).map(|(_, id)| id).collect())
    }

    /// Records a volume whose copies were allocated on `servers` (the first is the primary)
    /// and queues its first assignments at epoch 1.
    pub fn created(&mut self, rec: VolumeRecord) {
        self.queue_epoch(&rec);
        self.persisted.volumes.insert(rec.name.clone(), rec);
    }

    /// Forgets a volume.
    pub fn deleted(&mut self, name: &str) -> Option<VolumeRecord> {
        self.lease_ends.remove(name);
        self.failing_over.remove(name);
        for q in self.pending.values_mut() {
            q.retain(|a| a.path != name);
        }
        self.persisted.volumes.remove(name)
    }

    /// A volume's record.
    pub fn volume(&self, name: &str) -> Result<&VolumeRecord, MasterError> {
        self.persisted
            .volumes
            .get(name)
            .ok_or_else(|| MasterError::UnknownVolume(name.to_owned()))
    }

    /// Queues the assignments of `rec`'s epoch: the primary with its replica set and lease,
    /// each replica as a replica.
    fn primary_assignment(&self, rec: &VolumeRecord) -> BlockVolumeAssignment {
        let replica_addrs = rec
            .replicas
            .iter()
            .map(|r| ReplicaAddr {
                data_addr: self.addrs(r).map(|a| a.data).unwrap_or_default(),
                ctrl_addr: self.addrs(r).map(|a| a.data).unwrap_or_default(),
                server_id: r.clone(),
            })
            .collect();
        BlockVolumeAssignment {
            path: rec.name.clone(),
            epoch: rec.epoch,
            role: BlockRole::Primary.to_wire(),
            lease_ttl_ms: self.timing.lease_ttl.as_millis() as u64,
            replica_addrs,
            ..BlockVolumeAssignment::default()
        }
    }

    fn queue_epoch(&mut self, rec: &VolumeRecord) {
        let primary = self.primary_assignment(rec);
        for r in &rec.replicas {
            let q = self.pending.entry(r.clone()).or_default();
            q.retain(|a| a.path != rec.name);
            q.push(replica_assignment(&rec.name, rec.epoch));
        }
        let q = self.pending.entry(rec.primary.clone()).or_default();
        q.retain(|a| a.path != rec.name);
        q.push(primary);
    }
}

/// Eligible answers a promotion needs so that one of them holds every acknowledged write:
/// under `sync_all` every replica holds them (one answer); under `sync_quorum` at least
/// `quorum - 1` of the `replicas` do, so any `replicas - (quorum - 1) + 1` answers include one;
/// under `best_effort` nothing is promised (one answer).
pub fn answers_needed(mode: &str, replicas: usize) -> usize {
    match mode {
        "sync_quorum" => {
            let rf = replicas + 1;
            let quorum = rf / 2 + 1;
            (replicas + 1)
                .saturating_sub(quorum - 1)
                .clamp(1, replicas.max(1))
        }
        _ => 1,
    }
}

/// Learns addresses a server reported outside its heartbeats (an allocation's answer).
impl MasterState {
    /// Merges `addrs` into what is known of server `id`.
    pub fn learn_addrs(&mut self, id: &str, addrs: &ServerAddrs) {
        if let Some(s) = self.servers.get_mut(id) {
            merge_addrs(&mut s.addrs, addrs);
        }
        merge_addrs(
            self.persisted.servers.entry(id.to_owned()).or_default(),
            addrs,
        );
    }
}

fn replica_assignment(name: &str, epoch: u64) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: name.to_owned(),
        epoch,
        role: BlockRole::Replica.to_wire(),
        ..BlockVolumeAssignment::default()
    }
}

fn merge_addrs(into: &mut ServerAddrs, from: &ServerAddrs) {
    for (i, f) in [
        (&mut into.grpc, &from.grpc),
        (&mut into.data, &from.data),
        (&mut into.nbd, &from.nbd),
        (&mut into.http, &from.http),
    ] {
        if !f.is_empty() {
            i.clone_from(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> ServerAddrs {
        ServerAddrs {
            grpc: format!("127.0.0.1:{}", 1000 + n),
            data: format!("127.0.0.1:{}", 2000 + n),
            nbd: format!("127.0.0.1:{}", 3000 + n),
            http: String::new(),
        }
    }

    fn timing() -> Timing {
        Timing {
            lease_ttl: Duration::from_secs(4),
            dead_after: Duration::from_secs(3),
            lease_margin: Duration::from_secs(1),
        }
    }

    fn three(now: Instant) -> MasterState {
        let mut m = MasterState::new(timing(), Persisted::default(), now);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            m.heartbeat(id, addrs(i as u16), Some(vec![]), now);
        }
        m
    }

    fn record(servers: &[String]) -> VolumeRecord {
        VolumeRecord {
            name: "v".into(),
            size_bytes: 1 << 20,
            wal_size_bytes: 1 << 20,
            durability_mode: "sync_all".into(),
            epoch: 1,
            primary: servers[0].clone(),
            replicas: servers[1..].to_vec(),
        }
    }

    #[test]
    fn placement_uses_distinct_live_servers_and_refuses_too_few() {
        let t = Instant::now();
        let m = three(t);
        let p = m.place("v", 3).unwrap();
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3);
        assert_eq!(
            m.place("v", 4),
            Err(MasterError::NotEnoughServers { want: 4, have: 3 })
        );
        assert!(m.place("bad/name", 1).is_err());
    }

    #[test]
    fn assignments_go_out_on_heartbeats_with_the_lease_renewed() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(record(&p));
        let a = m.heartbeat(&p[0], addrs(0), None, t);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].role, BlockRole::Primary.to_wire());
        assert_eq!(a[0].replica_addrs.len(), 2);
        assert_eq!(a[0].lease_ttl_ms, 4000);
        // Next heartbeat: a renewal only.
        let a = m.heartbeat(&p[0], addrs(0), None, t + Duration::from_secs(1));
        assert_eq!(a.len(), 1);
        assert!(a[0].replica_addrs.is_empty());
        let a = m.heartbeat(&p[1], addrs(1), None, t);
        assert_eq!(a[0].role, BlockRole::Replica.to_wire());
    }

    #[test]
    fn a_restarted_master_keeps_the_export_addresses_heartbeats_do_not_carry() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(record(&p));
        let persisted = m.persisted.clone();
        let mut m = MasterState::new(timing(), persisted, t);
        // Heartbeats carry gRPC, HTTP and replication addresses, not the NBD address.
        let mut hb = addrs(0);
        hb.nbd.clear();
        m.heartbeat(&p[0], hb, Some(vec![]), t);
        assert_eq!(m.addrs(&p[0]).map(|a| a.nbd), Some(addrs(0).nbd));
    }

    #[test]
    fn a_primary_back_fenced_gets_its_full_assignment_not_a_renewal() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(record(&p));
        let a = m.heartbeat(&p[0], addrs(0), None, t);
        assert_eq!(a[0].replica_addrs.len(), 2);
        // Serving at epoch 1: renewals only.
        let serving = vec![("v".to_owned(), 1, BlockRole::Primary.to_wire())];
        let a = m.heartbeat(&p[0], addrs(0), Some(serving), t + Duration::from_secs(1));
        assert!(a[0].replica_addrs.is_empty());
        // Restarted within the dead time, it reports the volume fenced at epoch 1: the full
        // assignment again, naming both replicas, so it never serves without them.
        let fenced = vec![("v".to_owned(), 1, BlockRole::Stale.to_wire())];
        let a = m.heartbeat(&p[0], addrs(0), Some(fenced), t + Duration::from_secs(2));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].role, BlockRole::Primary.to_wire());
        assert_eq!(a[0].replica_addrs.len(), 2, "{a:?}");
        // At the next epoch: it may have lost unsynced entries, and must not write other
        // entries under LSNs a replica holds at the old epoch. Its replicas follow.
        assert_eq!(a[0].epoch, 2);
        for (i, r) in p.iter().enumerate().skip(1) {
            let a = m.heartbeat(r, addrs(i as u16), None, t + Duration::from_secs(2));
            assert!(
                a.iter()
                    .any(|x| x.epoch == 2 && x.role == BlockRole::Replica.to_wire()),
                "{a:?}"
            );
        }
        // Serving at the new epoch: renewals, no further bump.
        let serving = vec![("v".to_owned(), 2, BlockRole::Primary.to_wire())];
        let a = m.heartbeat(&p[0], addrs(0), Some(serving), t + Duration::from_secs(3));
        assert_eq!((a[0].epoch, a[0].replica_addrs.len()), (2, 0));
    }

    #[test]
    fn failover_waits_for_the_lease_then_promotes_the_highest_head() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(record(&p));
        for id in &p {
            m.heartbeat(id, addrs(0), None, t);
        }
        // The primary goes silent; the replicas keep beating.
        let mut now = t;
        let mut actions = Vec::new();
        for _ in 0..20 {
            now += Duration::from_millis(500);
            m.heartbeat(&p[1], addrs(1), None, now);
            m.heartbeat(&p[2], addrs(2), None, now);
            actions = m.tick(now);
            if !actions.is_empty() {
                break;
            }
        }
        // Dead after 3 s, but the lease granted at t ends at t + 4 s, plus 1 s of margin.
        assert!(now >= t + Duration::from_secs(5), "{:?}", now - t);
        let Action::CollectEvidence {
            candidates, epoch, ..
        } = &actions[0];
        assert_eq!(*epoch, 1);
        assert_eq!(candidates.len(), 2);
        // No second collection while one runs.
        assert!(m.tick(now).is_empty());
        let answers = vec![
            Candidate {
                server: p[1].clone(),
                epoch: 1,
                head: 90,
                last_entry_epoch: 1,
                committed: 90,
                eligible: true,
            },
            Candidate {
                server: p[2].clone(),
                epoch: 1,
                head: 100,
                last_entry_epoch: 1,
                committed: 95,
                eligible: true,
            },
        ];
        assert_eq!(m.promote("v", &answers), Some(p[2].clone()));
        let v = m.volume("v").unwrap();
        assert_eq!(v.epoch, 2);
        assert_eq!(v.primary, p[2]);
        assert!(
            v.replicas.contains(&p[0]),
            "the old primary stays in the set"
        );
        // The new primary gets its assignment at epoch 2 with both others as replicas.
        let a = m.heartbeat(&p[2], addrs(2), None, now);
        assert_eq!((a[0].epoch, a[0].role), (2, BlockRole::Primary.to_wire()));
        assert_eq!(a[0].replica_addrs.len(), 2);
        // The old primary returns reporting epoch 1 as primary: it is told to be a replica.
        let a = m.heartbeat(&p[0], addrs(0), Some(vec![("v".into(), 1, 1)]), now);
        assert!(
            a.iter()
                .any(|a| a.epoch == 2 && a.role == BlockRole::Replica.to_wire())
        );
    }

    #[test]
    fn sync_quorum_promotes_only_with_enough_answers() {
        assert_eq!(answers_needed("sync_all", 2), 1);
        assert_eq!(answers_needed("best_effort", 2), 1);
        // RF 3: a write acknowledged by a quorum of 2 is on at least one of the 2 replicas.
        assert_eq!(answers_needed("sync_quorum", 2), 2);
        // RF 2: quorum 2, every acknowledged write is on the one replica.
        assert_eq!(answers_needed("sync_quorum", 1), 1);
        // RF 5: quorum 3, on at least 2 of 4 replicas: 3 answers include one of them.
        assert_eq!(answers_needed("sync_quorum", 4), 3);
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(VolumeRecord {
            durability_mode: "sync_quorum".into(),
            ..record(&p)
        });
        let one = vec![Candidate {
            server: p[1].clone(),
            epoch: 1,
            head: 10,
            last_entry_epoch: 1,
            committed: 10,
            eligible: true,
        }];
        assert_eq!(
            m.promote("v", &one),
            None,
            "one of two replicas is not enough"
        );
        let mut two = one.clone();
        two.push(Candidate {
            server: p[2].clone(),
            epoch: 1,
            head: 12,
            last_entry_epoch: 1,
            committed: 10,
            eligible: true,
        });
        assert_eq!(m.promote("v", &two), Some(p[2].clone()));
    }

    #[test]
    fn a_longer_log_of_an_older_epoch_loses_to_a_shorter_one_of_a_newer_epoch() {
        // Epoch 3 of an RF-3 `sync_quorum` volume, primary p[0]. p[1] is the primary of epoch
        // 2 that never rejoined: its log ends in a long tail of epoch-2 entries nobody
        // acknowledged (head 120). p[2] followed epoch 3 and holds its acknowledged writes
        // (head 100, entries of epoch 3). Ranked by head, p[1] would win and the new primary
        // would truncate p[2]'s acknowledged writes away.
        let t = Instant::now();
        let epoch_3 = || {
            let mut m = three(t);
            let p = m.place("v", 3).unwrap();
            m.created(VolumeRecord {
                durability_mode: "sync_quorum".into(),
                epoch: 3,
                ..record(&p)
            });
            (m, p)
        };
        let (mut m, p) = epoch_3();
        let candidate = |server: &String, head, last_entry_epoch| Candidate {
            server: server.clone(),
            epoch: 3,
            head,
            last_entry_epoch,
            committed: 90,
            eligible: true,
        };
        let answers = vec![candidate(&p[1], 120, 2), candidate(&p[2], 100, 3)];
        assert_eq!(m.promote("v", &answers), Some(p[2].clone()));
        assert_eq!(m.volume("v").unwrap().epoch, 4);
        // Within one epoch the longer durable log wins, as before.
        let (mut m, p) = epoch_3();
        let answers = vec![candidate(&p[1], 120, 3), candidate(&p[2], 100, 3)];
        assert_eq!(m.promote("v", &answers), Some(p[1].clone()));
    }

    #[test]
    fn no_promotion_of_an_ineligible_or_stale_candidate() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 2).unwrap();
        m.created(record(&p));
        let answers = vec![Candidate {
            server: p[1].clone(),
            epoch: 1,
            head: 10,
            last_entry_epoch: 1,
            committed: 10,
            eligible: false,
        }];
        assert_eq!(m.promote("v", &answers), None);
        let answers = vec![Candidate {
            server: p[1].clone(),
            epoch: 0,
            head: 10,
            last_entry_epoch: 1,
            committed: 10,
            eligible: true,
        }];
        assert_eq!(m.promote("v", &answers), None);
        assert_eq!(m.volume("v").unwrap().epoch, 1);
    }

    #[test]
    fn persisted_state_round_trips_and_a_restarted_master_waits_a_lease() {
        let t = Instant::now();
        let mut m = three(t);
        let p = m.place("v", 3).unwrap();
        m.created(record(&p));
        let json = serde_json::to_string(&m.persisted).unwrap();
        let back: Persisted = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m.persisted);
        let mut m2 = MasterState::new(timing(), back, t);
        // Only the replicas beat: the primary may still hold a lease from before the restart.
        let mut now = t;
        for _ in 0..9 {
            now += Duration::from_millis(500);
            m2.heartbeat(&p[1], addrs(1), None, now);
            m2.heartbeat(&p[2], addrs(2), None, now);
            assert!(
                m2.tick(now).is_empty() || now >= t + Duration::from_secs(5),
                "promoted at {:?}",
                now - t
            );
        }
    }
}
