//! Executors: run a plan to completion through I/O traits, stepwise.
//!
//! Each executor owns its plan, and with it the plan's pins. Transfers happen in bounded
//! chunks. After every chunk the executor records the progress the I/O actually reported
//! (validated against the range it asked for), checks the budget, calls the `on_step` hook, and
//! re-checks the session's authority, so an epoch bump or a cancel done inside the hook (or
//! from another thread) stops the executor before the next chunk moves any data. Truncation is
//! executed through the I/O, and completion waits for a durability barrier that reports the
//! replica's durable LSN.
//!
//! Any failure releases every pin, logs `exec_resources_released` with the reason, and
//! invalidates the session (unless someone else already did), so no session ever keeps running
//! without its resources. The replica ends `needs_rebuild` when the failure means catch-up
//! cannot work on this lineage (budget, recycled or damaged WAL, divergence, a failed rebuild)
//! and `disconnected` otherwise.

use crate::adapter::PinId;
use crate::driver::{PlanStep, RecoveryDriver, RecoveryPlan};
use crate::error::{EngineError, Result, TransferError};
use crate::history::EntryId;
use crate::observe::Event;
use crate::outcome::Outcome;
use crate::rebuild::RebuildSource;
pub use crate::report::{ExecFailure, ExecutionReport, RecoveryPath};
use crate::sender::Sender;
use crate::session::InvalidateReason;
use crate::types::{Demotion, Lsn, ReplicaState, SessionId, Tick};

/// What one WAL chunk did on the replica.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WalChunk {
    /// The replica's last applied LSN after the chunk.
    pub applied_to: Lsn,
    /// Entries applied by this chunk.
    pub entries: u64,
    /// Bytes moved by this chunk.
    pub bytes: u64,
}

/// The data-transfer operations a catch-up needs. Implementations move real data to the
/// replica and report what the replica actually did.
pub trait CatchUpIo {
    /// Drops every replica entry after `lsn` and returns the identity of the replica's last
    /// entry afterwards (its new tip).
    fn truncate_after(&mut self, lsn: Lsn) -> std::result::Result<EntryId, TransferError>;

    /// Ships the entries `(after, ..]`, at most `max_entries` of them and none past `up_to`,
    /// and applies them on the replica in order. Returns what was applied.
    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        up_to: Lsn,
        max_entries: u64,
    ) -> std::result::Result<WalChunk, TransferError>;

    /// Makes everything the replica holds durable and returns its durable LSN.
    fn barrier(&mut self, target: Lsn) -> std::result::Result<Lsn, TransferError>;
}

/// Which base image a rebuild installs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BaseRequest {
    /// Snapshot + tail or full base.
    pub source: RebuildSource,
    /// The LSN the image represents.
    pub lsn: Lsn,
    /// The storage pin that keeps the image alive.
    pub pin_id: PinId,
}

/// What one base chunk did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BaseChunkProgress {
    /// Bytes of the image covered by this chunk (sent or known to be zero).
    pub bytes: u64,
    /// Bytes actually sent over the wire for this chunk.
    pub bytes_sent: u64,
    /// True when the image is fully transferred.
    pub done: bool,
}

/// The data-transfer operations a rebuild needs, on top of the catch-up ones (used for the
/// tail after a snapshot, and for the barrier).
pub trait RebuildIo: CatchUpIo {
    /// Starts installing the image on the replica; returns the image size in bytes.
    fn begin_base(&mut self, base: &BaseRequest) -> std::result::Result<u64, TransferError>;

    /// Transfers the next chunk of at most `max_bytes` of the image.
    fn transfer_base_chunk(
        &mut self,
        max_bytes: u64,
    ) -> std::result::Result<BaseChunkProgress, TransferError>;

    /// Finishes the install; returns the base LSN the replica now holds.
    fn finish_base(&mut self) -> std::result::Result<Lsn, TransferError>;
}

/// Where an executor is, as seen by the `on_step` hook.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// The truncation ran.
    Truncate,
    /// A WAL chunk of a catch-up was applied.
    CatchUpChunk,
    /// A base chunk was transferred.
    BaseChunk,
    /// The base was installed.
    BaseInstalled,
    /// A WAL chunk of a rebuild tail was applied.
    TailChunk,
}

