//! The NBD frontend: serves block devices to NBD clients (qemu, nbd-client, libnbd tools).
//!
//! Two layers:
//! - [`proto`]: the protocol without I/O: constants, parsing of the client's handshake flags,
//!   option and request headers into typed values with typed errors, encoding of replies
//!   (simple and structured). Every length from the wire is bounded there before the socket
//!   layer allocates anything.
//! - [`server`]: [`NbdServer`], a listener thread and one thread per connection over blocking
//!   sockets with deadlines, serving the [`Exports`] it was given.
//!
//! [`device`] holds what a connection serves: the [`BlockDevice`] trait, [`Exports`],
//! [`StaticExports`] and [`VolumeDevice`] (a blockvol volume, with read-modify-write for
//! unaligned requests, a pluggable flush and a gate checked before every request).
//! [`client`] is a minimal blocking client for tools that must know which requests a server
//! acknowledged.

pub mod client;
pub mod device;
pub mod proto;
pub mod server;

pub use device::{
    BlockDevice, DeviceError, DeviceHook, ExportError, Exports, StaticExports, VolumeDevice,
};
pub use server::{NbdConfig, NbdServer, NbdServerError, NbdStats};
