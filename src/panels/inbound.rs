//! A panel's client frames (RFC 6455 §5, server role), read without a buffer of the
//! panel's own.
//!
//! Headers are parsed by tungstenite's [`FrameHeader`] from at most 14 bytes kept in the
//! reader; a control frame's payload (§5.5: at most 125 bytes) goes to a fixed array; a
//! data message (a client op: text or binary, at most [`MAX_CLIENT_FRAME`] bytes, maybe
//! fragmented, §5.4) is read into a buffer of exactly its size (a fragmented one: of
//! [`MAX_CLIENT_FRAME`] at once, never reallocated). That buffer, and the
//! replies the op gets, are paid for by a *grant* from the panels' shared [`InputPool`]:
//! a panel takes one when the first frame of a message arrives (or waits for one, its
//! socket unread, so TCP pushes back) and gives it back once the replies are written
//! ([`Inbound::release_grant`]). Most panels send an op now and then, so a few grants
//! serve many panels, and what a panel holds of its own stays a few hundred bytes.
//!
//! What is checked (the client is failed with the close code of [`ReadError::close_code`]):
//! masking (§5.1), reserved bits and opcodes, a 64-bit length's top bit and a length in
//! more bytes than it needs (§5.2),
//! control frames unfragmented and at most 125 bytes (§5.5), continuation only inside a
//! fragmented message and no new message inside one (§5.4), the message size (1009,
//! before its payload is read), UTF-8 of a whole text message and of a close reason
//! (1007, §8.1), the close code (§7.4).

use std::future::Future;
use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use crate::budget::MAX_CLIENT_FRAME;

/// Longest client frame header: 2 bytes, 8 of extended length, 4 of mask (§5.2).
const MAX_HEAD: usize = 14;
/// Largest control frame payload (§5.5).
const MAX_CONTROL: usize = 125;

/// The grants panels read their ops with: `grants` panels at once may hold a message
/// being read and its replies (each [`crate::budget::INPUT_GRANT`] bytes at most).
/// Waiters are served in order (tokio's semaphore is fair).
#[derive(Clone, Debug)]
pub(crate) struct InputPool {
    semaphore: Arc<Semaphore>,
    grants: usize,
}

impl InputPool {
    pub fn new(grants: usize) -> Self {
        InputPool {
            semaphore: Arc::new(Semaphore::new(grants)),
            grants,
        }
    }

    /// Grants held now.
    pub fn held(&self) -> usize {
        self.grants - self.available()
    }

    /// Grants not held now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Wait for a grant.
    pub async fn acquire(&self) -> Grant {
        let permit = self.semaphore.clone().acquire_owned().await;
        Grant::new(permit.expect("the pool's semaphore is never closed"))
    }
}

/// One panel's share of the [`InputPool`], held since `since`.
pub(crate) struct Grant {
    _permit: OwnedSemaphorePermit,
    since: Instant,
}

impl Grant {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        Grant {
            _permit: permit,
            since: Instant::now(),
        }
    }
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientMessage {
    /// A text message, valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    /// A ping's payload (≤ 125 bytes), to be echoed in a pong (§5.5.2).
    Ping(Bytes),
    Pong,
    /// A close frame and its status code, if it has one (§5.5.1). Nothing is read after it.
    Close(Option<u16>),
}

/// Why reading client frames stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection")]
    Eof,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message over {MAX_CLIENT_FRAME} bytes")]
    TooBig,
    #[error("text is not UTF-8")]
    Utf8,
    /// A message read slower than the grant it holds may be held while the pool has
    /// none free.
    #[error("a message sent too slowly while other panels waited for the input pool")]
    TooSlow,
}

impl ReadError {
    /// The close code the client is failed with (RFC 6455 §7.4.1); `None`: the
    /// connection is gone, nothing can be sent.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ReadError::Io(_) | ReadError::Eof => None,
            ReadError::Protocol(_) => Some(CloseCode::Protocol),
            ReadError::TooBig => Some(CloseCode::Size),
            ReadError::Utf8 => Some(CloseCode::Invalid),
            ReadError::TooSlow => Some(CloseCode::Policy),
        }
    }
}

/// The frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct Payload {
    opcode: OpCode,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes, and how many are read.
    len: usize,
    done: usize,
    /// Where a data frame's payload starts in the message buffer.
    start: usize,
}

