//! The wire protocol, sans I/O: messages in, bytes out, and bytes in, messages out. No sockets,
//! no clocks, no threads, so every byte sequence can be fed to [`Decoder`] in a test or a fuzzer.
//!
//! A frame is a 12-byte header and a payload (`docs/wire.md` has every field):
//!
//! ```text
//! type u8 | flags u8 (0) | reserved u16 (0) | length u32 BE | crc32c u32 BE | payload
//! ```
//!
//! The CRC32C covers the first 8 header bytes and the payload, so a flipped bit anywhere in a
//! frame is caught before the payload is parsed. A length above the connection's maximum frame
//! size is refused from the header alone, before anything is allocated. WAL entries and base
//! chunks travel in blockvol's own encoded forms, which carry their own checksums end to end.

mod auth;
mod codec;

use blockvol::{EntryInfo, Epoch, Lba, Lsn};
use bytes::{BufMut, BytesMut};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, TargetError, TruncateRequest,
};

pub use auth::{Authenticator, MAC_LEN, NONCE_LEN, Nonce, Role as AuthRole};
pub use codec::MAX_STRING;
use codec::{Reader, Writer};

/// The first bytes of every connection's first frame payload (`Hello`, `Challenge`).
pub const MAGIC: [u8; 4] = *b"SWBT";
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// The largest frame payload a connection accepts unless configured lower: 16 MiB, enough for
/// the engine's default chunks (1,024 entries of 4 KiB, or 4 MiB of base image) with room.
pub const DEFAULT_MAX_FRAME: u32 = 16 << 20;
/// Feature bit: the peer pipelines base chunks under the credit window.
pub const FEATURE_PIPELINED_BASE: u64 = 1;
/// Every feature this build knows.
pub const FEATURES: u64 = FEATURE_PIPELINED_BASE;
/// Longest volume name.
pub const MAX_VOLUME_NAME: usize = 128;
/// Longest node name in a `Hello` (a server ID: up to 255 bytes).
pub const MAX_NODE_NAME: usize = 255;

/// Why bytes are not a valid frame. Every variant closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The header names a length above the maximum frame size.
    #[error("frame of {length} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The length the header named.
        length: u64,
        /// The maximum.
        max: u32,
    },
    /// An unknown frame type.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// Flags or reserved bits that this version does not define.
    #[error("frame type 0x{kind:02x} has flags 0x{flags:02x} and reserved 0x{reserved:04x}")]
    ReservedBits {
        /// The frame type.
        kind: u8,
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
    /// The CRC32C does not match the frame.
    #[error(
        "frame type 0x{kind:02x} of {length} bytes: crc32c {found:08x}, computed {computed:08x}"
    )]
    Checksum {
        /// The frame type.
        kind: u8,
        /// Payload length.
        length: u32,
        /// The CRC in the header.
        found: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// A field runs past the end of the payload.
    #[error("payload ends inside {field}: {need} bytes needed, {have} left")]
    Truncated {
        /// The field.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes after the last field.
    #[error("{count} bytes after the last field ({after})")]
    TrailingBytes {
        /// The last field read.
        after: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A field's value is out of range.
    #[error("{field}: {detail}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Not this protocol, or not this version of it.
    #[error("not a swblock transport peer or another version: {0}")]
    Preamble(String),
}

macro_rules! frame_types {
    ($($(#[$doc:meta])* $name:ident = $code:literal,)*) => {
        /// The type byte of a frame: one per message.
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType {
            $($(#[$doc])* $name = $code,)*
        }

        impl FrameType {
            /// Every frame type, in code order.
            pub const ALL: &'static [FrameType] = &[$(FrameType::$name,)*];

            /// The type with code `code`.
            pub fn from_code(code: u8) -> Option<FrameType> {
                match code {
                    $($code => Some(FrameType::$name),)*
                    _ => None,
                }
            }

            /// The type's name, as `docs/wire.md` spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(FrameType::$name => stringify!($name),)*
                }
            }
        }
    };
}

frame_types! {
    /// Client to server: magic, version, features, the client's nonce, its node name.
    Hello = 0x01,
    /// Server to client: magic, version, accepted features, the server's nonce, its MAC, the
    /// maximum frame size and the credit window it grants.
    Challenge = 0x02,
    /// Client to server: the client's MAC.
    Auth = 0x03,
    /// Server to client: authenticated; requests may follow.
    Ready = 0x04,
    /// Either way: the sender closes the connection, with a code and a reason.
    Close = 0x05,
    /// Request: the replica's handshake (head, tip, checkpoint, epoch).
    HandshakeReq = 0x10,
    /// Request: the replica's state, and optionally its digest.
    ProbeReq = 0x11,
    /// Request: apply a run of WAL entries on an anchor.
    ApplyReq = 0x12,
    /// Request: truncate after an LSN.
    TruncateReq = 0x13,
    /// Request: begin a base install.
    BaseBeginReq = 0x14,
    /// Request: one base chunk (zero runs elided by blockvol's chunk form).
    BaseChunkReq = 0x15,
    /// Request: finish the base install.
    BaseFinishReq = 0x16,
    /// Request: make everything durable and report how far.
    BarrierReq = 0x17,
    /// Remote-primary request: the volume's retained history.
    HistoryReq = 0x18,
    /// Remote-primary request: the identity of the entry at an LSN.
    EntryIdReq = 0x19,
    /// Remote-primary request: pin WAL, a snapshot or a full base image under a lease.
    PinReq = 0x1a,
    /// Remote-primary request: extend every lease of this connection.
    RenewReq = 0x1b,
    /// Remote-primary request: release one lease (and its pin).
    ReleaseReq = 0x1c,
    /// Remote-primary request: WAL entries after an LSN, in wire form.
    ReadWalReq = 0x1d,
    /// Remote-primary request: open the image a lease pins.
    ImageOpenReq = 0x1e,
    /// Remote-primary request: the next chunk of the open image.
    ImageReadReq = 0x1f,
    /// Reply to `HandshakeReq`.
    HandshakeRep = 0x20,
    /// Reply to `ProbeReq`.
    ProbeRep = 0x21,
    /// Reply to `ApplyReq`.
    ApplyRep = 0x22,
    /// Reply to `TruncateReq`: the new tip.
    TruncateRep = 0x23,
    /// Reply to `BaseChunkReq`.
    AckRep = 0x24,
    /// Reply to `BaseFinishReq`: the base LSN now held.
    BaseFinishRep = 0x25,
    /// Reply to `BarrierReq`.
    BarrierRep = 0x26,
    /// Reply to `HistoryReq`.
    HistoryRep = 0x27,
    /// Reply to `EntryIdReq`.
    EntryIdRep = 0x28,
    /// Reply to `PinReq`: the lease and the pinned LSN.
    PinnedRep = 0x29,
    /// Reply to `RenewReq` and `ReleaseReq`.
    DoneRep = 0x2a,
    /// Reply to `ReadWalReq`.
    WalRep = 0x2b,
    /// Reply to `ImageOpenReq`: how to install the image.
    ImageOpenRep = 0x2c,
    /// Reply to `ImageReadReq`.
    ImageChunkRep = 0x2d,
    /// Reply to `BaseBeginReq`: the block the sender starts at (a resumed install).
    BaseBegunRep = 0x2e,
    /// Reply to any request the replica refused or failed.
    ErrorRep = 0x2f,
    /// Request: verify a range of the copy's flushed blocks against their checksums.
    ScrubReq = 0x30,
    /// Request: one block, verified.
    ReadBlockReq = 0x31,
    /// Request: repair a damaged block from the sender's verified copy.
    RepairReq = 0x32,
    /// Reply to `ScrubReq`: blocks checked, skipped, and the damaged ones.
    ScrubRep = 0x40,
    /// Reply to `ReadBlockReq`: the block.
    BlockRep = 0x41,
    /// Reply to `RepairReq`: what the repair did.
    RepairRep = 0x42,
}

/// Most blocks one `ScrubReq` may name (16 MiB of 4 KiB blocks): it bounds the time one
/// request holds a connection and the size of its reply.
pub const MAX_SCRUB_BLOCKS: u32 = 4096;

/// What a client says first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Features the client supports.
    pub features: u64,
    /// The client's challenge to the server.
    pub nonce: Nonce,
    /// The client's node name (for logs).
    pub node: String,
}

/// The server's answer to a `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Protocol version.
    pub version: u16,
    /// Features both sides support.
    pub features: u64,
    /// The server's challenge to the client.
    pub nonce: Nonce,
    /// The server's proof of the cluster secret over both nonces.
    pub mac: [u8; MAC_LEN],
    /// The largest frame payload the server accepts.
    pub max_frame: u32,
    /// Request bytes the client may have in flight (sent, not yet answered).
    pub window: u32,
}

/// Why a connection is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// A [`CloseCode`] value.
    pub code: u16,
    /// Detail for the peer's log.
    pub reason: String,
}

/// Close codes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// A protocol violation (bad frame, wrong order).
    Protocol = 1,
    /// Authentication failed.
    AuthFailed = 2,
    /// The server has no room for another connection.
    Busy = 3,
    /// A deadline passed (a handshake or a frame took too long).
    Timeout = 4,
    /// The server is shutting down.
    Shutdown = 5,
    /// Another protocol version.
    Version = 6,
    /// The client is done with the connection (a puller that closes: its pins go at once).
    Done = 7,
}

