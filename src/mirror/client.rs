//! One MQTT connection over rumqttc, MQTT 3.1.1 or 5, behind one small interface: the
//! mirror submits publishes through a [`Submitter`] and drives a [`Driver`] whose events
//! are reduced to what the mirror needs (connected, a publish left, a publish was
//! acknowledged, the disconnect left).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport};

use crate::config::{BrokerUrl, Endpoint, MqttConfig, MqttProtocol, Secret};
use crate::routing::MQTT_STRING_MAX;

/// What the mirror learns from one poll of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ev {
    /// CONNACK accepted; a new session (clean start) begins. `max_packet`: the broker's
    /// Maximum Packet Size (MQTT 5 CONNACK property), if it announced one.
    Connected { max_packet: Option<u32> },
    /// A publish was written to the broker with this packet id (0 for QoS 0).
    Published(u16),
    /// The broker acknowledged the publish with this packet id (PUBACK for QoS 1,
    /// PUBCOMP for QoS 2); `refused` when an MQTT 5 broker answered PUBACK or PUBREC with
    /// a failure reason (MQTT 5 §3.4.2.1, §3.5.2.1).
    Acked { pkid: u16, refused: Option<Refusal> },
    /// Our DISCONNECT was written.
    Disconnected,
    /// Anything else (pings, PUBREC, …).
    Other,
}

/// A broker's failure reason code on PUBACK or PUBREC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub text: &'static str,
    /// The same publish will be refused again (not authorised, topic name invalid,
    /// payload format invalid, packet too large); otherwise (quota exceeded, unspecified
    /// or implementation-specific error, packet id in use) it may pass when re-sent.
    pub permanent: bool,
}

fn refusal(code: &str) -> Refusal {
    let (text, permanent) = match code {
        "NotAuthorized" => ("not authorised (0x87)", true),
        "TopicNameInvalid" => ("topic name invalid (0x90)", true),
        "PayloadFormatInvalid" => ("payload format invalid (0x99)", true),
        "QuotaExceeded" => ("quota exceeded (0x97)", false),
        "PacketIdentifierInUse" => ("packet id in use (0x91)", false),
        "ImplementationSpecificError" => ("implementation-specific error (0x83)", false),
        _ => ("unspecified error (0x80)", false),
    };
    Refusal { text, permanent }
}

/// Why a connection attempt or a connection failed, with the broker named by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnFailure {
    /// The broker answered CONNACK with a refusal (bad credentials, not authorised, …).
    Refused(String),
    /// The broker sent DISCONNECT (MQTT 5); `blames_publish` when its reason can be
    /// caused by a publish (malformed, protocol error, packet too large, topic or
    /// payload invalid), not by the session (taken over, shutting down, keep-alive).
    Disconnected { text: String, blames_publish: bool },
    /// The network or protocol failed.
    Network(String),
}

impl ConnFailure {
    /// Can a publish on the wire have caused this? Only then does the loss count
    /// against the oldest unacknowledged publish (a strike towards a poison event).
    pub fn blames_publish(&self) -> bool {
        match self {
            ConnFailure::Refused(_) => false,
            ConnFailure::Disconnected { blames_publish, .. } => *blames_publish,
            ConnFailure::Network(t) => {
                let t = t.to_ascii_lowercase();
                !(t.contains("timeout") || t.contains("timed out") || t.contains("pingresp"))
            }
        }
    }
}

impl std::fmt::Display for ConnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnFailure::Refused(r) => write!(f, "refused the connection: {r}"),
            ConnFailure::Disconnected { text, .. } => f.write_str(text),
            ConnFailure::Network(r) => f.write_str(r),
        }
    }
}

fn refusal_text(code: &str) -> String {
    let what = match code {
        "BadUserNamePassword" => "bad user name or password",
        "NotAuthorized" => "not authorised",
        "BadClientId" | "ClientIdentifierNotValid" => "client id rejected",
        "RefusedProtocolVersion" | "UnsupportedProtocolVersion" => {
            "protocol version not supported (set mqtt.protocol)"
        }
        "ServiceUnavailable" | "ServerUnavailable" | "ServerBusy" => "broker unavailable",
        _ => "",
    };
    if what.is_empty() {
        format!("CONNACK {code}")
    } else {
        format!("{what} (CONNACK {code})")
    }
}

