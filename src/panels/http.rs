//! HTTP/1.1 on the panel port (hyper): routes, the WebSocket upgrade checks (origin,
//! token, query, subprotocol, panel limit), and the hand-over to a session.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::policy::{self, Admission, PanelPolicy};
use super::protocol::{self, Access, Encoding, StreamQuery};
use super::session::{self, Params};
use super::{PanelSlot, Server};
use crate::budget;
use crate::metrics::RejectReason;
use crate::shutdown::Shutdown;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
/// The page loads only its own script and talks only to its own origin (and to the
/// `panels.peer_gateways`, added by [`super::fleet::page_csp`]).
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                        connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";
/// Largest request head accepted (hyper's read buffer).
const MAX_REQUEST_BUF: usize = 16 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// Bytes of last values `GET /v1/last` puts in one chunk of its streamed body (one
/// larger event goes alone); the table is paged, never copied whole.
pub const LAST_CHUNK: usize = 16 * 1024;

/// An accepted upgrade waiting for the 101 response to go out.
struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    params: Params,
    slot: PanelSlot,
}

/// A panel whose upgrade is done: what it asked for and its place under `max_panels`.
struct Accepted {
    params: Params,
    slot: PanelSlot,
}

/// Serve one TCP connection: the TLS handshake when the port has TLS, then HTTP requests
/// until it closes, or one upgrade and then the panel session.
pub(super) async fn connection(
    server: Arc<Server>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    peer: SocketAddr,
    mut sd: Shutdown,
) {
    // Boxed: the handshake's state (rustls' connection before the upgrade, hyper's
    // connection, a few KiB) lives in its own allocation, freed before the panel session
    // starts, instead of sizing this task for a panel's whole life.
    let Some((Accepted { params, slot }, ws)) =
        Box::pin(handshake(&server, stream, tls, peer, &mut sd)).await
    else {
        return;
    };
    log::info!(
        "panel {peer} connected ({}, filters {:?})",
        params.encoding.subprotocol(),
        params
            .filters
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
    );
    let shared = session::Shared {
        journal: &server.journal,
        metrics: &server.metrics,
        held: &server.held,
        input: &server.input,
    };
    let policy = server.policy.subscribe();
    session::run(ws, params, shared, policy, &server.opts, sd).await;
    drop(slot);
    log::info!("panel {peer} disconnected");
}

/// The TLS handshake (when `tls` is set, within `handshake_timeout`), then
/// [`http_exchange`]. `None`: the handshake failed or the connection ended without a
/// panel upgrade.
async fn handshake(
    server: &Arc<Server>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    peer: SocketAddr,
    sd: &mut Shutdown,
) -> Option<(Accepted, (session::Reader, session::Writer))> {
    let Some(acceptor) = tls else {
        return http_exchange(server, stream, peer, sd).await;
    };
    // rustls holds at most this much unsent TLS data, so a stalled panel's TLS buffers
    // stay within the budget line.
    let accept = acceptor.accept_with(stream, |conn| {
        conn.set_buffer_limit(Some(budget::PANEL_TLS_SEND_LIMIT))
    });
    let why = match tokio::time::timeout(server.opts.handshake_timeout, accept).await {
        Ok(Ok(stream)) => return http_exchange(server, stream, peer, sd).await,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {:?}", server.opts.handshake_timeout),
    };
    server.metrics.panels_rejected.of(RejectReason::Tls).inc();
    log::debug!("panel {peer}: TLS handshake failed: {why}");
    None
}

