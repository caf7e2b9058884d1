//! The "rebuild not needed" decision of a rebuilding assignment: the service declines a rebuild
//! only when its local copy's log matches the primary's at the copy's head by entry identity
//! (LSN, epoch and content checksum), not merely by LSN. A copy at the primary's LSN whose entry
//! there differs (an old primary's tail, a write under another epoch) holds different data and
//! must be rebuilt.

use std::sync::{Arc, Mutex};

use controlbridge::*;
use engine::testing::{MemStorage, ModelEntry, ModelIo, ModelReplica};
use engine::{
    Endpoint, Epoch, Lsn, ReplicaHandshake, ReplicaId, ReplicaState, SessionId, StorageAdapter,
};

const VOLUME: &str = "pvc-rebuild-1";
/// Entries the primary wrote and committed.
const COMMITTED: u64 = 10;

/// The rebuilding server's backend: its own copy of the volume is a model replica (read by
/// `local_handshake`, rebuilt through a pull from the model primary).
struct LocalCopyBackend {
    primary: MemStorage,
    local: Arc<Mutex<ModelReplica>>,
}

impl VolumeBackend for LocalCopyBackend {
    type Io = ModelIo;

    fn apply_role(
        &mut self,
        _volume: &str,
        _role: BlockRole,
        _epoch: Epoch,
        _lease: u64,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn primary_storage(
        &mut self,
        _volume: &str,
        _rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        Ok(Arc::new(self.primary.clone()))
    }

    fn replica_handshake(
        &mut self,
        _volume: &str,
        _endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        Err(BackendError::refused(
            "a rebuilding server pushes to no replica",
        ))
    }

    fn transfer_io(
        &mut self,
        _volume: &str,
        route: Route<'_>,
        _epoch: Epoch,
        _session: SessionId,
    ) -> Result<ModelIo, BackendError> {
        let Route::Pull { .. } = route else {
            return Err(BackendError::refused("push not expected"));
        };
        Ok(ModelIo::new(self.primary.clone(), Arc::clone(&self.local)))
    }

    fn local_handshake(&mut self, _volume: &str) -> Option<ReplicaHandshake> {
        Some(self.local.lock().unwrap().handshake())
    }
}

/// A primary with `COMMITTED` committed entries.
fn model_primary() -> MemStorage {
    let p = MemStorage::new();
    let head = p.write_n(COMMITTED);
    p.commit(head).unwrap();
    p
}

fn primary_entry(p: &MemStorage, lsn: u64) -> ModelEntry {
    p.reference_history().entry(Lsn(lsn)).unwrap()
}

/// A local copy holding the primary's entries up to `lsn - 1` and then `entry` at `lsn`.
fn copy_ending_with(p: &MemStorage, entry: ModelEntry) -> ModelReplica {
    let mut r = ModelReplica::from_primary(p, Lsn(entry.lsn.get() - 1)).unwrap();
    r.apply(entry).unwrap();
    r
}

fn rebuilding_assignment(epoch: u64) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: VOLUME.into(),
        epoch,
        role: BlockRole::Rebuilding.to_wire(),
        rebuild_addr: "vs1:rebuild".into(),
        ..BlockVolumeAssignment::default()
    }
}

/// Delivers a rebuilding assignment to server `vs2` whose copy is `local`; returns the record
/// of its recovery and the service.
fn deliver(
    p: &MemStorage,
    local: ModelReplica,
) -> (RecoveryRecord, BlockService<LocalCopyBackend>) {
    let backend = LocalCopyBackend {
        primary: p.clone(),
        local: Arc::new(Mutex::new(local)),
    };
    let mut svc = BlockService::new("vs2", backend);
    let out = svc.process_assignments_inline(&[rebuilding_assignment(1)]);
    assert_eq!(out[0].error, None, "{:?}", out[0]);
    assert_eq!(out[0].recoveries.len(), 1, "{:?}", out[0]);
    let (id, rec) = out[0].recoveries[0].clone();
    assert_eq!(id, ReplicaId::new(format!("{VOLUME}/vs2")).unwrap());
    (rec, svc)
}

/// The copy was rebuilt: the rebuild ran, and the copy now holds the primary's committed image
/// and the primary's entry at its head.
fn assert_rebuilt(
    what: &str,
    p: &MemStorage,
    rec: &RecoveryRecord,
    svc: &BlockService<LocalCopyBackend>,
) {
    match rec {
        RecoveryRecord::Recovered(r) => {
            assert_eq!(r.base_lsn, Some(Lsn(COMMITTED)), "{what}: {r:?}");
            assert!(
                r.base_bytes_sent > 0,
                "{what}: a rebuild that moved nothing: {r:?}"
            );
        }
        other => panic!(
            "{what}: the copy's log differs from the primary's at the copy's head, so it must \
             be rebuilt; got {other:?}"
        ),
    }
    let local = svc.backend().local.lock().unwrap();
    assert!(!local.installing(), "{what}");
    assert_eq!(local.head(), Lsn(COMMITTED), "{what}");
    assert_eq!(
        local.tip(),
        Some(primary_entry(p, COMMITTED).id()),
        "{what}: the rebuilt copy's tip"
    );
    assert_eq!(
        Some(local.state()),
        p.state_at(Lsn(COMMITTED)),
        "{what}: the rebuilt copy's data"
    );
    let sender = svc
        .orchestrator(VOLUME)
        .unwrap()
        .registry()
        .sender(&ReplicaId::new(format!("{VOLUME}/vs2")).unwrap())
        .unwrap();
    assert_eq!(sender.state(), ReplicaState::InSync, "{what}");
}

