//! The command line (DESIGN §4). Exit codes: 0 ok, 1 bad config or input, 2 runtime
//! failure.
//!
//! The one owner of the process: it builds the tokio runtime, initialises logging,
//! turns SIGTERM/SIGINT into a [`crate::shutdown`] trigger and maps every outcome to an
//! exit code. What it runs ([`crate::app::run`], [`crate::demo::run`],
//! [`crate::emulator::serve`]) are library functions that know none of that.

use std::ffi::OsString;
#[cfg(feature = "emulator")]
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, Config};
#[cfg(feature = "emulator")]
use crate::demo::{self, DemoError, DemoOptions};
#[cfg(feature = "emulator")]
use crate::emulator::{self, EmulatorError};
#[cfg(feature = "emulator")]
use crate::shutdown::{self, Shutdown};

pub const USAGE: &str = "\
asb-gateway — Azure Service Bus topic subscriptions to WebSocket panels and MQTT

Usage:
  asb-gateway run [--config FILE]            run the daemon (default /etc/asb-gateway/config.toml)
  asb-gateway check-config [--config FILE]   validate a config and print its memory budget
  asb-gateway demo [--listen ADDR] [--mqtt URL] [--rate N]
                                             emulator + event generator + gateway + panel page
  asb-gateway emulator [--listen ADDR] [--config FILE] [--admin ADDR]
                      [--listen-ws ADDR [--tls-cert FILE --tls-key FILE]] [--jwt-public-key PEM]
                                             the ASB emulator alone (and over WebSockets)
  asb-gateway --version | --help

Exit codes: 0 ok, 1 bad config or input, 2 runtime failure.
";

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run {
        config: PathBuf,
    },
    CheckConfig {
        config: PathBuf,
    },
    #[cfg(feature = "emulator")]
    Demo {
        listen: SocketAddr,
        mqtt: Option<String>,
        rate: f64,
    },
    #[cfg(feature = "emulator")]
    Emulator(emulator::ServeOptions),
    Help,
    Version,
}

/// A bad command line, with what is wrong. Displayed with control characters escaped
/// ([`crate::redact::escaped`]): it repeats what the user typed.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{}", crate::redact::escaped(.0))]
pub struct UsageError(pub String);

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}

fn addr(v: OsString, what: &str) -> Result<SocketAddr, UsageError> {
    let s = v.to_string_lossy();
    s.parse().map_err(|_| {
        UsageError(format!(
            "{what}: '{s}' is not an address such as 127.0.0.1:8080"
        ))
    })
}

