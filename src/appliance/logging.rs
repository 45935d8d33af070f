//! Logging through the `log` facade. Under systemd, when stderr is the journal (the
//! `JOURNAL_STREAM` convention) and the journal socket exists, records go to journald
//! natively with structured fields: `COMPONENT` (the log target), plus every `key = value`
//! the call site passes (`log::info!(target: "source", subscription = name, seq; "…")`
//! becomes `SUBSCRIPTION=…`, `SEQ=…`). Otherwise a one-line-per-record stderr logger.
//!
//! The level comes from `RUST_LOG` (a plain level name) if set and valid, else from the
//! config's `log.level`.

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

/// Where journald listens for native-protocol records.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Which logger [`init`] installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Journal,
    Stderr,
}

static INSTALLED: OnceLock<Backend> = OnceLock::new();

/// Parse a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`; any case).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.trim().parse().ok()
}

/// The level to use: `RUST_LOG` when it is a valid level name, else the config's, else
/// `info`.
pub fn choose_level(rust_log: Option<&str>, from_config: &str) -> LevelFilter {
    rust_log
        .and_then(parse_level)
        .or_else(|| parse_level(from_config))
        .unwrap_or(LevelFilter::Info)
}

/// Should records go to journald? Only when systemd connected stderr to the journal and
/// the native socket is there (it is missing in containers and chroots).
pub fn journal_wanted() -> bool {
    systemd_journal_logger::connected_to_journal() && Path::new(JOURNAL_SOCKET).exists()
}

/// Install the process logger. Safe to call more than once: later calls only change the
/// level. Never panics; falls back to stderr if the journal cannot be opened.
pub fn init(level_from_config: &str) -> Backend {
    let rust_log = std::env::var("RUST_LOG").ok();
    let level = choose_level(rust_log.as_deref(), level_from_config);
    let backend = *INSTALLED.get_or_init(|| {
        if journal_wanted() {
            match systemd_journal_logger::JournalLog::new() {
                Ok(j) => match log::set_boxed_logger(Box::new(JournalLogger(j))) {
                    Ok(()) => Backend::Journal,
                    Err(_) => Backend::Stderr, // someone else installed a logger
                },
                Err(_) => install_stderr(),
            }
        } else {
            install_stderr()
        }
    });
    log::set_max_level(level);
    backend
}

fn install_stderr() -> Backend {
    static STDERR: StderrLogger = StderrLogger;
    let _ = log::set_logger(&STDERR);
    Backend::Stderr
}

/// Protocol libraries log normal peer behaviour (a remote end, a closed link) as errors;
/// the gateway logs the state changes that matter itself, once. Their records are shown
/// only at debug level and below.
const QUIET_TARGETS: [&str; 2] = ["fe2o3_amqp", "rumqttc"];

fn wanted(metadata: &Metadata) -> bool {
    metadata.level() <= log::max_level()
        && (log::max_level() >= LevelFilter::Debug
            || !QUIET_TARGETS
                .iter()
                .any(|t| metadata.target().starts_with(t)))
}

/// journald with a `COMPONENT` field (the record's target) in front of the record's own
/// key-values.
struct JournalLogger(systemd_journal_logger::JournalLog);

struct WithComponent<'a> {
    component: &'a str,
    rest: &'a dyn Source,
}

impl Source for WithComponent<'_> {
    fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), kv::Error> {
        visitor.visit_pair(Key::from_str("component"), Value::from(self.component))?;
        self.rest.visit(visitor)
    }
}

impl Log for JournalLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        wanted(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let kvs = WithComponent {
            component: record.target(),
            rest: record.key_values(),
        };
        let with = Record::builder()
            .args(*record.args())
            .metadata(record.metadata().clone())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .key_values(&kvs)
            .build();
        // A record that cannot be sent is dropped: logging must not take the daemon down.
        let _ = self.0.journal_send(&with);
    }

    fn flush(&self) {}
}

/// `LEVEL target: message key=value …`, one line per record, on stderr.
struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        wanted(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = Vec::with_capacity(256);
        format_line(record, &mut line);
        // One write per record so lines from threads do not interleave.
        let _ = std::io::stderr().lock().write_all(&line);
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Format one record as the stderr logger writes it (newlines in the message are escaped
/// so a record is always one line).
pub fn format_line(record: &Record, out: &mut Vec<u8>) {
    struct Kv<'a>(&'a mut Vec<u8>);
    impl<'kvs> VisitSource<'kvs> for Kv<'_> {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
            let _ = write!(self.0, " {key}={value}");
            Ok(())
        }
    }
    let _ = write!(out, "{:<5} {}: ", record.level(), record.target());
    let msg = record.args().to_string();
    out.extend_from_slice(msg.replace('\n', "\\n").as_bytes());
    let _ = record.key_values().visit(&mut Kv(out));
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;

    #[test]
    fn rust_log_overrides_config() {
        assert_eq!(choose_level(None, "warn"), LevelFilter::Warn);
        assert_eq!(choose_level(Some("debug"), "warn"), LevelFilter::Debug);
        assert_eq!(choose_level(Some("TRACE"), "warn"), LevelFilter::Trace);
        // Not a plain level name (e.g. a module filter): the config wins.
        assert_eq!(
            choose_level(Some("asb_gateway=debug"), "error"),
            LevelFilter::Error
        );
        assert_eq!(choose_level(None, "nonsense"), LevelFilter::Info);
        assert_eq!(choose_level(Some("off"), "info"), LevelFilter::Off);
    }

    #[test]
    fn stderr_line_has_level_target_message_and_fields() {
        let kvs: &[(&str, &str)] = &[("subscription", "edge"), ("seq", "42")];
        let mut out = Vec::new();
        format_line(
            &Record::builder()
                .level(Level::Warn)
                .target("source")
                .args(format_args!("link lost\nretrying"))
                .key_values(&kvs)
                .build(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "WARN  source: link lost\\nretrying subscription=edge seq=42\n"
        );
    }
}
