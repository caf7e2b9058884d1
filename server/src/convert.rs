//! Between the protocol's messages and the crates' types.

use controlbridge::{BlockRole, BlockVolumeAssignment, ReplicaAddr};

use crate::node::VolumeInfo;
use crate::proto::master_pb;

/// A protocol assignment as controlbridge's.
pub fn assignment_from_proto(a: &master_pb::BlockVolumeAssignment) -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: a.path.clone(),
        epoch: a.epoch,
        role: a.role,
        lease_ttl_ms: u64::from(a.lease_ttl_ms),
        replica_data_addr: a.replica_data_addr.clone(),
        replica_ctrl_addr: a.replica_ctrl_addr.clone(),
        replica_server_id: a.replica_server_id.clone(),
        rebuild_addr: a.rebuild_addr.clone(),
        replica_addrs: a
            .replica_addrs
            .iter()
            .map(|r| ReplicaAddr {
                data_addr: r.data_addr.clone(),
                ctrl_addr: r.ctrl_addr.clone(),
                server_id: r.server_id.clone(),
            })
            .collect(),
        addr_version: 0,
    }
}

/// controlbridge's assignment as the protocol's (a lease above `u32::MAX` ms is capped).
pub fn assignment_to_proto(a: &BlockVolumeAssignment) -> master_pb::BlockVolumeAssignment {
    master_pb::BlockVolumeAssignment {
        path: a.path.clone(),
        epoch: a.epoch,
        role: a.role,
        lease_ttl_ms: u32::try_from(a.lease_ttl_ms).unwrap_or(u32::MAX),
        replica_data_addr: a.replica_data_addr.clone(),
        replica_ctrl_addr: a.replica_ctrl_addr.clone(),
        rebuild_addr: a.rebuild_addr.clone(),
        replica_addrs: a
            .replica_addrs
            .iter()
            .map(|r| master_pb::ReplicaAddrMessage {
                data_addr: r.data_addr.clone(),
                ctrl_addr: r.ctrl_addr.clone(),
                server_id: r.server_id.clone(),
            })
            .collect(),
        replica_server_id: a.replica_server_id.clone(),
    }
}

/// A volume's inventory entry, as a heartbeat reports it.
pub fn volume_info(v: &VolumeInfo, data_addr: &str) -> master_pb::BlockVolumeInfoMessage {
    master_pb::BlockVolumeInfoMessage {
        path: v.name.clone(),
        volume_size: v.size_bytes,
        block_size: v.block_size,
        epoch: v.epoch,
        role: v.role.to_wire(),
        wal_head_lsn: v.head,
        checkpoint_lsn: v.checkpoint,
        has_lease: v.has_lease,
        replica_data_addr: data_addr.to_owned(),
        replica_ctrl_addr: data_addr.to_owned(),
        health_score: health_score(v),
        replica_degraded: v.replica_degraded,
        durability_mode: v.mode.as_str().to_owned(),
        needs_rebuild: Some(v.needs_rebuild),
        replica_ready: Some(v.role == BlockRole::Replica && !v.needs_rebuild),
        scrub_errors: i64::try_from(v.scrub.damaged).unwrap_or(i64::MAX),
        last_scrub_time: i64::try_from(v.scrub.last_pass_unix).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// 1.0 for a healthy copy; half for a degraded replica set or a copy that needs a rebuild;
/// 0.1 less per block scrubbing found damaged and nothing repaired, at most 0.5 less.
pub fn health_score(v: &VolumeInfo) -> f64 {
    let base = if v.replica_degraded || v.needs_rebuild {
        0.5
    } else {
        1.0
    };
    base - (0.1 * v.scrub.damaged.min(5) as f64)
}

/// The volume name a request names: a name, or a path to `NAME.vol` (the protocol's `path`
/// fields name files on the volume server).
pub fn volume_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.strip_suffix(".vol").unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_round_trip_and_paths_name_volumes() {
        let a = BlockVolumeAssignment {
            path: "v1".into(),
            epoch: 7,
            role: BlockRole::Primary.to_wire(),
            lease_ttl_ms: 4000,
            replica_addrs: vec![ReplicaAddr {
                data_addr: "127.0.0.1:1".into(),
                ctrl_addr: "127.0.0.1:2".into(),
                server_id: "vs2".into(),
            }],
            ..BlockVolumeAssignment::default()
        };
        assert_eq!(assignment_from_proto(&assignment_to_proto(&a)), a);
        let big = BlockVolumeAssignment {
            lease_ttl_ms: u64::MAX,
            ..a
        };
        assert_eq!(assignment_to_proto(&big).lease_ttl_ms, u32::MAX);
        assert_eq!(volume_name("/data/vs1/v1.vol"), "v1");
        assert_eq!(volume_name("v1"), "v1");
    }
}
