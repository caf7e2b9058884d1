//! Compact fixtures for the fix and defect tests: replica IDs, endpoints `addr:1`/`addr:2`,
//! intents from `(id, addr, version)` triples, a committed `MemStorage` primary with a driver,
//! model replicas, and an I/O wrapper that rewrites what a real model I/O reports.

use std::sync::{Arc, Mutex};

use engine::testing::{MemStorage, ModelIo, ModelReplica};
use engine::*;

pub use super::rid;

pub fn ep(addr: &str, v: u64) -> Endpoint {
    Endpoint::new(format!("{addr}:1"), format!("{addr}:2"), v)
}

pub fn intent(
    epoch: u64,
    replicas: &[(&str, &str, u64)],
    targets: &[(&str, SessionKind)],
) -> AssignmentIntent {
    AssignmentIntent {
        replicas: replicas
            .iter()
            .map(|(id, addr, v)| ReplicaAssignment {
                replica_id: rid(id),
                endpoint: ep(addr, *v),
            })
            .collect(),
        epoch: Epoch(epoch),
        recovery_targets: targets.iter().map(|(id, k)| (rid(id), *k)).collect(),
        catch_up_budget: None,
    }
}

/// A primary with `n` entries committed, and a driver over it.
pub fn primary(n: u64) -> (MemStorage, RecoveryDriver) {
    let storage = MemStorage::new();
    let head = storage.write_n(n);
    storage.commit(head).unwrap();
    let driver = RecoveryDriver::new(Arc::new(storage.clone()));
    (storage, driver)
}

pub fn replica_at(storage: &MemStorage, prefix: u64) -> Arc<Mutex<ModelReplica>> {
    Arc::new(Mutex::new(
        ModelReplica::from_primary(storage, Lsn(prefix)).unwrap(),
    ))
}

pub fn failure(r: Result<ExecutionReport>) -> (ExecFailure, ExecutionReport) {
    match r {
        Err(EngineError::ExecutionFailed {
            failure, report, ..
        }) => (*failure, *report),
        other => panic!("expected an execution failure, got {other:?}"),
    }
}

/// Wraps a real model I/O and rewrites what it reports.
pub struct Tamper<F, G> {
    pub inner: ModelIo,
    pub wal: F,
    pub base: G,
    /// Replaces the image size `begin_base` announces.
    pub announce: Option<u64>,
}

impl<F: FnMut(WalChunk) -> WalChunk, G: FnMut(BaseChunkProgress) -> BaseChunkProgress> CatchUpIo
    for Tamper<F, G>
{
    fn truncate_after(&mut self, lsn: Lsn) -> std::result::Result<EntryId, TransferError> {
        self.inner.truncate_after(lsn)
    }
    fn stream_wal_chunk(
        &mut self,
        after: Lsn,
        up_to: Lsn,
        max_entries: u64,
    ) -> std::result::Result<WalChunk, TransferError> {
        let c = self.inner.stream_wal_chunk(after, up_to, max_entries)?;
        Ok((self.wal)(c))
    }
    fn barrier(&mut self, target: Lsn) -> std::result::Result<Lsn, TransferError> {
        self.inner.barrier(target)
    }
}

impl<F: FnMut(WalChunk) -> WalChunk, G: FnMut(BaseChunkProgress) -> BaseChunkProgress> RebuildIo
    for Tamper<F, G>
{
    fn begin_base(&mut self, base: &BaseRequest) -> std::result::Result<u64, TransferError> {
        let size = self.inner.begin_base(base)?;
        Ok(self.announce.unwrap_or(size))
    }
    fn transfer_base_chunk(
        &mut self,
        max_bytes: u64,
    ) -> std::result::Result<BaseChunkProgress, TransferError> {
        let c = self.inner.transfer_base_chunk(max_bytes)?;
        Ok((self.base)(c))
    }
    fn finish_base(&mut self) -> std::result::Result<Lsn, TransferError> {
        self.inner.finish_base()
    }
}
