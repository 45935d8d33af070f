//! The one test-support tree, used by the integration tests (`tests/it`, the
//! global-allocator tests, the browser test) and by the benches (`#[path]` to this file):
//! the gateway as a child process, the emulator, in-process panel servers and clients,
//! raw WebSocket and HTTP clients, MQTT subscribers, a real mosquitto, `/proc` readers,
//! captured logs.
#![allow(dead_code, unused_imports)]

pub mod amqp;
pub mod cutter;
pub mod daemon;
pub mod emulator;
pub mod entra;
pub mod http;
pub mod mirror_run;
pub mod mosquitto;
pub mod mqtt;
pub mod panels;
pub mod procfs;
pub mod source;
pub mod tinyproxy;
pub mod tls;
pub mod ws_raw;

pub use mqtt::{Received, Subscriber};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The gateway binary cargo built for this test or bench.
pub const EXE: &str = env!("CARGO_BIN_EXE_asb-gateway");

/// A free loopback TCP port for a server a test starts later (mosquitto, RabbitMQ, a
/// gateway), chosen below Linux's ephemeral range (32768–60999). A port the kernel hands
/// out for port 0 could be taken, before the server binds it, as the local port of some
/// other test's outgoing connection: RabbitMQ once failed with `eaddrinuse` that way.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-32767")
}

/// A fresh private directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "asbgw-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------------ captured log output

/// Every record captured so far: (level, target, message).
static RECORDS: Mutex<Vec<(log::Level, String, String)>> = Mutex::new(Vec::new());
/// Capture records of every target, not only the crate's.
static ALL_TARGETS: AtomicBool = AtomicBool::new(false);

/// The process's one capturing logger (nextest runs each test in its own process; under
/// plain `cargo test` the tests of a binary share it).
pub struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if !ALL_TARGETS.load(Ordering::Relaxed) && !r.target().starts_with("asb_gateway") {
            return;
        }
        let msg = r.args().to_string();
        // Shown by the test runner only when the test fails.
        eprintln!("{} {}: {msg}", r.level(), r.target());
        if let Ok(mut v) = RECORDS.lock() {
            v.push((r.level(), r.target().to_string(), msg));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

fn install() {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
}

/// Capture every log record of the crate; read them with [`logs`].
pub fn capture_logs() {
    install();
}

/// Capture every log record of every target (the AMQP library's too); read them with
/// [`Capture::lines`].
pub fn capture_all_logs() -> &'static Capture {
    ALL_TARGETS.store(true, Ordering::Relaxed);
    install();
    &CAPTURE
}

/// The crate's records so far, as `LEVEL target: message`.
pub fn logs() -> Vec<String> {
    RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t, _)| t.starts_with("asb_gateway"))
        .map(|(l, t, m)| format!("{l} {t}: {m}"))
        .collect()
}

impl Capture {
    /// Every record so far, as `LEVEL target message`.
    pub fn lines(&self) -> Vec<String> {
        RECORDS
            .lock()
            .map(|v| v.iter().map(|(l, t, m)| format!("{l} {t} {m}")).collect())
            .unwrap_or_default()
    }
}
