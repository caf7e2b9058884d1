//! Golden interop tests of the generated protobuf code against Debian's `protoc`, an encoder and
//! decoder we did not write.
//!
//! Each case is a message in protobuf text form (`tests/golden/<case>.txtpb`) and the Rust value
//! it must mean. For every case:
//! (a) `protoc --encode` turns the text into bytes, and prost decodes them to the Rust value;
//! (b) prost encodes the Rust value, and `protoc --decode` turns the bytes back into the text
//!     (whitespace and comments aside), with our `.proto` and with upstream's;
//! (c) prost's bytes equal protoc's: both write known fields in field-number order (prost's
//!     derive sorts them by tag, whatever the declaration order), with packed repeated scalars
//!     and no unknown fields, so there is one encoding and both must produce it. The one
//!     exception found: a `double` set to -0.0 (`negative_zero_is_the_one_encoding_difference`).
//! Random values go through protoc too (`random`): protoc decodes whatever prost writes and
//! writes it back as the same bytes.
//! Every message type of our two `.proto` files has a case that sets every field (checked from
//! the descriptors: every field present, optional ones not at their default, repeated ones with
//! two elements or more, and the first element of a nested message set whole, recursively).
//!
//! `protoc` must be installed (`apt-get install -y protobuf-compiler`; `.ci/run` does it): when
//! it is missing these tests fail and say so.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use prost::Message;
use protox::prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value};

use server::proto::master_pb::{
    BlockVolumeAssignment, BlockVolumeInfoMessage, BlockVolumeShortInfoMessage,
    CreateBlockVolumeRequest, CreateBlockVolumeResponse, DeleteBlockVolumeRequest,
    DeleteBlockVolumeResponse, Heartbeat, HeartbeatResponse, LookupBlockVolumeRequest,
    LookupBlockVolumeResponse, ReplicaAddrMessage,
};
use server::proto::volume_server_pb::{
    AllocateBlockVolumeRequest, AllocateBlockVolumeResponse, QueryBlockPromotionEvidenceRequest,
    QueryBlockPromotionEvidenceResponse, VolumeServerDeleteBlockVolumeRequest,
    VolumeServerDeleteBlockVolumeResponse,
};

// ---------------------------------------------------------------------------------------------
// protoc

const INSTALL_HINT: &str = "install Debian's protobuf-compiler (`apt-get update && apt-get \
     install -y protobuf-compiler`; .ci/run does), or set PROTOC to a protoc binary";

/// Which `.proto` files protoc reads: ours (`proto/`) or upstream's (`proto/upstream/`).
#[derive(Clone, Copy, Debug)]
enum Schema {
    Ours,
    Upstream,
}

impl Schema {
    fn dir(self) -> PathBuf {
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        match self {
            Schema::Ours => proto,
            Schema::Upstream => proto.join("upstream"),
        }
    }
}

struct Protoc {
    program: PathBuf,
}

impl Protoc {
    /// A protoc that answers `--version`, or why not.
    fn locate(program: &Path) -> Result<Protoc, String> {
        match Command::new(program).arg("--version").output() {
            Ok(out) if out.status.success() => Ok(Protoc {
                program: program.to_owned(),
            }),
            Ok(out) => Err(format!(
                "`{} --version` failed ({}): {INSTALL_HINT}",
                program.display(),
                out.status
            )),
            Err(e) => Err(format!(
                "cannot run `{}` ({e}): {INSTALL_HINT}",
                program.display()
            )),
        }
    }

