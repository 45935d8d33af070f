//! A panel's WebSocket connection (RFC 6455, server role), split into the two halves
//! its one task drives:
//!
//! - [`Outbound`] writes server frames without copying them: each frame is a header
//!   formatted by tungstenite's [`FrameHeader`] (2–10 bytes, never masked, §5.2) and its
//!   payload by reference — the journal's shared bytes — and many frames go out in one
//!   vectored write (`writev`). Nothing of an event is copied into a per-panel buffer.
//! - [`Inbound`] reads client frames into fixed bytes of its own and, for an op, a
//!   buffer paid by a grant from the panels' shared [`InputPool`]
//!   ([`super::inbound`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

pub(crate) use super::inbound::{Grant, Inbound, InputPool};
use crate::budget::{PANEL_QUEUE_MAX, PANEL_QUEUE_OWN};
use crate::held::{HeldPool, Mark};

/// Longest server frame header (2 bytes, plus 8 for a 64-bit payload length; a server
/// never masks) plus the payload's prefix (1 byte, or a close frame's 2-byte code).
const HEAD: usize = 12;
/// What a control frame's payload costs besides its bytes: it is an allocation of its
/// own (the allocator's smallest chunk is 32 B; larger ones round up by 16).
const CONTROL_ALLOC: usize = 32;
/// Most slices in one vectored write: up to 3 per frame (header, body, tail). Linux
/// allows 1024 (`IOV_MAX`); 96 covers a flush of 32 events, 48 without a tail (a
/// larger flush takes one more write).
const MAX_SLICES: usize = 96;
/// Most frames in one vectored write: their headers are formatted on the stack for it.
const MAX_FRAMES: usize = MAX_SLICES / 2;

/// Split an upgraded connection (the HTTP 101 already sent) into its reader, holding
/// `grant` for the panel's first frames (or none; `hold`: [`Inbound::new`]), and its
/// writer.
pub(crate) fn split<S>(
    io: S,
    pool: InputPool,
    grant: Option<Grant>,
    hold: std::time::Duration,
) -> (Inbound<ReadHalf<S>>, Outbound<WriteHalf<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(io);
    (Inbound::new(r, pool, grant, hold), Outbound::new(w))
}

/// The static bytes a frame's payload ends with, after its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    None,
    /// The end of an event's JSON as a last value ([`crate::event::LAST_TAIL`]).
    Last,
}

impl Tail {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Tail::None => b"",
            Tail::Last => crate::event::LAST_TAIL.as_bytes(),
        }
    }
}

/// One queued frame: its opcode and payload — `prefix` (a tag or a close code), `body`
/// by reference, then the static `tail`. The header is not stored: it follows from
/// them and is formatted when the frame is written ([`OutFrame::head`]).
struct OutFrame {
    body: Bytes,
    /// The memory mark of the stored frame `body` shares ([`crate::held`]); `None`: not a
    /// journal event's (a control frame).
    mark: Option<Arc<Mark>>,
    opcode: OpCode,
    prefix: [u8; 2],
    prefix_len: u8,
    tail: Tail,
}

impl OutFrame {
    fn payload_len(&self) -> usize {
        usize::from(self.prefix_len) + self.body.len() + self.tail.bytes().len()
    }

