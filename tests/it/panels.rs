//! The panel server with real WebSocket clients (tokio-tungstenite) on loopback.

use crate::support::{http, ws_raw};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::panels::*;
use asb_gateway::event::{Body, Frame, GapReason, format_rfc3339_millis};
use asb_gateway::metrics::PartState;
use asb_gateway::panels::Options;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn seqs(frames: &[serde_json::Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "event")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect()
}

async fn read_events(ws: &mut Client, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = next_json(ws).await;
        assert_eq!(f["type"], "event", "unexpected frame {f}");
        out.push(f);
    }
    out
}

/// Wait for a close frame, skipping data; returns its code.
async fn expect_close(ws: &mut Client) -> CloseCode {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("timed out waiting for close")
        {
            Some(Ok(Message::Close(Some(c)))) => return c.code,
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn json_and_postcard_frames_in_order() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut j = try_connect(srv.addr, "", Some("asbgw.v1.json"), &[])
        .await
        .unwrap();
    let mut p = try_connect(srv.addr, "", Some("asbgw.v1.postcard"), &[])
        .await
        .unwrap();
    let mut d = connect(srv.addr, "").await; // no subprotocol: JSON by default

    let hello = next_json(&mut j).await;
    assert_eq!(
        hello,
        json!({"type":"hello","epoch":EPOCH,"oldest":1,"latest":0,"filters":["#"]})
    );
    assert_eq!(next_json(&mut d).await["type"], "hello");
    match next_msg(&mut p).await {
        Message::Binary(b) => match postcard::from_bytes::<Frame>(&b).unwrap() {
            Frame::Hello {
                epoch,
                oldest,
                latest,
                filters,
            } => assert_eq!((epoch, oldest, latest, filters), (EPOCH, 1, 0, vec!["#"])),
            f => panic!("expected hello, got {f:?}"),
        },
        m => panic!("expected binary, got {m:?}"),
    }

    for i in 0..100 {
        append(
            &ctx,
            &format!("line{}/temp", i % 3),
            &format!("{{\"t\":{i}}}"),
        );
    }
    let got = read_events(&mut j, 100).await;
    assert_eq!(seqs(&got), (1..=100).collect::<Vec<_>>());
    assert_eq!(
        got[4],
        json!({"type":"event","seq":5,"topic":"line1/temp","subject":"temp","message_id":"m-5",
               "correlation_id":null,"content_type":"application/json",
               "enqueued_at":format_rfc3339_millis(1_795_000_000_005),"asb_seq":1005,
               "props":{"line":"line1"},"body":{"t":4}})
    );
    assert_eq!(seqs(&read_events(&mut d, 100).await).len(), 100);
    for seq in 1..=100u64 {
        let Message::Binary(b) = next_msg(&mut p).await else {
            panic!("expected binary")
        };
        // The bytes on the wire are the journal's, unchanged.
        assert_eq!(b, ctx.journal.get(seq).unwrap().postcard);
        match postcard::from_bytes::<Frame>(&b).unwrap() {
            Frame::Event(e) => {
                assert_eq!(e.seq, seq);
                assert_eq!(e.topic, format!("line{}/temp", (seq - 1) % 3));
                assert_eq!(e.body, Body::Json(&format!("{{\"t\":{}}}", seq - 1)));
                assert_eq!(e.props, vec![("line", e.topic.split('/').next().unwrap())]);
            }
            f => panic!("expected event, got {f:?}"),
        }
    }
    assert!(ctx.metrics.frames_sent.get() >= 303);
    srv.stop().await;
}

#[tokio::test]
async fn filters_subscribe_and_unsubscribe() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "filter=line1/%23&filter=%2B/pressure").await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["filters"], json!(["line1/#", "+/pressure"]));

    for t in ["line1/temp", "line2/temp", "line2/pressure", "line3/temp/x"] {
        append(&ctx, t, "{}");
    }
    let got = read_events(&mut ws, 2).await;
    assert_eq!(
        got.iter().map(|f| f["topic"].clone()).collect::<Vec<_>>(),
        [json!("line1/temp"), json!("line2/pressure")]
    );

    send_op(
        &mut ws,
        json!({"op":"subscribe","filters":["line3/+/x", "bad/#/filter"]}),
    )
    .await;
    send_op(&mut ws, json!({"op":"unsubscribe","filters":["line1/#"]})).await;
    let before = barrier(&mut ws).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "error");
    assert_eq!(before[0]["code"], "bad_filter");

    for t in ["line1/temp", "line2/temp", "line3/temp/x", "line9/pressure"] {
        append(&ctx, t, "{}");
    }
    let got = read_events(&mut ws, 2).await;
    assert_eq!(seqs(&got), [7, 8]);
    assert_eq!(got[0]["topic"], "line3/temp/x");
    assert_eq!(got[1]["topic"], "line9/pressure");

    // nine filters in one op are refused as a whole
    let nine: Vec<String> = (0..9).map(|i| format!("f{i}")).collect();
    send_op(&mut ws, json!({"op":"subscribe","filters":nine})).await;
    let before = barrier(&mut ws).await;
    assert_eq!(before[0]["code"], "too_many_filters");
    srv.stop().await;
}

