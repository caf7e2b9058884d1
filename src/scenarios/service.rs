//! Recoveries driven end to end by the master's assignments through controlbridge's
//! `BlockService`, across volume servers that each keep their volumes in their own data
//! directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockvol::{CreateOptions, Lba, OpenOptions, RetentionPolicy, Volume};
use controlbridge::{BlockVolumeAssignment, RecoveryRecord};
use engine::ReplicaState;
use engine::conformance::ScenarioReport;
use v2bridge::harness::block_pattern;

use super::{Check, Moved, Tally, digest, ensure, image_bytes, wal_entry_bytes};
use crate::cluster::{Fabric, Server, server};

/// Blocks of a cluster volume.
const BLOCKS: u64 = 256;
const BLOCK_SIZE: u32 = 4096;
const VOLUME: &str = "vol1";

/// A master's view: the servers and the volume's assignments.
struct Cluster {
    _dir: super::Scratch,
    fabric: Arc<Fabric>,
    servers: BTreeMap<String, Server>,
    epoch: u64,
}

impl Cluster {
    fn new(ids: &[&str]) -> Result<Self, String> {
        let dir = super::Scratch::new("swblock-cluster-")?;
        let fabric = Fabric::new();
        let create = CreateOptions {
            volume_size_bytes: BLOCKS * u64::from(BLOCK_SIZE),
            wal_size_bytes: 4 << 20,
            block_size: BLOCK_SIZE,
        };
        let mut servers = BTreeMap::new();
        for id in ids {
            servers.insert(
                (*id).to_owned(),
                server(
                    dir.path(),
                    id,
                    create.clone(),
                    OpenOptions::manual(),
                    &fabric,
                )?,
            );
        }
        Ok(Cluster {
            _dir: dir,
            fabric,
            servers,
            epoch: 1,
        })
    }

    fn server(&mut self, id: &str) -> Result<&mut Server, String> {
        self.servers
            .get_mut(id)
            .ok_or_else(|| format!("no server {id}"))
    }

    fn volume(&mut self, id: &str) -> Result<Arc<Volume>, String> {
        self.server(id)?
            .backend()
            .volume(VOLUME)
            .ok_or_else(|| format!("{id} has no open {VOLUME}"))
    }

    fn assignment(&self, role: u32, replicas: &[&str]) -> BlockVolumeAssignment {
        crate::cluster::assignment(VOLUME, self.epoch, role, replicas)
    }

    /// Sends each replica its replica role, then the primary its assignment; returns the
    /// primary's recovery records by server ID.
    fn assign_primary(
        &mut self,
        primary: &str,
        replicas: &[&str],
    ) -> Result<BTreeMap<String, RecoveryRecord>, String> {
        for r in replicas {
            let a = self.assignment(2, &[]);
            let out = self.server(r)?.process_assignments_inline(&[a]);
            ensure(out[0].error.is_none(), || {
                format!("replica assignment on {r}: {:?}", out[0].error)
            })?;
        }
        let a = self.assignment(1, replicas);
        let out = self.server(primary)?.process_assignments_inline(&[a]);
        ensure(out[0].error.is_none(), || {
            format!("primary assignment: {:?}", out[0].error)
        })?;
        Ok(out[0]
            .recoveries
            .iter()
            .map(|(id, rec)| {
                let server = id
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                (server, rec.clone())
            })
            .collect())
    }

    /// Sends `replica` a rebuilding assignment pointing at `primary`'s rebuild endpoint.
    fn rebuild(&mut self, replica: &str, primary: &str) -> Result<RecoveryRecord, String> {
        let mut a = self.assignment(4, &[]);
        a.rebuild_addr = format!("{primary}:3270");
        let out = self.server(replica)?.process_assignments_inline(&[a]);
        ensure(out[0].error.is_none(), || {
            format!("rebuild assignment: {:?}", out[0].error)
        })?;
        out[0]
            .recoveries
            .first()
            .map(|(_, r)| r.clone())
            .ok_or_else(|| "rebuild assignment drove nothing".into())
    }

    /// The primary's sender state for a replica server.
    fn sender_state(&self, primary: &str, replica: &str) -> Result<ReplicaState, String> {
        let orch = self
            .servers
            .get(primary)
            .and_then(|s| s.orchestrator(VOLUME))
            .ok_or("no orchestrator")?;
        let id =
            engine::ReplicaId::new(format!("{VOLUME}/{replica}")).map_err(|e| e.to_string())?;
        orch.registry()
            .sender(&id)
            .map(|s| s.state())
            .ok_or_else(|| format!("no sender for {replica}"))
    }
}