    /// `PROTOC` if set, else `protoc` on the `PATH`; a missing protoc fails the test.
    fn get() -> &'static Protoc {
        static PROTOC: OnceLock<Result<Protoc, String>> = OnceLock::new();
        let found = PROTOC.get_or_init(|| {
            let program = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
            Protoc::locate(Path::new(&program))
        });
        match found {
            Ok(p) => p,
            Err(e) => panic!("protoc is required by the interop tests: {e}"),
        }
    }

    fn run(
        &self,
        schema: Schema,
        file: &str,
        args: &[String],
        input: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut child = Command::new(&self.program)
            .arg(format!("--proto_path={}", schema.dir().display()))
            .args(args)
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.program.display()))?;
        // Inputs are a few hundred bytes, far below a pipe's buffer, so writing everything
        // before reading cannot deadlock.
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .map_err(|e| format!("write to protoc: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for protoc: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "protoc {args:?} {file} ({schema:?}) failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }

    fn encode(
        &self,
        schema: Schema,
        file: &str,
        message: &str,
        text: &str,
    ) -> Result<Vec<u8>, String> {
        self.run(
            schema,
            file,
            &[format!("--encode={message}")],
            text.as_bytes(),
        )
    }

    fn decode(
        &self,
        schema: Schema,
        file: &str,
        message: &str,
        bytes: &[u8],
    ) -> Result<String, String> {
        let out = self.run(schema, file, &[format!("--decode={message}")], bytes)?;
        String::from_utf8(out).map_err(|e| format!("protoc printed non-UTF-8: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txtpb"))
}

fn golden(name: &str) -> String {
    let path = golden_path(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn golden_if_any(name: &str) -> Option<String> {
    std::fs::read_to_string(golden_path(name)).ok()
}

/// Text form without indentation, blank lines or `#` comment lines: protoc's layout and the
/// golden files' may differ only there.
fn normalize(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Our descriptors, parsed by protox, for the checks that a case sets every field.
fn our_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut c = protox::Compiler::new([Schema::Ours.dir()]).expect("protox compiler");
        c.open_files(["master.proto", "volume_server.proto"])
            .expect("protox parses our files");
        c.descriptor_pool()
    })
}

/// Where `msg` leaves a field unset or at its default, has fewer than two elements in a
/// repeated field, or (recursively) where a nested message or a repeated field's first message
/// does.
fn unset_fields(msg: &DynamicMessage, path: &str, out: &mut Vec<String>) {
    for f in msg.descriptor().fields() {
        let at = format!("{path}.{}", f.name());
        if !msg.has_field(&f) {
            out.push(format!("{at} unset"));
            continue;
        }
        match &*msg.get_field(&f) {
            Value::List(items) => {
                if items.len() < 2 {
                    out.push(format!(
                        "{at} has {} element(s), want 2 or more",
                        items.len()
                    ));
                }
                if let Some(Value::Message(first)) = items.first() {
                    unset_fields(first, &format!("{at}[0]"), out);
                }
            }
            Value::Message(m) => unset_fields(m, &at, out),
            v if *v == f.default_value() => out.push(format!("{at} present at its default")),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The check

struct Case {
    /// `tests/golden/<golden>.txtpb`.
    golden: &'static str,
    /// `master.proto` or `volume_server.proto`.
    file: &'static str,
    /// Full name, e.g. `master_pb.Heartbeat`.
    message: &'static str,
    /// Whether the case must set every field (see `unset_fields`).
    whole: bool,
    /// Runs (a), (b), (c) with the case's Rust value; returns prost's bytes.
    run: fn(&Case) -> Result<Vec<u8>, String>,
}

fn check<M: Message + Default + PartialEq + Debug>(
    case: &Case,
    expected: M,
) -> Result<Vec<u8>, String> {
    let protoc = Protoc::get();
    let text = golden(case.golden);

    // (a) protoc's encoding of the text decodes to the value.
    let theirs = protoc.encode(Schema::Ours, case.file, case.message, &text)?;
    let decoded = M::decode(theirs.as_slice()).map_err(|e| {
        format!(
            "(a) prost cannot decode protoc's bytes {}: {e}",
            hex(&theirs)
        )
    })?;
    if decoded != expected {
        return Err(format!(
            "(a) prost decoded protoc's bytes to\n{decoded:#?}\nbut the case's value is\n{expected:#?}"
        ));
    }

    // (c) the same bytes.
    let ours = expected.encode_to_vec();
    if ours != theirs {
        return Err(format!(
            "(c) bytes differ\n  prost:  {}\n  protoc: {}",
            hex(&ours),
            hex(&theirs)
        ));
    }

    // (b) protoc decodes prost's bytes to the text, with our schema and with upstream's (which
    // prints our own fields, numbered from 1000, as unknown ones: `<case>.upstream.txtpb`).
    let upstream_text = golden_if_any(&format!("{}.upstream", case.golden));
    for schema in [Schema::Ours, Schema::Upstream] {
        let want = match (schema, &upstream_text) {
            (Schema::Upstream, Some(t)) => normalize(t),
            _ => normalize(&text),
        };
        let printed = protoc.decode(schema, case.file, case.message, &ours)?;
        if normalize(&printed) != want {
            return Err(format!(
                "(b) protoc ({schema:?} schema) decoded prost's bytes to\n{printed}\nbut the golden text is\n{}",
                want.join("\n")
            ));
        }
    }

    if case.whole {
        let desc = our_pool()
            .get_message_by_name(case.message)
            .ok_or_else(|| format!("{} not in our descriptors", case.message))?;
        let dynamic = DynamicMessage::decode(desc, ours.as_slice())
            .map_err(|e| format!("prost-reflect cannot decode: {e}"))?;
        let mut unset = Vec::new();
        unset_fields(&dynamic, case.message, &mut unset);
        if !unset.is_empty() {
            return Err(format!(
                "the case must set every field:\n{}",
                unset.join("\n")
            ));
        }
    }
    Ok(ours)
}

/// `whole!(golden, message, value)`: a case that sets every field; `partial!(...)`: one that
/// does not (a particular shape, such as a lease renewal). The `.proto` file follows from the
/// message's package.
macro_rules! case {
    ($whole:literal, $golden:literal, $message:literal, $value:expr) => {
        Case {
            golden: $golden,
            file: proto_file($message),
            message: $message,
            whole: $whole,
            run: |c| check(c, $value),
        }
    };
}

macro_rules! whole {
    ($golden:literal, $message:literal, $value:expr $(,)?) => {
        case!(true, $golden, $message, $value)
    };
}

macro_rules! partial {
    ($golden:literal, $message:literal, $value:expr $(,)?) => {
        case!(false, $golden, $message, $value)
    };
}

fn proto_file(message: &str) -> &'static str {
    match message.split_once('.') {
        Some(("master_pb", _)) => "master.proto",
        Some(("volume_server_pb", _)) => "volume_server.proto",
        _ => panic!("{message}: not in one of our packages"),
    }
}

// ---------------------------------------------------------------------------------------------
// Values: every field set, with edge values (u64::MAX, u32::MAX, a negative int64, non-ASCII
// text) among realistic ones.

fn replica_addr() -> ReplicaAddrMessage {
    ReplicaAddrMessage {
        data_addr: "192.0.2.12:4260".into(),
        ctrl_addr: "192.0.2.12:4261".into(),
        server_id: "vs2".into(),
    }
}

fn replica_addr_2() -> ReplicaAddrMessage {
    ReplicaAddrMessage {
        data_addr: "192.0.2.13:4260".into(),
        ctrl_addr: "192.0.2.13:4261".into(),
        server_id: "vs3".into(),
    }
}

fn assignment() -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: "/data/vs1/blk/vol1.blk".into(),
        epoch: u64::MAX,
        role: 4,
        lease_ttl_ms: u32::MAX,
        replica_data_addr: "192.0.2.12:4260".into(),
        replica_ctrl_addr: "192.0.2.12:4261".into(),
        rebuild_addr: "192.0.2.11:4262".into(),
        replica_addrs: vec![replica_addr(), replica_addr_2()],
        replica_server_id: "vs2".into(),
    }
}

/// A lease renewal: only path, epoch, role and lease_ttl_ms.
fn lease_renewal() -> BlockVolumeAssignment {
    BlockVolumeAssignment {
        path: "/data/vs1/blk/vol2.blk".into(),
        epoch: 3,
        role: 1,
        lease_ttl_ms: 30_000,
        ..Default::default()
    }
}

fn volume_info() -> BlockVolumeInfoMessage {
    BlockVolumeInfoMessage {
        path: "/data/vs1/blk/vol1.blk".into(),
        volume_size: 1 << 40,
        block_size: 4096,
        epoch: 7,
        role: 1,
        wal_head_lsn: 123_456_789,
        checkpoint_lsn: 123_456_000,
        has_lease: true,
        disk_type: "ssd".into(),
        replica_data_addr: "192.0.2.12:4260".into(),
        replica_ctrl_addr: "192.0.2.12:4261".into(),
        health_score: 0.875,
        scrub_errors: -1,
        last_scrub_time: 1_777_777_777,
        replica_degraded: true,
        durability_mode: "sync_all".into(),
        nvme_addr: "192.0.2.11:4420".into(),
        nqn: "nqn.2026-05.io.swblock:vol1".into(),
        replica_ready: Some(true),
        needs_rebuild: Some(true),
        publish_healthy: Some(true),
        volume_mode: Some("primary".into()),
        volume_mode_reason: Some("lease held".into()),
        engine_projection_mode: Some("in_sync".into()),
        activation_gated: Some(true),
        activation_gate_reason: Some("réplica en retard".into()),
    }
}

fn volume_info_2() -> BlockVolumeInfoMessage {
    BlockVolumeInfoMessage {
        path: "/data/vs1/blk/vol2.blk".into(),
        volume_size: 1 << 30,
        block_size: 512,
        epoch: 3,
        role: 2,
        durability_mode: "best_effort".into(),
        ..Default::default()
    }
}

/// Every optional field present at its default: presence must survive both encoders.
fn volume_info_present_defaults() -> BlockVolumeInfoMessage {
    BlockVolumeInfoMessage {
        path: "/data/vs1/blk/vol3.blk".into(),
        replica_ready: Some(false),
        needs_rebuild: Some(false),
        publish_healthy: Some(false),
        volume_mode: Some(String::new()),
        volume_mode_reason: Some(String::new()),
        engine_projection_mode: Some(String::new()),
        activation_gated: Some(false),
        activation_gate_reason: Some(String::new()),
        ..Default::default()
    }
}

fn short_info() -> BlockVolumeShortInfoMessage {
    BlockVolumeShortInfoMessage {
        path: "/data/vs1/blk/vol4.blk".into(),
        volume_size: 64 << 30,
        block_size: 4096,
        disk_type: "hdd".into(),
    }
}

fn short_info_2() -> BlockVolumeShortInfoMessage {
    BlockVolumeShortInfoMessage {
        path: "/data/vs1/blk/vol5.blk".into(),
        volume_size: 1 << 30,
        block_size: 512,
        disk_type: "ssd".into(),
    }
}

fn heartbeat() -> Heartbeat {
    Heartbeat {
        ip: "192.0.2.11".into(),
        port: 8080,
        public_url: "vs1.example.net:8080".into(),
        data_center: "dc1".into(),
        rack: "rack-ä".into(),
        grpc_port: 18080,
        location_uuids: vec![
            "6f1e8a52-0d4b-4c1e-9a57-1c2d3e4f5a6b".into(),
            "0b7c9d2e-5f60-4a71-8b92-a3b4c5d6e7f8".into(),
        ],
        id: "vs1".into(),
        block_volume_infos: vec![volume_info(), volume_info_2()],
        new_block_volumes: vec![short_info(), short_info_2()],
        deleted_block_volumes: vec![short_info_2(), short_info()],
        has_no_block_volumes: true,
        block_nvme_addr: "192.0.2.11:4420".into(),
        block_volume_inventory_authoritative: Some(true),
    }
}

/// A delta heartbeat as the volume server sends between inventories: field 29 absent.
fn heartbeat_delta() -> Heartbeat {
    Heartbeat {
        ip: "192.0.2.11".into(),
        port: 8080,
        grpc_port: 18080,
        id: "vs1".into(),
        new_block_volumes: vec![short_info()],
        deleted_block_volumes: vec![short_info_2()],
        ..Default::default()
    }
}

/// An empty inventory that is explicitly not authoritative: field 29 present and false.
fn heartbeat_not_authoritative() -> Heartbeat {
    Heartbeat {
        id: "vs1".into(),
        has_no_block_volumes: true,
        block_volume_inventory_authoritative: Some(false),
        ..Default::default()
    }
}

fn heartbeat_response() -> HeartbeatResponse {
    HeartbeatResponse {
        leader: "192.0.2.1:9333".into(),
        duplicated_uuids: vec![
            "6f1e8a52-0d4b-4c1e-9a57-1c2d3e4f5a6b".into(),
            "0b7c9d2e-5f60-4a71-8b92-a3b4c5d6e7f8".into(),
        ],
        block_volume_assignments: vec![assignment(), lease_renewal()],
    }
}

fn create_request() -> CreateBlockVolumeRequest {
    CreateBlockVolumeRequest {
        name: "vol1".into(),
        size_bytes: 1 << 40,
        disk_type: "ssd".into(),
        replica_factor: 3,
        durability_mode: "sync_quorum".into(),
        wal_size_bytes: 64 << 20,
    }
}

fn create_response() -> CreateBlockVolumeResponse {
    CreateBlockVolumeResponse {
        volume_id: "vol1".into(),
        volume_server: "192.0.2.11:8080".into(),
        iscsi_addr: "192.0.2.11:3260".into(),
        iqn: "iqn.2026-05.io.swblock:vol1".into(),
        capacity_bytes: 1 << 40,
        replica_server: "192.0.2.12:8080".into(),
        replica_servers: vec!["192.0.2.12:8080".into(), "192.0.2.13:8080".into()],
        nvme_addr: "192.0.2.11:4420".into(),
        nqn: "nqn.2026-05.io.swblock:vol1".into(),
    }
}

fn lookup_response() -> LookupBlockVolumeResponse {
    LookupBlockVolumeResponse {
        volume_server: "192.0.2.11:8080".into(),
        iscsi_addr: "192.0.2.11:3260".into(),
        iqn: "iqn.2026-05.io.swblock:vol1".into(),
        capacity_bytes: 1 << 40,
        replica_server: "192.0.2.12:8080".into(),
        replica_factor: 3,
        replica_servers: vec!["192.0.2.12:8080".into(), "192.0.2.13:8080".into()],
        durability_mode: "sync_all".into(),
        nvme_addr: "192.0.2.11:4420".into(),
        nqn: "nqn.2026-05.io.swblock:vol1".into(),
    }
}

fn allocate_request() -> AllocateBlockVolumeRequest {
    AllocateBlockVolumeRequest {
        name: "vol1".into(),
        size_bytes: 1 << 40,
        disk_type: "ssd".into(),
        durability_mode: "best_effort".into(),
        wal_size_bytes: 64 << 20,
    }
}

fn allocate_response() -> AllocateBlockVolumeResponse {
    AllocateBlockVolumeResponse {
        path: "/data/vs1/blk/vol1.blk".into(),
        iqn: "iqn.2026-05.io.swblock:vol1".into(),
        iscsi_addr: "192.0.2.11:3260".into(),
        replica_data_addr: "192.0.2.11:4260".into(),
        replica_ctrl_addr: "192.0.2.11:4261".into(),
        rebuild_listen_addr: "192.0.2.11:4262".into(),
        nvme_addr: "192.0.2.11:4420".into(),
        nqn: "nqn.2026-05.io.swblock:vol1".into(),
    }
}

fn evidence_request() -> QueryBlockPromotionEvidenceRequest {
    QueryBlockPromotionEvidenceRequest {
        path: "/data/vs2/blk/vol1.blk".into(),
        expected_epoch: 8,
    }
}

fn evidence_response() -> QueryBlockPromotionEvidenceResponse {
    QueryBlockPromotionEvidenceResponse {
        path: "/data/vs2/blk/vol1.blk".into(),
        epoch: 8,
        committed_lsn: 123_456_789,
        wal_head_lsn: 123_456_790,
        checkpoint_lsn: 123_456_000,
        engine_projection_mode: "in_sync".into(),
        eligible: true,
        reason: "holds the committed prefix".into(),
        health_score: 0.25,
        last_entry_epoch: 7,
    }
}

fn cases() -> Vec<Case> {
    vec![
        whole!("heartbeat", "master_pb.Heartbeat", heartbeat()),
        partial!("heartbeat_delta", "master_pb.Heartbeat", heartbeat_delta()),
        partial!(
            "heartbeat_not_authoritative",
            "master_pb.Heartbeat",
            heartbeat_not_authoritative()
        ),
        whole!(
            "heartbeat_response",
            "master_pb.HeartbeatResponse",
            heartbeat_response()
        ),
        whole!(
            "block_volume_info",
            "master_pb.BlockVolumeInfoMessage",
            volume_info()
        ),
        partial!(
            "block_volume_info_present_defaults",
            "master_pb.BlockVolumeInfoMessage",
            volume_info_present_defaults()
        ),
        whole!(
            "block_volume_short_info",
            "master_pb.BlockVolumeShortInfoMessage",
            short_info()
        ),
        whole!(
            "block_volume_assignment",
            "master_pb.BlockVolumeAssignment",
            assignment()
        ),
        partial!(
            "block_volume_assignment_lease_renewal",
            "master_pb.BlockVolumeAssignment",
            lease_renewal()
        ),
        whole!(
            "replica_addr",
            "master_pb.ReplicaAddrMessage",
            replica_addr()
        ),
        whole!(
            "create_block_volume_request",
            "master_pb.CreateBlockVolumeRequest",
            create_request()
        ),
        whole!(
            "create_block_volume_response",
            "master_pb.CreateBlockVolumeResponse",
            create_response()
        ),
        whole!(
            "delete_block_volume_request",
            "master_pb.DeleteBlockVolumeRequest",
            DeleteBlockVolumeRequest {
                name: "vol1".into()
            }
        ),
        whole!(
            "delete_block_volume_response",
            "master_pb.DeleteBlockVolumeResponse",
            DeleteBlockVolumeResponse {}
        ),
        whole!(
            "lookup_block_volume_request",
            "master_pb.LookupBlockVolumeRequest",
            LookupBlockVolumeRequest {
                name: "vol1".into()
            }
        ),
        whole!(
            "lookup_block_volume_response",
            "master_pb.LookupBlockVolumeResponse",
            lookup_response()
        ),
        whole!(
            "allocate_block_volume_request",
            "volume_server_pb.AllocateBlockVolumeRequest",
            allocate_request()
        ),
        whole!(
            "allocate_block_volume_response",
            "volume_server_pb.AllocateBlockVolumeResponse",
            allocate_response()
        ),
        whole!(
            "volume_server_delete_block_volume_request",
            "volume_server_pb.VolumeServerDeleteBlockVolumeRequest",
            VolumeServerDeleteBlockVolumeRequest {
                name: "vol1".into()
            }
        ),
        whole!(
            "volume_server_delete_block_volume_response",
            "volume_server_pb.VolumeServerDeleteBlockVolumeResponse",
            VolumeServerDeleteBlockVolumeResponse {}
        ),
        whole!(
            "query_block_promotion_evidence_request",
            "volume_server_pb.QueryBlockPromotionEvidenceRequest",
            evidence_request()
        ),
        whole!(
            "query_block_promotion_evidence_response",
            "volume_server_pb.QueryBlockPromotionEvidenceResponse",
            evidence_response()
        ),
    ]
}

fn run_case(name: &str) -> Vec<u8> {
    let all = cases();
    let case = all
        .iter()
        .find(|c| c.golden == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    (case.run)(case).unwrap_or_else(|e| panic!("case {name} ({}): {e}", case.message))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_case_round_trips_through_protoc() {
    let mut failures = Vec::new();
    let all = cases();
    for case in &all {
        if let Err(e) = (case.run)(case) {
            failures.push(format!("case {} ({}): {e}", case.golden, case.message));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_message_of_ours_has_a_case_setting_every_field() {
    let declared: BTreeSet<String> = our_pool()
        .all_messages()
        .map(|m| m.full_name().to_owned())
        .collect();
    let covered: BTreeSet<String> = cases()
        .iter()
        .filter(|c| c.whole)
        .map(|c| c.message.to_owned())
        .collect();
    assert_eq!(declared.len(), 18, "{declared:?}");
    assert_eq!(declared, covered);
}

#[test]
fn golden_files_are_all_used() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut used: BTreeSet<String> = cases()
        .iter()
        .map(|c| format!("{}.txtpb", c.golden))
        .collect();
    used.extend(UPSTREAM_GOLDEN.iter().map(|g| format!("{g}.txtpb")));
    // How upstream's schema prints a case holding fields of our own.
    used.extend(
        cases()
            .iter()
            .map(|c| format!("{}.upstream.txtpb", c.golden))
            .filter(|f| on_disk.contains(f)),
    );
    assert_eq!(on_disk, used);
}

#[test]
fn field_29_tells_false_from_absent() {
    // Present and false: tag 29, varint (0xe8 0x01), then 0.
    let present = run_case("heartbeat_not_authoritative");
    assert!(
        present.windows(3).any(|w| w == [0xe8, 0x01, 0x00]),
        "{}",
        hex(&present)
    );
    // Absent: no field 29 at all.
    let absent = run_case("heartbeat_delta");
    let decoded = Heartbeat::decode(absent.as_slice()).expect("decodes");
    assert_eq!(decoded.block_volume_inventory_authoritative, None);
    let printed = Protoc::get()
        .decode(Schema::Ours, "master.proto", "master_pb.Heartbeat", &absent)
        .expect("protoc decodes");
    assert!(
        !printed.contains("block_volume_inventory_authoritative"),
        "{printed}"
    );
}

/// Golden files in upstream's schema, with fields we do not keep.
const UPSTREAM_GOLDEN: [&str; 2] = ["upstream_heartbeat", "upstream_heartbeat_response"];

/// Bytes protoc encodes from upstream's `master.proto`, with fields ours leaves out (file
/// volumes, EC shards, a map, a nested message of another package), decode with prost: the
/// unknown fields are skipped and the fields we keep are read.
fn check_upstream<M: Message + Default + PartialEq + Debug>(
    golden_name: &str,
    message: &str,
    expected: M,
) {
    let protoc = Protoc::get();
    let text = golden(golden_name);
    let bytes = protoc
        .encode(Schema::Upstream, "master.proto", message, &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let decoded = M::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("prost cannot decode upstream's {message}: {e}"));
    assert_eq!(decoded, expected);
    // The unknown fields were there (so this test could fail): protoc, reading the same bytes
    // with our schema, prints them by number.
    let printed = protoc
        .decode(Schema::Ours, "master.proto", message, &bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    let unknown: Vec<&str> = printed
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(unknown.len() >= 4, "too few unknown fields:\n{printed}");
    assert!(bytes.len() > decoded.encode_to_vec().len());
}

#[test]
fn upstream_heartbeat_with_fields_we_do_not_keep_decodes() {
    check_upstream(
        "upstream_heartbeat",
        "master_pb.Heartbeat",
        Heartbeat {
            ip: "192.0.2.11".into(),
            port: 8080,
            public_url: "vs1.example.net:8080".into(),
            data_center: "dc1".into(),
            rack: "rack1".into(),
            grpc_port: 18080,
            location_uuids: vec!["6f1e8a52-0d4b-4c1e-9a57-1c2d3e4f5a6b".into()],
            id: "vs1".into(),
            block_volume_infos: vec![volume_info_2()],
            block_nvme_addr: "192.0.2.11:4420".into(),
            block_volume_inventory_authoritative: Some(true),
            ..Default::default()
        },
    );
}

#[test]
fn upstream_heartbeat_response_with_fields_we_do_not_keep_decodes() {
    check_upstream(
        "upstream_heartbeat_response",
        "master_pb.HeartbeatResponse",
        HeartbeatResponse {
            leader: "192.0.2.1:9333".into(),
            duplicated_uuids: vec![],
            block_volume_assignments: vec![lease_renewal()],
        },
    );
}

/// The one difference in bytes found between prost and protoc: a proto3 `double` without
/// presence set to -0.0. protoc (like Go's protobuf) compares the bits with zero and writes it;
/// prost compares the value (-0.0 == 0.0) and leaves it out, so it arrives as 0.0. Both decode
/// the other's bytes; only the sign of a zero health score is lost, which means nothing to us.
#[test]
fn negative_zero_is_the_one_encoding_difference() {
    let protoc = Protoc::get();
    let (file, message) = (
        "volume_server.proto",
        "volume_server_pb.QueryBlockPromotionEvidenceResponse",
    );
    let theirs = protoc
        .encode(Schema::Ours, file, message, "health_score: -0.0")
        .expect("protoc encodes");
    assert_eq!(
        theirs,
        [0x49, 0, 0, 0, 0, 0, 0, 0, 0x80],
        "field 9, fixed64, -0.0"
    );
    let decoded = QueryBlockPromotionEvidenceResponse::decode(theirs.as_slice()).expect("decodes");
    assert_eq!(decoded.health_score.to_bits(), (-0.0f64).to_bits());
    assert!(decoded.encode_to_vec().is_empty(), "prost leaves -0.0 out");
}

#[test]
fn a_missing_protoc_is_reported_not_skipped() {
    let err = match Protoc::locate(Path::new("/nonexistent/protoc")) {
        Ok(_) => panic!("a nonexistent protoc was accepted"),
        Err(e) => e,
    };
    assert!(err.contains("protobuf-compiler"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Random values: whatever prost writes, protoc reads as the same fields and writes back as the
// same bytes, and prost reads those back as the same value.

mod random {
    use super::*;
    use proptest::prelude::*;

    /// Short text, sometimes arbitrary Unicode (quotes, backslashes, control characters).
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => "[a-z0-9./:_-]{0,12}",
            1 => any::<String>(),
        ]
    }

    /// Finite doubles and the infinities. Not NaN (it never equals itself) and not -0.0 (see
    /// `negative_zero_is_the_one_encoding_difference`).
    fn double() -> impl Strategy<Value = f64> {
        prop_oneof![
            3 => any::<f64>().prop_filter("finite, not -0.0", |d| {
                d.is_finite() && d.to_bits() != (-0.0f64).to_bits()
            }),
            1 => prop_oneof![Just(0.0), Just(1.0), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(f64::MIN_POSITIVE)],
        ]
    }

    fn u64s() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), Just(1), Just(u64::MAX), any::<u64>()]
    }

    fn i64s() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0),
            Just(-1),
            Just(i64::MIN),
            Just(i64::MAX),
            any::<i64>()
        ]
    }

    fn u32s() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>()]
    }

    prop_compose! {
        fn volume_info_numbers()(
            volume_size in u64s(), block_size in u32s(), epoch in u64s(), role in u32s(),
            wal_head_lsn in u64s(), checkpoint_lsn in u64s(), health_score in double(),
            scrub_errors in i64s(), last_scrub_time in i64s(),
        ) -> (u64, u32, u64, u32, u64, u64, f64, i64, i64) {
            (volume_size, block_size, epoch, role, wal_head_lsn, checkpoint_lsn, health_score,
             scrub_errors, last_scrub_time)
        }
    }

    prop_compose! {
        fn volume_info_texts()(
            path in text(), disk_type in text(), replica_data_addr in text(),
            replica_ctrl_addr in text(), durability_mode in text(), nvme_addr in text(),
            nqn in text(),
        ) -> [String; 7] {
            [path, disk_type, replica_data_addr, replica_ctrl_addr, durability_mode, nvme_addr, nqn]
        }
    }

    prop_compose! {
        fn volume_info_options()(
            bools in proptest::array::uniform4(proptest::option::of(any::<bool>())),
            texts in proptest::array::uniform4(proptest::option::of(text())),
            has_lease in any::<bool>(), replica_degraded in any::<bool>(),
        ) -> ([Option<bool>; 4], [Option<String>; 4], bool, bool) {
            (bools, texts, has_lease, replica_degraded)
        }
    }

    prop_compose! {
        fn volume_info()(
            n in volume_info_numbers(), t in volume_info_texts(), o in volume_info_options(),
        ) -> BlockVolumeInfoMessage {
            let [path, disk_type, replica_data_addr, replica_ctrl_addr, durability_mode, nvme_addr, nqn] = t;
            let ([replica_ready, needs_rebuild, publish_healthy, activation_gated], texts, has_lease, replica_degraded) = o;
            let [volume_mode, volume_mode_reason, engine_projection_mode, activation_gate_reason] = texts;
            BlockVolumeInfoMessage {
                path, volume_size: n.0, block_size: n.1, epoch: n.2, role: n.3,
                wal_head_lsn: n.4, checkpoint_lsn: n.5, has_lease, disk_type,
                replica_data_addr, replica_ctrl_addr, health_score: n.6, scrub_errors: n.7,
                last_scrub_time: n.8, replica_degraded, durability_mode, nvme_addr, nqn,
                replica_ready, needs_rebuild, publish_healthy, volume_mode, volume_mode_reason,
                engine_projection_mode, activation_gated, activation_gate_reason,
            }
        }
    }

    prop_compose! {
        fn short_info()(path in text(), volume_size in u64s(), block_size in u32s(), disk_type in text())
            -> BlockVolumeShortInfoMessage {
            BlockVolumeShortInfoMessage { path, volume_size, block_size, disk_type }
        }
    }

    prop_compose! {
        fn heartbeat()(
            ip in text(), port in u32s(), public_url in text(), data_center in text(),
            rack in text(), grpc_port in u32s(),
            location_uuids in proptest::collection::vec(text(), 0..3), id in text(),
            block_volume_infos in proptest::collection::vec(volume_info(), 0..3),
            deltas in (proptest::collection::vec(short_info(), 0..3), proptest::collection::vec(short_info(), 0..3)),
            tail in (any::<bool>(), text(), proptest::option::of(any::<bool>())),
        ) -> Heartbeat {
            Heartbeat {
                ip, port, public_url, data_center, rack, grpc_port, location_uuids, id,
                block_volume_infos, new_block_volumes: deltas.0, deleted_block_volumes: deltas.1,
                has_no_block_volumes: tail.0, block_nvme_addr: tail.1,
                block_volume_inventory_authoritative: tail.2,
            }
        }
    }

    prop_compose! {
        fn replica_addr()(data_addr in text(), ctrl_addr in text(), server_id in text()) -> ReplicaAddrMessage {
            ReplicaAddrMessage { data_addr, ctrl_addr, server_id }
        }
    }

    prop_compose! {
        fn assignment()(
            path in text(), epoch in u64s(), role in u32s(), lease_ttl_ms in u32s(),
            addrs in proptest::array::uniform3(text()),
            replica_addrs in proptest::collection::vec(replica_addr(), 0..3),
            replica_server_id in text(),
        ) -> BlockVolumeAssignment {
            let [replica_data_addr, replica_ctrl_addr, rebuild_addr] = addrs;
            BlockVolumeAssignment {
                path, epoch, role, lease_ttl_ms, replica_data_addr, replica_ctrl_addr,
                rebuild_addr, replica_addrs, replica_server_id,
            }
        }
    }

    prop_compose! {
        fn heartbeat_response()(
            leader in text(),
            duplicated_uuids in proptest::collection::vec(text(), 0..3),
            block_volume_assignments in proptest::collection::vec(assignment(), 0..3),
        ) -> HeartbeatResponse {
            HeartbeatResponse { leader, duplicated_uuids, block_volume_assignments }
        }
    }

    prop_compose! {
        fn evidence()(
            path in text(), numbers in (u64s(), u64s(), u64s(), u64s(), u64s()),
            mode in text(), eligible in any::<bool>(), reason in text(),
            health_score in double(),
        ) -> QueryBlockPromotionEvidenceResponse {
            QueryBlockPromotionEvidenceResponse {
                path, epoch: numbers.0, committed_lsn: numbers.1, wal_head_lsn: numbers.2,
                checkpoint_lsn: numbers.3, engine_projection_mode: mode, eligible, reason,
                health_score, last_entry_epoch: numbers.4,
            }
        }
    }

    /// prost's bytes through protoc (decode to text, encode back) are the same bytes, and
    /// prost reads them as the same value.
    fn through_protoc<M: Message + Default + PartialEq + Debug>(
        file: &str,
        message: &str,
        value: &M,
    ) -> Result<(), TestCaseError> {
        let protoc = Protoc::get();
        let ours = value.encode_to_vec();
        let text = protoc
            .decode(Schema::Ours, file, message, &ours)
            .map_err(TestCaseError::fail)?;
        let theirs = protoc
            .encode(Schema::Ours, file, message, &text)
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(hex(&ours), hex(&theirs), "protoc's text:\n{}", text);
        let back = M::decode(theirs.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, value);
        Ok(())
    }

    proptest! {
        // Each case runs protoc twice (a few milliseconds each).
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn heartbeat_through_protoc(hb in heartbeat()) {
            through_protoc("master.proto", "master_pb.Heartbeat", &hb)?;
        }

        #[test]
        fn heartbeat_response_through_protoc(r in heartbeat_response()) {
            through_protoc("master.proto", "master_pb.HeartbeatResponse", &r)?;
        }

        #[test]
        fn promotion_evidence_through_protoc(e in evidence()) {
            through_protoc("volume_server.proto", "volume_server_pb.QueryBlockPromotionEvidenceResponse", &e)?;
        }
    }
}
