//! Model-checked interleavings of the engine's concurrent operations.
//!
//! The engine's own sources are compiled here against shuttle's locks and atomics (see
//! `engine/src/sync.rs`), and each test runs two operations on two shuttle threads. Shuttle
//! controls every lock acquisition, so each iteration is one schedule: `check_random` picks
//! schedules uniformly, `check_pct` with the PCT algorithm (probabilistic guarantees for bugs
//! of small depth), and every schedule is checked against the invariant after both threads
//! finish. The iteration counts below are the bounded run `cargo test` does (a few seconds);
//! `MODELCHECK_ITERATIONS=100000 cargo test -p engine-modelcheck --release` runs a long one.
//!
//! The pairs are the ones the review found races in: reconcile against reconcile at two
//! epochs, plan against attach, cancel against complete, and epoch invalidation against
//! execution.

use std::sync::{Arc, Mutex};

use engine_modelcheck::testing::{MemStorage, ModelIo, ModelReplica, SenderProtocol};
use engine_modelcheck::*;
use shuttle::thread;

fn iterations() -> usize {
    std::env::var("MODELCHECK_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// Runs `f` under the random scheduler and under PCT (bug depth 3).
fn check(f: impl Fn() + Send + Sync + 'static) {
    let f = Arc::new(f);
    let g = Arc::clone(&f);
    shuttle::check_random(move || f(), iterations());
    shuttle::check_pct(move || g(), iterations(), 3);
}

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

fn ep(host: &str, v: u64) -> Endpoint {
    Endpoint::new(format!("{host}:1"), format!("{host}:2"), v)
}

fn intent(epoch: u64, host: &str, ids: &[&str], kind: Option<SessionKind>) -> AssignmentIntent {
    AssignmentIntent {
        replicas: ids
            .iter()
            .map(|id| ReplicaAssignment {
                replica_id: rid(id),
                endpoint: ep(host, epoch),
            })
            .collect(),
        epoch: Epoch(epoch),
        recovery_targets: kind
            .map(|k| ids.iter().map(|id| (rid(id), k)).collect())
            .unwrap_or_default(),
        catch_up_budget: None,
    }
}

fn primary(n: u64) -> (MemStorage, Arc<RecoveryDriver>) {
    let storage = MemStorage::new();
    let head = storage.write_n(n);
    storage.commit(head).unwrap();
    let driver = Arc::new(RecoveryDriver::new(Arc::new(storage.clone())));
    (storage, driver)
}

/// Reconcile against reconcile: assignments at epochs 2 and 3 race. Whichever wins, every
/// sender ends at epoch 3 with the epoch-3 endpoint, the sessions the epoch-3 intent created or
/// kept are the live ones, and each is at epoch 3.
#[test]
fn reconcile_against_reconcile_at_two_epochs() {
    check(|| {
        let ids = ["r1", "r2"];
        let orch = Arc::new(RecoveryOrchestrator::new());
        orch.process_assignment(&intent(1, "one", &ids, Some(SessionKind::CatchUp)))
            .unwrap();
        let o2 = Arc::clone(&orch);
        let t2 = thread::spawn(move || {
            let _ = o2.process_assignment(&intent(2, "two", &ids, Some(SessionKind::Rebuild)));
        });
        let r3 = orch
            .process_assignment(&intent(3, "three", &ids, Some(SessionKind::CatchUp)))
            .unwrap();
        t2.join().unwrap();
        for id in ids {
            let s = orch.sender(&rid(id)).unwrap();
            assert_eq!(s.epoch(), Epoch(3), "{id}");
            assert_eq!(s.endpoint(), ep("three", 3), "{id}");
            let snap = s.session_snapshot().expect("the newer intent's session");
            assert_eq!((snap.epoch, snap.kind), (Epoch(3), SessionKind::CatchUp));
        }
        for (id, sid) in r3.sessions_created.iter().chain(&r3.sessions_kept) {
            assert_eq!(orch.sender(id).unwrap().session_id(), Some(*sid));
        }
    });
}

/// One sender raised alone against an assignment the registry still accepts: the sender is
/// never re-addressed, removed or given a session by the older intent.
#[test]
fn sender_raise_against_reconcile() {
    check(|| {
        let orch = Arc::new(RecoveryOrchestrator::new());
        orch.process_assignment(&intent(1, "one", &["r1", "r2"], None))
            .unwrap();
        let o = Arc::clone(&orch);
        let t = thread::spawn(move || o.update_sender_epoch(&rid("r1"), Epoch(5)).is_ok());
        let _ = orch.process_assignment(&intent(3, "three", &["r2"], Some(SessionKind::CatchUp)));
        let raised = t.join().unwrap();
        // Either the epoch-3 intent removed r1 first (and the raise reports that it did not
        // take effect), or the raise came first and the intent could not remove it. A raise
        // that succeeded and a sender removed anyway is the defect (the old registry did
        // exactly that).
        if raised {
            let s = orch
                .sender(&rid("r1"))
                .expect("a raised sender was removed");
            assert_eq!(s.epoch(), Epoch(5));
            assert!(!s.stopped());
            assert_eq!(s.endpoint(), ep("one", 1));
        } else {
            assert!(orch.sender(&rid("r1")).is_err());
        }
    });
}

/// Plan against attach: a zero-gap plan runs while a re-delivered assignment attaches a new
/// session. The plan names the session its handshake ran under, and cancelling the finished
/// plan never touches the other session or demotes the replica.
#[test]
fn plan_against_attach() {
    check(|| {
        let (_storage, driver) = primary(10);
        let orch = Arc::clone(driver.orchestrator());
        orch.process_assignment(&intent(1, "a", &["r1"], Some(SessionKind::CatchUp)))
            .unwrap();
        let first = orch.sender(&rid("r1")).unwrap().session_id().unwrap();
        let o = Arc::clone(&orch);
        let t = thread::spawn(move || {
            let s = o.sender(&rid("r1")).unwrap();
            s.attach_session(Epoch(1), SessionKind::CatchUp, SessionOptions::default())
                .ok()
        });
        let plan = driver.plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)));
        let attached = t.join().unwrap();
        let s = orch.sender(&rid("r1")).unwrap();
        match plan {
            Ok(plan) => {
                assert_eq!(plan.outcome(), Outcome::ZeroGap);
                assert_eq!(plan.session_id(), Some(first));
                let state = s.state();
                let live = s.session_id();
                assert!(!driver.cancel_plan(plan, "late"));
                assert_eq!(s.state(), state);
                assert_eq!(s.session_id(), live);
                if let Some(other) = attached {
                    assert_eq!(live, Some(other), "the attached session was ended");
                }
            }
            // The attach cannot have won over an active session; the handshake only fails if
            // its session was replaced, which nothing here does.
            Err(e) => panic!("plan failed: {e}"),
        }
    });
}

