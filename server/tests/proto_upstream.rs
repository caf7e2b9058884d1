//! Our `.proto` files are a subset of SeaweedFS's (branch `feature/sw-block`): every package,
//! message, field, enum and RPC we declare exists upstream with the same name, number, type,
//! label and presence, and the messages we keep are whole except for the fields we list as
//! left out. The one exception is the fields of our own listed in `OURS_ONLY`, numbered from
//! 1000 and checked absent upstream. Both sets are parsed with `protox`; upstream is the copy
//! in `proto/upstream/` (so a clean clone can run this), which is also checked against the
//! shared reference copy when one lies beside the workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use protox::prost_reflect::prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, MethodDescriptorProto,
};
use protox::prost_reflect::{DescriptorPool, MessageDescriptor};

const FILES: [&str; 2] = ["master.proto", "volume_server.proto"];

/// Fields of upstream messages we deliberately do not declare (file volumes, erasure coding,
/// metrics, storage backends, server state). Every other message we declare is whole.
const LEFT_OUT: [(&str, &[u32]); 2] = [
    (
        "master_pb.Heartbeat",
        &[4, 5, 8, 9, 10, 11, 12, 16, 17, 18, 19, 23],
    ),
    ("master_pb.HeartbeatResponse", &[1, 3, 4, 5, 7]),
];

/// Fields of our own, numbered from 1000 and absent upstream: `(message, number, name)`. An
/// upstream peer skips them as unknown fields; one of ours reads them as 0 from an upstream peer.
const OURS_ONLY: [(&str, u32, &str); 1] = [(
    "volume_server_pb.QueryBlockPromotionEvidenceResponse",
    1001,
    "last_entry_epoch",
)];

fn ours_only(message: &str, number: i32) -> bool {
    OURS_ONLY
        .iter()
        .any(|(m, n, _)| *m == message && i64::from(*n) == i64::from(number))
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto")
}

fn pool(include: &Path) -> DescriptorPool {
    protox::Compiler::new([include])
        .and_then(|mut c| {
            c.include_imports(true).open_files(FILES)?;
            Ok(c.descriptor_pool())
        })
        .unwrap_or_else(|e| panic!("protox cannot compile {}: {e:?}", include.display()))
}

fn ours() -> DescriptorPool {
    pool(&proto_dir())
}

fn upstream() -> DescriptorPool {
    pool(&proto_dir().join("upstream"))
}

/// A field as declared, with its oneof given by name (indices differ when fields are left out)
/// and nothing else removed: name, number, label, type, type name, JSON name, default, options
/// and proto3 `optional` all take part in the comparison.
fn field_key(msg: &MessageDescriptor, f: &FieldDescriptorProto) -> (FieldDescriptorProto, String) {
    let oneof = f
        .oneof_index
        .map(|i| {
            msg.descriptor_proto().oneof_decl[i as usize]
                .name()
                .to_owned()
        })
        .unwrap_or_default();
    let mut f = f.clone();
    f.oneof_index = None;
    (f, oneof)
}

fn compare_message(ours: &MessageDescriptor, up: &MessageDescriptor, errors: &mut Vec<String>) {
    let name = ours.full_name();
    let (o, u): (&DescriptorProto, &DescriptorProto) =
        (ours.descriptor_proto(), up.descriptor_proto());
    for f in &o.field {
        if ours_only(name, f.number()) {
            if let Some(uf) = u.field.iter().find(|uf| uf.number == f.number) {
                errors.push(format!(
                    "{name}: our own field {} = {} collides with upstream's {}",
                    f.name(),
                    f.number(),
                    uf.name()
                ));
            }
            continue;
        }
        let Some(uf) = u.field.iter().find(|uf| uf.number == f.number) else {
            errors.push(format!(
                "{name}: field {} = {} not upstream",
                f.name(),
                f.number()
            ));
            continue;
        };
        let (mine, theirs) = (field_key(ours, f), field_key(up, uf));
        if mine != theirs {
            errors.push(format!(
                "{name}: field {} differs from upstream:\n  ours:     {mine:?}\n  upstream: {theirs:?}",
                f.number()
            ));
        }
    }
    if o.options != u.options {
        errors.push(format!("{name}: message options differ"));
    }
    if !o.extension.is_empty() || !o.extension_range.is_empty() {
        errors.push(format!("{name}: declares extensions"));
    }
    for child in ours.child_messages() {
        match up.child_messages().find(|c| c.name() == child.name()) {
            Some(uc) => compare_message(&child, &uc, errors),
            None => errors.push(format!(
                "{}: nested message not upstream",
                child.full_name()
            )),
        }
    }
    for e in &o.enum_type {
        match u.enum_type.iter().find(|ue| ue.name == e.name) {
            Some(ue) => compare_enum(&format!("{name}.{}", e.name()), e, ue, errors),
            None => errors.push(format!("{name}.{}: nested enum not upstream", e.name())),
        }
    }
}

