//! The AMQP side of the emulator, one file per role:
//! - [`connection`]: a TCP connection — SASL (ANONYMOUS, PLAIN), open, sessions, and the
//!   close when the connection's latest token expires;
//! - [`link`]: links on a session — attach (routing by address and refusing as ASB
//!   does), sender links to topics and queues (transfer, disposition), receiver links on
//!   subscriptions, queues and dead-letter queues (peek-lock, credit respected exactly);
//! - [`cbs`]: the `$cbs` node (`put-token`);
//! - [`management`]: each queue's and subscription's `$management` node
//!   (`com.microsoft:renew-lock`);
//! - [`reply`]: the reply links the two request/response nodes answer on.
//!
//! This file holds what they share: the state of one connection ([`ConnShared`]) and
//! how links are refused.

mod cbs;
mod connection;
mod link;
mod management;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition};
use tokio::sync::watch;

use super::tap::{FlowMap, Kill};

pub use connection::{serve, serve_stream};

/// A byte stream the broker can serve (TCP, TLS, a WebSocket's).
pub trait Io:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static
{
}
impl<T> Io for T where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static
{
}

/// What one connection knows: its authorisation and its controls.
#[derive(Debug)]
pub struct ConnShared {
    /// Authenticated with SASL PLAIN and the key: namespace-wide access, no tokens.
    plain: AtomicBool,
    /// (scope path, expiry unix secs) of the tokens put on this connection.
    tokens: Mutex<Vec<(String, u64)>>,
    /// The latest token expiry (None: no token yet).
    expiry: watch::Sender<Option<u64>>,
    pub kill: Arc<Kill>,
    detach: watch::Sender<u64>,
    flows: Arc<FlowMap>,
    /// Reply links of the `$cbs` node, by the client's reply address.
    cbs_replies: Mutex<reply::ReplyMap>,
    /// Reply links of `$management` nodes, by the client's reply address.
    mgmt_replies: Mutex<reply::ReplyMap>,
    /// `host:port` the client connected to, for entity URIs in error descriptions.
    endpoint: String,
}

impl ConnShared {
    fn new(endpoint: String) -> Self {
        ConnShared {
            plain: AtomicBool::new(false),
            tokens: Mutex::new(Vec::new()),
            expiry: watch::channel(None).0,
            kill: Arc::new(Kill::default()),
            detach: watch::channel(0).0,
            flows: Arc::new(FlowMap::default()),
            cbs_replies: Mutex::new(HashMap::new()),
            mgmt_replies: Mutex::new(HashMap::new()),
            endpoint,
        }
    }

    /// Is `path` (lowercase) covered by a PLAIN login or a live token?
    fn authorized(&self, path: &str) -> bool {
        if self.plain.load(Ordering::Acquire) {
            return true;
        }
        let now = crate::sas::now_unix();
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(scope, exp)| {
                *exp > now
                    && (scope.is_empty()
                        || path == scope
                        || path
                            .strip_prefix(scope.as_str())
                            .is_some_and(|r| r.starts_with('/')))
            })
    }

    fn add_token(&self, scope: String, expiry: u64) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|(s, _)| *s != scope);
        t.push((scope, expiry));
        let latest = t.iter().map(|(_, e)| *e).max();
        self.expiry.send_replace(latest);
    }

    /// Treat every token of this connection as expired now.
    pub fn expire_tokens(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if self.plain.load(Ordering::Acquire) && t.is_empty() {
            return;
        }
        t.clear();
        self.expiry.send_replace(Some(0));
    }

    /// Detach every receiver link of this connection with an error.
    pub fn detach_links(&self) {
        self.detach.send_modify(|g| *g += 1);
    }
}

/// `amqps://host:port/a/b`, `sb://host/a/b`, `/a/b`, `a/b` → `a/b`.
pub fn normalize_address(a: &str) -> String {
    let a = a.trim();
    let rest = match a.find("://") {
        Some(i) => {
            let after = &a[i + 3..];
            after.find('/').map(|j| &after[j + 1..]).unwrap_or("")
        }
        None => a,
    };
    rest.trim_matches('/').to_string()
}

fn error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

/// ASB's answer to a link on an entity that does not exist.
fn not_found(conn: &ConnShared, path: &str) -> definitions::Error {
    error(
        AmqpError::NotFound,
        format!(
            "The messaging entity 'sb://{}/{path}' could not be found. To know more visit https://aka.ms/sbResourceMgrExceptions.",
            conn.endpoint
        ),
    )
}

/// Complete the attach, then detach the link at once with `err` (as ASB refuses links).
fn refuse(link: LinkEndpoint, path: &str, err: definitions::Error) {
    log::info!(
        "emulator: link to '{path}' refused: {}",
        err.description.as_deref().unwrap_or("")
    );
    tokio::spawn(async move {
        let _ = match link {
            LinkEndpoint::Sender(s) => s.close_with_error(err).await,
            LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
        };
    });
}
