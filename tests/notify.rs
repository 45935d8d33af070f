//! The systemd notify protocol against a real `AF_UNIX` datagram socket standing in for
//! the service manager: READY=1, STATUS= lines, WATCHDOG=1 at half of `WATCHDOG_USEC`
//! while the data path beats, and no pings once it is wedged (directly, and through the
//! daemon's `ASBGW_TEST_WEDGE_AFTER_MS` hook).
//!
//! The notify functions read `NOTIFY_SOCKET` / `WATCHDOG_USEC` from the process
//! environment, so this test sets them. That is only sound because nothing else runs in
//! this process: nextest runs every test in its own process, and this file holds a single
//! test so plain `cargo test` (one process per test file) is safe too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::appliance::notify;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::liveness::{Liveness, Part};
use asb_gateway::metrics::PartState;
use asb_gateway::shutdown;
use tokio::net::UnixDatagram;

const CONFIG: &str = r#"
[source]
connection_string = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
[[source.subscriptions]]
topic = "t"
subscription = "s"
"#;

/// The next datagram that starts with `prefix`, skipping others; None on timeout.
async fn next_with(sock: &UnixDatagram, prefix: &str, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .expect("recv on the notify socket");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.starts_with(prefix) {
            return Some(msg);
        }
    }
}

/// Arrival times of WATCHDOG=1 pings during `window`.
async fn pings_during(sock: &UnixDatagram, window: Duration) -> Vec<Instant> {
    let end = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    while let Some(left) = end.checked_duration_since(tokio::time::Instant::now()) {
        match next_with(sock, "WATCHDOG=1", left).await {
            Some(_) => out.push(Instant::now()),
            None => break,
        }
    }
    out
}

fn beat_forever(l: Arc<Liveness>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        l.register(Part::Source);
        l.register(Part::Journal);
        loop {
            l.beat(Part::Source);
            l.beat(Part::Journal);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_and_watchdog_gated_on_liveness() {
    let dir = std::env::temp_dir().join(format!("asbgw-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    // SAFETY: the only test in this process (see the module comment); set before any
    // other thread reads the environment.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "400000");
        std::env::remove_var("WATCHDOG_PID");
        std::env::remove_var(notify::TEST_WEDGE_ENV);
    }

    // READY=1
    notify::ready();
    assert_eq!(
        next_with(&sock, "READY=", Duration::from_secs(2))
            .await
            .as_deref(),
        Some("READY=1\n")
    );

    // STATUS= at once, and again on a state change.
    let ctx = Context::new(Config::parse(CONFIG, &LoadEnv::default()).unwrap());
    let (trigger, sd) = shutdown::channel();
    let reporter = tokio::spawn(notify::status_reporter(ctx.metrics.clone(), sd.clone()));
    let first = next_with(&sock, "STATUS=", Duration::from_secs(2))
        .await
        .expect("a STATUS line at start");
    assert!(
        first.starts_with("STATUS=source starting, mirror disabled"),
        "{first}"
    );
    ctx.metrics.received.add(3);
    ctx.metrics.source_state.set(PartState::Up);
    let changed = next_with(&sock, "STATUS=", Duration::from_secs(2))
        .await
        .expect("a STATUS line on the state change");
    assert!(
        changed.starts_with("STATUS=source up, mirror disabled; received 3"),
        "{changed}"
    );
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(2), reporter)
        .await
        .expect("status reporter stops on shutdown")
        .unwrap();

    // WATCHDOG=1 every ~200 ms (half of 400 ms) while the data path beats.
    let liveness = ctx.liveness.clone();
    let beats = beat_forever(liveness.clone());
    let (trigger, sd) = shutdown::channel();
    let dog = tokio::spawn(notify::watchdog(liveness.clone(), sd));
    let pings = pings_during(&sock, Duration::from_millis(1300)).await;
    // About 6 expected; the bounds leave room for a loaded CI machine.
    assert!(
        (3..=9).contains(&pings.len()),
        "expected about 6 pings in 1.3 s, got {}",
        pings.len()
    );
    let mut gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        (150..=350).contains(&median),
        "median ping interval {median} ms: {gaps:?}"
    );

    // Wedge the data path: pings stop within the watchdog interval (+ one tick)...
    liveness.wedge();
    let settle = pings_during(&sock, Duration::from_millis(700)).await;
    assert!(settle.len() <= 3, "{} pings after wedging", settle.len());
    // ...and stay stopped.
    let after = pings_during(&sock, Duration::from_millis(1200)).await;
    assert!(
        after.is_empty(),
        "{} pings from a wedged data path",
        after.len()
    );
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(2), dog)
        .await
        .expect("watchdog stops on shutdown")
        .unwrap();
    beats.abort();

    // The daemon's hook: ASBGW_TEST_WEDGE_AFTER_MS wedges a healthy data path.
    // SAFETY: as above.
    unsafe { std::env::set_var(notify::TEST_WEDGE_ENV, "600") };
    let liveness = Liveness::new();
    let beats = beat_forever(liveness.clone());
    let (trigger, sd) = shutdown::channel();
    let dog = tokio::spawn(notify::watchdog(liveness.clone(), sd));
    let before = pings_during(&sock, Duration::from_millis(500)).await;
    assert!(
        before.len() >= 2,
        "pings before the hook fires: {}",
        before.len()
    );
    let _ = pings_during(&sock, Duration::from_millis(900)).await;
    assert!(liveness.is_wedged());
    let after = pings_during(&sock, Duration::from_millis(1000)).await;
    assert!(
        after.is_empty(),
        "{} pings after the hook fired",
        after.len()
    );
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(2), dog)
        .await
        .unwrap()
        .unwrap();
    beats.abort();

    // Without WATCHDOG_USEC the watchdog task is a no-op that returns at once.
    // SAFETY: as above.
    unsafe { std::env::remove_var("WATCHDOG_USEC") };
    let (_trigger, sd) = shutdown::channel();
    tokio::time::timeout(
        Duration::from_secs(1),
        notify::watchdog(Liveness::new(), sd),
    )
    .await
    .expect("watchdog returns when the watchdog is disabled");
    // WATCHDOG_USEC=0 is off too (WatchdogSec=0), not a timer of period zero (a panic).
    // SAFETY: as above.
    unsafe { std::env::set_var("WATCHDOG_USEC", "0") };
    let (_trigger, sd) = shutdown::channel();
    let l = Liveness::new();
    assert_eq!(l.beat_interval(), asb_gateway::liveness::BEAT_INTERVAL);
    tokio::time::timeout(Duration::from_secs(1), notify::watchdog(l, sd))
        .await
        .expect("watchdog returns when WATCHDOG_USEC is 0");
    unsafe { std::env::remove_var("WATCHDOG_USEC") };

    std::fs::remove_dir_all(&dir).unwrap();
}