/// HTTP requests until the connection closes (`None`), or until a panel upgrade is done:
/// then its parameters and the WebSocket.
async fn http_exchange<S>(
    server: &Arc<Server>,
    stream: S,
    peer: SocketAddr,
    sd: &mut Shutdown,
) -> Option<(Accepted, (session::Reader, session::Writer))>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upgrade: Arc<Mutex<Option<Upgrade>>> = Arc::new(Mutex::new(None));
    let svc = {
        let server = server.clone();
        let upgrade = upgrade.clone();
        service_fn(move |req| {
            let resp = route(&server, req, peer, &upgrade);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    // A response must leave within the same limit a request head has to arrive in.
    let (stream, disarm) = super::stall::write_deadline(stream, server.opts.handshake_timeout);
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(server.opts.handshake_timeout)
        .max_buf_size(MAX_REQUEST_BUF)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut closing = false;
    let res = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = sd.recv(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    let pending = upgrade.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(e) = res {
        // The connection failed (a reset, the 101 not written): no upgrade can follow,
        // and an accepted one gives its panel slot back now, not after the timeout.
        log::debug!("http {peer}: {e}");
        return None;
    }
    let up = pending?;
    let upgraded = match tokio::time::timeout(server.opts.handshake_timeout, up.on_upgrade).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            log::debug!("panel {peer}: upgrade failed: {e}");
            return None;
        }
        Err(_) => {
            log::debug!("panel {peer}: upgrade timed out");
            return None;
        }
    };
    disarm.disarm();
    // The hello and the replies to the query are the panel's first op: they wait for a
    // grant of the input pool like any other.
    let wait = tokio::time::timeout(server.opts.handshake_timeout, server.input.acquire());
    let grant = tokio::select! {
        g = wait => g.map_err(|_| CloseCode::Again),
        _ = sd.recv() => Err(CloseCode::Away),
    };
    let grant = match grant {
        Ok(g) => g,
        Err(code) => return refuse_upgraded(server, upgraded, peer, code).await,
    };
    let ws = super::socket::split(
        TokioIo::new(upgraded),
        server.input.clone(),
        Some(grant),
        server.opts.grant_hold,
    );
    let accepted = Accepted {
        params: up.params,
        slot: up.slot,
    };
    Some((accepted, ws))
}

/// Close an upgraded connection before its session starts, with `code`: going away
/// (the server is shutting down) or try again later (no grant of the input pool came
/// within the handshake timeout; 1013 in the IANA registry of WebSocket close codes).
/// The close frame is the session's own ([`super::socket::Outbound::push_close`]),
/// written within `close_linger`.
async fn refuse_upgraded(
    server: &Server,
    upgraded: hyper::upgrade::Upgraded,
    peer: SocketAddr,
    code: CloseCode,
) -> Option<(Accepted, (session::Reader, session::Writer))> {
    if code == CloseCode::Again {
        log::info!(
            "panel {peer}: closed (1013, try again later): no grant of the input pool within {:?}",
            server.opts.handshake_timeout
        );
    }
    let mut out = super::socket::Outbound::new(TokioIo::new(upgraded));
    out.push_close(Some(code), "");
    let _ = tokio::time::timeout(server.opts.close_linger, out.flush()).await;
    None
}

fn route(
    server: &Arc<Server>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    upgrade: &Mutex<Option<Upgrade>>,
) -> Response<Body> {
    // Two Host lines (RFC 9112 §3.2: answer 400): a proxy may route by one and the
    // origin check would read the other.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return text(StatusCode::BAD_REQUEST, "more than one Host header\n");
    }
    // Every path, the page and /metrics included: DNS rebinding reads them too. A
    // request target in absolute form (`GET http://name/ HTTP/1.1`) names the host the
    // client meant as well (RFC 9112 §3.2.2): both must name this box.
    let policy = server.policy();
    let names = &policy.server_names;
    // A value that is not visible ASCII is malformed: "" says so.
    let host = (req.headers().get(header::HOST)).map(|v| v.to_str().unwrap_or(""));
    let refused = policy::host_refused(names, host).or_else(|| {
        let target = req.uri().authority()?;
        policy::host_refused(names, Some(target.as_str()))
    });
    if let Some(why) = refused {
        return reject(
            server,
            RejectReason::Host,
            StatusCode::MISDIRECTED_REQUEST,
            peer,
            why,
        );
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or a Host that is not
    // host[:port], MUST get 400. (With `server_names` set both got 421 above, like any
    // request that does not name this box.)
    let bad_host = match host {
        None if req.version() == hyper::Version::HTTP_11 => Some("a Host header is required"),
        None => None,
        Some(h) => super::origin::host_name(h)
            .is_none()
            .then_some("malformed Host header"),
    };
    if let Some(why) = bad_host {
        return reject(
            server,
            RejectReason::Host,
            StatusCode::BAD_REQUEST,
            peer,
            why.into(),
        );
    }
    let path = req.uri().path();
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    match path {
        "/v1/stream" => stream(server, &mut req, peer, upgrade),
        "/" | "/index.html" | "/page.js" | "/healthz" | "/metrics" | "/v1/last" if !read_only => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        "/" | "/index.html" => {
            let mut r = response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                super::fleet::page_html(PAGE_HTML, &server.settings.peer_gateways),
            );
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                super::fleet::page_csp(PAGE_CSP, &server.settings.peer_gateways),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/page.js" => {
            let mut r = response(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                Bytes::from_static(PAGE_JS.as_bytes()),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/healthz" => {
            let m = &server.metrics;
            let status = if m.healthy() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            response(status, "application/json", Bytes::from(m.health_json()))
        }
        "/v1/last" => last_values(server, &req, peer),
        "/metrics" => {
            if let Some(refused) = metrics_refused(server, req.headers(), peer) {
                return refused;
            }
            let m = &server.metrics;
            m.journal_events.set(server.journal.len() as u64);
            m.journal_bytes.set(server.journal.bytes() as u64);
            let last = server.journal.last_value_stats();
            m.last_values.set(last.topics as u64);
            m.last_values_bytes.set(last.outside_bytes as u64);
            m.last_values_evicted.set(last.evicted);
            m.panels_held_bytes.set(server.held.used() as u64);
            m.panels_input_grants.set(server.input.held() as u64);
            response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(m.render()),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn reject(
    server: &Server,
    reason: RejectReason,
    status: StatusCode,
    peer: SocketAddr,
    why: String,
) -> Response<Body> {
    server.metrics.panels_rejected.of(reason).inc();
    log::debug!("panel {peer}: refused ({status}): {why}");
    let mut r = text(status, why + "\n");
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// HTTP optional whitespace (RFC 9110 §5.6.3).
fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// The elements of a list-valued header (RFC 9110 §5.6.1): every line of it (a
/// recipient must treat repeated lines as one comma-separated list, RFC 9110 §5.3),
/// split at commas, optional whitespace trimmed, empty elements skipped.
fn list_elements(h: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    h.get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim_matches(is_ows))
        .filter(|t| !t.is_empty())
}

/// Does a list-valued header contain `token` (tokens are case-insensitive)?
fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    list_elements(h, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The request's `Origin` header lines (a line that is not text never matches).
fn origin_lines(h: &HeaderMap) -> Vec<&str> {
    h.get_all(header::ORIGIN)
        .into_iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .filter(|v| !v.trim_matches(is_ows).is_empty())
        .collect()
}

/// The token of the first `Authorization: Bearer` credential (RFC 9110 §11.4: the
/// scheme is case-insensitive, then one or more spaces; RFC 6750 §2.1).
fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get_all(header::AUTHORIZATION)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (scheme, token) = v.trim_matches(is_ows).split_once(is_ows)?;
            let token = token.trim_matches(is_ows);
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        })
}

/// The filters a token allows (`None`: no tokens configured, all allowed).
type Allowed = Option<std::sync::Arc<[crate::routing::Filter]>>;

/// What a request was admitted with: the filters its token allows, and what a reload
/// checks again ([`Admission`]).
struct Admitted {
    query: StreamQuery,
    allow: Allowed,
    admission: Admission,
}

/// The token presented — `token=`, `Authorization: Bearer`, or a subprotocol entry
/// `asbgw.token.<base64url>`, first found in that order — checked against
/// `panels.tokens`: the filters it allows (`None`: no tokens configured, all allowed),
/// or the 401 response.
fn authorize(
    server: &Server,
    policy: &PanelPolicy,
    h: &HeaderMap,
    query: &StreamQuery,
    peer: SocketAddr,
) -> Result<(Allowed, Option<String>), Box<Response<Body>>> {
    let from_entry =
        list_elements(h, header::SEC_WEBSOCKET_PROTOCOL).find_map(protocol::token_from_entry);
    let presented = query
        .token
        .as_ref()
        .map(crate::config::Secret::expose)
        .or_else(|| bearer(h))
        .or(from_entry.as_deref());
    let tokens = &policy.tokens;
    match protocol::authorize(tokens, presented) {
        Access::Open => Ok((None, presented.map(String::from))),
        Access::Token(i) => Ok((Some(tokens[i].allow.clone()), presented.map(String::from))),
        Access::Denied => Err(Box::new(unauthorized(
            server,
            peer,
            presented.is_some(),
            STREAM_TOKEN_HOWTO,
        ))),
    }
}

/// How the stream and `/v1/last` take a token.
const STREAM_TOKEN_HOWTO: &str =
    "a token is required (token=, Authorization: Bearer, or subprotocol asbgw.token.<base64url>)";
/// How `/metrics` takes its token (Prometheus `bearer_token`).
const METRICS_TOKEN_HOWTO: &str = "a token is required (Authorization: Bearer)";

/// `401` for a missing (`presented` false: the reply says `howto`) or wrong token; a
/// wrong one counts towards blocking the address ([`super::throttle`]).
fn unauthorized(
    server: &Server,
    peer: SocketAddr,
    presented: bool,
    howto: &'static str,
) -> Response<Body> {
    let why = if presented {
        server.metrics.panels_auth_failures.inc();
        if server.throttle.failed(peer.ip(), Instant::now()) {
            log::warn!(
                "panel port: {} blocked for {} s after {} failed authentications",
                peer.ip(),
                super::throttle::COOLING.as_secs(),
                super::throttle::FAILURES
            );
        }
        "unknown token"
    } else {
        howto
    };
    reject(
        server,
        RejectReason::Unauthorized,
        StatusCode::UNAUTHORIZED,
        peer,
        why.into(),
    )
}

/// `429` with `Retry-After` while `peer`'s address is blocked for failed
/// authentications.
fn throttled(server: &Server, peer: SocketAddr) -> Option<Response<Body>> {
    let left = server.throttle.blocked(peer.ip(), Instant::now())?;
    server.metrics.panels_throttled.inc();
    log::debug!("panel {peer}: throttled for {} s more", left.as_secs());
    let mut r = text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many failed authentications from this address; try later\n",
    );
    let secs = left.as_secs().max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&secs) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(r)
}

