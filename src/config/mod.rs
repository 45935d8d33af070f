//! Typed configuration (DESIGN §4). Unknown keys are errors naming the key; every error
//! names the key and the reason (and the line and column where TOML gives one); secrets
//! are masked in Debug and Display.

mod broker_url;
mod connstr;
pub mod reload;
mod textfile;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use broker_url::{BrokerUrl, Endpoint, UNIX_PATH_MAX};
pub use connstr::{ConnStrError, ConnectionString, Credential};
pub use textfile::{decode_text, read_text_file, strip_bom};

use crate::proxy::Proxy;
use crate::redact::shown_path;
use crate::routing::{Filter, Template};

/// Name of the systemd credential that carries the connection string.
pub const CREDENTIAL_NAME: &str = "asb-connection-string";
/// Default config path for `run`.
pub const DEFAULT_PATH: &str = "/etc/asb-gateway/config.toml";

/// A secret string: never shown by Debug or Display.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The SHA-256 of an access token (`panels.metrics_token`, a token a panel presented):
/// never shown by Debug, since a digest is as good as the token against this gateway's
/// own comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {reason}", crate::redact::escaped_path(path))]
    Read { path: PathBuf, reason: String },
    #[error("{location}{key}: {reason}")]
    Syntax {
        key: String,
        location: String,
        reason: String,
    },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------- the file's shape

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub connection_string: Option<Secret>,
    pub connection_string_file: Option<PathBuf>,
    pub subscriptions: Vec<SubscriptionConfig>,
    /// `cbs` (SASL ANONYMOUS then CBS put-token, as ASB wants) or `plain` (SASL PLAIN
    /// with the key name and key, for brokers without CBS).
    #[serde(default)]
    pub auth: AuthMode,
    /// Lifetime of the SAS tokens the gateway signs; renewed well before expiry.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// `amqp` (port 5671) or `websockets` (AMQP over WebSockets, port 443); absent: the
    /// connection string's `TransportType`.
    pub transport: Option<Transport>,
    /// HTTP proxy to tunnel through, `http://[user:password@]host:port` (a secret: the
    /// password is never shown); `""`: none, even when `HTTPS_PROXY` is set; absent:
    /// `HTTPS_PROXY`/`https_proxy` for the hosts `NO_PROXY`/`no_proxy` does not name.
    pub proxy: Option<Secret>,
    /// PEM bundle of CAs trusted besides the platform's roots for the namespace's
    /// certificate (a TLS-inspecting proxy's plant CA).
    pub ca_file: Option<PathBuf>,
    /// `[source.entra]`: the service principal of `auth = "entra"`.
    pub entra: Option<EntraConfig>,
    /// `[source.managed_identity]`: the endpoint of `auth = "managed-identity"`.
    pub managed_identity: Option<ManagedIdentityConfig>,
}

/// A Microsoft Entra ID service principal (app registration) with a client secret or a
/// certificate (`[source.entra]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// The directory (tenant) ID or domain.
    pub tenant_id: String,
    /// The application (client) ID.
    pub client_id: String,
    /// A file holding the client secret (mode 0600).
    pub client_secret_file: Option<PathBuf>,
    /// A PEM file with the certificate and its unencrypted RSA key.
    pub certificate_file: Option<PathBuf>,
    /// `https://login.microsoftonline.com` unless set (sovereign clouds; `http://` only
    /// on loopback).
    pub authority_host: Option<String>,
}

/// The managed identity endpoint (`[source.managed_identity]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManagedIdentityConfig {
    /// Default `$IDENTITY_ENDPOINT`, else the Azure Arc agent's
    /// `http://localhost:40342/metadata/identity/oauth2/token`.
    pub endpoint: Option<String>,
}

/// How AMQP reaches the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// AMQP 1.0 over TCP (AMQPS on 5671).
    Amqp,
    /// AMQP over WebSockets (`wss://HOST:443/$servicebus/websocket`).
    Websockets,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// SAS tokens from the connection string's key, put on `$cbs`.
    #[default]
    Cbs,
    /// SASL PLAIN with the key name and key (brokers without CBS).
    Plain,
    /// Microsoft Entra ID tokens of a service principal (`[source.entra]`), on `$cbs`.
    Entra,
    /// Entra ID tokens of the box's managed identity (Azure Arc), on `$cbs`.
    #[serde(rename = "managed-identity")]
    ManagedIdentity,
}

impl AuthMode {
    /// Does this mode put tokens on `$cbs` (everything but SASL PLAIN)?
    pub fn uses_cbs(self) -> bool {
        self != AuthMode::Plain
    }
    /// Are the tokens Entra ID's (not signed with a SAS key)?
    pub fn entra_id(self) -> bool {
        matches!(self, AuthMode::Entra | AuthMode::ManagedIdentity)
    }
}

fn default_token_ttl() -> u64 {
    3600
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    pub topic: String,
    pub subscription: String,
    /// Link source address; defaults to `<topic>/Subscriptions/<subscription>` (ASB).
    /// Set it for other AMQP 1.0 brokers (e.g. `/queue/NAME` on RabbitMQ).
    pub address: Option<String>,
}

