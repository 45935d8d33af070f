//! What the source is given: its settings, taken once from the config
//! ([`SourceSettings`]), the handles it shares with the rest of the daemon
//! ([`SourceContext`]), and the tuning that is not in the config file ([`Options`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::tracker::SharedDedup;
use crate::config::{AuthMode, Config, ConnectionString, SubscriptionConfig};
use crate::journal::Journal;
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::proxy::Route;
use crate::routing::Template;

/// What the source needs from the config, taken once from [`Config`] by the daemon
/// ([`SourceSettings::from_config`]).
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// The namespace: host, port, AMQPS or plain AMQP, SAS credential (secrets redacted
    /// in Debug).
    pub connection: ConnectionString,
    /// The HTTP proxy to tunnel through (`source.proxy` or `HTTPS_PROXY`).
    pub proxy: Option<Route>,
    /// CAs trusted besides the platform's roots (`source.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// Where Entra ID tokens come from (`source.auth = "entra"`/`"managed-identity"`).
    pub identity: Option<crate::identity::Credential>,
    /// `source.auth`: CBS put-token (ASB) or SASL PLAIN.
    pub auth: AuthMode,
    /// Lifetime of the SAS tokens the source signs (`source.token_ttl_secs`).
    pub token_ttl: Duration,
    /// One receiver link each, in this order (`[[source.subscriptions]]`).
    pub subscriptions: Vec<SubscriptionConfig>,
    /// The topic template events are routed with (`routing.topic`).
    pub template: Template,
    /// Largest encoded event, bytes (`journal.max_event_bytes`); larger bodies are
    /// dead-lettered with `PayloadTooLarge`.
    pub max_event_bytes: usize,
    /// Ceiling on messages received but not settled (`journal.unsettled`): total link
    /// credit never exceeds its free room.
    pub unsettled: usize,
    /// Messages remembered to recognise redeliveries (`journal.events`).
    pub dedup_window: usize,
    /// Complete a message only on the mirror's acknowledgement (`[mqtt]` present and
    /// `mqtt.required`).
    pub mirror_required: bool,
}

impl SourceSettings {
    /// The source's part of a validated config.
    pub fn from_config(cfg: &Config) -> Self {
        SourceSettings {
            connection: cfg.connection.clone(),
            proxy: cfg.source_proxy.clone(),
            ca_file: cfg.source.ca_file.clone(),
            identity: cfg.source_identity.clone(),
            auth: cfg.source.auth,
            token_ttl: Duration::from_secs(cfg.source.token_ttl_secs),
            subscriptions: cfg.source.subscriptions.clone(),
            template: cfg.routing.topic.clone(),
            max_event_bytes: cfg.journal.max_event_bytes,
            unsettled: cfg.journal.unsettled,
            dedup_window: cfg.journal.events,
            mirror_required: cfg.mirror_required(),
        }
    }
}

/// Everything the source task is given: its settings and the handles it shares with the
/// rest of the daemon. The source is the journal's only writer.
#[derive(Debug, Clone)]
pub struct SourceContext {
    pub settings: SourceSettings,
    /// Where events are appended (the source is its only writer).
    pub journal: Arc<Journal>,
    /// The source's counters, gauges and link health.
    pub metrics: Arc<Metrics>,
    /// The source beats as [`Part::Source`](crate::liveness::Part::Source).
    pub liveness: Arc<Liveness>,
    /// The duplicate-suppression window (shared so the journal snapshot can save it).
    pub dedup: Arc<SharedDedup>,
}

impl SourceContext {
    /// The settings taken from `config`, with the shared handles.
    pub fn new(
        config: &Config,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
        dedup: Arc<SharedDedup>,
    ) -> Self {
        let settings = SourceSettings::from_config(config);
        SourceContext {
            settings,
            journal,
            metrics,
            liveness,
            dedup,
        }
    }
}

/// Tuning that is not part of the config file (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct Options {
    /// Re-put CBS tokens this often; default: 80% of the token lifetime.
    pub token_refresh: Option<Duration>,
    /// Lifetime of signed tokens; default `source.token_ttl_secs`.
    pub token_ttl: Option<Duration>,
    /// First reconnect (and re-attach) delay; it doubles, jittered, on each failure.
    pub backoff_min: Duration,
    /// Longest reconnect (and re-attach) delay.
    pub backoff_max: Duration,
    /// How long a connection or link must stay up before its backoff starts again
    /// from `backoff_min` (see [`crate::backoff`]).
    pub healthy_after: Duration,
    /// Bound on TCP connect, TLS, AMQP open, CBS and attach, each.
    pub step_timeout: Duration,
    /// AMQP idle timeout announced to the peer (it must send something this often).
    pub idle_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token_refresh: None,
            token_ttl: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
            step_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}