#[tokio::test]
async fn resume_replays_or_reports_expired_and_epoch_gaps() {
    let ctx = ctx("[journal]\nevents = 16\nunsettled = 4\n");
    let srv = start(ctx.clone(), Options::default()).await;
    for i in 1..=10 {
        append(&ctx, "line1/temp", &i.to_string());
    }
    // within history: events after the one seen
    let mut ws = connect(srv.addr, &format!("since={EPOCH}:4")).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(
        (hello["oldest"].as_u64(), hello["latest"].as_u64()),
        (Some(1), Some(10))
    );
    assert_eq!(
        seqs(&read_events(&mut ws, 6).await),
        (5..=10).collect::<Vec<_>>()
    );
    // caught up since the latest: nothing replayed, live from there
    let mut live = connect(srv.addr, &format!("since={EPOCH}:10")).await;
    next_json(&mut live).await;

    for chunk in [11..=20, 21..=30, 31..=40] {
        let want: Vec<u64> = chunk.clone().collect();
        for i in chunk {
            append(&ctx, "line1/temp", &i.to_string());
        }
        assert_eq!(seqs(&read_events(&mut live, 10).await), want);
    }
    assert_eq!(ctx.journal.oldest(), 25);

    // too old: gap "expired", then everything retained
    let mut old = connect(srv.addr, &format!("since={EPOCH}:10")).await;
    assert_eq!(next_json(&mut old).await["type"], "hello");
    assert_eq!(
        next_json(&mut old).await,
        json!({"type":"gap","from":11,"to":24,"reason":"expired"})
    );
    assert_eq!(
        seqs(&read_events(&mut old, 16).await),
        (25..=40).collect::<Vec<_>>()
    );

    // another epoch: gap "epoch", replay from the oldest
    let mut other = connect(srv.addr, "since=fedcba987654:38").await;
    assert_eq!(next_json(&mut other).await["type"], "hello");
    assert_eq!(
        next_json(&mut other).await,
        json!({"type":"gap","from":1,"to":24,"reason":"epoch"})
    );
    assert_eq!(
        seqs(&read_events(&mut other, 16).await),
        (25..=40).collect::<Vec<_>>()
    );

    // the resume op on a live session rewinds the cursor
    send_op(
        &mut live,
        json!({"op":"resume","since":format!("{EPOCH}:36")}),
    )
    .await;
    let before = barrier(&mut live).await;
    assert_eq!(seqs(&before), [37, 38, 39, 40]);
    send_op(&mut live, json!({"op":"resume","since":"nonsense"})).await;
    let before = barrier(&mut live).await;
    assert_eq!(before[0]["code"], "bad_since");

    assert_eq!(ctx.metrics.gaps.get(), 2);
    srv.stop().await;
}

/// Open a WebSocket over a socket with a tiny receive buffer, read the hello, and then
/// never read again: the server's writes to it stall once the TCP window is full.
async fn stalled_client(addr: std::net::SocketAddr) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/v1/stream"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    ws
}

const STALL_EVENTS: u64 = 1500;

/// Two reading panels and one stalled panel; 1500 events of ~1 KiB through a 64-event
/// journal. The appender waits only for the two reading panels, so if the stalled one
/// slowed anything down, they would stall too.
async fn stall_scenario(policy: &str) -> (Arc<asb_gateway::app::Context>, Client, Running) {
    let (ctx, mut stalled, srv) = stall_scenario_with(policy, None, 1).await;
    assert_eq!(ctx.metrics.panels_connected.get(), 3);
    assert_eq!(
        ctx.metrics.panels_disconnected_held.get(),
        0,
        "the shared pool holds one stalled panel's queue"
    );
    (ctx, stalled.pop().unwrap(), srv)
}