impl SubscriptionConfig {
    pub fn address(&self) -> String {
        self.address
            .clone()
            .unwrap_or_else(|| format!("{}/Subscriptions/{}", self.topic, self.subscription))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub events: usize,
    pub max_event_bytes: usize,
    pub unsettled: usize,
    /// Bytes of encoded events the journal may hold (MiB); oldest settled events are
    /// dropped first when either this or `events` is reached.
    pub memory_mib: usize,
    /// Where the journal snapshot is kept across restarts; `None`: memory only. Default:
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`), resolved when the config is read.
    pub state_dir: Option<PathBuf>,
    /// Seconds between checkpoints of the snapshot (only when something changed);
    /// 0: written at graceful stop only.
    pub checkpoint_secs: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            events: 4096,
            max_event_bytes: 16384,
            unsettled: 256,
            memory_mib: 8,
            state_dir: None,
            checkpoint_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// The topic template each event is named by (parsed when the config is read).
    pub topic: Template,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            topic: Template::parse("{subject}").expect("the default template parses"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowPolicy {
    #[default]
    Skip,
    Disconnect,
}

/// A panel token (`[[panels.tokens]]`): the SHA-256 of the secret token and the topic
/// filters it may subscribe to, parsed when the config is read.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanelToken {
    pub name: String,
    /// Written as 64 hex digits.
    #[serde(deserialize_with = "sha256_hex")]
    pub sha256: [u8; 32],
    /// Shared by every panel admitted with the token (an `Arc`: a long list is not
    /// copied per panel).
    #[serde(default = "allow_all")]
    pub allow: std::sync::Arc<[Filter]>,
}

impl std::fmt::Debug for PanelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PanelToken")
            .field("name", &self.name)
            .field("sha256", &"***")
            .field("allow", &self.allow)
            .finish()
    }
}

fn allow_all() -> std::sync::Arc<[Filter]> {
    std::sync::Arc::new([Filter::parse("#").expect("# is a filter")])
}

fn opt_sha256_hex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TokenDigest>, D::Error> {
    sha256_hex(d).map(|h| Some(TokenDigest(h)))
}

/// Why a `sha256`/`metrics_token` value is refused; it never quotes the value.
const NOT_A_DIGEST: &str = "must be 64 hex digits (the SHA-256 of the token)";

fn sha256_hex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    let text = String::deserialize(d)?;
    // The value is never quoted back: a token pasted here by mistake stays private.
    decode_sha256(&text).ok_or_else(|| serde::de::Error::custom(NOT_A_DIGEST))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PanelsConfig {
    pub listen: SocketAddr,
    pub max_panels: usize,
    pub slow_policy: SlowPolicy,
    pub allowed_origins: Vec<String>,
    /// Host names this box answers to on the panel port (no scheme, no port); empty =
    /// any `Host`. With names set, a request whose `Host` is not an IP address,
    /// `localhost` or one of them gets 421 (the defence against DNS rebinding), and the
    /// built-in page's own origin counts for `allowed_origins` under these names too.
    pub server_names: Vec<String>,
    /// Access tokens; none = open.
    pub tokens: Vec<PanelToken>,
    /// Topics whose newest event is kept for panels that connect (`last=true`,
    /// `GET /v1/last`); 0 = none.
    pub last_values: usize,
    /// MiB of last values the journal no longer holds (a quiet topic's newest event).
    pub last_values_mib: usize,
    /// PEM certificate chain for TLS on the panel port (with `tls_key`; neither set:
    /// the systemd credentials `panels-cert` and `panels-key` if both exist, else
    /// plain HTTP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (unencrypted) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Serve a non-loopback `listen` address without `tokens` (every event to anyone
    /// who can reach the port). Without it such a config is refused.
    pub open: bool,
    /// SHA-256 (64 hex digits) of the bearer token `GET /metrics` requires; none = open.
    #[serde(default, deserialize_with = "opt_sha256_hex")]
    pub metrics_token: Option<TokenDigest>,
    /// The certificate files in use and their expiry, resolved from `tls_cert`/`tls_key`
    /// or the credentials when the config is read.
    #[serde(skip)]
    pub tls: Option<PanelTls>,
    /// Base URLs of the other boxes' pages (`http[s]://host[:port][/path/]`), which the
    /// built-in page fails over to and its CSP allows (docs/fleet.md); empty = none.
    pub peer_gateways: Vec<String>,
}

/// The panel port's certificate files, checked when the config was read.
#[derive(Debug, Clone)]
pub struct PanelTls {
    pub files: crate::tls::CertFiles,
    /// The certificate's notAfter when it was checked.
    pub not_after: std::time::SystemTime,
}

impl Default for PanelsConfig {
    fn default() -> Self {
        PanelsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_panels: 256,
            slow_policy: SlowPolicy::Skip,
            allowed_origins: Vec::new(),
            server_names: Vec::new(),
            tokens: Vec::new(),
            last_values: 1024,
            last_values_mib: 1,
            tls_cert: None,
            tls_key: None,
            open: false,
            metrics_token: None,
            tls: None,
            peer_gateways: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    #[default]
    Body,
    Json,
    Postcard,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[default]
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    pub client_id: String,
    pub prefix: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: Payload,
    pub required: bool,
    /// `"5"` or `"3.1.1"`.
    pub protocol: MqttProtocol,
    /// Publishes awaiting the broker's acknowledgement, at most.
    pub inflight: usize,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// The broker's Maximum Packet Size in bytes, for brokers that do not announce it
    /// (MQTT 3.1.1); an MQTT 5 broker's CONNACK value applies as well. A publish larger
    /// than either is a poison event for the mirror (never sent, dead-lettered).
    pub max_packet_size: Option<usize>,
    /// PEM bundle of CAs to trust for `mqtts://` besides the platform's roots (a
    /// plant's own CA).
    pub ca_file: Option<PathBuf>,
    /// Trust only `ca_file`, not the platform's roots.
    pub ca_only: bool,
    /// PEM client certificate (chain) for mutual TLS, with `client_key`; neither set:
    /// the systemd credentials `mqtt-cert` and `mqtt-key` if present.
    pub client_cert: Option<PathBuf>,
    /// Unencrypted PEM key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// The client certificate files in use and their expiry, resolved when the config
    /// is read.
    #[serde(skip)]
    pub client_tls: Option<ClientTls>,
}

/// The mirror's client certificate files, checked when the config was read.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub files: crate::tls::CertFiles,
    /// The certificate's notAfter when it was checked.
    pub not_after: std::time::SystemTime,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: BrokerUrl::parse("mqtt://127.0.0.1:1883").expect("the default URL parses"),
            client_id: default_client_id(),
            prefix: "factory/asb".into(),
            qos: 1,
            retain: false,
            payload: Payload::Body,
            required: true,
            protocol: MqttProtocol::V5,
            inflight: 32,
            username: None,
            password: None,
            password_file: None,
            keep_alive_secs: 30,
            max_packet_size: None,
            ca_file: None,
            ca_only: false,
            client_cert: None,
            client_key: None,
            client_tls: None,
        }
    }
}

