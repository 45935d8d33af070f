//! One panel session: a cursor into the journal, up to [`MAX_FILTERS`] filters and a
//! bounded queue of frames sent by reference, driven by one task.
//!
//! The loop alternates between *pumping* (read a batch of shared events from the journal,
//! filter, queue their frames — the journal's shared bytes, no copy — until
//! [`PANEL_WRITE_BUFFER`] bytes or [`PANEL_WRITE_FRAMES`] frames are queued) and
//! *flushing* (vectored writes of many frames each, [`super::socket`]). While a flush is
//! pending — the panel's TCP window is full — the session does not read the journal at
//! all: it holds at most what it queued, so a stalled panel costs nothing but its own
//! bounded queue and can never slow ingest or another panel. When it drains, its cursor may
//! have fallen behind the oldest retained event: it gets a `gap` frame (`slow_policy =
//! "skip"`) or is closed (`"disconnect"`).
//!
//! What a stalled panel queued stays in memory after the journal evicts it; while its
//! flush waits, the session pays for those frames from the panels' shared pool
//! ([`crate::held`]) each time the journal announces evictions, and closes the
//! connection when the pool has no room.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Options;
use super::inbound::{ClientMessage, ReadError};
use super::policy::{Admission, PanelPolicy};
use super::protocol::{Encoding, Op, OpError, Since, allowed, parse_filter, shown_filter};
use super::socket::{self, InputPool, Kind, Tail};
use crate::budget::{
    CONTROL_READ, FRAME_HEADER, MAX_FILTERS, PANEL_READ_HEADROOM, PANEL_WRITE_BUFFER,
    PANEL_WRITE_FRAMES,
};
use crate::config::SlowPolicy;
use crate::event::EncodedEvent;
use crate::event::now_ms;
use crate::event::{Frame, GapReason};
use crate::held::HeldPool;
use crate::journal::GapKind;
use crate::journal::Journal;
use crate::metrics::{Metrics, Observations};
use crate::routing::Filter;
use crate::shutdown::Shutdown;

/// The upgraded connection.
pub(crate) type Io = TokioIo<Upgraded>;
/// Client frames are read into fixed bytes and, for an op, a grant of the input pool.
pub(crate) type Reader = socket::Inbound<ReadHalf<Io>>;
/// Server frames are written by reference.
pub(crate) type Writer = socket::Outbound<WriteHalf<Io>>;

/// What the HTTP side decided for a new panel.
#[derive(Debug)]
pub(crate) struct Params {
    pub encoding: Encoding,
    /// Filters from the query (empty = the default).
    pub filters: Vec<Filter>,
    pub since: Option<Since>,
    /// `last=true`: the last values first.
    pub last: bool,
    /// The matched token's allowed filters (`None` = open), shared with the policy.
    pub allow: Option<Arc<[Filter]>>,
    /// What it was admitted with, checked again when the policy changes.
    pub admission: Admission,
    pub peer: std::net::SocketAddr,
}

/// How a session ends.
enum End {
    /// The peer is gone (closed, reset, or replied to our close).
    Gone,
    /// The client closed; the reply is queued.
    Replied,
    /// We close with this code and reason.
    Close(CloseCode, &'static str),
}

/// What a session reads besides its own socket and the policy: the journal and the
/// metrics it counts in.
#[derive(Clone, Copy)]
pub(crate) struct Shared<'a> {
    pub journal: &'a Arc<Journal>,
    pub metrics: &'a Metrics,
    /// What pays for the evicted events panels still hold.
    pub held: &'a Arc<HeldPool>,
    /// What pays for the ops panels send and their replies.
    pub input: &'a InputPool,
}

struct Session<'a> {
    ctx: Shared<'a>,
    /// The server's policy (tokens, origins, slow-panel policy); a reload changes it.
    policy: watch::Receiver<Arc<PanelPolicy>>,
    admission: Admission,
    peer: std::net::SocketAddr,
    opts: &'a Options,
    enc: Encoding,
    allow: Option<Arc<[Filter]>>,
    /// At most [`MAX_FILTERS`]; on the heap, sized to the filters held (a filter is
    /// ~260 B, and most panels hold one or two).
    filters: Vec<Filter>,
    cursor: u64,
    /// The first seq that was not in the journal when the panel connected: events from
    /// here on are live (the latency histograms count those).
    live_from: u64,
    /// Last values still to send (`last=true` or the `last` op), paged through the
    /// journal's table so that a stalled panel holds none of them.
    sync: Option<LastSync>,
    /// Server frames queued for the socket.
    out: Writer,
    /// A flush is under way: the queue is not added to from the journal until it is
    /// written.
    flushing: bool,
    /// The journal or the last values may hold frames for this panel that are not
    /// queued yet: set by an append, by client input, and by a pump the queue cut short.
    unread: bool,
}