/// Parse the arguments after the program name.
///
/// An appliance build (without the `emulator` feature) refuses `demo` and `emulator`
/// with a usage error that says so.
#[cfg_attr(
    not(feature = "emulator"),
    allow(unused_variables, unused_assignments, unused_mut)
)]
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let sub = match p.next()? {
        None => return Err(UsageError("no command given; try --help".into())),
        Some(Long("help")) | Some(Short('h')) => return Ok(Command::Help),
        Some(Long("version")) | Some(Short('V')) => return Ok(Command::Version),
        Some(Value(v)) => v.to_string_lossy().into_owned(),
        Some(other) => return Err(other.unexpected().into()),
    };
    #[cfg(not(feature = "emulator"))]
    if sub == "demo" || sub == "emulator" {
        return Err(UsageError(format!(
            "'{sub}' is not in this build: it is an appliance build, without the emulator \
             (cargo feature `emulator`)"
        )));
    }
    let mut config: Option<PathBuf> = None;
    let mut listen: Option<SocketAddr> = None;
    let mut admin: Option<SocketAddr> = None;
    let mut listen_ws: Option<SocketAddr> = None;
    let (mut tls_cert, mut tls_key): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let mut jwt_public_key: Option<PathBuf> = None;
    let mut mqtt: Option<String> = None;
    let mut rate: f64 = 5.0;
    while let Some(arg) = p.next()? {
        match (sub.as_str(), arg) {
            (_, Long("help") | Short('h')) => return Ok(Command::Help),
            ("run" | "check-config" | "emulator", Long("config") | Short('c')) => {
                config = Some(p.value()?.into())
            }
            ("demo" | "emulator", Long("listen")) => listen = Some(addr(p.value()?, "--listen")?),
            ("emulator", Long("admin")) => admin = Some(addr(p.value()?, "--admin")?),
            ("emulator", Long("listen-ws")) => listen_ws = Some(addr(p.value()?, "--listen-ws")?),
            ("emulator", Long("tls-cert")) => tls_cert = Some(p.value()?.into()),
            ("emulator", Long("tls-key")) => tls_key = Some(p.value()?.into()),
            ("emulator", Long("jwt-public-key")) => jwt_public_key = Some(p.value()?.into()),
            ("demo", Long("mqtt")) => {
                // Checked here, before the demo starts anything, by the config's own rule
                // (its reason never quotes the URL).
                let url = p.value()?.to_string_lossy().into_owned();
                crate::config::BrokerUrl::parse(&url)
                    .map_err(|why| UsageError(format!("--mqtt: the URL {why}")))?;
                mqtt = Some(url);
            }
            ("demo", Long("rate")) => {
                let v = p.value()?.to_string_lossy().into_owned();
                rate = v
                    .parse()
                    .ok()
                    .filter(|r: &f64| *r > 0.0 && *r <= 100_000.0)
                    .ok_or_else(|| {
                        UsageError(format!(
                            "--rate: '{v}' is not a rate above 0 and at most 100000 events/s"
                        ))
                    })?;
            }
            ("run" | "check-config" | "demo" | "emulator", other) => {
                return Err(UsageError(format!("{sub}: {}", other.unexpected())));
            }
            (other, _) => {
                return Err(UsageError(format!("unknown command '{other}'; try --help")));
            }
        }
    }
    let default_config = || PathBuf::from(config::DEFAULT_PATH);
    Ok(match sub.as_str() {
        "run" => Command::Run {
            config: config.unwrap_or_else(default_config),
        },
        "check-config" => Command::CheckConfig {
            config: config.unwrap_or_else(default_config),
        },
        #[cfg(feature = "emulator")]
        "demo" => Command::Demo {
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            mqtt,
            rate,
        },
        #[cfg(feature = "emulator")]
        "emulator" => {
            let ws_tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::CertFiles { cert, key }),
                (None, None) => None,
                _ => {
                    return Err(UsageError(
                        "emulator: --tls-cert and --tls-key go together".into(),
                    ));
                }
            };
            if ws_tls.is_some() && listen_ws.is_none() {
                return Err(UsageError(
                    "emulator: --tls-cert/--tls-key serve the --listen-ws listener; give it".into(),
                ));
            }
            Command::Emulator(emulator::ServeOptions {
                listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5672))),
                config,
                admin,
                listen_ws,
                ws_tls,
                jwt_public_key,
            })
        }
        other => return Err(UsageError(format!("unknown command '{other}'; try --help"))),
    })
}

/// The program: parse, dispatch, map outcomes to exit codes.
pub fn main() -> ExitCode {
    let cmd = match parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("asb-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    match cmd {
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("asb-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run(&config),
        #[cfg(feature = "emulator")]
        Command::Demo { listen, mqtt, rate } => run_demo(DemoOptions { listen, mqtt, rate }),
        #[cfg(feature = "emulator")]
        Command::Emulator(options) => run_emulator(options),
    }
}

/// `asb-gateway demo`: exit 1 for a bad `--mqtt` URL, 2 when a part cannot run.
#[cfg(feature = "emulator")]
fn run_demo(options: DemoOptions) -> ExitCode {
    crate::appliance::logging::init("info");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(until_terminated(|stop| demo::run(options, stop))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asb-gateway: {e}");
            ExitCode::from(match e {
                DemoError::Mqtt(_) => 1,
                DemoError::Listen { .. } | DemoError::Emulator(_) | DemoError::Gateway(_) => 2,
            })
        }
    }
}

