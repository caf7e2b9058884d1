//! The NBD protocol without I/O: constants, parsing of what a client sends into typed values,
//! and encoding of what the server answers.
//!
//! Everything here works on byte slices; the socket layer (`server.rs`) reads exactly the
//! lengths this module tells it to, after this module has bounded them. Numbers and layouts are
//! those of the protocol description (`doc/proto.md` of the NetworkBlockDevice/nbd project);
//! every integer on the wire is big-endian.
//!
//! The bounds, all checked before the socket layer allocates anything:
//! - option data: at most [`MAX_OPTION_DATA`] bytes (a longer option closes the connection);
//! - strings (export names): at most [`MAX_STRING`] bytes, UTF-8, no NUL;
//! - request payloads (`NBD_CMD_WRITE`) and read lengths: at most [`MAX_PAYLOAD`] bytes, which
//!   is also the maximum block size the server advertises. A larger write closes the connection
//!   (its payload cannot be skipped cheaply); a larger read is refused with `EINVAL`.

// ---------------------------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (16 bits, server) and client flags (32 bits).

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits).

/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// A flush or FUA on one connection covers writes completed on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (experimental; not supported here).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` (not supported here).
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` (not supported here).
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options.

/// Choose an export and enter transmission (old style, cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS (not supported here).
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts (not supported here).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts (not supported here).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 64-bit extended headers (not supported here; qemu 9+ asks first).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.

/// The option succeeded (or a list ended).
pub const REP_ACK: u32 = 1;
/// One export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of information about an export.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// The option is not known to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// The option's data is invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// The export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// The client must ask for block sizes first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// The request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of `NBD_REP_INFO`.

/// Size and transmission flags (mandatory before a successful `NBD_OPT_INFO`/`NBD_OPT_GO`).
pub const INFO_EXPORT: u16 = 0;
/// The export's canonical name.
pub const INFO_NAME: u16 = 1;
/// A human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission: commands, command flags, reply chunk types and errors.

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (followed by its payload).
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (a hint).
pub const CMD_TRIM: u16 = 4;
/// Cache (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes (no payload).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status (not supported here: no metadata context can be selected).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (the data is durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): do not create a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (read): at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (block status): one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (write zeroes): fail unless faster than a write.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (the final chunk of a successful reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: an error (with a message).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// ---------------------------------------------------------------------------------------------
// Bounds.

/// The longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The most option data this server reads; a longer option closes the connection. An
/// `NBD_OPT_GO` needs at most 4 + 4096 + 2 + 2 x (a few) bytes; metadata-context options of
/// normal clients are far below this.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// The largest write payload and read length (32 MiB), advertised as the maximum block size.
/// The protocol says a length below 2^25 should never be treated as an attack.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Bytes in a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes in an option request header.
pub const OPTION_HEADER_LEN: usize = 16;

/// An NBD error value, as sent in a simple reply or an error chunk.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NbdErrno {
    /// Operation not permitted (1).
    Perm,
    /// Input/output error (5).
    Io,
    /// Cannot allocate memory (12).
    NoMem,
    /// Invalid argument (22).
    Inval,
    /// No space left on device (28).
    NoSpc,
    /// Value too large (75).
    Overflow,
    /// Operation not supported (95).
    NotSup,
    /// Server is shutting down (108).
    Shutdown,
}

impl NbdErrno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// The C name, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }
}

/// A violation that ends the connection: the peer broke a mandatory rule or sent more than the
/// server is willing to read. The connection layer logs it and closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The client set flags this server did not offer.
    #[error("client flags {flags:#010x} carry bits this server does not know ({unknown:#x})")]
    UnknownClientFlags {
        /// The flags sent.
        flags: u32,
        /// The unknown bits.
        unknown: u32,
    },
    /// An option request did not start with `IHAVEOPT`.
    #[error("option request magic {found:#018x}, expected IHAVEOPT ({IHAVEOPT:#018x})")]
    BadOptionMagic {
        /// The magic sent.
        found: u64,
    },
    /// An option carries more data than the server reads.
    #[error("option {option} carries {len} bytes of data, more than the {max} this server reads")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its announced length.
        len: u32,
        /// The bound.
        max: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named something that is not a valid export name (it cannot be
    /// answered with an error).
    #[error("NBD_OPT_EXPORT_NAME: {0}")]
    BadExportName(String),
    /// A request did not start with the request magic.
    #[error("request magic {found:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic {
        /// The magic sent.
        found: u32,
    },
    /// A write announces more payload than the server reads.
    #[error("write of {len} bytes exceeds the {max}-byte payload bound")]
    PayloadTooLarge {
        /// The announced length.
        len: u32,
        /// The bound.
        max: u32,
    },
}

/// Why option data is refused with `NBD_REP_ERR_INVALID` (the negotiation continues).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub String);

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// The flags a client answered the greeting with.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`: leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Parses the client's 32-bit flags; any bit the server did not offer is a violation (the
    /// protocol says the server must then drop the connection).
    pub fn parse(flags: u32) -> Result<ClientFlags, ProtoError> {
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        let unknown = flags & !known;
        if unknown != 0 {
            return Err(ProtoError::UnknownClientFlags { flags, unknown });
        }
        Ok(ClientFlags {
            fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        })
    }
}

