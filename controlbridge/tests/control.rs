//! The reference's control tests (items 109 to 115 and 125 to 127), the identity rules, and
//! the block service on the engine's in-memory reference store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use controlbridge::*;
use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::{
    Endpoint, Epoch, Lsn, ReplicaHandshake, ReplicaId, ReplicaState, SessionId, SessionKind,
    StorageAdapter,
};

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

fn primary(path: &str, epoch: u64) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: path.into(),
        epoch,
        role: 1,
        lease_ttl_ms: 30_000,
        ..BlockVolumeAssignment::default()
    }
}

fn addr(data: &str, server: &str) -> ReplicaAddr {
    ReplicaAddr {
        data_addr: data.into(),
        ctrl_addr: format!("{data}-ctrl"),
        server_id: server.into(),
    }
}

// 109
#[test]
fn primary_assignment_stable_server_id() {
    let mut a = primary("pvc-data-1", 1);
    a.replica_data_addr = "10.0.0.2:3260".into();
    a.replica_ctrl_addr = "10.0.0.2:3261".into();
    a.replica_server_id = "vs2".into();
    let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    assert_eq!(c.intent.replicas.len(), 1);
    let r = &c.intent.replicas[0];
    assert_eq!(r.replica_id, rid("pvc-data-1/vs2"));
    assert_eq!(r.endpoint.data_addr, "10.0.0.2:3260");
    assert_eq!(
        c.intent.recovery_targets.get(&rid("pvc-data-1/vs2")),
        Some(&SessionKind::CatchUp)
    );
}

