//! Generates the protobuf messages and the gRPC clients and servers of the SeaweedFS master
//! protocol (D40) from `proto/master.proto` and `proto/volume_server.proto`.
//!
//! `protox` (pure Rust) parses the `.proto` files into a `FileDescriptorSet`, which
//! `tonic-prost-build` turns into prost messages and tonic services in `OUT_DIR`
//! (`master_pb.rs`, `volume_server_pb.rs`, included by `src/proto.rs`). No system `protoc` is
//! needed to build; `protoc` is only used by the interop tests, as an encoder we did not write.

use std::error::Error;

const PROTO_DIR: &str = "proto";
const PROTOS: [&str; 2] = ["master.proto", "volume_server.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    for file in PROTOS {
        println!("cargo:rerun-if-changed={PROTO_DIR}/{file}");
    }
    let descriptors = protox::compile(PROTOS, [PROTO_DIR])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
