//! `mqtt.url`: where the MQTT broker is, parsed once when the config is read.

use serde::Deserialize;

/// A broker URL, `mqtt://HOST:PORT` (plain TCP) or `mqtts://HOST:PORT` (TLS); IPv6 hosts
/// in brackets. No credentials in the URL (they go in `mqtt.username`/`mqtt.password`),
/// and the port is required (1–65535).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BrokerUrl {
    /// The URL as written, for logs and errors.
    pub url: String,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS from the first byte.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parse `url`; the error says what is wrong and quotes the URL.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let fail = |why: &str| format!("{url:?} {why}");
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if url.starts_with("ws://") || url.starts_with("wss://") {
            return Err(fail(
                "is MQTT over WebSockets, which this build does not speak (docs/mirror-tls.md \
                 says why); use mqtt:// or mqtts://",
            ));
        } else {
            return Err(fail("must start with mqtt:// or mqtts://"));
        };
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') {
            // Never quote a URL that carries credentials.
            return Err(
                "must not carry credentials: put them in mqtt.username and mqtt.password".into(),
            );
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| fail("must name a host and port, e.g. mqtt://127.0.0.1:1883"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(fail("has no host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| fail("has an invalid port"))?;
        Ok(BrokerUrl {
            url: url.to_string(),
            host: host.to_string(),
            port,
            tls,
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

    #[test]
    fn parses_scheme_host_port() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1883, false));
        let u = BrokerUrl::parse("mqtts://broker.local:8883/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.local", 8883, true)
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1883").unwrap().host, "::1");
        assert_eq!(
            BrokerUrl::parse("mqtt://x:1").unwrap().to_string(),
            "mqtt://x:1"
        );
    }

    #[test]
    fn refuses_what_it_cannot_connect_to() {
        for bad in [
            "tcp://x:1",
            "mqtt://x",
            "mqtt://:1",
            "mqtt://x:0",
            "mqtt://x:65536",
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        let e = BrokerUrl::parse("mqtt://u:hunter2@x:1").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
