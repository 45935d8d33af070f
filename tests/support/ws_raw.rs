//! WebSocket by hand, over a raw TCP connection: upgrade requests as written, masked
//! client frames, server frames parsed from bytes. For the tests a WebSocket library would
//! not let through (bad frames, silent peers, exact handshake bytes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// The RFC 6455 sample key, and the accept value the server must answer it with.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Upgrade a raw TCP connection to `/v1/stream`; returns it after the 101 head (with the
/// RFC 6455 accept key).
pub async fn upgrade(addr: SocketAddr) -> TcpStream {
    upgrade_stream(TcpStream::connect(addr).await.unwrap(), addr).await
}

/// [`upgrade`] on a connection made by the caller (e.g. with a small receive buffer).
pub async fn upgrade_stream(mut s: TcpStream, addr: SocketAddr) -> TcpStream {
    let req = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(T, s.read_exact(&mut b))
            .await
            .expect("upgrade response timed out")
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains(ACCEPT), "RFC 6455 accept key: {head}");
    s
}

/// Send an upgrade request to `/v1/stream{query}` with `extra` header lines (each ending
/// in CRLF); everything the server sent until it closed (or 2 s).
pub async fn upgrade_response(addr: SocketAddr, extra: &str, query: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/stream{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Unmasked server frames (opcode, payload) from raw bytes; an incomplete tail is ignored.
pub fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        if b.len() < 2 {
            return out;
        }
        let op = b[0] & 0x0f;
        let (len, hdr) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return out,
            n => (n as usize, 2),
        };
        if b.len() < hdr + len {
            return out;
        }
        out.push((op, b[hdr..hdr + len].to_vec()));
        b = &b[hdr + len..];
    }
}

/// Read until the server closes the TCP connection (bounded); the frames it sent.
pub async fn read_all(s: &mut TcpStream, limit: Duration) -> (Vec<(u8, Vec<u8>)>, Duration) {
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
    (server_frames(&buf), t0.elapsed())
}

/// The code of the first close frame.
pub fn close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .find(|f| f.0 == 0x8)
        .and_then(|f| (f.1.len() >= 2).then(|| u16::from_be_bytes([f.1[0], f.1[1]])))
}