/// The header of one option request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// Bytes of option data that follow, at most [`MAX_OPTION_DATA`].
    pub len: u32,
}

impl OptionHeader {
    /// Parses the 16-byte header and bounds its length.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
        let magic = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic { found: magic });
        }
        let option = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        if len > MAX_OPTION_DATA {
            return Err(ProtoError::OptionTooLong {
                option,
                len,
                max: MAX_OPTION_DATA,
            });
        }
        Ok(OptionHeader { option, len })
    }
}

/// What an `NBD_OPT_INFO` or `NBD_OPT_GO` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoQuery {
    /// The export name ("" is the default export).
    pub name: String,
    /// The information types requested (unknown ones are ignored).
    pub requests: Vec<u16>,
}

impl InfoQuery {
    /// Whether the client asked for `info`.
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// One option request, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on this export.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoQuery),
    /// `NBD_OPT_GO`.
    Go(InfoQuery),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// Anything else (TLS, metadata contexts, extended headers, unknown codes): answered with
    /// `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// A string from the wire: at most [`MAX_STRING`] bytes of UTF-8 without NUL.
pub fn parse_string(b: &[u8]) -> Result<String, String> {
    if b.len() > MAX_STRING {
        return Err(format!(
            "string of {} bytes is longer than {MAX_STRING}",
            b.len()
        ));
    }
    let s = std::str::from_utf8(b).map_err(|e| format!("string is not UTF-8: {e}"))?;
    if s.contains('\0') {
        return Err("string contains NUL".into());
    }
    Ok(s.to_owned())
}

fn parse_info_query(data: &[u8]) -> Result<InfoQuery, InvalidOption> {
    let bad = |m: String| InvalidOption(m);
    let name_len = be_u32(data, 0).ok_or_else(|| bad("option data shorter than 6 bytes".into()))?;
    let name_len = usize::try_from(name_len).map_err(|_| bad("name length overflows".into()))?;
    if data.len() < 6 || name_len > data.len() - 6 {
        return Err(bad(format!(
            "name length {name_len} does not fit {} bytes of option data",
            data.len()
        )));
    }
    let name =
        parse_string(&data[4..4 + name_len]).map_err(|e| bad(format!("export name: {e}")))?;
    let at = 4 + name_len;
    let count = usize::from(be_u16(data, at).ok_or_else(|| bad("no request count".into()))?);
    let rest = &data[at + 2..];
    if rest.len() != count * 2 {
        return Err(bad(format!(
            "{count} information requests need {} bytes, {} follow",
            count * 2,
            rest.len()
        )));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoQuery { name, requests })
}

/// Parses option `option` with its data (at most [`MAX_OPTION_DATA`] bytes, already read).
///
/// `Err(InvalidOption)` is answered with `NBD_REP_ERR_INVALID`, except for
/// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error and closes the connection.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    match option {
        OPT_EXPORT_NAME => parse_string(data)
            .map(ClientOption::ExportName)
            .map_err(|e| InvalidOption(format!("export name: {e}"))),
        // The protocol asks the server to ignore data sent with an abort.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST if data.is_empty() => Ok(ClientOption::List),
        OPT_LIST => Err(InvalidOption(format!(
            "NBD_OPT_LIST carries {} bytes of data; it takes none",
            data.len()
        ))),
        OPT_STRUCTURED_REPLY if data.is_empty() => Ok(ClientOption::StructuredReply),
        OPT_STRUCTURED_REPLY => Err(InvalidOption(format!(
            "NBD_OPT_STRUCTURED_REPLY carries {} bytes of data; it takes none",
            data.len()
        ))),
        OPT_INFO => parse_info_query(data).map(ClientOption::Info),
        OPT_GO => parse_info_query(data).map(ClientOption::Go),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// A name for an option code, for log lines and error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// A transmission command.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (cache, block status, resize, unknown): refused with `EINVAL`.
    Other(u16),
}