    /// Wire bytes: the header (§5.2: 2 bytes, 4 from 126 bytes of payload, 10 from
    /// 64 KiB) and the payload.
    fn len(&self) -> usize {
        let payload = self.payload_len();
        let header = match payload {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        header + payload
    }

    /// Format the header and the prefix into `buf`; returns their length.
    fn head(&self, buf: &mut [u8; HEAD]) -> usize {
        let header = FrameHeader {
            opcode: self.opcode,
            ..FrameHeader::default()
        };
        let mut w: &mut [u8] = buf;
        header
            .format(self.payload_len() as u64, &mut w)
            .expect("a server frame header fits in 10 bytes");
        let prefix = &self.prefix[..usize::from(self.prefix_len)];
        w[..prefix.len()].copy_from_slice(prefix);
        HEAD - w.len() + prefix.len()
    }
}

// The budget counts each queued frame as `PANEL_QUEUE_ENTRY` bytes.
const _: () = assert!(std::mem::size_of::<OutFrame>() <= crate::budget::PANEL_QUEUE_ENTRY);

/// The write half: a queue of frames sent by reference with vectored writes.
///
/// The queue has no limit of its own: the session decides how many frames and bytes it
/// queues before it flushes ([`crate::budget::PANEL_WRITE_FRAMES`],
/// [`crate::budget::PANEL_WRITE_BUFFER`]) and how many control frames
/// ([`Outbound::control_bytes`]). Its room grows to [`PANEL_QUEUE_OWN`] entries, then at
/// once to [`PANEL_QUEUE_MAX`] (an op's replies, paid by a grant), and
/// [`Outbound::shrink`] gives the second part back. A flush may be cancelled and
/// resumed: what was written is recorded here, not in the future.
pub(crate) struct Outbound<W> {
    io: W,
    queue: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Wire bytes queued (including what of the front frame was written).
    bytes: usize,
    /// Bytes of the control frames queued (those without a mark), each with
    /// [`CONTROL_ALLOC`].
    control: usize,
}

/// The frames the session sends (RFC 6455 §5.2 opcodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Binary,
    Ping,
    Pong,
}