/// `GET /metrics` with `panels.metrics_token`: `Authorization: Bearer` (Prometheus
/// `bearer_token`) must carry it.
fn metrics_refused(server: &Server, h: &HeaderMap, peer: SocketAddr) -> Option<Response<Body>> {
    let expected = server.policy().metrics_token?;
    let expected = &expected.0;
    if let Some(r) = throttled(server, peer) {
        return Some(r);
    }
    match bearer(h) {
        Some(t) if protocol::token_matches(expected, t) => None,
        presented => {
            let mut r = unauthorized(server, peer, presented.is_some(), METRICS_TOKEN_HOWTO);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }
}

/// The checks `/v1/stream` and `/v1/last` share, in order: the size of the `Origin`
/// lines and `Host` a panel would keep (431), the `Origin` (403), the query (400), the
/// address not blocked for failed logins (429), the token (401).
/// Returns the query and the filters the token allows (`None`: open).
fn admit(
    server: &Server,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Admitted, Box<Response<Body>>> {
    let h = req.headers();
    let policy = server.policy();
    let origin = origin_lines(h);
    let host = header_str(h, header::HOST);
    // A panel keeps these to check them again after a reload: a fixed room of its own.
    let kept = Admission::kept_bytes(&origin, host);
    if kept > budget::PANEL_ADMISSION {
        return Err(Box::new(reject(
            server,
            RejectReason::BadRequest,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            peer,
            format!(
                "Origin and Host headers of {kept} bytes; at most {} are kept for a panel",
                budget::PANEL_ADMISSION
            ),
        )));
    }
    if let Some(origin) = policy::origin_refused(&policy, &origin, host) {
        let origin = crate::redact::peer_text(origin);
        return Err(Box::new(reject(
            server,
            RejectReason::Origin,
            StatusCode::FORBIDDEN,
            peer,
            format!(
                "origin {origin} is not in panels.allowed_origins (the page's own origin \
                 counts only when it is an IP address, localhost or a name in \
                 panels.server_names)"
            ),
        )));
    }
    let query = StreamQuery::parse(req.uri().query()).map_err(|e| {
        Box::new(reject(
            server,
            RejectReason::BadRequest,
            StatusCode::BAD_REQUEST,
            peer,
            e.to_string(),
        ))
    })?;
    if let Some(r) = throttled(server, peer) {
        return Err(Box::new(r));
    }
    let (allow, token) = authorize(server, &policy, h, &query, peer)?;
    let admission = Admission::new(token.as_deref(), &origin, host);
    Ok(Admitted {
        query,
        allow,
        admission,
    })
}

/// How far `GET /v1/last` has written its array.
#[derive(Debug, Clone, Copy)]
struct LastListing {
    /// Seq of the last entry written (entries after it are next).
    after: u64,
    opened: bool,
    wrote_any: bool,
    closed: bool,
}

/// `GET /v1/last?filter=F…`: the newest event of each topic that matches the filters
/// (default: all the token allows) as a JSON array of event objects flagged
/// `"last":true`, in seq order — the same objects `last=true` sends on the stream, under
/// the same token and origin rules. A filter the token does not allow is refused (403).
/// The body is streamed in chunks of about [`LAST_CHUNK`] bytes.
fn last_values(server: &Arc<Server>, req: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let Admitted { query, allow, .. } = match admit(server, req, peer) {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    if let Some(f) = query
        .filters
        .iter()
        .find(|f| !protocol::allowed(f, allow.as_deref()))
    {
        return reject(
            server,
            RejectReason::Forbidden,
            StatusCode::FORBIDDEN,
            peer,
            format!("filter {:?} is not allowed for this token", f.as_str()),
        );
    }
    let filters = if !query.filters.is_empty() {
        query.filters
    } else {
        allow.map_or_else(
            || vec![crate::routing::Filter::parse("#").expect("'#' is a filter")],
            |a| a.to_vec(),
        )
    };
    let journal = server.journal.clone();
    let upto = journal.latest();
    let start = LastListing {
        after: 0,
        opened: false,
        wrote_any: false,
        closed: false,
    };
    let chunks = futures_util::stream::unfold(start, move |mut at| {
        let journal = journal.clone();
        let filters = filters.clone();
        async move {
            if at.closed {
                return None;
            }
            let data =
                |chunk: String| Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(chunk)));
            let mut chunk = String::new();
            if !at.opened {
                chunk.push('[');
                at.opened = true;
            }
            let mut page = Vec::new();
            let mut in_chunk = 0;
            loop {
                page.clear();
                journal.last_values_page(
                    at.after,
                    upto,
                    |t| filters.iter().any(|f| f.matches(t)),
                    &mut page,
                    64,
                );
                if page.is_empty() {
                    chunk.push(']');
                    at.closed = true;
                    return Some((data(chunk), at));
                }
                for ev in &page {
                    let json = ev.last_json();
                    if in_chunk > 0 && chunk.len() + json.len() > LAST_CHUNK {
                        return Some((data(chunk), at));
                    }
                    if at.wrote_any {
                        chunk.push(',');
                    }
                    chunk.push_str(&json);
                    at.wrote_any = true;
                    at.after = ev.seq;
                    in_chunk += 1;
                }
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /v1/stream`: check everything, reserve a panel slot, answer 101.
fn stream(
    server: &Arc<Server>,
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    upgrade: &Mutex<Option<Upgrade>>,
) -> Response<Body> {
    let h = req.headers();
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let is_ws =
        has_token(h, header::UPGRADE, "websocket") && has_token(h, header::CONNECTION, "upgrade");
    let key = h.get(header::SEC_WEBSOCKET_KEY);
    if !is_ws || key.is_none() || req.version() != hyper::Version::HTTP_11 {
        return reject(
            server,
            RejectReason::BadRequest,
            StatusCode::BAD_REQUEST,
            peer,
            "expected a WebSocket upgrade over HTTP/1.1 (panel protocol v1: docs/panels.md)".into(),
        );
    }
    // RFC 6455 §4.2.1: one key, the base64 of 16 bytes.
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key_ok = keys.next().is_some_and(|k| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .is_ok_and(|b| b.len() == 16)
    }) && keys.next().is_none();
    if !key_ok {
        return reject(
            server,
            RejectReason::BadRequest,
            StatusCode::BAD_REQUEST,
            peer,
            "Sec-WebSocket-Key must be one base64-encoded 16-byte value (RFC 6455 §4.2.1)".into(),
        );
    }
    if !has_token(h, header::SEC_WEBSOCKET_VERSION, "13") {
        let mut r = reject(
            server,
            RejectReason::BadRequest,
            StatusCode::UPGRADE_REQUIRED,
            peer,
            "WebSocket version 13 required".into(),
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Admitted {
        query,
        allow,
        admission,
    } = match admit(server, req, peer) {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    // Token entries are credentials, not protocols: never chosen, never echoed.
    let offered = h.contains_key(header::SEC_WEBSOCKET_PROTOCOL).then(|| {
        list_elements(h, header::SEC_WEBSOCKET_PROTOCOL)
            .filter(|p| !protocol::is_token_entry(p))
            .collect::<Vec<&str>>()
    });
    // Echo the client's own spelling of the chosen subprotocol: a client must fail
    // the connection when the echo is not one of the values it sent (RFC 6455 §4.1).
    let chosen = match protocol::choose_subprotocol(offered.as_deref()) {
        Ok(c) => c.map(|(enc, spelled)| {
            let echo = HeaderValue::from_str(spelled)
                .unwrap_or_else(|_| HeaderValue::from_static(enc.subprotocol()));
            (enc, echo)
        }),
        Err(e) => {
            return reject(
                server,
                RejectReason::BadRequest,
                StatusCode::BAD_REQUEST,
                peer,
                e.to_string(),
            );
        }
    };
    let Some(slot) = server.reserve_panel() else {
        return reject(
            server,
            RejectReason::Full,
            StatusCode::SERVICE_UNAVAILABLE,
            peer,
            format!(
                "panel limit reached ({} panels)",
                server.policy().max_panels
            ),
        );
    };
    let accept = derive_accept_key(key.map(|k| k.as_bytes()).unwrap_or_default());
    let params = Params {
        encoding: chosen.as_ref().map_or(Encoding::Json, |(enc, _)| *enc),
        filters: query.filters,
        since: query.since,
        last: query.last,
        allow,
        admission,
        peer,
    };
    let on_upgrade = hyper::upgrade::on(req);
    *upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(Upgrade {
        on_upgrade,
        params,
        slot,
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some((_, echo)) = chosen {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, echo);
    }
    r
}
