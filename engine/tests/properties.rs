//! Property tests: classification against a direct model, frozen target and delta counting,
//! no completion without readiness, reconcile idempotence, and no pin outstanding after any
//! executor run (with data checked whenever a run succeeds).

use engine::testing::SenderProtocol;
use std::sync::{Arc, Mutex};

use engine::testing::{IoFaults, MemStorage, ModelIo, ModelReplica};
use engine::*;
use proptest::prelude::*;

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

/// The classification rules restated independently of the engine's code.
fn model_outcome(f: u64, c: u64, s: u64) -> Outcome {
    if f == c {
        Outcome::ZeroGap
    } else if f > c || f + 1 >= s {
        // Ahead of committed: truncation only. Otherwise: every missing entry is retained.
        Outcome::CatchUp
    } else {
        Outcome::NeedsRebuild
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn classification_matches_the_model(f in 0u64..300, c in 0u64..300, s in 0u64..300) {
        let hr = HandshakeResult {
            replica_flushed_lsn: Lsn(f),
            committed_lsn: Lsn(c),
            retention_start_lsn: Lsn(s),
        };
        prop_assert_eq!(hr.classify(), model_outcome(f, c, s));
    }

    /// With a contiguous history whose head covers committed, the proof and the classifier
    /// agree on every input.
    #[test]
    fn proof_agrees_with_classifier_on_contiguous_history(
        f in 0u64..200, c in 0u64..200, tail_frac in 0u64..=100
    ) {
        let tail = c * tail_frac / 100;
        let h = RetainedHistory {
            head_lsn: Lsn(c),
            tail_lsn: Lsn(tail),
            committed_lsn: Lsn(c),
            ..RetainedHistory::default()
        };
        let proof = h.prove_recoverability(Lsn(f));
        prop_assert_eq!(proof.outcome(), h.make_handshake_result(Lsn(f)).classify());
        prop_assert_eq!(proof.recoverable, proof.outcome() != Outcome::NeedsRebuild);
    }

    /// Progress is counted as the delta from the replica's start, is strictly increasing, and
    /// never passes the frozen target; refused reports change nothing.
    #[test]
    fn frozen_target_and_delta_counting(
        start in 0u64..100, span in 0u64..100, reports in prop::collection::vec(0u64..250, 0..20)
    ) {
        let target = start + span;
        let s = Sender::new(rid("r"), Endpoint::default(), Epoch(1));
        let sid = s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default()).unwrap();
        s.begin_connect(sid).unwrap();
        s.record_handshake(sid, Lsn(start), Lsn(target)).unwrap();
        s.begin_catch_up(sid, None).unwrap();
        let mut at = start;
        for r in reports {
            let res = s.record_catch_up_progress(sid, Lsn(r), None);
            let ok = r > at && r <= target;
            prop_assert_eq!(res.is_ok(), ok, "report {} at {} target {}", r, at, target);
            if ok { at = r; }
            let snap = s.session_snapshot().unwrap();
            prop_assert_eq!(snap.recovered_to, Lsn(at));
            prop_assert_eq!(snap.entries_replayed, at - start);
            prop_assert_eq!(snap.frozen_target_lsn, Some(Lsn(target)));
        }
    }

    /// Whatever sequence of operations runs, completion succeeds only when the session
    /// converged, any truncation was recorded, and the barrier covered the target (or the
    /// range was empty with nothing to truncate).
    #[test]
    fn no_completion_without_readiness(
        f in 0u64..60, c in 0u64..60, ops in prop::collection::vec((0u8..5, 0u64..70), 0..12)
    ) {
        let s = Sender::new(rid("r"), Endpoint::default(), Epoch(1));
        let sid = s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default()).unwrap();
        s.begin_connect(sid).unwrap();
        let hr = HandshakeResult {
            replica_flushed_lsn: Lsn(f),
            committed_lsn: Lsn(c),
            retention_start_lsn: Lsn(0),
        };
        s.record_handshake_with_outcome(sid, &hr).unwrap();
        for (op, v) in ops {
            let _ = match op {
                0 => s.begin_catch_up(sid, None),
                1 => s.record_catch_up_progress(sid, Lsn(v), None),
                2 => s.record_truncation(sid, Lsn(v)),
                3 => s.record_barrier(sid, Lsn(v)),
                _ => Ok(()),
            };
            let before = s.session_snapshot();
            let res = s.complete_session_by_id(sid);
            match before {
                None => prop_assert!(res.is_err()),
                Some(snap) => {
                    let target = snap.target_lsn.unwrap();
                    let converged = snap.recovered_to >= target
                        && (snap.phase == SessionPhase::CatchUp || snap.start_lsn == Some(target));
                    let truncated = !snap.truncate_required || snap.truncate_recorded;
                    // The handshake is caller-stated (no recoverability proof), so even a
                    // zero gap needs the replica's durable LSN.
                    let durable = snap.durable_lsn.is_some_and(|d| d >= target);
                    let ready = converged && truncated && durable;
                    prop_assert_eq!(res.is_ok(), ready, "snapshot {:?}", snap);
                    if res.is_ok() {
                        prop_assert_eq!(s.state(), ReplicaState::InSync);
                        prop_assert!(!s.has_active_session());
                        break;
                    }
                }
            }
        }
    }

    /// Reconciling the same set twice changes nothing the second time, and the registry holds
    /// exactly the requested IDs with their last endpoints.
    #[test]
    fn reconcile_is_idempotent(
        first in prop::collection::vec((0u8..8, 0u64..4), 0..10),
        second in prop::collection::vec((0u8..8, 0u64..4), 0..10),
    ) {
        let to_assignments = |v: &[(u8, u64)]| -> Vec<ReplicaAssignment> {
            v.iter().map(|(id, ver)| ReplicaAssignment {
                replica_id: rid(&format!("r{id}")),
                endpoint: Endpoint::new(format!("h{id}:1"), format!("h{id}:2"), *ver),
            }).collect()
        };
        let reg = Registry::new();
        reg.reconcile(&to_assignments(&first), Epoch(1)).unwrap();
        let a = to_assignments(&second);
        reg.reconcile(&a, Epoch(1)).unwrap();
        let status_before = reg.status();
        let again = reg.reconcile(&a, Epoch(1)).unwrap();
        prop_assert!(again.added.is_empty());
        prop_assert!(again.removed.is_empty());
        prop_assert!(again.invalidated.is_empty());
        prop_assert_eq!(reg.status(), status_before);
        let mut want: Vec<(ReplicaId, Endpoint)> = Vec::new();
        for x in &a {
            want.retain(|(id, _)| id != &x.replica_id);
            want.push((x.replica_id.clone(), x.endpoint.clone()));
        }
        want.sort_by(|x, y| x.0.cmp(&y.0));
        let have: Vec<(ReplicaId, Endpoint)> =
            reg.all().iter().map(|s| (s.replica_id().clone(), s.endpoint())).collect();
        prop_assert_eq!(have, want);
    }
}

