//! The ASB emulator (DESIGN §6): an AMQP 1.0 broker, built on fe2o3-amqp's acceptor,
//! that behaves like Azure Service Bus for the parts the gateway uses:
//! - SASL ANONYMOUS (then CBS) and PLAIN (user = key name, password = key);
//! - the `$cbs` node: `put-token` (types `jwt` and `servicebus.windows.net:sastoken`,
//!   both carrying a SAS string) validated against the key; links to entities are
//!   refused (`amqp:unauthorized-access`) without a live token covering them, and the
//!   connection is closed when its latest token expires;
//! - senders to a topic (fan-out, a copy per subscription) or a queue, stamped with
//!   `x-opt-sequence-number` and `x-opt-enqueued-time`, accepted once stored;
//! - receivers on `<topic>/Subscriptions/<sub>`, `<queue>` and `…/$DeadLetterQueue`:
//!   peek-lock with `x-opt-locked-until`, delivery-count, LockDuration expiry and
//!   redelivery, MaxDeliveryCount → dead-letter queue, credit respected exactly;
//! - subscription rules (Correlation and SQL filters, see [`filter`]) applied at
//!   fan-out; `RequiresSession` entities refuse plain receivers (`amqp:not-allowed`);
//! - the `<entity>/$management` node: `com.microsoft:renew-lock` (lock tokens travel as
//!   the `x-opt-lock-token` delivery annotation, see [`Store::renew_locks`]);
//! - fault injection (drop connections, detach links, expire tokens, refuse lock
//!   renewals) and `GET /stats` on an admin HTTP address.
//!
//! State lives in a [`Store`]; pass the store of a stopped emulator to a new one to
//! "restart the broker" with its messages (locked ones stay locked until their lock
//! expires). Without that, a restart starts empty. Nothing is written to disk.

mod admin;
mod broker;
pub mod client;
mod entities;
pub mod filter;
mod message;
mod store;
mod tap;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::shutdown::{self, Shutdown, Trigger};

pub use broker::normalize_address;
pub use entities::{
    DEFAULT_LOCK_DURATION, DEFAULT_MAX_DELIVERY_COUNT, DurationError, Entities, EntityConfig,
    TopicConfig, parse_iso8601_duration,
};
pub use filter::{CorrelationFilter, Filter, Lit, Rule, SqlError, parse_sql};
pub use store::{
    DEFAULT_ENTITY_CAPACITY, DeadLetter, EntityStats, PublishError, RenewError, Store,
};

/// The well-known emulator key name and key (Microsoft's emulator uses the same).
pub const DEFAULT_KEY_NAME: &str = "RootManageSharedAccessKey";
pub const DEFAULT_KEY: &str = "SAS_KEY_VALUE";

/// Why an emulator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The entities file cannot be read or applied; the text names the file and the
    /// JSON path at fault.
    #[error("emulator config: {0}")]
    Config(String),
    /// An address (the AMQP listener or the admin endpoint) cannot be bound.
    #[error("emulator: cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// How to run an emulator.
#[derive(Clone)]
pub struct EmulatorOptions {
    pub entities: Entities,
    pub key_name: String,
    pub key: String,
    /// Serve the admin HTTP endpoint here (port 0: any free port).
    pub admin: Option<SocketAddr>,
    /// Reuse the messages of a previous emulator (its entities win over `entities`).
    pub store: Option<Store>,
    /// Also serve AMQP over WebSockets here (`/$servicebus/websocket`, subprotocol
    /// `AMQPWSB10`; port 0: any free port).
    pub websocket: Option<SocketAddr>,
    /// Serve the WebSocket listener in TLS (`wss://`) with this certificate.
    pub websocket_tls: Option<Arc<crate::tls::server::ServerTls>>,
    /// Accept Entra ID access tokens (type `jwt`) signed with this key on `$cbs`.
    pub jwt_key: Option<Arc<crate::jwt::RsaVerifier>>,
}

impl std::fmt::Debug for EmulatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorOptions")
            .field("entities", &self.entities)
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .field("admin", &self.admin)
            .field("store", &self.store.as_ref().map(|_| "reused"))
            .field("websocket", &self.websocket)
            .field("websocket_tls", &self.websocket_tls.is_some())
            .field("jwt_key", &self.jwt_key.is_some())
            .finish()
    }
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            entities: Entities::default_entities(),
            key_name: DEFAULT_KEY_NAME.into(),
            key: DEFAULT_KEY.into(),
            admin: None,
            store: None,
            websocket: None,
            websocket_tls: None,
            jwt_key: None,
        }
    }
}

