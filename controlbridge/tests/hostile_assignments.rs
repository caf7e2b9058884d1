//! Master assignments with arbitrary field values: names with slashes, control characters,
//! invalid lengths and arbitrary Unicode, unknown roles, edge epochs and address versions,
//! duplicate and missing server IDs. `convert_assignment` returns a conversion or a typed
//! `ControlError` and never panics, and what it returns is checked field by field against an
//! independent statement of the rules; the block service fed sequences of such assignments
//! never panics and reports every refusal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use controlbridge::{
    AssignmentError, BackendError, BlockRole, BlockService, BlockVolumeAssignment, ControlBridge,
    ControlError, MAX_NAME_BYTES, NameError, ReplicaAddr, Route, VolumeBackend, validate_name,
};
use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::{Endpoint, Epoch, Lsn, ReplicaHandshake, SessionId, SessionKind, StorageAdapter};
use proptest::prelude::*;

/// Names: mostly plausible, sometimes hostile (empty, slash, control characters, too long,
/// arbitrary Unicode).
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        1 => Just(String::new()),
        1 => "[a-z]{0,4}/[a-z]{0,4}",
        1 => "[a-z]{0,4}[\\x00-\\x1f\\x7f][a-z]{0,4}",
        1 => (250usize..260).prop_map(|n| "x".repeat(n)),
        1 => any::<String>(),
        1 => Just("vs\u{85}2".to_string()),
    ]
}

fn addr() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "10\\.0\\.0\\.[0-9]{1,2}:3260",
        1 => Just(String::new()),
        1 => any::<String>(),
    ]
}