/// What the `on_step` hook sees after each step.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StepInfo {
    /// Step index, from 0.
    pub step: u64,
    /// What the step did.
    pub kind: StepKind,
    /// The replica's LSN after the step (for base chunks, the base's LSN).
    pub lsn: Lsn,
    /// The session the executor runs for.
    pub session_id: SessionId,
    /// Tick of the step.
    pub tick: Tick,
}

/// Tunables for the executors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ExecutorOptions {
    /// Most WAL entries per chunk.
    pub max_entries_per_chunk: u64,
    /// Most base-image bytes per chunk.
    pub max_base_chunk_bytes: u64,
    /// Tick at which the executor starts; without a clock, step `i` runs at
    /// `start_tick + i + 1`.
    pub start_tick: Tick,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        ExecutorOptions {
            max_entries_per_chunk: 1024,
            max_base_chunk_bytes: 4 << 20,
            start_tick: Tick(0),
        }
    }
}

type StepHook<'a> = Box<dyn FnMut(&StepInfo) + 'a>;
type Clock<'a> = Box<dyn FnMut() -> Tick + 'a>;

/// State shared by both executors.
struct Run<'a> {
    driver: &'a RecoveryDriver,
    plan: RecoveryPlan,
    opts: ExecutorOptions,
    on_step: Option<StepHook<'a>>,
    clock: Option<Clock<'a>>,
    report: ExecutionReport,
}

impl<'a> Run<'a> {
    fn new(
        driver: &'a RecoveryDriver,
        plan: RecoveryPlan,
        path: RecoveryPath,
        target: Lsn,
    ) -> Self {
        let mut plan = plan;
        // Dropped unfinished from here on (a panic unwinding through the executor, or an
        // executor never run), the plan fences its session as aborted.
        plan.set_drop_reason(InvalidateReason::ExecutorAborted);
        let report = ExecutionReport::new(
            plan.replica_id().clone(),
            plan.session_id(),
            path,
            target,
            plan.pins_held(),
        );
        Run {
            driver,
            plan,
            opts: ExecutorOptions::default(),
            on_step: None,
            clock: None,
            report,
        }
    }

    /// Releases the pins (no release event: nothing went wrong) and logs completion.
    fn succeed(mut self, event: Event, sender: &Sender) -> ExecutionReport {
        self.plan.disarm();
        self.plan.release_pins();
        self.log(event);
        self.report.final_state = sender.state();
        self.report
    }

    fn tick(&mut self) -> Tick {
        match self.clock.as_mut() {
            Some(c) => c(),
            None => self.opts.start_tick.plus(self.report.steps + 1),
        }
    }

    /// The tick the budget clock starts at: the clock's reading when there is a clock (so
    /// elapsed times are measured on one clock), the configured start tick otherwise.
    fn start_tick(&mut self) -> Tick {
        match self.clock.as_mut() {
            Some(c) => c(),
            None => self.opts.start_tick,
        }
    }

    /// Adds a count the I/O reported to a running total, refusing a sum that overflows.
    fn add_reported(
        step: u64,
        total: &mut u64,
        add: u64,
        what: &str,
    ) -> std::result::Result<(), ExecFailure> {
        *total = total
            .checked_add(add)
            .ok_or_else(|| ExecFailure::IoProtocol {
                step,
                detail: format!("{what} overflow: {total} + {add}"),
            })?;
        Ok(())
    }

    fn log(&self, event: Event) {
        self.driver.orchestrator().log().record(
            self.plan.replica_id(),
            self.plan.session_id(),
            event,
        );
    }

    /// Releases every pin, logs the reason, invalidates the session if it is still this
    /// plan's, and builds the error.
    fn fail(mut self, failure: ExecFailure) -> EngineError {
        self.plan.disarm();
        self.plan.release_pins();
        self.log(Event::ExecResourcesReleased {
            reason: failure.to_string(),
        });
        let target = if failure.requires_rebuild() || self.is_rebuild() {
            Demotion::NeedsRebuild
        } else {
            Demotion::Disconnected
        };
        let orch = self.driver.orchestrator();
        if let (Some(sid), Ok(sender)) =
            (self.plan.session_id(), orch.sender(self.plan.replica_id()))
        {
            if let Some(inv) = sender.invalidate_session_if(
                sid,
                InvalidateReason::ExecutionFailed(failure.to_string()),
                target,
            ) {
                orch.log_invalidation(&inv);
            }
            self.report.final_state = sender.state();
        }
        EngineError::ExecutionFailed {
            replica: self.plan.replica_id().clone(),
            failure: Box::new(failure),
            report: Box::new(self.report),
        }
    }