// 110
#[test]
fn address_change_identity_preserved() {
    let mut a = primary("pvc-data-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "10.0.0.2:3260".into();
    let c1 = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    a.replica_data_addr = "10.0.0.9:3260".into();
    a.addr_version = 2;
    let c2 = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    assert_eq!(
        c1.intent.replicas[0].replica_id,
        c2.intent.replicas[0].replica_id
    );
    assert_eq!(c2.intent.replicas[0].endpoint.data_addr, "10.0.0.9:3260");
    assert_eq!(c2.intent.replicas[0].endpoint.version, 2);
}

// 111
#[test]
fn multi_replica_stable_server_ids() {
    let mut a = primary("vol1", 1);
    a.replica_addrs = vec![addr("10.0.0.2:1", "vs2"), addr("10.0.0.3:1", "vs3")];
    let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    let ids: Vec<_> = c
        .intent
        .replicas
        .iter()
        .map(|r| r.replica_id.clone())
        .collect();
    assert_eq!(ids, vec![rid("vol1/vs2"), rid("vol1/vs3")]);
}

// 112
#[test]
fn missing_server_id_fails_closed() {
    let mut a = primary("vol1", 1);
    a.replica_data_addr = "10.0.0.2:1".into();
    let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    assert!(
        c.intent.replicas.is_empty(),
        "identity built from an address"
    );
    assert_eq!(c.skipped.len(), 1);
    assert_eq!(c.skipped[0].reason, NameError::Empty);
    assert_eq!(c.skipped[0].index, None);

    let mut a = primary("vol1", 1);
    a.replica_addrs = vec![addr("10.0.0.2:1", "vs2"), addr("10.0.0.3:1", "")];
    let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    assert_eq!(c.intent.replicas.len(), 1);
    assert_eq!(c.skipped[0].index, Some(1));
    assert_eq!(c.skipped[0].data_addr, "10.0.0.3:1");
}

#[test]
fn malformed_server_ids_fail_closed_with_reasons() {
    let mut a = primary("vol1", 1);
    a.replica_addrs = vec![
        addr("a:1", "vs/2"),
        addr("b:1", "vs\u{7}"),
        addr("c:1", &"x".repeat(256)),
        addr("d:1", &"y".repeat(255)),
    ];
    let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
    let reasons: Vec<_> = c.skipped.iter().map(|s| s.reason.clone()).collect();
    assert_eq!(
        reasons,
        vec![
            NameError::ContainsSlash,
            NameError::ControlCharacter,
            NameError::TooLong(256)
        ]
    );
    assert_eq!(c.intent.replicas.len(), 1, "the 255-byte id is valid");
}

#[test]
fn invalid_volume_names_and_roles_are_typed_errors() {
    for (path, reason) in [
        ("", NameError::Empty),
        ("a/b", NameError::ContainsSlash),
        ("a\nb", NameError::ControlCharacter),
    ] {
        let err = ControlBridge
            .convert_assignment(&primary(path, 1), "vs1")
            .unwrap_err();
        assert_eq!(
            err,
            ControlError::InvalidVolume {
                name: path.into(),
                reason
            }
        );
    }
    let mut a = primary("vol1", 1);
    a.role = 9;
    assert_eq!(
        ControlBridge.convert_assignment(&a, "vs1").unwrap_err(),
        ControlError::UnknownRole(9)
    );
    let mut a = primary("vol1", 1);
    a.role = 2;
    assert!(matches!(
        ControlBridge.convert_assignment(&a, "").unwrap_err(),
        ControlError::InvalidLocalServerId { .. }
    ));
}

// 114
#[test]
fn rebuild_assignment() {
    let mut a = primary("vol1", 3);
    a.role = 4;
    a.rebuild_addr = "10.0.0.1:3270".into();
    let c = ControlBridge.convert_assignment(&a, "vs2").unwrap();
    assert_eq!(c.role, BlockRole::Rebuilding);
    assert_eq!(
        c.intent.recovery_targets.get(&rid("vol1/vs2")),
        Some(&SessionKind::Rebuild)
    );
    assert_eq!(c.rebuild_addr.as_deref(), Some("10.0.0.1:3270"));
    assert_eq!(c.intent.epoch, Epoch(3));
}

// 115
#[test]
fn replica_assignment() {
    let mut a = primary("vol1", 1);
    a.role = 2;
    let c = ControlBridge.convert_assignment(&a, "vs2").unwrap();
    assert_eq!(c.intent.replicas[0].replica_id, rid("vol1/vs2"));
    assert!(c.intent.recovery_targets.is_empty());
}

#[test]
fn fenced_roles_carry_no_replicas_and_wire_values_round_trip() {
    for role in [0u32, 3, 5] {
        let mut a = primary("vol1", 1);
        a.role = role;
        a.replica_server_id = "vs2".into();
        a.replica_data_addr = "x".into();
        let c = ControlBridge.convert_assignment(&a, "vs1").unwrap();
        assert!(c.intent.replicas.is_empty());
        assert_eq!(c.role.to_wire(), role);
    }
}

/// A backend over the engine's reference store: one MemStorage primary per volume, model
/// replicas addressed by data address. Moves model data for real.
#[derive(Default)]
struct ModelBackend {
    primaries: BTreeMap<String, MemStorage>,
    replicas: BTreeMap<String, Arc<Mutex<ModelReplica>>>,
    roles: Vec<(String, BlockRole, Epoch)>,
}

impl VolumeBackend for ModelBackend {
    type Io = ModelIo;

    fn apply_role(
        &mut self,
        volume: &str,
        role: BlockRole,
        epoch: Epoch,
        _lease: u64,
    ) -> Result<(), BackendError> {
        self.roles.push((volume.to_owned(), role, epoch));
        Ok(())
    }

    fn primary_storage(
        &mut self,
        volume: &str,
        _rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        let s = self
            .primaries
            .get(volume)
            .ok_or_else(|| BackendError::refused(format!("no primary {volume}")))?;
        Ok(Arc::new(s.clone()))
    }

    fn replica_handshake(
        &mut self,
        _volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        let r = self.replicas.get(&endpoint.data_addr).ok_or_else(|| {
            BackendError::unavailable(format!("unreachable {}", endpoint.data_addr))
        })?;
        Ok(r.lock().unwrap().handshake())
    }

    fn transfer_io(
        &mut self,
        volume: &str,
        route: Route<'_>,
        _epoch: Epoch,
        _session: SessionId,
    ) -> Result<ModelIo, BackendError> {
        let Route::Push { endpoint } = route else {
            return Err(BackendError::refused("pull not modelled"));
        };
        let primary = self.primaries.get(volume).cloned().unwrap();
        let r = self.replicas.get(&endpoint.data_addr).cloned().unwrap();
        Ok(ModelIo::new(primary, r))
    }
}

fn service_with_primary(n: u64) -> BlockService<ModelBackend> {
    let mut b = ModelBackend::default();
    let s = MemStorage::new();
    let head = s.write_n(n);
    s.commit(head).unwrap();
    b.primaries.insert("pvc-test-1".into(), s);
    BlockService::new("vs1", b)
}

fn add_replica(svc: &mut BlockService<ModelBackend>, addr: &str, prefix: u64) {
    let p = svc.backend().primaries["pvc-test-1"].clone();
    let r = ModelReplica::from_primary(&p, Lsn(prefix)).unwrap();
    svc.backend_mut()
        .replicas
        .insert(addr.into(), Arc::new(Mutex::new(r)));
}

// 125
#[test]
fn v2_bridge_process_assignment_creates_engine_sender() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "10.0.0.2:3260", 4);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "10.0.0.2:3260".into();
    let out = svc.process_assignments_inline(&[a]);
    assert_eq!(out[0].error, None);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    let sender = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    // The reference stopped at "a session exists"; here the session ran: the replica caught
    // up from 4 to 10 and holds the primary's data.
    match &out[0].recoveries[0].1 {
        RecoveryRecord::Recovered(r) => assert_eq!(r.entries_applied, 6),
        other => panic!("expected a catch-up, got {other:?}"),
    }
    assert_eq!(sender.state(), ReplicaState::InSync);
    let replica = svc.backend().replicas["10.0.0.2:3260"]
        .lock()
        .unwrap()
        .state();
    let primary_state = svc.backend().primaries["pvc-test-1"]
        .state_at(Lsn(10))
        .unwrap();
    assert_eq!(replica, primary_state);
    assert!(orch.log().contains("session_created"));
}

