//! Minimal HTTP/1.1 clients over a plain TCP connection (`Connection: close`, the whole
//! response read to the end): the gateway's `/healthz`, `/metrics` and page, the
//! emulator's admin API. Bodies are `Content-Length` or chunked (`GET /v1/last`
//! streams); [`request`] returns the decoded body.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a request may take.
const T: Duration = Duration::from_secs(10);

/// `method target` with an empty body: (status, head, body).
pub async fn request(addr: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let mut s = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .expect("http connect timed out")
        .unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("http response timed out")
        .unwrap();
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

/// The payload of a chunked body (RFC 9112 §7.1), checked: each chunk size, its data,
/// CRLF, up to the last chunk.
fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = b.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .expect("chunk size is hex");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        b = rest[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after chunk data");
    }
}

/// GET `path`: (status, head, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(addr, "GET", path).await
}

/// A blocking GET for the benches: (status code, body); `None` when the server cannot be
/// reached.
pub fn get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// `method target` with an empty body: (status, body) (the emulator's admin API).
pub async fn call(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let (status, _, body) = request(addr, method, target).await;
    (status, body)
}
