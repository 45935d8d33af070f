//! One panel session: a cursor into the journal, up to [`MAX_FILTERS`] filters and a
//! bounded write buffer, driven by one task.
//!
//! The loop alternates between *pumping* (read a batch of shared events from the journal,
//! filter, feed frames into the WebSocket write buffer until it holds
//! [`PANEL_WRITE_BUFFER`] bytes) and *flushing* (one socket write for many frames). While
//! a flush is pending — the panel's TCP window is full — the session does not read the
//! journal at all: it holds no events, so a stalled panel costs nothing but its own fixed
//! buffers and can never slow ingest or another panel. When it drains, its cursor may
//! have fallen behind the oldest retained event: it gets a `gap` frame (`slow_policy =
//! "skip"`) or is closed (`"disconnect"`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::Options;
use super::policy::{Admission, PanelPolicy};
use super::protocol::{Encoding, Op, OpError, Since, allowed, parse_filter};
use crate::budget::{FRAME_HEADER, MAX_FILTERS, PANEL_WRITE_BUFFER};
use crate::config::SlowPolicy;
use crate::event::EncodedEvent;
use crate::event::now_ms;
use crate::event::{Frame, GapReason};
use crate::journal::GapKind;
use crate::journal::Journal;
use crate::metrics::{Metrics, Observations};
use crate::routing::Filter;
use crate::shutdown::Shutdown;

pub(crate) type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// What the HTTP side decided for a new panel.
#[derive(Debug)]
pub(crate) struct Params {
    pub encoding: Encoding,
    /// Filters from the query (empty = the default).
    pub filters: Vec<Filter>,
    pub since: Option<Since>,
    /// `last=true`: the last values first.
    pub last: bool,
    /// The matched token's allowed filters (`None` = open).
    pub allow: Option<Vec<Filter>>,
    /// What it was admitted with, checked again when the policy changes.
    pub admission: Admission,
    pub peer: std::net::SocketAddr,
}

/// How a session ends.
enum End {
    /// The peer is gone (closed, reset, or replied to our close).
    Gone,
    /// We close with this code and reason.
    Close(CloseCode, &'static str),
}

/// What a session reads besides its own socket and the policy: the journal and the
/// metrics it counts in.
#[derive(Clone, Copy)]
pub(crate) struct Shared<'a> {
    pub journal: &'a Arc<Journal>,
    pub metrics: &'a Metrics,
}

struct Session<'a> {
    ctx: Shared<'a>,
    /// The server's policy (tokens, origins, slow-panel policy); a reload changes it.
    policy: watch::Receiver<Arc<PanelPolicy>>,
    admission: Admission,
    peer: std::net::SocketAddr,
    opts: &'a Options,
    enc: Encoding,
    allow: Option<Vec<Filter>>,
    /// At most [`MAX_FILTERS`]; on the heap, sized to the filters held (a filter is
    /// ~260 B, and most panels hold one or two).
    filters: Vec<Filter>,
    cursor: u64,
    /// The first seq that was not in the journal when the panel connected: events from
    /// here on are live (the latency histograms count those).
    live_from: u64,
    /// Reused for every journal read; holds events only inside `pump`.
    batch: Vec<Arc<EncodedEvent>>,
    /// Last values still to send (`last=true` or the `last` op), paged through the
    /// journal's table so that a stalled panel holds none of them.
    sync: Option<LastSync>,
    /// Bytes fed into the write buffer since the last completed flush.
    pending: usize,
    flushing: bool,
}

/// Where a panel is in sending the last values: every entry with a seq in
/// `after+1..=upto` that matches its filters is still to go, then `synced`.
#[derive(Debug, Clone, Copy)]
struct LastSync {
    after: u64,
    upto: u64,
}

pub(crate) async fn run(
    ws: Ws,
    p: Params,
    ctx: Shared<'_>,
    policy: watch::Receiver<Arc<PanelPolicy>>,
    opts: &Options,
    mut sd: Shutdown,
) {
    let peer = p.peer;
    let (mut tx, mut rx) = ws.split();
    let mut s = Session {
        ctx,
        policy,
        admission: p.admission,
        peer,
        opts,
        enc: p.encoding,
        allow: p.allow,
        filters: Vec::new(),
        cursor: ctx.journal.latest() + 1,
        live_from: ctx.journal.latest() + 1,
        batch: Vec::with_capacity(opts.batch),
        sync: None,
        pending: 0,
        flushing: false,
    };
    let end = match s.start(&mut tx, p.filters, p.since, p.last).await {
        Ok(()) => s.run(&mut tx, &mut rx, &mut sd).await,
        Err(e) => e,
    };
    drop(s);
    let how = match end {
        End::Gone => "gone".to_string(),
        End::Close(code, reason) => {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            // Boxed: its read buffer is needed only at the end, not for the whole session.
            Box::pin(linger_close(tx, rx, frame, opts.close_linger)).await;
            format!("closed ({code}: {reason})")
        }
    };
    log::debug!("panel {peer}: {how}");
}

