//! Online scrub and repair (issue 15, docs/wire.md "Scrub and repair").
//!
//! A volume server scrubs the volumes it is primary of (and those no master assigned, which
//! have no peers): a pass walks the volume in steps, verifies each step's flushed blocks on its
//! own copy and on every replica the live stream holds in sync (`ScrubReq`), and repairs what
//! one copy lost from another: a block damaged here is read from a replica that found it
//! clean (`ReadBlockReq`) and repaired locally; a block damaged on a replica is sent to it from
//! this copy (`RepairReq`). Each side accepts a copy only when its stored checksum (or its own
//! extent bytes) proves the copy is the block's version (`blockvol::Volume::repair_block`), so
//! a repair never writes another version of a block, and a block damaged on every copy is
//! reported and left as it is: the read keeps failing, never returns invented data.
//!
//! Replicas do not scrub on their own: their primary's pass verifies them (and they record what
//! they found, for their heartbeats), because only the primary knows which peers are in sync.
//!
//! A pass reads `rate_bytes` per second at most from this server's copy (each replica reads
//! the same), sleeping between steps; nothing is held between steps, so writes, flushes and
//! the live stream go on. A role or epoch change ends the pass at the next step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use blockvol::{Epoch, Lba, RepairOutcome};
use controlbridge::BlockRole;
use transport::net::RemoteReplica;
use transport::stream::ReplicaSpec;
use v2bridge::{Lineage, LocalReplica};

use crate::node::Node;

/// How a server scrubs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Bytes per second a pass reads from this server's copy; 0 turns scrubbing off.
    pub rate_bytes: u64,
    /// From the start of one pass over a volume to the start of the next (the first pass
    /// starts this long after the server, at most 10 minutes).
    pub interval: Duration,
    /// Blocks per step (at most `transport::wire::MAX_SCRUB_BLOCKS`).
    pub step_blocks: u32,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            rate_bytes: 32 << 20,
            interval: Duration::from_secs(24 * 3600),
            step_blocks: 256,
        }
    }
}

/// What a volume's scrub needs to know now (re-read at every step).
pub(crate) struct ScrubTarget {
    /// This server's copy.
    pub local: LocalReplica,
    /// The role it holds.
    pub role: BlockRole,
    /// Its epoch.
    pub epoch: u64,
    /// Replicas the live stream holds in sync.
    pub peers: Vec<ReplicaSpec>,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Blocks verified on this copy.
    pub checked: u64,
    /// Damaged blocks found on this copy.
    pub damaged_here: u64,
    /// Damaged blocks found on the replicas.
    pub damaged_peers: u64,
    /// Blocks repaired on this copy.
    pub repaired_here: u64,
    /// Blocks repaired on the replicas.
    pub repaired_peers: u64,
    /// Blocks no copy could repair: `(copy, block)`, the copy being this server's ID or a
    /// replica's ID.
    pub unrepairable: Vec<(String, Lba)>,
}