/// The default MQTT client id, unique per box so that boxes installed from one image
/// do not take each other's session over: `asb-gateway-<hostname>-<8 hex>`, the hex an
/// app-specific hash of `/etc/machine-id` (never the id itself, as systemd advises).
/// Parts that cannot be read are left out; `asb-gateway` when neither can.
pub fn default_client_id() -> String {
    use hmac::{Hmac, Mac};
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let host: String = read("/proc/sys/kernel/hostname")
        .or_else(|| read("/etc/hostname"))
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    let machine = read("/etc/machine-id")
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .and_then(|m| {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(m.as_bytes()).ok()?;
            mac.update(b"asb-gateway mqtt client id");
            let d = mac.finalize().into_bytes();
            Some(format!("{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3]))
        });
    let mut id = String::from("asb-gateway");
    for part in [Some(host).filter(|h| !h.is_empty()), machine]
        .into_iter()
        .flatten()
    {
        id.push('-');
        id.push_str(&part);
    }
    id
}

/// The journal's snapshot directory, from `key`: absolute and printable.
fn state_dir_ok(key: &str, d: &Path) -> Result<(), ConfigError> {
    if d.as_os_str().is_empty() || !d.is_absolute() {
        return Err(invalid(
            key,
            "must be an absolute path (the value is not shown: it may be a secret pasted there)",
        ));
    }
    printable(key, &d.to_string_lossy())
}

/// A topic or subscription name. With `asb`, the rules Service Bus applies to entity
/// names: at most `max` characters of letters, digits, `.`, `-` and `_`, and for a topic
/// also `/` between path segments (`a/b`, not `/a`, `a/` or `a//b`). Without, any
/// printable text without surrounding whitespace.
fn entity_name(key: &str, v: &str, asb: bool, max: usize, slash: bool) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if v.trim() != v {
        return Err(invalid(key, "must not begin or end with whitespace"));
    }
    if !asb {
        return Ok(());
    }
    if v.chars().count() > max {
        return Err(invalid(
            key,
            format!("is longer than {max} characters, the most Service Bus allows"),
        ));
    }
    let allowed =
        |c: char| c.is_alphanumeric() || matches!(c, '.' | '-' | '_') || (slash && c == '/');
    if let Some(c) = v.chars().find(|c| !allowed(*c)) {
        let what = if slash {
            "letters, digits, '.', '-', '_' and '/'"
        } else {
            "letters, digits, '.', '-' and '_'"
        };
        return Err(invalid(
            key,
            format!(
                "holds {}: Service Bus names have only {what} (a dead-letter queue is \
                 NAME/$DeadLetterQueue; set `address` for another broker)",
                if c.is_whitespace() || c.is_control() {
                    format!("U+{:04X}", c as u32)
                } else {
                    format!("'{c}'")
                }
            ),
        ));
    }
    if slash && v.split('/').any(str::is_empty) {
        return Err(invalid(
            key,
            "has an empty path segment ('/' at the start or end, or '//')",
        ));
    }
    Ok(())
}

/// A config string that goes on the MQTT wire as-is must be valid there.
fn mqtt_text(key: &'static str, s: &str) -> Result<(), ConfigError> {
    match s.chars().find(|c| crate::routing::mqtt_forbidden(*c)) {
        Some(c) => Err(invalid(
            key,
            format!(
                "contains U+{:04X}, which MQTT forbids in strings (controls, noncharacters)",
                c as u32
            ),
        )),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub memory_mib: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { memory_mib: 48 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    source: SourceConfig,
    #[serde(default)]
    journal: JournalConfig,
    #[serde(default)]
    routing: RoutingConfig,
    #[serde(default)]
    panels: PanelsConfig,
    mqtt: Option<MqttConfig>,
    #[serde(default)]
    budget: BudgetConfig,
    #[serde(default)]
    log: LogConfig,
}

// ---------------------------------------------------------------- the validated config

/// The whole configuration, validated, with the parts derived from it.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub journal: JournalConfig,
    pub routing: RoutingConfig,
    pub panels: PanelsConfig,
    pub mqtt: Option<MqttConfig>,
    pub budget: BudgetConfig,
    pub log: LogConfig,
    /// The parsed connection string (from the config, a file, or the credential).
    pub connection: ConnectionString,
    /// The HTTP proxy the source tunnels through, from `source.proxy` or the
    /// environment (`HTTPS_PROXY`, `NO_PROXY`).
    pub source_proxy: Option<crate::proxy::Route>,
    /// Where Entra ID tokens come from (`auth = "entra"` or `"managed-identity"`),
    /// with the secret or key read.
    pub source_identity: Option<crate::identity::Credential>,
    /// MQTT password resolved from `password` or `password_file`.
    pub mqtt_password: Option<Secret>,
}

/// Where to find files a config refers to.
#[derive(Debug, Clone, Default)]
pub struct LoadEnv {
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub credentials_dir: Option<PathBuf>,
    /// The first entry of `$STATE_DIRECTORY` (systemd `StateDirectory=`).
    pub state_dir: Option<PathBuf>,
    /// `$HTTPS_PROXY` (or `$https_proxy`), when `source.proxy` is absent.
    pub https_proxy: Option<String>,
    /// `$NO_PROXY` (or `$no_proxy`): hosts not reached through `https_proxy`.
    pub no_proxy: Option<String>,
    /// `$IDENTITY_ENDPOINT` (Azure Arc), when `source.managed_identity.endpoint` is absent.
    pub identity_endpoint: Option<String>,
}

impl LoadEnv {
    pub fn from_process() -> Self {
        LoadEnv {
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            // systemd separates several directories with ':'; ours is the first.
            state_dir: std::env::var_os("STATE_DIRECTORY").and_then(|v| {
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }),
            https_proxy: env_either("HTTPS_PROXY", "https_proxy"),
            no_proxy: env_either("NO_PROXY", "no_proxy"),
            identity_endpoint: std::env::var("IDENTITY_ENDPOINT")
                .ok()
                .filter(|v| !v.trim().is_empty()),
        }
    }
}

/// The first of two environment variables that is set and not empty.
fn env_either(upper: &str, lower: &str) -> Option<String> {
    [upper, lower]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
}

impl Config {
    /// Read and validate a config file, with credentials from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = crate::file_limit::read_capped(path, crate::file_limit::MAX_FILE_BYTES)
            .map_err(|e| ConfigError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let text = decode_text(&bytes).map_err(|why| ConfigError::Read {
            path: path.to_path_buf(),
            reason: format!("the file {why}"),
        })?;
        Config::parse(&text, &LoadEnv::from_process())
    }

    /// Parse and validate config text.
    /// A leading byte-order mark is ignored.
    pub fn parse(text: &str, env: &LoadEnv) -> Result<Config, ConfigError> {
        let file = parse_file(strip_bom(text))?;
        Config::validate(file, env)
    }

    fn validate(f: ConfigFile, env: &LoadEnv) -> Result<Config, ConfigError> {
        let mut connection = resolve_connection(&f.source, env)?;
        f.source.validate(&connection)?;
        if let Some(t) = f.source.transport {
            connection.set_websockets(t == Transport::Websockets);
        }
        let source_proxy = resolve_proxy(&f.source, env)?;
        let source_identity = resolve_identity(&f.source, env)?;
        let mut f = f;
        f.journal.validate()?;
        if f.journal.state_dir.is_none()
            && let Some(d) = &env.state_dir
        {
            state_dir_ok("STATE_DIRECTORY (environment)", d)?;
            f.journal.state_dir = Some(d.clone());
        }
        f.panels.validate()?;
        f.panels.tls = resolve_panel_tls(&f.panels, env)?;
        let mqtt_password = match &f.mqtt {
            Some(m) => m.validate()?,
            None => None,
        };
        if let Some(m) = &mut f.mqtt {
            m.client_tls = resolve_mqtt_tls(m, env)?;
        }
        range("budget.memory_mib", f.budget.memory_mib, 4, 1 << 20)?;
        f.log.validate()?;
        Ok(Config {
            source: f.source,
            journal: f.journal,
            routing: f.routing,
            panels: f.panels,
            mqtt: f.mqtt,
            budget: f.budget,
            log: f.log,
            connection,
            source_proxy,
            source_identity,
            mqtt_password,
        })
    }

    /// What the operator should know at start (and `check-config` prints): a panel port
    /// reachable from the network without TLS, a certificate expiring soon, a `NO_PROXY`
    /// entry that can never match.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let p = &self.panels;
        if !p.listen.ip().to_canonical().is_loopback() && p.tls.is_none() {
            w.push(format!(
                "panels.listen {} is reachable from the network without TLS: tokens and events \
                 travel in clear text (set panels.tls_cert and panels.tls_key)",
                p.listen
            ));
        }
        if let Some(tls) = &p.tls {
            w.extend(crate::tls::certs::expiry_warning(
                "panels.tls_cert",
                &tls.files,
                tls.not_after,
            ));
        }
        if let Some(route) = &self.source_proxy {
            for entry in route.unusable_no_proxy() {
                // A URL there is most likely the proxy's own, password and all.
                let shown = if entry.contains(['@', ':', '/']) && entry.contains("//") {
                    "a URL (not shown: it may hold a password)".to_string()
                } else if entry.contains('@') {
                    "an entry with '@' (not shown: it may hold a password)".to_string()
                } else {
                    format!("{:?}", entry.chars().take(64).collect::<String>())
                };
                w.push(format!(
                    "NO_PROXY entry {shown} can never match a host and is skipped: entries \
                     are host names (.corp.example), addresses, networks (10.0.0.0/8) or *"
                ));
            }
        }
        if let Some(tls) = self.mqtt.as_ref().and_then(|m| m.client_tls.as_ref()) {
            w.extend(crate::tls::certs::expiry_warning(
                "mqtt.client_cert",
                &tls.files,
                tls.not_after,
            ));
        }
        w
    }

    /// Does settlement wait for the MQTT broker's acknowledgement (`[mqtt]` present and
    /// `mqtt.required`)?
    pub fn mirror_required(&self) -> bool {
        self.mqtt.as_ref().is_some_and(|m| m.required)
    }

    /// The journal limits this config asks for.
    pub fn journal_limits(&self) -> crate::journal::Limits {
        crate::journal::Limits {
            events: self.journal.events,
            bytes: self.journal.memory_mib << 20,
            max_entry_bytes: crate::event::max_entry_bytes(self.journal.max_event_bytes),
            last_values: self.panels.last_values,
            last_values_bytes: self.panels.last_values_mib << 20,
        }
    }
}

// ---------------------------------------------------------------- each section checks itself
// (what serde cannot: ranges, relations between keys, files a key names)

impl SourceConfig {
    fn validate(&self, connection: &ConnectionString) -> Result<(), ConfigError> {
        if self.subscriptions.is_empty() {
            return Err(invalid(
                "source.subscriptions",
                "at least one [[source.subscriptions]] is required",
            ));
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            let fields = [
                ("topic", Some(&s.topic)),
                ("subscription", Some(&s.subscription)),
                ("address", s.address.as_ref()),
            ];
            for (field, value) in fields {
                if let Some(v) = value {
                    printable(&format!("source.subscriptions[{i}].{field}"), v)?;
                }
            }
            // Without `address`, the two names make the ASB link address, so they must be
            // names ASB accepts; with it, they only label the link and fill `{topic}` and
            // `{subscription}`.
            let asb = s.address.is_none();
            entity_name(
                &format!("source.subscriptions[{i}].topic"),
                &s.topic,
                asb,
                260,
                true,
            )?;
            // A subscription's dead-letter queue is read as `NAME/$DeadLetterQueue`
            // (and its transfer dead-letter queue as `NAME/$Transfer/$DeadLetterQueue`).
            let subscription = ["/$Transfer/$DeadLetterQueue", "/$DeadLetterQueue"]
                .iter()
                .find_map(|q| s.subscription.strip_suffix(q))
                .unwrap_or(&s.subscription);
            entity_name(
                &format!("source.subscriptions[{i}].subscription"),
                subscription,
                asb,
                50,
                false,
            )?;
            if let Some(a) = &s.address
                && (a.trim().is_empty() || a.trim() != a)
            {
                return Err(invalid(
                    &format!("source.subscriptions[{i}].address"),
                    "must not be empty nor begin or end with whitespace",
                ));
            }
            if self.subscriptions[..i].contains(s) {
                return Err(invalid(
                    &format!("source.subscriptions[{i}]"),
                    "the same subscription is listed twice",
                ));
            }
        }
        if !(60..=86_400).contains(&self.token_ttl_secs) {
            return Err(invalid(
                "source.token_ttl_secs",
                "must be between 60 and 86400 seconds",
            ));
        }
        match (self.auth.entra_id(), &connection.credential) {
            (false, Credential::None) => {
                return Err(invalid(
                    "source.connection_string",
                    "needs SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature \
                     (or source.auth = \"entra\" or \"managed-identity\" for Entra ID tokens)",
                ));
            }
            (true, Credential::Key { .. } | Credential::Signature(_)) => {
                return Err(invalid(
                    "source.auth",
                    "Entra ID tokens replace the connection string's shared access key or \
                     signature: give the connection string as Endpoint=sb://NAMESPACE/ alone",
                ));
            }
            _ => {}
        }
        if self.auth != AuthMode::Entra && self.entra.is_some() {
            return Err(invalid(
                "source.entra",
                "applies to source.auth = \"entra\" only",
            ));
        }
        if self.auth != AuthMode::ManagedIdentity && self.managed_identity.is_some() {
            return Err(invalid(
                "source.managed_identity",
                "applies to source.auth = \"managed-identity\" only",
            ));
        }
        if self.auth == AuthMode::Plain && !matches!(connection.credential, Credential::Key { .. })
        {
            return Err(invalid(
                "source.auth",
                "\"plain\" needs SharedAccessKeyName and SharedAccessKey in the connection string",
            ));
        }
        if let Some(ca) = &self.ca_file {
            // It verifies the namespace and the Entra ID token endpoint.
            if !connection.tls && !self.auth.entra_id() {
                return Err(invalid(
                    "source.ca_file",
                    "applies to TLS only, and the connection string has UseDevelopmentEmulator=true (plain AMQP)",
                ));
            }
            let mut scratch = tokio_rustls::rustls::RootCertStore::empty();
            crate::tls::certs::add_ca_bundle(&mut scratch, ca)
                .map_err(|e| invalid("source.ca_file", e.to_string()))?;
        }
        Ok(())
    }
}

/// The Entra ID credential of `auth = "entra"` (secret or certificate file read and
/// checked) or `"managed-identity"` (the endpoint checked). Errors name the key and
/// never the secret.
fn resolve_identity(
    s: &SourceConfig,
    env: &LoadEnv,
) -> Result<Option<crate::identity::Credential>, ConfigError> {
    use crate::identity::{self, Credential as Id};
    match s.auth {
        AuthMode::Entra => {
            let e = s.entra.as_ref().ok_or_else(|| {
                invalid(
                    "source.entra",
                    "missing: auth = \"entra\" needs [source.entra] with tenant_id, client_id and client_secret_file or certificate_file",
                )
            })?;
            if e.client_id.trim().is_empty() {
                return Err(invalid("source.entra.client_id", "must not be empty"));
            }
            printable("source.entra.client_id", &e.client_id)?;
            let endpoint = identity::token_endpoint(
                e.authority_host.as_deref().unwrap_or(identity::AUTHORITY),
                e.tenant_id.trim(),
            )
            .map_err(|r| {
                let key = if r.starts_with("tenant") {
                    "source.entra.tenant_id"
                } else {
                    "source.entra.authority_host"
                };
                invalid(key, r)
            })?;
            let client_id = e.client_id.trim().to_string();
            match (&e.client_secret_file, &e.certificate_file) {
                (Some(p), None) => {
                    let secret = read_secret_file(p)
                        .map_err(|r| invalid("source.entra.client_secret_file", r))?;
                    Ok(Some(Id::ClientSecret {
                        endpoint,
                        client_id,
                        secret,
                    }))
                }
                (None, Some(p)) => {
                    let key = "source.entra.certificate_file";
                    let pem = crate::file_limit::read_capped(p, crate::file_limit::MAX_FILE_BYTES)
                        .map_err(|e| {
                            invalid(key, format!("{}: cannot read: {e}", shown_path(p)))
                        })?;
                    let (x5t, x5t_s256) = crate::jwt::thumbprints(&pem)
                        .map_err(|e| invalid(key, format!("{}: {e}", shown_path(p))))?;
                    let signer = crate::jwt::RsaSigner::from_pem(&pem)
                        .map_err(|e| invalid(key, format!("{}: {e}", shown_path(p))))?;
                    Ok(Some(Id::ClientCertificate {
                        endpoint,
                        client_id,
                        signer: std::sync::Arc::new(signer),
                        x5t,
                        x5t_s256,
                    }))
                }
                _ => Err(invalid(
                    "source.entra",
                    "needs exactly one of client_secret_file and certificate_file",
                )),
            }
        }
        AuthMode::ManagedIdentity => {
            let configured = s.managed_identity.as_ref().and_then(|m| m.endpoint.clone());
            let (key, url) = match (configured, &env.identity_endpoint) {
                (Some(u), _) => ("source.managed_identity.endpoint", u),
                (None, Some(u)) => ("IDENTITY_ENDPOINT (environment)", u.clone()),
                (None, None) => (
                    "source.managed_identity.endpoint",
                    identity::ARC_ENDPOINT.into(),
                ),
            };
            let endpoint = identity::identity_endpoint(&url).map_err(|r| invalid(key, r))?;
            Ok(Some(Id::ManagedIdentity { endpoint }))
        }
        AuthMode::Cbs | AuthMode::Plain => Ok(None),
    }
}

/// The source's HTTP proxy: `source.proxy` (`""` = none) for every host, else
/// `HTTPS_PROXY` for the hosts `NO_PROXY` does not name (checked per host as it is
/// connected to: [`crate::proxy::Route`]). Errors name the key (or the variable), never
/// the URL, which may hold a password.
fn resolve_proxy(
    s: &SourceConfig,
    env: &LoadEnv,
) -> Result<Option<crate::proxy::Route>, ConfigError> {
    use crate::proxy::Route;
    if let Some(url) = &s.proxy {
        if url.expose().trim().is_empty() {
            return Ok(None);
        }
        return Proxy::parse(url.expose())
            .map(|p| Some(Route::new(p, None)))
            .map_err(|e| invalid("source.proxy", e));
    }
    let Some(url) = env.https_proxy.as_deref() else {
        return Ok(None);
    };
    Proxy::parse(url)
        .map(|p| Some(Route::new(p, env.no_proxy.clone())))
        .map_err(|e| invalid("HTTPS_PROXY (environment)", e))
}

impl JournalConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        range("journal.events", self.events, 1, 1_000_000)?;
        range("journal.max_event_bytes", self.max_event_bytes, 64, 4 << 20)?;
        range("journal.unsettled", self.unsettled, 1, 65_535)?;
        range("journal.memory_mib", self.memory_mib, 1, 65_536)?;
        if self.checkpoint_secs > 86_400 {
            return Err(invalid(
                "journal.checkpoint_secs",
                format!("must be between 0 and 86400 (got {})", self.checkpoint_secs),
            ));
        }
        if let Some(d) = &self.state_dir {
            state_dir_ok("journal.state_dir", d)?;
        }
        if self.unsettled > self.events {
            return Err(invalid(
                "journal.unsettled",
                format!(
                    "must not exceed journal.events ({}): unsettled events are kept in the journal",
                    self.events
                ),
            ));
        }
        let entry = crate::event::max_entry_bytes(self.max_event_bytes);
        if self.memory_mib << 20 < entry {
            return Err(invalid(
                "journal.memory_mib",
                format!(
                    "too small for one event of journal.max_event_bytes ({entry} bytes encoded at most)"
                ),
            ));
        }
        Ok(())
    }
}