/// State shared by the accept loop, the connections and the handle.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) key_name: Arc<str>,
    pub(crate) key: Arc<str>,
    /// `--jwt-public-key`: the key Entra ID tokens must be signed with.
    pub(crate) jwt_key: Option<Arc<crate::jwt::RsaVerifier>>,
    conns: Mutex<HashMap<u64, Arc<broker::ConnShared>>>,
    next_conn: AtomicU64,
    /// `disposition` frames received from clients, all connections (see
    /// [`EmulatorHandle::dispositions_received`]).
    pub(crate) dispositions: Arc<AtomicU64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn conns(&self) -> Vec<Arc<broker::ConnShared>> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn register_conn(&self, c: Arc<broker::ConnShared>) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, c);
        id
    }

    pub(crate) fn unregister_conn(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub(crate) fn drop_connections(&self) -> usize {
        let all = self.conns();
        for c in &all {
            c.kill.kill();
        }
        all.len()
    }

    pub(crate) fn detach_links(&self) -> usize {
        let all = self.conns();
        for c in &all {
            c.detach_links();
        }
        all.len()
    }

    /// Fault injection: make the next `count` renew-lock requests on `entity` (a path,
    /// any case) fail with message-lock-lost; `None`: all of them until cleared.
    pub(crate) fn fail_renewals(&self, entity: &str, count: Option<u32>) -> bool {
        let key = normalize_address(entity).to_ascii_lowercase();
        self.store.fail_renewals(&key, count)
    }

    pub(crate) fn expire_tokens(&self) -> usize {
        let all = self.conns();
        for c in &all {
            c.expire_tokens();
        }
        all.len()
    }
}

/// A running emulator.
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    ws_tls: bool,
    shared: Arc<Shared>,
    stop: Trigger,
    tasks: Vec<JoinHandle<()>>,
}

/// Bind a listener, or say which address could not be bound and why.
async fn bind(addr: SocketAddr) -> Result<TcpListener, EmulatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| EmulatorError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

