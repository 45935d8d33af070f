//! A raw AMQP 1.0 client of the emulator (fe2o3): a connection and session, with the
//! CBS put-token ASB wants before any link. For tests and benches that speak AMQP to the
//! emulator directly instead of through the gateway.

use std::time::Duration;

use asb_gateway::emulator::{DEFAULT_KEY, DEFAULT_KEY_NAME, EmulatorHandle};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Timestamp;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Delivery, Receiver, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;

/// Bound on each step (connect, open, begin, attach, put-token).
pub const STEP: Duration = Duration::from_secs(10);

/// `f`, or a panic naming `what` after [`STEP`].
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub struct Client {
    pub conn: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
}

/// Open a connection with `profile` (no token yet) and begin a session.
pub async fn connect_with(h: &EmulatorHandle, profile: SaslProfile, container: &str) -> Client {
    let stream = within("connect", tokio::net::TcpStream::connect(h.addr()))
        .await
        .unwrap();
    let mut conn = within(
        "open",
        Connection::builder()
            .container_id(container)
            .sasl_profile(profile)
            .open_with_stream(stream),
    )
    .await
    .unwrap();
    let session = within("begin", Session::begin(&mut conn)).await.unwrap();
    Client { conn, session }
}

/// Put a namespace-wide SAS token signed with `key` (valid `ttl` seconds) on `$cbs`;
/// the error is the emulator's refusal, rendered.
pub async fn put_token(
    c: &mut Client,
    h: &EmulatorHandle,
    key: &str,
    ttl: u64,
) -> Result<(), String> {
    let audience = format!("sb://{}/", h.addr());
    let expiry = asb_gateway::sas::now_unix() + ttl;
    let token = asb_gateway::sas::sas_token(&audience, DEFAULT_KEY_NAME, key, expiry);
    let mut cbs = within("cbs attach", CbsClient::attach(&mut c.session))
        .await
        .unwrap();
    let r = within(
        "put-token",
        cbs.put_token(
            audience.as_str(),
            CbsToken::new(
                token,
                "jwt",
                Some(Timestamp::from_milliseconds(expiry as i64 * 1000)),
            ),
        ),
    )
    .await
    .map_err(|e| format!("{e:?}"));
    let _ = cbs.close().await;
    r
}

/// SASL ANONYMOUS, then a token signed with `key`: the client and the put-token result.
pub async fn connect_authorized(h: &EmulatorHandle, key: &str) -> (Client, Result<(), String>) {
    let mut c = connect_with(h, SaslProfile::Anonymous, "test-client").await;
    let r = put_token(&mut c, h, key, 3600).await;
    (c, r)
}

/// SASL ANONYMOUS and a token with the emulator's default key, which must be accepted.
pub async fn connect(h: &EmulatorHandle, container: &str) -> Client {
    let mut c = connect_with(h, SaslProfile::Anonymous, container).await;
    put_token(&mut c, h, DEFAULT_KEY, 3600)
        .await
        .expect("the emulator accepts its own key");
    c
}

/// The next delivery on `r`, within [`STEP`].
pub async fn recv(r: &mut Receiver) -> Delivery<Body<Value>> {
    within("recv", r.recv::<Body<Value>>()).await.unwrap()
}

/// The header's delivery-count (0 when there is no header, AMQP 1.0 §3.2.1).
pub fn delivery_count(d: &Delivery<Body<Value>>) -> u32 {
    d.message()
        .header
        .as_ref()
        .map(|h| h.delivery_count)
        .unwrap_or(0)
}
