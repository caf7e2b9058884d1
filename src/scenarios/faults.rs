//! Failure replays on real volume files: an epoch bump at every chunk boundary of a catch-up
//! and of both kinds of rebuild, the WAL recycled under a catch-up, a cancel mid-execution, and
//! a replica crash in the middle of a base install.

use std::sync::Arc;

use blockvol::EntryInfo;
use engine::conformance::{Harness, ScenarioReport, replica_id};
use engine::{
    CatchUpExecutor, Epoch, ExecFailure, Lsn, Outcome, RebuildExecutor, RecoveryDriver,
    RecoveryPlan, ReplicaState, SessionKind, StepInfo, TransferError,
};
use v2bridge::harness::{BlockVolHarness, HARNESS_BLOCK_SIZE, HARNESS_BLOCKS};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    BridgeIo, HandshakeReply, Lineage, LocalReplica, ReplicaTarget, TargetError, TruncateRequest,
};

use super::{
    Bound, Moved, Tally, assign, chunked, ensure, expect_failure, image_bytes, state_of,
    wal_entry_bytes,
};

const BASE_CHUNK: u64 = 64 << 10;

/// Wire bytes of one harness WAL entry (header + one block).
fn entry_bytes() -> u64 {
    wal_entry_bytes(HARNESS_BLOCK_SIZE)
}

/// Bytes of the base image of a harness primary after the writes `1..=lsn`.
fn image(lsn: u64) -> u64 {
    image_bytes(lsn, HARNESS_BLOCKS, HARNESS_BLOCK_SIZE)
}

/// Brings `name` back to in sync at `epoch` whatever state a fault left it in: handshake and
/// catch-up when its log allows, otherwise a rebuild assignment and a rebuild.
fn recover_fully(
    h: &mut BlockVolHarness,
    driver: &RecoveryDriver,
    tally: &mut Tally,
    name: &str,
    epoch: u64,
) -> Result<(), String> {
    assign(driver, epoch, &[(name, SessionKind::CatchUp)])?;
    let hs = h.replica_handshake(name)?;
    let plan = driver
        .plan_recovery(&replica_id(name), hs)
        .map_err(|e| format!("plan after the fault: {e}"))?;
    match plan.outcome() {
        Outcome::ZeroGap => tally.add_path("zero_gap"),
        Outcome::CatchUp => {
            let sid = plan.session_id().ok_or("catch-up plan without session")?;
            let mut io = h.io(name, Epoch(epoch), sid)?;
            let r = CatchUpExecutor::new(driver, plan)
                .with_options(chunked(16, BASE_CHUNK))
                .execute(&mut io)
                .map_err(|e| format!("catch-up after the fault: {e}"))?;
            tally.add(&r);
        }
        Outcome::NeedsRebuild => {
            assign(driver, epoch, &[(name, SessionKind::Rebuild)])?;
            let plan = driver
                .plan_rebuild(&replica_id(name))
                .map_err(|e| format!("plan_rebuild after the fault: {e}"))?;
            let sid = plan.session_id().ok_or("rebuild plan without session")?;
            let mut io = h.io(name, Epoch(epoch), sid)?;
            let r = RebuildExecutor::new(driver, plan)
                .with_options(chunked(16, BASE_CHUNK))
                .execute(&mut io)
                .map_err(|e| format!("rebuild after the fault: {e}"))?;
            tally.add(&r);
        }
    }
    ensure(state_of(driver, name)? == ReplicaState::InSync, || {
        format!("{name} not in sync after recovery")
    })
}

fn no_pins(h: &BlockVolHarness, when: &str) -> Result<(), String> {
    let n = h.pins_outstanding();
    ensure(n == 0, || format!("{n} pins held {when}"))
}

/// Never in sync with different bytes: whenever the sender says in sync, the data must match.
fn never_in_sync_with_other_bytes(
    h: &mut BlockVolHarness,
    driver: &RecoveryDriver,
    name: &str,
    target: Lsn,
) -> Result<(), String> {
    if state_of(driver, name)? == ReplicaState::InSync {
        ensure(h.replica_matches_primary(name, target)?, || {
            format!("{name} is in sync with bytes that differ from the primary's")
        })?;
    }
    Ok(())
}

/// A primary with 100 committed entries, replica `r1` at `prefix`, an optional checkpoint
/// `(checkpoint, tail)`, and a planned catch-up of `r1` with its I/O.
struct CatchUpSetup {
    h: BlockVolHarness,
    driver: RecoveryDriver,
    head: Lsn,
    plan: RecoveryPlan,
    io: BridgeIo<LocalReplica>,
}