type Acquiring = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Reads client messages from a socket's read half. Every method is cancel-safe: what
/// was read is kept here, and the next call goes on from it.
pub(crate) struct Inbound<R> {
    io: R,
    pool: InputPool,
    head: [u8; MAX_HEAD],
    head_have: u8,
    frame: Option<Payload>,
    control: [u8; MAX_CONTROL],
    /// The data message being read, and its kind.
    message: Vec<u8>,
    kind: Option<Data>,
    grant: Option<Grant>,
    /// Waiting for a grant (boxed: needed only while the pool is empty).
    acquiring: Option<Acquiring>,
    /// How long a grant may be held while the pool has none free, and the timer of
    /// that for a message partly read (boxed: needed only while one is).
    hold: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A close frame was read.
    closed: bool,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    /// A reader that already holds `grant` (the panel's start: its hello and first
    /// replies are paid by it) or none. A message partly read under a grant held for
    /// `hold` while the pool has none free is [`ReadError::TooSlow`].
    pub fn new(io: R, pool: InputPool, grant: Option<Grant>, hold: Duration) -> Self {
        Inbound {
            io,
            pool,
            head: [0; MAX_HEAD],
            head_have: 0,
            frame: None,
            control: [0; MAX_CONTROL],
            message: Vec::new(),
            kind: None,
            grant,
            acquiring: None,
            hold,
            timer: None,
            closed: false,
        }
    }

    /// The socket's read half.
    pub fn into_inner(self) -> R {
        self.io
    }

    /// Since when the grant held now is held (`None`: none is).
    pub fn grant_since(&self) -> Option<Instant> {
        self.grant.as_ref().map(|g| g.since)
    }

    /// Count the grant held as held from now.
    pub fn renew_grant(&mut self) {
        if let Some(g) = &mut self.grant {
            g.since = Instant::now();
        }
    }

    /// Is a data message partly read?
    pub fn in_message(&self) -> bool {
        self.kind.is_some()
    }

    /// Give the grant back (the replies it paid for are written), unless a message is
    /// partly read: that one still needs it.
    pub fn release_grant(&mut self) {
        if !self.in_message() {
            self.grant = None;
            self.timer = None;
        }
    }