// 126
#[test]
fn v2_bridge_process_assignment_epoch_bump() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "r2", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "r2".into();
    svc.process_assignments_inline(&[a.clone()]);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    let sender = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    assert_eq!(sender.state(), ReplicaState::InSync);
    // Epoch 2: the in-sync proof belonged to epoch 1; the new assignment re-proves it.
    orch.advance_epoch(Epoch(2));
    assert_eq!(sender.state(), ReplicaState::Disconnected);
    a.epoch = 2;
    let out = svc.process_assignments_inline(&[a.clone()]);
    assert_eq!(out[0].recoveries[0].1, RecoveryRecord::ZeroGap);
    assert_eq!(sender.state(), ReplicaState::InSync);
    assert_eq!(sender.epoch(), Epoch(2));
    // A stale epoch-1 assignment is refused whole and changes nothing.
    a.epoch = 1;
    let out = svc.process_assignments_inline(&[a]);
    assert_eq!(
        out[0].error,
        Some(AssignmentError::Stale(StaleAssignment::Epoch {
            assignment: Epoch(1),
            accepted: Epoch(2)
        }))
    );
    assert_eq!(sender.epoch(), Epoch(2));
    assert_eq!(sender.state(), ReplicaState::InSync);
}

// 127
#[test]
fn v2_bridge_process_assignment_address_change() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "old", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "old".into();
    svc.process_assignments_inline(&[a.clone()]);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    let before = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    // The replica moved; its data moved with it.
    let r = svc.backend_mut().replicas.remove("old").unwrap();
    svc.backend_mut().replicas.insert("new".into(), r);
    a.replica_data_addr = "new".into();
    a.addr_version = 2;
    let out = svc.process_assignments_inline(&[a]);
    let after = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    assert!(Arc::ptr_eq(&before, &after));
    assert_eq!(after.endpoint().data_addr, "new");
    assert_eq!(after.endpoint().version, 2);
    assert_eq!(out[0].recoveries[0].1, RecoveryRecord::ZeroGap);
    assert_eq!(after.state(), ReplicaState::InSync);
}