    fn is_rebuild(&self) -> bool {
        self.plan.outcome() == Outcome::NeedsRebuild
    }

    /// Calls the hook and re-checks authority; the step counter advances.
    fn after_step(
        &mut self,
        sender: &Sender,
        sid: SessionId,
        kind: StepKind,
        lsn: Lsn,
        tick: Tick,
    ) -> std::result::Result<(), ExecFailure> {
        let info = StepInfo {
            step: self.report.steps,
            kind,
            lsn,
            session_id: sid,
            tick,
        };
        if let Some(hook) = self.on_step.as_mut() {
            hook(&info);
        }
        self.report.steps += 1;
        sender
            .check_authority(sid)
            .map_err(|error| ExecFailure::SessionInvalidatedMidExecution {
                step: info.step,
                error,
            })
    }

    /// Ships `(from, target]` in chunks; `tail` selects the rebuild-tail bookkeeping.
    fn stream(
        &mut self,
        io: &mut dyn CatchUpIo,
        sender: &Sender,
        sid: SessionId,
        from: Lsn,
        target: Lsn,
        tail: bool,
    ) -> std::result::Result<(), ExecFailure> {
        let mut recovered = from;
        let max_entries = self.opts.max_entries_per_chunk.max(1);
        while recovered < target {
            let step = self.report.steps;
            let chunk = io
                .stream_wal_chunk(recovered, target, max_entries)
                .map_err(|error| {
                    if tail {
                        ExecFailure::IoTailReplayFailed { step, error }
                    } else {
                        ExecFailure::IoStreamFailed { step, error }
                    }
                })?;
            // The tick at which the chunk's progress became known: a chunk that took longer
            // than the progress deadline is a stall even though it moved data in the end.
            let tick = self.tick();
            Self::check_wal_chunk(step, &chunk, recovered, target, max_entries)?;
            // The replica applied the chunk: the report says so whatever follows.
            Self::add_reported(
                step,
                &mut self.report.entries_applied,
                chunk.entries,
                "entry count",
            )?;
            Self::add_reported(step, &mut self.report.wal_bytes, chunk.bytes, "byte count")?;
            if !tail {
                // Before the progress is recorded, so the time since the last progress is
                // what this chunk took.
                self.check_budget(sender, sid, tick)?;
            }
            if tail {
                sender
                    .record_rebuild_tail_progress(sid, chunk.applied_to)
                    .map_err(ExecFailure::TailProgressFailed)?;
            } else {
                sender
                    .record_catch_up_progress(sid, chunk.applied_to, Some(tick))
                    .map_err(|error| ExecFailure::ProgressAfterIo { step, error })?;
                // Again after: the entries this chunk replayed count against the budget.
                self.check_budget(sender, sid, tick)?;
            }
            recovered = chunk.applied_to;
            let kind = if tail {
                StepKind::TailChunk
            } else {
                StepKind::CatchUpChunk
            };
            self.after_step(sender, sid, kind, recovered, tick)?;
        }
        Ok(())
    }

    /// Validates a WAL chunk's report against what was asked: progress, not past the target,
    /// at most the chunk size, and an entry count equal to the LSN advance.
    fn check_wal_chunk(
        step: u64,
        chunk: &WalChunk,
        recovered: Lsn,
        target: Lsn,
        max_entries: u64,
    ) -> std::result::Result<(), ExecFailure> {
        let protocol = |detail: String| Err(ExecFailure::IoProtocol { step, detail });
        if chunk.applied_to <= recovered {
            return protocol(format!(
                "no progress: asked for ({recovered}, {target}], replica still at {}",
                chunk.applied_to
            ));
        }
        if chunk.applied_to > target {
            return protocol(format!(
                "applied to {} past the target: asked for ({recovered}, {target}]",
                chunk.applied_to
            ));
        }
        let delta = recovered.distance_to(chunk.applied_to);
        if delta > max_entries {
            return protocol(format!(
                "chunk of {delta} entries ({recovered} -> {}) exceeds the maximum of {max_entries}",
                chunk.applied_to
            ));
        }
        if chunk.entries != delta {
            return protocol(format!(
                "reported {} entries for an LSN advance of {delta} ({recovered} -> {})",
                chunk.entries, chunk.applied_to
            ));
        }
        Ok(())
    }

