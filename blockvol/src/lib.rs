//! `blockvol`: a crash-safe block volume stored in one preallocated file: a WAL ring, a flat
//! extent, a flusher, retention pins, base images and the replica side (apply, truncate,
//! install). It knows nothing of replication policy: the layers above decide *when* to pin,
//! scan, truncate or install; this crate makes each of those operations exact and durable.
//!
//! The byte-level format is documented in `docs/format.md` (kept true by `tests/format_doc.rs`).
//!
//! A volume's life in brief: create, write (each write is one WAL entry with its LSN), make it
//! durable, read it back, close, reopen (recovery replays the WAL), and compare digests:
//!
//! ```
//! use blockvol::{CreateOptions, Lba, OpenOptions, Volume};
//!
//! # fn main() -> blockvol::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("vol1.img");
//! let create = CreateOptions {
//!     volume_size_bytes: 1 << 20,
//!     wal_size_bytes: 256 << 10,
//!     block_size: 4096,
//! };
//! let vol = Volume::create(&path, &create, &OpenOptions::manual())?;
//! let lsn = vol.write(Lba(3), &[7u8; 4096])?;
//! assert_eq!(vol.sync()?, lsn); // durable from here on, whatever crashes
//! assert_eq!(vol.read(Lba(3), 1)?, vec![7u8; 4096]);
//! let before = vol.digest()?;
//! vol.close()?;
//!
//! let vol = Volume::open(&path, &OpenOptions::manual())?;
//! assert_eq!(vol.status().head, lsn);
//! assert_eq!(vol.digest()?, before);
//! # Ok(())
//! # }
//! ```
//!
//! Epochs and block addresses are types, so the two cannot be swapped or passed as bare numbers
//! (this does not compile, error E0308):
//!
//! ```compile_fail,E0308
//! # fn f(vol: &blockvol::Volume) {
//! vol.write_in_epoch(3, 7, &[0u8; 4096]);
//! # }
//! ```
//!
//! # Modules
//!
//! Every item has one path: the crate root re-exports the items of the private modules, and
//! the two public modules ([`format`](mod@format) and [`inspect`]) re-export nothing at the root.
//!
//! - `types`: [`Lsn`], [`Epoch`], [`Lba`], [`Geometry`], [`Role`], [`EntryInfo`], [`Digest`],
//!   options and [`Status`].
//! - `error`: the single [`BlockVolError`] enum and the [`Result`] alias.
//! - [`format`](mod@format): every offset, size and magic number; superblock and entry-header
//!   codecs.
//! - `entry`: logical entries ([`WalEntry`], [`EntryKind`]) and their self-checking wire form.
//! - `volume`: the [`Volume`] itself, one file per concern: `mod.rs` (shared state, locking,
//!   lifecycle: create, open, assign, status, close), `state` (what the state mutex guards),
//!   `superblock`, `retention` (the tail), `append` (and the client writes), `sync`, `read`,
//!   `flush` (and the background flusher), `pins`, `recovery` (open), `replica` (apply and
//!   truncation) and `sim_hooks` (feature `testing`).
//! - `scan`: [`WalPin`] and [`WalScan`].
//! - `base`: [`BasePin`], [`BaseReader`], [`BaseChunk`], [`BaseInstall`].
//! - `walk`: the recovery walk over the ring, shared with [`inspect`].
//! - `upgrade`: [`upgrade_file`], converting a version 1 file (no extent checksums) in place.
//! - [`inspect`]: read-only inspection used by the `blockvol` command line.
//! - `medium`: the storage under a volume (a file, the same file read-only, or a simulated
//!   disk); `sys`: the only module with `unsafe` (the WAL memory map, `posix_fallocate`,
//!   `FALLOC_FL_ZERO_RANGE`).
//! - `sim` (feature `testing`): `SimDisk`, a disk that keeps written and synced bytes apart
//!   and builds crash images (with `CrashMode`, `SyncHook` and `SyncPoint`).
//!
//! # Invariants
//!
//! 1. LSNs are contiguous from 1; an LSN exists only if its entry is in the ring. Space is
//!    reserved *before* the LSN is assigned, in the same critical section as the copy, so a
//!    failed or timed-out write never burns an LSN.
//! 2. `tail <= checkpoint <= durable <= head`. The tail is `min(checkpoint, live pins,
//!    retention)`; it never moves backwards and moves even when nothing is dirty.
//! 3. The checkpoint is the largest L such that every entry `<= L` is in the extent and the
//!    extent is synced, and no later entry is in the extent. It only rises, and only to a
//!    durable entry (so a crash can never leave the extent ahead of the WAL), and under
//!    `FlushGate::Committed` never above `committed`. The extent is written beyond the
//!    checkpoint only up to the persisted *flush mark*, and recovery redoes the flush up to that
//!    mark, so a crash in the middle of a flush cannot leave the extent ahead of the checkpoint
//!    either (truncation above the checkpoint and base images at it rely on that).
//! 4. In-memory `tail`, `tail_pos` and `checkpoint` equal the persisted ones: they change only
//!    after the superblock carrying them is durable, so ring space is reused only when no
//!    recovery can need it.
//! 5. Only entries stamped with the current generation (salted with the volume id), with valid
//!    CRCs and the exact expected LSN are ever replayed.
//! 6. A failed sync poisons the volume: later writes and syncs fail with `Poisoned`.
//! 7. (Format version 2.) Every block read from the extent matches its checksum, or the read
//!    fails with `ChecksumMismatch` (counted in `Status::checksum_errors`) and returns no
//!    bytes. Whatever writes extent blocks writes their checksums before the extent sync that
//!    covers both, so they disagree after a crash only for blocks recovery rewrites (the flush
//!    up to the mark) or an incomplete install resends.
//!
//! # Data flow
//!
//! **Write.** The content CRC is computed outside any lock. Under the state mutex the writer
//! checks role, epoch and poison, reserves ring space (waiting, bounded, for the flusher or a
//! tail move), assigns `head + 1`, copies header and payload into the mapped ring, and
//! publishes the entry to the LSN index (a `VecDeque`) and the dirty map (LBA → newest entry).
//! Nothing else happens under the lock, and nothing is allocated per write beyond amortized
//! growth of those two maps.
//!
//! **Sync.** Group commit: the first waiter becomes the leader, releases the lock and msyncs the
//! ring range appended since the last sync; every waiter whose LSN it covered returns. Each
//! entry header records the durable LSN known when it was appended (its *durable hint*),
//! which lets recovery tell a torn tail from corruption.
//!
//! **Replication fast paths.** A catch-up moves entries in wire form without building
//! `WalEntry`s: `WalScan::next_encoded` copies an entry once from the ring into the sender's
//! frame buffer, checks its stored CRCs there and rewrites its header in wire form;
//! `Volume::apply_encoded` checks a frame exactly as `WalEntry::decode_prefix` does and copies
//! the payload once into the ring, reusing the verified content CRC as the entry's identity.
//! Base images likewise travel as frames (`BaseReader::next_frame`, `BaseInstall::write_frame`):
//! one copy and one CRC pass on each side. `Volume::start_writeback` hands appended ring bytes
//! to the disk early (`sync_file_range`, no durability) so a bulk appender's final sync waits
//! for its last batch only. The bytes on the wire and on disk are the same as through the
//! entry and chunk types.
//!
//! **Flush.** Under the flush lock, the flusher takes the entries in `(checkpoint, limit]`
//! (limit = durable, gated by committed and by base fences). If the limit is above the
//! persisted flush mark it first persists a higher mark (the flush intent: one superblock
//! sync). It writes each block unless a newer entry in the same batch rewrites it, then the
//! written blocks' checksums, fdatasyncs the extent (and the checksum region), persists the new checkpoint and tail in the other superblock slot, then drops
//! the now-redundant dirty references and pops recycled entries from the index. The
//! background flusher's superblocks also announce the current gate limit as the flush mark,
//! and its cycles are pipelined (each flushes up to what the previous one announced), so it
//! pays one superblock sync per cycle, as before the intent existed.
//!
//! **Recovery.** Open picks the newest valid superblock slot, walks the ring from the persisted
//! tail position expecting `tail + 1`, and stops at the first entry that fails. If a later header
//! of this generation carries a durable hint at or above the failed LSN, that entry had been
//! synced: the log is corrupt and open fails (or, with `repair`, truncates and marks the
//! checkpoint untrusted). Otherwise the failure is a torn tail. Recovery zeroes leftover headers
//! past the end, msyncs the ring, redoes the flush of `(checkpoint, flush mark]` if a flush
//! may have been interrupted (restoring "the extent is exactly the checkpoint's image"), and
//! writes a superblock before accepting I/O, so reopening twice gives the same state. A repair
//! persists its mark before it zeroes any leftover. [`Volume::open_read_only`] (inspection)
//! makes the same decisions in memory only and never writes the file: blocks written after the
//! checkpoint are read from the WAL, so it needs neither the zeroing nor the redone flush.
//!
//! **Base images.** `pin_base(at)` flushes exactly to `at` and fences the flusher there: the
//! extent is the image at `at` while writes continue into the WAL. `BaseReader` streams it in
//! bounded chunks, skipping zero runs. On the receiver, `begin_base_install` persists an
//! "install incomplete" mark, zeroes the extent, takes verified chunks straight into it, and
//! `finish` syncs, resets the WAL with a new generation at checkpoint = head = tail = base LSN
//! and clears the mark.
//!
//! # Locking
//!
//! Lock order: `flush_lock` → `extent_rw` → superblock writer → state mutex. The state mutex is
//! never held across an msync or fdatasync except by truncation (rare, and it must be atomic).
//! The ring is written only in free space beyond the head (appends, truncation, recovery) and
//! read only in the retained range, so the mapped bytes are never read and written at once.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod base;
mod entry;
mod error;
pub mod format;
pub mod inspect;
mod medium;
mod scan;
#[cfg(any(test, feature = "testing"))]
mod sim;
mod sys;
mod types;
mod upgrade;
mod volume;
mod walk;