    /// The next message.
    pub async fn next(&mut self) -> Result<ClientMessage, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Read until a message is whole; while one is partly read, watch how long its
    /// grant is held.
    ///
    /// The hold is checked whatever the frames bring: a client that streams pings inside
    /// a fragmented message it never finishes is as slow as one that sends nothing.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<ClientMessage, ReadError>> {
        let r = self.poll_frames(cx);
        if !self.in_message() {
            return r;
        }
        match self.poll_held_too_long(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ReadError::TooSlow)),
            Poll::Pending => r,
        }
    }

    /// Ready once the grant has been held for `hold` while the pool has none free;
    /// with grants to spare, the hold starts again.
    fn poll_held_too_long(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(mut since) = self.grant_since() else {
            return Poll::Pending;
        };
        loop {
            let due = since + self.hold;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            ready!(timer.as_mut().poll(cx));
            if self.pool.available() == 0 {
                return Poll::Ready(());
            }
            // Grants to spare: nobody waits for this one; watch it from now.
            self.renew_grant();
            since = Instant::now();
            if self.hold.is_zero() {
                return Poll::Pending;
            }
        }
    }

    fn poll_frames(&mut self, cx: &mut Context<'_>) -> Poll<Result<ClientMessage, ReadError>> {
        loop {
            if self.closed {
                return Poll::Ready(Err(ReadError::Eof));
            }
            let Some(mut f) = self.frame else {
                ready!(self.poll_header(cx))?;
                continue;
            };
            let data = matches!(f.opcode, OpCode::Data(_));
            if data && self.grant.is_none() {
                ready!(self.poll_grant(cx))?;
            }
            if data && self.message.len() < f.start + f.len {
                // Paid by the grant: exactly the payload of an unfragmented message; for
                // a fragmented one its most at once (no reallocation per fragment).
                let room = if f.fin && f.start == 0 {
                    f.len
                } else {
                    MAX_CLIENT_FRAME
                };
                self.message.reserve_exact(room - self.message.len());
                self.message.resize(f.start + f.len, 0);
            }
            while f.done < f.len {
                let (buf, offset) = if data {
                    (&mut self.message[f.start..f.start + f.len], f.done)
                } else {
                    (&mut self.control[..f.len], f.done)
                };
                let n = ready!(poll_read_some(&mut self.io, cx, &mut buf[offset..]))?;
                unmask(&mut buf[offset..offset + n], f.mask, offset);
                f.done += n;
                // Kept at once: the next read may be cancelled.
                self.frame = Some(f);
            }
            self.frame = None;
            if let Some(m) = self.frame_done(f)? {
                return Poll::Ready(Ok(m));
            }
        }
    }

    /// Read and check the next frame's header (for a data frame, also against the
    /// message so far).
    fn poll_header(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ReadError>> {
        let need = loop {
            let have = usize::from(self.head_have);
            let need = if have < 2 {
                2
            } else {
                header_len(self.head[1])
            };
            if have == need {
                break need;
            }
            let n = ready!(poll_read_some(&mut self.io, cx, &mut self.head[have..need]))?;
            self.head_have += n as u8;
        };
        self.head_have = 0;
        let parsed = FrameHeader::parse(&mut Cursor::new(&self.head[..need]))
            .map_err(|_| ReadError::Protocol("reserved opcode"))?;
        let (h, len) = parsed.expect("the header's length was read first");
        // §5.2: a 64-bit length's most significant bit MUST be 0, and "the minimal
        // number of bytes MUST be used to encode the length".
        let code = self.head[1] & 0x7F;
        if code == 127 && self.head[2] & 0x80 != 0 {
            return Err(ReadError::Protocol("64-bit length with its top bit set")).into();
        }
        if (code == 126 && len < 126) || (code == 127 && len <= 0xFFFF) {
            return Err(ReadError::Protocol("length not in its shortest form")).into();
        }
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(ReadError::Protocol("reserved bits set")).into();
        }
        let Some(mask) = h.mask else {
            return Err(ReadError::Protocol("unmasked client frame")).into();
        };
        let mut start = 0;
        match h.opcode {
            OpCode::Control(_) => {
                if !h.is_final {
                    return Err(ReadError::Protocol("fragmented control frame")).into();
                }
                if len > MAX_CONTROL as u64 {
                    return Err(ReadError::Protocol("control frame over 125 bytes")).into();
                }
            }
            OpCode::Data(d) => {
                match (d, self.kind) {
                    (Data::Continue, None) => {
                        return Err(ReadError::Protocol("continuation of nothing")).into();
                    }
                    (Data::Continue, Some(_)) => {}
                    (_, Some(_)) => {
                        return Err(ReadError::Protocol("new message inside a fragmented one"))
                            .into();
                    }
                    (_, None) => self.kind = Some(d),
                }
                start = self.message.len();
                let room = (MAX_CLIENT_FRAME - start) as u64;
                if len > room {
                    return Err(ReadError::TooBig).into();
                }
            }
        }
        self.frame = Some(Payload {
            opcode: h.opcode,
            fin: h.is_final,
            mask,
            len: len as usize,
            done: 0,
            start,
        });
        Poll::Ready(Ok(()))
    }

    fn poll_grant(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ReadError>> {
        let waiting = match &mut self.acquiring {
            Some(w) => w,
            None => match self.pool.semaphore.clone().try_acquire_owned() {
                Ok(p) => {
                    self.grant = Some(Grant::new(p));
                    return Poll::Ready(Ok(()));
                }
                Err(_) => self
                    .acquiring
                    .insert(Box::pin(self.pool.semaphore.clone().acquire_owned())),
            },
        };
        let permit = ready!(waiting.as_mut().poll(cx));
        self.acquiring = None;
        let permit = permit.expect("the pool's semaphore is never closed");
        self.grant = Some(Grant::new(permit));
        Poll::Ready(Ok(()))
    }

    /// A frame is read whole: the message it completes, if any.
    fn frame_done(&mut self, f: Payload) -> Result<Option<ClientMessage>, ReadError> {
        let payload = &self.control[..f.len.min(MAX_CONTROL)];
        Ok(Some(match f.opcode {
            OpCode::Control(Control::Ping) => ClientMessage::Ping(Bytes::copy_from_slice(payload)),
            OpCode::Control(Control::Pong) => ClientMessage::Pong,
            OpCode::Control(Control::Close) => {
                let code = match payload {
                    [] => None,
                    [_] => return Err(ReadError::Protocol("close frame of one byte")),
                    [a, b, reason @ ..] => {
                        let code = u16::from_be_bytes([*a, *b]);
                        if !CloseCode::from(code).is_allowed() {
                            return Err(ReadError::Protocol("close code not allowed"));
                        }
                        std::str::from_utf8(reason).map_err(|_| ReadError::Utf8)?;
                        Some(code)
                    }
                };
                self.closed = true;
                ClientMessage::Close(code)
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                unreachable!("FrameHeader::parse refuses reserved opcodes")
            }
            OpCode::Data(_) => {
                if !f.fin {
                    return Ok(None);
                }
                let kind = self.kind.take();
                let message = Bytes::from(std::mem::take(&mut self.message));
                if kind == Some(Data::Text) {
                    std::str::from_utf8(&message).map_err(|_| ReadError::Utf8)?;
                    ClientMessage::Text(message)
                } else {
                    ClientMessage::Binary(message)
                }
            }
        }))
    }
}