/// `asb-gateway emulator`: exit 1 for a bad Config.json, 2 when the emulator cannot run
/// (e.g. the port is in use).
#[cfg(feature = "emulator")]
fn run_emulator(options: emulator::ServeOptions) -> ExitCode {
    // Its connections, links and refusals go to stderr (or the journal), like the daemon's.
    crate::appliance::logging::init("info");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let served = rt.block_on(until_terminated(|stop| emulator::serve(options, stop)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asb-gateway: {e}");
            ExitCode::from(match e {
                EmulatorError::Config(_) => 1,
                EmulatorError::Listen { .. } => 2,
            })
        }
    }
}

/// Run `work` with a [`Shutdown`] that fires on SIGTERM or SIGINT, and wait for it to
/// finish (it may also finish on its own, e.g. with an error).
#[cfg(feature = "emulator")]
async fn until_terminated<F: Future>(work: impl FnOnce(Shutdown) -> F) -> F::Output {
    let (trigger, stop) = shutdown::channel();
    let work = work(stop);
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => out,
        () = termination() => {
            trigger.fire();
            work.await
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            let b = crate::budget::compute(&c);
            print!("{}", b.render());
            for w in c.warnings() {
                println!("warning: {w}");
            }
            if let Some(w) = crate::mirror::packet_limit_warning(&c) {
                println!("{w}");
            }
            if b.fits() {
                println!("{}: ok", crate::redact::escaped_path(path));
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "{}: budget.memory_mib: the worst case exceeds the budget; {}",
                    crate::redact::escaped_path(path),
                    b.advice()
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{}: {e}", crate::redact::escaped_path(path));
            ExitCode::from(1)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", crate::redact::escaped_path(path));
            return ExitCode::from(1);
        }
    };
    let budget = crate::budget::compute(&config);
    if !budget.fits() {
        eprint!("{}", budget.render());
        eprintln!(
            "{}: budget.memory_mib: the worst case exceeds the budget; refusing to start: {}",
            crate::redact::escaped_path(path),
            budget.advice()
        );
        return ExitCode::from(1);
    }
    crate::appliance::logging::init(&config.log.level);
    for w in config.warnings() {
        log::warn!("{w}");
    }
    let listen = config.panels.listen;
    let ctx = crate::app::Context::assemble(config, budget, crate::journal::new_epoch());
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            crate::app::RunError::Part {
                part: "panels",
                reason: format!("cannot listen on {listen}: {e}"),
            }
        })?;
        crate::app::run(
            ctx,
            listener,
            termination(),
            hangups().with_config_file(path),
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asb-gateway: {e}");
            ExitCode::from(2)
        }
    }
}

/// Reloads on SIGHUP (`systemctl reload`, `ExecReload=kill -HUP $MAINPID`). Without a
/// handler SIGHUP would end the process; if none can be installed, reloads never come.
fn hangups() -> crate::reload::Reload {
    use tokio::signal::unix::{SignalKind, signal};
    let (trigger, reload) = crate::reload::channel();
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    log::info!("SIGHUP: reloading");
                    trigger.fire();
                }
            });
        }
        Err(e) => log::warn!("cannot handle SIGHUP ({e}); reload will not work"),
    }
    reload
}

