//! The master's block-volume assignment and its conversion into an engine intent.
//!
//! Identity is never derived from an address: a replica is `<volume>/<server_id>`, built from
//! the master's stable server IDs. A replica whose server ID is missing or malformed is skipped
//! with a typed reason the caller sees (fail closed), and logged.

use std::collections::BTreeMap;
use std::fmt;

use engine::{AssignmentIntent, Endpoint, Epoch, ReplicaAssignment, ReplicaId, SessionKind};

/// The longest volume name or server ID accepted.
pub const MAX_NAME_BYTES: usize = 255;

/// A replica address in a primary's assignment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaAddr {
    /// Data channel address.
    pub data_addr: String,
    /// Control channel address.
    pub ctrl_addr: String,
    /// The replica server's stable ID (from the master's registry).
    pub server_id: String,
}

/// The master's assignment for one volume on one server (mirrors the master's message).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockVolumeAssignment {
    /// The volume name.
    pub path: String,
    /// The assignment's epoch.
    pub epoch: u64,
    /// The role, as the wire value: 0 none, 1 primary, 2 replica, 3 stale, 4 rebuilding,
    /// 5 draining.
    pub role: u32,
    /// Lease length for a primary.
    pub lease_ttl_ms: u64,
    /// Scalar replica data address (the RF=2 form).
    pub replica_data_addr: String,
    /// Scalar replica control address.
    pub replica_ctrl_addr: String,
    /// Scalar replica server ID.
    pub replica_server_id: String,
    /// Where a rebuilding replica fetches its base from (the primary's rebuild endpoint).
    pub rebuild_addr: String,
    /// Replica addresses (the RF>2 form); when non-empty, the scalar fields are ignored.
    pub replica_addrs: Vec<ReplicaAddr>,
    /// Version of the addresses in this assignment; carried into every endpoint.
    pub addr_version: u64,
}

/// A volume's role on this server.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BlockRole {
    /// Unassigned.
    None,
    /// Serves writes and drives its replicas' recovery.
    Primary,
    /// Receives the primary's WAL.
    Replica,
    /// Fenced.
    Stale,
    /// Being rebuilt from the primary.
    Rebuilding,
    /// A primary stepping down.
    Draining,
}

impl BlockRole {
    /// Decodes the wire value.
    pub fn from_wire(v: u32) -> Result<BlockRole, ControlError> {
        Ok(match v {
            0 => BlockRole::None,
            1 => BlockRole::Primary,
            2 => BlockRole::Replica,
            3 => BlockRole::Stale,
            4 => BlockRole::Rebuilding,
            5 => BlockRole::Draining,
            other => return Err(ControlError::UnknownRole(other)),
        })
    }

    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            BlockRole::None => 0,
            BlockRole::Primary => 1,
            BlockRole::Replica => 2,
            BlockRole::Stale => 3,
            BlockRole::Rebuilding => 4,
            BlockRole::Draining => 5,
        }
    }
}

impl fmt::Display for BlockRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockRole::None => "none",
            BlockRole::Primary => "primary",
            BlockRole::Replica => "replica",
            BlockRole::Stale => "stale",
            BlockRole::Rebuilding => "rebuilding",
            BlockRole::Draining => "draining",
        })
    }
}

/// Why a name (volume or server ID) is unusable as part of an identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("empty")]
    Empty,
    /// Contains `/`, which separates volume and server in a replica ID.
    #[error("contains '/'")]
    ContainsSlash,
    /// Contains a control character.
    #[error("contains a control character")]
    ControlCharacter,
    /// Longer than [`MAX_NAME_BYTES`].
    #[error("{0} bytes, longer than 255")]
    TooLong(usize),
}

/// Checks a volume name or server ID.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if name.contains('/') {
        return Err(NameError::ContainsSlash);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

/// A replica left out of the intent, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedReplica {
    /// Its index in `replica_addrs`, or `None` for the scalar fields.
    pub index: Option<usize>,
    /// Its data address (for the operator; never used as identity).
    pub data_addr: String,
    /// Why it was skipped.
    pub reason: NameError,
}

/// Why an assignment could not be converted at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A role value the protocol does not define.
    #[error("unknown role wire value {0}")]
    UnknownRole(u32),
    /// The volume name cannot be part of an identity.
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidVolume {
        /// The name.
        name: String,
        /// Why.
        reason: NameError,
    },
    /// This server's own ID cannot be part of an identity (replica and rebuilding roles).
    #[error("invalid local server id {id:?}: {reason}")]
    InvalidLocalServerId {
        /// The ID.
        id: String,
        /// Why.
        reason: NameError,
    },
}

