//! The development master (`swblock master`): a stand-in for the SeaweedFS `feature/sw-block`
//! master for local clusters and tests, speaking the same protocol. It is not an HA control
//! plane: one process, its state in one file in its data directory.

pub mod grpc;
pub mod state;
