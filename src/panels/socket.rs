//! A panel's WebSocket connection (RFC 6455, server role), split into the two halves
//! its one task drives:
//!
//! - [`Outbound`] writes server frames without copying them: each frame is a header
//!   formatted by tungstenite's [`FrameHeader`] (2–10 bytes, never masked, §5.2) and its
//!   payload by reference — the journal's shared bytes — and many frames go out in one
//!   vectored write (`writev`). Nothing of an event is copied into a per-panel buffer.
//! - [`Reader`] is tungstenite reading client frames (masking, UTF-8, fragmentation and
//!   size checks, §5–§8) from the socket's read half, wrapped in [`Inbound`]. What
//!   tungstenite writes on its own — the pong to a client's ping (§5.5.3), the reply to a
//!   client's close (§5.5.1) — is kept in [`Inbound`] until the session hands it to
//!   [`Outbound`] with [`Outbound::push_raw`], which sends it between whole frames.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::held::{HeldPool, Mark};

/// Longest server frame header (2 bytes, plus 8 for a 64-bit payload length; a server
/// never masks) plus one byte of payload prefix.
const HEAD: usize = 11;
/// Most slices in one vectored write: up to 3 per frame (header, body, tail). Linux
/// allows 1024 (`IOV_MAX`); 96 covers a flush of 32 events, 48 without a tail (a
/// larger flush takes one more write).
const MAX_SLICES: usize = 96;

/// What a client's frames are read with: tungstenite over [`Inbound`].
pub(crate) type Reader<S> = WebSocketStream<Inbound<ReadHalf<S>>>;

/// Split an upgraded connection (the HTTP 101 already sent) into its reader and its
/// writer. `config` bounds what is read (`max_message_size`, `max_frame_size`,
/// `read_buffer_size`); its write settings do not matter, tungstenite writes only its
/// replies.
pub(crate) async fn split<S>(io: S, config: WebSocketConfig) -> (Reader<S>, Outbound<WriteHalf<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(io);
    let inbound = Inbound {
        io: r,
        replies: Vec::new(),
    };
    let reader = WebSocketStream::from_raw_socket(inbound, Role::Server, Some(config)).await;
    (reader, Outbound::new(w))
}

/// tungstenite's replies to what it has read (a pong, a close reply): whole frames, in
/// order, for [`Outbound::push_raw`]. tungstenite keeps a reply until its next write or
/// flush; this flushes it into [`Inbound`] (which never waits) and takes it.
pub(crate) async fn replies<S>(reader: &mut Reader<S>) -> Option<Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // An error here is about the connection's state (e.g. closed), which the next read
    // reports; what was written before it is kept.
    let _ = futures_util::SinkExt::flush(reader).await;
    reader.get_mut().take_replies()
}

/// The read half as tungstenite sees it: reads come from the socket, writes are kept for
/// [`Outbound`]. What is kept is bounded by the caller taking it ([`replies`]) after every
/// message read: tungstenite makes at most one reply per message (a pong of ≤ 127 bytes,
/// or a close reply), and its own write buffer is capped by the config's
/// `max_write_buffer_size`.
pub(crate) struct Inbound<R> {
    io: R,
    replies: Vec<u8>,
}

impl<R> Inbound<R> {
    /// tungstenite's replies written since the last call: whole frames, in order.
    fn take_replies(&mut self) -> Option<Bytes> {
        if self.replies.is_empty() {
            return None;
        }
        Some(Bytes::from(std::mem::take(&mut self.replies)))
    }