    fn check_budget(
        &self,
        sender: &Sender,
        sid: SessionId,
        tick: Tick,
    ) -> std::result::Result<(), ExecFailure> {
        match sender.check_budget(sid, tick) {
            Err(e) => Err(ExecFailure::BudgetCheckFailed(e)),
            Ok(Some(v)) => {
                self.log(Event::BudgetEscalated { violation: v });
                Err(ExecFailure::BudgetEscalated(v))
            }
            Ok(None) => Ok(()),
        }
    }

    /// Barrier, then the caller's completion.
    fn barrier(
        &mut self,
        io: &mut dyn CatchUpIo,
        sender: &Sender,
        sid: SessionId,
        target: Lsn,
    ) -> std::result::Result<(), ExecFailure> {
        let durable = io.barrier(target).map_err(ExecFailure::BarrierFailed)?;
        sender
            .record_barrier(sid, durable)
            .map_err(ExecFailure::BarrierRejected)?;
        self.report.durable_lsn = Some(durable);
        self.log(Event::ExecBarrier { durable });
        Ok(())
    }
}

/// The builder methods both executors share.
macro_rules! executor_builders {
    () => {
        /// Sets the tunables.
        pub fn with_options(mut self, opts: ExecutorOptions) -> Self {
            self.run.opts = opts;
            self
        }

        /// Calls `hook` after each step, before the authority re-check (deterministic fault
        /// injection: an epoch bump here is caught before the next chunk moves data).
        pub fn with_on_step(mut self, hook: impl FnMut(&StepInfo) + 'a) -> Self {
            self.run.on_step = Some(Box::new(hook));
            self
        }

        /// Reads ticks from `clock` instead of synthesising `start_tick + step + 1`.
        pub fn with_clock(mut self, clock: impl FnMut() -> Tick + 'a) -> Self {
            self.run.clock = Some(Box::new(clock));
            self
        }

        /// Pins the plan holds now.
        pub fn pins_held(&self) -> usize {
            self.run.plan.pins_held()
        }

        /// Abandons the plan: releases its pins (logging `cancelled: <reason>`) and
        /// invalidates its session.
        pub fn cancel(self, reason: &str) -> EngineError {
            self.run.fail(ExecFailure::Cancelled(reason.to_owned()))
        }
    };
}

/// Runs a catch-up plan (WAL replay, or truncation of an uncommitted tail).
pub struct CatchUpExecutor<'a> {
    run: Run<'a>,
}

impl<'a> CatchUpExecutor<'a> {
    /// An executor that takes ownership of `plan` and its pins.
    pub fn new(driver: &'a RecoveryDriver, plan: RecoveryPlan) -> Self {
        let path = match plan.step() {
            PlanStep::InSync => RecoveryPath::ZeroGap,
            PlanStep::Truncate(_) => RecoveryPath::TruncateOnly,
            _ => RecoveryPath::CatchUp,
        };
        let target = plan.target().unwrap_or(Lsn::ZERO);
        CatchUpExecutor {
            run: Run::new(driver, plan, path, target),
        }
    }

    executor_builders!();

    /// Runs the plan to completion. On success the replica is `in_sync`, every pin is
    /// released, and the report says what moved.
    pub fn execute(self, io: &mut dyn CatchUpIo) -> Result<ExecutionReport> {
        let mut run = self.run;
        if matches!(run.plan.step(), PlanStep::InSync) {
            run.report.final_state = run
                .driver
                .orchestrator()
                .sender(run.plan.replica_id())
                .map_or(ReplicaState::Disconnected, |s| s.state());
            return Ok(run.report);
        }
        let (Some(sid), PlanStep::CatchUp(_) | PlanStep::Truncate(_)) =
            (run.plan.session_id(), run.plan.step())
        else {
            let detail = format!(
                "catch-up executor given a {} plan (session {:?})",
                run.plan.outcome(),
                run.plan.session_id()
            );
            return Err(run.fail(ExecFailure::PlanNotExecutable(detail)));
        };
        let target = run.plan.target().unwrap_or(Lsn::ZERO);
        let sender = match run.driver.orchestrator().sender(run.plan.replica_id()) {
            Ok(s) => s,
            Err(_) => return Err(run.fail(ExecFailure::SenderNotFound)),
        };
        let start_tick = run.start_tick();
        if let Err(e) = sender.begin_catch_up(sid, Some(start_tick)) {
            return Err(run.fail(ExecFailure::BeginCatchUpFailed(e)));
        }
        run.log(Event::ExecCatchupStarted {
            target,
            tick: start_tick,
        });
        match Self::drive(&mut run, io, &sender, sid, target) {
            Ok(()) => Ok(run.succeed(Event::ExecCompleted, &sender)),
            Err(f) => Err(run.fail(f)),
        }
    }

