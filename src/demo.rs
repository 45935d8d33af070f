//! `asb-gateway demo`: the whole pipeline on one machine — the embedded ASB emulator, the
//! synthetic factory-event generator publishing into it over AMQP, the gateway reading
//! the emulator's subscription like a real one, and the panel page — plus the MQTT mirror
//! when `--mqtt URL` is given.
//!
//! A library function ([`run`]) like the rest: the command line owns the process (the
//! runtime, the signals, logging, exit codes) and hands it a [`Shutdown`].

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::app::{self, Context};
use crate::config::{Config, LoadEnv};
use crate::emulator::{self, EmulatorOptions};
use crate::shutdown::{self, Shutdown};

/// The topic and subscription the demo uses (the emulator's default entities).
pub const TOPIC: &str = "operational-events";
pub const SUBSCRIPTION: &str = "edge";

/// What `asb-gateway demo` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// The panel page and the gateway's HTTP endpoints (`/healthz`, `/metrics`).
    pub listen: SocketAddr,
    /// Mirror to this MQTT broker (`mqtt://host:port`, `mqtts://host:port` or
    /// `unix:///path`); `None`: no mirror.
    pub mqtt: Option<String>,
    /// Events per second from the generator (> 0).
    pub rate: f64,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The panel address cannot be bound.
    #[error("demo: cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    /// The embedded emulator cannot start (its listener or the emulator itself).
    #[error("demo: cannot start the emulator: {0}")]
    Emulator(String),
    /// The `--mqtt` URL makes the generated gateway config invalid (the only input of
    /// the demo that can).
    #[error("demo: --mqtt: {0}")]
    Mqtt(String),
    /// The gateway stopped with an error.
    #[error("demo: {0}")]
    Gateway(app::RunError),
}

/// The gateway config of the demo, as TOML (so it goes through the same validation).
pub fn config_text(connection_string: &str, listen: SocketAddr, mqtt: Option<&str>) -> String {
    let mut text = format!(
        "[source]\nconnection_string = {cs}\n\n[[source.subscriptions]]\ntopic = {TOPIC:?}\nsubscription = {SUBSCRIPTION:?}\n\n[routing]\ntopic = \"{{prop:line}}/{{prop:station}}/{{subject}}\"\n\n[panels]\nlisten = \"{listen}\"\n",
        cs = toml_string(connection_string),
    );
    if let Some(url) = mqtt {
        text += &format!(
            "\n[mqtt]\nurl = {}\nclient_id = \"asb-gateway-demo\"\nprefix = \"factory/asb\"\n",
            toml_string(url)
        );
    }
    text
}

/// `s` as a TOML basic string (TOML 1.0 §String): quoted, with `"` and `\` escaped
/// and each control character written as `\uXXXX`.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Run the demo until `shutdown` fires: bind the panel address, start the emulator on a
/// free loopback port, the generator (`rate` events per second into [`TOPIC`]) and the
/// gateway on subscription [`SUBSCRIPTION`]; print where everything is on stdout. On
/// shutdown the gateway stops first, then the generator, then the emulator; every port
/// is free when this returns.
///
/// Errors: [`DemoError::Mqtt`] for a bad `--mqtt` URL (bad input); the others when a
/// part cannot start or the gateway fails.
pub async fn run(options: DemoOptions, mut shutdown: Shutdown) -> Result<(), DemoError> {
    let DemoOptions { listen, mqtt, rate } = options;
    let panel_listener = TcpListener::bind(listen)
        .await
        .map_err(|e| DemoError::Listen {
            addr: listen,
            reason: e.to_string(),
        })?;
    let emulator_listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| DemoError::Emulator(e.to_string()))?;
    let emulator = emulator::start(emulator_listener, EmulatorOptions::default())
        .await
        .map_err(|e| DemoError::Emulator(e.to_string()))?;
    let cs = emulator.connection_string();
    let config = match Config::parse(
        &config_text(
            &cs,
            panel_listener.local_addr().unwrap_or(listen),
            mqtt.as_deref(),
        ),
        &LoadEnv::default(),
    ) {
        Ok(c) => c,
        Err(e) => {
            emulator.shutdown().await;
            return Err(DemoError::Mqtt(e.to_string()));
        }
    };
    let (gen_trigger, gen_shutdown) = shutdown::channel();
    let generator = tokio::spawn({
        let cs = cs.clone();
        async move { crate::generator::run(&cs, TOPIC, rate, gen_shutdown).await }
    });
    let page = panel_listener
        .local_addr()
        .map(|a| format!("http://{a}/"))
        .unwrap_or_default();
    println!("asb-gateway demo");
    println!("  panel page:  {page}");
    println!(
        "  emulator:    {} ({TOPIC}/Subscriptions/{SUBSCRIPTION})",
        emulator.addr()
    );
    println!("  events:      {rate} per second from the generator");
    match &mqtt {
        Some(url) => println!("  mqtt mirror: {url} (topics factory/asb/#)"),
        None => println!("  mqtt mirror: off (add --mqtt mqtt://127.0.0.1:1883)"),
    }
    println!("  stop:        Ctrl-C");
    let ctx = Context::new(config);
    let result = app::run(
        ctx,
        panel_listener,
        async move { shutdown.recv().await },
        crate::reload::Reload::never(),
    )
    .await;
    gen_trigger.fire();
    let _ = generator.await;
    emulator.shutdown().await;
    result.map_err(DemoError::Gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever `--mqtt` holds reaches the config as the same string: quotes,
    /// backslashes, control characters and combining marks included.
    #[test]
    fn the_generated_config_holds_the_mqtt_url_as_given() {
        let cs = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true";
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let url = "unix:///run/a\"b\\c\u{301}\u{1b}.sock";
        let text = config_text(cs, listen, Some(url));
        let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{text}\n{e}"));
        assert_eq!(doc["mqtt"]["url"].as_str(), Some(url));
        assert_eq!(doc["source"]["connection_string"].as_str(), Some(cs));
        // A URL the config takes gives a config that parses.
        let good = config_text(cs, listen, Some("unix:///run/mqtt \"x\".sock"));
        let c = Config::parse(&good, &LoadEnv::default()).unwrap();
        assert!(c.mqtt.is_some());
    }
}
