//! The real daemon under a stand-in service manager: `asb-gateway run` with
//! `NOTIFY_SOCKET` (a datagram socket of this test) and `WATCHDOG_USEC`, against the
//! emulator. It must send READY=1 once serving, STATUS= lines, WATCHDOG=1 at about half
//! the interval while the data path beats — and no pings once the data path is wedged
//! (through the daemon's test hook `ASBGW_TEST_WEDGE_AFTER_MS`).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::daemon::Daemon;

/// Datagrams received until `until`, each with its arrival time.
fn collect(sock: &UnixDatagram, until: Instant) -> Vec<(Instant, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_notifies_ready_status_and_gates_the_watchdog() {
    let em = support::emulator::start_default().await;
    let dir = support::TempDir::new("notify-e2e");
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n",
            em.connection_string()
        ),
    )
    .unwrap();
    let start = Instant::now();
    // Not waiting for `panels on`: the datagrams are timed as they arrive.
    let daemon = Daemon::with_config_file(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env("ASBGW_TEST_WEDGE_AFTER_MS", "2500")
        .no_wait()
        .start();
    // The watchdog (and the wedge clock) starts right before READY=1, which a loaded
    // machine may take seconds to reach: every window below is timed from READY.
    let mut healthy = Vec::new();
    let ready_at = loop {
        let got = collect(&sock, Instant::now() + Duration::from_millis(100));
        let ready = got
            .iter()
            .find(|(_, m)| m.contains("READY=1"))
            .map(|(t, _)| *t);
        healthy.extend(got);
        if let Some(t) = ready {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no READY=1 within 20 s: {healthy:?}"
        );
    };
    // READY .. +2.4 s: status and pings; wedged at about +2.5 s; the 400 ms window then
    // runs out.
    healthy.extend(collect(&sock, ready_at + Duration::from_millis(2400)));
    assert!(
        healthy.iter().any(|(_, m)| m.contains("STATUS=")),
        "no STATUS= line in {healthy:?}"
    );
    let pings: Vec<Instant> = healthy
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    // half of 400 ms: about 5 a second once running (2.4 s: about 12)
    assert!(
        pings.len() >= 5,
        "only {} pings while healthy: {healthy:?}",
        pings.len()
    );
    let gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 100 && *g <= 500),
        "ping intervals {gaps:?} ms are not about 200 ms"
    );
    let _ = collect(&sock, ready_at + Duration::from_millis(3600));
    let wedged = collect(&sock, ready_at + Duration::from_millis(5000));
    assert!(
        !wedged.iter().any(|(_, m)| m.contains("WATCHDOG=1")),
        "pings went on from a wedged data path: {wedged:?}"
    );
    drop(daemon);
    em.shutdown().await;
}
