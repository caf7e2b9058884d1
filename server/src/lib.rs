//! The volume server.
//!
//! One process per machine, in the style of SeaweedFS's `weed`: the `swblock` binary runs a
//! volume server (`swblock volume`), the development master (`swblock master`), operator
//! commands against a master (`swblock block ...`) and a local cluster of processes
//! (`swblock cluster up|down`). Below it sit the replication transport (`transport`), the
//! recovery engine (`engine`) and the volume files (`blockvol`).
#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
pub mod convert;
pub mod frontend;
pub mod http;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod nbd;
pub mod netns;
pub mod node;
pub mod proto;
pub mod scenarios;
pub mod scrub;
pub mod volume_server;