/// Writes `n` blocks on the primary (block `lsn % BLOCKS` gets `block_pattern(lsn)`), then
/// makes them durable and committed (as acknowledgements from a quorum would).
fn write_committed(vol: &Volume, n: u64) -> Result<u64, String> {
    let mut head = vol.status().head.0;
    for _ in 0..n {
        let lsn = head + 1;
        let got = vol
            .write(
                Lba(lsn % BLOCKS),
                &block_pattern(lsn, 0, BLOCK_SIZE as usize),
            )
            .map_err(|e| format!("write {lsn}: {e}"))?;
        head = got.0;
    }
    vol.sync().map_err(|e| e.to_string())?;
    vol.set_committed(blockvol::Lsn(head));
    Ok(head)
}

fn record_into(tally: &mut Tally, rec: &RecoveryRecord) {
    match rec {
        RecoveryRecord::ZeroGap => tally.add_path("zero_gap"),
        RecoveryRecord::Recovered(r) => tally.add(r),
        RecoveryRecord::NeedsRebuild => tally.add_path("needs_rebuild"),
        RecoveryRecord::RebuildNotNeeded(_) => tally.add_path("rebuild_not_needed"),
        RecoveryRecord::Failed(_) => tally.add_path("failed"),
    }
}

fn expect_recovered(rec: &RecoveryRecord, path: &str) -> Check {
    match rec {
        RecoveryRecord::Recovered(r) if r.path.as_str() == path => Ok(()),
        other => Err(format!("expected {path}, got {other:?}")),
    }
}

/// A replica beyond the primary's retention escalates to rebuild; the master's rebuilding
/// assignment makes the replica pull a base from the primary's rebuild endpoint; the next
/// primary assignment finds it in sync.
pub fn gap_beyond_retention_rebuild_assignment() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let mut c = Cluster::new(&["vs1", "vs2"])?;
    let first = c.assign_primary("vs1", &["vs2"])?;
    ensure(first.get("vs2") == Some(&RecoveryRecord::ZeroGap), || {
        format!("empty volumes not zero gap: {first:?}")
    })?;
    let primary = c.volume("vs1")?;
    let head = write_committed(&primary, 150)?;
    primary.set_retention(RetentionPolicy::default());
    primary.force_flush().map_err(|e| e.to_string())?;
    ensure(primary.status().tail.0 == head, || {
        format!("primary tail {} after flush", primary.status().tail)
    })?;

    let rec = c.assign_primary("vs1", &["vs2"])?;
    let r = rec.get("vs2").cloned().ok_or("no record for vs2")?;
    record_into(&mut tally, &r);
    ensure(r == RecoveryRecord::NeedsRebuild, || {
        format!("gap beyond retention gave {r:?}")
    })?;
    ensure(
        c.sender_state("vs1", "vs2")? == ReplicaState::NeedsRebuild,
        || "primary's sender not needs_rebuild".into(),
    )?;
    ensure(primary.status().pins_outstanding == 0, || {
        "pins left".into()
    })?;

    let r = c.rebuild("vs2", "vs1")?;
    record_into(&mut tally, &r);
    expect_recovered(&r, "rebuild_snapshot_tail")?;
    ensure(primary.status().pins_outstanding == 0, || {
        "rebuild left pins on the primary".into()
    })?;

    let rec = c.assign_primary("vs1", &["vs2"])?;
    let r = rec.get("vs2").cloned().ok_or("no record for vs2")?;
    record_into(&mut tally, &r);
    ensure(r == RecoveryRecord::ZeroGap, || {
        format!("rebuilt replica not zero gap: {r:?}")
    })?;
    ensure(
        c.sender_state("vs1", "vs2")? == ReplicaState::InSync,
        || "not in sync".into(),
    )?;
    let replica = c.volume("vs2")?;
    let want = super::oracle_digest(head, BLOCKS, BLOCK_SIZE);
    let m = digest(&replica, "vs2")? == want && digest(&primary, "vs1")? == want;
    ensure(m, || "replica digest differs from the primary's".into())?;
    // The rebuild sends the checkpoint image at 150 (the flush moved it to committed and
    // recycled everything behind it) and no tail.
    let moved = Moved::exact(0, image_bytes(head, BLOCKS, BLOCK_SIZE));
    Ok(tally.report(
        "gap_beyond_retention_rebuild_assignment",
        "needs_rebuild -> rebuilt -> in_sync",
        primary.status().pins_outstanding,
        m,
        &moved,
    ))
}

