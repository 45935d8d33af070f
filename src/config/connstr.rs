//! Azure Service Bus connection strings, as the SDKs accept them:
//! `Endpoint=sb://HOST[:PORT]/;SharedAccessKeyName=K;SharedAccessKey=V[;EntityPath=E]`
//! or `...;SharedAccessSignature=SharedAccessSignature sr=...`, plus
//! `UseDevelopmentEmulator=true` for plain AMQP (default port 5672) instead of AMQPS (5671),
//! and `TransportType=AmqpWebSockets` for AMQP over WebSockets (`wss://HOST:443/
//! $servicebus/websocket`; `ws://HOST:80/…` with the emulator flag).
//! Errors name the part that is wrong and never echo a value.

use super::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnStrError {
    #[error("connection string is empty")]
    Empty,
    #[error("connection string part {0} is not of the form Key=Value")]
    NotKeyValue(usize),
    #[error("connection string has no Endpoint")]
    NoEndpoint,
    #[error(
        "connection string Endpoint must look like sb://HOST[:PORT]/ (a DNS name or an IP address, IPv6 in brackets)"
    )]
    BadEndpoint,
    #[error("connection string Endpoint has an invalid port")]
    BadPort,
    #[error(
        "connection string needs SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature"
    )]
    NoCredentials,
    #[error("connection string has SharedAccessKeyName without SharedAccessKey (or the reverse)")]
    HalfKey,
    #[error("connection string has both a shared access key and a SharedAccessSignature")]
    BothCredentials,
    #[error("connection string has {0} more than once")]
    Repeated(&'static str),
    #[error("connection string UseDevelopmentEmulator must be true or false")]
    BadEmulatorFlag,
    #[error("connection string SharedAccessSignature must start with 'SharedAccessSignature '")]
    BadSignature,
    #[error("connection string TransportType must be Amqp or AmqpWebSockets")]
    BadTransportType,
}

/// How to authenticate.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Key name and key: tokens are signed locally and refreshed.
    Key { name: String, key: Secret },
    /// A ready-made SAS token (`SharedAccessSignature sr=…`): used as given, not renewed.
    Signature(Secret),
    /// No SAS credential (`Endpoint=…` alone): tokens come from Microsoft Entra ID
    /// (`source.auth = "entra"` or `"managed-identity"`).
    None,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Key { name, .. } => f
                .debug_struct("Key")
                .field("name", name)
                .field("key", &"***")
                .finish(),
            Credential::Signature(_) => f.write_str("Signature(***)"),
            Credential::None => f.write_str("None"),
        }
    }
}

/// The port a transport uses when the Endpoint names none.
fn default_port(tls: bool, websockets: bool) -> u16 {
    match (tls, websockets) {
        (true, false) => 5671,
        (false, false) => 5672,
        (true, true) => 443,
        (false, true) => 80,
    }
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub host: String,
    pub port: u16,
    /// AMQPS (TLS from the first byte) unless `UseDevelopmentEmulator=true`.
    pub tls: bool,
    pub credential: Credential,
    pub entity_path: Option<String>,
    pub emulator: bool,
    /// AMQP over WebSockets (`TransportType=AmqpWebSockets`, or `source.transport`).
    pub websockets: bool,
    /// The Endpoint named the port; otherwise it follows the transport
    /// ([`ConnectionString::set_websockets`]).
    pub port_explicit: bool,
}