/// The replica's state as a probe reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    /// The last LSN held.
    pub head: Lsn,
    /// Entries at or below this are in the extent.
    pub checkpoint: Lsn,
    /// The committed point the replica was told.
    pub committed: Lsn,
    /// The replica's persisted epoch.
    pub epoch: Epoch,
    /// A base install was interrupted.
    pub install_incomplete: bool,
    /// The digest of the replica's image at `head`, when asked for.
    pub digest: Option<u128>,
    /// Pins held on the volume (by recoveries, pullers and scans).
    pub pins: u32,
}

/// What a `PinReq` pins.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PinWhat {
    /// Every WAL entry after the LSN.
    Wal = 1,
    /// The checkpoint image at the LSN (and nothing else: a snapshot + tail rebuild pins the
    /// WAL after it separately).
    Snapshot = 2,
    /// A full base image at the LSN (the committed point).
    FullBase = 3,
}

/// A primary's retained history, as `HistoryRep` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryReply {
    /// The last LSN written.
    pub head: Lsn,
    /// Entries at or below this are gone from the WAL.
    pub tail: Lsn,
    /// The committed point.
    pub committed: Lsn,
    /// The checkpoint, if any was flushed.
    pub checkpoint: Option<Lsn>,
    /// Whether the checkpoint image can be trusted.
    pub checkpoint_trusted: bool,
    /// Ranges `(after, to]` inside the retained span that are missing.
    pub missing: Vec<(Lsn, Lsn)>,
}

/// One chunk of an image, as `ImageChunkRep` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageChunkReply {
    /// The chunk in blockvol's checksummed form; `None` at the image's end.
    pub frame: Option<Vec<u8>>,
    /// Image bytes it covers.
    pub scanned: u64,
    /// Data bytes it carries.
    pub sent: u64,
}

/// A request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// [`FrameType::HandshakeReq`].
    Handshake,
    /// [`FrameType::ProbeReq`]: with the digest or not.
    Probe {
        /// Compute the replica's digest (reads the whole image).
        digest: bool,
    },
    /// [`FrameType::ApplyReq`].
    Apply(ApplyRequest),
    /// [`FrameType::TruncateReq`].
    Truncate(TruncateRequest),
    /// [`FrameType::BaseBeginReq`].
    BaseBegin(BaseBeginRequest),
    /// [`FrameType::BaseChunkReq`].
    BaseChunk(BaseChunkRequest),
    /// [`FrameType::BaseFinishReq`].
    BaseFinish(Lineage),
    /// [`FrameType::BarrierReq`].
    Barrier(BarrierRequest),
    /// [`FrameType::HistoryReq`].
    History,
    /// [`FrameType::EntryIdReq`].
    EntryId(Lsn),
    /// [`FrameType::PinReq`].
    Pin {
        /// What to pin.
        what: PinWhat,
        /// At or after which LSN.
        lsn: Lsn,
        /// How long the lease lasts without a renewal, in milliseconds.
        lease_ms: u32,
    },
    /// [`FrameType::RenewReq`]: every lease of the connection, for this long.
    Renew {
        /// Milliseconds.
        lease_ms: u32,
    },
    /// [`FrameType::ReleaseReq`].
    Release(u64),
    /// [`FrameType::ReadWalReq`].
    ReadWal {
        /// Entries after this LSN.
        after: Lsn,
        /// At most this many (at least one is sent).
        want: u32,
    },
    /// [`FrameType::ImageOpenReq`].
    ImageOpen {
        /// The lease pinning the image.
        lease: u64,
        /// The image's LSN.
        lsn: Lsn,
        /// The first block to read (the replica's resume point; 0 for the whole image).
        from: Lba,
    },
    /// [`FrameType::ImageReadReq`]: at most this many data bytes.
    ImageRead(u32),
    /// [`FrameType::ScrubReq`].
    Scrub {
        /// The first block.
        from: Lba,
        /// How many (at most [`MAX_SCRUB_BLOCKS`]).
        count: u32,
    },
    /// [`FrameType::ReadBlockReq`].
    ReadBlock(Lba),
    /// [`FrameType::RepairReq`].
    Repair {
        /// The sender's lineage: its epoch must be the copy's.
        lineage: Lineage,
        /// The block.
        lba: Lba,
        /// The sender's verified copy of it.
        data: Vec<u8>,
    },
}

