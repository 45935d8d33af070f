//! A hostile WebSocket battery against the in-process panel server: plain HTTP to the
//! stream, bad upgrade heads, slowloris, fragmented and unmasked frames, a 10 MiB frame,
//! invalid UTF-8, a storm of subscribe ops, and a connection flood. Each case asserts its
//! outcome and that the server then still serves a normal panel.

use crate::support::procfs;
use crate::support::ws_raw::{self, close_code, frame, read_all, server_frames};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::panels::*;
use asb_gateway::app::Context;
use asb_gateway::panels::Options;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A normal panel connects, gets hello and then a fresh event.
async fn still_serves(ctx: &Context, addr: SocketAddr) {
    let mut ws = connect(addr, "filter=check/%23").await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let seq = append(ctx, "check/ok", "{\"ok\":true}");
    loop {
        let f = next_json(&mut ws).await;
        if f["type"] == "event" {
            assert_eq!(f["seq"].as_u64(), Some(seq));
            break;
        }
    }
}

/// Write `req`, read one response: its head and its `Content-Length` body (a `101` has
/// none; without a length, up to the server's close), bounded by 10 s.
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // the server may answer (and close) before a huge head is all written
    let _ = s.write_all(req).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if head.starts_with("http/1.1 101") {
                break; // an upgrade: no body, and the connection stays open
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|len| buf.len() >= end + 4 + len) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"))
}

#[tokio::test]
async fn plain_http_and_bad_upgrade_heads_are_refused() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let a = srv.addr;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases: Vec<(String, &[u16])> = vec![
        // plain HTTP GET to the stream
        (
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            &[400, 426],
        ),
        ("GET /v1/stream HTTP/1.0\r\n\r\n".to_string(), &[400, 426]),
        (
            "POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_string(),
            &[400, 405, 426],
        ),
        // missing key
        (
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".to_string(),
            &[400],
        ),
        // wrong version, missing version
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 8\r\n\r\n"
            ),
            &[400, 426],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}\r\n"
            ),
            &[400, 426],
        ),
        // Upgrade without Connection: Upgrade, and the reverse
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400, 426],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400, 426],
        ),
        // an upgrade to something else
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400, 426],
        ),
        // HTTP/1.0 (WebSocket needs 1.1), keys that are not base64 of 16 bytes, two keys,
        // two Host lines
        (
            format!(
                "GET /v1/stream HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400],
        ),
        (
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n".to_string(),
            &[400],
        ),
        (
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: \r\nSec-WebSocket-Version: 13\r\n\r\n".to_string(),
            &[400],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "QUFB".repeat(500)
            ),
            &[400],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: evil.example\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            &[400],
        ),
        ("GET /page.js HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_string(), &[400]),
        // garbage request lines and huge headers
        (
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03\r\n\r\n".to_string(),
            &[400],
        ),
        (
            format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(200_000)
            ),
            &[400, 431],
        ),
        (
            format!(
                "GET /v1/stream?{} HTTP/1.1\r\nHost: x\r\n\r\n",
                "filter=a&".repeat(2000)
            ),
            &[400, 414, 426, 431],
        ),
    ];
    for (req, ok) in &cases {
        let resp = exchange(a, req.as_bytes()).await;
        if resp.is_empty() {
            // hyper may drop a connection whose request is unparsable; that is fine
            // for garbage and oversized heads, but never for well-formed requests.
            assert!(
                req.starts_with('\x16') || req.len() > 10_000,
                "no response to {:?}",
                &req[..req.len().min(80)]
            );
            continue;
        }
        let st = status(&resp);
        assert!(
            ok.contains(&st),
            "{st} for {:?}: {resp}",
            &req[..req.len().min(80)]
        );
        assert!(!resp.contains("101 Switching"), "{resp}");
    }
    assert_eq!(ctx.metrics.panels_connected.get(), 0);
    still_serves(&ctx, a).await;
    srv.stop().await;
}

