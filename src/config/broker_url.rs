//! `mqtt.url`: where the MQTT broker is, parsed once when the config is read.

use std::path::PathBuf;

use serde::Deserialize;

/// Longest Unix-domain socket path: `sun_path` holds 108 bytes with the closing NUL
/// (Linux `unix(7)`).
pub const UNIX_PATH_MAX: usize = 107;

/// A broker URL: `mqtt://HOST:PORT` (plain TCP), `mqtts://HOST:PORT` (TLS), IPv6 hosts in
/// brackets, the port required (1–65535); or `unix:///ABSOLUTE/PATH`, a broker on this
/// box listening on a Unix-domain socket (mosquitto: `listener 0 /run/mqtt/mqtt.sock`).
/// No credentials in the URL (they go in `mqtt.username`/`mqtt.password`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BrokerUrl {
    /// The URL as written, for logs and errors.
    pub url: String,
    pub endpoint: Endpoint,
    /// `mqtts://`: TLS from the first byte.
    pub tls: bool,
}

/// Where the broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Host name or address (without IPv6 brackets) and TCP port.
    Tcp { host: String, port: u16 },
    /// Path of a Unix-domain stream socket, absolute, at most [`UNIX_PATH_MAX`] bytes.
    Unix(PathBuf),
}

impl BrokerUrl {
    /// Parse `url`; the error says what is wrong and never quotes the URL: a malformed one
    /// may hold a password out of place (`mqtt://user:pw`, `unix:///s?pw`).
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        // Only a `unix:///` path may hold an '@' (a file name can); anywhere else it may
        // end a user name and password (one with a '/' in it included).
        if url.contains('@') && !url.starts_with("unix:///") {
            return Err(
                "must not carry credentials: put them in mqtt.username and mqtt.password".into(),
            );
        }
        if let Some(path) = url.strip_prefix("unix://") {
            return Self::parse_unix(url, path);
        }
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if url.starts_with("ws://") || url.starts_with("wss://") {
            return Err(
                "is MQTT over WebSockets, which this build does not speak (docs/mirror-tls.md \
                 says why); use mqtt:// or mqtts://"
                    .into(),
            );
        } else {
            return Err("must start with mqtt://, mqtts:// or unix://".into());
        };
        // The authority ends at the first '/', '?' or '#' (RFC 3986 §3.2); one trailing
        // '/' is allowed.
        let (authority, after) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        if !after.is_empty() && after != "/" {
            return Err("may hold only mqtt[s]://HOST:PORT (no path, query or fragment)".into());
        }
        if !crate::authority::has_port(authority) {
            return Err("must name a host and port, e.g. mqtt://127.0.0.1:1883".into());
        }
        let (host, port) = crate::authority::split_host_port(authority, 0).ok_or_else(|| {
            "has an invalid port (1-65535), or an IPv6 host not in brackets".to_string()
        })?;
        if !crate::authority::valid_host(&host) {
            return Err(
                "has an invalid host: a DNS name or an IP address (IPv6 in brackets)".into(),
            );
        }
        Ok(BrokerUrl {
            url: url.to_string(),
            endpoint: Endpoint::Tcp { host, port },
            tls,
        })
    }

    /// `unix://` + an absolute path (so three slashes), nothing else: no host, query,
    /// fragment or percent-escapes, no control characters, at most [`UNIX_PATH_MAX`]
    /// bytes.
    fn parse_unix(url: &str, path: &str) -> Result<BrokerUrl, String> {
        if !path.starts_with('/') {
            return Err(
                "must give an absolute socket path after unix:// (three slashes), e.g. \
                 unix:///run/mqtt/mqtt.sock"
                    .into(),
            );
        }
        if path.ends_with('/') {
            return Err("names a directory, not a socket".into());
        }
        if path
            .chars()
            .any(|c| c.is_control() || matches!(c, '?' | '#' | '%'))
        {
            return Err(
                "may hold only the socket path (no control characters, '?', '#' or '%')".into(),
            );
        }
        if path.len() > UNIX_PATH_MAX {
            return Err(format!(
                "has a socket path of {} bytes; Unix sockets take at most {UNIX_PATH_MAX}",
                path.len()
            ));
        }
        Ok(BrokerUrl {
            url: url.to_string(),
            endpoint: Endpoint::Unix(PathBuf::from(path)),
            tls: false,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl TryFrom<String> for BrokerUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        BrokerUrl::parse(&s)
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_scheme_host_port() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!((u.endpoint, u.tls), (tcp("127.0.0.1", 1883), false));
        let u = BrokerUrl::parse("mqtts://broker.local:8883/").unwrap();
        assert_eq!((u.endpoint, u.tls), (tcp("broker.local", 8883), true));
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]:1883").unwrap().endpoint,
            tcp("::1", 1883)
        );
        assert_eq!(
            BrokerUrl::parse("mqtt://x:1").unwrap().to_string(),
            "mqtt://x:1"
        );
    }

    #[test]
    fn refuses_what_it_cannot_connect_to() {
        // The error says what is wrong and never quotes a network URL: a malformed one
        // may hold a password out of place.
        for (bad, why) in [
            ("tcp://x:1", "must start with"),
            ("mqtt://x", "host and port"),
            ("mqtt://:1", "invalid host"),
            ("mqtt://x:0", "invalid port"),
            ("mqtt://x:65536", "invalid port"),
            ("mqtt://x:+1883", "invalid port"),
            ("mqtt://a:b:1883", "invalid port"),
            ("mqtt://[x:1883", "host and port"),
            ("mqtt://[x]:1883", "invalid port"),
            ("mqtt://ho st:1883", "invalid host"),
            ("mqtt://h\u{0}:1883", "invalid host"),
            ("mqtt://h%41:1883", "invalid host"),
            ("mqtt://x:1883/topic", "no path"),
            ("mqtt://x:1883?y#z", "no path, query or fragment"),
            (
                "mqtt://x:1883?password=hunter2",
                "no path, query or fragment",
            ),
            ("mqtt://x:1883#hunter2", "no path, query or fragment"),
            ("mqtt://x:1883/?y", "no path, query or fragment"),
            ("mqtt://user:hunter2", "invalid port"),
            ("mqtt://user:hunter2\u{ff20}x:1883", "invalid port"),
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains(bad) && !e.contains("hunter2"), "{bad}: {e}");
        }
        for with_secret in [
            "mqtt://u:hunter2@x:1",
            "mqtts://u:hunter2@x",
            "unix://u:hunter2@/run/mqtt.sock",
            "http://u:hunter2@x:1",
            "u:hunter2@x:1883",
            "mqtts://u:hun/ter2@x:8883",
            "unix://u:hun/ter2@/run/s",
            "mqtt:/u:hunter2@x:1",
        ] {
            let e = BrokerUrl::parse(with_secret).unwrap_err();
            assert!(
                !e.contains("hunter2") && !e.contains("ter2"),
                "{with_secret}: {e}"
            );
            assert!(e.contains("credentials"), "{with_secret}: {e}");
        }
    }

    #[test]
    fn parses_a_unix_socket_path() {
        let u = BrokerUrl::parse("unix:///run/mqtt/mqtt.sock").unwrap();
        assert_eq!(
            (u.endpoint, u.tls),
            (Endpoint::Unix("/run/mqtt/mqtt.sock".into()), false)
        );
        assert_eq!(
            BrokerUrl::parse("unix:///s").unwrap().to_string(),
            "unix:///s"
        );
        // '@' is an ordinary character in a file name.
        assert_eq!(
            BrokerUrl::parse("unix:///run/a@b.sock").unwrap().endpoint,
            Endpoint::Unix("/run/a@b.sock".into())
        );
        let longest = format!("unix:///{}", "a".repeat(UNIX_PATH_MAX - 1));
        assert!(BrokerUrl::parse(&longest).is_ok());
    }

    #[test]
    fn refuses_a_socket_path_it_cannot_connect_to() {
        let too_long = format!("unix:///{}", "a".repeat(UNIX_PATH_MAX));
        for (bad, why) in [
            ("unix://run/mqtt.sock", "absolute"),
            ("unix://", "absolute"),
            ("unix:///run/mosquitto/", "directory"),
            ("unix:///run/mqtt.sock?x=1", "'?'"),
            ("unix:///run/mqtt.sock?hunter2", "'?'"),
            ("unix:///run/mqtt%20.sock", "'%'"),
            ("unix:///run/mqtt.sock#f", "'#'"),
            ("unix:///run/mqtt\n.sock", "control"),
            ("unix:///run/mqtt\u{0}.sock", "control"),
            (too_long.as_str(), "at most 107"),
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = BrokerUrl::parse("ftp://x").unwrap_err();
        assert!(e.contains("unix://"), "{e}");
    }
}