    fn drive(
        run: &mut Run<'_>,
        io: &mut dyn CatchUpIo,
        sender: &Sender,
        sid: SessionId,
        target: Lsn,
    ) -> std::result::Result<(), ExecFailure> {
        let (mut from, truncation) = match run.plan.step() {
            // A divergent replica is first truncated to the last shared entry, which its new
            // tip must then be.
            PlanStep::CatchUp(c) => (c.from, c.truncate_first.map(|a| (c.from, true, Some(a)))),
            PlanStep::Truncate(t) => (target, Some((t.to, t.verified, t.anchor))),
            _ => (target, None),
        };
        if let Some((t, verified, anchor)) = truncation {
            let tick = run.tick();
            let tip = io
                .truncate_after(t)
                .map_err(ExecFailure::TruncateIoFailed)?;
            if tip.lsn != t {
                return Err(ExecFailure::TruncateMismatch {
                    requested: t,
                    reported: tip.lsn,
                });
            }
            if verified && anchor != Some(tip) {
                return Err(ExecFailure::TruncateDiverged {
                    expected: anchor,
                    reported: tip,
                });
            }
            sender
                .record_truncation(sid, t)
                .map_err(ExecFailure::TruncationFailed)?;
            run.report.truncated_to = Some(t);
            run.log(Event::ExecTruncation { truncated_to: t });
            run.after_step(sender, sid, StepKind::Truncate, t, tick)?;
            from = t;
        }
        run.stream(io, sender, sid, from, target, false)?;
        run.barrier(io, sender, sid, target)?;
        sender
            .complete_session_by_id(sid)
            .map_err(ExecFailure::CompletionRejected)
    }
}

/// Runs a rebuild plan (snapshot + tail, or full base).
pub struct RebuildExecutor<'a> {
    run: Run<'a>,
}

impl RebuildExecutor<'_> {
    /// Validates a base chunk's report against the image size `begin_base` announced and the
    /// totals so far (`covered`, `sent`), and returns the new totals. A chunk must report
    /// something unless it is the last; the image is never overrun; the bytes sent never
    /// exceed the bytes covered (an I/O may cover a window of the image before sending its
    /// runs in several chunks, so one chunk can send without covering, but never more than
    /// was covered: a chunk that keeps reporting bytes without progress is refused); and the
    /// last chunk ends exactly at the image's end.
    fn check_base_chunk(
        step: u64,
        chunk: &BaseChunkProgress,
        (covered, sent): (u64, u64),
        size: u64,
    ) -> std::result::Result<(u64, u64), ExecFailure> {
        let protocol = |detail: String| Err(ExecFailure::IoProtocol { step, detail });
        if chunk.bytes == 0 && chunk.bytes_sent == 0 && !chunk.done {
            return protocol(format!(
                "base chunk made no progress ({covered} of {size} bytes covered)"
            ));
        }
        let Some(covered) = covered.checked_add(chunk.bytes).filter(|t| *t <= size) else {
            return protocol(format!(
                "base chunk of {} bytes overruns the image: {covered} of {size} covered before it",
                chunk.bytes
            ));
        };
        let Some(sent) = sent.checked_add(chunk.bytes_sent).filter(|t| *t <= covered) else {
            return protocol(format!(
                "base chunk sent {} bytes with no progress: {sent} sent before it, {covered} of \
                 {size} covered",
                chunk.bytes_sent
            ));
        };
        if chunk.done && covered != size {
            return protocol(format!("base transfer ended at {covered} of {size} bytes"));
        }
        Ok((covered, sent))
    }
}

impl<'a> RebuildExecutor<'a> {
    /// An executor that takes ownership of `plan` and its pins.
    pub fn new(driver: &'a RecoveryDriver, plan: RecoveryPlan) -> Self {
        let path = match plan.step() {
            PlanStep::Rebuild(r) if r.source() == RebuildSource::SnapshotTail => {
                RecoveryPath::RebuildSnapshotTail
            }
            _ => RecoveryPath::RebuildFullBase,
        };
        let target = plan.target().unwrap_or(Lsn::ZERO);
        RebuildExecutor {
            run: Run::new(driver, plan, path, target),
        }
    }

