//! Getting a connection up (DESIGN §5): the stream ([`super::transport`]: TCP or a
//! proxy's tunnel, AMQPS — TLS from the first byte — unless the emulator's plain AMQP,
//! a WebSocket for AMQP over WebSockets), the AMQP open with SASL (ANONYMOUS
//! for CBS, PLAIN with the key for brokers without CBS), one session, and — for ASB —
//! claims-based security: a SAS token put on `$cbs` for every link's audience before its
//! attach, and put again on the live connection before it expires ([`super::cbs`]).
//! Every step is bounded by `Options::step_timeout`.

use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use tokio::time::{Instant, timeout};

use super::Source;
use super::error::SourceError;
use super::link::attach_reason;
use super::transport;
use crate::config::{AuthMode, Credential};

/// A live connection: its one session, and its `$cbs` client when authenticating by CBS.
pub(super) struct Conn {
    pub(super) connection: ConnectionHandle<()>,
    pub(super) session: SessionHandle<()>,
    pub(super) cbs: Option<CbsClient>,
    /// When the CBS tokens are put again (None: nothing to renew).
    pub(super) refresh_at: Option<Instant>,
}

impl Source {
    /// How often to put the tokens again: `Options::token_refresh`, or 80% of their
    /// lifetime; None when not authenticating by CBS or the signature is given, not signed.
    fn refresh_interval(&self) -> Option<Duration> {
        if !self.settings.auth.uses_cbs() || !self.tokens.renewable() {
            return None;
        }
        if let Some(d) = self.tokens.entra_refresh_in() {
            return Some(self.opts.token_refresh.map_or(d, |r| r.min(d)));
        }
        Some(self.opts.token_refresh.unwrap_or_else(|| {
            let ttl = self.opts.token_ttl.unwrap_or(self.settings.token_ttl);
            ttl.mul_f64(0.8)
        }))
    }

    /// The proxy to reach the namespace through (none when `NO_PROXY` names it).
    pub(super) fn proxy(&self) -> Option<&crate::proxy::Proxy> {
        let host = &self.settings.connection.host;
        self.settings.proxy.as_ref().and_then(|r| r.for_host(host))
    }

    /// Connect, authenticate and attach every link.
    pub(super) async fn connect(&mut self) -> Result<Conn, SourceError> {
        let cs = &self.settings.connection;
        let addr = format!("{}:{}", cs.host, cs.port);
        let step = self.opts.step_timeout;
        let stream = transport::open(cs, self.proxy(), self.tls.as_ref(), step).await?;
        let sasl = match self.settings.auth {
            AuthMode::Cbs | AuthMode::Entra | AuthMode::ManagedIdentity => SaslProfile::Anonymous,
            AuthMode::Plain => match &cs.credential {
                Credential::Key { name, key } => SaslProfile::Plain {
                    username: name.clone(),
                    password: key.expose().to_string(),
                },
                // Config validation refuses `plain` without a key.
                Credential::Signature(_) | Credential::None => SaslProfile::Anonymous,
            },
        };
        let container = format!("asb-gateway-{:08x}", fastrand::u32(..));
        let builder = Connection::builder()
            .container_id(container)
            .hostname(cs.host.as_str())
            .sasl_profile(sasl)
            .idle_time_out(self.opts.idle_timeout.as_millis() as u32);
        let open_err = |reason: String| SourceError::Open {
            addr: addr.clone(),
            reason,
        };
        let opened = timeout(step, builder.open_with_stream(stream)).await;
        let mut connection = opened
            .map_err(|_| open_err("timed out".into()))?
            .map_err(|e| open_err(e.to_string()))?;
        let mut session = match timeout(step, Session::begin(&mut connection)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SourceError::Session(e.to_string())),
            Err(_) => return Err(SourceError::Session("begin timed out".into())),
        };
        let mut cbs = None;
        if self.settings.auth.uses_cbs() {
            let mut client = timeout(step, CbsClient::attach(&mut session))
                .await
                .map_err(|_| SourceError::Cbs("attaching to $cbs timed out".into()))?
                .map_err(|e| SourceError::Cbs(format!("cannot attach to $cbs: {e}")))?;
            for l in &self.links {
                timeout(step, self.tokens.put(&mut client, &l.audience))
                    .await
                    .map_err(|_| SourceError::Cbs("put-token timed out".into()))??;
            }
            cbs = Some(client);
        }
        let refresh_at = self.refresh_interval().map(|d| Instant::now() + d);
        let mut conn = Conn {
            connection,
            session,
            cbs,
            refresh_at,
        };
        for i in 0..self.links.len() {
            match self.attach_link(&mut conn.session, i, step).await {
                Ok(()) => {}
                Err(e) if conn.session.is_ended() => return Err(e),
                Err(e) => {
                    // The connection is fine; this entity is not (yet). Retry it alone.
                    self.schedule_retry(i, attach_reason(&e));
                }
            }
        }
        Ok(conn)
    }

    /// Re-put every token on the live connection.
    pub(super) async fn refresh(&mut self, conn: &mut Conn) -> Result<(), SourceError> {
        let step = self.opts.step_timeout;
        // A new Entra ID token before the one in use expires.
        self.tokens.renew_entra();
        if let Some(client) = conn.cbs.as_mut() {
            for l in &self.links {
                timeout(step, self.tokens.put(client, &l.audience))
                    .await
                    .map_err(|_| SourceError::Cbs("put-token timed out".into()))??;
            }
            self.metrics.token_refreshes.inc();
            log::debug!("source: CBS tokens renewed");
        }
        conn.refresh_at = self.refresh_interval().map(|d| Instant::now() + d);
        Ok(())
    }
}