/// Options for one connection.
pub struct Options<'a> {
    pub config: &'a MqttConfig,
    pub password: Option<&'a Secret>,
    pub broker: &'a BrokerUrl,
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Largest publish we send (bytes, topic and payload).
    pub max_packet: usize,
    /// Publishes in flight at rumqttc (events + status), also its packet-id range.
    pub inflight: u16,
    /// Capacity of the request channel.
    pub channel: usize,
    /// Retained status topic and the will published there.
    pub status_topic: String,
}

fn qos_v4(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn qos_v5(n: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q;
    match n {
        0 => Q::AtMostOnce,
        2 => Q::ExactlyOnce,
        _ => Q::AtLeastOnce,
    }
}

/// The half that submits requests.
pub enum Submitter {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The half that drives the connection.
pub enum Driver {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// MQTT 5 user properties of one publish.
pub struct V5Props {
    pub user: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// Bound on TCP connect, TLS and CONNACK, each attempt.
const CONNECT_TIMEOUT_SECS: u64 = 5;
/// The TCP socket's send buffer (SO_SNDBUF). rumqttc sets no options on a Unix socket,
/// which keeps the kernel's default (`net.core.wmem_default`).
pub const SEND_BUFFER: u32 = 64 * 1024;
/// The socket's receive buffer: only acknowledgements come back.
const RECV_BUFFER: u32 = 16 * 1024;

fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    // Every publish is flushed at once; Nagle would only hold small ones back.
    n.set_tcp_nodelay(true);
    n.set_tcp_send_buffer_size(SEND_BUFFER);
    n.set_tcp_recv_buffer_size(RECV_BUFFER);
    n.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    n
}

pub fn new(o: &Options<'_>) -> (Submitter, Driver) {
    let c = o.config;
    let keep_alive = Duration::from_secs(c.keep_alive_secs.max(1));
    // rumqttc takes a Unix socket's path where a TCP broker's host goes (port unused).
    let (transport, host, port) = match (&o.broker.endpoint, &o.tls) {
        (Endpoint::Unix(path), _) => (Transport::unix(), path.to_string_lossy().into_owned(), 0),
        (Endpoint::Tcp { host, port }, Some(cfg)) => (
            Transport::tls_with_config(TlsConfiguration::Rustls(cfg.clone())),
            host.clone(),
            *port,
        ),
        (Endpoint::Tcp { host, port }, None) => (Transport::tcp(), host.clone(), *port),
    };
    match c.protocol {
        MqttProtocol::V311 => {
            let mut opts = rumqttc::MqttOptions::new(&c.client_id, &host, port);
            opts.set_keep_alive(keep_alive)
                .set_clean_session(true)
                .set_inflight(o.inflight)
                .set_max_packet_size(64 * 1024, o.max_packet)
                .set_transport(transport)
                .set_last_will(rumqttc::LastWill::new(
                    &o.status_topic,
                    "offline",
                    QoS::AtLeastOnce,
                    true,
                ));
            if let Some(user) = &c.username {
                opts.set_credentials(user, o.password.map(|p| p.expose()).unwrap_or(""));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, o.channel);
            eventloop.set_network_options(network_options());
            (Submitter::V4(client), Driver::V4(Box::new(eventloop)))
        }
        MqttProtocol::V5 => {
            use rumqttc::v5;
            let mut opts = v5::MqttOptions::new(&c.client_id, &host, port);
            opts.set_keep_alive(keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(o.inflight)
                .set_transport(transport)
                .set_connection_timeout(CONNECT_TIMEOUT_SECS)
                .set_network_options(network_options())
                .set_last_will(v5::mqttbytes::v5::LastWill::new(
                    &o.status_topic,
                    "offline",
                    qos_v5(1),
                    true,
                    None,
                ));
            if let Some(user) = &c.username {
                opts.set_credentials(user, o.password.map(|p| p.expose()).unwrap_or(""));
            }
            let (client, eventloop) = v5::AsyncClient::new(opts, o.channel);
            (Submitter::V5(client), Driver::V5(Box::new(eventloop)))
        }
    }
}

/// Topics may not carry wildcards, nor what MQTT forbids in strings
/// ([`crate::routing::mqtt_forbidden`]); replace them so every submit is accepted (a
/// rejected submit would break the order the mirror relies on).
fn publishable(topic: String) -> String {
    if topic.contains(['+', '#']) || topic.chars().any(crate::routing::mqtt_forbidden) {
        let t = topic.replace(['+', '#'], "_");
        crate::routing::mqtt_clean(&t, '_', MQTT_STRING_MAX).into_owned()
    } else {
        topic
    }
}

/// A server DISCONNECT (MQTT 5 §3.14.2.1), named for an operator.
fn server_disconnect_text(code: &str, reason: Option<&str>) -> String {
    let what = match code {
        "SessionTakenOver" => {
            "session taken over (DISCONNECT 0x8E): another client connected with the same \
             client id; give every box its own mqtt.client_id"
        }
        "PacketTooLarge" => "packet too large (DISCONNECT 0x95)",
        "MalformedPacket" => "malformed packet (DISCONNECT 0x81)",
        "ProtocolError" => "protocol error (DISCONNECT 0x82)",
        "NotAuthorized" => "not authorised (DISCONNECT 0x87)",
        "ServerShuttingDown" => "broker shutting down (DISCONNECT 0x8B)",
        "KeepAliveTimeout" => "keep-alive timeout (DISCONNECT 0x8D)",
        "TopicNameInvalid" => "topic name invalid (DISCONNECT 0x90)",
        "QuotaExceeded" => "quota exceeded (DISCONNECT 0x97)",
        _ => "",
    };
    let mut text = if what.is_empty() {
        format!("the broker disconnected us ({code})")
    } else {
        format!("the broker disconnected us: {what}")
    };
    if let Some(r) = reason.filter(|r| !r.is_empty()) {
        text.push_str(": ");
        text.push_str(&crate::redact::peer_text(r));
    }
    text
}

impl Submitter {
    /// Queue one publish. The channel always has room (the mirror bounds what it
    /// submits), so this completes at once.
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        props: Option<V5Props>,
    ) -> Result<(), String> {
        let topic = publishable(topic);
        match self {
            Submitter::V4(c) => c
                .publish_bytes(topic, qos_v4(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Submitter::V5(c) => {
                let qos = qos_v5(qos);
                match props {
                    Some(p) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                            user_properties: p.user,
                            content_type: p.content_type,
                            ..Default::default()
                        };
                        c.publish_bytes_with_properties(topic, qos, retain, payload, props)
                            .await
                    }
                    None => c.publish_bytes(topic, qos, retain, payload).await,
                }
                .map_err(|e| e.to_string())
            }
        }
    }

    pub async fn disconnect(&self) {
        match self {
            Submitter::V4(c) => drop(c.disconnect().await),
            Submitter::V5(c) => drop(c.disconnect().await),
        }
    }
}

impl Driver {
    /// Poll the connection once (connecting first when there is none). Not cancel-safe:
    /// the caller keeps the future alive until it completes. `socket`: the broker's Unix
    /// socket path, when it is reached over one (for errors that name the cause).
    pub async fn poll(&mut self, socket: Option<&Path>) -> Result<Ev, ConnFailure> {
        match self {
            Driver::V4(el) => {
                use rumqttc::{ConnectionError as E, Event, Incoming};
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        Ok(Ev::Connected { max_packet: None })
                    }
                    Ok(Event::Incoming(Incoming::PubAck(a))) => Ok(Ev::Acked {
                        pkid: a.pkid,
                        refused: None,
                    }),
                    Ok(Event::Incoming(Incoming::PubComp(a))) => Ok(Ev::Acked {
                        pkid: a.pkid,
                        refused: None,
                    }),
                    Ok(Event::Outgoing(o)) => Ok(outgoing(o)),
                    Ok(_) => Ok(Ev::Other),
                    Err(E::ConnectionRefused(code)) => {
                        Err(ConnFailure::Refused(refusal_text(&format!("{code:?}"))))
                    }
                    Err(e) => Err(ConnFailure::Network(network_text(&e.to_string(), socket))),
                }
            }
            Driver::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
                use rumqttc::v5::{ConnectionError as E, Event, StateError};
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => Ok(Ev::Connected {
                        max_packet: c.properties.and_then(|p| p.max_packet_size),
                    }),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(Ev::Acked {
                        pkid: a.pkid,
                        refused: match a.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            other => Some(refusal(&format!("{other:?}"))),
                        },
                    }),
                    // A refused PUBREC ends the QoS 2 exchange (no PUBREL follows).
                    Ok(Event::Incoming(Packet::PubRec(a)))
                        if !matches!(
                            a.reason,
                            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                        ) =>
                    {
                        Ok(Ev::Acked {
                            pkid: a.pkid,
                            refused: Some(refusal(&format!("{:?}", a.reason))),
                        })
                    }
                    // PUBCOMP "packet id not found" still means the broker had it (it
                    // answered our PUBREL): delivered.
                    Ok(Event::Incoming(Packet::PubComp(a))) => Ok(Ev::Acked {
                        pkid: a.pkid,
                        refused: None,
                    }),
                    Ok(Event::Outgoing(o)) => Ok(outgoing(o)),
                    Ok(_) => Ok(Ev::Other),
                    Err(E::ConnectionRefused(code)) => {
                        Err(ConnFailure::Refused(refusal_text(&format!("{code:?}"))))
                    }
                    Err(E::MqttState(StateError::ConnFail { reason })) => {
                        Err(ConnFailure::Refused(refusal_text(&format!("{reason:?}"))))
                    }
                    Err(E::MqttState(StateError::ServerDisconnect {
                        reason_code,
                        reason_string,
                    })) => {
                        let code = format!("{reason_code:?}");
                        Err(ConnFailure::Disconnected {
                            blames_publish: matches!(
                                code.as_str(),
                                "MalformedPacket"
                                    | "ProtocolError"
                                    | "PacketTooLarge"
                                    | "TopicNameInvalid"
                                    | "PayloadFormatInvalid"
                                    | "ImplementationSpecificError"
                                    | "UnspecifiedError"
                            ),
                            text: server_disconnect_text(&code, reason_string.as_deref()),
                        })
                    }
                    Err(e) => Err(ConnFailure::Network(network_text(&e.to_string(), socket))),
                }
            }
        }
    }

    /// After a failure, forget everything of the lost session so the next one starts
    /// from nothing but what the mirror submits again:
    /// - the requests rumqttc moved to `pending` (unacknowledged publishes and queued
    ///   requests): the mirror re-submits what it still needs, in order;
    /// - a packet-id collision (kept across `clean()`, it would stall the next session);
    /// - the events rumqttc buffered but had not yielded yet (`Outgoing::Publish`,
    ///   `PubAck` of the lost session): yielded after the next CONNACK they would be
    ///   matched to the new session's publishes and acknowledge the wrong events.
    pub fn reset_after_failure(&mut self) {
        match self {
            Driver::V4(el) => {
                el.state.collision = None;
                el.state.events.clear();
                el.pending.clear();
            }
            Driver::V5(el) => {
                el.state.collision = None;
                el.state.events.clear();
                el.pending.clear();
            }
        }
    }
}