fn catch_up_setup(prefix: u64, checkpoint: Option<(u64, u64)>) -> Result<CatchUpSetup, String> {
    let mut h = super::harness()?;
    let head = h.primary_write(100)?;
    h.primary_commit(head)?;
    h.add_replica("r1", Lsn(prefix))?;
    if let Some((cp, tail)) = checkpoint {
        h.primary_checkpoint(Lsn(cp), Lsn(tail))?;
    }
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, &[("r1", SessionKind::CatchUp)])?;
    let hs = h.replica_handshake("r1")?;
    let plan = driver
        .plan_recovery(&replica_id("r1"), hs)
        .map_err(|e| e.to_string())?;
    ensure(plan.outcome() == Outcome::CatchUp, || {
        format!("planned {} instead of a catch-up", plan.outcome())
    })?;
    let sid = plan.session_id().ok_or("catch-up plan without session")?;
    let io = h.io("r1", Epoch(1), sid)?;
    Ok(CatchUpSetup {
        h,
        driver,
        head,
        plan,
        io,
    })
}

/// An epoch bump after every chunk of a catch-up, in turn: each is caught before the next chunk
/// moves data, every pin is released, and a recovery at the new epoch completes with equal
/// bytes.
pub fn epoch_bump_every_chunk_catch_up() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let mut all_match = true;
    let mut pins = 0;
    // 60 entries in chunks of 10: steps 0 to 5.
    for k in 0u64..6 {
        let CatchUpSetup {
            mut h,
            driver,
            head,
            plan,
            mut io,
        } = catch_up_setup(40, None)?;
        let orch = Arc::clone(driver.orchestrator());
        let result = CatchUpExecutor::new(&driver, plan)
            .with_options(chunked(10, BASE_CHUNK))
            .with_on_step(|s: &StepInfo| {
                if s.step == k {
                    orch.advance_epoch(Epoch(2));
                }
            })
            .execute(&mut io);
        let (failure, report) = expect_failure(result)?;
        ensure(
            matches!(failure, ExecFailure::SessionInvalidatedMidExecution { step, .. } if step == k),
            || format!("bump after step {k}: failure {failure}"),
        )?;
        ensure(report.entries_applied == 10 * (k + 1), || {
            format!(
                "bump after step {k}: {} entries applied, the next chunk ran",
                report.entries_applied
            )
        })?;
        ensure(io.stats.wal_chunks == k + 1, || {
            format!(
                "bump after step {k}: {} chunks shipped",
                io.stats.wal_chunks
            )
        })?;
        tally.add(&report);
        drop(io);
        no_pins(&h, "after the bump")?;
        ensure(state_of(&driver, "r1")? != ReplicaState::InSync, || {
            "in sync after a fenced catch-up".into()
        })?;
        recover_fully(&mut h, &driver, &mut tally, "r1", 2)?;
        never_in_sync_with_other_bytes(&mut h, &driver, "r1", head)?;
        no_pins(&h, "after recovery")?;
        all_match &= h.replica_matches_primary("r1", head)?;
        pins += h.pins_outstanding();
    }
    ensure(all_match, || "a replica's bytes differ".into())?;
    // Each of the six runs moves exactly the 60 entries (40, 100]: the fenced attempt's
    // 10 * (k + 1), then the recovery's rest (nothing is shipped twice, no base).
    let moved = Moved::exact(6 * 60, 6 * 60 * entry_bytes());
    Ok(tally.report(
        "epoch_bump_every_chunk_catch_up",
        "6 bumps fenced -> in_sync",
        pins,
        all_match,
        &moved,
    ))
}

