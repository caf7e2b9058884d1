//! The in-memory [`Harness`]: runs the conformance suite on [`MemStorage`] and
//! [`ModelReplica`]s through [`ModelIo`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::adapter::StorageAdapter;
use crate::conformance::Harness;
use crate::error::PinKind;
use crate::history::ReplicaHandshake;
use crate::testing::replica::{ModelIo, ModelReplica};
use crate::testing::storage::MemStorage;
use crate::types::{Epoch, Lsn, SessionId};

/// A primary [`MemStorage`] and named model replicas.
#[derive(Default)]
pub struct MemHarness {
    /// The primary.
    pub primary: MemStorage,
    /// The replicas, by name.
    pub replicas: BTreeMap<String, Arc<Mutex<ModelReplica>>>,
}

impl MemHarness {
    /// An empty primary at epoch 1 and no replicas.
    pub fn new() -> Self {
        MemHarness {
            primary: MemStorage::new(),
            replicas: BTreeMap::new(),
        }
    }

    fn replica(&self, name: &str) -> Result<Arc<Mutex<ModelReplica>>, String> {
        self.replicas
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no replica {name}"))
    }
}

impl Harness for MemHarness {
    type Io = ModelIo;

    fn storage(&self) -> Arc<dyn StorageAdapter> {
        Arc::new(self.primary.clone())
    }

    fn primary_write(&mut self, n: u64) -> Result<Lsn, String> {
        Ok(self.primary.write_n(n))
    }

    fn primary_commit(&mut self, lsn: Lsn) -> Result<(), String> {
        self.primary.commit(lsn).map_err(|e| e.to_string())
    }

    fn primary_checkpoint(&mut self, checkpoint: Lsn, tail: Lsn) -> Result<(), String> {
        self.primary.set_checkpoint(Some(checkpoint), true);
        let reached = self.primary.advance_tail(tail);
        if reached != tail {
            return Err(format!("tail reached {reached}, wanted {tail} (pinned?)"));
        }
        Ok(())
    }

    fn add_replica(&mut self, name: &str, prefix: Lsn) -> Result<(), String> {
        let r = ModelReplica::from_primary(&self.primary, prefix)
            .ok_or_else(|| format!("primary cannot produce a replica at {prefix}"))?;
        self.replicas
            .insert(name.to_owned(), Arc::new(Mutex::new(r)));
        Ok(())
    }

    fn replica_append_divergent(&mut self, name: &str, n: u64) -> Result<Lsn, String> {
        let r = self.replica(name)?;
        let mut g = r.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(g.append_divergent(n, Epoch(1)))
    }

    fn replica_handshake(&mut self, name: &str) -> Result<ReplicaHandshake, String> {
        let r = self.replica(name)?;
        let g = r.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(g.handshake())
    }

    fn io(&mut self, name: &str, _epoch: Epoch, _session: SessionId) -> Result<ModelIo, String> {
        Ok(ModelIo::new(self.primary.clone(), self.replica(name)?))
    }

    fn fail_next_pin(&mut self, kind: PinKind) {
        self.primary.fail_next_pin(kind);
    }

    fn pins_outstanding(&self) -> usize {
        self.primary.pins_outstanding()
    }

    fn replica_matches_primary(&mut self, name: &str, at: Lsn) -> Result<bool, String> {
        let expected = self
            .primary
            .state_at(at)
            .ok_or_else(|| format!("primary cannot reconstruct its state at {at}"))?;
        let r = self.replica(name)?;
        let g = r.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(!g.installing() && g.state() == expected)
    }
}
