//! The crate's single error type.
//!
//! Every variant carries the values that explain it (offsets, expected and found LSNs, the region
//! that failed) so a log line or a test failure says what was wrong without a debugger.

use crate::types::{EntryInfo, Epoch, Lba, Lsn, Role};

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, BlockVolError>;

/// Everything that can go wrong in a volume, its codecs or its command line.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BlockVolError {
    /// An operating-system call failed.
    #[error("I/O error during {op} at {context}: {source}")]
    Io {
        /// The operation that failed (`"pwrite extent"`, `"msync wal"`, ...).
        op: &'static str,
        /// Where: a path, a region name or a file offset.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A caller passed an argument that can never be valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A block range leaves the volume.
    #[error(
        "block range lba {lba} + {blocks} blocks is outside the volume of {volume_blocks} blocks"
    )]
    OutOfRange {
        /// First block of the request.
        lba: Lba,
        /// Number of blocks requested.
        blocks: u64,
        /// Size of the volume in blocks.
        volume_blocks: u64,
    },
    /// A byte length is not a positive multiple of the block size.
    #[error("length {len} bytes is not a positive multiple of the block size {block_size}")]
    Misaligned {
        /// The length that was passed.
        len: u64,
        /// The volume's block size.
        block_size: u32,
    },
    /// One entry would be larger than half the WAL, so it could never be placed, or its
    /// payload would not fit the header's u32 length (a WAL of 8 GiB or more).
    #[error("entry of {bytes} bytes exceeds the largest WAL entry of {max} bytes")]
    EntryTooLarge {
        /// Encoded size of the entry.
        bytes: u64,
        /// Largest entry the ring accepts (half the WAL, at most [`crate::format::MAX_ENTRY_SIZE`]).
        max: u64,
    },
    /// The WAL had no room within the admission timeout. No LSN was consumed.
    #[error("WAL full: needed {needed} bytes, {free} free after waiting {waited_ms} ms")]
    WalFull {
        /// Bytes the entry (plus padding) needed.
        needed: u64,
        /// Bytes free when the wait gave up.
        free: u64,
        /// How long the writer waited.
        waited_ms: u64,
    },
    /// A sync failed earlier; the volume refuses further writes until it is reopened.
    #[error("volume poisoned by an earlier failure: {first_failure}")]
    Poisoned {
        /// The first failure, as text.
        first_failure: String,
    },
    /// The volume was closed.
    #[error("volume is closed")]
    Closed,
    /// The volume was opened with [`crate::Volume::open_read_only`]: nothing may change the
    /// file (writes, syncs, flushes, truncation, role changes, base pins and installs).
    #[error("volume is open read-only: the operation would change the file")]
    ReadOnly,
    /// The volume's role does not allow this operation.
    #[error("{op} refused in role {role:?} (epoch {epoch})")]
    WrongRole {
        /// What was attempted.
        op: &'static str,
        /// The current role.
        role: Role,
        /// The current epoch.
        epoch: Epoch,
    },
    /// A write named an epoch that is not the volume's current epoch.
    #[error("stale epoch: write at epoch {given}, volume is at epoch {current}")]
    StaleEpoch {
        /// The epoch the caller wrote under.
        given: Epoch,
        /// The volume's epoch.
        current: Epoch,
    },
    /// An assignment tried to lower the epoch.
    #[error(
        "epoch regression refused: volume is at epoch {current}, assignment asked for {requested}"
    )]
    EpochRegression {
        /// The persisted epoch.
        current: Epoch,
        /// The epoch that was asked for.
        requested: Epoch,
    },
    /// A replicated entry carries an epoch newer than the replica's own.
    #[error(
        "entry {lsn} carries epoch {entry_epoch}, newer than the volume's epoch {volume_epoch}"
    )]
    EntryEpochAhead {
        /// LSN of the entry.
        lsn: Lsn,
        /// Epoch stamped on the entry.
        entry_epoch: Epoch,
        /// The volume's epoch.
        volume_epoch: Epoch,
    },
    /// `apply` got an entry beyond `head + 1`.
    #[error("gap: expected lsn {expected}, found {found}")]
    Gap {
        /// The next LSN the volume can accept.
        expected: Lsn,
        /// The LSN that arrived.
        found: Lsn,
    },
    /// `apply` got an entry the volume already holds but can no longer compare (recycled).
    #[error(
        "duplicate lsn {lsn} is older than the retained start {retained_start}; content cannot be compared"
    )]
    Duplicate {
        /// LSN of the entry.
        lsn: Lsn,
        /// First LSN still retained.
        retained_start: Lsn,
    },
    /// `apply` got an entry at an LSN the volume holds with different content.
    #[error("divergent entry at lsn {lsn}: local {local:?}, incoming {incoming:?}")]
    Divergent {
        /// The LSN where the logs differ.
        lsn: Lsn,
        /// What the volume holds.
        local: EntryInfo,
        /// What arrived.
        incoming: EntryInfo,
    },
    /// The requested LSN range has already been recycled from the WAL.
    #[error("lsn {requested} is recycled; the WAL retains from lsn {retained_start}")]
    Recycled {
        /// The first LSN the caller needed.
        requested: Lsn,
        /// The first LSN still present.
        retained_start: Lsn,
    },
    /// The requested LSN is beyond the head.
    #[error("lsn {requested} is beyond the head {head}")]
    BeyondHead {
        /// The LSN asked for.
        requested: Lsn,
        /// The current head.
        head: Lsn,
    },
    /// A scan found its range truncated or reset underneath it.
    #[error("scan invalidated at lsn {at}: the log was truncated or reset while the scan was open")]
    ScanInvalidated {
        /// The next LSN the scan would have yielded.
        at: Lsn,
    },
    /// Stored bytes failed a checksum or structural check.
    #[error("corrupt {region} at file offset {offset}: {detail}")]
    Corrupt {
        /// The region: `"superblock"`, `"wal"`, `"wire entry"`, `"base chunk"`.
        region: &'static str,
        /// File (or buffer) offset of the damaged structure.
        offset: u64,
        /// The LSN involved, when known.
        lsn: Option<Lsn>,
        /// What check failed.
        detail: String,
    },
    /// A buffer could not be decoded (wire forms: entries, base chunks).
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// The structure being decoded.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Neither superblock slot holds a valid superblock.
    #[error("no valid superblock: slot A: {slot_a}; slot B: {slot_b}")]
    NoValidSuperblock {
        /// Why slot A was rejected.
        slot_a: String,
        /// Why slot B was rejected.
        slot_b: String,
    },
    /// Two geometries that must match do not.
    #[error("geometry mismatch: expected {expected}, found {found}")]
    GeometryMismatch {
        /// The geometry required.
        expected: String,
        /// The geometry found.
        found: String,
    },
    /// The file (or simulated disk) is shorter than its superblock's geometry requires
    /// (superblock slots, WAL and extent): it was truncated, or the superblock is not its own.
    /// Refused before anything is mapped or written; a read-write open never extends it.
    #[error("{path} is too short: file is {len} bytes, the superblock describes {required}")]
    FileTooShort {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
        /// The length the superblock's geometry requires.
        required: u64,
    },
    /// `truncate_after` below the checkpoint: flushed entries cannot be un-flushed.
    #[error("cannot truncate after lsn {requested}: below the checkpoint {checkpoint}")]
    BelowCheckpoint {
        /// The LSN asked for.
        requested: Lsn,
        /// The volume's checkpoint.
        checkpoint: Lsn,
    },
    /// A base image at the requested LSN cannot be produced.
    #[error(
        "base image at lsn {requested} unavailable: {reason} (checkpoint {checkpoint}, head {head})"
    )]
    BaseUnavailable {
        /// The LSN asked for.
        requested: Lsn,
        /// The volume's checkpoint.
        checkpoint: Lsn,
        /// The volume's head.
        head: Lsn,
        /// Why.
        reason: String,
    },
    /// The volume holds a partial base install; it must be reinstalled before use.
    #[error("volume holds an incomplete base install (target lsn {base_lsn}); {op} refused")]
    InstallIncomplete {
        /// What was attempted.
        op: &'static str,
        /// The base LSN of the interrupted install.
        base_lsn: Lsn,
    },
    /// Another base install is running on this volume.
    #[error("a base install is already in progress")]
    InstallInProgress,
    /// A base chunk failed its checksum on arrival.
    #[error(
        "base chunk at lba {lba} failed its checksum: stored {expected:#010x}, computed {found:#010x}"
    )]
    ChunkChecksum {
        /// First block of the chunk.
        lba: Lba,
        /// The CRC carried by the chunk.
        expected: u32,
        /// The CRC of the bytes received.
        found: u32,
    },
    /// A block read from the extent does not match its stored checksum: the bytes are never
    /// returned. Counted in `Status::checksum_errors`.
    #[error(
        "extent block lba {lba} failed its checksum: stored {expected:#010x}, computed {found:#010x} (the block is damaged; its data is not returned)"
    )]
    ChecksumMismatch {
        /// The damaged block.
        lba: Lba,
        /// The checksum stored in the checksum region (0: the block must be all zeros).
        expected: u32,
        /// The checksum of the bytes read.
        found: u32,
    },
    /// A peer's copy offered to repair a damaged block matches neither the block's stored
    /// checksum nor its extent bytes: it is another version of the block (or damaged too), so
    /// nothing was written.
    #[error(
        "the copy offered for extent block lba {lba} matches neither its stored checksum {stored:#010x} (the copy's is {offered:#010x}) nor its extent bytes: not this block's version, nothing written"
    )]
    RepairMismatch {
        /// The block.
        lba: Lba,
        /// The checksum stored in the checksum region.
        stored: u32,
        /// The checksum of the copy offered.
        offered: u32,
    },
    /// The file is an older format without extent checksums: it opens read-only
    /// (`Volume::open_read_only`), and `blockvol upgrade` converts it.
    #[error(
        "{path} is volume format version {version}, which has no extent checksums: it can only be opened read-only; convert it with `blockvol upgrade {path}`"
    )]
    NeedsUpgrade {
        /// The file.
        path: String,
        /// Its format version.
        version: u32,
    },
    /// The volume file could not be fully allocated: its file system (or quota) has no room
    /// for the holes of a sparse file, or for a new volume. Nothing was written; a read-write
    /// open refuses a file it cannot allocate, because a store into a hole of the mapped WAL
    /// would kill the process (SIGBUS) once the file system is full.
    #[error("cannot allocate the volume file {path} ({bytes} bytes): no space ({source})")]
    NoSpace {
        /// The volume file.
        path: String,
        /// Bytes that had to be allocated.
        bytes: u64,
        /// The file system's answer.
        #[source]
        source: std::io::Error,
    },
    /// The path names a directory, FIFO, socket or device: a volume lives in a regular file.
    /// Refused after a `stat`, before the path is opened for I/O (a FIFO would block the open
    /// until a writer came), and again on the opened descriptor.
    #[error("{path} is {kind}, not a regular file (a volume lives in a regular file)")]
    NotARegularFile {
        /// The path.
        path: String,
        /// What it is: "a directory", "a FIFO", "a socket", "a block device", ...
        kind: &'static str,
    },
    /// The volume file is locked by another opener.
    #[error("volume {path} is locked by another process or handle")]
    Locked {
        /// The path (or simulated disk) that is locked.
        path: String,
    },
    /// The pin backing this operation was revoked.
    #[error("pin revoked: {reason}")]
    Revoked {
        /// The reason given to `revoke_wal_pins`.
        reason: String,
    },
    /// The operation conflicts with something outstanding.
    #[error("busy: {0}")]
    Busy(String),
}

impl BlockVolError {
    pub(crate) fn io(op: &'static str, context: impl Into<String>, source: std::io::Error) -> Self {
        BlockVolError::Io {
            op,
            context: context.into(),
            source,
        }
    }

    pub(crate) fn decode(what: &'static str, detail: impl Into<String>) -> Self {
        BlockVolError::Decode {
            what,
            detail: detail.into(),
        }
    }
}
