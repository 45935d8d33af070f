//! A small ASB publisher over real AMQP 1.0, for tests, the demo generator and the
//! benchmarks: SASL ANONYMOUS, then a CBS `put-token` with a SAS token signed from the
//! connection string's key (as the ASB SDKs do), then a sender link to the topic.
//! Only `UseDevelopmentEmulator=true` connection strings (plain AMQP) are supported.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Message, Properties, SerializableBody,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Timestamp};
use fe2o3_amqp::{Connection, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;

use crate::config::{ConnStrError, ConnectionString, Credential};

/// Lifetime of the tokens the publisher signs.
const TOKEN_TTL_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    ConnectionString(#[from] ConnStrError),
    #[error("the publisher only speaks plain AMQP: use UseDevelopmentEmulator=true")]
    TlsUnsupported,
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("CBS put-token refused: {0}")]
    Token(String),
    #[error("cannot attach a sender to {entity}: {reason}")]
    Attach { entity: String, reason: String },
    #[error("send failed: {0}")]
    Send(String),
    #[error("the broker did not accept the message: {0}")]
    NotAccepted(String),
}

/// Build the CBS put-token request for `audience` from a connection string's
/// credential: a signed SAS token for key credentials, the given signature otherwise.
pub fn token_for(credential: &Credential, audience: &str, ttl_secs: u64) -> (String, u64) {
    match credential {
        Credential::Key { name, key } => {
            let expiry = crate::sas::now_unix() + ttl_secs;
            (
                crate::sas::sas_token(audience, name, key.expose(), expiry),
                expiry,
            )
        }
        Credential::Signature(sig) => {
            let expiry = sig
                .expose()
                .split('&')
                .find_map(|p| p.strip_prefix("se="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (sig.expose().to_string(), expiry)
        }
        // No key to sign with: an empty token, which the broker refuses.
        Credential::None => (String::new(), 0),
    }
}

/// Bound on [`Publisher::connect`] as a whole.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A sender to one topic (or queue) on the emulator (or any plain-AMQP ASB endpoint).
pub struct Publisher {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    sender: Sender,
    next_id: u64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connect, authorise with CBS and attach a sender to `topic`.
    ///
    /// Errors: the connection string, the connection, the put-token or the attach; a
    /// peer that has not finished all of them within [`CONNECT_TIMEOUT`] is a
    /// [`ClientError::Connect`] naming the timeout, never a wait without end.
    pub async fn connect(conn_str: &str, topic: &str) -> Result<Self, ClientError> {
        let cs = ConnectionString::parse(conn_str)?;
        let addr = format!("{}:{}", cs.host, cs.port);
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_to(cs, topic))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Connect {
                    addr,
                    reason: format!(
                        "no answer within {} s (connect, put-token and attach)",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                })
            })
    }

    async fn connect_to(cs: ConnectionString, topic: &str) -> Result<Self, ClientError> {
        if cs.tls {
            return Err(ClientError::TlsUnsupported);
        }
        let addr = format!("{}:{}", cs.host, cs.port);
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.clone(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut connection = Connection::builder()
            .container_id(format!("asbgw-publisher-{}", fastrand::u64(..)))
            .hostname(cs.host.as_str())
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
            .open_with_stream(stream)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| connect_err(e.to_string()))?;

        let audience = format!("sb://{}/{}", cs.host, topic);
        let (token, expiry) = token_for(&cs.credential, &audience, TOKEN_TTL_SECS);
        let mut cbs = CbsClient::attach(&mut session)
            .await
            .map_err(|e| ClientError::Token(e.to_string()))?;
        let expires = Timestamp::from_milliseconds((expiry as i64).saturating_mul(1000));
        cbs.put_token(
            audience.as_str(),
            CbsToken::new(token, "servicebus.windows.net:sastoken", Some(expires)),
        )
        .await
        .map_err(|e| ClientError::Token(e.to_string()))?;
        let _ = cbs.close().await;

        let sender = Sender::attach(
            &mut session,
            format!("publisher-{topic}-{}", fastrand::u32(..)),
            topic,
        )
        .await
        .map_err(|e| ClientError::Attach {
            entity: topic.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Publisher {
            connection,
            session,
            sender,
            next_id: 0,
        })
    }

    /// Send one message and wait until the broker accepts it.
    pub async fn send<T: SerializableBody>(&mut self, msg: Message<T>) -> Result<(), ClientError> {
        let outcome = self
            .sender
            .send(msg)
            .await
            .map_err(|e| ClientError::Send(e.to_string()))?;
        outcome
            .accepted_or_else(|o| format!("{o:?}"))
            .map(|_| ())
            .map_err(ClientError::NotAccepted)
    }

    /// Send a message with a Data body, a subject, a content type, application
    /// properties and a fresh message-id; waits until the broker accepts it.
    pub async fn send_json(
        &mut self,
        subject: &str,
        app_props: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
        content_type: &str,
    ) -> Result<(), ClientError> {
        self.next_id += 1;
        let mut props = ApplicationProperties::builder();
        for (k, v) in app_props {
            props = props.insert(k.to_string(), SimpleValue::String(v.to_string()));
        }
        let msg = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(format!("{:016x}-{}", fastrand::u64(..), self.next_id))
                    .subject(subject.to_string())
                    .content_type(content_type)
                    .build(),
            )
            .application_properties(props.build())
            .data(Data(Binary::from(body.into())))
            .build();
        self.send(msg).await
    }

    /// Detach and close the connection cleanly.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let _ = self.sender.close().await;
        let _ = self.session.end().await;
        self.connection
            .close()
            .await
            .map_err(|e| ClientError::Send(e.to_string()))
    }
}