impl Command {
    /// The command for a wire code.
    pub fn from_code(code: u16) -> Command {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }

    /// The command flags valid on this command (given whether `NBD_FLAG_SEND_DF` was
    /// advertised, which it is exactly when structured replies were negotiated).
    fn allowed_flags(self, df: bool) -> u16 {
        match self {
            Command::Read if df => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            // FUA is valid on every command once `NBD_FLAG_SEND_FUA` is advertised.
            _ => CMD_FLAG_FUA,
        }
    }
}

/// One request header, parsed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// What the transmission phase agreed on: the export's shape and the negotiated options.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Transmission {
    /// Export size in bytes.
    pub size: u64,
    /// Structured replies were negotiated.
    pub structured: bool,
}

/// Why a request is refused with an error reply (the connection continues).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error sent.
    pub errno: NbdErrno,
    /// Why, for the log and the error chunk.
    pub message: String,
}

impl Request {
    /// Parses the 28-byte header.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic { found: magic });
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: Command::from_code(u16::from_be_bytes([b[6], b[7]])),
            handle: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Bytes of payload that follow this header: the length of a write (at most
    /// [`MAX_PAYLOAD`]; more is a violation that closes the connection), 0 otherwise.
    pub fn payload_len(&self) -> Result<usize, ProtoError> {
        if self.command != Command::Write {
            return Ok(0);
        }
        if self.len > MAX_PAYLOAD {
            return Err(ProtoError::PayloadTooLarge {
                len: self.len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(self.len as usize)
    }

    /// Whether `NBD_CMD_FLAG_FUA` is set.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Checks flags, lengths and the range against the export, as the protocol's error
    /// section asks: an unknown command or flag and a read or trim beyond the end are
    /// `EINVAL`, a write or write-zeroes beyond the end is `ENOSPC`, a read longer than the
    /// maximum block size is `EINVAL`.
    pub fn check(&self, t: &Transmission) -> Result<(), Refusal> {
        let refuse = |errno, message: String| Err(Refusal { errno, message });
        if let Command::Other(code) = self.command {
            return refuse(NbdErrno::Inval, format!("unsupported command {code}"));
        }
        let bad_flags = self.flags & !self.command.allowed_flags(t.structured);
        if bad_flags != 0 {
            return refuse(
                NbdErrno::Inval,
                format!(
                    "command flags {bad_flags:#x} are not valid on {:?}",
                    self.command
                ),
            );
        }
        let beyond = self
            .offset
            .checked_add(u64::from(self.len))
            .is_none_or(|end| end > t.size);
        let what = || {
            format!(
                "{:?} of {} bytes at offset {} leaves the export of {} bytes",
                self.command, self.len, self.offset, t.size
            )
        };
        match self.command {
            Command::Read if self.len > MAX_PAYLOAD => refuse(
                NbdErrno::Inval,
                format!(
                    "read of {} bytes exceeds the maximum block size {MAX_PAYLOAD}",
                    self.len
                ),
            ),
            Command::Read | Command::Trim if beyond => refuse(NbdErrno::Inval, what()),
            Command::Write | Command::WriteZeroes if beyond => refuse(NbdErrno::NoSpc, what()),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    b
}

/// Appends one option reply (header and data) to `out`. Data longer than a u32 cannot occur:
/// every caller passes a bounded string or a fixed-size item.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..len as usize]);
}

/// Appends an error reply with a human-readable message (cut to [`MAX_STRING`] bytes).
pub fn put_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    put_option_reply(out, option, reply, truncate(message).as_bytes());
}

/// Appends an `NBD_REP_SERVER` naming one export.
pub fn put_rep_server(out: &mut Vec<u8>, name: &str) {
    let name = truncate(name);
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    put_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn put_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let name = truncate(name);
    let mut d = Vec::with_capacity(2 + name.len());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32, sizes: BlockSizes) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&sizes.minimum.to_be_bytes());
    d[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
    d[10..14].copy_from_slice(&sizes.maximum.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client set
/// `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(b.len() + 124, 0);
    }
    b
}

/// Advertised block sizes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment.
    pub minimum: u32,
    /// The size at which aligned requests avoid read-modify-write.
    pub preferred: u32,
    /// The largest request length.
    pub maximum: u32,
}

impl BlockSizes {
    /// Block sizes for a device of `block` bytes per block: minimum `block` (or 1 when
    /// `byte_granular`: the server then serves any alignment by read-modify-write), preferred
    /// `block`, maximum [`MAX_PAYLOAD`]. A device block size the protocol cannot express (not a
    /// power of two from 512 to 65536) falls back to the protocol's defaults, 1 / 4096.
    pub fn for_device(block: u32, byte_granular: bool) -> BlockSizes {
        let valid = block.is_power_of_two() && (512..=65536).contains(&block);
        let preferred = if valid { block } else { 4096 };
        let minimum = if valid && !byte_granular { block } else { 1 };
        BlockSizes {
            minimum,
            preferred,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// The transmission flags for a device: flush, FUA, trim and write zeroes always; don't
/// fragment with structured replies (a read is always answered with one chunk); multi-conn
/// only when a flush on one connection covers writes completed on every connection.
pub fn transmission_flags(structured: bool, multi_conn: bool) -> u16 {
    let mut f =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if structured {
        f |= FLAG_SEND_DF;
    }
    if multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// A simple reply header (followed by the data of a successful read).
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header (followed by `len` bytes of payload).
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The final `NBD_REPLY_TYPE_OFFSET_DATA` chunk's header and offset for `data_len` bytes read
/// at `offset` (followed by the data). `data_len` is at least 1 and at most [`MAX_PAYLOAD`];
/// an empty read is answered with [`none_chunk`].
pub fn offset_data_header(handle: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    let len = data_len.saturating_add(8);
    b[..20].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        len,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(handle: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message (cut to [`MAX_STRING`] bytes).
pub fn error_chunk(handle: u64, errno: NbdErrno, message: &str) -> Vec<u8> {
    let message = truncate(message);
    let mut b = Vec::with_capacity(26 + message.len());
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + message.len() as u32,
    ));
    b.extend_from_slice(&errno.code().to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message.as_bytes());
    b
}

/// `s` cut to at most [`MAX_STRING`] bytes at a character boundary.
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_bytes(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn option_header(option: u32, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn constants_are_the_protocols() {
        // The ASCII of the magics, and the values the protocol description lists.
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REPLY_TYPE_ERROR, 0x8001);
        let codes: Vec<u32> = [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [1, 5, 12, 22, 28, 75, 95, 108]);
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0, 3
            ]
        );
    }

    #[test]
    fn client_flags_known_and_unknown() {
        assert_eq!(
            ClientFlags::parse(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            ClientFlags::parse(0),
            Ok(ClientFlags {
                fixed_newstyle: false,
                no_zeroes: false
            })
        );
        assert_eq!(
            ClientFlags::parse(0x11),
            Err(ProtoError::UnknownClientFlags {
                flags: 0x11,
                unknown: 0x10
            })
        );
    }

    #[test]
    fn option_headers_are_bounded() {
        assert_eq!(
            OptionHeader::parse(&option_header(OPT_GO, 10)),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 10
            })
        );
        assert_eq!(
            OptionHeader::parse(&option_header(OPT_GO, MAX_OPTION_DATA)),
            Ok(OptionHeader {
                option: OPT_GO,
                len: MAX_OPTION_DATA
            })
        );
        assert_eq!(
            OptionHeader::parse(&option_header(OPT_GO, u32::MAX)),
            Err(ProtoError::OptionTooLong {
                option: OPT_GO,
                len: u32::MAX,
                max: MAX_OPTION_DATA
            })
        );
        let mut bad = option_header(OPT_GO, 0);
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadOptionMagic { .. })
        ));
    }