#[tokio::test]
async fn slowloris_handshake_is_cut_after_the_head_timeout() {
    let ctx = ctx("");
    let opts = Options {
        handshake_timeout: Duration::from_millis(400),
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    let req = "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_string();
    // several slow clients at once, each trickling one byte every 50 ms
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = srv.addr;
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let t0 = Instant::now();
            let mut sent = 0;
            for b in req.as_bytes() {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                if t0.elapsed() > Duration::from_secs(8) {
                    break;
                }
            }
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            (
                t0.elapsed(),
                sent,
                String::from_utf8_lossy(&buf).into_owned(),
            )
        }));
    }
    for t in tasks {
        let (took, sent, resp) = t.await.unwrap();
        assert!(
            sent < req.len(),
            "the server let a trickled head finish ({took:?})"
        );
        assert!(took < Duration::from_secs(4), "cut late: {took:?}");
        assert!(!resp.contains("101"), "{resp}");
    }
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// A client that asks for responses and never reads them: hyper bounds how long a head
/// may take to arrive, not how long a response may take to leave. The connection is
/// ended once its writes make no progress for the head timeout.
#[tokio::test]
async fn a_client_that_never_reads_its_responses_is_cut_after_the_limit() {
    let ctx = ctx("");
    let opts = Options {
        handshake_timeout: Duration::from_millis(400),
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    let mut s = sock.connect(srv.addr).await.unwrap();
    let one = "GET /page.js HTTP/1.1\r\nHost: x\r\n\r\n";
    // 400 × page.js (~25 KB) is ~10 MB: more than any socket buffers could take even
    // without the server's SO_SNDBUF cap.
    let n = 400;
    s.write_all(one.repeat(n).as_bytes()).await.unwrap();
    // Not reading, for several times the limit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 65536];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got.extend_from_slice(&chunk[..k]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was still open");
    let answered = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        answered < n,
        "all {n} responses were sent once the client read: the stalled writes were never cut"
    );
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// An upgrade accepted and reset at once gives its panel slot back at once, not after
/// the upgrade timeout: otherwise a client resetting 30 upgrades a second holds every
/// slot while holding no socket.
#[tokio::test]
async fn an_upgrade_reset_before_its_101_frees_its_slot_at_once() {
    let ctx = ctx("");
    let opts = Options {
        handshake_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    let req = "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    for _ in 0..20 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s); // RST
    }
    let t0 = Instant::now();
    while ctx.metrics.panels_connected.get() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} slots still held {:?} after the resets",
            ctx.metrics.panels_connected.get(),
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn fragmented_frames_are_reassembled_and_bounded() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    // a ping op in three fragments, with a control frame between them
    let mut s = ws_raw::upgrade(srv.addr).await;
    let op = br#"{"op":"ping"}"#;
    let mut bytes = frame(false, 0x1, &op[..4]);
    bytes.extend(frame(false, 0x0, &op[4..9]));
    bytes.extend(frame(true, 0x9, b"hi"));
    bytes.extend(frame(true, 0x0, &op[9..]));
    s.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the pong");
        buf.extend_from_slice(&chunk[..n]);
        let frames = server_frames(&buf);
        if frames
            .iter()
            .any(|f| f.0 == 0x1 && f.1 == br#"{"type":"pong"}"#)
        {
            assert!(
                frames.iter().any(|f| f.0 == 0xA && f.1 == b"hi"),
                "ping answered"
            );
            break;
        }
        assert!(t0.elapsed() < T);
    }
    // fragments adding up past 4 KiB: closed with 1009
    let mut s = ws_raw::upgrade(srv.addr).await;
    let mut bytes = Vec::new();
    bytes.extend(frame(false, 0x1, &[b' '; 2000]));
    bytes.extend(frame(false, 0x0, &[b' '; 2000]));
    bytes.extend(frame(true, 0x0, &[b' '; 2000]));
    let _ = s.write_all(&bytes).await;
    let (frames, took) = read_all(&mut s, T).await;
    assert_eq!(close_code(&frames), Some(1009), "{frames:?}");
    assert!(took < Duration::from_secs(3));
    // a continuation frame with nothing to continue, and a new text frame inside a
    // fragmented one: protocol errors
    for bytes in [
        frame(true, 0x0, b"x"),
        [frame(false, 0x1, b"{"), frame(true, 0x1, b"}")].concat(),
        frame(true, 0x3, b"reserved opcode"),
        [
            vec![0x80 | 0x40 | 0x1],
            frame(true, 0x1, b"x")[1..].to_vec(),
        ]
        .concat(), // RSV1 set
        frame(false, 0x9, b"fragmented ping"),
        {
            // A 16-bit length for a payload of 13 bytes (§5.2: the shortest form MUST be
            // used).
            let f = frame(true, 0x1, br#"{"op":"ping"}"#);
            [vec![f[0], 0x80 | 126, 0, f[1] & 0x7f], f[2..].to_vec()].concat()
        },
    ] {
        let mut s = ws_raw::upgrade(srv.addr).await;
        let _ = s.write_all(&bytes).await;
        let (frames, took) = read_all(&mut s, T).await;
        assert_eq!(close_code(&frames), Some(1002), "{bytes:?}: {frames:?}");
        assert!(took < Duration::from_secs(3));
    }
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn an_unmasked_client_frame_is_a_protocol_error() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut s = ws_raw::upgrade(srv.addr).await;
    let op = br#"{"op":"ping"}"#;
    let mut bytes = vec![0x81, op.len() as u8];
    bytes.extend_from_slice(op);
    s.write_all(&bytes).await.unwrap();
    let (frames, took) = read_all(&mut s, T).await;
    assert!(
        !frames
            .iter()
            .any(|f| f.0 == 0x1 && f.1.windows(4).any(|w| w == b"pong")),
        "an unmasked op was obeyed: {frames:?}"
    );
    assert_eq!(close_code(&frames), Some(1002), "{frames:?}");
    assert!(took < Duration::from_secs(3));
    wait_until(|| ctx.metrics.panels_connected.get() == 0).await;
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn a_10_mib_frame_is_closed_1009_without_buffering_it() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    still_serves(&ctx, srv.addr).await;
    let before = procfs::status_field("self", "VmHWM:").expect("VmHWM");
    for opcode in [0x1u8, 0x2] {
        let mut s = ws_raw::upgrade(srv.addr).await;
        let len: u64 = 10 * 1024 * 1024;
        let mut head = vec![0x80 | opcode, 0x80 | 127];
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&head).await.unwrap();
        // stream the payload from one small chunk; the server must give up long before
        let chunk = vec![b'a'; 64 * 1024];
        let t0 = Instant::now();
        let mut written = 0u64;
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            while written < len {
                if tokio::time::timeout(Duration::from_secs(2), wr.write_all(&chunk))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    break;
                }
                written += chunk.len() as u64;
            }
            written
        });
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(T, rd.read_to_end(&mut buf)).await;
        let took = t0.elapsed();
        let written = writer.await.unwrap();
        let frames = server_frames(&buf);
        assert_eq!(close_code(&frames), Some(1009), "{frames:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(
            written < len,
            "the server read all 10 MiB ({written} bytes)"
        );
    }
    let grew = procfs::status_field("self", "VmHWM:")
        .expect("VmHWM")
        .saturating_sub(before);
    assert!(grew < 8 * 1024, "peak RSS grew by {grew} KiB");
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007_and_binary_garbage_gets_an_error() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    for bad in [
        &b"\xff\xfe"[..],
        b"{\"op\":\"ping\xc3\"}",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
    ] {
        let mut s = ws_raw::upgrade(srv.addr).await;
        s.write_all(&frame(true, 0x1, bad)).await.unwrap();
        let (frames, took) = read_all(&mut s, T).await;
        assert_eq!(close_code(&frames), Some(1007), "{bad:?}: {frames:?}");
        assert!(took < Duration::from_secs(3));
    }
    // invalid UTF-8 split across fragments
    let mut s = ws_raw::upgrade(srv.addr).await;
    let mut bytes = frame(false, 0x1, b"{\"op\":\"\xe2\x82");
    bytes.extend(frame(true, 0x0, b"\x28\"}"));
    s.write_all(&bytes).await.unwrap();
    let (frames, _) = read_all(&mut s, T).await;
    assert_eq!(close_code(&frames), Some(1007), "{frames:?}");
    // in a binary frame it is only a bad op: an error frame, the session goes on
    let mut ws = connect(srv.addr, "").await;
    next_json(&mut ws).await;
    ws.send(Message::binary(b"\xff\xfe".to_vec()))
        .await
        .unwrap();
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("bad_utf8"))
    );
    barrier(&mut ws).await;
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn a_storm_of_subscribe_ops_hurts_no_one_else() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut calm = connect(srv.addr, "filter=calm/%23").await;
    next_json(&mut calm).await;
    let mut storm = connect(srv.addr, "").await;
    next_json(&mut storm).await;
    // 5000 ops without reading anything; the last ones alternate valid and invalid
    let t0 = Instant::now();
    let sender = {
        let (mut tx, rx) = storm.split();
        let h = tokio::spawn(async move {
            for i in 0..5000u32 {
                let op = match i % 4 {
                    0 => json!({"op":"subscribe","filters":[format!("s/{i}/#")]}),
                    1 => json!({"op":"unsubscribe","filters":[format!("s/{}/#", i - 1)]}),
                    2 => json!({"op":"subscribe","filters":["a/#/b"]}),
                    _ => {
                        json!({"op":"subscribe","filters":(0..9).map(|j| format!("x{j}")).collect::<Vec<_>>()})
                    }
                };
                let r = tokio::time::timeout(T, tx.send(Message::text(op.to_string()))).await;
                match r {
                    Ok(Ok(())) => {}
                    _ => return (tx, i),
                }
            }
            (tx, 5000)
        });
        (h, rx)
    };
    // meanwhile the calm panel gets its events promptly
    for i in 0..20 {
        let seq = append(&ctx, "calm/x", &format!("{{\"i\":{i}}}"));
        let t = Instant::now();
        loop {
            let f = next_json(&mut calm).await;
            if f["type"] == "event" {
                assert_eq!(f["seq"].as_u64(), Some(seq));
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "calm panel waited {:?}",
            t.elapsed()
        );
    }
    let (h, mut rx) = sender;
    // read the storm's answers: either it survives to a pong after all its ops, or the
    // server closed it (back-pressure); both in bounded time
    let mut errors = 0;
    let survived = loop {
        match tokio::time::timeout(T, rx.next())
            .await
            .expect("storm panel stuck")
        {
            Some(Ok(Message::Text(t))) => {
                let f: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if f["type"] == "error" {
                    errors += 1;
                }
                if errors >= 2500 {
                    break true;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break false,
            Some(Ok(_)) => {}
        }
    };
    let (tx, sent) = h.await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20));
    if survived {
        assert_eq!(sent, 5000);
        let mut storm = tx.reunite(rx).unwrap();
        let before = barrier(&mut storm).await;
        assert!(before.iter().all(|f| f["type"] == "error"), "{before:?}");
        // its filter set is bounded and sane
        send_op(&mut storm, json!({"op":"subscribe","filters":["z/#"]})).await;
        let _ = barrier(&mut storm).await;
        append(&ctx, "z/1", "{}");
        loop {
            let f = next_json(&mut storm).await;
            if f["type"] == "event" {
                assert_eq!(f["topic"], "z/1");
                break;
            }
        }
    }
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn a_connection_flood_past_max_panels_gets_503_and_then_service_resumes() {
    let ctx: Arc<Context> = ctx("[panels]\nmax_panels = 4\n");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(srv.addr, "").await;
        next_json(&mut ws).await;
        held.push(ws);
    }
    // 100 more at once: none gets a WebSocket; each gets 503 or (past the HTTP
    // connection limit) a closed socket
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let a = srv.addr;
        tasks.push(tokio::spawn(async move {
            match try_connect(a, "", None, &[]).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(_) => 0,
            }
        }));
    }
    let mut by_status = std::collections::BTreeMap::new();
    for t in tasks {
        *by_status.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert!(!by_status.contains_key(&101), "{by_status:?}");
    assert!(
        by_status.get(&503).copied().unwrap_or(0) >= 1,
        "{by_status:?}"
    );
    assert!(
        by_status.keys().all(|s| *s == 503 || *s == 0),
        "{by_status:?}"
    );
    assert_eq!(ctx.metrics.panels_connected.get(), 4);
    // the held panels are unaffected
    let seq = append(&ctx, "a/b", "{}");
    for ws in &mut held {
        assert_eq!(next_json(ws).await["seq"].as_u64(), Some(seq));
    }
    drop(held);
    wait_until(|| ctx.metrics.panels_connected.get() == 0).await;
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// DNS rebinding: a page on another site points its own name at the box, so the
/// browser sends that name as `Host` and as the page's origin. Without
/// `panels.server_names` such a page is not the built-in page's own origin (403 when
/// `allowed_origins` is set; the box's address and `localhost` still are); with it,
/// every path answers such a `Host` with 421 and counts it.
#[tokio::test]
async fn dns_rebinding_is_refused_on_every_path() {
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ];
        v.extend_from_slice(extra);
        v
    }
    let open = ctx("[panels]\nallowed_origins = [\"https://hmi.plant\"]\n");
    let srv = start(open, Options::default()).await;
    let own = format!("127.0.0.1:{}", srv.addr.port());
    let own_origin = format!("Origin: http://{own}");
    assert_eq!(upgrade(srv.addr, &own, &with(&[&own_origin])).await.0, 101);
    let localhost = format!("localhost:{}", srv.addr.port());
    let lh_origin = format!("Origin: http://{localhost}");
    assert_eq!(
        upgrade(srv.addr, &localhost, &with(&[&lh_origin])).await.0,
        101
    );
    let rebound = "rebind.evil.example:8080";
    let (st, _) = upgrade(
        srv.addr,
        rebound,
        &with(&["Origin: http://rebind.evil.example:8080"]),
    )
    .await;
    assert_eq!(st, 403, "a rebound name is not the page's own origin");
    srv.stop().await;

    let ctx = ctx("[panels]\nserver_names = [\"GW17.plant.local\"]\n");
    let srv = start(ctx.clone(), Options::default()).await;
    let get = |path: &str, host: Option<&str>| {
        let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
        format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n")
    };
    let mut refused = 0;
    for path in ["/", "/page.js", "/healthz", "/metrics", "/v1/last", "/nope"] {
        let resp = exchange(srv.addr, get(path, Some("evil.example:8080")).as_bytes()).await;
        assert_eq!(status(&resp), 421, "{path}: {resp}");
        assert!(
            resp.contains("Host evil.example is not in panels.server_names"),
            "{path}: {resp}"
        );
        refused += 1;
        let resp = exchange(srv.addr, get(path, None).as_bytes()).await;
        assert_eq!(status(&resp), 421, "{path} without Host: {resp}");
        refused += 1;
        for host in [
            "gw17.plant.local:8080".to_string(),
            "gw17.PLANT.local.".to_string(),
            own.clone(),
        ] {
            let resp = exchange(srv.addr, get(path, Some(&host)).as_bytes()).await;
            // served: /healthz says 503 here, as no source is connected
            let want: &[u16] = match path {
                "/nope" => &[404],
                "/healthz" => &[503],
                _ => &[200],
            };
            assert!(
                want.contains(&status(&resp)),
                "{path} with Host {host}: {resp}"
            );
        }
    }
    let (st, _) = upgrade(
        srv.addr,
        "evil.example",
        &with(&["Origin: http://evil.example"]),
    )
    .await;
    assert_eq!(st, 421);
    refused += 1;
    // A request target in absolute form names the host too; and a Host that is not
    // visible ASCII is malformed.
    for req in [
        &b"GET http://evil.example/v1/last HTTP/1.1\r\nHost: gw17.plant.local\r\nConnection: close\r\n\r\n"[..],
        b"GET /v1/last HTTP/1.1\r\nHost: gw17.plant.local\xe9\r\nConnection: close\r\n\r\n",
    ] {
        let resp = exchange(srv.addr, req).await;
        assert_eq!(status(&resp), 421, "{resp}");
        refused += 1;
    }
    let resp = exchange(
        srv.addr,
        b"GET http://GW17.plant.local:8080/v1/last HTTP/1.1\r\nHost: gw17.plant.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 200, "{resp}");
    let (st, _) = upgrade(srv.addr, "gw17.plant.local", &with(&[])).await;
    assert_eq!(st, 101);
    let host_refusals = ctx
        .metrics
        .panels_rejected
        .of(asb_gateway::metrics::RejectReason::Host)
        .get();
    assert_eq!(host_refusals, refused);
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// One upgrade request with `lines` (each `Name: value`, sent as written), on a raw TCP
/// connection: the status and the echoed `Sec-WebSocket-Protocol`, if any.
async fn upgrade(addr: SocketAddr, host: &str, lines: &[&str]) -> (u16, Option<String>) {
    let mut req = format!("GET /v1/stream HTTP/1.1\r\nHost: {host}\r\n");
    for l in lines {
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let resp = exchange(addr, req.as_bytes()).await;
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    let protocol = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-protocol")
            .then(|| value.trim().to_string())
    });
    (status(&resp), protocol)
}

