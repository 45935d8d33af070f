//! `asb-gateway demo`: the whole pipeline on one machine — the embedded ASB emulator, the
//! synthetic factory-event generator publishing into it over AMQP, the gateway reading
//! the emulator's subscription like a real one, and the panel page — plus the MQTT mirror
//! when `--mqtt URL` is given.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::app::{self, Context};
use crate::config::{Config, LoadEnv};
use crate::emulator::{self, EmulatorOptions};

/// The topic and subscription the demo uses (the emulator's default entities).
pub const TOPIC: &str = "operational-events";
pub const SUBSCRIPTION: &str = "edge";

/// The gateway config of the demo, as TOML (so it goes through the same validation).
pub fn config_text(connection_string: &str, listen: SocketAddr, mqtt: Option<&str>) -> String {
    let mut text = format!(
        "[source]\nconnection_string = {cs:?}\n\n[[source.subscriptions]]\ntopic = {TOPIC:?}\nsubscription = {SUBSCRIPTION:?}\n\n[routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n\n[panels]\nlisten = \"{listen}\"\n",
        cs = connection_string,
    );
    if let Some(url) = mqtt {
        text += &format!(
            "\n[mqtt]\nurl = {url:?}\nclient_id = \"asb-gateway-demo\"\nprefix = \"factory/asb\"\n"
        );
    }
    text
}

pub fn cli_main(listen: SocketAddr, mqtt: Option<String>, rate: f64) -> ExitCode {
    crate::appliance::logging::init("info");
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(run(listen, mqtt, rate))
}

async fn run(listen: SocketAddr, mqtt: Option<String>, rate: f64) -> ExitCode {
    let panel_listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("asb-gateway: demo: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    let emulator_listener = match TcpListener::bind(("127.0.0.1", 0)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("asb-gateway: demo: cannot start the emulator: {e}");
            return ExitCode::from(2);
        }
    };
    let emulator = match emulator::start(emulator_listener, EmulatorOptions::default()).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("asb-gateway: demo: cannot start the emulator: {e}");
            return ExitCode::from(2);
        }
    };
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
            // Only --mqtt can make the generated config invalid.
            eprintln!("asb-gateway: demo: --mqtt: {e}");
            emulator.shutdown().await;
            return ExitCode::from(1);
        }
    };
    let (gen_trigger, gen_shutdown) = crate::shutdown::channel();
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
    let result = app::run(ctx, panel_listener, crate::cli::termination()).await;
    gen_trigger.fire();
    let _ = generator.await;
    emulator.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asb-gateway: demo: {e}");
            ExitCode::from(2)
        }
    }
}