    #[test]
    fn go_and_info_parse_exactly() {
        let d = go_data(b"vol1", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_option(OPT_GO, &d),
            Ok(ClientOption::Go(InfoQuery {
                name: "vol1".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }))
        );
        assert_eq!(
            parse_option(OPT_INFO, &go_data(b"", &[])),
            Ok(ClientOption::Info(InfoQuery {
                name: String::new(),
                requests: vec![]
            }))
        );
        // A count that does not match the bytes, a name length past the end, a short option,
        // bad UTF-8 and a NUL are all invalid (answered, not fatal).
        let mut short = d.clone();
        short.pop();
        assert!(parse_option(OPT_GO, &short).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_option(OPT_GO, &long).is_err());
        let mut lying = d.clone();
        lying[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_GO, &lying).is_err());
        assert!(parse_option(OPT_GO, &[0, 0, 0]).is_err());
        assert!(parse_option(OPT_GO, &go_data(&[0xff, 0xfe], &[])).is_err());
        assert!(parse_option(OPT_GO, &go_data(b"a\0b", &[])).is_err());
        assert!(parse_option(OPT_GO, &go_data(&[b'x'; MAX_STRING + 1], &[])).is_err());
    }

    #[test]
    fn other_options() {
        assert_eq!(parse_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, &[]),
            Ok(ClientOption::StructuredReply)
        );
        assert!(parse_option(OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert_eq!(parse_option(OPT_ABORT, &[9, 9]), Ok(ClientOption::Abort));
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"vol"),
            Ok(ClientOption::ExportName("vol".into()))
        );
        for code in [
            OPT_STARTTLS,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
            OPT_EXTENDED_HEADERS,
            4242,
        ] {
            assert_eq!(
                parse_option(code, &[1, 2, 3]),
                Ok(ClientOption::Unsupported(code))
            );
        }
    }

    #[test]
    fn requests_parse_and_check() {
        let t = Transmission {
            size: 1 << 20,
            structured: false,
        };
        let r = Request::parse(&request_bytes(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                handle: 7,
                offset: 4096,
                len: 512
            }
        );
        assert!(r.fua());
        assert_eq!(r.payload_len(), Ok(512));
        assert_eq!(r.check(&t), Ok(()));

        let mut bad = request_bytes(0, CMD_READ, 1, 0, 1);
        bad[3] ^= 0x40;
        assert!(matches!(
            Request::parse(&bad),
            Err(ProtoError::BadRequestMagic { .. })
        ));

        let parse = |flags, cmd, off, len| {
            let r = Request::parse(&request_bytes(flags, cmd, 1, off, len)).unwrap();
            r.check(&t).map_err(|e| e.errno)
        };
        // Ranges: reads and trims beyond the end are EINVAL, writes ENOSPC; an offset that
        // overflows with its length is beyond the end too.
        assert_eq!(parse(0, CMD_READ, (1 << 20) - 1, 1), Ok(()));
        assert_eq!(parse(0, CMD_READ, 1 << 20, 1), Err(NbdErrno::Inval));
        assert_eq!(parse(0, CMD_TRIM, 1 << 20, 1), Err(NbdErrno::Inval));
        assert_eq!(parse(0, CMD_WRITE, 1 << 20, 1), Err(NbdErrno::NoSpc));
        assert_eq!(
            parse(0, CMD_WRITE_ZEROES, u64::MAX, 2),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(parse(0, CMD_READ, u64::MAX, 2), Err(NbdErrno::Inval));
        // A read longer than the maximum block size.
        let big = Transmission {
            size: u64::MAX,
            structured: true,
        };
        let r = Request::parse(&request_bytes(0, CMD_READ, 1, 0, MAX_PAYLOAD + 1)).unwrap();
        assert_eq!(r.check(&big).map_err(|e| e.errno), Err(NbdErrno::Inval));
        // Flags: NO_HOLE only on write zeroes, DF only on reads with structured replies,
        // FAST_ZERO never (not advertised), unknown bits never.
        assert_eq!(parse(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 1), Ok(()));
        assert_eq!(
            parse(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1),
            Err(NbdErrno::Inval)
        );
        assert_eq!(parse(CMD_FLAG_DF, CMD_READ, 0, 1), Err(NbdErrno::Inval));
        let r = Request::parse(&request_bytes(CMD_FLAG_DF, CMD_READ, 1, 0, 1)).unwrap();
        assert_eq!(r.check(&big), Ok(()));
        assert_eq!(
            parse(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 1),
            Err(NbdErrno::Inval)
        );
        assert_eq!(parse(1 << 9, CMD_FLUSH, 0, 0), Err(NbdErrno::Inval));
        assert_eq!(parse(CMD_FLAG_FUA, CMD_FLUSH, 0, 0), Ok(()));
        // Unsupported commands.
        assert_eq!(parse(0, CMD_CACHE, 0, 1), Err(NbdErrno::Inval));
        assert_eq!(parse(0, CMD_BLOCK_STATUS, 0, 1), Err(NbdErrno::Inval));
        assert_eq!(parse(0, 999, 0, 1), Err(NbdErrno::Inval));
    }

    #[test]
    fn write_payload_is_bounded() {
        let ok = Request::parse(&request_bytes(0, CMD_WRITE, 1, 0, MAX_PAYLOAD)).unwrap();
        assert_eq!(ok.payload_len(), Ok(MAX_PAYLOAD as usize));
        let over = Request::parse(&request_bytes(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1)).unwrap();
        assert_eq!(
            over.payload_len(),
            Err(ProtoError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
        // Only writes carry a payload, whatever their length says.
        let read = Request::parse(&request_bytes(0, CMD_READ, 1, 0, u32::MAX)).unwrap();
        assert_eq!(read.payload_len(), Ok(0));
    }

    #[test]
    fn replies_encode() {
        let mut out = Vec::new();
        put_option_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, "no");
        assert_eq!(out.len(), 20 + 2);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ERR_UNKNOWN.to_be_bytes());
        assert_eq!(&out[16..20], &2u32.to_be_bytes());
        assert_eq!(&out[20..], b"no");

        let mut out = Vec::new();
        put_info_export(&mut out, OPT_INFO, 1 << 30, 0x14d);
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&out[22..30], &(1u64 << 30).to_be_bytes());
        assert_eq!(&out[30..32], &0x14du16.to_be_bytes());

        let mut out = Vec::new();
        put_info_block_size(&mut out, OPT_GO, BlockSizes::for_device(4096, false));
        assert_eq!(&out[16..20], &14u32.to_be_bytes());
        assert_eq!(&out[22..26], &4096u32.to_be_bytes());
        assert_eq!(&out[26..30], &4096u32.to_be_bytes());
        assert_eq!(&out[30..34], &MAX_PAYLOAD.to_be_bytes());

        let mut out = Vec::new();
        put_rep_server(&mut out, "ab");
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[20..], &[0, 0, 0, 2, b'a', b'b']);

        assert_eq!(export_name_reply(5, 1, false).len(), 134);
        assert_eq!(export_name_reply(5, 1, true).len(), 10);

        let e = error_chunk(9, NbdErrno::Perm, "fenced");
        assert_eq!(&e[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&e[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[8..16], &9u64.to_be_bytes());
        assert_eq!(&e[16..20], &12u32.to_be_bytes());
        assert_eq!(&e[20..24], &1u32.to_be_bytes());
        assert_eq!(&e[24..26], &6u16.to_be_bytes());
        assert_eq!(&e[26..], b"fenced");
        // A long message is cut to the protocol's string limit, at a character boundary.
        let long = "é".repeat(MAX_STRING);
        let e = error_chunk(1, NbdErrno::Io, &long);
        assert_eq!(e.len(), 26 + MAX_STRING);

        let h = offset_data_header(3, 4096, 512);
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..28], &4096u64.to_be_bytes());
        assert_eq!(simple_reply(22, 5)[4..8], 22u32.to_be_bytes());
    }

    #[test]
    fn block_sizes_and_flags() {
        assert_eq!(
            BlockSizes::for_device(4096, true),
            BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_PAYLOAD
            }
        );
        assert_eq!(BlockSizes::for_device(3000, false).minimum, 1);
        assert_eq!(BlockSizes::for_device(1 << 20, false).preferred, 4096);
        let f = transmission_flags(false, true);
        assert_eq!(f & FLAG_SEND_DF, 0);
        assert_ne!(f & FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(transmission_flags(true, false) & FLAG_SEND_DF, 0);
        assert_eq!(transmission_flags(true, false) & FLAG_CAN_MULTI_CONN, 0);
    }

    proptest! {
        /// No byte string makes a parser panic, and what they accept stays within the bounds.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), code in any::<u32>()) {
            let mut h = [0u8; 16];
            let n = bytes.len().min(16);
            h[..n].copy_from_slice(&bytes[..n]);
            if let Ok(oh) = OptionHeader::parse(&h) {
                prop_assert!(oh.len <= MAX_OPTION_DATA);
            }
            let mut r = [0u8; 28];
            let n = bytes.len().min(28);
            r[..n].copy_from_slice(&bytes[..n]);
            if let Ok(req) = Request::parse(&r) {
                if let Ok(p) = req.payload_len() {
                    prop_assert!(p <= MAX_PAYLOAD as usize);
                }
                let _ = req.check(&Transmission { size: 1 << 30, structured: true });
            }
            if let Ok(ClientOption::Go(q) | ClientOption::Info(q)) = parse_option(code % 12, &bytes) {
                prop_assert!(q.name.len() <= MAX_STRING);
                prop_assert!(q.requests.len() * 2 < bytes.len());
            }
        }

        /// Whatever GO query is encoded parses back to itself.
        #[test]
        fn go_round_trip(name in "[a-z0-9/_-]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..16)) {
            let d = go_data(name.as_bytes(), &infos);
            prop_assert_eq!(
                parse_option(OPT_GO, &d),
                Ok(ClientOption::Go(InfoQuery { name, requests: infos }))
            );
        }
    }
}
