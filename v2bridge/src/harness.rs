//! The conformance [`Harness`] on real volume files (feature `testing`): a primary blockvol
//! volume behind [`BlockVolStorage`], replica volumes behind [`LocalReplica`]s, and
//! [`BridgeIo`] between them. Data checks compare the replica's digest with the digest of an
//! oracle image built from the writes the harness made, and with the primary's own digest when
//! the primary is at the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockvol::{
    CreateOptions, Digest, EntryKind, FlushGate, Lba, OpenOptions, RetentionPolicy, Role, Volume,
    WalEntry,
};
use engine::conformance::Harness;
use engine::{Epoch, Lsn, PinKind, ReplicaHandshake, SessionId, StorageAdapter};

use crate::convert::{epoch_to_blockvol, to_blockvol, to_engine};
use crate::io::BridgeIo;
use crate::storage::BlockVolStorage;
use crate::target::{Lineage, LocalReplica, ReplicaTarget};

/// Blocks in a harness volume.
pub const HARNESS_BLOCKS: u64 = 256;
/// Block size of a harness volume.
pub const HARNESS_BLOCK_SIZE: u32 = 4096;
/// WAL size of a harness volume.
pub const HARNESS_WAL_BYTES: u64 = 4 << 20;

/// The content the harness writes at `lsn`: never all-zero, different for every LSN.
pub fn block_pattern(lsn: u64, salt: u64, block_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(block_size);
    let mut x = lsn.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ 0xA5A5_A5A5_A5A5_A5A5;
    while out.len() < block_size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&(x | 1).to_le_bytes());
    }
    out.truncate(block_size);
    out
}

/// Appends `n` entries no primary wrote to `vol` (a replica that diverged: an old primary's
/// uncommitted tail), synced; returns its new head.
pub fn append_divergent(vol: &Volume, n: u64) -> Result<Lsn, String> {
    let bs = HARNESS_BLOCK_SIZE as usize;
    let mut head = vol.status().head.0;
    for _ in 0..n {
        let lsn = head + 1;
        let entry = WalEntry {
            lsn: blockvol::Lsn(lsn),
            epoch: blockvol::Epoch(1),
            kind: EntryKind::Write {
                lba: Lba(lsn % HARNESS_BLOCKS),
                data: block_pattern(lsn, 0xD1FF, bs),
            },
        };
        vol.apply(&entry)
            .map_err(|e| format!("divergent apply {lsn}: {e}"))?;
        head = lsn;
    }
    vol.sync().map_err(|e| format!("sync: {e}"))?;
    Ok(Lsn(head))
}

/// Options for a replica or primary volume in the harness.
pub fn volume_options(gate: FlushGate) -> OpenOptions {
    OpenOptions {
        flush_gate: gate,
        ..OpenOptions::manual()
    }
}

/// A primary and named replicas, each a real volume file in a temporary directory.
pub struct BlockVolHarness {
    dir: tempfile::TempDir,
    keep: bool,
    primary: Arc<Volume>,
    storage: Arc<BlockVolStorage>,
    replicas: BTreeMap<String, LocalReplica>,
    /// LBA written at each LSN (index `lsn - 1`).
    writes: Vec<u64>,
}