/// An assignment converted for one volume's orchestrator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// The volume.
    pub volume: String,
    /// This server's role for it.
    pub role: BlockRole,
    /// The engine intent.
    pub intent: AssignmentIntent,
    /// Replicas left out (fail closed).
    pub skipped: Vec<SkippedReplica>,
    /// The primary's rebuild endpoint, for a rebuilding replica.
    pub rebuild_addr: Option<String>,
    /// The primary's lease.
    pub lease_ttl_ms: u64,
}

/// Builds `<volume>/<server_id>` for names already validated.
pub fn make_replica_id(volume: &str, server_id: &str) -> Result<ReplicaId, NameError> {
    validate_name(server_id)?;
    ReplicaId::new(format!("{volume}/{server_id}")).map_err(|_| NameError::ControlCharacter)
}

/// Converts master assignments into engine intents.
#[derive(Copy, Clone, Debug, Default)]
pub struct ControlBridge;

impl ControlBridge {
    /// Converts one assignment, as seen by the server `local_server_id`:
    /// - primary: one replica per entry of `replica_addrs` with a valid server ID (or, when
    ///   that list is empty, the scalar replica when its server ID and data address are set),
    ///   each with a catch-up recovery target;
    /// - replica: the local replica `<volume>/<local>`, no recovery target;
    /// - rebuilding: the local replica with a rebuild target, and the rebuild address;
    /// - none, stale, draining: no replicas (the volume's senders are removed).
    ///
    /// Every endpoint carries the assignment's address version. A replica with a missing or
    /// malformed server ID is skipped (reported in [`Conversion::skipped`] and logged); a data
    /// address without a server ID never becomes an identity.
    pub fn convert_assignment(
        &self,
        a: &BlockVolumeAssignment,
        local_server_id: &str,
    ) -> Result<Conversion, ControlError> {
        let role = BlockRole::from_wire(a.role)?;
        validate_name(&a.path).map_err(|reason| ControlError::InvalidVolume {
            name: a.path.clone(),
            reason,
        })?;
        let endpoint = |data: &str, ctrl: &str| Endpoint::new(data, ctrl, a.addr_version);
        let mut replicas = Vec::new();
        let mut targets = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut skip = |index: Option<usize>, data_addr: &str, reason: NameError| {
            log::warn!(
                "volume {}: replica at {data_addr:?} skipped (index {index:?}): server id {reason}",
                a.path
            );
            skipped.push(SkippedReplica {
                index,
                data_addr: data_addr.to_owned(),
                reason,
            });
        };
        match role {
            BlockRole::Primary => {
                if !a.replica_addrs.is_empty() {
                    for (i, r) in a.replica_addrs.iter().enumerate() {
                        match make_replica_id(&a.path, &r.server_id) {
                            Ok(id) => {
                                targets.insert(id.clone(), SessionKind::CatchUp);
                                replicas.push(ReplicaAssignment {
                                    replica_id: id,
                                    endpoint: endpoint(&r.data_addr, &r.ctrl_addr),
                                });
                            }
                            Err(reason) => skip(Some(i), &r.data_addr, reason),
                        }
                    }
                } else if !a.replica_data_addr.is_empty() || !a.replica_server_id.is_empty() {
                    match make_replica_id(&a.path, &a.replica_server_id) {
                        Ok(id) if !a.replica_data_addr.is_empty() => {
                            targets.insert(id.clone(), SessionKind::CatchUp);
                            replicas.push(ReplicaAssignment {
                                replica_id: id,
                                endpoint: endpoint(&a.replica_data_addr, &a.replica_ctrl_addr),
                            });
                        }
                        Ok(_) => skip(None, &a.replica_data_addr, NameError::Empty),
                        Err(reason) => skip(None, &a.replica_data_addr, reason),
                    }
                }
            }
            BlockRole::Replica | BlockRole::Rebuilding => {
                let id = make_replica_id(&a.path, local_server_id).map_err(|reason| {
                    ControlError::InvalidLocalServerId {
                        id: local_server_id.to_owned(),
                        reason,
                    }
                })?;
                if role == BlockRole::Rebuilding {
                    targets.insert(id.clone(), SessionKind::Rebuild);
                }
                replicas.push(ReplicaAssignment {
                    replica_id: id,
                    endpoint: endpoint(&a.replica_data_addr, &a.replica_ctrl_addr),
                });
            }
            BlockRole::None | BlockRole::Stale | BlockRole::Draining => {}
        }
        Ok(Conversion {
            volume: a.path.clone(),
            role,
            intent: AssignmentIntent {
                replicas,
                epoch: Epoch(a.epoch),
                recovery_targets: targets,
                catch_up_budget: None,
            },
            skipped,
            rebuild_addr: (role == BlockRole::Rebuilding && !a.rebuild_addr.is_empty())
                .then(|| a.rebuild_addr.clone()),
            lease_ttl_ms: a.lease_ttl_ms,
        })
    }
}