fn compare_enum(
    name: &str,
    ours: &EnumDescriptorProto,
    up: &EnumDescriptorProto,
    errors: &mut Vec<String>,
) {
    for v in &ours.value {
        if !up.value.contains(v) {
            errors.push(format!(
                "{name}: value {} = {} not upstream",
                v.name(),
                v.number()
            ));
        }
    }
    if ours.options != up.options {
        errors.push(format!("{name}: enum options differ"));
    }
}

#[test]
fn every_declaration_of_ours_exists_upstream_unchanged() {
    let (ours, up) = (ours(), upstream());
    let mut errors = Vec::new();
    let mut counted = BTreeMap::<&str, usize>::new();

    for file in FILES {
        let mine = ours
            .get_file_by_name(file)
            .expect("our file is in our pool");
        let theirs = up
            .get_file_by_name(file)
            .expect("upstream file is in its pool");
        let (mp, tp) = (mine.file_descriptor_proto(), theirs.file_descriptor_proto());
        if mp.package != tp.package || mp.syntax != tp.syntax || mp.options != tp.options {
            errors.push(format!(
                "{file}: package/syntax/options differ: ours ({:?}, {:?}, {:?}), upstream ({:?}, {:?}, {:?})",
                mp.package, mp.syntax, mp.options, tp.package, tp.syntax, tp.options
            ));
        }
        if !mp.extension.is_empty() {
            errors.push(format!("{file}: declares extensions"));
        }
        for e in mine.enums() {
            *counted.entry("enums").or_default() += 1;
            match up.get_enum_by_name(e.full_name()) {
                Some(ue) => compare_enum(
                    e.full_name(),
                    e.enum_descriptor_proto(),
                    ue.enum_descriptor_proto(),
                    &mut errors,
                ),
                None => errors.push(format!("enum {} not upstream", e.full_name())),
            }
        }
        for m in mine.messages() {
            *counted.entry("messages").or_default() += 1;
            counted
                .entry("fields")
                .and_modify(|n| *n += m.fields().len())
                .or_insert(m.fields().len());
            match up.get_message_by_name(m.full_name()) {
                Some(um) => compare_message(&m, &um, &mut errors),
                None => errors.push(format!("message {} not upstream", m.full_name())),
            }
        }
        for s in mine.services() {
            let Some(us) = up.get_service_by_name(s.full_name()) else {
                errors.push(format!("service {} not upstream", s.full_name()));
                continue;
            };
            if s.service_descriptor_proto().options != us.service_descriptor_proto().options {
                errors.push(format!("service {}: options differ", s.full_name()));
            }
            for m in s.methods() {
                *counted.entry("rpcs").or_default() += 1;
                let mine: &MethodDescriptorProto = m.method_descriptor_proto();
                match us.methods().find(|um| um.name() == m.name()) {
                    Some(um) if um.method_descriptor_proto() == mine => {}
                    Some(um) => errors.push(format!(
                        "rpc {}: differs from upstream:\n  ours:     {mine:?}\n  upstream: {:?}",
                        m.full_name(),
                        um.method_descriptor_proto()
                    )),
                    None => errors.push(format!("rpc {} not upstream", m.full_name())),
                }
            }
        }
    }
    assert!(
        errors.is_empty(),
        "ours differs from upstream:\n{}",
        errors.join("\n")
    );
    // The comparison saw what we declare (so it could have failed).
    assert_eq!(counted.get("messages"), Some(&18), "{counted:?}");
    assert_eq!(counted.get("rpcs"), Some(&7), "{counted:?}");
    assert!(
        counted.get("fields").is_some_and(|&n| n > 100),
        "{counted:?}"
    );
}