/// Start an emulator on `listener`; returns at once (the broker runs in tasks).
pub async fn start(
    listener: TcpListener,
    opts: EmulatorOptions,
) -> Result<EmulatorHandle, EmulatorError> {
    let addr = listener.local_addr().map_err(|e| EmulatorError::Listen {
        addr: "?".into(),
        reason: e.to_string(),
    })?;
    let store = opts.store.unwrap_or_else(|| Store::new(&opts.entities));
    let shared = Arc::new(Shared {
        store,
        key_name: opts.key_name.into(),
        key: opts.key.into(),
        jwt_key: opts.jwt_key.clone(),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        dispositions: Arc::default(),
    });
    let (stop, stop_rx) = shutdown::channel();
    let mut tasks = Vec::new();
    let mut admin_addr = None;
    if let Some(a) = opts.admin {
        let l = bind(a).await?;
        admin_addr = l.local_addr().ok();
        tasks.push(tokio::spawn(admin::serve(
            l,
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let mut ws_addr = None;
    if let Some(a) = opts.websocket {
        let l = bind(a).await?;
        ws_addr = l.local_addr().ok();
        let tls = opts
            .websocket_tls
            .as_ref()
            .map(|t| TlsAcceptor::from(t.config()));
        tasks.push(tokio::spawn(ws_accept_loop(
            l,
            tls,
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(expire_locks(shared.store.clone(), stop_rx)));
    log::info!("emulator: listening on {addr}");
    if let Some(a) = ws_addr {
        let scheme = if opts.websocket_tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        log::info!(
            "emulator: AMQP over WebSockets on {scheme}://{a}{}",
            crate::amqp_ws::PATH
        );
    }
    Ok(EmulatorHandle {
        addr,
        admin_addr,
        ws_addr,
        ws_tls: opts.websocket_tls.is_some(),
        shared,
        stop,
        tasks,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: Shutdown) {
    let mut errors = crate::backoff::AcceptErrors::new("emulator");
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    errors.accepted();
                    tokio::spawn(broker::serve(stream, shared.clone()));
                }
                Err(e) => {
                    if errors.pause(&e, &mut stop).await {
                        return;
                    }
                }
            },
            _ = stop.recv() => return,
        }
    }
}

/// Accept WebSocket connections: TLS first when configured, then the upgrade on
/// `/$servicebus/websocket` ([`crate::amqp_ws::accept`]), then the same broker as TCP.
async fn ws_accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: Shutdown,
) {
    let mut errors = crate::backoff::AcceptErrors::new("emulator (WebSocket)");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => {
                    errors.accepted();
                    x
                }
                Err(e) => {
                    if errors.pause(&e, &mut stop).await {
                        return;
                    }
                    continue;
                }
            },
            _ = stop.recv() => return,
        };
        let _ = tcp.set_nodelay(true);
        let endpoint = tcp
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "localhost".into());
        let (tls, shared) = (tls.clone(), shared.clone());
        tokio::spawn(async move {
            let peer = peer.to_string();
            let handshake = async {
                match tls {
                    Some(acceptor) => {
                        let s = acceptor
                            .accept(tcp)
                            .await
                            .map_err(|e| format!("TLS: {e}"))?;
                        let ws = crate::amqp_ws::accept(s).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(Box::new(ws) as Box<dyn broker::Io>)
                    }
                    None => {
                        let ws = crate::amqp_ws::accept(tcp)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(Box::new(ws) as Box<dyn broker::Io>)
                    }
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                Ok(Ok(ws)) => broker::serve_stream(ws, peer, endpoint, shared).await,
                Ok(Err(e)) => log::info!("emulator: WebSocket from {peer} refused: {e}"),
                Err(_) => log::info!("emulator: WebSocket from {peer} timed out in its handshake"),
            }
        });
    }
}

/// Return messages to their entity when their lock expires.
async fn expire_locks(store: Store, mut stop: Shutdown) {
    loop {
        let next = store.expire_locks(std::time::Instant::now());
        // Check at least every 100 ms (new locks may expire sooner than `next`).
        let wait = next
            .map(|n| n.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.recv() => return,
        }
    }
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The AMQP over WebSockets listener, when [`EmulatorOptions::websocket`] was given.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The connection string for the WebSocket listener (`TransportType=AmqpWebSockets`):
    /// plain `ws://` with the emulator flag, or in TLS for host `localhost` (the name a
    /// test certificate carries). None without a WebSocket listener.
    pub fn websocket_connection_string(&self) -> Option<String> {
        let a = self.ws_addr?;
        let (host, flag) = if self.ws_tls {
            ("localhost".to_string(), "")
        } else {
            (a.ip().to_string(), ";UseDevelopmentEmulator=true")
        };
        Some(format!(
            "Endpoint=sb://{host}:{};SharedAccessKeyName={};SharedAccessKey={}{flag};TransportType=AmqpWebSockets",
            a.port(),
            self.shared.key_name,
            self.shared.key
        ))
    }

    /// The connection string for this emulator (plain AMQP, the configured key).
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}:{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
            self.addr.ip(),
            self.addr.port(),
            self.shared.key_name,
            self.shared.key
        )
    }

    /// The store: pass it in [`EmulatorOptions::store`] to restart with the same state.
    pub fn store(&self) -> Store {
        self.shared.store.clone()
    }

    pub fn stats(&self) -> BTreeMap<String, EntityStats> {
        self.shared.store.stats()
    }

    /// `disposition` frames (AMQP 1.0 §2.7.6) received from clients so far, over all
    /// connections: one settles a single delivery or a range `first..=last`.
    pub fn dispositions_received(&self) -> u64 {
        self.shared.dispositions.load(Ordering::Relaxed)
    }

    /// The dead-letter queue of a queue or subscription path.
    pub fn dead_letters(&self, entity: &str) -> Vec<DeadLetter> {
        self.shared.store.dead_letters(entity)
    }

    /// Close every connection abruptly at the TCP level (no AMQP close).
    pub fn drop_connections(&self) {
        self.shared.drop_connections();
    }

    /// Detach every receiver link with `amqp:link:detach-forced`; connections stay.
    pub fn detach_links(&self) {
        self.shared.detach_links();
    }

    /// Make the next `count` renew-lock requests on `entity` fail with ASB's 410
    /// message-lock-lost (`None`: every one until `Some(0)`). False: no such entity.
    pub fn fail_renewals(&self, entity: &str, count: Option<u32>) -> bool {
        self.shared.fail_renewals(entity, count)
    }

    /// Treat every token as expired now: connections authorised by tokens are closed.
    pub fn expire_tokens(&self) {
        self.shared.expire_tokens();
    }

    /// Stop listening and drop every connection; the port is free when this returns.
    pub async fn shutdown(self) {
        self.stop.fire();
        self.shared.drop_connections();
        for t in self.tasks {
            let _ = t.await;
        }
        log::info!("emulator: stopped");
    }
}

