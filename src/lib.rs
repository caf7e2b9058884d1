//! `swblock`: the integration crate. It ties the engine to its storage and transfer
//! implementations and holds the chain-closure tests (`tests/`), which run
//! assignment -> plan -> executor -> bridge -> store -> verified replica.
//!
//! [`chain`] runs every conformance scenario end to end and reports one row per scenario; it
//! backs `cargo xtask chain-test`.
#![warn(missing_docs)]

pub mod chain;
pub mod cluster;
pub mod scenarios;
pub mod sim;
