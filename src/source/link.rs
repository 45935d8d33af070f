//! The receiver links, one per subscription (DESIGN §2): attached peek-lock with manual
//! credit, attached again with backoff after a detach while the connection lives, and
//! topped up so the total credit never exceeds the free room of the unsettled window
//! nor the journal's room. Also how a broker's refusal reads in health and the log.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::definitions::{self, ErrorCondition, ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp_types::messaging::Body;
use fe2o3_amqp_types::primitives::Value;
use tokio::time::{Instant, timeout};

use super::Source;
use super::error::SourceError;
use super::renew::LockRenewer;
use super::tracker::plan_credit;
use crate::backoff::Backoff;

/// One subscription's link.
pub(super) struct Link {
    /// The link's source address (`<topic>/Subscriptions/<subscription>` on ASB).
    pub(super) address: String,
    /// The CBS audience of its token (`sb://HOST/<address>`).
    pub(super) audience: String,
    /// None while detached.
    pub(super) receiver: Option<Receiver>,
    /// Bumped whenever the link is lost: deliveries of an older generation are void.
    pub(super) generation: u64,
    /// When to try to attach again (link lost while the connection lives).
    pub(super) retry_at: Option<Instant>,
    backoff: Backoff,
    /// The down reason last logged: a link that flaps (attached, then detached at once)
    /// is one state, logged once, until it stays attached for `healthy_after`.
    logged: Option<String>,
    /// A down state was logged since the last "attached" line.
    warned: bool,
    attached_at: Option<Instant>,
    /// The entity's `$management` client for lock renewal, attached when first needed.
    pub(super) renewer: Option<LockRenewer>,
}

impl Link {
    /// A detached link to `address`, to be attached on the first connection.
    pub(super) fn new(address: String, audience: String, backoff: Backoff) -> Link {
        Link {
            audience,
            address,
            receiver: None,
            generation: 0,
            retry_at: None,
            backoff,
            logged: None,
            warned: false,
            attached_at: None,
            renewer: None,
        }
    }
}

impl Source {
    /// Attach link `i` on `session`; on success it is live and its backoff reset.
    pub(super) async fn attach_link(
        &mut self,
        session: &mut SessionHandle<()>,
        i: usize,
        step: Duration,
    ) -> Result<(), SourceError> {
        self.metrics.link_attaches.inc();
        let r = attach(session, &self.links[i].address, i, step).await?;
        let l = &mut self.links[i];
        l.receiver = Some(r);
        l.retry_at = None;
        l.backoff.up();
        l.attached_at = Some(Instant::now());
        if std::mem::take(&mut l.warned) {
            log::info!("source: link to {} attached", l.address);
        }
        self.metrics.links.set(i, None);
        Ok(())
    }

    /// Link `i` is down for `reason`: show it in health, log it once per change, and
    /// attach again after its backoff.
    pub(super) fn schedule_retry(&mut self, i: usize, reason: String) {
        let l = &mut self.links[i];
        l.retry_at = Some(Instant::now() + l.backoff.down());
        let healthy = self.opts.healthy_after;
        if l.attached_at.take().is_some_and(|t| t.elapsed() >= healthy) {
            l.logged = None;
        }
        if l.logged.as_deref() != Some(reason.as_str()) {
            log::warn!(
                "source: subscription {} is down: {reason}; retrying with backoff",
                l.address
            );
            l.logged = Some(reason.clone());
            l.warned = true;
        }
        self.metrics.links.set(i, Some(reason));
    }

    /// Attach again, on `session`, the links whose retry time has come. Errors: the
    /// session ended (the connection is lost).
    pub(super) async fn retry_links(
        &mut self,
        session: &mut SessionHandle<()>,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        let step = self.opts.step_timeout;
        for i in 0..self.links.len() {
            if self.links[i].retry_at.is_none_or(|t| t > now) {
                continue;
            }
            if session.is_ended() {
                return Err(SourceError::ConnectionLost("session ended".into()));
            }
            if let Err(e) = self.attach_link(session, i, step).await {
                log::debug!("source: {e}");
                self.schedule_retry(i, attach_reason(&e));
            }
        }
        Ok(())
    }

    /// Top up link credit so the total stays within the free room.
    pub(super) async fn grant_credit(&mut self) {
        let m = self.metrics.clone();
        // The mirror unpins before the source has taken its word: count what the tracker
        // still holds too.
        // Completions still queued are unsettled at the broker too.
        let used = self.journal.pinned().max(self.tracker.len()) + self.accepts.len();
        let cap = self.settings.unsettled.saturating_sub(used) as u32;
        let mut attached = 0u32;
        let mut outstanding = 0u32;
        let mut lowest = u32::MAX;
        for (i, l) in self.links.iter().enumerate() {
            let c = l.receiver.as_ref().map(|r| r.credit());
            self.credit_now[i] = c;
            if let Some(c) = c {
                attached += 1;
                outstanding += c;
                lowest = lowest.min(c);
            }
        }
        m.unsettled.set(used as u64);
        m.credit.set(outstanding as u64);
        if attached == 0 || cap == 0 {
            return;
        }
        // Cheap exit: no link is low enough to be topped up (see plan_credit).
        if lowest > 0 && lowest > cap.div_ceil(attached) / 2 {
            return;
        }
        let budget = cap.min(self.journal.room().min(u32::MAX as usize) as u32);
        plan_credit(budget, &self.credit_now, self.rotate, &mut self.credit_new);
        for i in 0..self.links.len() {
            let Some(c) = self.credit_new[i] else {
                continue;
            };
            let Some(r) = self.links[i].receiver.as_mut() else {
                continue;
            };
            match r.set_credit(c).await {
                Ok(()) => outstanding += c - self.credit_now[i].unwrap_or(0),
                Err(e) => self.lose_link(i, format!("cannot set credit: {e}")),
            }
        }
        m.credit.set(outstanding as u64);
    }