/// A client frame's header length from its second byte: 2, plus 2 or 8 bytes of
/// extended length, plus 4 of mask (§5.2).
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + extended + if second & 0x80 != 0 { 4 } else { 0 }
}

/// Unmask `buf`, whose first byte is byte `offset` of the payload (§5.3).
fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// Read at least one byte into `buf` (not empty); the end of the stream is
/// [`ReadError::Eof`].
fn poll_read_some<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<Result<usize, ReadError>> {
    debug_assert!(!buf.is_empty());
    let mut rb = ReadBuf::new(buf);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    match rb.filled().len() {
        0 => Poll::Ready(Err(ReadError::Eof)),
        n => Poll::Ready(Ok(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A tungstenite client's frames (masked, as clients send them) arrive as messages;
    /// fragments are joined, pings and pongs come through, a close ends the reading.
    #[tokio::test]
    async fn a_tungstenite_clients_messages_are_read() {
        let (server, client) = tokio::io::duplex(64);
        let pool = InputPool::new(1);
        let mut rx = Inbound::new(server, pool.clone(), None, Duration::from_secs(10));
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let big = "x".repeat(MAX_CLIENT_FRAME);
        let sent = [
            Message::text("{\"op\":\"ping\"}"),
            Message::binary(vec![1, 2, 3]),
            Message::Ping(Bytes::from_static(b"p")),
            Message::Pong(Bytes::new()),
            Message::text(big.clone()),
            Message::text(""),
        ];
        let send = async {
            for m in sent.clone() {
                client.send(m).await.unwrap();
            }
            client.close(None).await.unwrap();
            client
        };
        let read = async {
            let mut got = Vec::new();
            loop {
                let m = rx.next().await.unwrap();
                // A message read holds the grant until it is given back.
                if matches!(m, ClientMessage::Text(_) | ClientMessage::Binary(_)) {
                    assert_eq!(pool.available(), 0);
                    rx.release_grant();
                    assert_eq!(pool.available(), 1);
                }
                let end = matches!(m, ClientMessage::Close(_));
                got.push(m);
                if end {
                    break got;
                }
            }
        };
        let (_client, got) = tokio::join!(send, read);
        let want = [
            ClientMessage::Text(Bytes::from_static(b"{\"op\":\"ping\"}")),
            ClientMessage::Binary(Bytes::from_static(&[1, 2, 3])),
            ClientMessage::Ping(Bytes::from_static(b"p")),
            ClientMessage::Pong,
            ClientMessage::Text(Bytes::from(big)),
            ClientMessage::Text(Bytes::new()),
            ClientMessage::Close(None),
        ];
        // Compared one by one: a failure names the message, not 4 KiB of it.
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "message {i} differs");
        }
        assert!(matches!(rx.next().await, Err(ReadError::Eof)));
    }

    /// A masked client frame, for the cases a client library would not send.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut len = Vec::with_capacity(9);
        match payload.len() {
            n @ 0..=125 => len.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                len.push(0x80 | 126);
                len.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                len.push(0x80 | 127);
                len.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        masked(first, &len, payload)
    }

    /// A frame with its header's length bytes as given (`len`: the second byte and any
    /// extended length), masked `payload` after them.
    fn masked(first: u8, len: &[u8], payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        out.extend_from_slice(len);
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_bytes(bytes: Vec<u8>, chunk: usize) -> Result<ClientMessage, ReadError> {
        let (mut w, r) = tokio::io::duplex(16);
        let mut rx = Inbound::new(r, InputPool::new(1), None, Duration::from_secs(10));
        let write = async move {
            for c in bytes.chunks(chunk) {
                if w.write_all(c).await.is_err() {
                    break;
                }
            }
        };
        // The reader is dropped once it has its answer, so a writer it stopped reading
        // from gets an error instead of waiting.
        let (_, got) = tokio::join!(write, async move {
            loop {
                match rx.next().await {
                    Ok(ClientMessage::Pong) => continue,
                    other => break other,
                }
            }
        });
        got
    }

    #[tokio::test]
    async fn the_framing_rules_are_enforced_whatever_the_read_sizes() {
        let over = vec![b'a'; MAX_CLIENT_FRAME + 1];
        let cases: Vec<(&str, Vec<u8>, Result<ClientMessage, &str>)> = vec![
            (
                "fragments with a pong between",
                [
                    frame(0x01, b"{\"op\""),
                    frame(0x8a, b""),
                    frame(0x80, b":\"ping\"}"),
                ]
                .concat(),
                Ok(ClientMessage::Text(Bytes::from_static(
                    b"{\"op\":\"ping\"}",
                ))),
            ),
            ("unmasked", vec![0x81, 1, b'x'], Err("protocol")),
            ("rsv1", frame(0xc1, b"x"), Err("protocol")),
            ("reserved opcode", frame(0x83, b"x"), Err("protocol")),
            ("fragmented ping", frame(0x09, b"x"), Err("protocol")),
            ("long ping", frame(0x89, &[0; 126]), Err("protocol")),
            ("lone continuation", frame(0x80, b"x"), Err("protocol")),
            (
                "text inside text",
                [frame(0x01, b"{"), frame(0x81, b"}")].concat(),
                Err("protocol"),
            ),
            ("over 4 KiB", frame(0x81, &over), Err("size")),
            (
                "over 4 KiB in fragments",
                [frame(0x01, &over[..3000]), frame(0x80, &over[3000..])].concat(),
                Err("size"),
            ),
            ("bad UTF-8", frame(0x81, b"\xc0\xaf"), Err("utf8")),
            (
                "UTF-8 cut across fragments",
                [frame(0x01, b"\xe2\x82"), frame(0x80, b"\x28")].concat(),
                Err("utf8"),
            ),
            (
                "binary garbage is a message",
                frame(0x82, b"\xff\xfe"),
                Ok(ClientMessage::Binary(Bytes::from_static(b"\xff\xfe"))),
            ),
            ("close of one byte", frame(0x88, b"\x03"), Err("protocol")),
            ("close code 1005", frame(0x88, b"\x03\xed"), Err("protocol")),
            (
                "close reason not UTF-8",
                frame(0x88, b"\x03\xe8\xff"),
                Err("utf8"),
            ),
            (
                "close 1001 with a reason",
                frame(0x88, b"\x03\xe9bye"),
                Ok(ClientMessage::Close(Some(1001))),
            ),
            (
                "16-bit length of 5",
                masked(0x81, &[0x80 | 126, 0, 5], b"hello"),
                Err("protocol"),
            ),
            (
                "16-bit length of 125",
                masked(0x81, &[0x80 | 126, 0, 125], &[b'a'; 125]),
                Err("protocol"),
            ),
            (
                "64-bit length of 5",
                masked(
                    0x81,
                    &[&[0x80 | 127][..], &5u64.to_be_bytes()].concat(),
                    b"hello",
                ),
                Err("protocol"),
            ),
            (
                "64-bit length of 65,535",
                masked(
                    0x81,
                    &[&[0x80 | 127][..], &0xffffu64.to_be_bytes()].concat(),
                    b"",
                ),
                Err("protocol"),
            ),
            (
                "16-bit length of 126, the least it may carry",
                frame(0x81, &[b'a'; 126]),
                Ok(ClientMessage::Text(Bytes::from(vec![b'a'; 126]))),
            ),
            (
                "64-bit length of 65,536, the least it may carry",
                frame(0x81, &vec![b'a'; 65_536]),
                Err("size"),
            ),
            ("cut mid-header", vec![0x81, 0x80 | 126, 0], Err("eof")),
            (
                "cut mid-payload",
                frame(0x81, b"abcdef")[..9].to_vec(),
                Err("eof"),
            ),
        ];
        for (what, bytes, want) in cases {
            for chunk in [1, 3, 4096] {
                let got = read_bytes(bytes.clone(), chunk).await;
                let got = match got {
                    Ok(m) => Ok(m),
                    Err(ReadError::Protocol(_)) => Err("protocol"),
                    Err(ReadError::TooBig) => Err("size"),
                    Err(ReadError::Utf8) => Err("utf8"),
                    Err(ReadError::Eof) => Err("eof"),
                    Err(ReadError::TooSlow) => Err("slow"),
                    Err(ReadError::Io(e)) => panic!("{what}: {e}"),
                };
                assert_eq!(got, want, "{what}, read {chunk} bytes at a time");
            }
        }
    }

    /// A message larger than 4 KiB is refused from its header, before its payload.
    #[tokio::test]
    async fn an_oversized_frame_is_refused_from_its_header() {
        let mut head = vec![0x82, 0x80 | 127];
        head.extend_from_slice(&(10u64 << 20).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        let got = read_bytes(head, 4096).await;
        assert!(matches!(got, Err(ReadError::TooBig)), "{got:?}");
        // A length with its most significant bit set is not a length at all (§5.2).
        let mut head = vec![0x82, 0x80 | 127];
        head.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        let got = read_bytes(head, 4096).await;
        assert!(matches!(got, Err(ReadError::Protocol(_))), "{got:?}");
    }

    /// With the pool empty, a data message waits (its payload unread) until a grant is
    /// given back; control frames before it are read meanwhile.
    #[tokio::test]
    async fn a_message_waits_for_a_grant_and_control_frames_do_not() {
        let pool = InputPool::new(1);
        let held = pool.acquire().await;
        let (mut w, r) = tokio::io::duplex(1024);
        let mut rx = Inbound::new(r, pool.clone(), None, Duration::from_secs(10));
        w.write_all(&[frame(0x89, b"hi"), frame(0x81, b"{\"op\":\"ping\"}")].concat())
            .await
            .unwrap();
        assert_eq!(
            rx.next().await.unwrap(),
            ClientMessage::Ping(Bytes::from_static(b"hi"))
        );
        let waited = tokio::time::timeout(Duration::from_millis(100), rx.next()).await;
        assert!(waited.is_err(), "read without a grant: {waited:?}");
        assert!(rx.grant_since().is_none());
        drop(held);
        let m = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("the message is read once a grant is free")
            .unwrap();
        assert_eq!(
            m,
            ClientMessage::Text(Bytes::from_static(b"{\"op\":\"ping\"}"))
        );
        assert!(rx.grant_since().is_some());
        assert_eq!(pool.available(), 0);
        rx.release_grant();
        assert_eq!(pool.available(), 1);
    }

    /// A message partly read holds its grant; past `hold`, with no grant free it is
    /// [`ReadError::TooSlow`], with grants to spare it may take its time.
    #[tokio::test]
    async fn a_half_sent_message_is_too_slow_only_when_the_pool_is_empty() {
        let hold = Duration::from_millis(200);
        let op = frame(0x81, b"{\"op\":\"ping\"}");
        for (grants, want_slow) in [(1, true), (2, false)] {
            let pool = InputPool::new(grants);
            let (mut w, r) = tokio::io::duplex(1024);
            let mut rx = Inbound::new(r, pool.clone(), None, hold);
            w.write_all(&op[..8]).await.unwrap();
            let first = tokio::time::timeout(hold * 3, rx.next()).await;
            if want_slow {
                assert!(matches!(first, Ok(Err(ReadError::TooSlow))), "{first:?}");
                continue;
            }
            assert!(first.is_err(), "{grants} grants: {first:?}");
            assert_eq!(pool.available(), grants - 1);
            w.write_all(&op[8..]).await.unwrap();
            let m = rx.next().await.unwrap();
            assert_eq!(
                m,
                ClientMessage::Text(Bytes::from_static(b"{\"op\":\"ping\"}"))
            );
        }
    }

    /// Pings streamed inside a fragmented message that is never finished do not keep
    /// its grant: every message the reader returns is checked against the hold.
    #[tokio::test]
    async fn pings_inside_an_unfinished_message_do_not_keep_its_grant() {
        let hold = Duration::from_millis(200);
        let pool = InputPool::new(1);
        let (mut w, r) = tokio::io::duplex(4096);
        let mut rx = Inbound::new(r, pool.clone(), None, hold);
        w.write_all(&frame(0x01, b"{\"op\"")).await.unwrap();
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < hold * 20, "the grant was kept");
            w.write_all(&frame(0x89, b"x")).await.unwrap();
            match rx.next().await {
                Ok(ClientMessage::Ping(_)) => {}
                Err(ReadError::TooSlow) => break,
                other => panic!("{other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(t0.elapsed() >= hold);
    }
}