#[derive(Debug, Clone)]
struct RunCase {
    head: u64,
    flushed: u64,
    tail: u64,
    checkpoint: Option<u64>,
    chunk: u64,
    fail_stream_call: Option<u64>,
    fail_base_call: Option<u64>,
    fail_barrier: bool,
    budget_entries: Option<u64>,
    bump_at_step: Option<u64>,
    divergent: u64,
}

fn run_case() -> impl Strategy<Value = RunCase> {
    (
        10u64..120,
        0u64..=100,
        0u64..=100,
        prop::option::of(0u64..=100),
        1u64..40,
        prop::option::of(0u64..6),
        prop::option::of(0u64..6),
        any::<bool>(),
        prop::option::of(1u64..80),
        prop::option::of(0u64..6),
        0u64..4,
    )
        .prop_map(
            |(head, fl, tl, cp, chunk, fs, fb, barrier, budget, bump, divergent)| {
                let flushed = head * fl / 100;
                let checkpoint = cp.map(|c| head * c / 100);
                let tail = checkpoint.unwrap_or(head) * tl / 100;
                RunCase {
                    head,
                    flushed,
                    tail,
                    checkpoint,
                    chunk,
                    fail_stream_call: fs,
                    fail_base_call: fb,
                    fail_barrier: barrier && fs.is_none(),
                    budget_entries: budget,
                    bump_at_step: bump,
                    divergent,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any plan, any fault: after the executor returns, no pin is outstanding; a success means
    /// in_sync with the primary's data, and a failure means no live session and not in_sync.
    #[test]
    fn no_pin_outstanding_after_any_executor_run(case in run_case()) {
        let storage = MemStorage::new();
        let head = storage.write_n(case.head);
        storage.commit(head).unwrap();
        let replica = Arc::new(Mutex::new(ModelReplica::from_primary(&storage, Lsn(case.flushed)).unwrap()));
        replica.lock().unwrap().append_divergent(case.divergent, Epoch(9));
        if let Some(cp) = case.checkpoint {
            storage.set_checkpoint(Some(Lsn(cp)), true);
        }
        storage.advance_tail(Lsn(case.tail));
        let driver = RecoveryDriver::new(Arc::new(storage.clone()));
        let orch = Arc::clone(driver.orchestrator());
        let budget = case.budget_entries.map(|n| CatchUpBudget { max_entries: Some(n), ..CatchUpBudget::default() });
        let intent = |kind| AssignmentIntent {
            replicas: vec![ReplicaAssignment { replica_id: rid("r1"), endpoint: Endpoint::default() }],
            epoch: Epoch(1),
            recovery_targets: [(rid("r1"), kind)].into_iter().collect(),
            catch_up_budget: budget,
        };
        orch.process_assignment(&intent(SessionKind::CatchUp)).unwrap();
        let f = replica.lock().unwrap().handshake();
        let opts = ExecutorOptions { max_entries_per_chunk: case.chunk, max_base_chunk_bytes: case.chunk * 32, ..ExecutorOptions::default() };
        let faults = IoFaults {
            fail_stream_call: case.fail_stream_call,
            fail_base_call: case.fail_base_call,
            fail_barrier: case.fail_barrier,
            ..IoFaults::default()
        };
        let bump = case.bump_at_step;
        let hook = |s: &StepInfo| {
            if Some(s.step) == bump {
                orch.advance_epoch(Epoch(2));
            }
        };
        let plan = match driver.plan_recovery(&rid("r1"), f) {
            Ok(p) => p,
            Err(_) => { prop_assert_eq!(storage.pins_outstanding(), 0); return Ok(()); }
        };
        let result = match plan.outcome() {
            Outcome::ZeroGap => Ok(None),
            Outcome::CatchUp => {
                let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
                io.faults = faults.clone();
                CatchUpExecutor::new(&driver, plan).with_options(opts).with_on_step(hook).execute(&mut io).map(Some)
            }
            Outcome::NeedsRebuild => {
                drop(plan);
                orch.process_assignment(&intent(SessionKind::Rebuild)).unwrap();
                match driver.plan_rebuild(&rid("r1")) {
                    Ok(plan) => {
                        let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
                        io.faults = faults.clone();
                        RebuildExecutor::new(&driver, plan).with_options(opts).with_on_step(hook).execute(&mut io).map(Some)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        prop_assert_eq!(storage.pins_outstanding(), 0, "pins left after {:?}", result);
        let sender = orch.sender(&rid("r1")).unwrap();
        match result {
            Ok(_) => {
                prop_assert_eq!(sender.state(), ReplicaState::InSync);
                let r = replica.lock().unwrap();
                prop_assert_eq!(r.state(), storage.state_at(head).unwrap());
                prop_assert_eq!(r.head(), head);
            }
            Err(_) => {
                prop_assert!(!sender.has_active_session());
                prop_assert_ne!(sender.state(), ReplicaState::InSync);
            }
        }
    }
}
