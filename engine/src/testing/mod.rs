//! The in-memory reference implementation of the engine's traits (feature `testing`).
//!
//! - [`WalHistory`]: the prototype's model WAL (append, commit, tail advance with a base
//!   snapshot, truncate, `state_at`).
//! - [`MemStorage`]: a [`StorageAdapter`](crate::StorageAdapter) over it, with real pins.
//! - [`ModelReplica`] and [`ModelIo`]: a replica and the I/O that applies entries and base
//!   images to it, so end-to-end tests compare data.
//! - [`MemHarness`]: the conformance harness over all of the above.
//! - [`ScriptedIo`]: progress from a script, for tests of executor mechanics.

mod harness;
mod history;
mod protocol;
mod replica;
mod storage;

pub use harness::MemHarness;
pub use history::{BlockState, ModelEntry, ModelError, WalHistory};
pub use protocol::SenderProtocol;
pub use replica::{IoFaults, IoStats, ModelIo, ModelReplica, ScriptedIo};
pub use storage::MemStorage;
