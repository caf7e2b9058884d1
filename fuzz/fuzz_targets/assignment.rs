//! `ControlBridge::convert_assignment` on assignments whose every field comes from the
//! fuzzer: strings split at 0xFF (lossy UTF-8, so control characters, slashes and long names
//! all occur), numbers from the bytes after them. A conversion names only valid identities.
#![no_main]

use controlbridge::{BlockVolumeAssignment, ControlBridge, ReplicaAddr, validate_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xFF);
    let mut s = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let path = s();
    let local = s();
    let replica_data_addr = s();
    let replica_ctrl_addr = s();
    let replica_server_id = s();
    let rebuild_addr = s();
    let mut replica_addrs = Vec::new();
    for _ in 0..4 {
        let server_id = s();
        if server_id.is_empty() {
            break;
        }
        replica_addrs.push(ReplicaAddr {
            data_addr: s(),
            ctrl_addr: s(),
            server_id,
        });
    }
    let tail = s().into_bytes();
    let mut n = [0u8; 28];
    for (i, b) in tail.iter().take(28).enumerate() {
        n[i] = *b;
    }
    let a = BlockVolumeAssignment {
        path,
        epoch: u64::from_le_bytes(n[0..8].try_into().expect("8")),
        role: u32::from_le_bytes(n[8..12].try_into().expect("4")) % 8,
        lease_ttl_ms: u64::from_le_bytes(n[12..20].try_into().expect("8")),
        replica_data_addr,
        replica_ctrl_addr,
        replica_server_id,
        rebuild_addr,
        replica_addrs,
        addr_version: u64::from_le_bytes(n[20..28].try_into().expect("8")),
    };
    if let Ok(c) = ControlBridge.convert_assignment(&a, &local) {
        assert!(validate_name(&c.volume).is_ok());
        for r in &c.intent.replicas {
            let id = r.replica_id.to_string();
            let server = id
                .strip_prefix(&format!("{}/", c.volume))
                .expect("identity under the volume");
            assert!(validate_name(server).is_ok(), "bad identity {id:?}");
        }
    }
});
