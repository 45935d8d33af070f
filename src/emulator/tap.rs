//! The socket under one emulator connection: passes bytes through to fe2o3, observes the
//! client's `attach` and `flow` frames to mirror each receiver link's credit (fe2o3's
//! `Sender` does not expose its link credit, and the stats must show it), and can be
//! killed to drop the connection at the TCP level (fault injection).
//!
//! Only framing is done here (AMQP frames are length-prefixed); the performatives are
//! decoded by `serde_amqp`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fe2o3_amqp::types::definitions::Role;
use fe2o3_amqp::types::performatives::{Attach, Flow};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::store::CreditTracker;

/// Frames larger than this are not inspected (attach and flow frames are small).
const MAX_INSPECTED_FRAME: usize = 64 * 1024;

/// Credit trackers by (remote channel, remote link handle).
#[derive(Debug, Default)]
pub struct FlowMap {
    map: Mutex<HashMap<(u16, u32), Arc<CreditTracker>>>,
}

impl FlowMap {
    /// The tracker of a link, created when absent.
    pub fn tracker(&self, channel: u16, handle: u32) -> Arc<CreditTracker> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((channel, handle))
            .or_default()
            .clone()
    }

    fn reset(&self, channel: u16, handle: u32) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((channel, handle), Arc::default());
    }
}

/// Drops a connection at the TCP level: reads and writes fail from then on.
#[derive(Debug)]
pub struct Kill {
    killed: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    tx: watch::Sender<bool>,
}

impl Default for Kill {
    fn default() -> Self {
        Kill {
            killed: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
            tx: watch::channel(false).0,
        }
    }
}

impl Kill {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.read_waker.wake();
        self.write_waker.wake();
        self.tx.send_replace(true);
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Resolves once the connection is killed.
    pub async fn killed(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }
}

enum Need {
    /// 8 bytes: a protocol header or a frame header.
    Prefix,
    /// The rest of an inspected frame.
    Body { doff: u8, channel: u16, len: usize },
}

struct FrameTap {
    flows: Arc<FlowMap>,
    /// Counts the client's `disposition` frames, when set.
    dispositions: Option<Arc<AtomicU64>>,
    need: Need,
    buf: Vec<u8>,
    skip: usize,
}

impl FrameTap {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let want = match self.need {
                Need::Prefix => 8,
                Need::Body { len, .. } => len,
            };
            let n = (want - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() < want {
                continue;
            }
            match self.need {
                Need::Prefix => {
                    if &self.buf[..4] == b"AMQP" {
                        // A protocol header (AMQP, SASL); frames follow.
                    } else {
                        let size = u32::from_be_bytes([
                            self.buf[0],
                            self.buf[1],
                            self.buf[2],
                            self.buf[3],
                        ]) as usize;
                        let doff = self.buf[4];
                        let kind = self.buf[5];
                        let channel = u16::from_be_bytes([self.buf[6], self.buf[7]]);
                        let rest = size.saturating_sub(8);
                        if kind == 0 && rest > 0 && size <= MAX_INSPECTED_FRAME {
                            self.need = Need::Body {
                                doff,
                                channel,
                                len: rest,
                            };
                        } else {
                            self.skip = rest;
                        }
                    }
                }
                Need::Body { doff, channel, .. } => {
                    let ext = (doff as usize * 4).saturating_sub(8);
                    if let Some(body) = self.buf.get(ext..) {
                        self.inspect(channel, body);
                    }
                    self.need = Need::Prefix;
                }
            }
            self.buf.clear();
        }
    }

    fn inspect(&self, channel: u16, body: &[u8]) {
        // A described performative: 0x00 0x53 <code>; attach = 0x12, flow = 0x13,
        // disposition = 0x15.
        match body {
            [0x00, 0x53, 0x15, ..] => {
                if let Some(n) = &self.dispositions {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            [0x00, 0x53, 0x12, ..] => {
                if let Ok(attach) = serde_amqp::from_slice::<Attach>(body)
                    && matches!(attach.role, Role::Receiver)
                {
                    self.flows.reset(channel, attach.handle.0);
                }
            }
            [0x00, 0x53, 0x13, ..] => {
                if let Ok(flow) = serde_amqp::from_slice::<Flow>(body)
                    && let Some(h) = flow.handle
                {
                    self.flows.tracker(channel, h.0).on_flow(
                        flow.delivery_count,
                        flow.link_credit,
                        flow.drain,
                    );
                }
            }
            _ => {}
        }
    }
}

/// The emulator side of one connection (TCP, or a WebSocket's byte stream).
pub struct TapStream<S> {
    inner: S,
    tap: FrameTap,
    kill: Arc<Kill>,
}

impl<S> std::fmt::Debug for TapStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapStream").finish_non_exhaustive()
    }
}

impl<S> TapStream<S> {
    pub fn new(inner: S, flows: Arc<FlowMap>, kill: Arc<Kill>) -> Self {
        TapStream {
            inner,
            tap: FrameTap {
                flows,
                dispositions: None,
                need: Need::Prefix,
                buf: Vec::with_capacity(256),
                skip: 0,
            },
            kill,
        }
    }

    /// Count the client's `disposition` frames on `n`.
    pub fn counting_dispositions(mut self, n: Arc<AtomicU64>) -> Self {
        self.tap.dispositions = Some(n);
        self
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection dropped (fault injection)",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for TapStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.kill.read_waker.register(cx.waker());
        if this.kill.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.tap.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TapStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.kill.write_waker.register(cx.waker());
        if this.kill.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.kill.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::Handle;

    fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn mirrors_flow_credit_byte_by_byte() {
        let flows = Arc::new(FlowMap::default());
        let mut tap = FrameTap {
            flows: flows.clone(),
            dispositions: None,
            need: Need::Prefix,
            buf: Vec::new(),
            skip: 0,
        };
        let flow = Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(Handle(3)),
            delivery_count: Some(0),
            link_credit: Some(7),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        let body = serde_amqp::to_vec(&flow).unwrap();
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend(frame(1, &[0x00, 0x53, 0x10, 0x45])); // some other performative
        bytes.extend(frame(1, &body));
        for b in &bytes {
            tap.feed(std::slice::from_ref(b));
        }
        let t = flows.tracker(1, 3);
        assert_eq!(t.credit(), 7);
        t.on_sent();
        assert_eq!(t.credit(), 6);
    }
}