    executor_builders!();

    /// Runs the plan using only plan-bound values (source, snapshot LSN, target, pins); it
    /// never re-reads storage, so a change in storage after planning cannot switch the source.
    pub fn execute(self, io: &mut dyn RebuildIo) -> Result<ExecutionReport> {
        let mut run = self.run;
        let (Some(sid), PlanStep::Rebuild(rebuild)) = (run.plan.session_id(), run.plan.step())
        else {
            let detail = format!(
                "rebuild executor given a {} plan without rebuild bindings",
                run.plan.outcome()
            );
            return Err(run.fail(ExecFailure::PlanNotExecutable(detail)));
        };
        let (source, target, base_lsn) = (rebuild.source(), rebuild.target, rebuild.base_lsn());
        let Some(pin_id) = rebuild.image_pin_id() else {
            let detail = format!("{source} plan holds no image pin");
            return Err(run.fail(ExecFailure::PlanNotExecutable(detail)));
        };
        let sender = match run.driver.orchestrator().sender(run.plan.replica_id()) {
            Ok(s) => s,
            Err(_) => return Err(run.fail(ExecFailure::SenderNotFound)),
        };
        let req = BaseRequest {
            source,
            lsn: base_lsn,
            pin_id,
        };
        match Self::drive(&mut run, io, &sender, sid, &req, target) {
            Ok(()) => Ok(run.succeed(Event::ExecRebuildCompleted, &sender)),
            Err(f) => Err(run.fail(f)),
        }
    }

    fn drive(
        run: &mut Run<'_>,
        io: &mut dyn RebuildIo,
        sender: &Sender,
        sid: SessionId,
        req: &BaseRequest,
        target: Lsn,
    ) -> std::result::Result<(), ExecFailure> {
        sender
            .begin_connect(sid)
            .map_err(ExecFailure::ConnectFailed)?;
        sender
            .record_handshake(sid, Lsn::ZERO, target)
            .map_err(ExecFailure::HandshakeFailed)?;
        let snapshot = (req.source == RebuildSource::SnapshotTail).then_some(req.lsn);
        sender
            .select_rebuild_source(sid, snapshot, snapshot.is_some(), target)
            .map_err(ExecFailure::SourceSelectFailed)?;
        run.log(Event::ExecRebuildStarted {
            source: req.source,
            target,
        });
        sender
            .begin_rebuild_transfer(sid)
            .map_err(ExecFailure::TransferFailed)?;

        let size = io.begin_base(req).map_err(ExecFailure::IoBaseFailed)?;
        loop {
            let step = run.report.steps;
            let tick = run.tick();
            let chunk = io
                .transfer_base_chunk(run.opts.max_base_chunk_bytes.max(1))
                .map_err(ExecFailure::IoBaseFailed)?;
            let totals = (run.report.base_bytes, run.report.base_bytes_sent);
            (run.report.base_bytes, run.report.base_bytes_sent) =
                Self::check_base_chunk(step, &chunk, totals, size)?;
            run.after_step(sender, sid, StepKind::BaseChunk, req.lsn, tick)?;
            if chunk.done {
                break;
            }
        }
        let installed = io.finish_base().map_err(ExecFailure::IoBaseFailed)?;
        if installed != req.lsn {
            return Err(ExecFailure::BaseLsnMismatch {
                expected: req.lsn,
                reported: installed,
            });
        }
        sender
            .record_rebuild_transfer_progress(sid, installed)
            .map_err(ExecFailure::TransferProgressFailed)?;
        run.report.base_lsn = Some(installed);
        run.log(Event::ExecBaseInstalled {
            base_lsn: installed,
            bytes: run.report.base_bytes_sent,
        });
        let tick = run.tick();
        run.after_step(sender, sid, StepKind::BaseInstalled, installed, tick)?;

        if req.source == RebuildSource::SnapshotTail {
            sender
                .begin_rebuild_tail_replay(sid)
                .map_err(ExecFailure::TailReplayFailed)?;
            run.stream(io, sender, sid, installed, target, true)?;
        }
        run.barrier(io, sender, sid, target)?;
        sender
            .complete_rebuild(sid)
            .map_err(ExecFailure::RebuildCompletionFailed)
    }
}