impl PanelsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        range("panels.max_panels", self.max_panels, 1, 100_000)?;
        range("panels.last_values", self.last_values, 0, 1_000_000)?;
        if !self.listen.ip().to_canonical().is_loopback() && self.tokens.is_empty() && !self.open {
            return Err(invalid(
                "panels.listen",
                format!(
                    "{} is reachable from the network and panels.tokens is empty: anyone who \
                     can reach the port would read every event; add [[panels.tokens]], or set \
                     panels.open = true to serve it open on purpose",
                    self.listen
                ),
            ));
        }
        range("panels.last_values_mib", self.last_values_mib, 0, 4096)?;
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if !crate::panels::origin::valid_entry(o) {
                return Err(invalid(
                    &format!("panels.allowed_origins[{i}]"),
                    "must be an origin, scheme://host[:port], such as \"http://panel.local:8080\"",
                ));
            }
        }
        for (i, n) in self.server_names.iter().enumerate() {
            if let Some(why) = crate::panels::origin::server_name_problem(n) {
                return Err(invalid(&format!("panels.server_names[{i}]"), why));
            }
        }
        for (i, p) in self.peer_gateways.iter().enumerate() {
            if !crate::panels::fleet::valid_peer(p) {
                return Err(invalid(
                    &format!("panels.peer_gateways[{i}]"),
                    "must be the http:// or https:// address of another gateway's page, \
                     host[:port] and an optional path, such as \"http://box-b.local:8080/\"",
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("panels.tokens[{i}]");
            if t.name.trim().is_empty() {
                return Err(invalid(&format!("{key}.name"), "must not be empty"));
            }
            printable(&format!("{key}.name"), &t.name)?;
            if t.name.trim() != t.name {
                return Err(invalid(
                    &format!("{key}.name"),
                    "must not begin or end with whitespace (it is shown in logs and metrics)",
                ));
            }
            if self.tokens[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(&format!("{key}.name"), "names must be unique"));
            }
            if let Some(j) = self.tokens[..i].iter().position(|o| o.sha256 == t.sha256) {
                // The first would always win: this entry's name and allow would never apply.
                return Err(invalid(
                    &format!("{key}.sha256"),
                    format!("is the same token as panels.tokens[{j}] (each token must differ)"),
                ));
            }
            if t.allow.is_empty() {
                return Err(invalid(
                    &format!("{key}.allow"),
                    "must list at least one filter",
                ));
            }
        }
        Ok(())
    }
}