    /// The socket's read half.
    pub fn into_inner(self) -> R {
        self.io
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Inbound<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for Inbound<R> {
    /// Always takes everything, so what is kept is whole frames and a flush never waits:
    /// tungstenite writes its output buffer, which holds whole frames. (Refusing would
    /// be a `Pending` that nothing wakes: this writer has no socket to wait for.)
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.replies.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One queued frame: `head` (the header, then at most one byte of payload), `body` by
/// reference, then the static `tail`.
struct OutFrame {
    head: [u8; HEAD],
    head_len: u8,
    body: Bytes,
    tail: &'static [u8],
    /// The memory mark of the stored frame `body` shares ([`crate::held`]); `None`: not a
    /// journal event's.
    mark: Option<Arc<Mark>>,
}

impl OutFrame {
    fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len() + self.tail.len()
    }

    fn parts(&self) -> [&[u8]; 3] {
        [
            &self.head[..usize::from(self.head_len)],
            &self.body,
            self.tail,
        ]
    }
}

// The budget counts each queued frame as `PANEL_QUEUE_ENTRY` bytes.
const _: () = assert!(std::mem::size_of::<OutFrame>() <= crate::budget::PANEL_QUEUE_ENTRY);

/// The write half: a queue of frames sent by reference with vectored writes.
///
/// The queue has no limit of its own: the session decides how many frames and bytes it
/// queues before it flushes ([`crate::budget::PANEL_WRITE_FRAMES`],
/// [`crate::budget::PANEL_WRITE_BUFFER`]). A flush may be cancelled and resumed: what
/// was written is recorded here, not in the future.
pub(crate) struct Outbound<W> {
    io: W,
    queue: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Wire bytes queued (including what of the front frame was written).
    bytes: usize,
}

/// The frames the session sends (RFC 6455 §5.2 opcodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Binary,
    Ping,
}

impl<W: AsyncWrite + Unpin> Outbound<W> {
    pub fn new(io: W) -> Self {
        Outbound {
            io,
            queue: VecDeque::new(),
            written: 0,
            bytes: 0,
        }
    }

    /// Frames queued.
    pub fn frames(&self) -> usize {
        self.queue.len()
    }

    /// Wire bytes queued (headers included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queue one unfragmented message whose payload is `prefix` (at most one byte),
    /// `body` and `tail`, in that order. A text payload must be UTF-8 as a whole (the
    /// caller's duty: the journal's JSON is). Returns the frame's wire bytes.
    pub fn push(&mut self, kind: Kind, prefix: &[u8], body: Bytes, tail: &'static [u8]) -> usize {
        self.push_frame_kind(None, kind, prefix, body, tail)
    }

    /// [`Outbound::push`] for a frame whose `body` is a stored frame of the journal
    /// (tied to `mark`), so that [`Outbound::pay_evicted`] can pay for it once the
    /// journal evicts it.
    pub fn push_event(
        &mut self,
        mark: &Arc<Mark>,
        kind: Kind,
        prefix: &[u8],
        body: Bytes,
        tail: &'static [u8],
    ) -> usize {
        self.push_frame_kind(Some(mark.clone()), kind, prefix, body, tail)
    }

    fn push_frame_kind(
        &mut self,
        mark: Option<Arc<Mark>>,
        kind: Kind,
        prefix: &[u8],
        body: Bytes,
        tail: &'static [u8],
    ) -> usize {
        let opcode = match kind {
            Kind::Text => OpCode::Data(Data::Text),
            Kind::Binary => OpCode::Data(Data::Binary),
            Kind::Ping => OpCode::Control(Control::Ping),
        };
        self.push_frame(opcode, mark, prefix, body, tail)
    }

    /// Pay from `pool` for every queued (or partly written) frame whose event the journal
    /// has evicted and that nobody has paid for yet ([`Mark::pay`]). `Err` with the
    /// bytes of evicted frames queued when the pool has no room.
    pub fn pay_evicted(&self, pool: &Arc<HeldPool>) -> Result<(), usize> {
        let mut evicted = (self.queue.iter())
            .filter_map(|f| f.mark.as_ref())
            .filter(|m| m.is_evicted());
        if evicted.all(|m| m.pay(pool)) {
            return Ok(());
        }
        Err((self.queue.iter())
            .filter_map(|f| f.mark.as_ref())
            .filter(|m| m.is_evicted())
            .map(|m| m.cost())
            .sum())
    }

    /// Queue a close frame (§5.5.1): the status code, then the reason (≤ 123 bytes).
    pub fn push_close(&mut self, code: CloseCode, reason: &'static str) -> usize {
        debug_assert!(reason.len() <= 123);
        let code = u16::from(code).to_be_bytes();
        self.push_frame(
            OpCode::Control(Control::Close),
            None,
            &code,
            Bytes::new(),
            reason.as_bytes(),
        )
    }

