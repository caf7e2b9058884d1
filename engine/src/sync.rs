//! The synchronisation primitives the engine uses. Normally the standard library's; when the
//! engine's sources are compiled by the model checker (`modelcheck/`, which sets
//! `cfg(engine_model)`), shuttle's, so every lock acquisition and atomic operation is a point
//! where the checker chooses which thread runs next. Nothing else in the engine changes.

#[cfg(not(engine_model))]
pub(crate) use std::sync::atomic::AtomicU64;
#[cfg(not(engine_model))]
pub(crate) use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(engine_model)]
pub(crate) use shuttle::sync::atomic::AtomicU64;
#[cfg(engine_model)]
pub(crate) use shuttle::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