impl MqttConfig {
    /// Check the section; returns the password (from `password` or `password_file`).
    fn validate(&self) -> Result<Option<Secret>, ConfigError> {
        if self.client_id.trim().is_empty() || self.client_id.len() > 128 {
            return Err(invalid(
                "mqtt.client_id",
                "must be 1 to 128 bytes, not only whitespace",
            ));
        }
        mqtt_text("mqtt.client_id", &self.client_id)?;
        mqtt_text("mqtt.prefix", &self.prefix)?;
        if let Some(u) = &self.username {
            mqtt_text("mqtt.username", u)?;
        }
        if let Some(n) = self.max_packet_size {
            range("mqtt.max_packet_size", n, 128, 268_435_455)?;
        }
        if self.prefix.contains(['+', '#', '\0']) || self.prefix.ends_with('/') {
            return Err(invalid(
                "mqtt.prefix",
                "must be a topic without wildcards or a trailing '/'",
            ));
        }
        if self.prefix.starts_with('$') {
            return Err(invalid(
                "mqtt.prefix",
                "must not begin with '$': MQTT reserves such topics for the broker, and \
                 '#' and '+' subscriptions never see them",
            ));
        }
        // `{prefix}/{topic}` must stay one MQTT string, or the mirror would cut topics.
        let room = crate::routing::MQTT_STRING_MAX - 1 - crate::event::TOPIC_MAX;
        if self.prefix.len() > room {
            return Err(invalid(
                "mqtt.prefix",
                format!(
                    "is {} bytes; at most {room}, so that prefix, '/' and a topic of {} bytes \
                     fit one MQTT string ({} bytes)",
                    self.prefix.len(),
                    crate::event::TOPIC_MAX,
                    crate::routing::MQTT_STRING_MAX
                ),
            ));
        }
        if self.qos > 2 {
            return Err(invalid("mqtt.qos", "must be 0, 1 or 2"));
        }
        range("mqtt.inflight", self.inflight, 1, 65_535)?;
        if !(5..=3600).contains(&self.keep_alive_secs) {
            return Err(invalid(
                "mqtt.keep_alive_secs",
                "must be between 5 and 3600",
            ));
        }
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "mqtt.password_file",
                    "set mqtt.password or mqtt.password_file, not both",
                ));
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(path)) => Some(Secret::new(
                read_secret_file(path).map_err(|r| invalid("mqtt.password_file", r))?,
            )),
            (None, None) => None,
        };
        if password.is_some() && self.username.is_none() {
            return Err(invalid(
                "mqtt.username",
                "is required when a password is set",
            ));
        }
        Ok(password)
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(
            self.level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace" | "off"
        ) {
            return Err(invalid(
                "log.level",
                "must be one of off, error, warn, info, debug, trace",
            ));
        }
        Ok(())
    }
}

fn parse_file(text: &str) -> Result<ConfigFile, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| syntax(text, String::new(), e))?;
    sections_are_tables(text)?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        syntax(text, path, e.into_inner())
    })
}

/// The keys that must be tables (`[mqtt]`), and the arrays whose entries must be
/// (`[[source.subscriptions]]`).
const TABLES: [&str; 9] = [
    "source",
    "source.entra",
    "source.managed_identity",
    "journal",
    "routing",
    "panels",
    "mqtt",
    "budget",
    "log",
];
const TABLE_ARRAYS: [&str; 2] = ["source.subscriptions", "panels.tokens"];

/// serde fills a struct from an array by position, so `mqtt = []` would turn the mirror
/// on with its defaults and `budget = [64]` would set the budget: refuse a section given
/// as anything but a table.
fn sections_are_tables(text: &str) -> Result<(), ConfigError> {
    let Ok(root) = toml::from_str::<toml::Table>(text) else {
        return Ok(()); // the typed parse reports the syntax error with its position
    };
    let lookup = |path: &str| {
        let mut v: Option<&toml::Value> = None;
        for (i, part) in path.split('.').enumerate() {
            v = if i == 0 {
                root.get(part)
            } else {
                v.and_then(|v| v.as_table()).and_then(|t| t.get(part))
            };
        }
        v
    };
    for key in TABLES {
        if lookup(key).is_some_and(|v| !v.is_table()) {
            return Err(invalid(
                key,
                format!("must be a table ([{key}] and its keys)"),
            ));
        }
    }
    for key in TABLE_ARRAYS {
        if let Some(entries) = lookup(key).and_then(|v| v.as_array())
            && let Some(i) = entries.iter().position(|e| !e.is_table())
        {
            return Err(invalid(
                &format!("{key}[{i}]"),
                format!("must be a table ([[{key}]] and its keys)"),
            ));
        }
    }
    Ok(())
}

/// Keys whose values are or may hold secrets (a token's hash, a proxy URL with its
/// credentials): errors about them never show the value.
const SECRET_KEYS: [&str; 5] = [
    "connection_string",
    "password",
    "proxy",
    "sha256",
    "metrics_token",
];