impl Request {
    /// Whether the request is for the volume's primary side (a puller's history, pins and
    /// reads) rather than its replica side.
    pub fn is_primary_side(&self) -> bool {
        matches!(
            self,
            Request::History
                | Request::EntryId(_)
                | Request::Pin { .. }
                | Request::Renew { .. }
                | Request::Release(_)
                | Request::ReadWal { .. }
                | Request::ImageOpen { .. }
                | Request::ImageRead(_)
        )
    }

    /// The lineage of a mutating request; `None` for reads.
    pub fn lineage(&self) -> Option<Lineage> {
        match self {
            // Exhaustive on purpose: a new mutating request must say where its lineage is.
            Request::Handshake
            | Request::Probe { .. }
            | Request::History
            | Request::EntryId(_)
            | Request::Pin { .. }
            | Request::Renew { .. }
            | Request::Release(_)
            | Request::ReadWal { .. }
            | Request::ImageOpen { .. }
            | Request::ImageRead(_)
            | Request::Scrub { .. }
            | Request::ReadBlock(_) => None,
            Request::Repair { lineage, .. } => Some(*lineage),
            Request::Apply(r) => Some(r.lineage),
            Request::Truncate(r) => Some(r.lineage),
            Request::BaseBegin(r) => Some(r.lineage),
            Request::BaseChunk(r) => Some(r.lineage),
            Request::BaseFinish(l) => Some(*l),
            Request::Barrier(r) => Some(r.lineage),
        }
    }

    fn frame_type(&self) -> FrameType {
        match self {
            Request::Handshake => FrameType::HandshakeReq,
            Request::Probe { .. } => FrameType::ProbeReq,
            Request::Apply(_) => FrameType::ApplyReq,
            Request::Truncate(_) => FrameType::TruncateReq,
            Request::BaseBegin(_) => FrameType::BaseBeginReq,
            Request::BaseChunk(_) => FrameType::BaseChunkReq,
            Request::BaseFinish(_) => FrameType::BaseFinishReq,
            Request::Barrier(_) => FrameType::BarrierReq,
            Request::History => FrameType::HistoryReq,
            Request::EntryId(_) => FrameType::EntryIdReq,
            Request::Pin { .. } => FrameType::PinReq,
            Request::Renew { .. } => FrameType::RenewReq,
            Request::Release(_) => FrameType::ReleaseReq,
            Request::ReadWal { .. } => FrameType::ReadWalReq,
            Request::ImageOpen { .. } => FrameType::ImageOpenReq,
            Request::ImageRead(_) => FrameType::ImageReadReq,
            Request::Scrub { .. } => FrameType::ScrubReq,
            Request::ReadBlock(_) => FrameType::ReadBlockReq,
            Request::Repair { .. } => FrameType::RepairReq,
        }
    }
}

/// A reply body. Replies to mutating requests echo the request's lineage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// [`FrameType::HandshakeRep`].
    Handshake(HandshakeReply),
    /// [`FrameType::ProbeRep`].
    Probe(ProbeReply),
    /// [`FrameType::ApplyRep`].
    Apply(Lineage, ApplyReply),
    /// [`FrameType::TruncateRep`]: the new tip.
    Truncate(Lineage, EntryInfo),
    /// [`FrameType::AckRep`].
    Ack(Lineage),
    /// [`FrameType::BaseBegunRep`]: the block the sender starts the image at.
    BaseBegun(Lineage, Lba),
    /// [`FrameType::BaseFinishRep`]: the base LSN held.
    BaseFinish(Lineage, Lsn),
    /// [`FrameType::BarrierRep`].
    Barrier(Lineage, BarrierReply),
    /// [`FrameType::ErrorRep`]: the request's lineage (if it had one) and why it failed.
    Error(Option<Lineage>, TargetError),
    /// [`FrameType::HistoryRep`].
    History(HistoryReply),
    /// [`FrameType::EntryIdRep`].
    EntryId(Option<EntryInfo>),
    /// [`FrameType::PinnedRep`]: the lease and the LSN pinned.
    Pinned {
        /// The lease, named in renewals and releases.
        lease: u64,
        /// The pinned LSN (the WAL pin's start, or the image's LSN).
        lsn: Lsn,
    },
    /// [`FrameType::DoneRep`].
    Done,
    /// [`FrameType::WalRep`]: `count` entries in wire form.
    Wal {
        /// How many.
        count: u32,
        /// The entries, back to back.
        frames: Vec<u8>,
    },
    /// [`FrameType::ImageOpenRep`].
    ImageOpen {
        /// The image's LSN.
        base_lsn: Lsn,
        /// The primary's entry there.
        base_entry: EntryInfo,
        /// The primary's geometry.
        geometry: blockvol::Geometry,
    },
    /// [`FrameType::ImageChunkRep`].
    ImageChunk(ImageChunkReply),
    /// [`FrameType::ScrubRep`].
    Scrub(blockvol::ScrubReport),
    /// [`FrameType::BlockRep`]: the block's bytes.
    Block(Lba, Vec<u8>),
    /// [`FrameType::RepairRep`].
    Repair(Lineage, blockvol::RepairOutcome),
}

impl Reply {
    /// The lineage the reply echoes.
    pub fn lineage(&self) -> Option<Lineage> {
        match self {
            Reply::Handshake(_)
            | Reply::Probe(_)
            | Reply::History(_)
            | Reply::EntryId(_)
            | Reply::Pinned { .. }
            | Reply::Done
            | Reply::Wal { .. }
            | Reply::ImageOpen { .. }
            | Reply::ImageChunk(_)
            | Reply::Scrub(_)
            | Reply::Block(..) => None,
            Reply::Repair(l, _) => Some(*l),
            Reply::Apply(l, _)
            | Reply::Truncate(l, _)
            | Reply::Ack(l)
            | Reply::BaseBegun(l, _)
            | Reply::BaseFinish(l, _)
            | Reply::Barrier(l, _) => Some(*l),
            Reply::Error(l, _) => *l,
        }
    }