impl BlockVolHarness {
    /// A fresh primary volume (committed-gated flusher, manual flushing) in a new temporary
    /// directory.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("swblock-chain-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let primary = Arc::new(Self::create_volume(dir.path(), "primary")?);
        primary
            .assign(Role::Primary, blockvol::Epoch(1))
            .map_err(|e| format!("assign primary: {e}"))?;
        let storage = Arc::new(BlockVolStorage::new(Arc::clone(&primary)));
        Ok(BlockVolHarness {
            dir,
            keep: false,
            primary,
            storage,
            replicas: BTreeMap::new(),
            writes: Vec::new(),
        })
    }

    fn create_volume(dir: &Path, name: &str) -> Result<Volume, String> {
        let create = CreateOptions {
            volume_size_bytes: HARNESS_BLOCKS * u64::from(HARNESS_BLOCK_SIZE),
            wal_size_bytes: HARNESS_WAL_BYTES,
            block_size: HARNESS_BLOCK_SIZE,
        };
        let path = dir.join(format!("{name}.vol"));
        Volume::create(&path, &create, &volume_options(FlushGate::Committed))
            .map_err(|e| format!("create {}: {e}", path.display()))
    }

    /// Creates replica volume `dir/NAME.vol` holding the primary's first `prefix` entries, with
    /// its committed point at `prefix`, synced. The caller may close it and let another process
    /// open it.
    pub fn create_replica(&self, dir: &Path, name: &str, prefix: Lsn) -> Result<Volume, String> {
        let vol = Self::create_volume(dir, name)?;
        vol.assign(Role::Replica, blockvol::Epoch(1))
            .map_err(|e| format!("assign replica {name}: {e}"))?;
        if prefix > Lsn::ZERO {
            let scan = self
                .primary
                .scan_from(blockvol::Lsn(1))
                .map_err(|e| format!("scan primary for {name}: {e}"))?;
            for item in scan.take(prefix.get() as usize) {
                let entry = item.map_err(|e| format!("scan primary: {e}"))?;
                vol.apply(&entry)
                    .map_err(|e| format!("apply {} to {name}: {e}", entry.lsn))?;
            }
        }
        vol.set_committed(to_blockvol(prefix));
        vol.sync().map_err(|e| format!("sync {name}: {e}"))?;
        if to_engine(vol.status().head) != prefix {
            return Err(format!("replica {name} did not reach {prefix}"));
        }
        Ok(vol)
    }

    /// Keeps the volume files after the harness is dropped; returns their directory.
    pub fn keep_files(&mut self) -> PathBuf {
        self.keep = true;
        self.dir.path().to_path_buf()
    }

    /// The directory holding the volume files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The primary volume.
    pub fn primary(&self) -> &Arc<Volume> {
        &self.primary
    }

    /// The primary's storage adapter.
    pub fn storage_adapter(&self) -> &Arc<BlockVolStorage> {
        &self.storage
    }

    /// A replica by name.
    pub fn replica(&self, name: &str) -> Result<&LocalReplica, String> {
        self.replicas
            .get(name)
            .ok_or_else(|| format!("no replica {name}"))
    }

    /// The image the primary held at `at`, rebuilt from the writes the harness made.
    pub fn oracle_image(&self, at: Lsn) -> Vec<u8> {
        let bs = HARNESS_BLOCK_SIZE as usize;
        let mut image = vec![0u8; HARNESS_BLOCKS as usize * bs];
        for (i, lba) in self.writes.iter().enumerate().take(at.get() as usize) {
            let lsn = i as u64 + 1;
            let off = *lba as usize * bs;
            image[off..off + bs].copy_from_slice(&block_pattern(lsn, 0, bs));
        }
        image
    }

    /// Simulates a crash of a replica's process: every handle the harness holds is dropped
    /// (an unfinished base install is abandoned) and the file is opened again from disk. I/O
    /// objects created before must have been dropped, or the file stays locked.
    pub fn crash_replica(&mut self, name: &str) -> Result<(), String> {
        let old = self
            .replicas
            .remove(name)
            .ok_or_else(|| format!("no replica {name}"))?;
        drop(old);
        let path = self.dir.path().join(format!("{name}.vol"));
        let vol = Volume::open(&path, &volume_options(FlushGate::Committed))
            .map_err(|e| format!("reopen {}: {e}", path.display()))?;
        self.replicas
            .insert(name.to_owned(), LocalReplica::new(Arc::new(vol)));
        Ok(())
    }

    /// A replica volume's digest.
    pub fn replica_digest(&self, name: &str) -> Result<Digest, String> {
        self.replica(name)?
            .volume()
            .digest()
            .map_err(|e| format!("digest of {name}: {e}"))
    }
}

impl Drop for BlockVolHarness {
    fn drop(&mut self) {
        if self.keep {
            let dir = std::mem::replace(
                &mut self.dir,
                match tempfile::tempdir() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            );
            let _ = dir.keep();
        }
    }
}