    fn push_frame(
        &mut self,
        opcode: OpCode,
        mark: Option<Arc<Mark>>,
        prefix: &[u8],
        body: Bytes,
        tail: &'static [u8],
    ) -> usize {
        let payload = prefix.len() + body.len() + tail.len();
        // The header is 10 bytes only for payloads of 64 KiB and more (§5.2): the prefix
        // fits beside it, 1 byte, or 2 for a close frame's status code.
        debug_assert!(prefix.len() <= 1 || (prefix.len() == 2 && payload <= 125));
        // §5.5: a control frame's payload is at most 125 bytes.
        debug_assert!(matches!(opcode, OpCode::Data(_)) || payload <= 125);
        let mut head = [0u8; HEAD];
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let mut w: &mut [u8] = &mut head;
        header
            .format(payload as u64, &mut w)
            .expect("a server frame header fits in 10 bytes");
        w[..prefix.len()].copy_from_slice(prefix);
        let head_len = HEAD - w.len() + prefix.len();
        let frame = OutFrame {
            head,
            head_len: head_len as u8,
            body,
            tail,
            mark,
        };
        let len = frame.len();
        self.bytes += len;
        self.queue.push_back(frame);
        len
    }

    /// Queue bytes that are already whole frames (tungstenite's replies).
    pub fn push_raw(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.bytes += bytes.len();
        self.queue.push_back(OutFrame {
            head: [0; HEAD],
            head_len: 0,
            body: bytes,
            tail: b"",
            mark: None,
        });
    }

