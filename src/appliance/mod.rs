//! Running as an appliance under systemd (DESIGN §7): logging to the journal or stderr,
//! and the `sd_notify` protocol (READY=1, STATUS=, watchdog pings gated on the data path
//! being alive).

pub mod logging;
pub mod notify;