/// Runs one rebuild with an epoch bump after step `bump` (or none) and checks what the run
/// moved; returns the steps the executor took, whether the data matched, and what the run had
/// to move.
fn rebuild_with_bump(
    snapshot: bool,
    bump: Option<u64>,
    tally: &mut Tally,
) -> Result<(u64, bool, Moved), String> {
    let moved_before = tally.totals();
    let mut h = super::harness()?;
    let head = h.primary_write(100)?;
    h.primary_commit(head)?;
    h.add_replica("r1", Lsn(0))?;
    if snapshot {
        h.primary_checkpoint(Lsn(50), Lsn(50))?;
    }
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, &[("r1", SessionKind::Rebuild)])?;
    let plan = driver
        .plan_rebuild(&replica_id("r1"))
        .map_err(|e| e.to_string())?;
    let sid = plan.session_id().ok_or("no session")?;
    let mut io = h.io("r1", Epoch(1), sid)?;
    let orch = Arc::clone(driver.orchestrator());
    let mut steps = 0u64;
    let result = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(10, BASE_CHUNK))
        .with_on_step(|s: &StepInfo| {
            steps = s.step + 1;
            if Some(s.step) == bump {
                orch.advance_epoch(Epoch(2));
            }
        })
        .execute(&mut io);
    drop(io);
    match bump {
        None => {
            let r = result.map_err(|e| format!("rebuild without a bump: {e}"))?;
            let want = if snapshot {
                "rebuild_snapshot_tail"
            } else {
                "rebuild_full_base"
            };
            ensure(r.path.as_str() == want, || format!("path {}", r.path))?;
            tally.add(&r);
        }
        Some(k) => {
            let (failure, report) = expect_failure(result)?;
            ensure(
                matches!(failure, ExecFailure::SessionInvalidatedMidExecution { step, .. } if step == k),
                || format!("bump after rebuild step {k}: failure {failure}"),
            )?;
            tally.add(&report);
            no_pins(&h, "after the bump")?;
            ensure(
                state_of(&driver, "r1")? == ReplicaState::NeedsRebuild,
                || format!("bump after rebuild step {k}: replica not needs_rebuild"),
            )?;
            recover_fully(&mut h, &driver, tally, "r1", 2)?;
        }
    }
    never_in_sync_with_other_bytes(&mut h, &driver, "r1", head)?;
    no_pins(&h, "after the rebuild")?;
    let matched = h.replica_matches_primary("r1", head)?;
    let (entries_before, bytes_before) = moved_before;
    let (entries_after, bytes_after) = tally.totals();
    let moved = rebuild_run_moved(snapshot, bump);
    moved.check(
        &format!("rebuild (snapshot {snapshot}, bump after step {bump:?})"),
        entries_after - entries_before,
        bytes_after - bytes_before,
    )?;
    Ok((steps, matched, moved))
}

/// What one run of [`rebuild_with_bump`] moves. Every run ends with the replica holding one
/// whole image and its tail, moved once: the image at 100 for a full base (the full-base pin
/// flushes the primary to committed, so a recovery rebuild's image is at 100 too), the
/// checkpoint image at 50 and the 50-entry tail for snapshot + tail. A bump after the install
/// leaves only the rest of the tail to a catch-up (or nothing: zero gap), so the total is the
/// same; a bump during the base transfer wastes the chunks sent before it, which the recovery
/// sends again.
fn rebuild_run_moved(snapshot: bool, bump: Option<u64>) -> Moved {
    let (base_lsn, tail) = if snapshot { (50, 50) } else { (100, 0) };
    let once = image(base_lsn) + tail * entry_bytes();
    let bytes = match bump {
        None => Bound::Exact(once),
        Some(k) => Bound::Between {
            min: once,
            max: once + ((k + 1) * BASE_CHUNK).min(image(base_lsn)),
            why: format!(
                "a bump after step k stops the first transfer after at most k + 1 base chunks \
                 of at most {BASE_CHUNK} bytes, which the recovery sends again; how many bytes \
                 those chunks held depends on the image reader's chunking"
            ),
        },
    };
    Moved {
        entries: Bound::Exact(tail),
        bytes,
    }
}

/// An epoch bump after every step of a full-base rebuild and of a snapshot + tail rebuild
/// (base chunks, install, tail chunks), in turn.
pub fn epoch_bump_every_chunk_rebuild() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let mut all_match = true;
    let mut bumps = 0;
    let mut moved = Moved::exact(0, 0);
    for snapshot in [false, true] {
        let (steps, m, run) = rebuild_with_bump(snapshot, None, &mut tally)?;
        all_match &= m;
        moved = moved.plus(&run);
        ensure(steps >= 3, || format!("only {steps} rebuild steps"))?;
        for k in 0..steps {
            let (_, m, run) = rebuild_with_bump(snapshot, Some(k), &mut tally)?;
            all_match &= m;
            moved = moved.plus(&run);
            bumps += 1;
        }
    }
    ensure(all_match, || "a replica's bytes differ".into())?;
    Ok(tally.report(
        "epoch_bump_every_chunk_rebuild",
        &format!("{bumps} bumps fenced -> in_sync"),
        0,
        all_match,
        &moved,
    ))
}

