//! Shared fixtures for the ported reference tests: replica IDs, endpoints, assignments,
//! primaries built on `MemStorage`, model replicas, and log helpers.
//!
//! Every test file includes this module, and no file uses all of it.
#![allow(dead_code)]

pub mod compact;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::{
    AssignmentIntent, AssignmentResult, CatchUpBudget, Endpoint, EngineError, EntryId, Epoch,
    ExecFailure, ExecutionReport, ExecutorOptions, Lsn, RecoveryDriver, RecoveryLog,
    RecoveryOrchestrator, ReplicaAssignment, ReplicaHandshake, ReplicaId, RetainedHistory,
    SessionId, SessionKind, SessionOptions,
};

/// A replica ID (panics on an invalid literal, which only a broken test can pass).
pub fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).expect("test replica ids are valid")
}

/// An endpoint on `host` with data port 9333 and control port 9334.
pub fn ep(host: &str, version: u64) -> Endpoint {
    Endpoint::new(format!("{host}:9333"), format!("{host}:9334"), version)
}

/// The replica list of an assignment.
pub fn replicas(list: &[(&str, Endpoint)]) -> Vec<ReplicaAssignment> {
    list.iter()
        .map(|(id, endpoint)| ReplicaAssignment {
            replica_id: rid(id),
            endpoint: endpoint.clone(),
        })
        .collect()
}

/// An assignment intent at `epoch`.
pub fn intent(
    epoch: u64,
    list: &[(&str, Endpoint)],
    targets: &[(&str, SessionKind)],
) -> AssignmentIntent {
    AssignmentIntent {
        replicas: replicas(list),
        epoch: Epoch(epoch),
        recovery_targets: targets
            .iter()
            .map(|(id, kind)| (rid(id), *kind))
            .collect::<BTreeMap<_, _>>(),
        catch_up_budget: None,
    }
}

/// Applies an assignment through the orchestrator; the assignment must be accepted.
pub fn assign(
    orch: &RecoveryOrchestrator,
    epoch: u64,
    list: &[(&str, Endpoint)],
    targets: &[(&str, SessionKind)],
) -> AssignmentResult {
    orch.process_assignment(&intent(epoch, list, targets))
        .expect("assignment accepted")
}

/// A retained-history literal (for pure decision tests that need states `MemStorage` cannot
/// hold, such as committed beyond head).
pub fn hist(
    head: u64,
    tail: u64,
    committed: u64,
    checkpoint: Option<u64>,
    trusted: bool,
) -> RetainedHistory {
    RetainedHistory {
        head_lsn: Lsn(head),
        tail_lsn: Lsn(tail),
        committed_lsn: Lsn(committed),
        checkpoint_lsn: checkpoint.map(Lsn),
        checkpoint_trusted: trusted,
        missing: Vec::new(),
    }
}

/// A primary holding `head` entries, committed at `committed`, recycled through `tail`, with
/// an optional checkpoint `(lsn, trusted)`.
pub fn primary(
    head: u64,
    committed: u64,
    tail: u64,
    checkpoint: Option<(u64, bool)>,
) -> MemStorage {
    let p = MemStorage::new();
    assert_eq!(p.write_n(head), Lsn(head));
    p.commit(Lsn(committed)).expect("committed <= head");
    if tail > 0 {
        assert_eq!(p.advance_tail(Lsn(tail)), Lsn(tail), "nothing pinned yet");
    }
    if let Some((cp, trusted)) = checkpoint {
        p.set_checkpoint(Some(Lsn(cp)), trusted);
    }
    p
}

/// The primary's retained history (what the driver would read).
pub fn history_of(p: &MemStorage) -> RetainedHistory {
    use engine::StorageAdapter;
    p.get_retained_history().expect("MemStorage always reports")
}

/// A driver over `p` with a fresh orchestrator.
pub fn driver(p: &MemStorage) -> RecoveryDriver {
    RecoveryDriver::new(Arc::new(p.clone()))
}

/// A model replica holding the primary's entries `1..=prefix`, durably.
pub fn replica(p: &MemStorage, prefix: u64) -> Arc<Mutex<ModelReplica>> {
    let r = ModelReplica::from_primary(p, Lsn(prefix)).expect("primary wrote the prefix");
    Arc::new(Mutex::new(r))
}