/// Three replicas, three outcomes from one primary assignment: one in sync (zero gap), one
/// behind inside retention (catch-up), one beyond retention (rebuild, then in sync).
pub fn three_replicas_three_outcomes() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let replicas = ["vs2", "vs3", "vs4"];
    let mut c = Cluster::new(&["vs1", "vs2", "vs3", "vs4"])?;
    c.assign_primary("vs1", &replicas)?;
    let primary = c.volume("vs1")?;
    // All three at 10.
    write_committed(&primary, 10)?;
    c.assign_primary("vs1", &replicas)?;
    // vs4 goes away; vs2 and vs3 reach 70.
    c.fabric.set_down("vs4:3260", true);
    write_committed(&primary, 60)?;
    c.assign_primary("vs1", &replicas)?;
    // vs3 goes away too; vs2 reaches 100.
    c.fabric.set_down("vs3:3260", true);
    let head = write_committed(&primary, 30)?;
    c.assign_primary("vs1", &replicas)?;
    // The primary keeps 40 entries behind its checkpoint: tail 60.
    primary.set_retention(RetentionPolicy {
        keep_entries: 40,
        keep_bytes: 0,
    });
    primary.force_flush().map_err(|e| e.to_string())?;
    ensure(primary.status().tail.0 == 60, || {
        format!("tail {}", primary.status().tail)
    })?;
    c.fabric.set_down("vs3:3260", false);
    c.fabric.set_down("vs4:3260", false);

    let rec = c.assign_primary("vs1", &replicas)?;
    for r in rec.values() {
        record_into(&mut tally, r);
    }
    ensure(rec.get("vs2") == Some(&RecoveryRecord::ZeroGap), || {
        format!("vs2: {:?}", rec.get("vs2"))
    })?;
    match rec.get("vs3") {
        Some(RecoveryRecord::Recovered(r)) if r.entries_applied == 30 => {}
        other => return Err(format!("vs3 expected a 30-entry catch-up: {other:?}")),
    }
    ensure(
        rec.get("vs4") == Some(&RecoveryRecord::NeedsRebuild),
        || format!("vs4: {:?}", rec.get("vs4")),
    )?;
    let st = c
        .servers
        .get("vs1")
        .and_then(|s| s.orchestrator(VOLUME))
        .ok_or("no orchestrator")?
        .registry()
        .status();
    ensure((st.in_sync, st.rebuilding) == (2, 1), || {
        format!("status in_sync {} rebuilding {}", st.in_sync, st.rebuilding)
    })?;

    let r = c.rebuild("vs4", "vs1")?;
    record_into(&mut tally, &r);
    expect_recovered(&r, "rebuild_snapshot_tail")?;
    let rec = c.assign_primary("vs1", &replicas)?;
    ensure(rec.values().all(|r| *r == RecoveryRecord::ZeroGap), || {
        format!("after the rebuild: {rec:?}")
    })?;
    let want = super::oracle_digest(head, BLOCKS, BLOCK_SIZE);
    let mut m = digest(&primary, "vs1")? == want;
    for r in replicas {
        m &= digest(&c.volume(r)?, r)? == want;
        ensure(c.sender_state("vs1", r)? == ReplicaState::InSync, || {
            format!("{r} not in sync")
        })?;
    }
    ensure(m, || "a replica's digest differs".into())?;
    // vs3 catches up (70, 100]; vs4 is rebuilt from the checkpoint image at 100 (the flush
    // moved it to committed) with no tail; vs2 moves nothing.
    let moved = Moved::exact(
        30,
        30 * wal_entry_bytes(BLOCK_SIZE) + image_bytes(head, BLOCKS, BLOCK_SIZE),
    );
    Ok(tally.report(
        "three_replicas_three_outcomes",
        "zero_gap / catchup / rebuild -> all in_sync",
        primary.status().pins_outstanding,
        m,
        &moved,
    ))
}