    fn frame_type(&self) -> FrameType {
        match self {
            Reply::Handshake(_) => FrameType::HandshakeRep,
            Reply::Probe(_) => FrameType::ProbeRep,
            Reply::Apply(..) => FrameType::ApplyRep,
            Reply::Truncate(..) => FrameType::TruncateRep,
            Reply::Ack(_) => FrameType::AckRep,
            Reply::BaseBegun(..) => FrameType::BaseBegunRep,
            Reply::BaseFinish(..) => FrameType::BaseFinishRep,
            Reply::Barrier(..) => FrameType::BarrierRep,
            Reply::Error(..) => FrameType::ErrorRep,
            Reply::History(_) => FrameType::HistoryRep,
            Reply::EntryId(_) => FrameType::EntryIdRep,
            Reply::Pinned { .. } => FrameType::PinnedRep,
            Reply::Done => FrameType::DoneRep,
            Reply::Wal { .. } => FrameType::WalRep,
            Reply::ImageOpen { .. } => FrameType::ImageOpenRep,
            Reply::ImageChunk(_) => FrameType::ImageChunkRep,
            Reply::Scrub(_) => FrameType::ScrubRep,
            Reply::Block(..) => FrameType::BlockRep,
            Reply::Repair(..) => FrameType::RepairRep,
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// [`FrameType::Hello`].
    Hello(Hello),
    /// [`FrameType::Challenge`].
    Challenge(Challenge),
    /// [`FrameType::Auth`]: the client's MAC.
    Auth([u8; MAC_LEN]),
    /// [`FrameType::Ready`].
    Ready,
    /// [`FrameType::Close`].
    Close(Close),
    /// A request for volume `volume`, numbered `id` by the client.
    Request {
        /// The client's request number (replies carry it back).
        id: u64,
        /// The volume it is for.
        volume: String,
        /// What is asked.
        body: Request,
    },
    /// The reply to request `id`.
    Reply {
        /// The request's number.
        id: u64,
        /// The answer.
        body: Reply,
    },
}

impl Message {
    /// The frame type the message travels as.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::Challenge(_) => FrameType::Challenge,
            Message::Auth(_) => FrameType::Auth,
            Message::Ready => FrameType::Ready,
            Message::Close(_) => FrameType::Close,
            Message::Request { body, .. } => body.frame_type(),
            Message::Reply { body, .. } => body.frame_type(),
        }
    }
}

/// Checks a volume name: 1 to [`MAX_VOLUME_NAME`] bytes of ASCII letters, digits, `-`, `_` and
/// `.`, not starting with `.` (a server maps names to files, so nothing else may pass).
pub fn check_volume_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(WireError::BadValue {
            field: "volume",
            detail: format!("invalid volume name {name:?}"),
        })
    }
}

/// Appends `msg` as one frame to `out`. Refuses a payload above `max_frame` (nothing is
/// appended then).
pub fn encode(msg: &Message, max_frame: u32, out: &mut BytesMut) -> Result<usize, WireError> {
    let start = out.len();
    out.put_bytes(0, HEADER_LEN);
    let mut w = Writer { out };
    let body = encode_payload(msg, &mut w);
    let payload_len = out.len() - start - HEADER_LEN;
    if let Err(e) = body {
        out.truncate(start);
        return Err(e);
    }
    if payload_len > max_frame as usize {
        out.truncate(start);
        return Err(WireError::FrameTooLarge {
            length: payload_len as u64,
            max: max_frame,
        });
    }
    let header = &mut out[start..start + HEADER_LEN];
    header[0] = msg.frame_type() as u8;
    header[4..8].copy_from_slice(&(payload_len as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start..start + 8]),
        &out[start + HEADER_LEN..],
    );
    out[start + 8..start + HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    Ok(HEADER_LEN + payload_len)
}

fn encode_payload(msg: &Message, w: &mut Writer<'_>) -> Result<(), WireError> {
    match msg {
        Message::Hello(h) => {
            w.raw(&MAGIC);
            w.u16(h.version);
            w.u64(h.features);
            w.raw(&h.nonce.0);
            w.string(&h.node);
        }
        Message::Challenge(c) => {
            w.raw(&MAGIC);
            w.u16(c.version);
            w.u64(c.features);
            w.raw(&c.nonce.0);
            w.raw(&c.mac);
            w.u32(c.max_frame);
            w.u32(c.window);
        }
        Message::Auth(mac) => w.raw(mac),
        Message::Ready => {}
        Message::Close(c) => {
            w.u16(c.code);
            w.string(&c.reason);
        }
        Message::Request { id, volume, body } => {
            w.u64(*id);
            w.string(volume);
            encode_request(body, w)?;
        }
        Message::Reply { id, body } => {
            w.u64(*id);
            encode_reply(body, w)?;
        }
    }
    Ok(())
}

fn encode_request(body: &Request, w: &mut Writer<'_>) -> Result<(), WireError> {
    match body {
        Request::Handshake => {}
        Request::Probe { digest } => w.bool(*digest),
        Request::Apply(r) => {
            w.lineage(&r.lineage);
            w.u64(r.committed.0);
            w.entry_info(&r.anchor);
            w.u32(r.count);
            w.bytes(&r.frames)?;
        }
        Request::Truncate(r) => {
            w.lineage(&r.lineage);
            w.u64(r.after.0);
            w.u64(r.committed.0);
        }
        Request::BaseBegin(r) => {
            w.lineage(&r.lineage);
            w.u64(r.base_lsn.0);
            w.entry_info(&r.base_entry);
            w.geometry(&r.geometry);
        }
        Request::BaseChunk(r) => {
            w.lineage(&r.lineage);
            w.bytes(&r.frame)?;
        }
        Request::BaseFinish(l) => w.lineage(l),
        Request::Barrier(r) => {
            w.lineage(&r.lineage);
            w.u64(r.target.0);
            match &r.expected_tip {
                Some(tip) => {
                    w.bool(true);
                    w.entry_info(tip);
                }
                None => w.bool(false),
            }
            w.u64(r.committed.0);
        }
        Request::History => {}
        Request::EntryId(lsn) => w.u64(lsn.0),
        Request::Pin {
            what,
            lsn,
            lease_ms,
        } => {
            w.u8(*what as u8);
            w.u64(lsn.0);
            w.u32(*lease_ms);
        }
        Request::Renew { lease_ms } => w.u32(*lease_ms),
        Request::Release(lease) => w.u64(*lease),
        Request::ReadWal { after, want } => {
            w.u64(after.0);
            w.u32(*want);
        }
        Request::ImageOpen { lease, lsn, from } => {
            w.u64(*lease);
            w.u64(lsn.0);
            w.u64(from.0);
        }
        Request::Scrub { from, count } => {
            w.u64(from.0);
            w.u32(*count);
        }
        Request::ReadBlock(lba) => w.u64(lba.0),
        Request::Repair { lineage, lba, data } => {
            w.lineage(lineage);
            w.u64(lba.0);
            w.bytes(data)?;
        }
        Request::ImageRead(max) => w.u32(*max),
    }
    Ok(())
}

