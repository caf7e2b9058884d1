//! Conversions between blockvol's and the engine's vocabularies. The two crates define their
//! own `Lsn` and `Epoch` on purpose (neither knows the other); this is the only place that maps
//! them.

use blockvol::{BlockVolError, EntryInfo};
use engine::{EntryId, Epoch, Lsn, ReplicaHandshake, StorageError, TransferError};

use crate::target::HandshakeReply;

/// blockvol LSN to engine LSN.
pub fn to_engine(lsn: blockvol::Lsn) -> Lsn {
    Lsn(lsn.0)
}

/// Engine LSN to blockvol LSN.
pub fn to_blockvol(lsn: Lsn) -> blockvol::Lsn {
    blockvol::Lsn(lsn.get())
}

/// blockvol epoch to engine epoch.
pub fn epoch_to_engine(epoch: blockvol::Epoch) -> Epoch {
    Epoch(epoch.0)
}

/// Engine epoch to blockvol epoch.
pub fn epoch_to_blockvol(epoch: Epoch) -> blockvol::Epoch {
    blockvol::Epoch(epoch.get())
}

/// blockvol's entry identity as the engine's.
pub fn entry_id(info: EntryInfo) -> EntryId {
    EntryId {
        lsn: to_engine(info.lsn),
        epoch: epoch_to_engine(info.epoch),
        checksum: info.content_crc,
    }
}

/// What a replica's handshake reply tells the engine: its head and tip identity, or that its
/// store is not a valid copy (an interrupted base install).
pub fn handshake(reply: &HandshakeReply) -> ReplicaHandshake {
    if reply.install_incomplete {
        ReplicaHandshake::incomplete(to_engine(reply.head))
    } else {
        let hs = ReplicaHandshake::new(to_engine(reply.head), entry_id(reply.tip));
        match &reply.log {
            Some(log) => hs.with_log(**log),
            None => hs,
        }
    }
}

/// The engine's entry identity as blockvol's.
pub fn entry_info(id: EntryId) -> EntryInfo {
    EntryInfo {
        lsn: to_blockvol(id.lsn),
        epoch: epoch_to_blockvol(id.epoch),
        content_crc: id.checksum,
    }
}

/// A blockvol failure on the primary side, as the engine's storage error.
pub fn storage_error(e: BlockVolError) -> StorageError {
    match e {
        BlockVolError::Recycled {
            requested,
            retained_start,
        } => StorageError::Recycled {
            requested: to_engine(requested),
            retained_start: to_engine(retained_start),
        },
        other => StorageError::Backend(other.to_string()),
    }
}

/// A blockvol failure while reading the primary for a transfer, as a transfer error.
pub fn primary_transfer_error(e: BlockVolError, from: Lsn) -> TransferError {
    match e {
        BlockVolError::Recycled { retained_start, .. } => TransferError::Recycled {
            from,
            retained_start: to_engine(retained_start),
        },
        BlockVolError::Gap { expected, found } => TransferError::Gap {
            expected: to_engine(expected),
            found: to_engine(found),
        },
        e @ BlockVolError::Corrupt { .. } => TransferError::Corrupt {
            lsn: None,
            detail: e.to_string(),
        },
        // A revoked pin no longer protects the range: to the engine the entries are gone.
        BlockVolError::Revoked { reason } => {
            log::info!("primary pin revoked during a transfer from {from}: {reason}");
            TransferError::Recycled {
                from,
                retained_start: from,
            }
        }
        e @ (BlockVolError::ScanInvalidated { .. } | BlockVolError::Decode { .. }) => {
            TransferError::Corrupt {
                lsn: None,
                detail: e.to_string(),
            }
        }
        other => TransferError::Storage {
            detail: format!("primary: {other}"),
        },
    }
}
