//! Last values (issue 15): `last=true` on the stream, the `last` op and `GET /v1/last`,
//! against the real panel server with real WebSocket clients. Each test asserts what a
//! panel sees: one event per matching topic (the newest), token scopes, `synced`, then
//! the live stream without a gap or a duplicate.

use std::collections::BTreeMap;

use crate::support::http;
use crate::support::panels::*;
use asb_gateway::event::Frame;
use asb_gateway::panels::Options;
use serde_json::{Value, json};
use sha2::Digest;
use tokio_tungstenite::tungstenite::Message;

/// Appends: a/temp ×3, a/state, b/temp ×2, c/alarm, line1/x, line2/x. Returns the seq
/// of each topic's newest event.
fn history(ctx: &asb_gateway::app::Context) -> BTreeMap<String, u64> {
    let mut newest = BTreeMap::new();
    for (i, topic) in [
        "a/temp", "a/state", "a/temp", "b/temp", "c/alarm", "a/temp", "b/temp", "line1/x",
        "line2/x",
    ]
    .iter()
    .enumerate()
    {
        let seq = append(ctx, topic, &format!("{{\"v\":{i}}}"));
        newest.insert(topic.to_string(), seq);
    }
    newest
}

/// Frames up to and including `synced`.
async fn until_synced(ws: &mut Client) -> (Vec<Value>, u64) {
    let mut out = Vec::new();
    loop {
        let f = next_json(ws).await;
        if f["type"] == "synced" {
            return (out, f["latest"].as_u64().unwrap());
        }
        out.push(f);
    }
}