/// Where a panel is in sending the last values: every entry with a seq in
/// `after+1..=upto` that matches its filters is still to go, then `synced`.
#[derive(Debug, Clone, Copy)]
struct LastSync {
    after: u64,
    upto: u64,
}

/// Run one panel session until it ends: its hello (and last values), then events, ops,
/// pings, until the client or the server closes. The session's state is built before
/// the future, which holds it once (an `async fn` would keep its arguments beside the
/// state built from them, for the session's whole life).
pub(crate) fn run<'a>(
    (mut rx, out): (Reader, Writer),
    p: Params,
    ctx: Shared<'a>,
    policy: watch::Receiver<Arc<PanelPolicy>>,
    opts: &'a Options,
    mut sd: Shutdown,
) -> impl Future<Output = ()> + 'a {
    let Params {
        encoding,
        filters,
        since,
        last,
        allow,
        admission,
        peer,
    } = p;
    let mut s = Session {
        ctx,
        policy,
        admission,
        peer,
        opts,
        enc: encoding,
        allow,
        filters: Vec::new(),
        cursor: ctx.journal.latest() + 1,
        live_from: ctx.journal.latest() + 1,
        sync: None,
        out,
        flushing: false,
        unread: true,
    };
    // The hello (and the first last values) are queued here, so the future does not
    // keep the query's filters for the session's life.
    let started = s.start(filters, since, last);
    async move {
        let end = match started {
            Ok(()) => s.run(&mut rx, &mut sd).await,
            Err(e) => e,
        };
        let close = match end {
            End::Gone => {
                log::debug!("panel {peer}: gone");
                return;
            }
            End::Replied => None,
            End::Close(code, reason) => Some((code, reason)),
        };
        // Boxed: its read buffer is needed only at the end, not for the whole session.
        Box::pin(linger_close(s.out, rx, close, opts.close_linger)).await;
        match close {
            None => log::debug!("panel {peer}: closed by the client"),
            Some((code, reason)) => log::debug!("panel {peer}: closed ({code}: {reason})"),
        }
    }
}

