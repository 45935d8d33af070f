//! asb-gateway: Azure Service Bus topic subscriptions → a bounded journal → WebSocket
//! panels and an MQTT mirror, under a static memory budget. See DESIGN.md.
//!
//! One module per part of the data flow:
//! - [`config`]: typed TOML config, connection strings, secrets.
//! - [`event`]: bounded event metadata and the panel frames.
//! - [`journal`]: the fixed-capacity ring of encoded events.
//! - [`routing`]: topic templates and MQTT-style filters.
//! - [`budget`]: the worst-case memory of a config.
//! - [`metrics`]: counters, gauges, health; [`backoff`]: the one retry backoff.
//! - [`source`]: the AMQP 1.0 receiver side (ASB subscriptions → journal).
//! - [`mirror`]: the MQTT mirror; [`tls`]: the one rustls client config both use.
//! - [`app`]: the daemon's task structure; [`shutdown`]: shutdown by broadcast.
//! - [`appliance`]: journald/stderr logging, systemd notify and watchdog.
//! - [`cli`]: the command line.
//! - [`sas`]: Shared Access Signature tokens; [`emulator`]: the ASB emulator (tests, demo);
//!   [`generator`]: synthetic factory events for the demo.

pub mod app;
pub mod appliance;
pub mod backoff;
pub mod budget;
pub mod cli;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod event;
pub mod generator;
pub mod journal;
pub mod liveness;
pub mod metrics;
pub mod mirror;
pub mod panels;
pub mod routing;
pub mod sas;
pub mod shutdown;
pub mod source;
pub mod tls;