fn encode_reply(body: &Reply, w: &mut Writer<'_>) -> Result<(), WireError> {
    match body {
        Reply::Handshake(h) => {
            w.u64(h.head.0);
            w.entry_info(&h.tip);
            w.u64(h.checkpoint.0);
            w.u64(h.epoch.0);
            w.bool(h.install_incomplete);
            match &h.log {
                Some(log) => {
                    w.u64(log.floor().0);
                    // At most MAX_EPOCH_STARTS (16) by construction.
                    w.u8(log.starts().len() as u8);
                    for e in log.starts() {
                        w.u64(e.epoch.0);
                        w.u64(e.first.0);
                    }
                }
                None => {
                    w.u64(0);
                    w.u8(0);
                }
            }
        }
        Reply::Probe(p) => {
            w.u64(p.head.0);
            w.u64(p.checkpoint.0);
            w.u64(p.committed.0);
            w.u64(p.epoch.0);
            w.bool(p.install_incomplete);
            match p.digest {
                Some(d) => {
                    w.bool(true);
                    w.u128(d);
                }
                None => w.bool(false),
            }
            w.u32(p.pins);
        }
        Reply::Apply(l, r) => {
            w.lineage(l);
            w.u64(r.applied_to.0);
            w.u64(r.applied);
            w.u64(r.duplicates);
        }
        Reply::Truncate(l, tip) => {
            w.lineage(l);
            w.entry_info(tip);
        }
        Reply::Ack(l) => w.lineage(l),
        Reply::BaseBegun(l, from) => {
            w.lineage(l);
            w.u64(from.0);
        }
        Reply::BaseFinish(l, lsn) => {
            w.lineage(l);
            w.u64(lsn.0);
        }
        Reply::Barrier(l, r) => {
            w.lineage(l);
            w.u64(r.durable.0);
            w.entry_info(&r.tip);
        }
        Reply::Error(l, e) => {
            match l {
                Some(l) => {
                    w.bool(true);
                    w.lineage(l);
                }
                None => w.bool(false),
            }
            encode_target_error(e, w);
        }
        Reply::History(h) => {
            w.u64(h.head.0);
            w.u64(h.tail.0);
            w.u64(h.committed.0);
            match h.checkpoint {
                Some(c) => {
                    w.bool(true);
                    w.u64(c.0);
                }
                None => w.bool(false),
            }
            w.bool(h.checkpoint_trusted);
            w.u32(
                u32::try_from(h.missing.len()).map_err(|_| WireError::BadValue {
                    field: "history.missing",
                    detail: "too many ranges".into(),
                })?,
            );
            for (after, to) in &h.missing {
                w.u64(after.0);
                w.u64(to.0);
            }
        }
        Reply::EntryId(e) => match e {
            Some(e) => {
                w.bool(true);
                w.entry_info(e);
            }
            None => w.bool(false),
        },
        Reply::Pinned { lease, lsn } => {
            w.u64(*lease);
            w.u64(lsn.0);
        }
        Reply::Done => {}
        Reply::Wal { count, frames } => {
            w.u32(*count);
            w.bytes(frames)?;
        }
        Reply::ImageOpen {
            base_lsn,
            base_entry,
            geometry,
        } => {
            w.u64(base_lsn.0);
            w.entry_info(base_entry);
            w.geometry(geometry);
        }
        Reply::ImageChunk(c) => {
            match &c.frame {
                Some(f) => {
                    w.bool(true);
                    w.bytes(f)?;
                }
                None => w.bool(false),
            }
            w.u64(c.scanned);
            w.u64(c.sent);
        }
        Reply::Scrub(r) => {
            w.u64(r.checked);
            w.u64(r.skipped);
            w.u32(
                u32::try_from(r.damaged.len()).map_err(|_| WireError::BadValue {
                    field: "scrub.damaged",
                    detail: format!("{} blocks", r.damaged.len()),
                })?,
            );
            for l in &r.damaged {
                w.u64(l.0);
            }
        }
        Reply::Block(lba, data) => {
            w.u64(lba.0);
            w.bytes(data)?;
        }
        Reply::Repair(l, o) => {
            w.lineage(l);
            w.u8(repair_code(*o));
        }
    }
    Ok(())
}

/// Error codes of [`FrameType::ErrorRep`].
mod error_code {
    pub const FENCED: u8 = 1;
    pub const GAP: u8 = 2;
    pub const DIVERGENT: u8 = 3;
    pub const BELOW_CHECKPOINT: u8 = 4;
    pub const BELOW_COMMITTED: u8 = 5;
    pub const BAD_FRAME: u8 = 6;
    pub const STORAGE: u8 = 7;
    pub const PROTOCOL: u8 = 8;
    pub const TRANSPORT: u8 = 9;
}

fn encode_target_error(e: &TargetError, w: &mut Writer<'_>) {
    use error_code::*;
    match e {
        TargetError::Fenced(d) => {
            w.u8(FENCED);
            w.string(d);
        }
        TargetError::Gap { expected, found } => {
            w.u8(GAP);
            w.u64(expected.0);
            w.u64(found.0);
        }
        TargetError::Divergent { lsn, detail } => {
            w.u8(DIVERGENT);
            w.u64(lsn.0);
            w.string(detail);
        }
        TargetError::BelowCheckpoint {
            requested,
            checkpoint,
        } => {
            w.u8(BELOW_CHECKPOINT);
            w.u64(requested.0);
            w.u64(checkpoint.0);
        }
        TargetError::BelowCommitted {
            requested,
            committed,
        } => {
            w.u8(BELOW_COMMITTED);
            w.u64(requested.0);
            w.u64(committed.0);
        }
        TargetError::BadFrame(d) => {
            w.u8(BAD_FRAME);
            w.string(d);
        }
        TargetError::Storage(d) => {
            w.u8(STORAGE);
            w.string(d);
        }
        TargetError::Transport(d) => {
            w.u8(TRANSPORT);
            w.string(d);
        }
        other => {
            w.u8(PROTOCOL);
            let detail = match other {
                TargetError::Protocol(d) => d.clone(),
                e => e.to_string(),
            };
            w.string(&detail);
        }
    }
}

