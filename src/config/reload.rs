//! What a reload (SIGHUP, `systemctl reload`) may change while the gateway runs, and
//! what needs a restart.
//!
//! Applied live: `panels.tokens`, `panels.allowed_origins`, `panels.server_names`,
//! `panels.max_panels`, `panels.slow_policy`, `panels.metrics_token`, `log.level` (the
//! panel port's and the
//! mirror's certificates are re-read on every reload besides). Everything else —
//! `[source]` and the connection string, `[journal]`, `[routing]`, `[mqtt]` and its
//! password, `[budget]`, `panels.listen`, `panels.last_values`, `panels.last_values_mib`,
//! `panels.open`, `panels.peer_gateways`, `panels.tls_cert`/`tls_key` — keeps its running value until a restart.
//! The routing template stays too: the last-value table and every panel's filters are
//! keyed by the topic names it makes, and one epoch names topics one way.

use super::Config;

/// The outcome of comparing the running config with the one a reload read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys applied live (in the order of the module docs).
    pub applied: Vec<&'static str>,
    /// Changed keys or sections that keep their running value until a restart.
    pub need_restart: Vec<&'static str>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.need_restart.is_empty()
    }

    /// One log line: what was applied and what needs a restart.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.applied.is_empty() {
            parts.push(format!("applied {}", self.applied.join(", ")));
        }
        if !self.need_restart.is_empty() {
            parts.push(format!(
                "changed but kept until a restart: {}",
                self.need_restart.join(", ")
            ));
        }
        if parts.is_empty() {
            "no setting changed".into()
        } else {
            parts.join("; ")
        }
    }
}

/// Compare `running` with `new` and copy the live settings of `new` into `running`;
/// the rest of `running` stays as it is.
pub fn apply_live(running: &mut Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    let (p, n) = (&mut running.panels, &new.panels);
    if p.tokens != n.tokens {
        p.tokens = n.tokens.clone();
        c.applied.push("panels.tokens");
    }
    if p.allowed_origins != n.allowed_origins {
        p.allowed_origins = n.allowed_origins.clone();
        c.applied.push("panels.allowed_origins");
    }
    if p.server_names != n.server_names {
        p.server_names = n.server_names.clone();
        c.applied.push("panels.server_names");
    }
    if p.max_panels != n.max_panels {
        p.max_panels = n.max_panels;
        c.applied.push("panels.max_panels");
    }
    if p.slow_policy != n.slow_policy {
        p.slow_policy = n.slow_policy;
        c.applied.push("panels.slow_policy");
    }
    if p.metrics_token != n.metrics_token {
        p.metrics_token = n.metrics_token;
        c.applied.push("panels.metrics_token");
    }
    if running.log.level != new.log.level {
        running.log.level = new.log.level.clone();
        c.applied.push("log.level");
    }
    // Sections compared by their Debug text (secrets print masked, so they are compared
    // on their own).
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let r = &*running;
    let restart: [(&'static str, bool); 13] = [
        (
            "source",
            differs(&r.source, &new.source) || r.connection != new.connection,
        ),
        ("journal", differs(&r.journal, &new.journal)),
        ("routing", differs(&r.routing, &new.routing)),
        (
            "mqtt",
            differs(&r.mqtt, &new.mqtt) || r.mqtt_password != new.mqtt_password,
        ),
        ("budget", differs(&r.budget, &new.budget)),
        ("panels.listen", r.panels.listen != n.listen),
        ("panels.last_values", r.panels.last_values != n.last_values),
        (
            "panels.last_values_mib",
            r.panels.last_values_mib != n.last_values_mib,
        ),
        ("panels.open", r.panels.open != n.open),
        (
            "panels.peer_gateways",
            r.panels.peer_gateways != n.peer_gateways,
        ),
        ("panels.tls_cert", r.panels.tls_cert != n.tls_cert),
        ("panels.tls_key", r.panels.tls_key != n.tls_key),
        (
            "panels (TLS credentials)",
            r.panels.tls.as_ref().map(|t| &t.files.cert) != n.tls.as_ref().map(|t| &t.files.cert),
        ),
    ];
    c.need_restart = restart
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoadEnv;

    const BASE: &str = r#"
[source]
connection_string = "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"
[[source.subscriptions]]
topic = "t"
subscription = "s"
"#;

    fn cfg(extra: &str) -> Config {
        Config::parse(&format!("{BASE}{extra}"), &LoadEnv::default()).unwrap()
    }

    #[test]
    fn live_settings_are_applied_and_the_rest_is_named() {
        let mut running = cfg("[panels]\nmax_panels = 10\n[log]\nlevel = \"info\"\n");
        let new = cfg(
            "[panels]\nmax_panels = 20\nallowed_origins = [\"https://hmi\"]\n[log]\nlevel = \"debug\"\n[journal]\nevents = 512\n",
        );
        let c = apply_live(&mut running, &new);
        assert_eq!(
            c.applied,
            ["panels.allowed_origins", "panels.max_panels", "log.level"]
        );
        assert_eq!(c.need_restart, ["journal"]);
        assert_eq!(running.panels.max_panels, 20);
        assert_eq!(running.log.level, "debug");
        assert_ne!(running.journal.events, 512, "kept until a restart");
        assert!(c.summary().contains("kept until a restart: journal"));
        // Applying the same again changes nothing, and the journal is still named.
        let again = apply_live(&mut running, &new);
        assert!(again.applied.is_empty());
        assert_eq!(again.need_restart, ["journal"]);
        assert_eq!(
            apply_live(&mut running.clone(), &running).summary(),
            "no setting changed"
        );
    }

    #[test]
    fn a_new_key_in_the_connection_string_needs_a_restart() {
        let mut running = cfg("");
        let new = Config::parse(
            &BASE.replace("SharedAccessKey=v", "SharedAccessKey=NEWSECRET"),
            &LoadEnv::default(),
        )
        .unwrap();
        let c = apply_live(&mut running, &new);
        assert_eq!(c.need_restart, ["source"]);
        assert!(!c.summary().contains("NEWSECRET"), "{}", c.summary());
    }
}
