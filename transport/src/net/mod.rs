//! The socket layer: the wire codec over TCP. Blocking sockets and one thread per connection
//! (see DECISIONS D35): a replica server serves a handful of peers, each connection's work is
//! disk-bound, and deadlines on every read keep a silent or trickling peer from holding a thread.

mod client;
mod conn;
mod pull;
mod reaper;
mod server;

pub use client::{ClientConfig, ClientStats, ConnectError, RemoteReplica};
pub use conn::ConnError;
pub use pull::{RemotePrimary, RemoteSource};
pub(crate) use reaper::Reaper;
pub use server::{
    HANDSHAKE_MAX_FRAME, MAX_LEASE, MAX_LEASES_PER_CONNECTION, ReplicaServer, ServerConfig,
    ServerError, ServerStats, Volumes, serve_replica_request,
};