#[test]
fn our_own_fields_are_declared_as_listed_numbered_from_1000_and_absent_upstream() {
    let (ours, up) = (ours(), upstream());
    for (message, number, name) in OURS_ONLY {
        assert!(
            number >= 1000,
            "{message}.{name}: our own numbers start at 1000"
        );
        let m = ours
            .get_message_by_name(message)
            .unwrap_or_else(|| panic!("{message} not declared"));
        let f = m
            .get_field(number)
            .unwrap_or_else(|| panic!("{message}: no field {number}"));
        assert_eq!(f.name(), name, "{message}.{number}");
        let um = up
            .get_message_by_name(message)
            .unwrap_or_else(|| panic!("{message} not upstream"));
        assert!(
            um.get_field(number).is_none(),
            "{message}.{number} upstream"
        );
        assert!(
            um.get_field_by_name(name).is_none(),
            "{message}.{name} upstream"
        );
    }
    // Every field numbered from 1000 is listed.
    for m in ours.all_messages() {
        for f in m.fields().filter(|f| f.number() >= 1000) {
            assert!(
                OURS_ONLY
                    .iter()
                    .any(|(msg, n, _)| *msg == m.full_name() && *n == f.number()),
                "{}.{} = {} is not in OURS_ONLY",
                m.full_name(),
                f.name(),
                f.number()
            );
        }
    }
}

#[test]
fn kept_messages_are_whole_except_the_listed_fields() {
    let (ours, up) = (ours(), upstream());
    let left_out: BTreeMap<&str, BTreeSet<u32>> = LEFT_OUT
        .iter()
        .map(|(name, numbers)| (*name, numbers.iter().copied().collect()))
        .collect();
    let mut errors = Vec::new();
    for m in ours.all_messages() {
        let um = up
            .get_message_by_name(m.full_name())
            .expect("checked by the other test");
        let mine: BTreeSet<u32> = m.fields().map(|f| f.number()).collect();
        let missing: BTreeSet<u32> = um
            .fields()
            .map(|f| f.number())
            .filter(|n| !mine.contains(n))
            .collect();
        let expected = left_out.get(m.full_name()).cloned().unwrap_or_default();
        if missing != expected {
            errors.push(format!(
                "{}: upstream fields we lack {missing:?}, listed as left out {expected:?}",
                m.full_name()
            ));
        }
    }
    for name in left_out.keys() {
        if ours.get_message_by_name(name).is_none() {
            errors.push(format!("{name}: listed in LEFT_OUT but not declared"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_heartbeat_block_fields_are_those_of_sw_block() {
    // The reason for pinning: these numbers mean other things on SeaweedFS main.
    let ours = ours();
    let hb = ours
        .get_message_by_name("master_pb.Heartbeat")
        .expect("Heartbeat");
    let block: Vec<(u32, &str)> = [
        (22, "id"),
        (24, "block_volume_infos"),
        (25, "new_block_volumes"),
        (26, "deleted_block_volumes"),
        (27, "has_no_block_volumes"),
        (28, "block_nvme_addr"),
        (29, "block_volume_inventory_authoritative"),
    ]
    .into();
    for (number, name) in block {
        let f = hb
            .get_field(number)
            .unwrap_or_else(|| panic!("Heartbeat field {number}"));
        assert_eq!(f.name(), name);
    }
    let f29 = hb.get_field(29).expect("field 29");
    assert!(f29.supports_presence(), "field 29 is `optional bool`");
    let resp = ours
        .get_message_by_name("master_pb.HeartbeatResponse")
        .expect("response");
    assert_eq!(
        resp.get_field(10).expect("field 10").name(),
        "block_volume_assignments"
    );
}

/// The copies in `proto/upstream/` are the shared reference files, byte for byte, when those
/// are present (a developer's machine and CI lay `shared/` beside the workspace).
#[test]
fn upstream_copies_match_the_shared_reference_when_present() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/proto");
    if !shared.is_dir() {
        eprintln!(
            "{} absent: comparing with proto/upstream/ only",
            shared.display()
        );
        return;
    }
    for file in ["master.proto", "volume_server.proto", "remote.proto"] {
        let a = std::fs::read(shared.join(file)).expect("shared reference readable");
        let b = std::fs::read(proto_dir().join("upstream").join(file)).expect("copy readable");
        assert!(
            a == b,
            "proto/upstream/{file} differs from {}",
            shared.display()
        );
    }
}