/// The handshake accepts every spelling RFC 9110, RFC 6455 and RFC 6454 allow, not just
/// the one a test client sends: repeated header lines as one list, header names and
/// tokens in any case, optional whitespace and empty list elements, the Bearer scheme in
/// any case, origins compared as (scheme, host, port) with default ports. Refusals keep
/// their codes (400 subprotocol, 401 token, 403 origin).
#[tokio::test]
async fn handshakes_accept_what_the_rfcs_allow() {
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(b"line1-secret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let ctx = ctx(&format!(
        "[panels]\nmax_panels = 256\n\
         allowed_origins = [\"http://panel.local:8080\", \"https://secure.panel\", \"http://Plain.Panel/\"]\n\
         server_names = [\"gw.local\"]\n\
         [[panels.tokens]]\nname = \"line1\"\nsha256 = \"{hash}\"\nallow = [\"line1/#\"]\n"
    ));
    let srv = start(ctx.clone(), Options::default()).await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    let ws = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        key,
        "Sec-WebSocket-Version: 13",
    ];
    let auth = "Authorization: Bearer line1-secret";
    let host = "gw.local:8080";
    // (what, Host, header lines besides the standard four, expected status, protocol)
    type Case<'a> = (&'a str, &'a str, Vec<&'a str>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("baseline", host, vec![auth], 101, None),
        // Sec-WebSocket-Protocol
        (
            "subprotocols on two lines",
            host,
            vec![
                auth,
                "Sec-WebSocket-Protocol: mqtt",
                "Sec-WebSocket-Protocol: asbgw.v1.json",
            ],
            101,
            Some("asbgw.v1.json"),
        ),
        (
            "subprotocol list with whitespace and tabs",
            host,
            vec![auth, "Sec-WebSocket-Protocol: mqtt ,\t asbgw.v1.postcard\t"],
            101,
            Some("asbgw.v1.postcard"),
        ),
        (
            "empty list elements",
            host,
            vec![auth, "Sec-WebSocket-Protocol: , ,asbgw.v1.json,"],
            101,
            Some("asbgw.v1.json"),
        ),
        (
            "first offered wins across lines",
            host,
            vec![
                auth,
                "sec-websocket-protocol: asbgw.v1.postcard",
                "SEC-WEBSOCKET-PROTOCOL: asbgw.v1.json",
            ],
            101,
            Some("asbgw.v1.postcard"),
        ),
        (
            "the client's spelling is echoed",
            host,
            vec![auth, "Sec-WebSocket-Protocol: ASBGW.V1.JSON"],
            101,
            Some("ASBGW.V1.JSON"),
        ),
        (
            "only unknown subprotocols, on two lines",
            host,
            vec![
                auth,
                "Sec-WebSocket-Protocol: mqtt",
                "Sec-WebSocket-Protocol: wamp.2.json",
            ],
            400,
            None,
        ),
        // Authorization (RFC 9110 §11: the scheme is case-insensitive)
        (
            "bearer in lower case",
            host,
            vec!["authorization: bearer line1-secret"],
            101,
            None,
        ),
        (
            "BEARER and several spaces",
            host,
            vec!["AUTHORIZATION: BEARER   line1-secret"],
            101,
            None,
        ),
        (
            "a tab after the scheme",
            host,
            vec!["Authorization: Bearer\tline1-secret "],
            101,
            None,
        ),
        (
            "a Basic line before the Bearer one",
            host,
            vec!["Authorization: Basic dTpw", auth],
            101,
            None,
        ),
        (
            "Basic only",
            host,
            vec!["Authorization: Basic dTpw"],
            401,
            None,
        ),
        (
            "no space after the scheme",
            host,
            vec!["Authorization: Bearerline1-secret"],
            401,
            None,
        ),
        (
            "a wrong token",
            host,
            vec!["Authorization: Bearer line1-secreT"],
            401,
            None,
        ),
        // Origin (RFC 6454: scheme and host case-insensitive, default ports)
        (
            "allowed origin",
            host,
            vec![auth, "Origin: http://panel.local:8080"],
            101,
            None,
        ),
        (
            "origin in upper case",
            host,
            vec![auth, "Origin: HTTP://PANEL.Local:8080"],
            101,
            None,
        ),
        (
            "explicit default port",
            host,
            vec![auth, "Origin: https://secure.panel:443"],
            101,
            None,
        ),
        (
            "config with a slash and capitals",
            host,
            vec![auth, "Origin: http://plain.panel:80"],
            101,
            None,
        ),
        (
            "the page's own origin",
            host,
            vec![auth, "Origin: http://GW.local:8080"],
            101,
            None,
        ),
        (
            "own origin, default port in Host",
            "gw.local:80",
            vec![auth, "Origin: http://gw.local"],
            101,
            None,
        ),
        (
            "own origin, default port in Origin",
            "gw.local",
            vec![auth, "Origin: https://gw.local:443"],
            101,
            None,
        ),
        (
            "another port",
            host,
            vec![auth, "Origin: http://panel.local:8081"],
            403,
            None,
        ),
        (
            "another scheme",
            host,
            vec![auth, "Origin: https://panel.local:8080"],
            403,
            None,
        ),
        (
            "a longer host",
            host,
            vec![auth, "Origin: http://panel.local.evil.example:8080"],
            403,
            None,
        ),
        (
            "an opaque origin",
            host,
            vec![auth, "Origin: null"],
            403,
            None,
        ),
        (
            "own host, other port",
            host,
            vec![auth, "Origin: http://gw.local:9090"],
            403,
            None,
        ),
        (
            "DNS rebinding: a name the box does not answer to",
            "evil.example:8080",
            vec![auth, "Origin: http://evil.example:8080"],
            421,
            None,
        ),
        (
            "an origin list with one stranger",
            host,
            vec![auth, "Origin: http://panel.local:8080 http://evil.example"],
            403,
            None,
        ),
        (
            "a second Origin line",
            host,
            vec![
                auth,
                "Origin: http://panel.local:8080",
                "Origin: http://evil.example",
            ],
            403,
            None,
        ),
    ];
    for (what, host, extra, want, want_proto) in &cases {
        let mut lines = ws.to_vec();
        lines.extend(extra.iter().copied());
        let (st, proto) = upgrade(srv.addr, host, &lines).await;
        assert_eq!(st, *want, "{what}");
        assert_eq!(proto.as_deref(), *want_proto, "{what}: subprotocol");
    }
    // Connection, Upgrade and the version in the spellings clients and proxies use
    let odd: [&[&str]; 6] = [
        &[
            "upgrade: WebSocket",
            "CONNECTION: keep-alive, Upgrade",
            key,
            "sec-websocket-version: 13",
        ],
        &[
            "Upgrade:websocket",
            "Connection:\tkeep-alive ,upgrade\t",
            key,
            "Sec-WebSocket-Version:  13 ",
        ],
        &[
            "Upgrade: h2c, WEBSOCKET",
            "Connection: Upgrade, HTTP2-Settings",
            key,
            "Sec-WebSocket-Version: 13",
        ],
        &[
            "Upgrade: websocket",
            "Connection: keep-alive",
            "Connection: Upgrade",
            key,
            "Sec-WebSocket-Version: 13",
        ],
        &[
            "Upgrade: websocket",
            "Connection: ,Upgrade,",
            key,
            "Sec-WebSocket-Version: 13",
        ],
        &[
            "Upgrade: websocket",
            "Connection: upgrade",
            key,
            "Sec-WebSocket-Version: 13",
        ],
    ];
    for lines in odd {
        let mut lines = lines.to_vec();
        lines.push(auth);
        let (st, _) = upgrade(srv.addr, host, &lines).await;
        assert_eq!(st, 101, "{lines:?}");
    }
    // ... but not a different token that merely contains the right letters
    let near: [&[&str]; 3] = [
        &[
            "Upgrade: websockets",
            "Connection: Upgrade",
            key,
            "Sec-WebSocket-Version: 13",
        ],
        &[
            "Upgrade: websocket",
            "Connection: Upgraded",
            key,
            "Sec-WebSocket-Version: 13",
        ],
        &[
            "Upgrade: websocket",
            "Connection: Upgrade",
            key,
            "Sec-WebSocket-Version: 130",
        ],
    ];
    for lines in near {
        let mut lines = lines.to_vec();
        lines.push(auth);
        let (st, _) = upgrade(srv.addr, host, &lines).await;
        assert!([400, 426].contains(&st), "{st} for {lines:?}");
    }
    still_serves_with_token(&ctx, srv.addr).await;
    srv.stop().await;
}

