//! Recovery while a writer thread keeps writing to the primary: the catch-up's target is
//! frozen at plan time and completes there; follow-up catch-ups chase the head; once the
//! writer stops, one more reaches its final head and the digests match.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use blockvol::{CreateOptions, Epoch, FlushGate, Lba, RetentionPolicy, Role, Volume};
use engine::conformance::{ScenarioReport, replica_id};
use engine::{
    CatchUpExecutor, Lsn, Outcome, RecoveryDriver, ReplicaHandshake, ReplicaState, SessionKind,
    StepInfo,
};
use v2bridge::convert::to_engine;
use v2bridge::harness::{block_pattern, volume_options};
use v2bridge::{BlockVolStorage, BridgeIo, Lineage, LocalReplica, ReplicaTarget};

use super::{Moved, Tally, assign, chunked, digest, ensure, state_of, wal_entry_bytes};

const BLOCKS: u64 = 1024;
const BLOCK_SIZE: u32 = 4096;
const WRITES: u64 = 3000;

fn handshake(target: &mut LocalReplica) -> Result<ReplicaHandshake, String> {
    let r = target.handshake().map_err(|e| e.to_string())?;
    Ok(v2bridge::convert::handshake(&r))
}

/// See the module docs.
pub fn recovery_with_concurrent_writer() -> Result<ScenarioReport, String> {
    let dir = super::Scratch::new("swblock-writer-")?;
    let create = CreateOptions {
        volume_size_bytes: BLOCKS * u64::from(BLOCK_SIZE),
        wal_size_bytes: 32 << 20,
        block_size: BLOCK_SIZE,
    };
    let opts = volume_options(FlushGate::Committed);
    let primary = Arc::new(
        Volume::create(dir.path().join("primary.vol"), &create, &opts)
            .map_err(|e| e.to_string())?,
    );
    primary
        .assign(Role::Primary, Epoch(1))
        .map_err(|e| e.to_string())?;
    // Keep enough history behind the checkpoint that the chase never falls beyond retention
    // (the WAL holds all of it): this scenario is about chasing a moving head, not about
    // escalation, which `wal_recycled_under_catch_up` covers.
    primary.set_retention(RetentionPolicy {
        keep_entries: WRITES,
        keep_bytes: 0,
    });
    let replica_vol = Arc::new(
        Volume::create(dir.path().join("r1.vol"), &create, &opts).map_err(|e| e.to_string())?,
    );
    replica_vol
        .assign(Role::Replica, Epoch(1))
        .map_err(|e| e.to_string())?;
    let mut replica = LocalReplica::new(Arc::clone(&replica_vol));
    let storage = Arc::new(BlockVolStorage::new(Arc::clone(&primary)));
    let driver = RecoveryDriver::new(Arc::clone(&storage) as _);

    // Some history before the replica is recovered at all.
    let bs = BLOCK_SIZE as usize;
    for lsn in 1..=200u64 {
        primary
            .write(Lba(lsn % BLOCKS), &block_pattern(lsn, 0, bs))
            .map_err(|e| e.to_string())?;
    }
    primary.sync().map_err(|e| e.to_string())?;
    primary.set_committed(blockvol::Lsn(200));

    let written = Arc::new(AtomicU64::new(200));
    let exited = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(2));
    let writer = {
        let (primary, written, stop, start, exited) = (
            Arc::clone(&primary),
            Arc::clone(&written),
            Arc::clone(&stop),
            Arc::clone(&start),
            Arc::clone(&exited),
        );
        thread::spawn(move || -> Result<u64, String> {
            struct Exit(Arc<AtomicBool>);
            impl Drop for Exit {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _exit = Exit(exited);
            start.wait();
            let mut head = 200;
            while head < WRITES && !stop.load(Ordering::Relaxed) {
                let lsn = head + 1;
                let got = primary
                    .write(Lba(lsn % BLOCKS), &block_pattern(lsn, 0, bs))
                    .map_err(|e| format!("writer at {lsn}: {e}"))?;
                head = got.0;
                if head % 50 == 0 {
                    primary.sync().map_err(|e| e.to_string())?;
                    primary.set_committed(got);
                    primary.force_flush().map_err(|e| e.to_string())?;
                }
                written.store(head, Ordering::Release);
            }
            primary.sync().map_err(|e| e.to_string())?;
            primary.set_committed(blockvol::Lsn(head));
            Ok(head)
        })
    };
    start.wait();

    let mut tally = Tally::default();
    let mut rounds = 0;
    let mut first_target = None;
    let result = (|| -> Result<(), String> {
        loop {
            let writer_done = writer.is_finished();
            assign(&driver, 1, &[("r1", SessionKind::CatchUp)])?;
            let hs = handshake(&mut replica)?;
            let plan = driver
                .plan_recovery(&replica_id("r1"), hs)
                .map_err(|e| e.to_string())?;
            rounds += 1;
            match plan.outcome() {
                Outcome::ZeroGap => {
                    tally.add_path("zero_gap");
                    if writer_done {
                        return Ok(());
                    }
                    // Caught up with everything committed so far: give the writer time to
                    // commit more instead of spinning on handshakes.
                    thread::sleep(std::time::Duration::from_millis(2));
                    continue;
                }
                Outcome::NeedsRebuild => {
                    return Err(format!("replica fell beyond retention: {:?}", plan.proof()));
                }
                Outcome::CatchUp => {}
            }
            let target = plan.target().ok_or("no target")?;
            let sid = plan.session_id().ok_or("no session")?;
            let mut io = BridgeIo::new(
                Arc::clone(&storage),
                replica.clone(),
                Lineage::new("vs1", Epoch(1), sid.get()),
                target,
            );
            let seen = Arc::clone(&written);
            let writer_exited = Arc::clone(&exited);
            let report = CatchUpExecutor::new(&driver, plan)
                .with_options(chunked(64, 1 << 20))
                .with_on_step(|s: &StepInfo| {
                    // On the first round, make sure the writer really writes during the
                    // catch-up: wait until it has moved 100 entries past this step (or has
                    // stopped, which fails the scenario below).
                    if first_target.is_none() && s.step == 0 {
                        let want = (seen.load(Ordering::Acquire) + 100).min(WRITES);
                        while seen.load(Ordering::Acquire) < want
                            && !writer_exited.load(Ordering::Acquire)
                        {
                            thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }
                })
                .execute(&mut io)
                .map_err(|e| format!("catch-up round {rounds}: {e}"))?;
            tally.add(&report);
            ensure(report.target == target, || "target moved".into())?;
            ensure(to_engine(replica_vol.status().head) == target, || {
                format!(
                    "replica at {} after a catch-up frozen at {target}",
                    replica_vol.status().head
                )
            })?;
            if first_target.is_none() {
                first_target = Some((target, Lsn(written.load(Ordering::Acquire))));
            }
            ensure(state_of(&driver, "r1")? == ReplicaState::InSync, || {
                "not in sync after a round".into()
            })?;
            if writer_done && target == to_engine(primary.status().head) {
                return Ok(());
            }
        }
    })();
    stop.store(true, Ordering::Relaxed);
    let final_head = writer.join().map_err(|_| "writer panicked".to_string())??;
    result?;
    let (t0, head_then) = first_target.ok_or("no catch-up ran")?;
    ensure(head_then > t0, || {
        format!("the writer did not move past the frozen target {t0} during the first round")
    })?;
    ensure(primary.status().pins_outstanding == 0, || {
        "pins left".into()
    })?;
    let want = super::oracle_digest(final_head, BLOCKS, BLOCK_SIZE);
    let m = digest(&primary, "primary")? == want && digest(&replica_vol, "replica")? == want;
    ensure(m, || {
        "replica digest differs after the writer stopped".into()
    })?;
    // However the rounds fell, the catch-ups shipped (0, final head] once, in order: each round
    // starts at the replica's head, where the last one stopped.
    let moved = Moved::exact(final_head, final_head * wal_entry_bytes(BLOCK_SIZE));
    Ok(tally.report(
        "recovery_with_concurrent_writer",
        &format!("frozen at {t0}, chased to {final_head} in {rounds} rounds"),
        primary.status().pins_outstanding,
        m,
        &moved,
    ))
}