impl Harness for BlockVolHarness {
    type Io = BridgeIo<LocalReplica>;

    fn storage(&self) -> Arc<dyn StorageAdapter> {
        Arc::clone(&self.storage) as Arc<dyn StorageAdapter>
    }

    fn primary_write(&mut self, n: u64) -> Result<Lsn, String> {
        let bs = HARNESS_BLOCK_SIZE as usize;
        let mut head = to_engine(self.primary.status().head);
        for _ in 0..n {
            let lsn = head.next().get();
            let lba = lsn % HARNESS_BLOCKS;
            let got = self
                .primary
                .write(Lba(lba), &block_pattern(lsn, 0, bs))
                .map_err(|e| format!("primary write {lsn}: {e}"))?;
            if got.0 != lsn {
                return Err(format!("primary assigned lsn {got}, expected {lsn}"));
            }
            self.writes.push(lba);
            head = to_engine(got);
        }
        Ok(head)
    }

    fn primary_commit(&mut self, lsn: Lsn) -> Result<(), String> {
        self.primary
            .sync()
            .map_err(|e| format!("primary sync: {e}"))?;
        self.primary.set_committed(to_blockvol(lsn));
        Ok(())
    }

    fn primary_checkpoint(&mut self, checkpoint: Lsn, tail: Lsn) -> Result<(), String> {
        self.primary.set_retention(RetentionPolicy {
            keep_entries: checkpoint.get().saturating_sub(tail.get()),
            keep_bytes: 0,
        });
        self.primary
            .force_flush_to(to_blockvol(checkpoint))
            .map_err(|e| format!("flush to {checkpoint}: {e}"))?;
        let st = self.primary.status();
        if to_engine(st.checkpoint) != checkpoint || to_engine(st.tail) != tail {
            return Err(format!(
                "primary at checkpoint {} tail {}, wanted {checkpoint} / {tail}",
                st.checkpoint, st.tail
            ));
        }
        Ok(())
    }

    fn add_replica(&mut self, name: &str, prefix: Lsn) -> Result<(), String> {
        let vol = self.create_replica(self.dir.path(), name, prefix)?;
        self.replicas
            .insert(name.to_owned(), LocalReplica::new(Arc::new(vol)));
        Ok(())
    }

    fn replica_append_divergent(&mut self, name: &str, n: u64) -> Result<Lsn, String> {
        append_divergent(&self.replica(name)?.volume(), n)
    }

    fn replica_handshake(&mut self, name: &str) -> Result<ReplicaHandshake, String> {
        let mut target = self.replica(name)?.clone();
        let reply = target
            .handshake()
            .map_err(|e| format!("handshake with {name}: {e}"))?;
        Ok(crate::convert::handshake(&reply))
    }

    fn io(&mut self, name: &str, epoch: Epoch, session: SessionId) -> Result<Self::Io, String> {
        let target = self.replica(name)?.clone();
        let committed = to_engine(self.primary.status().committed);
        Ok(BridgeIo::new(
            Arc::clone(&self.storage),
            target,
            Lineage::new("harness-primary", epoch_to_blockvol(epoch), session.get()),
            committed,
        ))
    }

    fn fail_next_pin(&mut self, kind: PinKind) {
        self.storage.fail_next_pin(kind);
    }

    fn pins_outstanding(&self) -> usize {
        self.primary.status().pins_outstanding
    }

    fn replica_matches_primary(&mut self, name: &str, at: Lsn) -> Result<bool, String> {
        let vol = self.replica(name)?.volume();
        let st = vol.status();
        if st.install_incomplete || to_engine(st.head) != at {
            return Ok(false);
        }
        let want = Digest::of_image(&self.oracle_image(at));
        let have = self.replica_digest(name)?;
        if to_engine(self.primary.status().head) == at {
            let primary = self
                .primary
                .digest()
                .map_err(|e| format!("primary digest: {e}"))?;
            if primary != want {
                return Err(format!(
                    "the primary's own digest {primary} differs from the oracle {want}"
                ));
            }
        }
        Ok(have == want)
    }
}
