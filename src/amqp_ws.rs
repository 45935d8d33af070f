//! AMQP 1.0 over WebSockets, as Azure Service Bus serves it: `wss://HOST:443/$servicebus/
//! websocket` with the subprotocol `AMQPWSB10` (the OASIS AMQP WebSocket Binding,
//! working draft 1.0, which the Azure SDKs use). AMQP frames travel as the payload of
//! binary WebSocket messages (RFC 6455 §5.6); message boundaries mean nothing, the
//! bytes are one stream. [`BinaryStream`] turns a tokio-tungstenite WebSocket into that
//! byte stream (`AsyncRead + AsyncWrite`) for fe2o3-amqp's connection and acceptor.
//!
//! The source connects with [`client`]; the emulator serves with [`accept`], which
//! takes `AMQPWSB10` or the binding's later name `amqp`.
//!
//! Why not the `fe2o3-amqp-ws` crate: its 0.18 client always asks for the subprotocol
//! `amqp` and refuses a server that answers anything else, and it has no server side;
//! this adapter is the part of it we need (the WebSocket protocol itself is
//! tokio-tungstenite's, already in the binary for the panels).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// The subprotocol Azure Service Bus and its SDKs use.
pub const SUBPROTOCOL: &str = "AMQPWSB10";
/// The subprotocol name of the final OASIS binding, also accepted by [`accept`].
pub const SUBPROTOCOL_OASIS: &str = "amqp";
/// The path Azure Service Bus serves AMQP over WebSockets on.
pub const PATH: &str = "/$servicebus/websocket";

/// Largest WebSocket message accepted, bytes: an AMQP frame is at most the negotiated
/// max-frame-size (the emulator's 64 KiB; ASB's 256 KiB), and a peer may put several
/// in one message.
const MAX_MESSAGE: usize = 1 << 20;

/// Why the WebSocket handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The server answered the upgrade request with something other than 101.
    #[error("the WebSocket upgrade was refused: HTTP {0}")]
    Refused(u16),
    /// The server chose no subprotocol or another one than `AMQPWSB10`.
    #[error(
        "the server did not accept the AMQP WebSocket subprotocol {SUBPROTOCOL} (it answered {0:?})"
    )]
    Subprotocol(String),
    /// The handshake failed otherwise (I/O, bad response).
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
}

/// Sizes for both sides: messages up to [`MAX_MESSAGE`], writes passed on at once (fe2o3
/// writes whole frames and flushes), and a write buffer bounded at twice a message (a
/// peer that stops reading makes writes wait, then fail, never grow it).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_MESSAGE)
}

/// The WebSocket client handshake over `stream` (plain TCP, a proxy tunnel, or TLS) for
/// `url` (`ws[s]://host[:port]/$servicebus/websocket`), asking for `AMQPWSB10`.
///
/// Errors: [`WsError`]; the server must answer 101 with that subprotocol.
pub async fn client<S>(url: &str, stream: S) -> Result<BinaryStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request: Request = tungstenite::client::IntoClientRequest::into_client_request(url)
        .map_err(|e| WsError::Handshake(e.to_string()))?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(r) => WsError::Refused(r.status().as_u16()),
                other => WsError::Handshake(other.to_string()),
            })?;
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if !chosen.eq_ignore_ascii_case(SUBPROTOCOL) {
        return Err(WsError::Subprotocol(chosen));
    }
    Ok(BinaryStream::new(ws))
}

/// The WebSocket server handshake over `stream`: the request must be for [`PATH`] and
/// offer `AMQPWSB10` or `amqp` (answered with the one offered first); otherwise 404 or
/// 400 and an error.
#[allow(
    clippy::result_large_err,
    reason = "the callback's type is tungstenite's server Callback"
)]
pub async fn accept<S>(stream: S) -> Result<BinaryStream<S>, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_string()));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != PATH {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "AMQP is served on /$servicebus/websocket",
            ));
        }
        let offered = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| {
                p.eq_ignore_ascii_case(SUBPROTOCOL) || p.eq_ignore_ascii_case(SUBPROTOCOL_OASIS)
            })
            .map(str::to_string);
        match offered.and_then(|p| HeaderValue::from_str(&p).ok()) {
            Some(p) => {
                resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, p);
                Ok(resp)
            }
            None => Err(refuse(
                StatusCode::BAD_REQUEST,
                "the subprotocol AMQPWSB10 (or amqp) is required",
            )),
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config()))
        .await?;
    Ok(BinaryStream::new(ws))
}

/// A WebSocket as a byte stream: reads return the payload of binary messages in order
/// (text messages are a protocol error, a close is the end of the stream); each write
/// is sent as one binary message. Pings are answered by tungstenite.
pub struct BinaryStream<S> {
    ws: WebSocketStream<S>,
    /// The rest of the binary message being read.
    pending: Bytes,
}

impl<S> std::fmt::Debug for BinaryStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryStream")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<S> BinaryStream<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        BinaryStream {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for BinaryStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message on an AMQP connection",
                    )));
                }
                // A close or the end of the stream: end of file.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for BinaryStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(to_io)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_in_both_directions_and_close_is_end_of_file() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = accept(s).await.unwrap();
            let mut got = vec![0u8; 10];
            ws.read_exact(&mut got).await.unwrap();
            ws.write_all(b"pong").await.unwrap();
            ws.flush().await.unwrap();
            ws.shutdown().await.unwrap();
            got
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let url = format!("ws://{addr}{PATH}");
        let mut c = client(&url, tcp).await.unwrap();
        // Two writes, read as one stream of 10 bytes.
        c.write_all(b"AMQP\x00").await.unwrap();
        c.write_all(b"\x01\x00\x00xx").await.unwrap();
        c.flush().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(server.await.unwrap(), b"AMQP\x00\x01\x00\x00xx");
    }

    #[tokio::test]
    async fn a_wrong_path_or_no_subprotocol_is_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = accept(s).await;
                });
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let e = client(&format!("ws://{addr}/other"), tcp)
            .await
            .unwrap_err();
        assert!(matches!(e, WsError::Refused(404)), "{e}");
        // A plain WebSocket request without the subprotocol.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let e = tokio_tungstenite::client_async(format!("ws://{addr}{PATH}"), tcp)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, tungstenite::Error::Http(r) if r.status() == 400),
            "{e}"
        );
    }
}
