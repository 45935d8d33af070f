//! The source's CBS authentication against the emulator: a wrong key is a clear error,
//! retried with backoff, logged once and never with the secret; tokens are renewed on
//! the live connection before they expire. (Its own test binary: it captures the
//! process-wide log.)

use std::time::Duration;

use crate::support::source::*;
use asb_gateway::emulator::client::Publisher;
use asb_gateway::source::Options;

const T: Duration = Duration::from_secs(15);
const WRONG_KEY: &str = "Wr0ngKeyThatMustNeverBeLogged";

use crate::support::emulator::start_default as emulator;

fn config(conn: &str) -> String {
    format!(
        "[source]\nconnection_string = \"{conn}\"\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n"
    )
}

#[tokio::test]
async fn wrong_key_is_a_clear_error_retried_with_backoff_and_never_logged() {
    let logs = capture_all_logs();
    let h = emulator().await;
    let conn = h.connection_string().replace("SAS_KEY_VALUE", WRONG_KEY);
    assert!(conn.contains(WRONG_KEY));
    let opts = Options {
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(800),
        ..fast()
    };
    let run = start(context(&config(&conn)), opts);
    let ctx = run.ctx.clone();
    wait_for(T, "3 reconnect attempts", || {
        ctx.metrics.source_reconnects.get() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = ctx.metrics.source_reconnects.get();
    // 100 ms doubling to 800 ms (jittered to half) over ~2-3 s: a handful, not a hot loop.
    assert!((3..=20).contains(&attempts), "{attempts} attempts");
    assert_eq!(ctx.metrics.source_state.get().as_str(), "down");
    assert_eq!(ctx.journal.latest(), 0);
    run.stop().await.unwrap();
    h.shutdown().await;

    let lines = logs.lines();
    let down: Vec<&String> = lines.iter().filter(|l| l.contains("source down")).collect();
    assert_eq!(
        down.len(),
        1,
        "state change logged once, not per retry: {down:#?}"
    );
    assert!(down[0].starts_with("WARN"), "{}", down[0]);
    assert!(
        down[0].contains(
            "CBS token for sb://127.0.0.1/operational-events/Subscriptions/edge rejected"
        ),
        "clear error: {}",
        down[0]
    );
    for l in &lines {
        assert!(!l.contains(WRONG_KEY), "secret in the log: {l}");
        assert!(!l.contains("sig="), "token in the log: {l}");
    }
}

#[tokio::test]
async fn tokens_are_renewed_on_the_live_connection_before_expiry() {
    let logs = capture_all_logs();
    let h = emulator().await;
    // Tokens live 4 s (the emulator closes a connection whose token expired); renewed
    // every 2 s. Over 9 s, without renewal the connection would be closed twice.
    let opts = Options {
        token_ttl: Some(Duration::from_secs(4)),
        token_refresh: Some(Duration::from_secs(2)),
        ..fast()
    };
    let run = start(context(&config(&h.connection_string())), opts);
    let ctx = run.ctx.clone();
    let mut p = tokio::time::timeout(
        T,
        Publisher::connect(&h.connection_string(), "operational-events"),
    )
    .await
    .unwrap()
    .unwrap();
    for i in 0..9u64 {
        p.send_json("tick", &[], format!("{{\"i\":{i}}}"), "application/json")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(T, "9 events", || ctx.journal.latest() == 9).await;
    let m = &ctx.metrics;
    assert!(
        m.token_refreshes.get() >= 3,
        "{} refreshes",
        m.token_refreshes.get()
    );
    assert_eq!(m.source_reconnects.get(), 0, "never lost the connection");
    assert_eq!(m.source_state.get().as_str(), "up");
    assert_eq!(m.completed.get(), 9);
    run.stop().await.unwrap();
    h.shutdown().await;
    for l in logs.lines() {
        assert!(!l.contains("sig="), "token in the log: {l}");
        assert!(!l.contains("SAS_KEY_VALUE"), "key in the log: {l}");
    }
}

#[tokio::test]
async fn without_renewal_an_expired_token_costs_the_connection() {
    // The control for the test above: the emulator does close a connection whose
    // token expired, and the source then reconnects by itself with a fresh token.
    let h = emulator().await;
    let opts = Options {
        token_ttl: Some(Duration::from_secs(2)),
        token_refresh: Some(Duration::from_secs(600)),
        ..fast()
    };
    let run = start(context(&config(&h.connection_string())), opts);
    let ctx = run.ctx.clone();
    wait_for(T, "a reconnect after the token expired", || {
        ctx.metrics.source_reconnects.get() >= 1
    })
    .await;
    assert_eq!(ctx.metrics.token_refreshes.get(), 0);
    let mut p = Publisher::connect(&h.connection_string(), "operational-events")
        .await
        .unwrap();
    p.send_json("tick", &[], "{}", "application/json")
        .await
        .unwrap();
    wait_for(T, "the event after reconnecting", || {
        ctx.journal.latest() == 1
    })
    .await;
    run.stop().await.unwrap();
    h.shutdown().await;
}