/// Send what is queued and our close frame (`close`; `None` when the client closed and
/// the reply is already queued), then read and discard what the client still sends until
/// it closes (or `linger` passes). Closing a socket with unread input makes the kernel
/// send a reset, which could destroy the close frame before the client reads it — also
/// after a client's close, when the client sent more behind it (pings may follow a close).
async fn linger_close(
    mut out: Writer,
    rx: Reader,
    close: Option<(CloseCode, &'static str)>,
    linger: Duration,
) {
    let deadline = Instant::now() + linger;
    if let Some((code, reason)) = close {
        out.push_close(Some(code), reason);
    }
    queue_within_budget(&out, &rx);
    let sent = tokio::time::timeout_at(deadline, out.flush()).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let mut io = rx.into_inner();
    let _ = tokio::time::timeout_at(deadline, async {
        let _ = out.shutdown().await;
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

/// Debug builds check what the budget assumes: without a grant, a panel's control frames
/// and queue entries stay within its own room ([`crate::budget::CONTROL_OWN`],
/// [`crate::budget::PANEL_QUEUE_OWN`]); with one, its queue within
/// [`crate::budget::PANEL_QUEUE_MAX`].
fn queue_within_budget(out: &Writer, rx: &Reader) {
    use crate::budget::{CONTROL_OWN, PANEL_QUEUE_MAX, PANEL_QUEUE_OWN};
    let granted = rx.grant_since().is_some();
    debug_assert!(
        granted || out.control_bytes() <= CONTROL_OWN,
        "{} B of control frames queued without a grant",
        out.control_bytes()
    );
    let most = if granted {
        PANEL_QUEUE_MAX
    } else {
        PANEL_QUEUE_OWN
    };
    debug_assert!(
        out.frames() <= most,
        "{} frames queued (grant held: {granted})",
        out.frames()
    );
}

/// The events one journal read hands a pump: a vector per runtime thread, reused by
/// every panel that pumps on it, not one per panel (room for `Options::batch` = 64
/// `Arc`s: 512 B each panel kept before). It holds events only inside a pump, which is
/// synchronous: no panel's session can see another's.
struct Batch(Vec<Arc<EncodedEvent>>);

thread_local! {
    static BATCH: Cell<Vec<Arc<EncodedEvent>>> = const { Cell::new(Vec::new()) };
}

impl Batch {
    fn take() -> Self {
        Batch(BATCH.take())
    }
}

/// Back to the thread, empty.
impl Drop for Batch {
    fn drop(&mut self) {
        self.0.clear();
        let v = std::mem::take(&mut self.0);
        let _ = BATCH.try_with(|b| b.set(v));
    }
}

impl std::ops::Deref for Batch {
    type Target = Vec<Arc<EncodedEvent>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Batch {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
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
    fn start(
        &mut self,
        requested: Vec<Filter>,
        since: Option<Since>,
        last: bool,
    ) -> Result<(), End> {
        let mut errors: Vec<OpError> = Vec::new();
        let requested = if requested.is_empty() {
            // The default: everything the token allows ("#" when open).
            match &self.allow {
                Some(allow) => allow.to_vec(),
                None => vec![Filter::parse("#").expect("'#' is a valid filter")],
            }
        } else {
            requested
        };
        for f in requested {
            if let Err(e) = self.add_filter(f) {
                // One `too_many_filters` is enough: a token's allow list (the default) may
                // be longer than MAX_FILTERS, and each error is a frame in the queue.
                let repeated =
                    e.code == "too_many_filters" && errors.iter().any(|x| x.code == e.code);
                if !repeated {
                    errors.push(e);
                }
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
        let hello = Frame::Hello {
            epoch: j.epoch(),
            oldest: j.oldest(),
            latest,
            filters: self.filters.iter().map(Filter::as_str).collect(),
        };
        let hello = encode(self.enc, &hello);
        self.push_control(hello);
        for e in &errors {
            self.error(e);
        }
        if let Some(gap) = gap {
            self.control(&gap);
        }
        Ok(())
    }

    async fn run(&mut self, rx: &mut Reader, sd: &mut Shutdown) -> End {
        // A reload between the admission and this session's subscription to the policy
        // is not missed.
        if let Err(end) = self.recheck() {
            return end;
        }
        let mut notify = self.ctx.journal.subscribe();
        notify.borrow_and_update();
        let mut evictions = self.ctx.journal.evictions();
        evictions.borrow_and_update();
        let start = Instant::now() + self.opts.ping_interval;
        let mut ping = tokio::time::interval_at(start, self.opts.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            queue_within_budget(&self.out, rx);
            // Before a pump, which may queue a gap of the panel's own.
            self.release_grant(rx);
            if !self.flushing {
                if self.unread
                    && let Err(end) = self.pump()
                {
                    return end;
                }
                queue_within_budget(&self.out, rx);
                self.flushing = !self.out.is_empty();
                // A caught-up panel's few frames almost always go at once: write them now
                // rather than in another turn of the select below. (A panel that is
                // behind flushes there, after its input.) The flush is cancel-safe; if
                // it waits, the select polls it again with this task's waker.
                if self.flushing && !self.unread {
                    match self.out.flush().now_or_never() {
                        Some(Ok(())) => self.flushing = false,
                        Some(Err(e)) => {
                            log::debug!("panel {}: write failed: {e}", self.peer);
                            return End::Gone;
                        }
                        None => {}
                    }
                }
            }
            self.release_grant(rx);
            // Client input is read only while there is room for a reply, so a client
            // that floods ops and does not read gets TCP back-pressure, not memory. The
            // room is above what a pump fills: a panel that is behind still has its
            // pings and ops answered between flushes.
            let room = self.out.control_bytes() < CONTROL_READ
                && self.out.frames() < PANEL_WRITE_FRAMES + PANEL_READ_HEADROOM;
            // The reader watches a grant while it reads; this, while it is not read
            // (no room) or its op's replies are not written.
            let held_since = rx.grant_since();
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
                // Before input: a client that keeps its socket full (pongs need no reply)
                // must not keep these from ever being polled.
                // A grant held long (a frame sent slowly, replies not read) while other
                // panels wait for one: this panel goes, the others get their turn.
                _ = grant_deadline(held_since, self.opts.grant_hold) => {
                    // The reader may have started the hold again meanwhile.
                    let due = rx.grant_since().is_some_and(|t| t + self.opts.grant_hold <= Instant::now());
                    if due && self.ctx.input.available() > 0 {
                        rx.renew_grant();
                    } else if due {
                        return self.held_too_long(rx.in_message());
                    }
                }
                // A flush that waits while the journal turns: pay for what it holds of
                // evicted events.
                r = evictions.changed(), if self.flushing => {
                    if r.is_err() {
                        return End::Close(CloseCode::Away, "journal closed");
                    }
                    if let Err(end) = self.pay_evicted() {
                        return end;
                    }
                }
                m = rx.next(), if room => {
                    last_heard = Instant::now();
                    // An op may have changed the filters or asked for the last values.
                    self.unread = true;
                    if let Err(end) = self.on_message(m) {
                        return end;
                    }
                }
                // After client input: a flush that is ready at once every time (a long
                // catch-up) must not leave pongs and ops unread.
                r = self.out.flush(), if self.flushing => {
                    if let Err(e) = r {
                        log::debug!("panel {}: write failed: {e}", self.peer);
                        return End::Gone;
                    }
                    self.flushing = false;
                }
                // Not flushing means caught up: wait for the next append.
                r = notify.changed(), if !self.flushing => {
                    if r.is_err() {
                        return End::Close(CloseCode::Away, "journal closed");
                    }
                    self.unread = true;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= self.opts.idle_timeout {
                        return End::Close(CloseCode::Policy, "idle timeout");
                    }
                    if !self.flushing {
                        self.out.push(Kind::Ping, b"", Bytes::new(), Tail::None);
                    }
                }
            }
        }
    }

    /// Give the input pool's grant back once the replies it paid for are written.
    fn release_grant(&mut self, rx: &mut Reader) {
        if rx.grant_since().is_some() && self.out.control_bytes() == 0 {
            rx.release_grant();
            self.out.shrink();
        }
    }

    /// The panel held a grant of the input pool `grant_hold` while the pool had none
    /// free: it goes (1008), so that the others' ops get their turn.
    fn held_too_long(&self, in_message: bool) -> End {
        self.ctx.metrics.panels_disconnected_input.inc();
        log::info!(
            "panel {}: closed: {} within {:?} while the panels' input pool had no grant free",
            self.peer,
            if in_message {
                "its op was not sent whole"
            } else {
                "the replies to its op were not read"
            },
            self.opts.grant_hold,
        );
        End::Close(CloseCode::Policy, "input held too long")
    }

    /// Pay from the shared pool for the queued frames the journal has evicted; when the
    /// pool has no room, the panel must go (dropping the connection frees what only it
    /// held: its last frame may be half written, so no close frame can follow).
    fn pay_evicted(&mut self) -> Result<(), End> {
        let Err(held) = self.out.pay_evicted(self.ctx.held) else {
            return Ok(());
        };
        self.ctx.metrics.panels_disconnected_held.inc();
        log::info!(
            "panel {}: closed: its socket has not taken {held} B of events the journal has \
             evicted, and the panels' shared pool for those ({} B) is full",
            self.peer,
            self.ctx.held.limit()
        );
        Err(End::Gone)
    }

    /// Is there room in the queue for a frame of `len` wire bytes? The queue holds at
    /// most [`PANEL_WRITE_BUFFER`] bytes and [`PANEL_WRITE_FRAMES`] frames of events, or
    /// one event larger than that on its own.
    fn has_room(&self, len: usize) -> bool {
        let out = &self.out;
        out.is_empty()
            || (out.bytes() + len <= PANEL_WRITE_BUFFER && out.frames() < PANEL_WRITE_FRAMES)
    }

    /// Queue the last values still to send, then `synced`; false while the queue filled
    /// before the end (the rest goes after the flush).
    fn pump_last(&mut self) -> bool {
        let j = self.ctx.journal.clone();
        let mut batch = Batch::take();
        let mut sent = 0u64;
        let done = loop {
            let Some(sync) = self.sync else { break true };
            batch.clear();
            let filters = &self.filters;
            j.last_values_page(
                sync.after,
                sync.upto,
                |topic| filters.iter().any(|f| f.matches(topic)),
                &mut batch,
                self.opts.batch,
            );
            if batch.is_empty() {
                self.sync = None;
                self.control(&Frame::Synced { latest: sync.upto });
                break true;
            }
            let mut full = false;
            for ev in batch.iter() {
                // The stored frame with its last-value mark, by reference (no copy).
                let (kind, prefix, body, tail) = match self.enc {
                    Encoding::Json => {
                        let (body, tail) = ev.last_json_parts();
                        let tail = if tail.is_empty() {
                            Tail::None
                        } else {
                            Tail::Last
                        };
                        (Kind::Text, &[][..], body, tail)
                    }
                    Encoding::Postcard => {
                        let (tag, rest) = ev.last_postcard_parts();
                        (Kind::Binary, tag, rest, Tail::None)
                    }
                };
                if !self.has_room(prefix.len() + body.len() + tail.bytes().len() + FRAME_HEADER) {
                    full = true;
                    break;
                }
                let mark = match self.enc {
                    Encoding::Json => &ev.json_mark,
                    Encoding::Postcard => &ev.postcard_mark,
                };
                self.out.push_event(mark, kind, prefix, body, tail);
                self.sync = Some(LastSync {
                    after: ev.seq,
                    ..sync
                });
                sent += 1;
            }
            if full {
                break false;
            }
        };
        drop(batch);
        self.ctx.metrics.frames_sent.add(sent);
        done
    }

    /// Queue the last values still to send, then events from the cursor, until caught
    /// up or the queue is full.
    fn pump(&mut self) -> Result<(), End> {
        self.unread = false;
        if self.sync.is_some() && !self.pump_last() {
            self.unread = true;
            return Ok(());
        }
        let j = self.ctx.journal.clone();
        let mut sent = 0u64;
        let (mut age, mut delay) = (Observations::default(), Observations::default());
        // At most one gap per pump: the panel's own room for control frames counts one.
        let mut gapped = false;
        let mut batch = Batch::take();
        let result = loop {
            batch.clear();
            if let Some(gap) = j.read(&mut self.cursor, &mut batch, self.opts.batch) {
                gapped = true;
                let m = &self.ctx.metrics;
                let policy = match gap.kind {
                    // Lost in a crash: nobody could have read them; not the panel's fault.
                    GapKind::Lost => None,
                    GapKind::Overwritten => Some(self.policy.borrow().slow_policy),
                };
                let reason = match policy {
                    None => GapReason::Lost,
                    Some(SlowPolicy::Skip) => GapReason::Lagged,
                    Some(SlowPolicy::Disconnect) => {
                        m.panels_disconnected_slow.inc();
                        break Err(End::Close(CloseCode::Policy, "too slow: events expired"));
                    }
                };
                m.gaps.inc();
                m.events_skipped.add(gap.missed());
                self.control(&Frame::Gap {
                    from: gap.from,
                    to: gap.to,
                    reason,
                });
            }
            if batch.is_empty() {
                break Ok(());
            }
            let mut full = false;
            let now = now_ms();
            for ev in batch.iter() {
                if !self.filters.iter().any(|f| f.matches(&ev.topic)) {
                    continue;
                }
                let (kind, body, mark) = match self.enc {
                    Encoding::Json => (Kind::Text, Bytes::from(ev.json.clone()), &ev.json_mark),
                    Encoding::Postcard => (Kind::Binary, ev.postcard.clone(), &ev.postcard_mark),
                };
                if !self.has_room(body.len() + FRAME_HEADER) {
                    // Read again after the flush; hold no events while waiting.
                    self.cursor = ev.seq;
                    self.unread = true;
                    full = true;
                    break;
                }
                // Live events only: a replay the panel asked for is old on purpose.
                if ev.seq >= self.live_from {
                    let t = ev.times;
                    if let Some(at) = t.enqueued_at_ms {
                        age.observe_ms(now.saturating_sub(at));
                    }
                    if let Some(at) = t.received_at_ms {
                        delay.observe_ms(now.saturating_sub(at));
                    }
                }
                // The journal's shared bytes, by reference.
                self.out.push_event(mark, kind, b"", body, Tail::None);
                sent += 1;
            }
            if full {
                break Ok(());
            }
            if gapped {
                // The rest after a flush (a next gap, if any, in the next pump).
                self.unread = true;
                break Ok(());
            }
        };
        drop(batch);
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

    /// Queue a frame the session makes itself (hello, gap, error, pong, synced).
    fn control(&mut self, f: &Frame<'_>) {
        let encoded = encode(self.enc, f);
        self.push_control(encoded);
    }

    /// Queue a control frame already encoded by [`encode`].
    fn push_control(&mut self, (kind, body): (Kind, Bytes)) {
        self.out.push(kind, b"", body, Tail::None);
        self.ctx.metrics.frames_sent.inc();
    }

    fn error(&mut self, e: &OpError) {
        self.control(&Frame::Error {
            code: e.code,
            message: &e.message,
        });
    }

    fn add_filter(&mut self, f: Filter) -> Result<(), OpError> {
        if !allowed(&f, self.allow.as_deref()) {
            return Err(OpError::new(
                "forbidden_filter",
                format!(
                    "filter {:?} is not allowed for this token",
                    shown_filter(f.as_str())
                ),
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

    fn on_message(&mut self, m: Result<ClientMessage, ReadError>) -> Result<(), End> {
        let bytes: Bytes = match m {
            Ok(ClientMessage::Text(b) | ClientMessage::Binary(b)) => b,
            // RFC 6455 §5.5.3: a pong with the ping's payload.
            Ok(ClientMessage::Ping(payload)) => {
                self.out.push(Kind::Pong, b"", payload, Tail::None);
                return Ok(());
            }
            // A pong only proves life.
            Ok(ClientMessage::Pong) => return Ok(()),
            // §5.5.1: the reply echoes the status code. It goes out like a close of ours,
            // with the linger (the client may have sent more after its close).
            Ok(ClientMessage::Close(code)) => {
                self.out.push_close(code.map(CloseCode::from), "");
                return Err(End::Replied);
            }
            Err(ReadError::TooSlow) => return Err(self.held_too_long(true)),
            Err(e) => {
                let Some(code) = e.close_code() else {
                    log::debug!("panel {}: read failed: {e}", self.peer);
                    return Err(End::Gone);
                };
                log::debug!("panel {}: {e}", self.peer);
                // §7.1.7: a client that breaks the framing rules is failed with 1002.
                return Err(End::Close(
                    code,
                    match e {
                        ReadError::TooBig => "frame over 4 KiB",
                        ReadError::Utf8 => "text frame is not UTF-8",
                        _ => "protocol error",
                    },
                ));
            }
        };
        match Op::parse(&bytes) {
            Ok(op) => self.on_op(op),
            Err(e) => self.error(&e),
        }
        Ok(())
    }

    fn on_op(&mut self, op: Op) {
        match op {
            Op::Ping => self.control(&Frame::Pong),
            Op::Last => {
                // The last values current now, then the stream from right after them.
                let latest = self.ctx.journal.latest();
                self.sync = Some(LastSync {
                    after: 0,
                    upto: latest,
                });
                self.cursor = latest + 1;
            }
            Op::Subscribe(list) | Op::Unsubscribe(list) if list.len() > MAX_FILTERS => {
                let e = OpError::new(
                    "too_many_filters",
                    format!("at most {MAX_FILTERS} filters per op"),
                );
                self.error(&e)
            }
            Op::Subscribe(list) => {
                for f in &list {
                    let r = parse_filter(f)
                        .map_err(|e| OpError::new("bad_filter", e.to_string()))
                        .and_then(|f| self.add_filter(f));
                    if let Err(e) = r {
                        self.error(&e);
                    }
                }
            }
            Op::Unsubscribe(list) => {
                for f in &list {
                    match parse_filter(f) {
                        Ok(f) => self.filters.retain(|have| *have != f),
                        Err(e) => self.error(&OpError::new("bad_filter", e.to_string())),
                    }
                }
            }
            Op::Resume(since) => match Since::parse(&since) {
                Ok(since) => {
                    if let Some(gap) = self.resume(&since) {
                        self.control(&gap);
                    }
                }
                Err(e) => self.error(&OpError::new("bad_since", e.to_string())),
            },
        }
    }
}

/// A control frame in the panel's encoding: its WebSocket frame kind and payload, in an
/// allocation of its length (what the budget counts).
fn encode(enc: Encoding, f: &Frame<'_>) -> (Kind, Bytes) {
    match enc {
        Encoding::Json => (
            Kind::Text,
            f.to_json().into_bytes().into_boxed_slice().into(),
        ),
        Encoding::Postcard => (Kind::Binary, f.to_postcard().into_boxed_slice().into()),
    }
}

/// When a grant held since `since` has been held for `hold`; never without one.
async fn grant_deadline(since: Option<Instant>, hold: Duration) {
    match since {
        Some(t) => tokio::time::sleep_until(t + hold).await,
        None => std::future::pending().await,
    }
}