pub use base::{BaseChunk, BaseInstall, BaseInstallSpec, BasePin, BaseReader, MAX_CHUNK_BYTES};
pub use entry::{EntryKind, WalEntry};
pub use error::{BlockVolError, Result};
pub use scan::{WalPin, WalScan};
#[cfg(any(test, feature = "testing"))]
pub use sim::{CrashMode, SimDisk, SyncHook, SyncPoint};
pub use types::{
    ApplyOutcome, CreateOptions, Digest, EntryInfo, Epoch, FlushGate, FlusherMode, Geometry, Lba,
    Lsn, OpenOptions, RepairOutcome, RetentionPolicy, Role, ScrubReport, Status,
};
pub use upgrade::{UpgradeOutcome, upgrade_file};
pub use volume::{ApplyRun, Volume};

#[cfg(test)]
mod tests {
    /// The handles the bridge layer shares across threads must stay `Send + Sync`.
    #[test]
    fn shared_handles_are_send_and_sync() {
        fn both<T: Send + Sync>() {}
        both::<crate::Volume>();
        both::<crate::WalPin>();
        both::<crate::BasePin>();
        both::<crate::WalScan>();
        both::<crate::BaseInstall>();
        both::<crate::BaseReader<'static>>();
        both::<crate::SimDisk>();
    }
}