/// Send a close frame, then read and discard what the client still sends until it
/// closes (or `linger` passes). Closing a socket with unread input makes the kernel send
/// a reset, which could destroy the close frame before the client reads it.
async fn linger_close(
    mut tx: SplitSink<Ws, Message>,
    rx: SplitStream<Ws>,
    frame: CloseFrame,
    linger: Duration,
) {
    let deadline = Instant::now() + linger;
    let sent = tokio::time::timeout_at(deadline, tx.send(Message::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let Ok(ws) = tx.reunite(rx) else { return };
    let mut io = ws.into_inner();
    let _ = tokio::time::timeout_at(deadline, async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

impl Session<'_> {
    /// The policy changed (a reload): go on under the filters the token allows now, or
    /// close with 1008 and the reason.
    fn recheck(&mut self) -> Result<(), End> {
        let policy = self.policy.borrow_and_update().clone();
        match self.admission.recheck(&policy, self.filters.iter()) {
            Ok(allow) => {
                self.allow = allow;
                Ok(())
            }
            Err(why) => {
                log::info!("panel {}: closed after a reload: {why}", self.peer);
                Err(End::Close(CloseCode::Policy, why))
            }
        }
    }

    /// Hello, the initial filters, the resume point, the last values asked for.
    async fn start(
        &mut self,
        tx: &mut SplitSink<Ws, Message>,
        requested: Vec<Filter>,
        since: Option<Since>,
        last: bool,
    ) -> Result<(), End> {
        let mut errors: Vec<OpError> = Vec::new();
        let requested = if requested.is_empty() {
            // The default: everything the token allows ("#" when open).
            match &self.allow {
                Some(allow) => allow.clone(),
                None => vec![Filter::parse("#").expect("'#' is a valid filter")],
            }
        } else {
            requested
        };
        for f in requested {
            if let Err(e) = self.add_filter(f) {
                errors.push(e);
            }
        }
        // One reading of `latest`: the last values are those current at it, and the live
        // stream (without `since`) starts right after it.
        let latest = self.ctx.journal.latest();
        self.live_from = latest + 1;
        if last {
            self.sync = Some(LastSync {
                after: 0,
                upto: latest,
            });
        }
        let gap = match &since {
            Some(since) => self.resume(since),
            None => {
                self.cursor = latest + 1;
                None
            }
        };
        let j = &self.ctx.journal;
        let (msg, len) = self.encode(&Frame::Hello {
            epoch: j.epoch(),
            oldest: j.oldest(),
            latest,
            filters: self.filters.iter().map(Filter::as_str).collect(),
        });
        self.feed(tx, msg, len).await?;
        self.ctx.metrics.frames_sent.inc();
        for e in &errors {
            self.error(tx, e).await?;
        }
        if let Some(gap) = gap {
            self.control(tx, &gap).await?;
        }
        Ok(())
    }

    async fn run(
        &mut self,
        tx: &mut SplitSink<Ws, Message>,
        rx: &mut SplitStream<Ws>,
        sd: &mut Shutdown,
    ) -> End {
        // A reload between the admission and this session's subscription to the policy
        // is not missed.
        if let Err(end) = self.recheck() {
            return end;
        }
        let mut notify = self.ctx.journal.subscribe();
        notify.borrow_and_update();
        let start = Instant::now() + self.opts.ping_interval;
        let mut ping = tokio::time::interval_at(start, self.opts.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            if !self.flushing {
                if let Err(end) = self.pump(tx).await {
                    return end;
                }
                self.flushing = self.pending > 0;
            }
            tokio::select! {
                biased;
                _ = sd.recv() => return End::Close(CloseCode::Away, "server shutting down"),
                r = self.policy.changed() => {
                    if r.is_err() {
                        return End::Close(CloseCode::Away, "server shutting down");
                    }
                    if let Err(end) = self.recheck() {
                        return end;
                    }
                }
                r = tx.flush(), if self.flushing => {
                    if r.is_err() {
                        return End::Gone;
                    }
                    self.flushing = false;
                    self.pending = 0;
                }
                // Client input is read only while there is room for a reply, so a client
                // that floods ops and does not read gets TCP back-pressure, not memory.
                m = rx.next(), if self.pending < PANEL_WRITE_BUFFER => {
                    last_heard = Instant::now();
                    if let Err(end) = self.on_message(tx, m).await {
                        return end;
                    }
                }
                // Not flushing means caught up: wait for the next append.
                r = notify.changed(), if !self.flushing => {
                    if r.is_err() {
                        return End::Close(CloseCode::Away, "journal closed");
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= self.opts.idle_timeout {
                        return End::Close(CloseCode::Policy, "idle timeout");
                    }
                    if !self.flushing
                        && let Err(end) = self.feed(tx, Message::Ping(Bytes::new()), 0).await
                    {
                        return end;
                    }
                }
            }
        }
    }

    /// Feed the last values still to send, then `synced`; false while the write buffer
    /// filled before the end (the rest goes after the flush).
    async fn pump_last(&mut self, tx: &mut SplitSink<Ws, Message>) -> Result<bool, End> {
        let j = self.ctx.journal.clone();
        let mut sent = 0u64;
        let done = loop {
            let Some(sync) = self.sync else { break true };
            self.batch.clear();
            let filters = &self.filters;
            j.last_values_page(
                sync.after,
                sync.upto,
                |topic| filters.iter().any(|f| f.matches(topic)),
                &mut self.batch,
                self.opts.batch,
            );
            if self.batch.is_empty() {
                self.sync = None;
                self.control(tx, &Frame::Synced { latest: sync.upto })
                    .await?;
                break true;
            }
            let mut full = false;
            for i in 0..self.batch.len() {
                let ev = &self.batch[i];
                let (msg, len) = match self.enc {
                    Encoding::Json => {
                        let s = ev.last_json();
                        let len = s.len();
                        (Message::Text(s.into()), len)
                    }
                    Encoding::Postcard => {
                        let b = ev.last_postcard();
                        let len = b.len();
                        (Message::Binary(b), len)
                    }
                };
                if self.pending > 0 && self.pending + len + FRAME_HEADER > PANEL_WRITE_BUFFER {
                    full = true;
                    break;
                }
                let seq = ev.seq;
                if let Err(e) = self.feed(tx, msg, len).await {
                    self.batch.clear();
                    return Err(e);
                }
                self.sync = Some(LastSync { after: seq, ..sync });
                sent += 1;
            }
            if full {
                break false;
            }
        };
        self.batch.clear();
        self.ctx.metrics.frames_sent.add(sent);
        Ok(done)
    }

    /// Feed the last values still to send, then events from the cursor, until caught
    /// up or the write buffer is full.
    async fn pump(&mut self, tx: &mut SplitSink<Ws, Message>) -> Result<(), End> {
        if self.sync.is_some() && !self.pump_last(tx).await? {
            return Ok(());
        }
        let j = self.ctx.journal.clone();
        let mut sent = 0u64;
        let (mut age, mut delay) = (Observations::default(), Observations::default());
        let mut fed_all_last = true;
        let result = loop {
            if !fed_all_last {
                break Ok(());
            }
            self.batch.clear();
            if let Some(gap) = j.read(&mut self.cursor, &mut self.batch, self.opts.batch) {
                let m = &self.ctx.metrics;
                let policy = match gap.kind {
                    // Lost in a crash: nobody could have read them; not the panel's fault.
                    GapKind::Lost => None,
                    GapKind::Overwritten => Some(self.policy.borrow().slow_policy),
                };
                match policy {
                    None => {
                        m.gaps.inc();
                        m.events_skipped.add(gap.missed());
                        let frame = Frame::Gap {
                            from: gap.from,
                            to: gap.to,
                            reason: GapReason::Lost,
                        };
                        if let Err(e) = self.control(tx, &frame).await {
                            break Err(e);
                        }
                    }
                    Some(SlowPolicy::Skip) => {
                        m.gaps.inc();
                        m.events_skipped.add(gap.missed());
                        let frame = Frame::Gap {
                            from: gap.from,
                            to: gap.to,
                            reason: GapReason::Lagged,
                        };
                        if let Err(e) = self.control(tx, &frame).await {
                            break Err(e);
                        }
                    }
                    Some(SlowPolicy::Disconnect) => {
                        m.panels_disconnected_slow.inc();
                        break Err(End::Close(CloseCode::Policy, "too slow: events expired"));
                    }
                }
            }
            if self.batch.is_empty() {
                break Ok(());
            }
            let mut fed_all = true;
            let now = now_ms();
            for i in 0..self.batch.len() {
                let ev = &self.batch[i];
                if !self.filters.iter().any(|f| f.matches(&ev.topic)) {
                    continue;
                }
                let size = match self.enc {
                    Encoding::Json => ev.json.len(),
                    Encoding::Postcard => ev.postcard.len(),
                } + FRAME_HEADER;
                // The write buffer holds at most PANEL_WRITE_BUFFER bytes of events (or
                // one event larger than that on its own).
                if self.pending > 0 && self.pending + size > PANEL_WRITE_BUFFER {
                    // Read again after the flush; hold no events while waiting.
                    self.cursor = ev.seq;
                    fed_all = false;
                    break;
                }
                let (msg, len) = match self.enc {
                    Encoding::Json => (Message::Text(ev.json.clone()), ev.json.len()),
                    Encoding::Postcard => (Message::Binary(ev.postcard.clone()), ev.postcard.len()),
                };
                // Live events only: a replay the panel asked for is old on purpose.
                if ev.seq >= self.live_from {
                    let t = ev.times;
                    if let Some(at) = t.enqueued_at_ms {
                        age.observe_ms(now - at);
                    }
                    if let Some(at) = t.received_at_ms {
                        delay.observe_ms(now - at);
                    }
                }
                if let Err(e) = self.feed(tx, msg, len).await {
                    self.batch.clear();
                    self.record(&age, &delay);
                    return Err(e);
                }
                sent += 1;
            }
            fed_all_last = fed_all;
        };
        self.batch.clear();
        self.ctx.metrics.frames_sent.add(sent);
        self.record(&age, &delay);
        result
    }

    /// Add a pump's latency observations to the histograms.
    fn record(&self, age: &Observations, delay: &Observations) {
        let m = self.ctx.metrics;
        if !age.is_empty() {
            m.event_age.panels.record(age);
        }
        if !delay.is_empty() {
            m.gateway_latency.panels.record(delay);
        }
    }

    /// Queue one message; never waits for the socket (the write buffer is sized so the
    /// WebSocket layer only writes on `flush`).
    async fn feed(
        &mut self,
        tx: &mut SplitSink<Ws, Message>,
        msg: Message,
        len: usize,
    ) -> Result<(), End> {
        self.pending += len + FRAME_HEADER;
        tx.feed(msg).await.map_err(|e| {
            log::debug!("panel write failed: {e}");
            End::Gone
        })
    }

    async fn control(&mut self, tx: &mut SplitSink<Ws, Message>, f: &Frame<'_>) -> Result<(), End> {
        let (msg, len) = self.encode(f);
        self.feed(tx, msg, len).await?;
        self.ctx.metrics.frames_sent.inc();
        Ok(())
    }

    fn encode(&self, f: &Frame<'_>) -> (Message, usize) {
        match self.enc {
            Encoding::Json => {
                let s = f.to_json();
                let len = s.len();
                (Message::Text(s.into()), len)
            }
            Encoding::Postcard => {
                let b = f.to_postcard();
                let len = b.len();
                (Message::Binary(b.into()), len)
            }
        }
    }

    async fn error(&mut self, tx: &mut SplitSink<Ws, Message>, e: &OpError) -> Result<(), End> {
        let f = Frame::Error {
            code: e.code,
            message: &e.message,
        };
        self.control(tx, &f).await
    }

    fn add_filter(&mut self, f: Filter) -> Result<(), OpError> {
        if !allowed(&f, self.allow.as_deref()) {
            return Err(OpError::new(
                "forbidden_filter",
                format!("filter {:?} is not allowed for this token", f.as_str()),
            ));
        }
        if self.filters.contains(&f) {
            return Ok(());
        }
        if self.filters.len() >= MAX_FILTERS {
            return Err(OpError::new(
                "too_many_filters",
                format!("at most {MAX_FILTERS} filters per panel"),
            ));
        }
        self.filters.reserve_exact(1);
        self.filters.push(f);
        Ok(())
    }

    /// Position the cursor after `since`; the gap frame to send, if any.
    fn resume(&mut self, since: &Since) -> Option<Frame<'static>> {
        let j = &self.ctx.journal;
        let (oldest, latest) = (j.oldest(), j.latest());
        let m = &self.ctx.metrics;
        let gap = if since.epoch.as_str() != j.epoch() {
            // Another epoch: this journal's history from its start is what we can give.
            self.cursor = oldest;
            Frame::Gap {
                from: 1,
                to: oldest - 1,
                reason: GapReason::Epoch,
            }
        } else {
            let next = since.seq.saturating_add(1);
            if next >= oldest {
                self.cursor = next.min(latest + 1);
                return None;
            }
            self.cursor = oldest;
            Frame::Gap {
                from: next,
                to: oldest - 1,
                reason: if j.is_lost(next, oldest - 1) {
                    GapReason::Lost
                } else {
                    GapReason::Expired
                },
            }
        };
        if let Frame::Gap { from, to, .. } = gap {
            m.gaps.inc();
            m.events_skipped.add((to + 1).saturating_sub(from));
        }
        Some(gap)
    }

    async fn on_message(
        &mut self,
        tx: &mut SplitSink<Ws, Message>,
        m: Option<Result<Message, WsError>>,
    ) -> Result<(), End> {
        let bytes: Bytes = match m {
            None => return Err(End::Gone),
            Some(Ok(Message::Text(t))) => t.into(),
            Some(Ok(Message::Binary(b))) => b,
            // Pings are answered by the WebSocket layer; a pong only proves life.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Ok(()),
            Some(Ok(Message::Close(_))) => {
                // The WebSocket layer queued the close reply: send it, then we are done.
                let _ = tokio::time::timeout(self.opts.close_linger, tx.flush()).await;
                return Err(End::Gone);
            }
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                return Err(End::Close(CloseCode::Size, "frame over 4 KiB"));
            }
            // RFC 6455 §8.1: invalid UTF-8 in a text frame fails the connection.
            Some(Err(WsError::Utf8(_))) => {
                return Err(End::Close(CloseCode::Invalid, "text frame is not UTF-8"));
            }
            // RFC 6455 §7.1.7: a client that breaks the framing rules (unmasked frame,
            // reserved bits or opcodes, bad fragmentation) is failed with 1002.
            Some(Err(WsError::Protocol(e)))
                if !matches!(e, ProtocolError::ResetWithoutClosingHandshake) =>
            {
                log::debug!("panel protocol error: {e}");
                return Err(End::Close(CloseCode::Protocol, "protocol error"));
            }
            Some(Err(e)) => {
                log::debug!("panel read failed: {e}");
                return Err(End::Gone);
            }
        };
        match Op::parse(&bytes) {
            Ok(op) => self.on_op(tx, op).await,
            Err(e) => self.error(tx, &e).await,
        }
    }

    async fn on_op(&mut self, tx: &mut SplitSink<Ws, Message>, op: Op) -> Result<(), End> {
        match op {
            Op::Ping => self.control(tx, &Frame::Pong).await,
            Op::Last => {
                // The last values current now, then the stream from right after them.
                let latest = self.ctx.journal.latest();
                self.sync = Some(LastSync {
                    after: 0,
                    upto: latest,
                });
                self.cursor = latest + 1;
                Ok(())
            }
            Op::Subscribe(list) | Op::Unsubscribe(list) if list.len() > MAX_FILTERS => {
                let e = OpError::new(
                    "too_many_filters",
                    format!("at most {MAX_FILTERS} filters per op"),
                );
                self.error(tx, &e).await
            }
            Op::Subscribe(list) => {
                for f in &list {
                    let r = parse_filter(f)
                        .map_err(|e| OpError::new("bad_filter", e.to_string()))
                        .and_then(|f| self.add_filter(f));
                    if let Err(e) = r {
                        self.error(tx, &e).await?;
                    }
                }
                Ok(())
            }
            Op::Unsubscribe(list) => {
                for f in &list {
                    match parse_filter(f) {
                        Ok(f) => self.filters.retain(|have| *have != f),
                        Err(e) => {
                            self.error(tx, &OpError::new("bad_filter", e.to_string()))
                                .await?
                        }
                    }
                }
                Ok(())
            }
            Op::Resume(since) => match Since::parse(&since) {
                Ok(since) => match self.resume(&since) {
                    Some(gap) => self.control(tx, &gap).await,
                    None => Ok(()),
                },
                Err(e) => {
                    self.error(tx, &OpError::new("bad_since", e.to_string()))
                        .await
                }
            },
        }
    }
}