/// What `asb-gateway emulator` serves ([`serve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// The AMQP listener (plain AMQP, as the Microsoft emulator).
    pub listen: SocketAddr,
    /// A Config.json in the format of Microsoft's emulator (see [`Entities`]); `None`:
    /// [`Entities::default_entities`].
    pub config: Option<PathBuf>,
    /// Also serve the admin HTTP endpoint (`GET /stats`, fault injection) there.
    pub admin: Option<SocketAddr>,
    /// Also serve AMQP over WebSockets there (`--listen-ws`).
    pub listen_ws: Option<SocketAddr>,
    /// Serve the WebSocket listener in TLS with this certificate and key (`--tls-cert`,
    /// `--tls-key`).
    pub ws_tls: Option<crate::tls::CertFiles>,
    /// Accept Entra ID tokens signed with the RSA public key in this PEM file
    /// (`--jwt-public-key`).
    pub jwt_public_key: Option<PathBuf>,
}

/// `asb-gateway emulator`: serve the emulator until `shutdown` fires, then stop it (the
/// ports are free when this returns).
///
/// Once listening it prints the addresses and the connection strings (key name
/// [`DEFAULT_KEY_NAME`], key [`DEFAULT_KEY`]) on stderr.
///
/// Errors: [`EmulatorError::Config`] when the file cannot be read or is not a
/// Config.json the emulator can apply, or the TLS certificate or key cannot be used
/// (before anything listens); [`EmulatorError::Listen`] when an address cannot be bound.
pub async fn serve(options: ServeOptions, mut shutdown: Shutdown) -> Result<(), EmulatorError> {
    let ServeOptions {
        listen,
        config,
        admin,
        listen_ws,
        ws_tls,
        jwt_public_key,
    } = options;
    let jwt_key = match jwt_public_key {
        Some(p) => {
            let pem = crate::file_limit::read_capped(&p, crate::file_limit::MAX_FILE_BYTES)
                .map_err(|e| {
                    EmulatorError::Config(format!(
                        "--jwt-public-key {}: cannot read: {e}",
                        crate::redact::escaped_path(&p)
                    ))
                })?;
            Some(Arc::new(crate::jwt::RsaVerifier::from_pem(&pem).map_err(
                |e| {
                    EmulatorError::Config(format!(
                        "--jwt-public-key {}: {e}",
                        crate::redact::escaped_path(&p)
                    ))
                },
            )?))
        }
        None => None,
    };
    let entities = match &config {
        Some(p) => Entities::load(p)?,
        None => Entities::default_entities(),
    };
    let websocket_tls = match ws_tls {
        Some(files) => Some(
            crate::tls::server::ServerTls::load(files)
                .map_err(|e| EmulatorError::Config(format!("--tls-cert/--tls-key: {e}")))?,
        ),
        None => None,
    };
    let listener = bind(listen).await?;
    let opts = EmulatorOptions {
        entities,
        admin,
        websocket: listen_ws,
        websocket_tls,
        jwt_key,
        ..Default::default()
    };
    let handle = start(listener, opts).await?;
    eprintln!(
        "asb-gateway: emulator on {}{}; connection string:\n{}",
        handle.addr(),
        handle
            .admin_addr()
            .map(|a| format!(", admin http://{a}/stats"))
            .unwrap_or_default(),
        handle.connection_string()
    );
    if let Some(cs) = handle.websocket_connection_string() {
        eprintln!("asb-gateway: AMQP over WebSockets; connection string:\n{cs}");
    }
    shutdown.recv().await;
    handle.shutdown().await;
    Ok(())
}
