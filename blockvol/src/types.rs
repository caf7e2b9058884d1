//! Small value types shared by the whole crate: LSNs, epochs, block addresses, geometry,
//! roles, options and status.

use std::fmt;
use std::time::Duration;

/// A log sequence number.
///
/// `Lsn(0)` means "before the first entry"; the first entry is `Lsn(1)`. LSNs are contiguous and
/// never reused within a volume's lineage (a truncation drops a divergent suffix, whose numbers are
/// then filled by the lineage that won).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN before any entry.
    pub const ZERO: Lsn = Lsn(0);

    /// The next LSN.
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A fencing epoch: the volume persists one with its role, client writes can be fenced by it
/// (`Volume::write_in_epoch`) and every entry carries the epoch it was written under.
///
/// blockvol's own type: the replication layers above define theirs and convert explicitly.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of a volume that was never assigned one.
    pub const ZERO: Epoch = Epoch(0);

    /// The next epoch.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A logical block address: the index of a block in the volume's extent, `0 ..
/// volume_blocks`. Block counts are plain `u64`s.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

impl Lba {
    /// The first block.
    pub const ZERO: Lba = Lba(0);

    /// The address `blocks` blocks after this one (saturating; out-of-range addresses are
    /// refused by the volume, not here).
    pub fn offset(self, blocks: u64) -> Lba {
        Lba(self.0.saturating_add(blocks))
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The fixed shape of a volume.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Bytes per block (a power of two, 512..=65536).
    pub block_size: u32,
    /// Number of blocks in the extent.
    pub volume_blocks: u64,
    /// Bytes in the WAL ring.
    pub wal_size_bytes: u64,
}

impl Geometry {
    /// Bytes addressable through the block interface.
    pub fn volume_bytes(&self) -> u64 {
        self.volume_blocks * u64::from(self.block_size)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block_size={} volume_blocks={} wal_size_bytes={}",
            self.block_size, self.volume_blocks, self.wal_size_bytes
        )
    }
}

/// The role a volume plays, persisted with the epoch.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// Standalone: writable, no replication.
    #[default]
    None,
    /// Replication primary: writable.
    Primary,
    /// Replica: accepts `apply`, refuses client writes.
    Replica,
    /// Fenced: neither writes nor applies.
    Stale,
    /// Receiving a rebuild: accepts `apply` and base installs.
    Rebuilding,
    /// A primary stepping down: refuses new writes.
    Draining,
}

impl Role {
    /// Whether client writes (`write`, `trim`, `barrier`) are allowed.
    pub fn is_writable(self) -> bool {
        matches!(self, Role::None | Role::Primary)
    }

    /// Whether replicated entries (`apply`) are accepted.
    pub fn accepts_apply(self) -> bool {
        matches!(self, Role::Replica | Role::Rebuilding)
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            Role::None => 0,
            Role::Primary => 1,
            Role::Replica => 2,
            Role::Stale => 3,
            Role::Rebuilding => 4,
            Role::Draining => 5,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<Role> {
        Some(match code {
            0 => Role::None,
            1 => Role::Primary,
            2 => Role::Replica,
            3 => Role::Stale,
            4 => Role::Rebuilding,
            5 => Role::Draining,
            _ => return None,
        })
    }

    /// Lower-case name used by the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Stale => "stale",
            Role::Rebuilding => "rebuilding",
            Role::Draining => "draining",
        }
    }
}

/// Identity of one logical entry, independent of where or in which WAL generation it is stored.
///
/// Two volumes holding the same logical entry report the same `EntryInfo`, which is what lets a
/// replica acknowledge a duplicate idempotently and detect a divergent one.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EntryInfo {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The epoch the entry was written under.
    pub epoch: Epoch,
    /// CRC32 over the entry's kind, LBA, block count and payload (see docs/format.md).
    pub content_crc: u32,
}

impl EntryInfo {
    /// The identity of `Lsn(0)`, the origin before any entry.
    pub const ORIGIN: EntryInfo = EntryInfo {
        lsn: Lsn(0),
        epoch: Epoch(0),
        content_crc: 0,
    };
}

/// A 128-bit digest (xxh3-128) of a volume's visible contents.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub u128);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Digest {
    /// The digest of a flat image (every block in LBA order), as `Volume::digest` computes it.
    pub fn of_image(image: &[u8]) -> Digest {
        Digest(xxhash_rust::xxh3::xxh3_128(image))
    }
}

/// Options for creating a volume file.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Size of the block-addressable extent in bytes (a multiple of `block_size`).
    pub volume_size_bytes: u64,
    /// Size of the WAL ring in bytes (a multiple of 4096, at least 64 KiB).
    pub wal_size_bytes: u64,
    /// Bytes per block: a power of two from 512 to 65536.
    pub block_size: u32,
}

