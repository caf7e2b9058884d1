//! A minimal blocking NBD client: fixed newstyle handshake, `NBD_OPT_GO`, simple replies, one
//! request at a time (`READ`, `WRITE`, `FLUSH`, `DISC`). It exists for tools that must know
//! exactly which requests the server acknowledged (the nemesis workload records every
//! acknowledged flush); tests of the server itself use clients we did not write (`qemu-io`,
//! `qemu-img`, `nbdinfo`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, IHAVEOPT, NBDMAGIC, OPT_GO,
    OPTION_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or timed out.
    #[error("nbd connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("nbd protocol: {0}")]
    Protocol(String),
    /// The server refused the export.
    #[error("export refused: option reply {reply:#x}: {message}")]
    Refused {
        /// The reply type (an `NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error (an errno value).
    #[error("request failed with errno {0}")]
    Errno(u32),
}

/// Most bytes one option reply may carry before the client gives up.
const MAX_OPTION_REPLY: u32 = 64 << 10;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// One connection to one export.
#[derive(Debug)]
pub struct NbdClient {
    sock: TcpStream,
    size: u64,
    handle: u64,
}

fn read_u16(s: &mut TcpStream) -> Result<u16, ClientError> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut TcpStream) -> Result<u32, ClientError> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut TcpStream) -> Result<u64, ClientError> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connects to `addr` and opens `export`; every later read and write on the socket times
    /// out after `timeout`.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> Result<Self, ClientError> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server is not fixed newstyle".into()));
        }
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        // NBD_OPT_GO: the export name and no information requests.
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .map_err(|_| ClientError::Protocol("export name too long".into()))?;
        let mut opt = Vec::with_capacity(16 + name.len() + 6);
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(name_len + 6).to_be_bytes());
        opt.extend_from_slice(&name_len.to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let option = read_u32(&mut s)?;
            let reply = read_u32(&mut s)?;
            let len = read_u32(&mut s)?;
            if option != OPT_GO {
                return Err(ClientError::Protocol(format!(
                    "reply to option {option}, asked {OPT_GO}"
                )));
            }
            if len > MAX_OPTION_REPLY {
                return Err(ClientError::Protocol(format!(
                    "option reply of {len} bytes"
                )));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            if reply & (1 << 31) != 0 {
                return Err(ClientError::Refused {
                    reply,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            match reply {
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply {other}"
                    )));
                }
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no export size".into()))?;
        Ok(NbdClient {
            sock: s,
            size,
            handle: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, ClientError> {
        self.handle += 1;
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.sock.write_all(&h)?;
        Ok(self.handle)
    }

    fn reply(&mut self, handle: u64) -> Result<(), ClientError> {
        if read_u32(&mut self.sock)? != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad reply magic".into()));
        }
        let error = read_u32(&mut self.sock)?;
        let got = read_u64(&mut self.sock)?;
        if got != handle {
            return Err(ClientError::Protocol(format!(
                "reply for handle {got}, expected {handle}"
            )));
        }
        if error != 0 {
            return Err(ClientError::Errno(error));
        }
        Ok(())
    }

    /// Writes `data` at `offset`; `Ok` once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("write too large".into()))?;
        let h = self.request(CMD_WRITE, offset, len, data)?;
        self.reply(h)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let h = self.request(CMD_READ, offset, len, &[])?;
        self.reply(h)?;
        let mut buf = vec![0u8; len as usize];
        self.sock.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Flushes; `Ok` once the server acknowledged every write before it as durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let h = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply(h)
    }

    /// Says goodbye and closes.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}