    /// Drop link `i` and everything held on it: its deliveries cannot be settled on a
    /// new link (a new generation), so they are left to the broker. Returns how many.
    fn forget_link(&mut self, i: usize) -> usize {
        let abandoned = self.tracker.drop_link(i);
        self.metrics.abandoned_on_link_loss.add(abandoned as u64);
        let l = &mut self.links[i];
        l.receiver = None;
        l.renewer = None;
        l.generation += 1;
        abandoned
    }

    /// A link died while the connection may live: forget its deliveries (they cannot be
    /// settled on a new link) and attach again after a backoff.
    pub(super) fn lose_link(&mut self, i: usize, why: String) {
        let abandoned = self.forget_link(i);
        let l = &self.links[i];
        if abandoned > 0 {
            log::info!(
                "source: link to {} lost; {abandoned} unsettled deliveries left to the broker",
                l.address
            );
        }
        self.schedule_retry(i, why);
    }

    /// The connection died: every link with it.
    pub(super) fn lose_all_links(&mut self) {
        for i in 0..self.links.len() {
            self.forget_link(i);
            self.links[i].retry_at = None;
            self.metrics
                .links
                .set(i, Some("connection lost".to_string()));
        }
        self.metrics.credit.set(0);
    }
}

/// Attach a peek-lock receiver with manual credit (0 until granted).
///
/// Peek-lock is the broker sending unsettled (`snd-settle-mode unsettled`): nothing
/// leaves the broker before our disposition. Our disposition settles at once
/// (`rcv-settle-mode first`, what Qpid JMS uses against Service Bus and the only mode
/// RabbitMQ offers). Mode `second` would add the broker's settled echo, which fe2o3
/// never shows to us, while keeping each delivery in two fe2o3 maps until that echo
/// arrives: a peer that never echoes (fe2o3's own acceptor drops it) would grow them
/// without bound, outside the memory budget.
async fn attach(
    session: &mut SessionHandle<()>,
    address: &str,
    i: usize,
    step: Duration,
) -> Result<Receiver, SourceError> {
    let name = format!("asb-gateway-{i}-{:08x}", fastrand::u32(..));
    let fut = Receiver::builder()
        .name(name)
        .source(address.to_string())
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .receiver_settle_mode(ReceiverSettleMode::First)
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
        .attach(session);
    match timeout(step, fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(SourceError::Attach {
            address: address.to_string(),
            reason: match &e {
                fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(err) => {
                    amqp_error_text(err)
                }
                other => other.to_string(),
            },
        }),
        Err(_) => Err(SourceError::Attach {
            address: address.to_string(),
            reason: "timed out".into(),
        }),
    }
}

/// Receive from whichever attached link has a delivery, starting at a rotating link so
/// none starves. `recv` is cancel-safe, so a future polled once and dropped loses nothing.
pub(super) fn recv_any(
    links: &mut [Link],
    start: usize,
) -> impl Future<Output = (usize, Result<Delivery<Body<Value>>, RecvError>)> + '_ {
    poll_fn(move |cx| {
        let n = links.len();
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(r) = links[i].receiver.as_mut() {
                let fut = pin!(r.recv::<Body<Value>>());
                if let Poll::Ready(res) = fut.poll(cx) {
                    return Poll::Ready((i, res));
                }
            }
        }
        Poll::Pending
    })
}

/// An AMQP error condition as its symbol without the `amqp:` prefix
/// (`not-found`, `unauthorized-access`, `com.microsoft:…`).
fn condition_name(c: &ErrorCondition) -> String {
    fn kebab(debug: &str) -> String {
        let mut out = String::with_capacity(debug.len() + 4);
        for (k, ch) in debug.chars().enumerate() {
            if ch.is_ascii_uppercase() {
                if k > 0 {
                    out.push('-');
                }
                out.push(ch.to_ascii_lowercase());
            } else {
                out.push(ch);
            }
        }
        out
    }
    match c {
        ErrorCondition::AmqpError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::ConnectionError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::SessionError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::LinkError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::Custom(s) => crate::redact::peer_text(s.as_str()).into_owned(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

/// `condition: description`, with a hint where ASB's answer needs one.
fn amqp_error_text(e: &definitions::Error) -> String {
    let cond = condition_name(&e.condition);
    let mut text = match &e.description {
        Some(d) if !d.is_empty() => format!("{cond}: {}", crate::redact::peer_text(d)),
        _ => cond.clone(),
    };
    if cond == "not-allowed" && text.to_ascii_lowercase().contains("session") {
        text.push_str(
            " (the subscription requires sessions, which the gateway does not use: \
             disable RequiresSession on it)",
        );
    }
    text
}

/// Why a link ended, for health and the log.
pub(super) fn recv_reason(e: &RecvError) -> String {
    use fe2o3_amqp::link::LinkStateError as L;
    match e {
        RecvError::LinkStateError(L::RemoteDetachedWithError(err))
        | RecvError::LinkStateError(L::RemoteClosedWithError(err)) => amqp_error_text(err),
        RecvError::LinkStateError(L::RemoteDetached) => "detached by the broker".into(),
        RecvError::LinkStateError(L::RemoteClosed) => "closed by the broker".into(),
        other => other.to_string(),
    }
}

/// Why an attach failed, for health and the log.
pub(super) fn attach_reason(e: &SourceError) -> String {
    match e {
        SourceError::Attach { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
