//! The integration tests, one binary: each former `tests/NAME.rs` is the module `NAME`
//! here (run one with `cargo nextest run -E 'test(/^NAME::/)'`). One binary links the
//! crate once instead of once per file; nextest still runs each test in its own process,
//! so tests that set environment variables or install a logger stay isolated.
//!
//! Separate binaries: `alloc_panels` and `alloc_source` (each installs a counting
//! `#[global_allocator]`), `page_browser` (headless Chromium), and `logging` and `notify`
//! (one test per file: they set process environment variables, which plain `cargo test`
//! would share between the tests of a binary).

#[path = "../support/mod.rs"]
mod support;

mod appliance_files;
mod cli;
mod config_fixtures;
mod daemon;
mod daemon_notify;
mod durable;
mod durable_props;
mod e2e_mqtt;
mod emulator;
mod emulator_dialect;
mod entra;
mod faults;
mod fleet;
mod hostile_amqp;
mod hostile_props;
mod hostile_ws;
mod journal_props;
mod last_values;
mod latency;
mod locked_down;
mod mirror;
mod mirror_faults;
mod mirror_tls;
mod panel_security;
mod panels;
mod reload;
mod security;
mod source;
mod source_auth;
mod source_rabbitmq;
mod trace_context;
mod typed_props;
mod yocto;