/// The scrubber thread of a server: one pass per volume per interval, until `stop`.
pub(crate) fn spawn(
    node: Weak<Node>,
    cfg: ScrubConfig,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("scrubber".into())
        .spawn(move || {
            let first = Instant::now() + cfg.interval.min(Duration::from_secs(600));
            let mut next: BTreeMap<String, Instant> = BTreeMap::new();
            while !stop.load(Ordering::SeqCst) {
                let Some(n) = node.upgrade() else { return };
                let now = Instant::now();
                let due: Vec<String> = n
                    .names()
                    .into_iter()
                    .filter(|v| *next.entry(v.clone()).or_insert(first) <= now)
                    .collect();
                for name in due {
                    let started = Instant::now();
                    next.insert(name.clone(), started + cfg.interval);
                    match run_pass(&n, &name, &cfg, &stop) {
                        Ok(Some(r)) => log::info!(
                            "volume {name}: scrub pass: {} blocks checked in {:?}, damaged {} \
                             here and {} on replicas, repaired {} here and {} on replicas, \
                             {} unrepairable",
                            r.checked,
                            started.elapsed(),
                            r.damaged_here,
                            r.damaged_peers,
                            r.repaired_here,
                            r.repaired_peers,
                            r.unrepairable.len()
                        ),
                        Ok(None) => {}
                        Err(why) => log::info!("volume {name}: scrub pass ended early: {why}"),
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                drop(n);
                sleep_unless(&stop, Duration::from_millis(100));
            }
        })
}

/// Sleeps `d` in short slices, returning early once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// One pass over `name`; `None` when this server does not scrub it (a replica's primary does).
pub fn run_pass(
    node: &Node,
    name: &str,
    cfg: &ScrubConfig,
    stop: &AtomicBool,
) -> Result<Option<PassReport>, String> {
    let Some(first) = node.scrub_target(name) else {
        return Err("the volume is gone".into());
    };
    if !matches!(first.role, BlockRole::Primary | BlockRole::None) || cfg.rate_bytes == 0 {
        return Ok(None);
    }
    let vol = first.local.volume();
    let geo = vol.geometry();
    let bs = geo.block_size as usize;
    let step = u64::from(cfg.step_blocks.clamp(1, transport::wire::MAX_SCRUB_BLOCKS));
    let lineage = Lineage::new(node.id(), Epoch(first.epoch), 1);
    let client = node.client_config();
    let mut conns: BTreeMap<String, RemoteReplica> = BTreeMap::new();
    let mut report = PassReport::default();
    let started = Instant::now();
    let mut from = 0u64;
    while from < geo.volume_blocks {
        if stop.load(Ordering::SeqCst) {
            return Err("the server is stopping".into());
        }
        let t = node
            .scrub_target(name)
            .ok_or_else(|| "the volume is gone".to_owned())?;
        if t.role != first.role || t.epoch != first.epoch {
            return Err(format!(
                "role {:?} at epoch {} became {:?} at epoch {}",
                first.role, first.epoch, t.role, t.epoch
            ));
        }
        let n = step.min(geo.volume_blocks - from);
        let here = t.local.scrub(Lba(from), n).map_err(|e| e.to_string())?;
        report.checked += here.checked;
        report.damaged_here += here.damaged.len() as u64;
        // Every in-sync replica verifies the same range.
        let mut there: Vec<(String, blockvol::ScrubReport)> = Vec::new();
        conns.retain(|id, _| t.peers.iter().any(|p| &p.id == id));
        for p in &t.peers {
            let conn = match conns.entry(p.id.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    match RemoteReplica::connect(p.addr, &p.volume, &client) {
                        Ok(c) => e.insert(c),
                        Err(err) => {
                            log::warn!("volume {name}: scrub cannot reach {}: {err}", p.id);
                            continue;
                        }
                    }
                }
            };
            // n <= MAX_SCRUB_BLOCKS, a u32.
            match conn.scrub(Lba(from), n as u32) {
                Ok(r) => {
                    report.damaged_peers += r.damaged.len() as u64;
                    there.push((p.id.clone(), r));
                }
                Err(err) => {
                    log::warn!("volume {name}: scrub of {} failed: {err}", p.id);
                    conns.remove(&p.id);
                }
            }
        }
        // This copy's damage, from a replica that found the block clean.
        for &lba in &here.damaged {
            let mut fixed = false;
            for (id, r) in &there {
                if r.damaged.contains(&lba) {
                    continue;
                }
                let Some(conn) = conns.get_mut(id) else {
                    continue;
                };
                let copy = match conn.read_block(lba, bs) {
                    Ok(c) => c,
                    Err(err) => {
                        log::warn!("volume {name}: block {} from {id}: {err}", lba.0);
                        continue;
                    }
                };
                match t.local.repair(Epoch(t.epoch), lba, &copy) {
                    Ok(o) => {
                        if repaired(o) {
                            report.repaired_here += 1;
                            log::warn!("volume {name}: block {} repaired from {id} ({o:?})", lba.0);
                        }
                        fixed = true;
                        break;
                    }
                    Err(err) => {
                        log::warn!("volume {name}: block {} from {id}: {err}", lba.0);
                    }
                }
            }
            if !fixed {
                log::error!(
                    "volume {name}: block {} is damaged on {} and no in-sync replica holds a \
                     copy that proves to be its version: left as it is (reads of it fail)",
                    lba.0,
                    node.id()
                );
                report.unrepairable.push((node.id().to_owned(), lba));
            }
        }
        // The replicas' damage, from this copy.
        for (id, r) in &there {
            for &lba in &r.damaged {
                let outcome = t
                    .local
                    .read_block(lba)
                    .map_err(|e| format!("this copy's block is unreadable too: {e}"))
                    .and_then(|copy| match conns.get_mut(id) {
                        Some(conn) => conn.repair(lineage, lba, copy).map_err(|e| e.to_string()),
                        None => Err("the connection broke".to_owned()),
                    });
                match outcome {
                    Ok(o) => {
                        if repaired(o) {
                            report.repaired_peers += 1;
                            log::warn!("volume {name}: block {} of {id} repaired ({o:?})", lba.0);
                        }
                    }
                    Err(why) => {
                        log::error!(
                            "volume {name}: block {} is damaged on {id} and was not repaired: \
                             {why}",
                            lba.0
                        );
                        report.unrepairable.push((id.clone(), lba));
                    }
                }
            }
        }
        from += n;
        // Hold the rate: the pass may not run ahead of `rate_bytes` per second.
        let due =
            started + Duration::from_secs_f64((from * bs as u64) as f64 / cfg.rate_bytes as f64);
        sleep_unless(stop, due.saturating_duration_since(Instant::now()));
    }
    for (_, mut c) in conns {
        c.close("scrub pass done");
    }
    Ok(Some(report))
}

fn repaired(o: RepairOutcome) -> bool {
    matches!(
        o,
        RepairOutcome::ExtentRewritten | RepairOutcome::ChecksumRewritten
    )
}