/// Cancel against complete: an executor runs a catch-up while another thread cancels its
/// session. Either the recovery completed (in sync, replica at the target) or it was
/// cancelled (not in sync); never a live session, never a pin left, never in sync with a
/// replica short of the target.
#[test]
fn cancel_against_complete() {
    check(|| {
        let (storage, driver) = primary(40);
        driver
            .orchestrator()
            .process_assignment(&intent(1, "a", &["r1"], Some(SessionKind::CatchUp)))
            .unwrap();
        let replica = Arc::new(Mutex::new(
            ModelReplica::from_primary(&storage, Lsn(10)).unwrap(),
        ));
        let plan = driver
            .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
            .unwrap();
        let sid = plan.session_id().unwrap();
        let d = Arc::clone(&driver);
        let t = thread::spawn(move || d.cancel_session(&rid("r1"), sid, "operator"));
        let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
        let result = CatchUpExecutor::new(&driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .execute(&mut io);
        let cancelled = t.join().unwrap();
        let s = driver.orchestrator().sender(&rid("r1")).unwrap();
        assert!(!s.has_active_session());
        assert_eq!(storage.pins_outstanding(), 0);
        assert_eq!(result.is_ok(), !cancelled);
        if s.state() == ReplicaState::InSync {
            assert_eq!(replica.lock().unwrap().durable(), Lsn(40));
        } else {
            assert!(cancelled);
        }
    });
}

/// Epoch invalidation against execution: whatever the order, after the bump to epoch 2 the
/// replica is not in sync on the strength of an epoch-1 session (the old engine let the
/// session complete after the bump, or left its proof standing), no session is live and no
/// pin is left.
#[test]
fn epoch_invalidation_against_execution() {
    check(|| {
        let (storage, driver) = primary(30);
        driver
            .orchestrator()
            .process_assignment(&intent(1, "a", &["r1"], Some(SessionKind::CatchUp)))
            .unwrap();
        let replica = Arc::new(Mutex::new(
            ModelReplica::from_primary(&storage, Lsn(10)).unwrap(),
        ));
        let plan = driver
            .plan_recovery(&rid("r1"), ReplicaHandshake::unverified(Lsn(10)))
            .unwrap();
        let o = Arc::clone(driver.orchestrator());
        let t = thread::spawn(move || o.invalidate_epoch(Epoch(2)));
        let mut io = ModelIo::new(storage.clone(), Arc::clone(&replica));
        let _ = CatchUpExecutor::new(&driver, plan)
            .with_options(ExecutorOptions {
                max_entries_per_chunk: 10,
                ..ExecutorOptions::default()
            })
            .execute(&mut io);
        t.join().unwrap();
        let s = driver.orchestrator().sender(&rid("r1")).unwrap();
        assert_ne!(s.state(), ReplicaState::InSync);
        assert_eq!(s.epoch(), Epoch(2));
        assert!(!s.has_active_session());
        assert_eq!(storage.pins_outstanding(), 0);
    });
}

/// Two rebuild planners race for one session: exactly one gets a plan, and running it
/// completes the rebuild (the loser neither pinned anything nor ended the winner's session).
#[test]
fn plan_rebuild_against_plan_rebuild() {
    check(|| {
        let (storage, driver) = primary(20);
        driver
            .orchestrator()
            .process_assignment(&intent(1, "a", &["r1"], Some(SessionKind::Rebuild)))
            .unwrap();
        let d = Arc::clone(&driver);
        let t = thread::spawn(move || d.plan_rebuild(&rid("r1")).ok());
        let mine = driver.plan_rebuild(&rid("r1")).ok();
        let theirs = t.join().unwrap();
        let plan = match (mine, theirs) {
            (Some(p), None) | (None, Some(p)) => p,
            (a, b) => panic!(
                "expected exactly one plan, got {} and {}",
                a.is_some(),
                b.is_some()
            ),
        };
        let replica = Arc::new(Mutex::new(ModelReplica::new()));
        let mut io = ModelIo::new(storage.clone(), replica);
        let report = RebuildExecutor::new(&driver, plan)
            .execute(&mut io)
            .unwrap();
        assert_eq!(report.final_state, ReplicaState::InSync);
        assert_eq!(storage.pins_outstanding(), 0);
    });
}