/// A replica that holds the primary's `1..=prefix` plus `extra` divergent uncommitted entries.
pub fn replica_ahead(p: &MemStorage, prefix: u64, extra: u64) -> Arc<Mutex<ModelReplica>> {
    let r = replica(p, prefix);
    let head = lock(&r).append_divergent(extra, Epoch(1));
    assert_eq!(head, Lsn(prefix + extra));
    r
}

/// What the model replica reports at a handshake (its head and the identity of its tip).
pub fn handshake(r: &Arc<Mutex<ModelReplica>>) -> ReplicaHandshake {
    lock(r).handshake()
}

/// The primary's identity of its entry at `lsn`.
pub fn entry_id(p: &MemStorage, lsn: u64) -> Option<EntryId> {
    use engine::StorageAdapter;
    p.entry_id(Lsn(lsn)).expect("MemStorage always answers")
}

/// Model I/O from `p` to `r`.
pub fn model_io(p: &MemStorage, r: &Arc<Mutex<ModelReplica>>) -> ModelIo {
    ModelIo::new(p.clone(), Arc::clone(r))
}

/// Locks a model replica.
pub fn lock(r: &Arc<Mutex<ModelReplica>>) -> std::sync::MutexGuard<'_, ModelReplica> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asserts the replica holds exactly the primary's data at `at`, and nothing past it.
pub fn assert_data_matches(p: &MemStorage, r: &Arc<Mutex<ModelReplica>>, at: u64) {
    let expected = p
        .state_at(Lsn(at))
        .expect("primary can reconstruct the target");
    let g = lock(r);
    assert!(!g.installing(), "replica still installing a base");
    assert_eq!(g.head(), Lsn(at), "replica head");
    assert_eq!(g.durable(), Lsn(at), "replica durable LSN");
    assert_eq!(
        g.state(),
        expected,
        "replica data differs from the primary at {at}"
    );
}

/// Executor options with WAL chunks of `entries` entries (and small base chunks).
pub fn chunked(entries: u64) -> ExecutorOptions {
    ExecutorOptions {
        max_entries_per_chunk: entries,
        max_base_chunk_bytes: 128,
        ..ExecutorOptions::default()
    }
}

/// Session options with a budget.
pub fn budget(
    max_duration_ticks: Option<u64>,
    max_entries: Option<u64>,
    progress_deadline_ticks: Option<u64>,
) -> SessionOptions {
    SessionOptions::with_budget(CatchUpBudget {
        max_duration_ticks,
        max_entries,
        progress_deadline_ticks,
    })
}

/// Unwraps an executor failure.
pub fn exec_failure(
    result: Result<ExecutionReport, EngineError>,
) -> (ExecFailure, ExecutionReport) {
    match result {
        Err(EngineError::ExecutionFailed {
            failure, report, ..
        }) => (*failure, *report),
        Ok(r) => panic!("execution succeeded but should have failed: {r:?}"),
        Err(e) => panic!("expected ExecutionFailed, got {e:?}"),
    }
}

/// Names of one replica's events, oldest first.
pub fn names_for(log: &RecoveryLog, id: &str) -> Vec<&'static str> {
    log.events_for(&rid(id)).iter().map(|e| e.name()).collect()
}

/// Details of every event named `name`, oldest first.
pub fn details(log: &RecoveryLog, name: &str) -> Vec<String> {
    log.events()
        .iter()
        .filter(|e| e.name() == name)
        .map(|e| e.event.detail())
        .collect()
}

/// The detail of the only event named `name`.
pub fn only_detail(log: &RecoveryLog, name: &str) -> String {
    let d = details(log, name);
    assert_eq!(d.len(), 1, "expected exactly one {name} event, got {d:?}");
    d.into_iter().next().unwrap_or_default()
}

/// The session IDs of every event named `name`, oldest first.
pub fn sessions_of(log: &RecoveryLog, name: &str) -> Vec<Option<SessionId>> {
    log.events()
        .iter()
        .filter(|e| e.name() == name)
        .map(|e| e.session_id)
        .collect()
}

/// Position of the first event named `name` (panics if absent).
pub fn position(log: &RecoveryLog, name: &str) -> usize {
    log.names()
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("event {name} not logged: {:?}", log.names()))
}
