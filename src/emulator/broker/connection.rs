//! One AMQP connection: SASL (ANONYMOUS, then CBS; or PLAIN with the key name and key),
//! the open, its sessions (each served by [`super::link::serve_session`]) and the close
//! with `amqp:unauthorized-access` when the connection's latest token expires.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{ConnectionAcceptor, SaslAcceptor, SessionAcceptor};
use fe2o3_amqp::types::definitions::AmqpError;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{ConnShared, error, link};
use crate::emulator::Shared;
use crate::emulator::tap::TapStream;

/// SASL: ANONYMOUS (then CBS) or PLAIN with the key name and key.
#[derive(Clone)]
struct Auth {
    key_name: Arc<str>,
    key: Arc<str>,
    conn: Arc<ConnShared>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .finish()
    }
}

impl SaslAcceptor for Auth {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            "ANONYMOUS" => SaslCode::Ok,
            "PLAIN" => {
                let resp = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                let mut parts = resp.split(|b| *b == 0);
                let _authzid = parts.next();
                let user = parts.next().unwrap_or_default();
                let pass = parts.next().unwrap_or_default();
                if user == self.key_name.as_bytes() && pass == self.key.as_bytes() {
                    self.conn.plain.store(true, Ordering::Release);
                    SaslCode::Ok
                } else {
                    log::info!("emulator: SASL PLAIN refused (wrong key name or key)");
                    SaslCode::Auth
                }
            }
            other => {
                log::info!("emulator: SASL mechanism {other} refused");
                SaslCode::Auth
            }
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

/// Serve one TCP connection until it closes.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let endpoint = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "localhost".into());
    serve_stream(stream, peer, endpoint, shared).await;
}

/// Serve one connection on any byte stream (a WebSocket's, in TLS or not) until it
/// closes; `peer` names the client in the log, `endpoint` is the address it reached.
pub async fn serve_stream<S>(stream: S, peer: String, endpoint: String, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let conn = Arc::new(ConnShared::new(endpoint));
    let id = shared.register_conn(conn.clone());
    let tap = TapStream::new(stream, conn.flows.clone(), conn.kill.clone())
        .counting_dispositions(shared.dispositions.clone());
    let acceptor = ConnectionAcceptor::builder()
        .container_id("asb-emulator")
        .max_frame_size(65_536)
        .sasl_acceptor(Auth {
            key_name: shared.key_name.clone(),
            key: shared.key.clone(),
            conn: conn.clone(),
        })
        .build();
    let opened = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tap)) => r,
        _ = conn.kill.killed() => { shared.unregister_conn(id); return; }
    };
    let mut connection = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::info!("emulator: connection from {peer} refused: {e}");
            shared.unregister_conn(id);
            return;
        }
        Err(_) => {
            log::info!("emulator: connection from {peer} timed out while opening");
            shared.unregister_conn(id);
            return;
        }
    };
    log::debug!("emulator: connection {id} from {peer} open");
    let mut expiry_rx = conn.expiry.subscribe();
    loop {
        let deadline = (*expiry_rx.borrow_and_update()).map(|exp| {
            let now = crate::sas::now_unix();
            tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(now))
        });
        tokio::select! {
            _ = conn.kill.killed() => break,
            r = expiry_rx.changed() => { if r.is_err() { break; } }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                log::info!("emulator: connection {id}: token expired, closing");
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    connection.close_with_error(error(AmqpError::UnauthorizedAccess, "The token has expired.")),
                ).await;
                break;
            }
            s = connection.next_incoming_session() => {
                let Some(incoming) = s else {
                    // The client closed (or the engine stopped): let the engine finish
                    // its answering close frame before the stream is killed below, or
                    // the client sees the end of the stream before it (IllegalState).
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close()).await;
                    break;
                };
                let channel = incoming.channel;
                match SessionAcceptor::new().accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        tokio::spawn(link::serve_session(session, channel, shared.clone(), conn.clone()));
                    }
                    Err(e) => log::info!("emulator: session refused: {e}"),
                }
            }
        }
    }
    // Dropping the handle stops the engine; a killed stream makes it stop at once.
    drop(connection);
    conn.kill.kill();
    shared.unregister_conn(id);
    log::debug!("emulator: connection {id} closed");
}