/// The copy holds the primary's entry at the primary's committed LSN: the rebuild is declined
/// and the copy is left exactly as it was (the case `late_rebuild_assignment_does_not_wipe_an_
/// in_sync_replica` in tests/sim_regressions.rs found). The contrast for the tests below.
#[test]
fn rebuild_is_declined_for_a_copy_whose_tip_matches_the_primary() {
    let p = model_primary();
    let copy = ModelReplica::from_primary(&p, Lsn(COMMITTED)).unwrap();
    let (rec, svc) = deliver(&p, copy.clone());
    assert!(
        matches!(rec, RecoveryRecord::RebuildNotNeeded(_)),
        "an in-sync copy was not declined: {rec:?}"
    );
    assert_eq!(
        *svc.backend().local.lock().unwrap(),
        copy,
        "the copy was touched"
    );
}

/// The copy is at the primary's committed LSN, but its entry there was written under another
/// epoch (same block, same value): a different entry, so the copy is rebuilt.
#[test]
fn rebuild_is_not_declined_for_a_copy_at_the_primary_lsn_with_a_tip_from_another_epoch() {
    let p = model_primary();
    let theirs = primary_entry(&p, COMMITTED);
    let mine = ModelEntry {
        epoch: Epoch(theirs.epoch.get() + 1),
        ..theirs
    };
    assert_eq!(mine.id().lsn, theirs.id().lsn);
    assert_ne!(mine.id(), theirs.id());
    let (rec, svc) = deliver(&p, copy_ending_with(&p, mine));
    assert_rebuilt("tip from another epoch", &p, &rec, &svc);
}

/// The copy is at the primary's committed LSN under the same epoch, but its entry there wrote
/// something else (different checksum): the copy holds different data and is rebuilt.
#[test]
fn rebuild_is_not_declined_for_a_copy_at_the_primary_lsn_with_a_different_entry() {
    let p = model_primary();
    let theirs = primary_entry(&p, COMMITTED);
    let mine = ModelEntry {
        value: theirs.value ^ 0xDEAD_BEEF,
        ..theirs
    };
    assert_eq!(
        (mine.id().lsn, mine.id().epoch),
        (theirs.id().lsn, theirs.id().epoch)
    );
    assert_ne!(mine.id().checksum, theirs.id().checksum);
    let (rec, svc) = deliver(&p, copy_ending_with(&p, mine));
    assert_rebuilt("different entry at the same LSN", &p, &rec, &svc);
}

/// The copy is behind the primary (a gap the primary's retained WAL could close), but its tip
/// differs from the primary's entry at that LSN: a catch-up would build on a divergent entry, so
/// the copy is rebuilt.
#[test]
fn rebuild_is_not_declined_for_a_copy_behind_the_primary_with_a_divergent_tip() {
    let p = model_primary();
    let theirs = primary_entry(&p, COMMITTED - 3);
    let mine = ModelEntry {
        value: theirs.value ^ 1,
        ..theirs
    };
    let (rec, svc) = deliver(&p, copy_ending_with(&p, mine));
    assert_rebuilt("divergent tip behind the primary", &p, &rec, &svc);
}

/// A copy behind the primary whose tip matches (a gap the primary's retained WAL covers) is
/// declined too: the primary's catch-up brings it the rest.
#[test]
fn rebuild_is_declined_for_a_copy_behind_the_primary_with_a_matching_tip() {
    let p = model_primary();
    let copy = ModelReplica::from_primary(&p, Lsn(COMMITTED - 3)).unwrap();
    let (rec, svc) = deliver(&p, copy.clone());
    assert!(
        matches!(rec, RecoveryRecord::RebuildNotNeeded(_)),
        "a copy behind with a matching tip was not declined: {rec:?}"
    );
    assert_eq!(*svc.backend().local.lock().unwrap(), copy);
}

/// A copy ahead of the primary's committed point holds entries the primary never committed: it
/// is rebuilt, not declined.
#[test]
fn rebuild_is_not_declined_for_a_copy_ahead_of_the_primary() {
    let p = model_primary();
    let mut copy = ModelReplica::from_primary(&p, Lsn(COMMITTED)).unwrap();
    copy.append_divergent(2, Epoch(1));
    let (rec, svc) = deliver(&p, copy);
    assert_rebuilt("a copy ahead of committed", &p, &rec, &svc);
}