/// A normal panel (with the token) still connects and gets its hello.
async fn still_serves_with_token(_ctx: &Context, addr: SocketAddr) {
    let mut ws = try_connect(
        addr,
        "",
        Some("asbgw.v1.json"),
        &[("Authorization", "Bearer line1-secret")],
    )
    .await
    .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "hello");
}

/// A client may send more frames after its close (RFC 6455 §5.5.1 forbids only data
/// frames; pings may follow). The server's close reply must still reach it: dropping the
/// socket with that input unread makes the kernel send a reset, which discards what the
/// server has not yet delivered — the last events and the close reply.
#[tokio::test]
async fn a_close_followed_by_pings_still_gets_the_close_reply() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut s = upgrade_small_window(srv.addr).await;
    // Events the client does not read yet: some wait in the server's send queue.
    let body = format!("{{\"p\":\"{}\"}}", "x".repeat(1000));
    for _ in 0..100 {
        append(&ctx, "line1/temp", &body);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut bytes = frame(true, 0x8, &[&1000u16.to_be_bytes()[..], b"bye"].concat());
    for _ in 0..10 {
        bytes.extend(frame(true, 0x9, &[b'p'; 125]));
    }
    s.write_all(&bytes).await.unwrap();
    let (frames, _) = read_all(&mut s, T).await;
    let events = frames.iter().filter(|f| f.0 == 0x1).count();
    assert_eq!(
        close_code(&frames),
        Some(1000),
        "the close reply after {events} frames"
    );
    // The close ends the stream: events not yet queued are not sent (§5.5.1: the reply
    // goes "as soon as practical"), so only the hello is certain.
    assert!(events >= 1, "the hello");
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// Read raw server frames until a `{"type":"pong"}` (`Ok`) or a close frame (`Err` with
/// its code), within 10 s.
async fn pong_or_close(s: &mut TcpStream) -> Result<(), Option<u16>> {
    let mut buf = Vec::new();
    let t0 = Instant::now();
    loop {
        let frames = server_frames(&buf);
        if frames
            .iter()
            .any(|f| f.0 == 0x1 && f.1 == br#"{"type":"pong"}"#)
        {
            return Ok(());
        }
        if frames.iter().any(|f| f.0 == 0x8) {
            return Err(close_code(&frames));
        }
        let mut chunk = [0u8; 4096];
        let left = T.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("neither a pong nor a close: {other:?} after {frames:?}"),
        }
    }
}

/// A raw WebSocket client with a 4 KiB receive window, so that what it does not read
/// soon waits in the server's send queue.
async fn upgrade_small_window(addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(addr).await.unwrap();
    ws_raw::upgrade_stream(s, addr).await
}

/// Poll `cond` every 20 ms until it holds (at most 10 s).
async fn wait_until_async<F: std::future::Future<Output = bool>>(mut cond: impl FnMut() -> F) {
    let t0 = Instant::now();
    while !cond().await {
        assert!(t0.elapsed() < T, "condition not reached within {T:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `asbgw_panels_input_grants` from `/metrics`.
async fn input_grants(addr: SocketAddr) -> u64 {
    let resp = exchange(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    resp.lines()
        .find_map(|l| l.strip_prefix("asbgw_panels_input_grants "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no input grants gauge in {resp}"))
}

/// Ops are read with grants of a shared pool (`budget::INPUT_GRANTS`). A client that
/// sends part of an op and stalls holds a grant; with grants to spare it is left alone,
/// but once every grant is held, panels that held theirs `grant_hold` are closed (1008)
/// so that the others' ops get their turn. Meanwhile the others' pings are answered:
/// control frames need no grant.
#[tokio::test]
async fn clients_that_hold_the_input_pool_with_half_sent_ops_are_closed_when_others_wait() {
    const GRANTS: usize = asb_gateway::budget::INPUT_GRANTS;
    let ctx = ctx("");
    let opts = Options {
        grant_hold: Duration::from_secs(3),
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    let op = frame(true, 0x1, br#"{"op":"ping"}"#);
    // The header (6 bytes) and 2 bytes of the payload, then a stall.
    let (part, rest) = op.split_at(8);

    // Alone, with grants to spare: held past grant_hold, and still served.
    let mut alone = ws_raw::upgrade(srv.addr).await;
    alone.write_all(part).await.unwrap();
    wait_until_async(|| async { input_grants(srv.addr).await == 1 }).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    alone.write_all(rest).await.unwrap();
    assert_eq!(pong_or_close(&mut alone).await, Ok(()));
    assert_eq!(ctx.metrics.panels_disconnected_input.get(), 0);

    let mut calm = connect(srv.addr, "").await;
    assert_eq!(next_json(&mut calm).await["type"], "hello");
    let mut hogs = Vec::new();
    for _ in 0..GRANTS {
        let mut s = ws_raw::upgrade(srv.addr).await;
        s.write_all(part).await.unwrap();
        hogs.push(s);
    }
    wait_until_async(|| async { input_grants(srv.addr).await == GRANTS as u64 }).await;
    // Every grant held: a ping is still answered, and nobody was closed for it.
    calm.send(Message::Ping(bytes::Bytes::from_static(b"p")))
        .await
        .unwrap();
    let m = tokio::time::timeout(T, calm.next()).await.expect("a pong");
    assert_eq!(
        m.unwrap().unwrap(),
        Message::Pong(bytes::Bytes::from_static(b"p"))
    );
    assert_eq!(ctx.metrics.panels_disconnected_input.get(), 0);
    // An op waits for a grant: it is answered only after a hog was closed.
    send_op(&mut calm, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut calm).await["type"], "pong");
    assert!(ctx.metrics.panels_disconnected_input.get() >= 1);
    // Each hog was closed with 1008, or (once grants were free again) kept and served.
    let mut closed = 0;
    for mut s in hogs {
        let _ = s.write_all(rest).await;
        match pong_or_close(&mut s).await {
            Ok(()) => {}
            Err(code) => {
                assert_eq!(code, Some(1008));
                closed += 1;
            }
        }
    }
    assert!(closed >= 1);
    assert_eq!(
        ctx.metrics.panels_disconnected_input.get(),
        closed,
        "closed hogs and the counter"
    );
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// What a panel keeps of its request to check again after a reload (its `Origin` lines
/// and `Host`) is bounded: past `budget::PANEL_ADMISSION` bytes, one long line or many
/// short ones, the upgrade gets 431 and nothing is kept.
#[tokio::test]
async fn origin_and_host_a_panel_keeps_are_bounded() {
    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let host = srv.addr.to_string();
    let base = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        KEY,
        "Sec-WebSocket-Version: 13",
    ];
    let upgrade_with = |extra: Vec<String>| {
        let host = host.clone();
        async move {
            let mut lines: Vec<&str> = base.to_vec();
            lines.extend(extra.iter().map(String::as_str));
            upgrade(srv.addr, &host, &lines).await.0
        }
    };
    let long = format!("Origin: https://{}.example", "a".repeat(1100));
    assert_eq!(upgrade_with(vec![long]).await, 431);
    let many: Vec<String> = (0..60)
        .map(|i| format!("Origin: https://hmi{i}.example"))
        .collect();
    assert_eq!(upgrade_with(many).await, 431);
    let long_host = format!("{}.example", "h".repeat(1100));
    let (status, _) = upgrade(srv.addr, &long_host, &base).await;
    assert_eq!(status, 431);
    // An ordinary browser request is not refused for it.
    let one = vec!["Origin: https://hmi.example:8443".to_string()];
    assert_eq!(upgrade_with(one).await, 101);
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// A panel that sent an op and does not read (its socket full of events, the reply
/// queued behind them) keeps its grant of the input pool, also while it floods the
/// server with pongs; once it has held it `grant_hold` with none free, it is closed, and
/// the op another panel was waiting to send is answered. (One grant here, so one such
/// panel fills the pool.) Two worker threads, so that the flood keeps the server's
/// socket full while its session runs, as a client on another machine would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_that_does_not_read_the_reply_to_its_op_gives_its_grant_up() {
    let ctx = ctx("");
    let opts = Options {
        grant_hold: Duration::from_secs(1),
        input_grants: 1,
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    let mut calm = connect(srv.addr, "filter=calm/%23").await;
    assert_eq!(next_json(&mut calm).await["type"], "hello");
    // A client that never reads.
    let mut stalled = upgrade_small_window(srv.addr).await;
    // Fill its socket: events until the server has sent what the kernel takes.
    let body = format!("\"{}\"", "x".repeat(4000));
    for _ in 0..200 {
        append(&ctx, "busy/x", &body);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stalled
        .write_all(&frame(true, 0x1, br#"{"op":"ping"}"#))
        .await
        .unwrap();
    wait_until_async(|| async { input_grants(srv.addr).await == 1 }).await;
    // Then it keeps the server reading: pongs need no reply, so its input stays open.
    let (unread, mut wr) = stalled.into_split();
    let pongs: Vec<u8> = (0..1000).flat_map(|_| frame(true, 0xA, b"")).collect();
    let flood = tokio::spawn(async move { while wr.write_all(&pongs).await.is_ok() {} });
    // The calm panel's op waits for the one grant, and is answered once the stalled
    // panel has held it a second.
    let t0 = Instant::now();
    send_op(&mut calm, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut calm).await["type"], "pong");
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(ctx.metrics.panels_disconnected_input.get(), 1);
    flood.abort();
    drop(unread);
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// A new panel whose start gets no grant of the input pool within the handshake timeout
/// is closed 1013 (try again later), not left hanging or dropped without a word.
#[tokio::test]
async fn a_panel_that_gets_no_start_grant_is_told_to_try_again_later() {
    let ctx = ctx("");
    let opts = Options {
        handshake_timeout: Duration::from_secs(1),
        grant_hold: Duration::from_secs(60),
        input_grants: 1,
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    // The one grant, held by a half-sent op.
    let mut hog = ws_raw::upgrade(srv.addr).await;
    hog.write_all(&frame(true, 0x1, br#"{"op":"ping"}"#)[..8])
        .await
        .unwrap();
    wait_until_async(|| async { input_grants(srv.addr).await == 1 }).await;
    let mut late = ws_raw::upgrade(srv.addr).await;
    let (frames, _) = read_all(&mut late, T).await;
    assert_eq!(close_code(&frames), Some(1013), "{frames:?}");
    assert!(
        !frames.iter().any(|f| f.0 == 0x1),
        "no hello without a grant: {frames:?}"
    );
    drop(hog);
    srv.stop().await;
}

/// A client that sends pings with the largest payload and reads nothing: the server
/// answers each with a pong, but reads on only while little of its own control room is
/// queued (`budget::CONTROL_READ`), so TCP pushes back on the client instead of pongs
/// piling up in the server (a debug build checks the room, `budget::CONTROL_OWN`, after
/// every step of a session). Once the client reads, every ping has its pong, in order and
/// with its payload, and the close after them is answered.
#[tokio::test]
async fn a_ping_flood_that_reads_nothing_gets_every_pong_in_order_without_piling_up() {
    const PINGS: usize = 5000;
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let s = upgrade_small_window(srv.addr).await;
    let (mut r, mut w) = s.into_split();
    let payload = |i: usize| [format!("{i:08}").into_bytes(), vec![b'p'; 117]].concat();
    let writer = tokio::spawn(async move {
        for i in 0..PINGS {
            w.write_all(&frame(true, 0x9, &payload(i))).await?;
        }
        w.write_all(&frame(true, 0x8, &1000u16.to_be_bytes()))
            .await?;
        Ok::<_, std::io::Error>(w)
    });
    // Nothing read meanwhile: the pongs fill the client's window and the server's queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, r.read_to_end(&mut buf)).await;
    let _w = writer.await.unwrap().expect("the server read every ping");
    let frames = server_frames(&buf);
    let pongs: Vec<&Vec<u8>> = frames.iter().filter(|f| f.0 == 0xA).map(|f| &f.1).collect();
    assert_eq!(pongs.len(), PINGS, "a pong for every ping");
    for (i, p) in pongs.iter().enumerate() {
        assert_eq!(**p, payload(i), "pong {i} echoes its ping's payload");
    }
    assert_eq!(close_code(&frames), Some(1000), "the close is answered");
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a Host header, or with a Host that is not
/// host[:port], gets 400, on every path and for the upgrade, counted as a refusal.
/// HTTP/1.0 has no Host header and is served.
#[tokio::test]
async fn an_http_1_1_request_without_host_is_a_bad_request() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut refused = 0;
    for path in ["/", "/page.js", "/healthz", "/metrics", "/v1/last", "/nope"] {
        for (host, why) in [
            ("", "a Host header is required"),
            ("Host: a b\r\n", "malformed Host header"),
            ("Host: gw:80:80\r\n", "malformed Host header"),
        ] {
            let req = format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
            let resp = exchange(srv.addr, req.as_bytes()).await;
            assert_eq!(status(&resp), 400, "{path} {host:?}: {resp}");
            assert!(resp.contains(why), "{path} {host:?}: {resp}");
            refused += 1;
        }
    }
    let upgrade = "GET /v1/stream HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let resp = exchange(srv.addr, upgrade.as_bytes()).await;
    assert_eq!(status(&resp), 400, "{resp}");
    refused += 1;
    assert_eq!(ctx.metrics.panels_connected.get(), 0);
    let rejected = ctx
        .metrics
        .panels_rejected
        .of(asb_gateway::metrics::RejectReason::Host)
        .get();
    assert_eq!(rejected, refused, "each refusal is counted");
    // /healthz answers 503 here: no source is connected.
    let resp = exchange(srv.addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&resp), 503, "{resp}");
    still_serves(&ctx, srv.addr).await;
    srv.stop().await;
}