fn decode_target_error(r: &mut Reader<'_>) -> Result<TargetError, WireError> {
    use error_code::*;
    let code = r.u8("error.code")?;
    Ok(match code {
        FENCED => TargetError::Fenced(r.string("error.detail", MAX_STRING)?),
        GAP => TargetError::Gap {
            expected: r.lsn("error.expected")?,
            found: r.lsn("error.found")?,
        },
        DIVERGENT => TargetError::Divergent {
            lsn: r.lsn("error.lsn")?,
            detail: r.string("error.detail", MAX_STRING)?,
        },
        BELOW_CHECKPOINT => TargetError::BelowCheckpoint {
            requested: r.lsn("error.requested")?,
            checkpoint: r.lsn("error.checkpoint")?,
        },
        BELOW_COMMITTED => TargetError::BelowCommitted {
            requested: r.lsn("error.requested")?,
            committed: r.lsn("error.committed")?,
        },
        BAD_FRAME => TargetError::BadFrame(r.string("error.detail", MAX_STRING)?),
        STORAGE => TargetError::Storage(r.string("error.detail", MAX_STRING)?),
        PROTOCOL => TargetError::Protocol(r.string("error.detail", MAX_STRING)?),
        TRANSPORT => TargetError::Transport(r.string("error.detail", MAX_STRING)?),
        other => {
            return Err(WireError::BadValue {
                field: "error.code",
                detail: format!("unknown error code {other}"),
            });
        }
    })
}

/// A handshake's epoch list: floor u64, count u8 (0: none; at most
/// [`engine::MAX_EPOCH_STARTS`], checked before anything is read), then `(epoch, first)` pairs,
/// which must rise (a list that does not is refused, not trimmed).
fn decode_replica_log(r: &mut Reader<'_>) -> Result<Option<Box<engine::ReplicaLog>>, WireError> {
    let floor = r.u64("handshake.log_floor")?;
    let n = usize::from(r.u8("handshake.log_epochs")?);
    if n == 0 {
        return Ok(None);
    }
    if n > engine::MAX_EPOCH_STARTS {
        return Err(WireError::BadValue {
            field: "handshake.log_epochs",
            detail: format!("{n} epochs, at most {}", engine::MAX_EPOCH_STARTS),
        });
    }
    let mut starts = [engine::EpochStart {
        epoch: engine::Epoch(0),
        first: engine::Lsn(0),
    }; engine::MAX_EPOCH_STARTS];
    for s in starts.iter_mut().take(n) {
        s.epoch = engine::Epoch(r.u64("handshake.log_epoch")?);
        s.first = engine::Lsn(r.u64("handshake.log_first")?);
    }
    engine::ReplicaLog::new(engine::Lsn(floor), &starts[..n])
        .map(|log| Some(Box::new(log)))
        .map_err(|e| WireError::BadValue {
            field: "handshake.log",
            detail: e.to_string(),
        })
}

/// Decodes one frame's payload (its header already checked).
fn decode_payload(kind: FrameType, payload: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader::new(payload);
    let msg = match kind {
        FrameType::Hello => {
            check_magic(&mut r)?;
            Message::Hello(Hello {
                version: r.u16("hello.version")?,
                features: r.u64("hello.features")?,
                nonce: Nonce(r.array("hello.nonce")?),
                node: r.string("hello.node", MAX_NODE_NAME)?,
            })
        }
        FrameType::Challenge => {
            check_magic(&mut r)?;
            Message::Challenge(Challenge {
                version: r.u16("challenge.version")?,
                features: r.u64("challenge.features")?,
                nonce: Nonce(r.array("challenge.nonce")?),
                mac: r.array("challenge.mac")?,
                max_frame: r.u32("challenge.max_frame")?,
                window: r.u32("challenge.window")?,
            })
        }
        FrameType::Auth => Message::Auth(r.array("auth.mac")?),
        FrameType::Ready => Message::Ready,
        FrameType::Close => Message::Close(Close {
            code: r.u16("close.code")?,
            reason: r.string("close.reason", MAX_STRING)?,
        }),
        FrameType::HandshakeReq
        | FrameType::ProbeReq
        | FrameType::ApplyReq
        | FrameType::TruncateReq
        | FrameType::BaseBeginReq
        | FrameType::BaseChunkReq
        | FrameType::BaseFinishReq
        | FrameType::BarrierReq
        | FrameType::HistoryReq
        | FrameType::EntryIdReq
        | FrameType::PinReq
        | FrameType::RenewReq
        | FrameType::ReleaseReq
        | FrameType::ReadWalReq
        | FrameType::ImageOpenReq
        | FrameType::ImageReadReq
        | FrameType::ScrubReq
        | FrameType::ReadBlockReq
        | FrameType::RepairReq => {
            let id = r.u64("request.id")?;
            let volume = r.string("request.volume", MAX_VOLUME_NAME)?;
            check_volume_name(&volume)?;
            let body = decode_request(kind, &mut r)?;
            Message::Request { id, volume, body }
        }
        FrameType::HandshakeRep
        | FrameType::ProbeRep
        | FrameType::ApplyRep
        | FrameType::TruncateRep
        | FrameType::AckRep
        | FrameType::BaseBegunRep
        | FrameType::BaseFinishRep
        | FrameType::BarrierRep
        | FrameType::ErrorRep
        | FrameType::HistoryRep
        | FrameType::EntryIdRep
        | FrameType::PinnedRep
        | FrameType::DoneRep
        | FrameType::WalRep
        | FrameType::ImageOpenRep
        | FrameType::ImageChunkRep
        | FrameType::ScrubRep
        | FrameType::BlockRep
        | FrameType::RepairRep => {
            let id = r.u64("reply.id")?;
            let body = decode_reply(kind, &mut r)?;
            Message::Reply { id, body }
        }
    };
    r.finish()?;
    Ok(msg)
}

fn check_magic(r: &mut Reader<'_>) -> Result<(), WireError> {
    let magic: [u8; 4] = r.array("magic")?;
    if magic != MAGIC {
        return Err(WireError::Preamble(format!("magic {magic:02x?}")));
    }
    Ok(())
}