/// Why connecting to the Unix socket at `path` failed with `e` (`connect(2)`: ENOENT,
/// EACCES, ECONNREFUSED), told apart by looking at the path; `None` for other errors.
fn unix_connect_problem(e: &str, path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let connect_error = [
        "No such file or directory",
        "Permission denied",
        "Connection refused",
    ]
    .iter()
    .any(|m| e.contains(m));
    if !connect_error {
        return None;
    }
    Some(match std::fs::metadata(path) {
        Err(m) if m.kind() == std::io::ErrorKind::PermissionDenied => {
            "permission denied on a directory of the socket's path (this service's user needs \
             search permission on each)"
        }
        Err(_) => {
            "no socket at that path (is the broker running, with a listener there? The shipped \
             unit hides /tmp and /home from the service)"
        }
        Ok(m) if !m.file_type().is_socket() => "that path is not a socket",
        Ok(_) if e.contains("Permission denied") => {
            "permission denied on the socket (this service's user or group needs write access \
             to it)"
        }
        Ok(_) if e.contains("Connection refused") => {
            "connection refused: nothing listens on that socket (left behind by a broker that \
             is gone?)"
        }
        Ok(_) => "no socket at that path (is the broker running, with a listener there?)",
    })
}

fn outgoing(o: Outgoing) -> Ev {
    match o {
        Outgoing::Publish(pkid) => Ev::Published(pkid),
        Outgoing::Disconnect => Ev::Disconnected,
        _ => Ev::Other,
    }
}

/// What a connection error means, in words for the log; `socket`: the broker's Unix
/// socket path, when there is one.
fn network_text(e: &str, socket: Option<&Path>) -> String {
    if let Some(why) = socket.and_then(|p| unix_connect_problem(e, p)) {
        why.into()
    } else if e.contains("Connection refused") {
        "connection refused (is the broker running?)".into()
    } else if e.contains("failed to lookup") || e.contains("Name or service not known") {
        format!("cannot resolve the host ({e})")
    } else if e.contains("closed by peer") {
        "connection closed by the broker (brokers close it on a packet they refuse, or \
         when another client connects with the same client id)"
            .into()
    } else {
        e.to_string()
    }
}
