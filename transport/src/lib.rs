//! Replication between processes.
//!
//! Two layers a reader can see:
//! - [`wire`]: the protocol, sans I/O. Frames in, bytes out; a [`wire::Decoder`] turns any byte
//!   sequence into messages or a typed error, and never allocates more than one frame's
//!   maximum. Every frame carries a CRC32C; every mutating request carries its lineage and every
//!   reply echoes it; peers authenticate each other by HMAC-SHA256 over a cluster secret. The
//!   byte-level description is `docs/wire.md`, kept true by a test.
//! - [`net`]: the same over TCP. [`net::ReplicaServer`] serves many replica volumes on one
//!   listener (dispatch by volume name, the same lineage admission as
//!   [`v2bridge::LocalReplica`]); [`net::RemoteReplica`] is a [`v2bridge::ReplicaTarget`] in
//!   another process, so the engine's executors and `v2bridge::BridgeIo` recover a replica over
//!   the network exactly as they do in process.
//!
//! A replica in another process, recovered by catch-up through the unchanged bridge:
//!
//! ```
//! use std::sync::Arc;
//! use transport::net::{ClientConfig, RemoteReplica, ReplicaServer, ServerConfig, Volumes};
//! use v2bridge::{LocalReplica, ReplicaTarget};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let opts = blockvol::CreateOptions { volume_size_bytes: 1 << 20, wal_size_bytes: 1 << 20, block_size: 4096 };
//! # let vol = blockvol::Volume::create(dir.path().join("r.vol"), &opts, &blockvol::OpenOptions::default())?;
//! # vol.assign(blockvol::Role::Replica, blockvol::Epoch(1))?;
//! let volumes = Arc::new(Volumes::new());
//! volumes.insert("vol1", LocalReplica::new(Arc::new(vol)));
//! let server = ReplicaServer::start("127.0.0.1:0".parse()?, ServerConfig::default(), volumes)?;
//!
//! let mut replica = RemoteReplica::connect(server.local_addr(), "vol1", &ClientConfig::default())?;
//! let reply = replica.handshake()?;
//! assert_eq!(reply.head, blockvol::Lsn(0));
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod net;
pub mod stream;
pub mod wire;

#[cfg(feature = "testing")]
pub mod harness;
