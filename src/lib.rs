//! asb-gateway: Azure Service Bus topic subscriptions → a bounded journal → WebSocket
//! panels and an MQTT mirror, under a static memory budget. The architecture is in
//! `docs/architecture.md`.
//!
//! The data flow, one module per part (each gets only what it uses; none imports
//! [`app`], which assembles them):
//! - [`source`]: the AMQP 1.0 receiver side (ASB subscriptions → journal, settlement).
//! - [`journal`]: the fixed-capacity ring of encoded events ([`event`]), read by cursors;
//!   [`durable`] keeps it across restarts (`journal.state_dir`).
//! - [`panels`]: HTTP and the WebSocket panel protocol v1.
//! - [`mirror`]: the MQTT mirror.
//!
//! Below them: [`config`] (typed TOML, parsed once), [`routing`] (topic templates and
//! filters), [`budget`] (worst-case memory), [`metrics`], [`liveness`] (heartbeats),
//! [`shutdown`] (shutdown by broadcast), [`sas`] (SAS tokens), [`tls`], [`proxy`] (HTTP
//! CONNECT tunnels) and [`amqp_ws`] (AMQP over WebSockets). Above them: [`app`]
//! (the daemon's tasks), [`appliance`] (journald logging, sd_notify, watchdog) and
//! [`cli`] (the process: runtime, signals, exit codes). [`emulator`] and [`generator`]
//! serve tests and `asb-gateway demo`; they are the default cargo feature `emulator`,
//! which an appliance build leaves out (`--no-default-features`).

pub mod amqp_ws;
pub mod app;
pub mod appliance;
pub mod authority;
mod backoff;
pub mod budget;
pub mod cli;
pub mod config;
#[cfg(feature = "emulator")]
mod demo;
pub mod durable;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod event;
pub mod file_limit;
#[cfg(feature = "emulator")]
pub mod generator;
pub mod held;
pub mod identity;
pub mod journal;
pub mod jwt;
pub mod liveness;
pub mod metrics;
pub mod mirror;
pub mod panels;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod routing;
pub mod sas;
pub mod shutdown;
pub mod source;
pub mod tls;
pub mod trace;