/// The primary recycles the WAL under a catch-up (its pins revoked under pressure): the next
/// chunk reports the range recycled, the executor escalates to rebuild, and the rebuild
/// completes.
pub fn wal_recycled_under_catch_up() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let CatchUpSetup {
        mut h,
        driver,
        head,
        plan,
        mut io,
    } = catch_up_setup(20, Some((30, 10)))?;
    let primary = Arc::clone(h.primary());
    let mut recycled = Ok(());
    let result = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(10, BASE_CHUNK))
        .with_on_step(|s: &StepInfo| {
            if s.step == 0 {
                let revoked = primary.revoke_wal_pins("wal pressure");
                primary.set_retention(blockvol::RetentionPolicy::default());
                recycled = match primary.force_flush() {
                    Ok(_) if primary.status().tail.0 >= 90 && revoked > 0 => Ok(()),
                    Ok(_) => Err(format!(
                        "primary did not recycle: tail {} after revoking {revoked} pins",
                        primary.status().tail
                    )),
                    Err(e) => Err(e.to_string()),
                };
            }
        })
        .execute(&mut io);
    drop(io);
    recycled?;
    let (failure, report) = expect_failure(result)?;
    ensure(
        matches!(
            failure,
            ExecFailure::IoStreamFailed {
                error: TransferError::Recycled { .. },
                ..
            }
        ),
        || format!("failure {failure} is not a recycled range"),
    )?;
    tally.add(&report);
    ensure(
        state_of(&driver, "r1")? == ReplicaState::NeedsRebuild,
        || "not escalated to needs_rebuild".into(),
    )?;
    no_pins(&h, "after the escalation")?;
    recover_fully(&mut h, &driver, &mut tally, "r1", 1)?;
    no_pins(&h, "after the rebuild")?;
    let m = h.replica_matches_primary("r1", head)?;
    ensure(m, || "replica differs after the rebuild".into())?;
    // The first chunk (20, 30] was applied before the recycle. The forced flush moved the
    // checkpoint to committed (100), so the rebuild sends the image at 100 and no tail.
    let moved = Moved::exact(10, 10 * entry_bytes() + image(100));
    Ok(tally.report(
        "wal_recycled_under_catch_up",
        "recycled -> needs_rebuild -> in_sync",
        h.pins_outstanding(),
        m,
        &moved,
    ))
}

/// A cancel while the executor runs: it stops at its next authority check, releases its pins,
/// and a later recovery completes.
pub fn cancel_mid_execution() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let CatchUpSetup {
        mut h,
        driver,
        head,
        plan,
        mut io,
    } = catch_up_setup(30, None)?;
    let d = &driver;
    let mut cancelled = false;
    let result = CatchUpExecutor::new(&driver, plan)
        .with_options(chunked(10, BASE_CHUNK))
        .with_on_step(|s: &StepInfo| {
            if s.step == 1 {
                cancelled = d.cancel_session(&replica_id("r1"), s.session_id, "operator");
            }
        })
        .execute(&mut io);
    drop(io);
    ensure(cancelled, || {
        "cancel_session did not find the session".into()
    })?;
    let (failure, report) = expect_failure(result)?;
    ensure(
        matches!(
            failure,
            ExecFailure::SessionInvalidatedMidExecution { step: 1, .. }
        ),
        || format!("failure {failure}"),
    )?;
    ensure(report.entries_applied == 20, || {
        format!(
            "{} entries applied after the cancel",
            report.entries_applied
        )
    })?;
    tally.add(&report);
    no_pins(&h, "after the cancel")?;
    ensure(
        state_of(&driver, "r1")? == ReplicaState::Disconnected,
        || "not disconnected after the cancel".into(),
    )?;
    ensure(
        driver.orchestrator().log().contains("plan_cancelled"),
        || "plan_cancelled not logged".into(),
    )?;
    recover_fully(&mut h, &driver, &mut tally, "r1", 1)?;
    let m = h.replica_matches_primary("r1", head)?;
    ensure(m, || "replica differs".into())?;
    // (30, 100] once: 20 entries before the cancel, the other 50 by the recovery.
    let moved = Moved::exact(70, 70 * entry_bytes());
    Ok(tally.report(
        "cancel_mid_execution",
        "cancelled -> in_sync",
        h.pins_outstanding(),
        m,
        &moved,
    ))
}

/// Base chunk size of the rebuild the replica crashes in.
const CRASH_BASE_CHUNK: u64 = 16 << 10;

/// A replica that dies after `chunks_before_crash` base chunks.
struct CrashAfter {
    inner: LocalReplica,
    chunks_left: u32,
}

