//! A framed TCP connection: the wire codec over a blocking socket, with deadlines.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::wire::{Decoder, Message, WireError, encode};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// Why a connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer sent bytes that are not a valid frame.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("closed by peer{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Eof {
        /// Whether a frame had started.
        mid_frame: bool,
    },
    /// A deadline passed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// One framed connection.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    out: BytesMut,
    scratch: Box<[u8]>,
    /// Payload limit for frames this side sends (the peer's maximum).
    send_max: u32,
    /// Bytes written and read, for statistics.
    pub(crate) bytes_out: u64,
    pub(crate) bytes_in: u64,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, max_frame: u32) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            decoder: Decoder::new(max_frame),
            out: BytesMut::with_capacity(READ_CHUNK),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            send_max: max_frame,
            bytes_out: 0,
            bytes_in: 0,
        })
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sets the largest payload this side sends (the peer's announced maximum).
    pub(crate) fn set_send_max(&mut self, max: u32) {
        self.send_max = max;
    }

    /// Sets the largest payload this side accepts.
    pub(crate) fn set_recv_max(&mut self, max: u32) {
        self.decoder.set_max_frame(max);
    }

    /// Encodes `msg` into the send buffer (refused if it is larger than the peer accepts).
    pub(crate) fn queue(&mut self, msg: &Message) -> Result<usize, WireError> {
        encode(msg, self.send_max, &mut self.out)
    }

    /// Writes everything queued, within `timeout` in all (not per system call: a peer that
    /// reads a few bytes at a time cannot stretch it).
    pub(crate) fn flush(&mut self, timeout: Duration) -> Result<(), ConnError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut written = 0;
        let res = loop {
            if written == self.out.len() {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ConnError::Timeout("the peer to read"));
            }
            if let Err(e) = self.stream.set_write_timeout(Some(left)) {
                break Err(ConnError::Io(e));
            }
            match self.stream.write(&self.out[written..]) {
                Ok(0) => break Err(ConnError::Eof { mid_frame: true }),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break Err(ConnError::Timeout("the peer to read"));
                }
                Err(e) => break Err(ConnError::Io(e)),
            }
        };
        self.bytes_out += written as u64;
        self.out.clear();
        // A large frame's buffer is not kept for the connection's life.
        if self.out.capacity() > 4 * READ_CHUNK {
            self.out = BytesMut::with_capacity(READ_CHUNK);
        }
        res
    }

    /// Queues and writes one message.
    pub(crate) fn send(&mut self, msg: &Message, timeout: Duration) -> Result<(), ConnError> {
        self.queue(msg)?;
        self.flush(timeout)
    }

    /// Whether a frame has started arriving.
    pub(crate) fn mid_frame(&self) -> bool {
        self.decoder.mid_frame()
    }

    /// The next message. Waits at most `idle` for a frame to start and at most `frame` for a
    /// started frame to finish, so a peer that trickles bytes cannot hold the connection.
    pub(crate) fn recv(
        &mut self,
        idle: Duration,
        frame: Duration,
        waiting_for: &'static str,
    ) -> Result<Message, ConnError> {
        let start = Instant::now();
        let mut frame_start = self.decoder.mid_frame().then_some(start);
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(msg);
            }
            if frame_start.is_none() && self.decoder.mid_frame() {
                frame_start = Some(Instant::now());
            }
            let deadline = match frame_start {
                Some(t) => t + frame,
                None => start + idle,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ConnError::Timeout(waiting_for));
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            match self.stream.read(&mut self.scratch) {
                Ok(0) => {
                    return Err(ConnError::Eof {
                        mid_frame: self.decoder.mid_frame(),
                    });
                }
                Ok(n) => {
                    self.bytes_in += n as u64;
                    self.decoder.feed(&self.scratch[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }
}