// 113
#[test]
fn epoch_fencing_integrated_path() {
    let mut svc = service_with_primary(10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "unreachable".into();
    svc.process_assignments_inline(&[a.clone()]);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    let sender = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    // The replica is unreachable: the session was cancelled, nothing is left running.
    assert!(!sender.has_active_session());
    orch.advance_epoch(Epoch(2));
    a.epoch = 2;
    svc.process_assignments_inline(&[a]);
    assert!(orch.log().contains("session_invalidated"));
    assert_eq!(sender.epoch(), Epoch(2));
}

#[test]
fn one_orchestrator_per_volume() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "r2", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "r2".into();
    // Another volume's assignment, even one that empties its own registry, must not touch
    // pvc-test-1's senders (the reference shared one registry between all volumes).
    let mut other = primary("pvc-other", 1);
    other.role = 3;
    svc.process_assignments_inline(&[a, other]);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    assert_eq!(orch.registry().len(), 1);
    assert!(svc.orchestrator("pvc-other").unwrap().registry().is_empty());
    assert_eq!(
        svc.volumes(),
        vec!["pvc-other".to_owned(), "pvc-test-1".to_owned()]
    );
}

#[test]
fn three_replicas_three_outcomes() {
    let mut svc = service_with_primary(100);
    {
        let p = svc.backend().primaries["pvc-test-1"].clone();
        p.set_checkpoint(Some(Lsn(60)), true);
        p.advance_tail(Lsn(50));
    }
    add_replica(&mut svc, "r2", 100);
    add_replica(&mut svc, "r3", 70);
    add_replica(&mut svc, "r4", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_addrs = vec![addr("r2", "vs2"), addr("r3", "vs3"), addr("r4", "vs4")];
    let out = svc.process_assignments_inline(&[a]);
    let rec: BTreeMap<String, RecoveryRecord> = out[0]
        .recoveries
        .iter()
        .map(|(id, r)| (id.to_string(), r.clone()))
        .collect();
    assert_eq!(rec["pvc-test-1/vs2"], RecoveryRecord::ZeroGap);
    assert!(
        matches!(&rec["pvc-test-1/vs3"], RecoveryRecord::Recovered(r) if r.entries_applied == 30)
    );
    assert_eq!(rec["pvc-test-1/vs4"], RecoveryRecord::NeedsRebuild);
    let st = svc.orchestrator("pvc-test-1").unwrap().registry().status();
    assert_eq!((st.in_sync, st.rebuilding), (2, 1));
}

/// A stale assignment (an epoch below the one the volume already accepted) is refused before
/// the backend sees it: no role is applied to the local volume (the backend records every
/// `apply_role`, which opens, creates or re-fences the volume), the service keeps the role it
/// had, and the volume's senders keep their epoch and state. Whatever role the late assignment
/// carries: a stale "replica" or "rebuilding" would otherwise demote (or wipe) the current
/// primary's volume.
#[test]
fn stale_epoch_assignment_applies_no_role_to_the_volume() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "r2", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "r2".into();
    svc.process_assignments_inline(&[a.clone()]);
    a.epoch = 2;
    let out = svc.process_assignments_inline(&[a.clone()]);
    assert_eq!(out[0].error, None);
    let applied = vec![
        ("pvc-test-1".to_owned(), BlockRole::Primary, Epoch(1)),
        ("pvc-test-1".to_owned(), BlockRole::Primary, Epoch(2)),
    ];
    assert_eq!(svc.backend().roles, applied);
    let orch = svc.orchestrator("pvc-test-1").unwrap();
    let sender = orch.registry().sender(&rid("pvc-test-1/vs2")).unwrap();
    assert_eq!(
        (sender.epoch(), sender.state()),
        (Epoch(2), ReplicaState::InSync)
    );

    for role in [
        BlockRole::Primary,
        BlockRole::Replica,
        BlockRole::Stale,
        BlockRole::Rebuilding,
        BlockRole::Draining,
        BlockRole::None,
    ] {
        let mut stale = a.clone();
        stale.epoch = 1;
        stale.role = role.to_wire();
        stale.rebuild_addr = "primary-rebuild".into();
        let out = svc.process_assignments_inline(&[stale]);
        assert!(
            matches!(
                out[0].error,
                Some(AssignmentError::Stale(StaleAssignment::Epoch { .. }))
            ),
            "stale {role} assignment not refused: {:?}",
            out[0]
        );
        assert!(out[0].recoveries.is_empty(), "stale {role}: {:?}", out[0]);
        assert_eq!(
            svc.backend().roles,
            applied,
            "a stale {role} assignment at epoch 1 reached the volume"
        );
        assert_eq!(svc.role("pvc-test-1"), Some(BlockRole::Primary));
        assert_eq!(svc.volumes(), vec!["pvc-test-1".to_owned()]);
        assert_eq!(
            (sender.epoch(), sender.state()),
            (Epoch(2), ReplicaState::InSync),
            "stale {role}"
        );
    }
}