fn syntax(text: &str, path: String, e: toml::de::Error) -> ConfigError {
    let location = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: ")
        }
        None => String::new(),
    };
    let reason = e.message().trim().to_string();
    let mut key = if path == "." { String::new() } else { path };
    // For an unknown or missing field, name the key itself, not just its table.
    for marker in ["unknown field `", "missing field `"] {
        if let Some(rest) = reason.strip_prefix(marker)
            && let Some(name) = rest.split('`').next()
        {
            key = if key.is_empty() {
                name.to_string()
            } else if key.ends_with(name) {
                key
            } else {
                format!("{key}.{name}")
            };
        }
    }
    // toml says only "duplicate key": name it from the text at the error's position.
    let duplicate = reason.contains("duplicate key");
    if key.is_empty()
        && duplicate
        && let Some(span) = e.span()
    {
        // The span covers the repeated key (or table name) itself, never a value.
        let at = text.get(span.start..span.end).unwrap_or("");
        let name: String = at
            .trim_start_matches(['[', ' ', '\t'])
            .chars()
            .take_while(|c| !matches!(c, '=' | ']' | '\n' | '\r'))
            .take(64)
            .collect();
        let name = name.trim().trim_matches(['"', '\'']);
        if !name.is_empty() && !name.chars().any(char::is_control) {
            key = name.to_string();
        }
    }
    if key.is_empty() {
        key = "config".into();
    }
    // serde quotes offending values ("invalid type: integer `123456`"): never for a key
    // that holds a secret. Kept are only reasons known to quote no value: a key unknown
    // or missing (they name keys), and our own check of a digest.
    let secret = SECRET_KEYS.contains(&key.rsplit('.').next().unwrap_or(""));
    let quotes_nothing = reason.starts_with("unknown field `")
        || reason.starts_with("missing field `")
        || reason == NOT_A_DIGEST;
    let reason = if !duplicate && secret && !quotes_nothing {
        let expected = reason
            .split_once(", expected ")
            .map_or(String::new(), |(_, what)| format!("; expected {what}"));
        format!("invalid value (not shown: this key may hold a secret){expected}")
    } else {
        reason
    };
    // Key names come from the file and serde repeats them: a control character (ESC,
    // NUL, a newline) must not reach a terminal or a log line as it is.
    ConfigError::Syntax {
        key: crate::redact::escaped(&key).into_owned(),
        location,
        reason: crate::redact::escaped(&reason).into_owned(),
    }
}

/// A name or path from the config must not hold control characters (NUL, ESC, newline…):
/// they would be sent to the broker, written to logs, or cut a path short.
fn printable(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.chars().any(char::is_control) {
        return Err(invalid(key, "must not hold control characters"));
    }
    Ok(())
}

fn range(key: &str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(invalid(
            key,
            format!("must be between {lo} and {hi} (got {v})"),
        ));
    }
    Ok(())
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let s = read_text_file(path)?;
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("{} is empty", shown_path(path)));
    }
    Ok(s.to_string())
}

fn resolve_connection(s: &SourceConfig, env: &LoadEnv) -> Result<ConnectionString, ConfigError> {
    let (key, text) = match (&s.connection_string, &s.connection_string_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "source.connection_string_file",
                "set source.connection_string or source.connection_string_file, not both",
            ));
        }
        (Some(c), None) => ("source.connection_string", c.expose().to_string()),
        (None, Some(p)) => (
            "source.connection_string_file",
            read_secret_file(p).map_err(|r| invalid("source.connection_string_file", r))?,
        ),
        (None, None) => match &env.credentials_dir {
            Some(dir) => (
                "source.connection_string (credential asb-connection-string)",
                read_secret_file(&dir.join(CREDENTIAL_NAME)).map_err(|r| {
                    invalid(
                        "source.connection_string",
                        format!("not set, and the systemd credential failed: {r}"),
                    )
                })?,
            ),
            None => {
                return Err(invalid(
                    "source.connection_string",
                    "missing: set connection_string or connection_string_file, or provide the systemd credential asb-connection-string",
                ));
            }
        },
    };
    ConnectionString::parse(&text).map_err(|e| invalid(key, e))
}

/// Systemd credential names of the panel port's certificate and key.
pub const PANEL_CERT_CREDENTIAL: &str = "panels-cert";
pub const PANEL_KEY_CREDENTIAL: &str = "panels-key";

fn resolve_panel_tls(p: &PanelsConfig, env: &LoadEnv) -> Result<Option<PanelTls>, ConfigError> {
    let keys = CertKeys {
        cert: "panels.tls_cert",
        key: "panels.tls_key",
        cert_credential: PANEL_CERT_CREDENTIAL,
        key_credential: PANEL_KEY_CREDENTIAL,
    };
    Ok(resolve_cert(&keys, &p.tls_cert, &p.tls_key, env)?
        .map(|(files, not_after)| PanelTls { files, not_after }))
}

/// Systemd credential names of the mirror's client certificate and key.
pub const MQTT_CERT_CREDENTIAL: &str = "mqtt-cert";
pub const MQTT_KEY_CREDENTIAL: &str = "mqtt-key";

/// The mirror's TLS keys: a CA bundle that parses, a client certificate and key that
/// belong together and have not expired — and none of it on a URL without TLS.
fn resolve_mqtt_tls(m: &MqttConfig, env: &LoadEnv) -> Result<Option<ClientTls>, ConfigError> {
    let url = m.url.as_str();
    if let Some(ca) = &m.ca_file {
        if !m.url.tls {
            return Err(invalid(
                "mqtt.ca_file",
                format!("applies to mqtts:// only, and mqtt.url is {url}"),
            ));
        }
        let mut scratch = tokio_rustls::rustls::RootCertStore::empty();
        crate::tls::certs::add_ca_bundle(&mut scratch, ca)
            .map_err(|e| invalid("mqtt.ca_file", e.to_string()))?;
    } else if m.ca_only {
        return Err(invalid(
            "mqtt.ca_only",
            "needs mqtt.ca_file (the only CAs to trust)",
        ));
    }
    let keys = CertKeys {
        cert: "mqtt.client_cert",
        key: "mqtt.client_key",
        cert_credential: MQTT_CERT_CREDENTIAL,
        key_credential: MQTT_KEY_CREDENTIAL,
    };
    let Some((files, not_after)) = resolve_cert(&keys, &m.client_cert, &m.client_key, env)? else {
        return Ok(None);
    };
    if !m.url.tls {
        return Err(invalid(
            "mqtt.client_cert",
            format!("a client certificate needs mqtts://, and mqtt.url is {url}"),
        ));
    }
    Ok(Some(ClientTls { files, not_after }))
}

/// The config keys and credential names of one certificate and key.
struct CertKeys {
    cert: &'static str,
    key: &'static str,
    cert_credential: &'static str,
    key_credential: &'static str,
}