    /// Write everything queued, many frames per vectored write, then flush the socket.
    /// Cancel-safe: a later call goes on where this one stopped. Errors: the socket's;
    /// a write of 0 bytes is [`io::ErrorKind::WriteZero`].
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut n = 0;
            let mut skip = self.written;
            'frames: for f in &self.queue {
                for part in f.parts() {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                    if n == MAX_SLICES {
                        break 'frames;
                    }
                }
            }
            let wrote = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(wrote);
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Shut the socket's write side down (TCP FIN, or TLS close_notify first).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.io).await
    }

    fn advance(&mut self, wrote: usize) {
        let mut n = self.written + wrote;
        self.written = 0;
        while let Some(f) = self.queue.front() {
            let len = f.len();
            if n < len {
                self.written = n;
                break;
            }
            n -= len;
            self.bytes -= len;
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    /// A writer that takes at most `chunk` bytes per call and counts its calls.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        calls: usize,
        stall: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            // Every other call the socket is full: the flush stops there (as if its
            // future were dropped) and must go on from the same byte.
            if self.stall && self.calls % 2 == 1 {
                return Poll::Pending;
            }
            let mut left = self.chunk;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(self.chunk - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Byte-equal, or a short message: where they first differ.
    fn assert_same(got: &[u8], want: &[u8], what: &str) {
        if got != want {
            let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
            let (g, w) = (
                &got[at..got.len().min(at + 8)],
                &want[at..want.len().min(at + 8)],
            );
            panic!(
                "{what}: {} bytes, want {}; first difference at {at}: {g:?} vs {w:?}",
                got.len(),
                want.len()
            );
        }
    }

    /// What tungstenite itself writes for `frames` (the reference encoding).
    fn reference(frames: &[(OpCode, Vec<u8>)]) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let mut out = Vec::new();
        for (op, payload) in frames {
            let header = FrameHeader {
                opcode: *op,
                ..FrameHeader::default()
            };
            Frame::from_payload(header, Bytes::from(payload.clone()))
                .format(&mut out)
                .unwrap();
        }
        out
    }

    #[tokio::test]
    async fn frames_are_written_as_tungstenite_formats_them_whatever_the_write_sizes() {
        let big = Bytes::from(vec![b'x'; 70_000]); // a 64-bit length
        let mid = Bytes::from(vec![b'y'; 300]); // a 16-bit length
        let expected = reference(&[
            (
                OpCode::Data(Data::Text),
                b"{\"a\":1,\"last\":true}".to_vec(),
            ),
            (OpCode::Data(Data::Binary), [&[6u8][..], &mid[..]].concat()),
            (OpCode::Data(Data::Binary), big.to_vec()),
            (OpCode::Control(Control::Ping), Vec::new()),
            (
                OpCode::Control(Control::Close),
                [&[0x03, 0xe9][..], b"bye"].concat(),
            ),
        ]);
        for chunk in [1, 7, 13, 4096, 1 << 20] {
            let mut out = Outbound::new(Trickle {
                out: Vec::new(),
                chunk,
                calls: 0,
                stall: false,
            });
            let mut total = 0;
            total += out.push(
                Kind::Text,
                b"",
                Bytes::from_static(b"{\"a\":1"),
                b",\"last\":true}",
            );
            total += out.push(Kind::Binary, &[6], mid.clone(), b"");
            total += out.push(Kind::Binary, b"", big.clone(), b"");
            total += out.push(Kind::Ping, b"", Bytes::new(), b"");
            total += out.push_close(CloseCode::Away, "bye");
            assert_eq!(out.bytes(), total);
            assert_eq!(out.frames(), 5);
            out.flush().await.unwrap();
            assert!(out.is_empty());
            assert_eq!(out.bytes(), 0);
            assert_same(&out.io.out, &expected, &format!("chunk {chunk}"));
        }
    }

    #[tokio::test]
    async fn many_frames_go_out_in_one_write() {
        let mut out = Outbound::new(Trickle {
            out: Vec::new(),
            chunk: 1 << 20,
            calls: 0,
            stall: false,
        });
        let body = Bytes::from_static(b"{\"seq\":1}");
        for _ in 0..32 {
            out.push(Kind::Text, b"", body.clone(), b"");
        }
        out.flush().await.unwrap();
        // 2 slices per frame, 96 per write: 64 slices, one write.
        assert_eq!(out.io.calls, 1);
    }

    #[test]
    fn a_flush_that_stops_midway_goes_on_from_the_same_byte() {
        let frames: Vec<Bytes> = (0..40u8)
            .map(|i| Bytes::from(vec![b'a' + i % 26; 50 + usize::from(i) * 37]))
            .collect();
        let expected = reference(
            &frames
                .iter()
                .map(|f| (OpCode::Data(Data::Binary), f.to_vec()))
                .collect::<Vec<_>>(),
        );
        let mut out = Outbound::new(Trickle {
            out: Vec::new(),
            chunk: 333,
            calls: 0,
            stall: true,
        });
        for f in &frames {
            out.push(Kind::Binary, b"", f.clone(), b"");
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut stops = 0;
        while out.poll_flush(&mut cx).is_pending() {
            stops += 1;
            assert!(stops < 10_000, "the flush makes no progress");
        }
        assert!(stops > 10);
        assert!(out.is_empty());
        assert_same(&out.io.out, &expected, "stalled");
    }

    /// A real tungstenite client on the other end: server frames arrive as messages,
    /// its ping is answered and its close replied to through [`Outbound`].
    #[tokio::test]
    async fn a_tungstenite_client_reads_what_is_sent_and_gets_its_replies() {
        let (server, client) = tokio::io::duplex(64);
        let (mut reader, mut out) = split(server, WebSocketConfig::default()).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;

        out.push(Kind::Text, b"", Bytes::from_static(b"hello"), b" world");
        out.push(Kind::Binary, &[6], Bytes::from_static(b"\x01\x02"), b"");
        let (flushed, first) = tokio::join!(out.flush(), client.next());
        flushed.unwrap();
        assert_eq!(first.unwrap().unwrap(), Message::text("hello world"));
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(vec![6, 1, 2])
        );

        client
            .send(Message::Ping(Bytes::from_static(b"p1")))
            .await
            .unwrap();
        let got = reader.next().await.unwrap().unwrap();
        assert_eq!(got, Message::Ping(Bytes::from_static(b"p1")));
        let reply = replies(&mut reader).await.expect("a pong is queued");
        out.push_raw(reply);
        out.flush().await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p1"))
        );

        client.send(Message::Close(None)).await.unwrap();
        assert!(matches!(
            reader.next().await,
            Some(Ok(Message::Close(None)))
        ));
        out.push_raw(replies(&mut reader).await.expect("a close reply"));
        out.flush().await.unwrap();
        assert!(matches!(
            client.next().await,
            Some(Ok(Message::Close(None)))
        ));
    }
}