fn topics_and_seqs(frames: &[Value]) -> Vec<(String, u64)> {
    frames
        .iter()
        .map(|f| {
            assert_eq!(f["type"], "event", "{f}");
            assert_eq!(f["last"], true, "a last value is flagged: {f}");
            (
                f["topic"].as_str().unwrap().to_string(),
                f["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The expected last values for these filters' topics, in seq order.
fn expected(newest: &BTreeMap<String, u64>, keep: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = newest
        .iter()
        .filter(|(t, _)| keep(t))
        .map(|(t, s)| (t.clone(), *s))
        .collect();
    v.sort_by_key(|(_, s)| *s);
    v
}

#[tokio::test]
async fn last_true_gives_the_newest_per_topic_then_synced_then_live() {
    let ctx = ctx("");
    let newest = history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "last=true&filter=a/%23&filter=b/%23").await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    let (values, latest) = until_synced(&mut ws).await;
    assert_eq!(
        topics_and_seqs(&values),
        expected(&newest, |t| t.starts_with("a/") || t.starts_with("b/"))
    );
    assert_eq!(latest, ctx.journal.latest());
    assert_eq!(hello["latest"], latest);
    // the body and metadata are those of the stored event
    assert_eq!(values[0]["body"], json!({"v": 1}), "a/state's newest");
    // live from latest + 1: the next matching event, not flagged, no gap, no repeat
    append(&ctx, "c/alarm", "{}"); // not matching
    let live = append(&ctx, "a/temp", "{\"v\":99}");
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64()),
        (Some("event"), Some(live))
    );
    assert!(f.get("last").is_none(), "{f}");
    assert!(barrier(&mut ws).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn postcard_panels_get_last_and_synced_frames() {
    let ctx = ctx("");
    let newest = history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = try_connect(
        srv.addr,
        "last=true&filter=c/%23",
        Some("asbgw.v1.postcard"),
        &[],
    )
    .await
    .unwrap();
    let mut frames = Vec::new();
    loop {
        let Message::Binary(b) = next_msg(&mut ws).await else {
            panic!("postcard frames are binary")
        };
        let f: Frame<'_> = postcard::from_bytes(&b).unwrap();
        let done = matches!(f, Frame::Synced { .. });
        frames.push(match f {
            Frame::Hello { .. } => "hello".to_string(),
            Frame::Last(e) => format!("last {} {}", e.topic, e.seq),
            Frame::Synced { latest } => format!("synced {latest}"),
            other => panic!("unexpected {other:?}"),
        });
        if done {
            break;
        }
    }
    assert_eq!(
        frames,
        [
            "hello".to_string(),
            format!("last c/alarm {}", newest["c/alarm"]),
            format!("synced {}", ctx.journal.latest()),
        ]
    );
    srv.stop().await;
}

#[tokio::test]
async fn token_scopes_limit_last_values_on_the_stream_and_over_http() {
    let h = hex(&sha2::Sha256::digest(b"line1-secret"));
    let ctx = ctx(&format!(
        "[[panels.tokens]]\nname = \"line1\"\nsha256 = \"{h}\"\nallow = [\"line1/#\"]\n"
    ));
    let newest = history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    let only_line1 = expected(&newest, |t| t.starts_with("line1/"));
    // default filters = the token's scope
    let mut ws = connect(srv.addr, "token=line1-secret&last=true").await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let (values, _) = until_synced(&mut ws).await;
    assert_eq!(topics_and_seqs(&values), only_line1);
    // asking for more than the scope: an error frame, and nothing outside it
    let mut ws = connect(srv.addr, "token=line1-secret&last=true&filter=%23").await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let (frames, _) = until_synced(&mut ws).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["code"], "forbidden_filter");
    // the same rules over HTTP
    let (status, _, body) = http::get(srv.addr, "/v1/last?token=line1-secret").await;
    assert_eq!(status, 200, "{body}");
    let arr: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(topics_and_seqs(&arr), only_line1);
    let (status, _, body) = http::get(srv.addr, "/v1/last?token=line1-secret&filter=%23").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");
    let (status, _, _) = http::get(srv.addr, "/v1/last").await;
    assert_eq!(status, 401);
    let (status, _, _) = http::get(srv.addr, "/v1/last?token=wrong").await;
    assert_eq!(status, 401);
    let metrics = http::get(srv.addr, "/metrics").await.2;
    assert!(
        metrics.contains("asbgw_panels_rejected_total{reason=\"forbidden\"} 1"),
        "{metrics}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn http_last_returns_the_same_objects_as_the_stream() {
    let ctx = ctx("");
    history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    for query in [
        "",
        "filter=a/%23",
        "filter=%2B/temp&filter=c/%23",
        "filter=none/%23",
    ] {
        let mut ws = connect(srv.addr, &format!("last=true&{query}")).await;
        next_json(&mut ws).await;
        let (values, _) = until_synced(&mut ws).await;
        let (status, head, body) = http::get(srv.addr, &format!("/v1/last?{query}")).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        let arr: Vec<Value> = serde_json::from_str(&body).expect("a JSON array");
        assert_eq!(arr, values, "{query}");
    }
    // bad input is refused with the reason
    let (status, _, body) = http::get(srv.addr, "/v1/last?filter=a/%23/b").await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = http::request(srv.addr, "POST", "/v1/last").await;
    assert_eq!(status, 405);
    assert_eq!(
        status_of(try_connect(srv.addr, "last=maybe", None, &[]).await),
        400
    );
    srv.stop().await;
}

#[tokio::test]
async fn last_composes_with_since_and_the_op_resyncs() {
    let ctx = ctx("");
    let newest = history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    let latest = ctx.journal.latest();
    // last values, synced, then the replay after `since`
    let since = latest - 2;
    let mut ws = connect(srv.addr, &format!("last=true&since={EPOCH}:{since}")).await;
    next_json(&mut ws).await;
    let (values, synced) = until_synced(&mut ws).await;
    assert_eq!(topics_and_seqs(&values), expected(&newest, |_| true));
    assert_eq!(synced, latest);
    let mut got = Vec::new();
    for _ in 0..2 {
        let f = next_json(&mut ws).await;
        assert!(f.get("last").is_none(), "{f}");
        got.push(f["seq"].as_u64().unwrap());
    }
    assert_eq!(got, [latest - 1, latest]);
    // the op: the values current now, then live from after them
    let newer = append(&ctx, "b/temp", "{\"v\":100}");
    assert_eq!(next_json(&mut ws).await["seq"], newer);
    send_op(&mut ws, json!({"op": "subscribe", "filters": ["b/#"]})).await;
    send_op(&mut ws, json!({"op": "unsubscribe", "filters": ["#"]})).await;
    send_op(&mut ws, json!({"op": "last"})).await;
    let (values, synced) = until_synced(&mut ws).await;
    assert_eq!(topics_and_seqs(&values), [("b/temp".to_string(), newer)]);
    assert_eq!(synced, newer);
    let live = append(&ctx, "b/temp", "{}");
    assert_eq!(next_json(&mut ws).await["seq"], live);
    srv.stop().await;
}

#[tokio::test]
async fn a_thousand_topics_arrive_in_pages_and_the_table_evicts_beyond_its_capacity() {
    // 1,100 topics into a table of 1,000: the 100 least recently updated are evicted
    let ctx = ctx("[panels]\nlast_values = 1000\n[journal]\nevents = 2048\n");
    for i in 0..1100 {
        append(
            &ctx,
            &format!("line{}/station{i}/temp", i % 3),
            "{\"celsius\":21.5}",
        );
    }
    let srv = start(ctx.clone(), Options::default()).await;
    // far more than one write buffer of frames: sent in pages, all of them, in order
    let mut ws = connect(srv.addr, "last=true").await;
    next_json(&mut ws).await;
    let (values, synced) = until_synced(&mut ws).await;
    let seqs: Vec<u64> = topics_and_seqs(&values)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(seqs, (101..=1100).collect::<Vec<u64>>());
    assert_eq!(synced, 1100);
    let (_, _, body) = http::get(srv.addr, "/v1/last").await;
    let arr: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        arr, values,
        "the streamed HTTP body holds the same 1,000 objects"
    );
    let metrics = http::get(srv.addr, "/metrics").await.2;
    for line in [
        "asbgw_last_values 1000",
        "asbgw_last_values_evicted_total 100",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn quiet_topics_outlive_the_journal_within_their_byte_limit() {
    // a journal of 8 events: a topic quiet for longer than that keeps its last value
    // in the table, up to panels.last_values_mib (here 1 MiB: all of them fit)
    let ctx = ctx("[journal]\nevents = 8\nunsettled = 8\n");
    let quiet = append(&ctx, "line3/press/state", "{\"state\":\"stopped\"}");
    for _ in 0..50 {
        append(&ctx, "line1/press/temp", "{\"celsius\":40}");
    }
    assert!(ctx.journal.oldest() > quiet, "the journal no longer has it");
    let srv = start(ctx.clone(), Options::default()).await;
    let (_, _, body) = http::get(srv.addr, "/v1/last").await;
    let arr: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        topics_and_seqs(&arr),
        [
            ("line3/press/state".to_string(), quiet),
            ("line1/press/temp".to_string(), ctx.journal.latest())
        ]
    );
    assert_eq!(arr[0]["body"], json!({"state": "stopped"}));
    let metrics = http::get(srv.addr, "/metrics").await.2;
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("asbgw_last_values_bytes "))
        .expect("asbgw_last_values_bytes")
        .parse()
        .unwrap();
    assert!(
        bytes > 0 && bytes < 4096,
        "one small event outside the journal: {bytes}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn last_values_zero_keeps_no_table() {
    let ctx = ctx("[panels]\nlast_values = 0\n");
    history(&ctx);
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "last=true").await;
    next_json(&mut ws).await;
    let (values, synced) = until_synced(&mut ws).await;
    assert!(values.is_empty(), "{values:?}");
    assert_eq!(synced, ctx.journal.latest());
    assert_eq!(http::get(srv.addr, "/v1/last").await.2, "[]");
    srv.stop().await;
}