impl CreateOptions {
    /// Options with the default 4096-byte block size.
    pub fn new(volume_size_bytes: u64, wal_size_bytes: u64) -> Self {
        CreateOptions {
            volume_size_bytes,
            wal_size_bytes,
            block_size: 4096,
        }
    }
}

/// Which entries the flusher may move into the extent.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum FlushGate {
    /// Every durable entry.
    #[default]
    Durable,
    /// Only entries `<= min(durable, committed)`, so `truncate_after(committed)` always works.
    Committed,
}

/// How much history to keep in the WAL behind the checkpoint.
///
/// The policy is soft: when a writer is waiting for WAL space it is ignored. Pins are hard.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep at least this many entries at or below the checkpoint.
    pub keep_entries: u64,
    /// Keep at least this many bytes of entries at or below the checkpoint.
    pub keep_bytes: u64,
}

/// How the flusher is driven.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FlusherMode {
    /// A background thread flushes every `interval` and whenever WAL space is needed.
    Background {
        /// Period between flush cycles.
        interval: Duration,
    },
    /// No thread: tests drive `force_flush` / `force_flush_to`.
    Manual,
}

impl Default for FlusherMode {
    fn default() -> Self {
        FlusherMode::Background {
            interval: Duration::from_millis(100),
        }
    }
}

/// Options for opening (and, after creation, running) a volume.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Which entries the flusher may move into the extent.
    pub flush_gate: FlushGate,
    /// History kept behind the checkpoint.
    pub retention: RetentionPolicy,
    /// Background or manual flushing.
    pub flusher: FlusherMode,
    /// Longest a write waits for WAL space before failing with `WalFull`.
    pub wal_full_timeout: std::time::Duration,
    /// Open a WAL with mid-log corruption by truncating at the corruption (marks the
    /// checkpoint untrusted). Without it such a volume refuses to open.
    pub repair: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            flush_gate: FlushGate::Durable,
            retention: RetentionPolicy::default(),
            flusher: FlusherMode::default(),
            wal_full_timeout: Duration::from_secs(5),
            repair: false,
        }
    }
}

impl OpenOptions {
    /// Options with a manual flusher (tests drive flushing).
    pub fn manual() -> Self {
        OpenOptions {
            flusher: FlusherMode::Manual,
            ..OpenOptions::default()
        }
    }
}

/// A consistent snapshot of a volume's state, taken under one lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Last LSN appended.
    pub head: Lsn,
    /// Last LSN made durable in the WAL.
    pub durable: Lsn,
    /// First LSN physically retained in the WAL (`tail + 1`).
    pub retained_start: Lsn,
    /// Last recycled LSN (`retained_start - 1`); its identity is still known (`entry_info`).
    pub tail: Lsn,
    /// Every entry `<= checkpoint` is in the extent and the extent is synced.
    pub checkpoint: Lsn,
    /// The replication layer's committed LSN, as last set by `set_committed`.
    pub committed: Lsn,
    /// Superblock valid, recovery clean (no repair), no incomplete install.
    pub checkpoint_trusted: bool,
    /// Persisted fencing epoch.
    pub epoch: Epoch,
    /// Persisted role.
    pub role: Role,
    /// Current WAL generation.
    pub generation: u64,
    /// Live, non-revoked pins (WAL pins, scan pins and base pins).
    pub pins_outstanding: usize,
    /// Bytes of the ring between the tail and the head.
    pub wal_used_bytes: u64,
    /// Size of the ring.
    pub wal_size_bytes: u64,
    /// A base install was started and has not finished.
    pub install_incomplete: bool,
    /// A sync or write failed; writes are refused.
    pub poisoned: bool,
    /// Extent blocks whose checksum did not match their contents (reads, base image readers,
    /// scrubs) since the volume was opened. Never returned as data.
    pub checksum_errors: u64,
    /// Extent blocks (or their checksums) rewritten from a peer's verified copy since the
    /// volume was opened ([`crate::Volume::repair_block`]).
    pub blocks_repaired: u64,
}

/// What [`crate::Volume::scrub_range`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blocks read from the extent and verified against their checksums.
    pub checked: u64,
    /// Blocks not read because their newest data is in the WAL (not yet flushed; the WAL
    /// entry carries its own checksums).
    pub skipped: u64,
    /// Blocks whose contents do not match their checksums, in LBA order.
    pub damaged: Vec<Lba>,
}

/// What [`crate::Volume::repair_block`] did with a peer's copy of a block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The block verified already: nothing was written.
    NotDamaged,
    /// The block's newest data is in the WAL (it will be flushed, with its checksum, from
    /// there): nothing was written.
    NewerInWal,
    /// The copy matched the stored checksum: the extent block was rewritten and synced.
    ExtentRewritten,
    /// The copy equals the extent block byte for byte, so the stored checksum was the damaged
    /// part: the checksum was rewritten and synced.
    ChecksumRewritten,
}

/// What `apply` did with an entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The entry was appended at `head + 1`.
    Applied,
    /// The volume already held this exact entry; nothing changed.
    Duplicate,
}