impl ConnectionString {
    pub fn parse(s: &str) -> Result<Self, ConnStrError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ConnStrError::Empty);
        }
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut sas = None;
        let mut entity = None;
        let mut emulator = None;
        let mut transport = None;
        fn set<'a>(
            slot: &mut Option<&'a str>,
            v: &'a str,
            name: &'static str,
        ) -> Result<(), ConnStrError> {
            if slot.replace(v).is_some() {
                return Err(ConnStrError::Repeated(name));
            }
            Ok(())
        }
        for (i, part) in s.split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or(ConnStrError::NotKeyValue(i + 1))?;
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => set(&mut endpoint, v, "Endpoint")?,
                "sharedaccesskeyname" => set(&mut key_name, v, "SharedAccessKeyName")?,
                "sharedaccesskey" => set(&mut key, v, "SharedAccessKey")?,
                "sharedaccesssignature" => set(&mut sas, v, "SharedAccessSignature")?,
                "entitypath" => set(&mut entity, v, "EntityPath")?,
                "usedevelopmentemulator" => set(&mut emulator, v, "UseDevelopmentEmulator")?,
                "transporttype" => set(&mut transport, v, "TransportType")?,
                // Other keys the SDKs know do not change how we connect: accepted and
                // ignored.
                _ => {}
            }
        }
        let emulator = match emulator.map(|v| v.to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            Some(_) => return Err(ConnStrError::BadEmulatorFlag),
        };
        let websockets = match transport.map(|v| v.to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "amqp" => false,
            Some(v) if v == "amqpwebsockets" => true,
            Some(_) => return Err(ConnStrError::BadTransportType),
        };
        let endpoint = endpoint.ok_or(ConnStrError::NoEndpoint)?;
        let rest = endpoint
            .strip_prefix("sb://")
            .or_else(|| endpoint.strip_prefix("amqps://"))
            .or_else(|| endpoint.strip_prefix("amqp://"))
            .ok_or(ConnStrError::BadEndpoint)?;
        // The authority ends at the first '/', '?' or '#' (RFC 3986 §3.2). A path is
        // ignored, as the SDKs do; a query or fragment has no meaning here.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, after) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') || after.contains(['?', '#']) {
            return Err(ConnStrError::BadEndpoint);
        }
        let default_port = default_port(!emulator, websockets);
        let port_explicit = crate::authority::has_port(authority);
        let (host, port) =
            crate::authority::split_host_port(authority, default_port).ok_or(if port_explicit {
                ConnStrError::BadPort
            } else {
                ConnStrError::BadEndpoint
            })?;
        if !crate::authority::valid_host(&host) {
            return Err(ConnStrError::BadEndpoint);
        }
        let credential = match (key_name, key, sas) {
            (Some(_), Some(_), Some(_)) => return Err(ConnStrError::BothCredentials),
            (Some(n), Some(k), None) if !n.is_empty() && !k.is_empty() => Credential::Key {
                name: n.to_string(),
                key: Secret::new(k),
            },
            (None, None, Some(sig)) => {
                if !sig.starts_with("SharedAccessSignature ") {
                    return Err(ConnStrError::BadSignature);
                }
                Credential::Signature(Secret::new(sig))
            }
            (Some(_), None, _) | (None, Some(_), _) => return Err(ConnStrError::HalfKey),
            (Some(_), Some(_), None) => return Err(ConnStrError::HalfKey),
            // Checked against source.auth by the config: Entra ID needs no key.
            (None, None, None) => Credential::None,
        };
        Ok(ConnectionString {
            host,
            port,
            tls: !emulator,
            credential,
            entity_path: entity.filter(|e| !e.is_empty()).map(str::to_string),
            emulator,
            websockets,
            port_explicit,
        })
    }

    /// Choose the transport (`source.transport` overrides `TransportType`); a port the
    /// Endpoint did not name follows it (5671/5672 for AMQP, 443/80 for WebSockets).
    pub fn set_websockets(&mut self, on: bool) {
        self.websockets = on;
        if !self.port_explicit {
            self.port = default_port(self.tls, on);
        }
    }

    /// The WebSocket URL of the namespace: `wss://HOST:PORT/$servicebus/websocket`
    /// (`ws://` with the emulator flag).
    pub fn websocket_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, crate::amqp_ws::PATH)
    }

    /// The namespace URI tokens are scoped to, e.g. `sb://host/`.
    pub fn resource_uri(&self) -> String {
        format!("sb://{}/", self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS12YWx1ZQ==";

    #[test]
    fn all_forms() {
        let c = ConnectionString::parse(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=K;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls),
            ("ns.servicebus.windows.net", 5671, true)
        );
        assert_eq!(
            c.credential,
            Credential::Key {
                name: "K".into(),
                key: Secret::new(KEY)
            }
        );
        let c = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls, c.emulator),
            ("127.0.0.1", 5673, false, true)
        );
        let c = ConnectionString::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=TRUE;",
        )
        .unwrap();
        assert_eq!(c.port, 5672);
        let c = ConnectionString::parse(
            "endpoint=sb://ns/;sharedaccesssignature=SharedAccessSignature sr=x&sig=y&se=1&skn=k;EntityPath=topic1;TransportType=Amqp",
        )
        .unwrap();
        assert!(matches!(c.credential, Credential::Signature(_)));
        assert_eq!(c.entity_path.as_deref(), Some("topic1"));
        assert_eq!(c.resource_uri(), "sb://ns/");
    }

    #[test]
    fn malformed_rejected_without_echoing_secrets() {
        let cases = [
            ("", ConnStrError::Empty),
            (
                "SharedAccessKeyName=K;SharedAccessKey=SECRETX",
                ConnStrError::NoEndpoint,
            ),
            (
                "Endpoint=http://x/;SharedAccessKeyName=K;SharedAccessKey=SECRETX",
                ConnStrError::BadEndpoint,
            ),
            (
                "Endpoint=sb://x:99999/;SharedAccessKeyName=K;SharedAccessKey=SECRETX",
                ConnStrError::BadPort,
            ),
            (
                "Endpoint=sb://x/;SharedAccessKey=SECRETX",
                ConnStrError::HalfKey,
            ),
            (
                "Endpoint=sb://x/;SharedAccessKeyName=K;SharedAccessKey=SECRETX;SharedAccessSignature=SharedAccessSignature SECRETX",
                ConnStrError::BothCredentials,
            ),
            ("Endpoint=sb://x/;SECRETX", ConnStrError::NotKeyValue(2)),
            (
                "Endpoint=sb://x/;SharedAccessSignature=SECRETX",
                ConnStrError::BadSignature,
            ),
            (
                "Endpoint=sb://x/;SharedAccessKeyName=K;SharedAccessKey=SECRETX;SharedAccessKey=SECRETX",
                ConnStrError::Repeated("SharedAccessKey"),
            ),
            (
                "Endpoint=sb://x/;SharedAccessKeyName=K;SharedAccessKey=SECRETX;UseDevelopmentEmulator=yes",
                ConnStrError::BadEmulatorFlag,
            ),
            (
                "Endpoint=sb://user@x/;SharedAccessKeyName=K;SharedAccessKey=SECRETX",
                ConnStrError::BadEndpoint,
            ),
        ];
        // Hosts and ports that name nothing to connect to.
        let key = ";SharedAccessKeyName=K;SharedAccessKey=SECRETX";
        let hosts = [
            ("sb://n s/", ConnStrError::BadEndpoint),
            ("sb://n\u{0}s/", ConnStrError::BadEndpoint),
            ("sb://ns?x=1", ConnStrError::BadEndpoint),
            ("sb://ns:5671?x=1", ConnStrError::BadEndpoint),
            ("sb://ns:5671#x", ConnStrError::BadEndpoint),
            ("sb://ns/?x=1", ConnStrError::BadEndpoint),
            ("sb://ns/#x", ConnStrError::BadEndpoint),
            ("sb://a:b:5671/", ConnStrError::BadPort),
            ("sb://ns:+5671/", ConnStrError::BadPort),
            ("sb://::1/", ConnStrError::BadPort),
            ("sb://[ns]/", ConnStrError::BadEndpoint),
        ];
        for (endpoint, want) in hosts {
            let s = format!("Endpoint={endpoint}{key}");
            assert_eq!(ConnectionString::parse(&s).unwrap_err(), want, "{s}");
        }
        for (endpoint, host, port) in [("sb://[::1]/", "::1", 5671), ("sb://[::1]:99/", "::1", 99)]
        {
            let c = ConnectionString::parse(&format!("Endpoint={endpoint}{key}")).unwrap();
            assert_eq!((c.host.as_str(), c.port), (host, port), "{endpoint}");
        }
        for (s, want) in cases {
            let err = ConnectionString::parse(s).unwrap_err();
            assert_eq!(err, want, "{s}");
            assert!(!err.to_string().contains("SECRETX"));
        }
    }

    #[test]
    fn debug_masks_key() {
        let c = ConnectionString::parse(&format!(
            "Endpoint=sb://ns/;SharedAccessKeyName=K;SharedAccessKey={KEY}"
        ))
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(KEY), "{dbg}");
        assert!(dbg.contains("***"));
    }

    #[test]
    fn transport_type_chooses_websockets_and_their_port() {
        let base = format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=K;SharedAccessKey={KEY}"
        );
        let c = ConnectionString::parse(&format!("{base};TransportType=AmqpWebSockets")).unwrap();
        assert!(c.websockets);
        assert_eq!(c.port, 443);
        assert_eq!(
            c.websocket_url(),
            "wss://ns.servicebus.windows.net:443/$servicebus/websocket"
        );
        let mut c = ConnectionString::parse(&format!("{base};transporttype=amqp")).unwrap();
        assert!(!c.websockets);
        assert_eq!(c.port, 5671);
        c.set_websockets(true);
        assert_eq!(c.port, 443);
        let mut c = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:5300;SharedAccessKeyName=K;SharedAccessKey=V;UseDevelopmentEmulator=true",
        )
        .unwrap();
        c.set_websockets(true);
        assert_eq!(c.port, 5300, "a port the Endpoint names stays");
        assert_eq!(
            c.websocket_url(),
            "ws://127.0.0.1:5300/$servicebus/websocket"
        );
        assert_eq!(
            ConnectionString::parse(&format!("{base};TransportType=Tcp")),
            Err(ConnStrError::BadTransportType)
        );
    }
}