fn decode_request(kind: FrameType, r: &mut Reader<'_>) -> Result<Request, WireError> {
    Ok(match kind {
        FrameType::HandshakeReq => Request::Handshake,
        FrameType::ProbeReq => Request::Probe {
            digest: r.bool("probe.digest")?,
        },
        FrameType::ApplyReq => Request::Apply(ApplyRequest {
            lineage: r.lineage()?,
            committed: r.lsn("apply.committed")?,
            anchor: r.entry_info("apply.anchor")?,
            count: r.u32("apply.count")?,
            frames: r.bytes("apply.frames")?,
        }),
        FrameType::TruncateReq => Request::Truncate(TruncateRequest {
            lineage: r.lineage()?,
            after: r.lsn("truncate.after")?,
            committed: r.lsn("truncate.committed")?,
        }),
        FrameType::BaseBeginReq => Request::BaseBegin(BaseBeginRequest {
            lineage: r.lineage()?,
            base_lsn: r.lsn("base_begin.base_lsn")?,
            base_entry: r.entry_info("base_begin.base_entry")?,
            geometry: r.geometry()?,
        }),
        FrameType::BaseChunkReq => Request::BaseChunk(BaseChunkRequest {
            lineage: r.lineage()?,
            frame: r.bytes("base_chunk.frame")?,
        }),
        FrameType::BaseFinishReq => Request::BaseFinish(r.lineage()?),
        FrameType::BarrierReq => Request::Barrier(BarrierRequest {
            lineage: r.lineage()?,
            target: r.lsn("barrier.target")?,
            expected_tip: if r.bool("barrier.has_tip")? {
                Some(r.entry_info("barrier.expected_tip")?)
            } else {
                None
            },
            committed: r.lsn("barrier.committed")?,
        }),
        FrameType::HistoryReq => Request::History,
        FrameType::EntryIdReq => Request::EntryId(r.lsn("entry_id.lsn")?),
        FrameType::PinReq => Request::Pin {
            what: match r.u8("pin.what")? {
                1 => PinWhat::Wal,
                2 => PinWhat::Snapshot,
                3 => PinWhat::FullBase,
                v => {
                    return Err(WireError::BadValue {
                        field: "pin.what",
                        detail: format!("unknown pin kind {v}"),
                    });
                }
            },
            lsn: r.lsn("pin.lsn")?,
            lease_ms: r.u32("pin.lease_ms")?,
        },
        FrameType::RenewReq => Request::Renew {
            lease_ms: r.u32("renew.lease_ms")?,
        },
        FrameType::ReleaseReq => Request::Release(r.u64("release.lease")?),
        FrameType::ReadWalReq => Request::ReadWal {
            after: r.lsn("read_wal.after")?,
            want: r.u32("read_wal.want")?,
        },
        FrameType::ImageOpenReq => Request::ImageOpen {
            lease: r.u64("image_open.lease")?,
            lsn: r.lsn("image_open.lsn")?,
            from: Lba(r.u64("image_open.from")?),
        },
        FrameType::ImageReadReq => Request::ImageRead(r.u32("image_read.max_bytes")?),
        FrameType::ScrubReq => {
            let from = Lba(r.u64("scrub.from")?);
            let count = r.u32("scrub.count")?;
            if count == 0 || count > MAX_SCRUB_BLOCKS {
                return Err(WireError::BadValue {
                    field: "scrub.count",
                    detail: format!("{count} blocks, 1 to {MAX_SCRUB_BLOCKS}"),
                });
            }
            Request::Scrub { from, count }
        }
        FrameType::ReadBlockReq => Request::ReadBlock(Lba(r.u64("read_block.lba")?)),
        FrameType::RepairReq => Request::Repair {
            lineage: r.lineage()?,
            lba: Lba(r.u64("repair.lba")?),
            data: r.bytes("repair.data")?,
        },
        other => {
            return Err(WireError::BadValue {
                field: "type",
                detail: format!("{} is not a request", other.name()),
            });
        }
    })
}