impl<W: AsyncWrite + Unpin> Outbound<W> {
    pub fn new(io: W) -> Self {
        Outbound {
            io,
            queue: VecDeque::new(),
            written: 0,
            bytes: 0,
            control: 0,
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

    /// Bytes of control frames queued: what the session made itself (hello, error, pong,
    /// gap, ping, close), not the journal's events; each frame's wire bytes and
    /// [`CONTROL_ALLOC`] for its allocation.
    pub fn control_bytes(&self) -> usize {
        self.control
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Give back the queue's room past [`PANEL_QUEUE_OWN`] entries when it is not used.
    pub fn shrink(&mut self) {
        if self.queue.capacity() > PANEL_QUEUE_OWN && self.queue.len() <= PANEL_QUEUE_OWN {
            self.queue.shrink_to(PANEL_QUEUE_OWN);
        }
    }

    /// Queue one unfragmented message whose payload is `prefix` (at most one byte),
    /// `body` and `tail`, in that order. A text payload must be UTF-8 as a whole (the
    /// caller's duty: the journal's JSON is). Returns the frame's wire bytes.
    pub fn push(&mut self, kind: Kind, prefix: &[u8], body: Bytes, tail: Tail) -> usize {
        self.push_frame(opcode(kind), None, prefix, body, tail)
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
        tail: Tail,
    ) -> usize {
        self.push_frame(opcode(kind), Some(mark.clone()), prefix, body, tail)
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

    /// Queue a close frame (§5.5.1): the status code (none: an empty close), then the
    /// reason (≤ 123 bytes).
    pub fn push_close(&mut self, code: Option<CloseCode>, reason: &'static str) -> usize {
        debug_assert!(reason.len() <= 123);
        let code = code.map(|c| u16::from(c).to_be_bytes());
        self.push_frame(
            OpCode::Control(Control::Close),
            None,
            code.as_ref().map_or(&[][..], |c| &c[..]),
            Bytes::from_static(reason.as_bytes()),
            Tail::None,
        )
    }

    fn push_frame(
        &mut self,
        opcode: OpCode,
        mark: Option<Arc<Mark>>,
        prefix: &[u8],
        body: Bytes,
        tail: Tail,
    ) -> usize {
        let payload = prefix.len() + body.len() + tail.bytes().len();
        // A prefix is a tag (1 byte) or a close frame's status code (2 bytes, §5.5.1).
        debug_assert!(prefix.len() <= 1 || (prefix.len() == 2 && payload <= 125));
        // §5.5: a control frame's payload is at most 125 bytes.
        debug_assert!(matches!(opcode, OpCode::Data(_)) || payload <= 125);
        let mut p = [0u8; 2];
        p[..prefix.len()].copy_from_slice(prefix);
        let frame = OutFrame {
            body,
            mark,
            opcode,
            prefix: p,
            prefix_len: prefix.len() as u8,
            tail,
        };
        debug_assert_eq!(
            frame.len(),
            frame.head(&mut [0; HEAD]) + frame.body.len() + frame.tail.bytes().len()
        );
        let len = frame.len();
        self.bytes += len;
        if frame.mark.is_none() {
            self.control += len + CONTROL_ALLOC;
        }
        self.grow();
        self.queue.push_back(frame);
        len
    }

    /// Room for one more entry: doubling up to [`PANEL_QUEUE_OWN`], then at once to
    /// [`PANEL_QUEUE_MAX`] (room the session's bounds never exceed).
    fn grow(&mut self) {
        let (len, cap) = (self.queue.len(), self.queue.capacity());
        if len < cap {
            return;
        }
        let want = if cap < PANEL_QUEUE_OWN {
            (cap * 2).clamp(8, PANEL_QUEUE_OWN)
        } else {
            PANEL_QUEUE_MAX.max(len + 1)
        };
        self.queue.reserve_exact(want - len);
    }

    /// Write everything queued, many frames per vectored write, then flush the socket.
    /// Cancel-safe: a later call goes on where this one stopped. Errors: the socket's;
    /// a write of 0 bytes is [`io::ErrorKind::WriteZero`].
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            // Each header is formatted as its frame joins the write, into its own
            // bytes here, which the write's slices then borrow.
            let mut heads = [[0u8; HEAD]; MAX_FRAMES];
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut n = 0;
            let mut skip = self.written;
            'frames: for (buf, f) in heads.iter_mut().zip(&self.queue) {
                let len = f.head(buf);
                let head: &[u8] = &buf[..len];
                for part in [head, &f.body[..], f.tail.bytes()] {
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
            if f.mark.is_none() {
                self.control -= len + CONTROL_ALLOC;
            }
            self.queue.pop_front();
        }
    }
}

fn opcode(kind: Kind) -> OpCode {
    match kind {
        Kind::Text => OpCode::Data(Data::Text),
        Kind::Binary => OpCode::Data(Data::Binary),
        Kind::Ping => OpCode::Control(Control::Ping),
        Kind::Pong => OpCode::Control(Control::Pong),
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

    /// A writer of [`Trickle`]: `chunk` bytes per call, a stall every other call if
    /// `stall`.
    fn trickle(chunk: usize, stall: bool) -> Outbound<Trickle> {
        Outbound::new(Trickle {
            out: Vec::new(),
            chunk,
            calls: 0,
            stall,
        })
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
            let mut out = trickle(chunk, false);
            let mut total = 0;
            total += out.push(Kind::Text, b"", Bytes::from_static(b"{\"a\":1"), Tail::Last);
            total += out.push(Kind::Binary, &[6], mid.clone(), Tail::None);
            total += out.push(Kind::Binary, b"", big.clone(), Tail::None);
            total += out.push(Kind::Ping, b"", Bytes::new(), Tail::None);
            total += out.push_close(Some(CloseCode::Away), "bye");
            assert_eq!(out.bytes(), total);
            assert_eq!(out.frames(), 5);
            out.flush().await.unwrap();
            assert!(out.is_empty());
            assert_eq!(out.bytes(), 0);
            assert_same(&out.io.out, &expected, &format!("chunk {chunk}"));
        }
    }

    /// The header is formatted when a frame is written: at each boundary of the
    /// length's encoding (§5.2), with the payload's prefix counted, and across writes
    /// of more frames than one write formats (`MAX_FRAMES`).
    #[tokio::test]
    async fn headers_at_every_length_boundary_and_past_one_writes_frames() {
        let mut frames: Vec<(usize, usize)> = Vec::new(); // (prefix, body)
        for payload in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 0x1_0001] {
            frames.push((0, payload));
            if payload > 0 {
                frames.push((1, payload - 1));
            }
        }
        frames.extend((0..2 * MAX_FRAMES + 3).map(|i| (i % 2, i)));
        let body = |n: usize| Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let expected = reference(
            &frames
                .iter()
                .map(|&(p, n)| {
                    (
                        OpCode::Data(Data::Binary),
                        [&[7u8][..p], &body(n)[..]].concat(),
                    )
                })
                .collect::<Vec<_>>(),
        );
        for chunk in [13, 4096, 1 << 20] {
            let mut out = trickle(chunk, false);
            let mut total = 0;
            for &(p, n) in &frames {
                total += out.push(Kind::Binary, &[7u8][..p], body(n), Tail::None);
            }
            assert_eq!(out.bytes(), total, "chunk {chunk}");
            assert_eq!(total, expected.len(), "chunk {chunk}");
            out.flush().await.unwrap();
            assert!(out.is_empty());
            assert_same(&out.io.out, &expected, &format!("chunk {chunk}"));
        }
    }

    /// A write that runs out of slices inside a frame (one 2-slice frame, then frames of
    /// 3: prefix in the header's slice, body, tail) goes on from that frame's body.
    #[tokio::test]
    async fn a_write_that_ends_inside_a_frame_goes_on_from_its_body() {
        let tail = crate::event::LAST_TAIL.as_bytes();
        let body = |i: usize| Bytes::from(format!("{{\"seq\":{i}"));
        let mut want = vec![(OpCode::Data(Data::Text), b"{\"first\":1}".to_vec())];
        want.extend((0..40).map(|i| {
            (
                OpCode::Data(Data::Binary),
                [&[9u8][..], &body(i), tail].concat(),
            )
        }));
        let mut out = trickle(1 << 20, false);
        out.push(
            Kind::Text,
            b"",
            Bytes::from_static(b"{\"first\":1}"),
            Tail::None,
        );
        for i in 0..40 {
            out.push(Kind::Binary, &[9], body(i), Tail::Last);
        }
        out.flush().await.unwrap();
        // 2 + 31 × 3 slices, and the 33rd frame's header: 96, one write; then the rest.
        assert_eq!(out.io.calls, 2);
        assert_same(&out.io.out, &reference(&want), "two writes");
    }

    #[tokio::test]
    async fn many_frames_go_out_in_one_write() {
        let mut out = trickle(1 << 20, false);
        let body = Bytes::from_static(b"{\"seq\":1}");
        for _ in 0..32 {
            out.push(Kind::Text, b"", body.clone(), Tail::None);
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
        let mut out = trickle(333, true);
        for f in &frames {
            out.push(Kind::Binary, b"", f.clone(), Tail::None);
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
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::protocol::Role;

        use crate::panels::inbound::ClientMessage;

        let (server, client) = tokio::io::duplex(64);
        let (mut reader, mut out) = split(
            server,
            InputPool::new(1),
            None,
            std::time::Duration::from_secs(10),
        );
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;

        out.push(Kind::Text, b"", Bytes::from_static(b"hello"), Tail::None);
        out.push(
            Kind::Binary,
            &[6],
            Bytes::from_static(b"\x01\x02"),
            Tail::None,
        );
        assert_eq!(out.control_bytes(), out.bytes() + 2 * CONTROL_ALLOC);
        let (flushed, first) = tokio::join!(out.flush(), client.next());
        flushed.unwrap();
        assert_eq!(out.control_bytes(), 0);
        assert_eq!(first.unwrap().unwrap(), Message::text("hello"));
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(vec![6, 1, 2])
        );

        client
            .send(Message::Ping(Bytes::from_static(b"p1")))
            .await
            .unwrap();
        let ClientMessage::Ping(payload) = reader.next().await.unwrap() else {
            panic!("not a ping");
        };
        out.push(Kind::Pong, b"", payload, Tail::None);
        out.flush().await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p1"))
        );

        client.send(Message::Close(None)).await.unwrap();
        assert_eq!(reader.next().await.unwrap(), ClientMessage::Close(None));
        out.push_close(None, "");
        out.flush().await.unwrap();
        assert!(matches!(
            client.next().await,
            Some(Ok(Message::Close(None)))
        ));
    }
}