/// The runtime every subcommand runs on: two worker threads (an edge box has few cores
/// and the data path is I/O bound), one when the process may use only one CPU (systemd
/// `CPUAffinity=`, `taskset`, a cgroup quota of one CPU): two workers taking turns on
/// one core only add cross-thread wake-ups. A failure is reported and mapped to exit
/// code 2.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.min(2))
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("asb-gateway: cannot start the runtime: {e}");
            ExitCode::from(2)
        })
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    #[cfg(not(feature = "emulator"))]
    fn an_appliance_build_refuses_demo_and_emulator() {
        for args in [
            &["demo"][..],
            &["emulator", "--listen", "x"],
            &["demo", "--rate", "1"],
        ] {
            let e = p(args).unwrap_err();
            assert!(e.0.contains("not in this build"), "{e}");
            assert!(e.0.contains("`emulator`"), "{e}");
        }
        assert!(matches!(p(&["run"]).unwrap(), Command::Run { .. }));
    }

    #[test]
    #[cfg(feature = "emulator")]
    fn parses_commands() {
        assert_eq!(
            p(&["run"]).unwrap(),
            Command::Run {
                config: PathBuf::from(config::DEFAULT_PATH)
            }
        );
        assert_eq!(
            p(&["check-config", "--config", "x.toml"]).unwrap(),
            Command::CheckConfig {
                config: "x.toml".into()
            }
        );
        assert_eq!(
            p(&[
                "emulator",
                "--listen",
                "127.0.0.1:5673",
                "--admin",
                "127.0.0.1:9"
            ])
            .unwrap(),
            Command::Emulator(emulator::ServeOptions {
                listen: "127.0.0.1:5673".parse().unwrap(),
                config: None,
                admin: Some("127.0.0.1:9".parse().unwrap()),
                listen_ws: None,
                ws_tls: None,
                jwt_public_key: None,
            })
        );
        assert!(matches!(
            p(&[
                "emulator",
                "--listen-ws",
                "127.0.0.1:0",
                "--tls-cert",
                "c",
                "--tls-key",
                "k"
            ])
            .unwrap(),
            Command::Emulator(emulator::ServeOptions {
                listen_ws: Some(_),
                ws_tls: Some(_),
                ..
            })
        ));
        assert!(matches!(
            p(&["demo", "--mqtt", "mqtt://127.0.0.1:1883"]).unwrap(),
            Command::Demo { mqtt: Some(_), .. }
        ));
        assert_eq!(p(&["--version"]).unwrap(), Command::Version);
        assert_eq!(p(&["run", "--help"]).unwrap(), Command::Help);
    }

    #[test]
    fn an_unknown_command_with_options_is_a_usage_error() {
        let e = p(&["foo", "--x"]).unwrap_err();
        assert_eq!(e.0, "unknown command 'foo'; try --help");
        let e = p(&["foo", "bar"]).unwrap_err();
        assert_eq!(e.0, "unknown command 'foo'; try --help");
    }

    #[test]
    fn rejects_bad_usage() {
        assert!(p(&[]).is_err());
        assert!(p(&["frobnicate"]).is_err());
        assert!(p(&["run", "--listen", "x"]).is_err());
        assert!(p(&["demo", "--listen", "nope"]).is_err());
        assert!(p(&["demo", "--rate", "-1"]).is_err());
        assert!(p(&["check-config", "--config"]).is_err());
        assert!(p(&["emulator", "--tls-cert", "c"]).is_err());
        assert!(p(&["emulator", "--tls-cert", "c", "--tls-key", "k"]).is_err());
    }

    /// A bad `--mqtt` URL is refused when the command line is read, before the demo
    /// starts its emulator, with the config's own reason and without the URL.
    #[test]
    #[cfg(feature = "emulator")]
    fn a_bad_demo_mqtt_url_is_a_usage_error_that_says_why() {
        for (url, why) in [
            ("mqtt://h:1\u{1b}", "invalid port"),
            (
                "mqtt://h:1883?password=hunter2",
                "no path, query or fragment",
            ),
            ("tcp://h:1883", "must start with"),
            ("mqtt://u:hunter2@h:1883", "credentials"),
        ] {
            let e = p(&["demo", "--mqtt", url]).unwrap_err().0;
            assert!(e.starts_with("--mqtt: the URL "), "{url}: {e}");
            assert!(e.contains(why), "{url}: {e}");
            assert!(
                !e.contains("hunter2") && !e.chars().any(char::is_control),
                "{e:?}"
            );
        }
        for rate in ["0", "100001", "x"] {
            let e = p(&["demo", "--rate", rate]).unwrap_err().0;
            assert!(e.contains("above 0 and at most 100000"), "{e}");
        }
        let e = p(&["demo", "--rate", "1\u{1b}[31m"])
            .unwrap_err()
            .to_string();
        assert!(e.contains(r"'1\u{1b}[31m'"), "{e:?}");
    }

    /// What the user typed is repeated with its control characters escaped.
    #[test]
    fn usage_errors_escape_control_characters() {
        let e = p(&["frob\u{0}"]).unwrap_err().to_string();
        assert!(e.contains(r"'frob\0'"), "{e:?}");
        let e = p(&["run", "--config\u{1b}[31m"]).unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains(r"\u{1b}[31m"), "{e:?}");
    }
}
