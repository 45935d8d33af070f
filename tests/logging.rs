//! `logging::init` picks the backend from the environment and never panics when the
//! journal socket is missing. One test per file: it sets process environment variables
//! (nextest runs each test in its own process; plain `cargo test` runs each file in one).

use std::os::unix::fs::MetadataExt;

use asb_gateway::appliance::logging::{self, Backend, JOURNAL_SOCKET};
use log::LevelFilter;

#[test]
fn init_chooses_journal_only_when_stderr_is_the_journal() {
    // Pretend systemd connected stderr to the journal: JOURNAL_STREAM = stderr's dev:ino.
    let meta = std::fs::metadata("/proc/self/fd/2").unwrap();
    // SAFETY: single test in this process, no other thread reads the environment yet.
    unsafe {
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        std::env::set_var("RUST_LOG", "debug");
    }
    assert!(systemd_journal_logger_connected());
    let socket = std::path::Path::new(JOURNAL_SOCKET).exists();
    assert_eq!(logging::journal_wanted(), socket);
    let backend = logging::init("warn");
    // With no journal socket (containers, CI) it falls back to stderr instead of failing.
    let expected = if socket {
        Backend::Journal
    } else {
        Backend::Stderr
    };
    assert_eq!(backend, expected);
    assert_eq!(
        log::max_level(),
        LevelFilter::Debug,
        "RUST_LOG overrides the config"
    );
    log::info!(target: "source", subscription = "edge", seq = 7; "logging works");

    // A second init keeps the logger and only changes the level.
    // SAFETY: as above.
    unsafe { std::env::remove_var("RUST_LOG") };
    assert_eq!(logging::init("error"), expected);
    assert_eq!(log::max_level(), LevelFilter::Error);

    // Not the journal's stream: stderr.
    // SAFETY: as above.
    unsafe { std::env::set_var("JOURNAL_STREAM", "1:2") };
    assert!(!logging::journal_wanted());
}

fn systemd_journal_logger_connected() -> bool {
    // The same check the logger uses, done here by hand to show the test's premise holds.
    let meta = std::fs::metadata("/proc/self/fd/2").unwrap();
    std::env::var("JOURNAL_STREAM").unwrap() == format!("{}:{}", meta.dev(), meta.ino())
}