fn replica_addr() -> impl Strategy<Value = ReplicaAddr> {
    (addr(), addr(), name()).prop_map(|(data_addr, ctrl_addr, server_id)| ReplicaAddr {
        data_addr,
        ctrl_addr,
        server_id,
    })
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn assignment() -> impl Strategy<Value = BlockVolumeAssignment> {
    (
        (
            prop_oneof![3 => Just("pvc-1".to_string()), 1 => name()],
            edge_u64(),
            prop_oneof![4 => 0u32..6, 1 => any::<u32>()],
            edge_u64(),
        ),
        (
            addr(),
            addr(),
            prop_oneof![2 => Just("vs2".to_string()), 1 => name()],
            addr(),
        ),
        (
            prop_oneof![
                2 => Just(Vec::new()),
                2 => proptest::collection::vec(replica_addr(), 1..5),
                // Duplicates: the same server ID at two addresses.
                1 => (replica_addr(), addr()).prop_map(|(r, a2)| {
                    let mut r2 = r.clone();
                    r2.data_addr = a2;
                    vec![r, r2]
                }),
            ],
            edge_u64(),
        ),
    )
        .prop_map(
            |(
                (path, epoch, role, lease_ttl_ms),
                (replica_data_addr, replica_ctrl_addr, replica_server_id, rebuild_addr),
                (replica_addrs, addr_version),
            )| BlockVolumeAssignment {
                path,
                epoch,
                role,
                lease_ttl_ms,
                replica_data_addr,
                replica_ctrl_addr,
                replica_server_id,
                rebuild_addr,
                replica_addrs,
                addr_version,
            },
        )
}

/// The conversion rules, stated independently of the implementation.
fn check_conversion(a: &BlockVolumeAssignment, local: &str) -> Result<(), TestCaseError> {
    let r = ControlBridge.convert_assignment(a, local);
    let role = match BlockRole::from_wire(a.role) {
        Ok(role) => role,
        Err(_) => {
            prop_assert_eq!(r, Err(ControlError::UnknownRole(a.role)));
            return Ok(());
        }
    };
    if let Err(reason) = validate_name(&a.path) {
        prop_assert_eq!(
            r,
            Err(ControlError::InvalidVolume {
                name: a.path.clone(),
                reason
            })
        );
        return Ok(());
    }
    if matches!(role, BlockRole::Replica | BlockRole::Rebuilding)
        && let Err(reason) = validate_name(local)
    {
        prop_assert_eq!(
            r,
            Err(ControlError::InvalidLocalServerId {
                id: local.to_owned(),
                reason
            })
        );
        return Ok(());
    }
    let c = r.map_err(|e| TestCaseError::fail(format!("refused a valid assignment: {e}")))?;
    prop_assert_eq!(c.role, role);
    prop_assert_eq!(&c.volume, &a.path);
    prop_assert_eq!(c.intent.epoch, Epoch(a.epoch));
    prop_assert_eq!(c.lease_ttl_ms, a.lease_ttl_ms);
    let ids: Vec<String> = c
        .intent
        .replicas
        .iter()
        .map(|r| r.replica_id.to_string())
        .collect();
    for r in &c.intent.replicas {
        prop_assert_eq!(r.endpoint.version, a.addr_version);
        let id = r.replica_id.to_string();
        let server = id
            .strip_prefix(&format!("{}/", a.path))
            .ok_or_else(|| TestCaseError::fail(format!("id {id} is not under the volume")))?;
        prop_assert!(
            validate_name(server).is_ok(),
            "id {} from a bad server id",
            id
        );
        prop_assert!(id.len() <= 2 * MAX_NAME_BYTES + 1);
    }
    for k in c.intent.recovery_targets.keys() {
        prop_assert!(
            ids.contains(&k.to_string()),
            "target {} is not a replica",
            k
        );
    }
    match role {
        BlockRole::Primary if !a.replica_addrs.is_empty() => {
            prop_assert_eq!(
                c.intent.replicas.len() + c.skipped.len(),
                a.replica_addrs.len()
            );
            for s in &c.skipped {
                let i = s.index.expect("index");
                prop_assert_eq!(
                    Err(s.reason.clone()),
                    validate_name(&a.replica_addrs[i].server_id)
                );
            }
            for t in c.intent.recovery_targets.values() {
                prop_assert_eq!(*t, SessionKind::CatchUp);
            }
        }
        BlockRole::Primary => {
            let scalar = !a.replica_data_addr.is_empty() || !a.replica_server_id.is_empty();
            prop_assert_eq!(
                c.intent.replicas.len() + c.skipped.len(),
                usize::from(scalar)
            );
            if let Some(s) = c.skipped.first() {
                let expect = validate_name(&a.replica_server_id)
                    .err()
                    .unwrap_or(NameError::Empty);
                prop_assert_eq!(&s.reason, &expect);
            }
        }
        BlockRole::Replica | BlockRole::Rebuilding => {
            prop_assert_eq!(ids, vec![format!("{}/{local}", a.path)]);
            prop_assert_eq!(
                c.intent.recovery_targets.len(),
                usize::from(role == BlockRole::Rebuilding)
            );
            prop_assert_eq!(
                c.rebuild_addr.is_some(),
                role == BlockRole::Rebuilding && !a.rebuild_addr.is_empty()
            );
        }
        BlockRole::None | BlockRole::Stale | BlockRole::Draining => {
            prop_assert!(c.intent.replicas.is_empty() && c.skipped.is_empty());
        }
    }
    Ok(())
}

/// A backend over the engine's reference store that creates what it is asked for: a primary
/// per volume with a few committed entries, a model replica per data address at a prefix
/// chosen from the address.
#[derive(Default)]
struct AnyBackend {
    primaries: BTreeMap<String, MemStorage>,
    replicas: BTreeMap<String, Arc<Mutex<ModelReplica>>>,
}

impl AnyBackend {
    fn primary(&mut self, volume: &str) -> MemStorage {
        self.primaries
            .entry(volume.to_owned())
            .or_insert_with(|| {
                let s = MemStorage::new();
                let head = s.write_n(12);
                s.commit(head).expect("commit");
                s
            })
            .clone()
    }
}

impl VolumeBackend for AnyBackend {
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
        volume: &str,
        rebuild_addr: Option<&str>,
    ) -> Result<Arc<dyn StorageAdapter>, BackendError> {
        if rebuild_addr.is_some() {
            return Err(BackendError::refused("pull not modelled"));
        }
        Ok(Arc::new(self.primary(volume)))
    }

    fn replica_handshake(
        &mut self,
        volume: &str,
        endpoint: &Endpoint,
    ) -> Result<ReplicaHandshake, BackendError> {
        if endpoint.data_addr.is_empty() {
            return Err(BackendError::unavailable("no address"));
        }
        let p = self.primary(volume);
        let prefix = endpoint.data_addr.len() as u64 % 13;
        let r = self
            .replicas
            .entry(endpoint.data_addr.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(
                    ModelReplica::from_primary(&p, Lsn(prefix)).expect("replica"),
                ))
            });
        Ok(r.lock().unwrap_or_else(|e| e.into_inner()).handshake())
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
        let p = self.primary(volume);
        let r = self
            .replicas
            .get(&endpoint.data_addr)
            .cloned()
            .ok_or_else(|| BackendError::unavailable("unknown replica"))?;
        Ok(ModelIo::new(p, r))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn conversion_of_arbitrary_assignments_follows_the_rules(a in assignment(), local in name()) {
        check_conversion(&a, &local)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Sequences of hostile assignments through the block service (stale, duplicated,
    /// re-delivered, role flips, edge epochs): never a panic, one outcome per assignment,
    /// and a refused conversion is reported as an error, not acted on.
    #[test]
    fn block_service_survives_hostile_assignment_sequences(
        seq in proptest::collection::vec(assignment(), 1..12),
        local in prop_oneof![3 => Just("vs1".to_string()), 1 => name()],
    ) {
        let mut svc = BlockService::new(local.clone(), AnyBackend::default());
        let mut seen = BTreeSet::new();
        for (i, a) in seq.iter().enumerate() {
            // Alternately inline and returned-then-run, so both paths see hostile input.
            let mut out = if i % 2 == 0 {
                svc.process_assignments_inline(std::slice::from_ref(a))
            } else {
                svc.process_assignments(std::slice::from_ref(a))
            };
            prop_assert_eq!(out.len(), 1);
            let o = &mut out[0];
            for p in std::mem::take(&mut o.pending) {
                let id = p.replica().clone();
                let rec = svc.run_pending(p);
                o.recoveries.push((id, rec));
            }
            let converted = ControlBridge.convert_assignment(a, &local);
            if let Err(e) = converted {
                prop_assert_eq!(
                    o.error.as_ref(),
                    Some(&AssignmentError::Invalid(e.clone())),
                    "conversion failed ({}) but was not reported as invalid",
                    e
                );
                prop_assert!(o.role.is_none() && o.recoveries.is_empty());
            } else {
                prop_assert!(
                    !matches!(o.error, Some(AssignmentError::Invalid(_))),
                    "a valid assignment refused as invalid: {:?}",
                    o.error
                );
                seen.insert(a.path.clone());
            }
        }
        for v in svc.volumes() {
            prop_assert!(seen.contains(&v), "volume {} appeared without a valid assignment", v);
        }
    }
}