/// A certificate and key from their config keys — both or neither; neither: the systemd
/// credentials if either exists — read and checked ([`crate::tls::certs::load`]): the
/// files and the certificate's notAfter, or an error on the key the fault is in.
fn resolve_cert(
    keys: &CertKeys,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    env: &LoadEnv,
) -> Result<Option<(crate::tls::CertFiles, std::time::SystemTime)>, ConfigError> {
    use crate::tls::{CertError, CertFiles};
    let files = match (cert, key) {
        (Some(cert), Some(key)) => CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        (Some(_), None) => {
            return Err(invalid(
                keys.key,
                format!("missing: {} needs its key", keys.cert),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                keys.cert,
                format!("missing: {} needs its certificate", keys.key),
            ));
        }
        (None, None) => {
            let creds = env
                .credentials_dir
                .as_ref()
                .map(|d| (d.join(keys.cert_credential), d.join(keys.key_credential)));
            match creds {
                Some((cert, key)) if cert.exists() || key.exists() => CertFiles { cert, key },
                _ => return Ok(None),
            }
        }
    };
    match crate::tls::certs::load(&files) {
        Ok(loaded) => Ok(Some((files, loaded.not_after))),
        Err(e) => {
            let key = match e {
                CertError::Read { ref path, .. } if *path == files.key => keys.key,
                CertError::EncryptedKey { .. }
                | CertError::NoKey { .. }
                | CertError::BadKey { .. }
                | CertError::Mismatch { .. } => keys.key,
                _ => keys.cert,
            };
            Err(invalid(key, e.to_string()))
        }
    }
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    // Digits only: `from_str_radix` alone would take a sign ("+a").
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true";

    fn minimal() -> String {
        format!(
            "[source]\nconnection_string = \"{CS}\"\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n"
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(&minimal(), &LoadEnv::default()).unwrap();
        assert_eq!(c.journal.events, 4096);
        assert_eq!(c.journal.unsettled, 256);
        assert_eq!(c.panels.listen.to_string(), "127.0.0.1:8080");
        assert!(c.mqtt.is_none());
        assert_eq!(c.budget.memory_mib, 48);
        assert_eq!(
            c.source.subscriptions[0].address(),
            "operational-events/Subscriptions/edge"
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("SAS_KEY_VALUE"), "{dbg}");
        // Token digests are masked too (metrics_token; panel tokens mask their own).
        let hex = "ab".repeat(32);
        let c = Config::parse(
            &format!("{}[panels]\nmetrics_token = \"{hex}\"\n", minimal()),
            &LoadEnv::default(),
        )
        .unwrap();
        assert!(c.panels.metrics_token.is_some());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("171, 171") && !dbg.contains(&hex), "{dbg}");
    }

    #[test]
    fn unknown_key_is_named_with_position() {
        let text = minimal() + "[journal]\nevnts = 5\n";
        let e = Config::parse(&text, &LoadEnv::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("journal.evnts"), "{e}");
        assert!(e.contains("line 7"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = minimal() + "[panels]\nmax_panels = \"many\"\n";
        let e = Config::parse(&text, &LoadEnv::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("panels.max_panels"), "{e}");
    }

    /// `text` is refused with an error that contains `want` (the key and the reason).
    fn assert_refused(text: &str, want: &str) {
        let e = Config::parse(text, &LoadEnv::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}\n{e}");
    }

    #[test]
    fn names_the_data_path_would_mangle_are_refused() {
        let subs =
            "[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n";
        // Names without '"' or '\\', so they quote as they are.
        let sub = |name: &str| minimal().replace("\"edge\"", &format!("\"{name}\""));
        let topic =
            |name: &str| minimal().replace("\"operational-events\"", &format!("\"{name}\""));
        for (text, key) in [
            (
                sub(" edge"),
                "subscription: must not begin or end with whitespace",
            ),
            (
                sub("edge\u{a0}"),
                "subscription: must not begin or end with whitespace",
            ),
            (
                sub("ed ge"),
                "subscription: holds U+0020: Service Bus names",
            ),
            (sub("a/b"), "subscription: holds '/'"),
            (sub("/$DeadLetterQueue"), "subscription: must not be empty"),
            (sub("a b/$DeadLetterQueue"), "subscription: holds U+0020"),
            (sub(&"s".repeat(51)), "subscription: is longer than 50"),
            (topic("a b"), "topic: holds U+0020"),
            (topic("events?x"), "topic: holds '?'"),
            (topic("/events"), "topic: has an empty path segment"),
            (topic("a//b"), "topic: has an empty path segment"),
            (topic(&"t".repeat(261)), "topic: is longer than 260"),
            (
                minimal().replace(subs, &format!("{subs}address = \" q\"\n")),
                "address: must not be empty nor begin or end",
            ),
            (
                minimal() + "[routing]\ntopic = \"line+1/{subject}\"\n",
                "routing.topic: '+' cannot be part of a topic",
            ),
            (
                minimal() + "[routing]\ntopic = \"$SYS/{subject}\"\n",
                "routing.topic: a topic must not begin with '$'",
            ),
            (
                minimal() + "[mqtt]\nprefix = \"$factory\"\n",
                "mqtt.prefix: must not begin with '$'",
            ),
            (
                minimal() + &format!("[mqtt]\nprefix = \"{}\"\n", "p".repeat(65_279)),
                "mqtt.prefix: is 65279 bytes; at most 65278",
            ),
        ] {
            assert_refused(&text, key);
        }
        // Nested topics, and any text when `address` names the link.
        for text in [
            topic("plant-7/line_1.events"),
            sub("Edge.Box-17_a"),
            sub("edge/$DeadLetterQueue"),
            sub("edge/$Transfer/$DeadLetterQueue"),
            minimal().replace(subs, "[[source.subscriptions]]\ntopic = \"rabbit mq\"\nsubscription = \"q/1\"\naddress = \"/queues/q1\"\n"),
            minimal() + &format!("[mqtt]\nprefix = \"{}\"\n", "p".repeat(65_278)),
            minimal() + "[mqtt]\nprefix = \"a/$b\"\n",
        ] {
            Config::parse(&text, &LoadEnv::default()).unwrap_or_else(|e| panic!("{text}\n{e}"));
        }
    }

    #[test]
    fn a_relative_state_directory_is_blamed_on_the_variable() {
        let env = LoadEnv {
            state_dir: Some(PathBuf::from("var/lib/asb-gateway")),
            ..LoadEnv::default()
        };
        let e = Config::parse(&minimal(), &env).unwrap_err().to_string();
        assert!(
            e.starts_with("STATE_DIRECTORY (environment): must be an absolute path"),
            "{e}"
        );
        // journal.state_dir, when set, is used and the variable is not looked at.
        let text = minimal() + "[journal]\nstate_dir = \"/var/lib/gw\"\n";
        let c = Config::parse(&text, &env).unwrap();
        assert_eq!(c.journal.state_dir, Some(PathBuf::from("/var/lib/gw")));
        let e = Config::parse(&(minimal() + "[journal]\nstate_dir = \"rel\"\n"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("journal.state_dir: must be an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn no_proxy_entries_that_never_match_are_warned_of() {
        let env = LoadEnv {
            https_proxy: Some("http://proxy.plant:3128".into()),
            no_proxy: Some("localhost,http://x.corp,10.0.0.0/8".into()),
            ..LoadEnv::default()
        };
        let c = Config::parse(&minimal(), &env).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("NO_PROXY entry a URL (not shown"), "{w:?}");
        // The proxy's own URL pasted there, password and all, is never shown.
        let pasted = LoadEnv {
            no_proxy: Some(
                "localhost,http://gw:S3cret@proxy.corp:3128,gw:S3cret@x,10.0.0.0/40".into(),
            ),
            ..env.clone()
        };
        let w = Config::parse(&minimal(), &pasted).unwrap().warnings();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().all(|l| !l.contains("S3cret")), "{w:?}");
        assert!(w[2].starts_with("NO_PROXY entry \"10.0.0.0/40\""), "{w:?}");
        let env = LoadEnv {
            no_proxy: Some("localhost,10.0.0.0/8".into()),
            ..env
        };
        assert!(
            Config::parse(&minimal(), &env)
                .unwrap()
                .warnings()
                .is_empty()
        );
    }

    #[test]
    fn sections_given_as_arrays_are_refused() {
        let subs =
            "[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n";
        for (text, key) in [
            (format!("mqtt = []\n{}", minimal()), "mqtt: must be a table"),
            (
                format!("budget = [64, 5, 6]\n{}", minimal()),
                "budget: must be a table",
            ),
            (
                format!("log = [\"info\"]\n{}", minimal()),
                "log: must be a table",
            ),
            (
                minimal().replace(subs, "subscriptions = [[\"t\", \"s\"]]\n"),
                "source.subscriptions[0]: must be a table",
            ),
            (
                minimal() + "[panels]\ntokens = [[\"a\", \"00\"]]\n",
                "panels.tokens[0]: must be a table",
            ),
        ] {
            assert_refused(&text, key);
        }
    }

    #[test]
    fn control_characters_and_blank_names_are_refused() {
        let subs =
            "[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n";
        let token = "[[panels.tokens]]\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nallow = [\"#\"]\n";
        for (text, key) in [
            (
                minimal().replace("\"edge\"", "\"ed\\u0000ge\""),
                "source.subscriptions[0].subscription: must not hold control",
            ),
            (
                minimal().replace("\"operational-events\"", "\"t\\u001b[31m\""),
                "source.subscriptions[0].topic: must not hold control",
            ),
            (
                minimal().replace(subs, &format!("{subs}address = \"/queue/a\\nb\"\n")),
                "source.subscriptions[0].address: must not hold control",
            ),
            (
                minimal() + "[journal]\nstate_dir = \"/var/lib/a\\u0000b\"\n",
                "journal.state_dir: must not hold control",
            ),
            (
                minimal() + token + "name = \"a\\u001b\"\n",
                "panels.tokens[0].name: must not hold control",
            ),
            (
                minimal() + token + "name = \"line1 \"\n",
                "panels.tokens[0].name: must not begin or end",
            ),
            (
                minimal() + token + "name = \"a\"\n" + token + "name = \"b\"\n",
                "panels.tokens[1].sha256: is the same token as panels.tokens[0]",
            ),
            (
                minimal() + "[mqtt]\nclient_id = \"  \"\n",
                "mqtt.client_id: must be 1 to 128 bytes",
            ),
        ] {
            assert_refused(&text, key);
        }
    }

    #[test]
    fn duplicate_keys_and_tables_are_named() {
        for (extra, key) in [
            ("[journal]\nevents = 8\nevents = 9\n", "events"),
            (
                "[journal]\nevents = 8\n[journal]\nunsettled = 4\n",
                "journal",
            ),
            (
                "[mqtt]\nusername = \"u\"\npassword = \"hunter2\"\npassword = \"hunter3\"\n",
                "password",
            ),
            (
                "[mqtt]\nusername = \"u\"\n'password' = \"hunter2\"\n\"password\" = \"hunter3\"\n",
                "password",
            ),
            (
                "[panels]\nx = { password = \"hunter2\", password = \"hunter3\" }\n",
                "password",
            ),
        ] {
            let e = Config::parse(&(minimal() + extra), &LoadEnv::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{key}: ")), "{e}");
            assert!(e.contains("duplicate key"), "{e}");
            assert!(!e.contains("hunter"), "{e}");
        }
    }

    /// serde shows a value of the wrong type ("invalid type: integer `987654321`"): never
    /// for a key that is or may hold a secret.
    #[test]
    fn wrong_type_of_a_secret_key_is_named_and_not_shown() {
        let source = minimal().replace("[[source", "proxy = 987654321\n[[source");
        for (text, key) in [
            (source, "source.proxy"),
            (
                minimal() + "[panels]\nmetrics_token = 987654321\n",
                "panels.metrics_token",
            ),
            (
                minimal()
                    + "[[panels.tokens]]\nname = \"a\"\nsha256 = 987654321\nallow = [\"#\"]\n",
                "sha256",
            ),
            (
                minimal() + "[mqtt]\nusername = \"u\"\npassword = 987654321\n",
                "mqtt.password",
            ),
        ] {
            let e = Config::parse(&text, &LoadEnv::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
            assert!(e.contains("not shown"), "{e}");
            assert!(!e.contains("987654321"), "{e}");
        }
    }

    /// A string that is not a digest (the token itself pasted by mistake, the likeliest
    /// error) is told what is wrong, and the string is never shown.
    #[test]
    fn a_token_pasted_where_its_digest_goes_is_told_why_and_not_shown() {
        for (text, key) in [
            (
                minimal() + "[panels]\nmetrics_token = \"hunter2\"\n",
                "panels.metrics_token",
            ),
            (
                minimal()
                    + "[[panels.tokens]]\nname = \"a\"\nsha256 = \"hunter2\"\nallow = [\"#\"]\n",
                "sha256",
            ),
        ] {
            let e = Config::parse(&text, &LoadEnv::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
            assert!(e.contains("must be 64 hex digits"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
            assert!(!e.contains("expected a string"), "{e}");
        }
        // A value short enough to appear in the reason by chance changes nothing.
        let e = Config::parse(
            &(minimal() + "[panels]\nmetrics_token = \"a\"\n"),
            &LoadEnv::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be 64 hex digits"), "{e}");
        // A secret key in the wrong table is an unknown key, and told so.
        let text = minimal().replace("[[source", "password = \"hunter2\"\n[[source");
        let e = Config::parse(&text, &LoadEnv::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.password: unknown field"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    /// Key names are the file's own text: a control character in one is written as an
    /// escape in the error (which reaches terminals and the journal), never as it is.
    #[test]
    fn control_characters_in_a_key_are_escaped_in_the_error() {
        for (bad, shown) in [
            // TOML escapes in the key's quotes, and what the error shows.
            (r"ev\u001b[31mRED", r"ev\u{1b}[31mRED"),
            (r"a\u0000b", r"a\0b"),
            (r"line\nbreak", r"line\nbreak"),
        ] {
            let text = minimal() + &format!("[journal]\n\"{bad}\" = 5\n");
            let e = Config::parse(&text, &LoadEnv::default())
                .unwrap_err()
                .to_string();
            assert!(!e.chars().any(char::is_control), "{e:?}");
            assert!(e.contains(&format!("journal.{shown}")), "{e}");
            assert!(e.contains("unknown field"), "{e}");
        }
    }

    /// The config's own path, as the user typed it, is shown with its control
    /// characters escaped when it cannot be read.
    #[test]
    fn an_unreadable_config_path_is_shown_escaped() {
        let e = Config::load(Path::new("/nonexistent/x\u{1b}[31m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(r"/nonexistent/x\u{1b}[31m.toml"), "{e:?}");
        assert!(!e.contains('\u{1b}'), "{e:?}");
    }

    #[test]
    fn credential_directory_is_used() {
        let dir = std::env::temp_dir().join(format!("asbgw-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CREDENTIAL_NAME), format!("{CS}\n")).unwrap();
        let text = "[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n[source]\n";
        let text = format!("[source]\n{}", &text[..text.len() - 9]);
        let env = LoadEnv {
            credentials_dir: Some(dir.clone()),
            ..LoadEnv::default()
        };
        let c = Config::parse(&text, &env).unwrap();
        assert_eq!(c.connection.port, 5672);
        let e = Config::parse(&text, &LoadEnv::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("source.connection_string"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every file the gateway reads may start with a byte-order mark (Windows editors
    /// write one): the config TOML, `connection_string_file`, the systemd credential and
    /// `mqtt.password_file`; UTF-16 with its BOM is decoded too.
    #[test]
    fn files_with_a_byte_order_mark_are_read() {
        let dir = std::env::temp_dir().join(format!("asbgw-bom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bom = |s: &str| [b"\xEF\xBB\xBF".as_slice(), s.as_bytes()].concat();
        let utf16le = |s: &str| {
            let mut v = vec![0xFF, 0xFE];
            v.extend(s.encode_utf16().flat_map(u16::to_le_bytes));
            v
        };
        let cs_file = dir.join("cs.txt");
        std::fs::write(&cs_file, bom(&format!("{CS}\r\n"))).unwrap();
        let pw_file = dir.join("pw.txt");
        std::fs::write(&pw_file, bom("hunter2\n")).unwrap();
        let text = format!(
            "[source]\nconnection_string_file = \"{}\"\n[[source.subscriptions]]\n\
             topic = \"t\"\nsubscription = \"s\"\n[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n",
            cs_file.display(),
            pw_file.display()
        );
        for (name, bytes) in [
            ("bom.toml", bom(&text)),
            ("utf16.toml", utf16le(&text)),
            ("plain.toml", text.clone().into_bytes()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.connection.port, 5672, "{name}");
            assert_eq!(c.mqtt_password.as_ref().unwrap().expose(), "hunter2");
        }
        // a BOM in text handed to parse directly
        assert!(Config::parse(&format!("\u{feff}{}", minimal()), &LoadEnv::default()).is_ok());
        // the systemd credential
        let creds = dir.join("creds");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join(CREDENTIAL_NAME), bom(CS)).unwrap();
        let env = LoadEnv {
            credentials_dir: Some(creds),
            ..LoadEnv::default()
        };
        let text = "[source]\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n";
        assert_eq!(Config::parse(text, &env).unwrap().connection.port, 5672);
        // a file that is not text at all is still refused, naming the file, not content
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, b"\xC3( SAS_KEY_VALUE").unwrap();
        let e = Config::load(&bad).unwrap_err().to_string();
        assert!(e.contains("UTF-8") && e.contains("bad.toml"), "{e}");
        assert!(!e.contains("SAS_KEY_VALUE"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sha256_decoding() {
        assert!(decode_sha256(&"ab".repeat(32)).is_some());
        assert!(decode_sha256(&"zz".repeat(32)).is_none());
        assert!(decode_sha256("abcd").is_none());
        // A sign is not a hex digit, though `u8::from_str_radix("+a", 16)` takes it.
        assert!(decode_sha256(&format!("+a{}", "ab".repeat(31))).is_none());
    }
}