fn decode_reply(kind: FrameType, r: &mut Reader<'_>) -> Result<Reply, WireError> {
    Ok(match kind {
        FrameType::HandshakeRep => Reply::Handshake(HandshakeReply {
            head: r.lsn("handshake.head")?,
            tip: r.entry_info("handshake.tip")?,
            checkpoint: r.lsn("handshake.checkpoint")?,
            epoch: Epoch(r.u64("handshake.epoch")?),
            install_incomplete: r.bool("handshake.install_incomplete")?,
            log: decode_replica_log(r)?,
        }),
        FrameType::ProbeRep => Reply::Probe(ProbeReply {
            head: r.lsn("probe.head")?,
            checkpoint: r.lsn("probe.checkpoint")?,
            committed: r.lsn("probe.committed")?,
            epoch: Epoch(r.u64("probe.epoch")?),
            install_incomplete: r.bool("probe.install_incomplete")?,
            digest: if r.bool("probe.has_digest")? {
                Some(r.u128("probe.digest")?)
            } else {
                None
            },
            pins: r.u32("probe.pins")?,
        }),
        FrameType::ApplyRep => Reply::Apply(
            r.lineage()?,
            ApplyReply {
                applied_to: r.lsn("apply.applied_to")?,
                applied: r.u64("apply.applied")?,
                duplicates: r.u64("apply.duplicates")?,
            },
        ),
        FrameType::TruncateRep => Reply::Truncate(r.lineage()?, r.entry_info("truncate.tip")?),
        FrameType::AckRep => Reply::Ack(r.lineage()?),
        FrameType::BaseBegunRep => Reply::BaseBegun(r.lineage()?, Lba(r.u64("base_begun.from")?)),
        FrameType::BaseFinishRep => Reply::BaseFinish(r.lineage()?, r.lsn("base_finish.lsn")?),
        FrameType::BarrierRep => {
            let l = r.lineage()?;
            Reply::Barrier(
                l,
                BarrierReply {
                    durable: r.lsn("barrier.durable")?,
                    tip: r.entry_info("barrier.tip")?,
                },
            )
        }
        FrameType::ErrorRep => {
            let lineage = if r.bool("error.has_lineage")? {
                Some(r.lineage()?)
            } else {
                None
            };
            Reply::Error(lineage, decode_target_error(r)?)
        }
        FrameType::HistoryRep => {
            let head = r.lsn("history.head")?;
            let tail = r.lsn("history.tail")?;
            let committed = r.lsn("history.committed")?;
            let checkpoint = if r.bool("history.has_checkpoint")? {
                Some(r.lsn("history.checkpoint")?)
            } else {
                None
            };
            let checkpoint_trusted = r.bool("history.checkpoint_trusted")?;
            let n = r.u32("history.missing")? as usize;
            // Each range is 16 bytes: the count is checked against the frame before any
            // allocation.
            let mut missing = Vec::with_capacity(n.min(r.remaining() / 16));
            for _ in 0..n {
                missing.push((r.lsn("history.missing")?, r.lsn("history.missing")?));
            }
            Reply::History(HistoryReply {
                head,
                tail,
                committed,
                checkpoint,
                checkpoint_trusted,
                missing,
            })
        }
        FrameType::EntryIdRep => Reply::EntryId(if r.bool("entry_id.has")? {
            Some(r.entry_info("entry_id.entry")?)
        } else {
            None
        }),
        FrameType::PinnedRep => Reply::Pinned {
            lease: r.u64("pinned.lease")?,
            lsn: r.lsn("pinned.lsn")?,
        },
        FrameType::DoneRep => Reply::Done,
        FrameType::WalRep => Reply::Wal {
            count: r.u32("wal.count")?,
            frames: r.bytes("wal.frames")?,
        },
        FrameType::ImageOpenRep => Reply::ImageOpen {
            base_lsn: r.lsn("image_open.base_lsn")?,
            base_entry: r.entry_info("image_open.base_entry")?,
            geometry: r.geometry()?,
        },
        FrameType::ImageChunkRep => {
            let frame = if r.bool("image_chunk.has_frame")? {
                Some(r.bytes("image_chunk.frame")?)
            } else {
                None
            };
            Reply::ImageChunk(ImageChunkReply {
                frame,
                scanned: r.u64("image_chunk.scanned")?,
                sent: r.u64("image_chunk.sent")?,
            })
        }
        FrameType::ScrubRep => {
            let checked = r.u64("scrub.checked")?;
            let skipped = r.u64("scrub.skipped")?;
            let n = r.u32("scrub.damaged")?;
            if n > MAX_SCRUB_BLOCKS {
                return Err(WireError::BadValue {
                    field: "scrub.damaged",
                    detail: format!("{n} blocks, at most {MAX_SCRUB_BLOCKS}"),
                });
            }
            let mut damaged = Vec::with_capacity((n as usize).min(r.remaining() / 8));
            for _ in 0..n {
                damaged.push(Lba(r.u64("scrub.damaged_lba")?));
            }
            Reply::Scrub(blockvol::ScrubReport {
                checked,
                skipped,
                damaged,
            })
        }
        FrameType::BlockRep => Reply::Block(Lba(r.u64("block.lba")?), r.bytes("block.data")?),
        FrameType::RepairRep => {
            let l = r.lineage()?;
            let code = r.u8("repair.outcome")?;
            let o = repair_outcome(code).ok_or_else(|| WireError::BadValue {
                field: "repair.outcome",
                detail: format!("unknown outcome {code}"),
            })?;
            Reply::Repair(l, o)
        }
        other => {
            return Err(WireError::BadValue {
                field: "type",
                detail: format!("{} is not a reply", other.name()),
            });
        }
    })
}

/// A checked frame header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame type.
    pub kind: FrameType,
    /// The payload length.
    pub length: u32,
    /// The CRC32C in the header.
    pub crc: u32,
}

/// Checks a frame header: known type, zero flags and reserved bits, a length within
/// `max_frame`.
pub fn decode_header(bytes: &[u8; HEADER_LEN], max_frame: u32) -> Result<Header, WireError> {
    let code = bytes[0];
    let flags = bytes[1];
    let reserved = u16::from_be_bytes([bytes[2], bytes[3]]);
    let length = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let crc = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let kind = FrameType::from_code(code).ok_or(WireError::UnknownType(code))?;
    if flags != 0 || reserved != 0 {
        return Err(WireError::ReservedBits {
            kind: code,
            flags,
            reserved,
        });
    }
    if length > max_frame {
        return Err(WireError::FrameTooLarge {
            length: u64::from(length),
            max: max_frame,
        });
    }
    Ok(Header { kind, length, crc })
}

/// Turns a byte stream into messages. Holds at most one frame (header plus at most
/// `max_frame` payload bytes) beyond what the caller feeds it in one call.
#[derive(Debug)]
pub struct Decoder {
    max_frame: u32,
    buf: BytesMut,
}

impl Decoder {
    /// A decoder that refuses frames above `max_frame` payload bytes.
    pub fn new(max_frame: u32) -> Self {
        Decoder {
            max_frame,
            buf: BytesMut::new(),
        }
    }

    /// The maximum frame payload.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Lowers or raises the maximum (after the peer's `Challenge`).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Adds received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of buffer the decoder has allocated (bounded by one maximum frame plus what was
    /// fed, whatever a header claims).
    pub fn reserved(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether a frame has started but not finished.
    pub fn mid_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete message, `None` if more bytes are needed. After an error the stream
    /// cannot be resynchronised: the connection must be closed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let Some(frame) = self.next_frame()? else {
            return Ok(None);
        };
        decode_payload(frame.0, &frame.1).map(Some)
    }

    /// The next complete frame's type and verified payload.
    fn next_frame(&mut self) -> Result<Option<(FrameType, BytesMut)>, WireError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(&self.buf[..HEADER_LEN]);
        let header = decode_header(&header_bytes, self.max_frame)?;
        let total = HEADER_LEN + header.length as usize;
        if self.buf.len() < total {
            // The length is within the maximum: reserving for it is bounded.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&frame[..8]), &frame[HEADER_LEN..]);
        if computed != header.crc {
            return Err(WireError::Checksum {
                kind: header.kind as u8,
                length: header.length,
                found: header.crc,
                computed,
            });
        }
        let payload = frame.split_off(HEADER_LEN);
        Ok(Some((header.kind, payload)))
    }
}

fn repair_code(o: blockvol::RepairOutcome) -> u8 {
    match o {
        blockvol::RepairOutcome::NotDamaged => 1,
        blockvol::RepairOutcome::NewerInWal => 2,
        blockvol::RepairOutcome::ExtentRewritten => 3,
        blockvol::RepairOutcome::ChecksumRewritten => 4,
    }
}

fn repair_outcome(code: u8) -> Option<blockvol::RepairOutcome> {
    Some(match code {
        1 => blockvol::RepairOutcome::NotDamaged,
        2 => blockvol::RepairOutcome::NewerInWal,
        3 => blockvol::RepairOutcome::ExtentRewritten,
        4 => blockvol::RepairOutcome::ChecksumRewritten,
        _ => return None,
    })
}
