//! The oracle: the simulator's own record of every write the primary accepted, independent of
//! any volume. Invariants compare volumes with the images and entry identities derived here,
//! never with what another volume (or the engine) says.

use blockvol::{Digest, EntryInfo, EntryKind, Lsn, WalEntry};

/// The log of the current primary lineage and the images it implies.
#[derive(Clone, Debug)]
pub struct Oracle {
    block_bytes: usize,
    /// Entries `1..=head` of the current lineage: the committed prefix, then the current
    /// primary's accepted but uncommitted writes.
    log: Vec<WalEntry>,
    committed: u64,
    /// The primary's last acknowledged sync in this lineage: every entry up to it must survive a
    /// primary crash.
    synced: u64,
    committed_image: Vec<u8>,
    committed_digest: Digest,
    head_image: Vec<u8>,
}

/// Applies one entry to a flat image.
pub fn apply_entry(image: &mut [u8], entry: &WalEntry, block_bytes: usize) {
    match &entry.kind {
        EntryKind::Write { lba, data } => {
            let off = lba.0 as usize * block_bytes;
            image[off..off + data.len()].copy_from_slice(data);
        }
        EntryKind::Trim { lba, blocks } => {
            let off = lba.0 as usize * block_bytes;
            image[off..off + *blocks as usize * block_bytes].fill(0);
        }
        EntryKind::Barrier => {}
    }
}

impl Oracle {
    /// An empty log over a volume of `blocks` blocks of `block_bytes`.
    pub fn new(block_bytes: usize, blocks: u64) -> Oracle {
        let image = vec![0u8; block_bytes * blocks as usize];
        Oracle {
            block_bytes,
            log: Vec::new(),
            committed: 0,
            synced: 0,
            committed_digest: Digest::of_image(&image),
            committed_image: image.clone(),
            head_image: image,
        }
    }

    /// The last LSN of the lineage (committed or not).
    pub fn head(&self) -> u64 {
        self.log.len() as u64
    }

    /// The committed LSN.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The primary's last acknowledged sync.
    pub fn synced(&self) -> u64 {
        self.synced
    }

    /// The entry at `lsn`.
    pub fn entry(&self, lsn: u64) -> Option<&WalEntry> {
        lsn.checked_sub(1).and_then(|i| self.log.get(i as usize))
    }

    /// The identity of the entry at `lsn` (the origin at 0).
    pub fn info(&self, lsn: u64) -> Option<EntryInfo> {
        if lsn == 0 {
            return Some(EntryInfo::ORIGIN);
        }
        self.entry(lsn).map(WalEntry::info)
    }

    /// Records a write the primary accepted at `head + 1`.
    pub fn record(&mut self, entry: WalEntry) -> Result<(), String> {
        if entry.lsn.0 != self.head() + 1 {
            return Err(format!(
                "primary assigned lsn {}, the oracle expected {}",
                entry.lsn,
                self.head() + 1
            ));
        }
        apply_entry(&mut self.head_image, &entry, self.block_bytes);
        self.log.push(entry);
        Ok(())
    }

    /// Notes that the primary's log is durable up to `lsn`.
    pub fn note_synced(&mut self, lsn: u64) {
        self.synced = self.synced.max(lsn.min(self.head()));
    }

    /// Advances the committed LSN to `lsn` (never backwards, never past the head).
    pub fn commit(&mut self, lsn: u64) {
        let lsn = lsn.min(self.head());
        if lsn <= self.committed {
            return;
        }
        for i in self.committed..lsn {
            apply_entry(
                &mut self.committed_image,
                &self.log[i as usize],
                self.block_bytes,
            );
        }
        self.committed = lsn;
        self.synced = self.synced.max(lsn);
        self.committed_digest = Digest::of_image(&self.committed_image);
    }

    /// Drops the uncommitted entries after `lsn` (a primary crash lost them, or a failover
    /// abandoned them). Never drops a committed entry.
    pub fn truncate_pending(&mut self, lsn: u64) {
        let lsn = lsn.max(self.committed);
        if lsn >= self.head() {
            return;
        }
        self.log.truncate(lsn as usize);
        self.synced = self.synced.min(lsn);
        self.head_image.clone_from(&self.committed_image);
        for i in self.committed..lsn {
            apply_entry(
                &mut self.head_image,
                &self.log[i as usize],
                self.block_bytes,
            );
        }
    }

    /// The digest of the committed image.
    pub fn committed_digest(&self) -> Digest {
        self.committed_digest
    }

    /// The digest of the image at the head.
    pub fn head_digest(&self) -> Digest {
        Digest::of_image(&self.head_image)
    }

    /// The image after the entries `1..=lsn`.
    pub fn image_at(&self, lsn: u64) -> Vec<u8> {
        if lsn == self.committed {
            return self.committed_image.clone();
        }
        if lsn == self.head() {
            return self.head_image.clone();
        }
        let (mut image, from) = if lsn > self.committed {
            (self.committed_image.clone(), self.committed)
        } else {
            (vec![0u8; self.committed_image.len()], 0)
        };
        for i in from..lsn.min(self.head()) {
            apply_entry(&mut image, &self.log[i as usize], self.block_bytes);
        }
        image
    }

    /// The digest of the image at `lsn`.
    pub fn digest_at(&self, lsn: u64) -> Digest {
        if lsn == self.committed {
            return self.committed_digest;
        }
        Digest::of_image(&self.image_at(lsn))
    }

    /// An entry for the next LSN (the caller writes it and then records it).
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.head() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvol::{Epoch, Lba};

    fn write(lsn: u64, lba: u64, byte: u8) -> WalEntry {
        WalEntry {
            lsn: Lsn(lsn),
            epoch: Epoch(1),
            kind: EntryKind::Write {
                lba: Lba(lba),
                data: vec![byte; 512],
            },
        }
    }

    #[test]
    fn images_follow_commit_and_truncation() {
        let mut o = Oracle::new(512, 4);
        o.record(write(1, 0, 1)).unwrap();
        o.record(write(2, 1, 2)).unwrap();
        assert!(o.record(write(4, 1, 2)).is_err());
        o.commit(1);
        o.record(write(3, 0, 3)).unwrap();
        assert_eq!(o.image_at(1)[0], 1);
        assert_eq!(o.image_at(3)[0], 3);
        assert_eq!(o.image_at(2)[512], 2);
        assert_eq!(o.image_at(0), vec![0u8; 2048]);
        o.truncate_pending(2);
        assert_eq!(o.head(), 2);
        assert_eq!(o.head_digest(), Digest::of_image(&o.image_at(2)));
        o.truncate_pending(0);
        assert_eq!(o.head(), 1, "a committed entry is never dropped");
    }
}