/// Within one epoch an assignment with an older address version was delivered late: it is
/// refused before the backend sees it, and the sender keeps its newer endpoint.
#[test]
fn stale_address_version_assignment_applies_no_role_and_keeps_the_endpoint() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "new", 10);
    let mut a = primary("pvc-test-1", 1);
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "new".into();
    a.addr_version = 2;
    let out = svc.process_assignments_inline(&[a.clone()]);
    assert_eq!(out[0].error, None);
    let applied = svc.backend().roles.clone();
    assert_eq!(
        applied,
        vec![("pvc-test-1".to_owned(), BlockRole::Primary, Epoch(1))]
    );

    let mut late = a.clone();
    late.replica_data_addr = "old".into();
    late.addr_version = 1;
    let out = svc.process_assignments_inline(&[late]);
    assert!(
        matches!(
            out[0].error,
            Some(AssignmentError::Stale(StaleAssignment::AddressVersion {
                assignment: 1,
                accepted: 2,
                ..
            }))
        ),
        "{:?}",
        out[0]
    );
    assert_eq!(
        svc.backend().roles,
        applied,
        "the late assignment reached the volume"
    );
    assert_eq!(svc.role("pvc-test-1"), Some(BlockRole::Primary));
    let sender = svc
        .orchestrator("pvc-test-1")
        .unwrap()
        .registry()
        .sender(&rid("pvc-test-1/vs2"))
        .unwrap();
    assert_eq!(sender.endpoint().data_addr, "new");
    assert_eq!(sender.endpoint().version, 2);
    assert_eq!(sender.state(), ReplicaState::InSync);
}

/// A duplicate delivery of the assignment already applied (same epoch, same address version)
/// is not stale: it is accepted without an error and changes nothing (the sender stays in
/// sync at its endpoint).
#[test]
fn duplicate_assignment_at_the_same_epoch_and_version_is_accepted() {
    let mut svc = service_with_primary(10);
    add_replica(&mut svc, "10.0.0.2:3260", 10);
    let mut a = primary("pvc-test-1", 3);
    a.addr_version = 2;
    a.replica_server_id = "vs2".into();
    a.replica_data_addr = "10.0.0.2:3260".into();
    let first = svc.process_assignments_inline(std::slice::from_ref(&a));
    assert_eq!(first[0].error, None);
    let again = svc.process_assignments_inline(&[a]);
    assert_eq!(again[0].error, None, "a duplicate delivery was refused");
    let sender = svc
        .orchestrator("pvc-test-1")
        .unwrap()
        .registry()
        .sender(&rid("pvc-test-1/vs2"))
        .unwrap();
    assert_eq!(sender.state(), ReplicaState::InSync);
    assert_eq!(sender.epoch(), engine::Epoch(3));
    assert_eq!(svc.local_server_id(), "vs1");
}