impl ReplicaTarget for CrashAfter {
    fn handshake(&mut self) -> Result<HandshakeReply, TargetError> {
        self.inner.handshake()
    }
    fn apply(&mut self, req: ApplyRequest) -> Result<ApplyReply, TargetError> {
        self.inner.apply(req)
    }
    fn truncate(&mut self, req: TruncateRequest) -> Result<EntryInfo, TargetError> {
        self.inner.truncate(req)
    }
    fn begin_base(&mut self, req: BaseBeginRequest) -> Result<blockvol::Lba, TargetError> {
        self.inner.begin_base(req)
    }
    fn base_chunk(&mut self, req: BaseChunkRequest) -> Result<(), TargetError> {
        if self.chunks_left == 0 {
            return Err(TargetError::Storage("replica process died".into()));
        }
        self.chunks_left -= 1;
        self.inner.base_chunk(req)
    }
    fn finish_base(&mut self, lineage: Lineage) -> Result<blockvol::Lsn, TargetError> {
        self.inner.finish_base(lineage)
    }
    fn barrier(&mut self, req: BarrierRequest) -> Result<BarrierReply, TargetError> {
        self.inner.barrier(req)
    }
}

/// The replica dies in the middle of a base install and is reopened from its file: it must not
/// look valid (install incomplete, handshake says so, the engine sends it to rebuild), and the
/// rebuild that follows completes.
pub fn replica_crash_mid_base_install() -> Result<ScenarioReport, String> {
    let mut tally = Tally::default();
    let mut h = super::harness()?;
    let head = h.primary_write(100)?;
    h.primary_commit(head)?;
    h.add_replica("r1", Lsn(0))?;
    let driver = RecoveryDriver::new(h.storage());
    assign(&driver, 1, &[("r1", SessionKind::Rebuild)])?;
    let plan = driver
        .plan_rebuild(&replica_id("r1"))
        .map_err(|e| e.to_string())?;
    let sid = plan.session_id().ok_or("no session")?;
    let target = CrashAfter {
        inner: h.replica("r1")?.clone(),
        chunks_left: 2,
    };
    let mut io = BridgeIo::new(
        Arc::clone(h.storage_adapter()),
        target,
        Lineage::new("harness-primary", blockvol::Epoch(1), sid.get()),
        head,
    );
    let result = RebuildExecutor::new(&driver, plan)
        .with_options(chunked(10, CRASH_BASE_CHUNK))
        .execute(&mut io);
    let sent = io.stats.base_chunks;
    drop(io);
    let (failure, report) = expect_failure(result)?;
    ensure(matches!(failure, ExecFailure::IoBaseFailed(_)), || {
        format!("failure {failure}")
    })?;
    ensure(sent == 2, || {
        format!("{sent} chunks arrived before the crash")
    })?;
    tally.add(&report);
    no_pins(&h, "after the crash")?;

    h.crash_replica("r1")?;
    let st = h.replica("r1")?.volume().status();
    ensure(st.install_incomplete && !st.checkpoint_trusted, || {
        format!("reopened replica looks valid: {st:?}")
    })?;
    ensure(!h.replica_matches_primary("r1", head)?, || {
        "a half-installed replica matched".into()
    })?;
    let hs = h.replica_handshake("r1")?;
    ensure(hs.is_incomplete(), || {
        "handshake hides the incomplete install".into()
    })?;
    assign(&driver, 1, &[("r1", SessionKind::CatchUp)])?;
    let plan = driver
        .plan_recovery(&replica_id("r1"), hs)
        .map_err(|e| e.to_string())?;
    let reason = plan.proof().map(|p| p.reason.name()).unwrap_or("");
    ensure(
        plan.outcome() == Outcome::NeedsRebuild && reason == "replica_incomplete",
        || {
            format!(
                "half-installed replica planned as {} ({reason})",
                plan.outcome()
            )
        },
    )?;
    drop(plan);
    recover_fully(&mut h, &driver, &mut tally, "r1", 1)?;
    let m = h.replica_matches_primary("r1", head)?;
    ensure(m, || "replica differs after the rebuild".into())?;
    // The recovery sends the whole image at 100 (the base pin flushed the primary to
    // committed); before the crash two base chunks arrived, each at least one block and at
    // most one 16 KiB chunk.
    let moved = Moved {
        entries: Bound::Exact(0),
        bytes: Bound::Between {
            min: image(100) + 2 * u64::from(HARNESS_BLOCK_SIZE),
            max: image(100) + 2 * CRASH_BASE_CHUNK,
            why: "two chunks arrived before the crash; how many blocks each held depends \
                      on the image reader's chunking"
                .into(),
        },
    };
    Ok(tally.report(
        "replica_crash_mid_base_install",
        "crashed -> incomplete -> rebuilt",
        h.pins_outstanding(),
        m,
        &moved,
    ))
}