/// `asbgw_panels_held_bytes` from the server's `/metrics`.
async fn held_bytes(addr: std::net::SocketAddr) -> usize {
    let (status, _, metrics) = http::get(addr, "/metrics").await;
    assert_eq!(status, 200);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("asbgw_panels_held_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no asbgw_panels_held_bytes in {metrics}"))
}

/// [`stall_scenario`] with `stalled` stalled panels and, if given, a shared pool of
/// evicted frames of `held_pool` bytes (a multiple of `HELD_POOL_PANELS`, or less than
/// it for an empty pool).
async fn stall_scenario_with(
    policy: &str,
    held_pool: Option<usize>,
    stalled: usize,
) -> (Arc<asb_gateway::app::Context>, Vec<Client>, Running) {
    let ctx = ctx(&format!(
        "[journal]\nevents = 64\nunsettled = 4\n[panels]\nslow_policy = \"{policy}\"\n"
    ));
    let mut settings = ctx.panel_settings();
    if let Some(bytes) = held_pool {
        // The pool is HELD_POOL_PANELS (fewer than the 256 max_panels) queues.
        settings.held_queue = bytes / asb_gateway::budget::HELD_POOL_PANELS;
    }
    let srv = start_with(ctx.clone(), settings, Options::default()).await;
    let mut clients = Vec::new();
    for _ in 0..stalled {
        clients.push(stalled_client(srv.addr).await);
    }
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(srv.addr, "").await;
        assert_eq!(next_json(&mut ws).await["type"], "hello");
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while (got.len() as u64) < STALL_EVENTS {
                let f = next_json(&mut ws).await;
                assert_eq!(f["type"], "event", "a reading panel got {f}");
                got.push(f["seq"].as_u64().unwrap());
                received.fetch_add(1, Ordering::Relaxed);
            }
            got
        }));
    }
    let body = format!("\"{}\"", "x".repeat(1000));
    let started = Instant::now();
    for seq in 1..=STALL_EVENTS {
        append(&ctx, "line1/temp", &body);
        if seq % 16 == 0 {
            // keep the reading panels within the journal's 64 events
            while received.load(Ordering::Relaxed) < 2 * seq {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "readers stalled"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    for r in readers {
        let got = tokio::time::timeout(T, r).await.unwrap().unwrap();
        assert_eq!(
            got,
            (1..=STALL_EVENTS).collect::<Vec<_>>(),
            "full stream, in order"
        );
    }
    (ctx, clients, srv)
}

/// Three stalled panels hold the same evicted events: the pool pays for each frame once,
/// so a pool of two queues holds all three (charged per panel, it would need three).
#[tokio::test]
async fn stalled_panels_holding_the_same_events_pay_for_them_once() {
    let pool = 2 * asb_gateway::budget::PANEL_WRITE_BUFFER;
    let (ctx, _stalled, srv) = stall_scenario_with("skip", Some(pool), 3).await;
    // the reading panels hang up; the three stalled ones stay
    wait_until(|| ctx.metrics.panels_connected.get() == 3).await;
    assert_eq!(ctx.metrics.panels_disconnected_held.get(), 0);
    let held = held_bytes(srv.addr).await;
    assert!(held > 0 && held <= pool, "held {held} B");
    srv.stop().await;
}

/// Stalled panels hold what they queued after the journal evicts it, within the shared
/// pool: with a pool too small for any of it, each stalled panel is closed (without a
/// close frame: its last frame may be half written), the reading panels get every
/// event, and the server lets go of what the stalled ones held.
#[tokio::test]
async fn stalled_panels_that_do_not_fit_the_shared_pool_are_closed() {
    let (ctx, stalled, srv) = stall_scenario_with("skip", Some(1), 3).await;
    wait_until(|| ctx.metrics.panels_disconnected_held.get() == 3).await;
    wait_until(|| ctx.metrics.panels_connected.get() == 0).await;
    for mut ws in stalled {
        // What the kernel buffered, then the end of the stream without a close frame.
        let end = loop {
            match tokio::time::timeout(T, ws.next()).await.unwrap() {
                Some(Ok(Message::Text(_))) => continue,
                other => break other,
            }
        };
        assert!(
            !matches!(end, Some(Ok(Message::Close(Some(_))))),
            "closed with a close frame: {end:?}"
        );
    }
    let (status, _, metrics) = http::get(srv.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("asbgw_panels_held_bytes 0\n"),
        "the closed panels gave their claims back"
    );
    assert!(metrics.contains("asbgw_panels_disconnected_held_total 3\n"));
    srv.stop().await;
}

#[tokio::test]
async fn stalled_panel_never_slows_others_and_then_gets_a_gap() {
    let (ctx, mut stalled, srv) = stall_scenario("skip").await;
    // The stalled panel's queue was evicted from the journal under it: its claim on the
    // shared pool is at most one queue of events.
    let held = held_bytes(srv.addr).await;
    assert!(
        held > 0 && held <= asb_gateway::budget::PANEL_WRITE_BUFFER,
        "held {held} B"
    );
    // Now read the stalled panel: what was buffered, then a gap, then the newest events.
    let mut events = Vec::new();
    let mut gap = None;
    while events.last() != Some(&STALL_EVENTS) {
        let f = next_json(&mut stalled).await;
        match f["type"].as_str() {
            Some("event") => events.push(f["seq"].as_u64().unwrap()),
            Some("gap") => {
                assert!(gap.is_none(), "one gap expected");
                assert_eq!(f["reason"], "lagged");
                gap = Some((f["from"].as_u64().unwrap(), f["to"].as_u64().unwrap()));
            }
            _ => panic!("unexpected {f}"),
        }
    }
    let (from, to) = gap.expect("the stalled panel gets a gap");
    let before: Vec<u64> = events.iter().copied().filter(|s| *s < from).collect();
    let after: Vec<u64> = events.iter().copied().filter(|s| *s > to).collect();
    // contiguous before the gap, contiguous after it, nothing missing in between
    assert_eq!(before, (1..from).collect::<Vec<_>>());
    assert_eq!(after, (to + 1..=STALL_EVENTS).collect::<Vec<_>>());
    // what the server held for it was bounded by its buffers, not by the backlog
    assert!(
        before.len() < 200,
        "{} events were queued for a stalled panel",
        before.len()
    );
    assert_eq!(ctx.metrics.gaps.get(), 1);
    assert_eq!(ctx.metrics.events_skipped.get(), to - from + 1);
    assert_eq!(ctx.metrics.panels_disconnected_slow.get(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn stalled_panel_is_closed_under_disconnect_policy() {
    let (ctx, mut stalled, srv) = stall_scenario("disconnect").await;
    let mut last = 0;
    let code = loop {
        match tokio::time::timeout(T, stalled.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let f: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(f["type"], "event", "no gap under disconnect: {f}");
                let seq = f["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1);
                last = seq;
            }
            Some(Ok(Message::Close(Some(c)))) => break c.code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Policy);
    assert!(last < STALL_EVENTS);
    assert_eq!(ctx.metrics.panels_disconnected_slow.get(), 1);
    assert_eq!(ctx.metrics.gaps.get(), 0);
    // the reading panels have hung up; the server let go of the stalled one too
    wait_until(|| ctx.metrics.panels_connected.get() == 0).await;
    srv.stop().await;
}

#[tokio::test]
async fn refusals_401_403_503_and_token_scopes() {
    use sha2::Digest;
    let h = hex(&sha2::Sha256::digest(b"line1-secret"));
    let ctx = ctx(&format!(
        "[panels]\nmax_panels = 2\nallowed_origins = [\"http://panel.local:8080\"]\n\
         [[panels.tokens]]\nname = \"line1\"\nsha256 = \"{h}\"\nallow = [\"line1/#\"]\n"
    ));
    let srv = start(ctx.clone(), Options::default()).await;
    let a = srv.addr;
    assert_eq!(status_of(try_connect(a, "", None, &[]).await), 401);
    assert_eq!(
        status_of(try_connect(a, "token=wrong", None, &[]).await),
        401
    );
    assert_eq!(
        status_of(try_connect(a, "", None, &[("Authorization", "Bearer nope")]).await),
        401
    );
    assert_eq!(
        status_of(
            try_connect(
                a,
                "token=line1-secret",
                None,
                &[("Origin", "http://evil.example")]
            )
            .await
        ),
        403
    );
    assert_eq!(
        status_of(try_connect(a, "token=line1-secret&filter=a/%23/b", None, &[]).await),
        400
    );
    assert_eq!(
        status_of(try_connect(a, "token=line1-secret", Some("mqtt"), &[]).await),
        400
    );

    // the allowed origin, the token in the query; default filters = the token's
    let mut p1 = try_connect(
        a,
        "token=line1-secret",
        None,
        &[("Origin", "http://panel.local:8080")],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut p1).await["filters"], json!(["line1/#"]));
    // bearer token; a filter outside the token's scope is refused with an error frame
    let mut p2 = try_connect(
        a,
        "filter=line1/temp&filter=line2/temp",
        None,
        &[("Authorization", "Bearer line1-secret")],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut p2).await["filters"], json!(["line1/temp"]));
    let e = next_json(&mut p2).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden_filter"))
    );
    send_op(&mut p2, json!({"op":"subscribe","filters":["#"]})).await;
    let before = barrier(&mut p2).await;
    assert_eq!(before[0]["code"], "forbidden_filter");
    append(&ctx, "line2/temp", "{}");
    append(&ctx, "line1/temp", "{}");
    assert_eq!(seqs(&read_events(&mut p2, 1).await), [2]);

    // the third panel is over max_panels = 2
    assert_eq!(
        status_of(try_connect(a, "token=line1-secret", None, &[]).await),
        503
    );
    drop(p1);
    let t0 = Instant::now();
    let mut p3 = loop {
        match try_connect(a, "token=line1-secret", None, &[]).await {
            Ok(ws) => break ws,
            Err(_) => {
                assert!(t0.elapsed() < T, "slot not released");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(next_json(&mut p3).await["type"], "hello");

    let m = &ctx.metrics;
    assert_eq!(
        m.panels_rejected
            .of(asb_gateway::metrics::RejectReason::Unauthorized)
            .get(),
        3
    );
    assert_eq!(
        m.panels_rejected
            .of(asb_gateway::metrics::RejectReason::Origin)
            .get(),
        1
    );
    assert_eq!(
        m.panels_rejected
            .of(asb_gateway::metrics::RejectReason::BadRequest)
            .get(),
        2
    );
    assert!(
        m.panels_rejected
            .of(asb_gateway::metrics::RejectReason::Full)
            .get()
            >= 1
    );
    srv.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "").await;
    next_json(&mut ws).await;
    // 4 KiB is allowed (and is garbage: an error frame)
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_json");
    ws.send(Message::text("x".repeat(4097))).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, CloseCode::Size);
    srv.stop().await;
}

#[tokio::test]
async fn garbage_ops_get_error_frames_and_the_session_goes_on() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "").await;
    next_json(&mut ws).await;
    ws.send(Message::text("not json")).await.unwrap();
    ws.send(Message::binary(vec![0xff, 0xfe, 0x00]))
        .await
        .unwrap();
    ws.send(Message::text(r#"{"op":"dance"}"#)).await.unwrap();
    ws.send(Message::text(r#"{"op":"subscribe"}"#))
        .await
        .unwrap();
    ws.send(Message::text(r#"[1,2,3]"#)).await.unwrap();
    ws.send(Message::binary(br#"{"op":"ping"}"#.to_vec()))
        .await
        .unwrap();
    let mut codes = Vec::new();
    loop {
        let f = next_json(&mut ws).await;
        if f["type"] == "pong" {
            break;
        }
        assert_eq!(f["type"], "error");
        assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()));
        codes.push(f["code"].as_str().unwrap().to_string());
    }
    assert_eq!(
        codes,
        ["bad_json", "bad_utf8", "unknown_op", "bad_op", "bad_json"]
    );
    append(&ctx, "a/b", "{}");
    assert_eq!(seqs(&read_events(&mut ws, 1).await), [1]);
    srv.stop().await;
}

#[tokio::test]
async fn server_pings_and_drops_silent_panels() {
    let ctx = ctx("");
    let opts = Options {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(500),
        ..Options::default()
    };
    let srv = start(ctx.clone(), opts).await;
    // A panel that reads (and so answers pings) stays.
    let mut alive = connect(srv.addr, "").await;
    // The silent panel is a raw socket that sends nothing after its handshake (a
    // WebSocket library would answer pings as soon as it reads).
    let mut silent = ws_raw::upgrade(srv.addr).await;
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        match tokio::time::timeout(Duration::from_millis(200), alive.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) => {}
            Err(_) => {}
            other => panic!("the live panel got {other:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings");
    append(&ctx, "a/b", "{}");
    assert_eq!(seqs(&read_events(&mut alive, 1).await), [1]);
    // The silent one was dropped: hello, pings, then a close frame (1008).
    wait_until(|| ctx.metrics.panels_connected.get() == 1).await;
    let mut raw = Vec::new();
    tokio::time::timeout(
        T,
        tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut raw),
    )
    .await
    .unwrap()
    .unwrap();
    let frames = ws_raw::server_frames(&raw);
    assert_eq!(frames[0].0, 0x1, "hello text frame first");
    assert!(
        frames[1..frames.len() - 1].iter().all(|f| f.0 == 0x9),
        "then pings"
    );
    assert!(frames.len() >= 4, "pings were sent: {frames:?}");
    let (op, payload) = frames.last().unwrap();
    assert_eq!(*op, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_closes_panels_with_1001_quickly() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let mut panels = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(srv.addr, "").await;
        next_json(&mut ws).await;
        panels.push(ws);
    }
    // an idle HTTP keep-alive connection must not hold shutdown up either
    let _idle = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let t0 = Instant::now();
    srv.trigger.fire();
    for ws in &mut panels {
        assert_eq!(expect_close(ws).await, CloseCode::Away);
    }
    tokio::time::timeout(Duration::from_secs(3), srv.task)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(srv.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ctx = ctx("");
    let opts = Options {
        handshake_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let srv = start(ctx, opts).await;
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("the server closes a slow request");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!String::from_utf8_lossy(&buf).contains("101"));
    srv.stop().await;
}

/// A tiny parser of the Prometheus text format: `# HELP`, `# TYPE`, `name{labels} value`.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut samples = std::collections::BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("metric name");
            let value = parts.next().expect("help or type text");
            assert!(kind == "HELP" || kind == "TYPE", "{line}");
            if kind == "TYPE" {
                assert!(["counter", "gauge", "histogram"].contains(&value), "{line}");
                typed.insert(name.to_string());
            }
            continue;
        }
        assert!(!line.is_empty(), "blank line in exposition");
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.starts_with("asbgw_"),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .expect("labels in braces");
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        // A histogram's samples are its name with _bucket, _sum or _count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        samples.insert(
            series.to_string(),
            value.parse::<f64>().expect("numeric value"),
        );
    }
    samples
}

#[tokio::test]
async fn metrics_health_page_and_404() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    let (status, head, body) = http::get(srv.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4")
    );
    let m0 = parse_prometheus(&body);
    assert_eq!(m0["asbgw_frames_sent_total"], 0.0);
    assert_eq!(m0["asbgw_panels_connected"], 0.0);

    let mut ws = connect(srv.addr, "").await;
    next_json(&mut ws).await;
    for _ in 0..5 {
        append(&ctx, "a/b", "{}");
    }
    read_events(&mut ws, 5).await;
    let m1 = parse_prometheus(&http::get(srv.addr, "/metrics").await.2);
    assert_eq!(m1["asbgw_frames_sent_total"], 6.0, "hello + 5 events");
    assert_eq!(m1["asbgw_panels_connected"], 1.0);
    assert_eq!(m1["asbgw_journal_events"], 5.0);
    assert!(m1["asbgw_journal_bytes"] > 0.0);
    assert_eq!(
        m1["asbgw_panels_rejected_total{reason=\"unauthorized\"}"],
        0.0
    );
    // A panel is a task while it is connected, and gone once it closes.
    let tasks = |m: &std::collections::BTreeMap<String, f64>| m["asbgw_tasks_alive"];
    assert!(tasks(&m1) > tasks(&m0), "{} vs {}", tasks(&m1), tasks(&m0));
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = parse_prometheus(&http::get(srv.addr, "/metrics").await.2);
        if m["asbgw_panels_connected"] == 0.0 && tasks(&m) <= tasks(&m0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "panel task still alive: {} > {}",
            tasks(&m),
            tasks(&m0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // health follows the part states
    let (status, _, body) = http::get(srv.addr, "/healthz").await;
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source"], "starting");
    ctx.metrics.source_state.set(PartState::Up);
    let (status, _, body) = http::get(srv.addr, "/healthz").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["panels"].as_u64()),
        (Some("ok"), Some(0))
    );

    let (status, _, page) = http::get(srv.addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"state\"") && page.contains("page.js"));
    let (status, _, js) = http::get(srv.addr, "/page.js").await;
    assert_eq!(status, 200);
    assert!(js.contains("asbgw.v1.json"));
    assert_eq!(http::get(srv.addr, "/nope").await.0, 404);
    assert_eq!(
        http::get(srv.addr, "/v1/stream").await.0,
        400,
        "not an upgrade"
    );
    srv.stop().await;
}

#[tokio::test]
async fn gap_frames_in_postcard() {
    let ctx = ctx("[journal]\nevents = 8\nunsettled = 4\n");
    let srv = start(ctx.clone(), Options::default()).await;
    for _ in 0..20 {
        append(&ctx, "a/b", "x");
    }
    let mut p = try_connect(
        srv.addr,
        &format!("since={EPOCH}:2"),
        Some("asbgw.v1.postcard"),
        &[],
    )
    .await
    .unwrap();
    let mut frames = Vec::new();
    for _ in 0..3 {
        let Message::Binary(b) = next_msg(&mut p).await else {
            panic!("binary expected")
        };
        frames.push(b);
    }
    assert!(matches!(
        postcard::from_bytes::<Frame>(&frames[0]),
        Ok(Frame::Hello { .. })
    ));
    assert_eq!(
        postcard::from_bytes::<Frame>(&frames[1]).unwrap(),
        Frame::Gap {
            from: 3,
            to: 12,
            reason: GapReason::Expired
        }
    );
    match postcard::from_bytes::<Frame>(&frames[2]).unwrap() {
        Frame::Event(e) => assert_eq!((e.seq, e.body), (13, Body::Text("x"))),
        f => panic!("{f:?}"),
    }
    srv.stop().await;
}

/// A token may allow more filters than a panel may hold (`MAX_FILTERS`); a panel that
/// takes the default (the token's list) holds the first eight and gets one
/// `too_many_filters` error, not one per filter left over (each would be a frame queued
/// before the panel reads anything).
#[tokio::test]
async fn a_long_allow_list_as_the_default_gives_eight_filters_and_one_error() {
    use sha2::Digest;
    let h = hex(&sha2::Sha256::digest(b"wide-secret"));
    let allow: Vec<String> = (0..12).map(|i| format!("\"line{i}/#\"")).collect();
    let ctx = ctx(&format!(
        "[[panels.tokens]]\nname = \"wide\"\nsha256 = \"{h}\"\nallow = [{}]\n",
        allow.join(", ")
    ));
    let srv = start(ctx.clone(), Options::default()).await;
    let mut p = try_connect(srv.addr, "token=wide-secret", None, &[])
        .await
        .unwrap();
    let hello = next_json(&mut p).await;
    assert_eq!(hello["type"], "hello");
    let want: Vec<String> = (0..8).map(|i| format!("line{i}/#")).collect();
    assert_eq!(hello["filters"], json!(want));
    let before = barrier(&mut p).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "error");
    assert_eq!(before[0]["code"], "too_many_filters");
    srv.stop().await;
}

/// A panel that is behind — here replaying 3,000 events — has its queue refilled after
/// every flush; its pings and ops are still read between flushes, not only once it has
/// caught up (a client keepalive would time out, an unsubscribe meant to catch up would
/// come too late).
#[tokio::test]
async fn a_panel_that_is_behind_gets_its_pong_before_it_catches_up() {
    let ctx = ctx("");
    let body = format!("{{\"p\":\"{}\"}}", "x".repeat(200));
    for _ in 0..3000 {
        append(&ctx, "line1/temp", &body);
    }
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, &format!("since={EPOCH}:0")).await;
    send_op(&mut ws, json!({"op":"ping"})).await;
    let mut events = 0;
    loop {
        let m = next_json(&mut ws).await;
        match m["type"].as_str() {
            Some("event") => events += 1,
            Some("pong") => break,
            _ => {}
        }
        assert!(events < 3000, "no pong before the replay ended");
    }
    assert!(
        events < 1000,
        "the pong came after {events} of 3,000 replayed events"
    );
    srv.stop().await;
}
