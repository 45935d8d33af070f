//! The MQTT mirror to a secured broker (issue 23): a real mosquitto with TLS, a test CA
//! made in the test, `require_certificate`, `use_identity_as_username` and an ACL. The
//! mirror trusts the plant CA (`mqtt.ca_file`, `ca_only`), presents its client
//! certificate, publishes where the ACL allows, and hands a refused topic back as a
//! poison event; without a certificate, with one from another CA, or against a server
//! certificate it cannot verify it is refused with an error that names the broker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{ContentType, EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::journal::Handoff;
use asb_gateway::metrics::PartState;

use crate::support::daemon::Daemon;
use crate::support::emulator::start_default as emulator;
use crate::support::mirror_run::start;
use crate::support::mosquitto::{Mosquitto, MosquittoOptions};
use crate::support::{Subscriber, TempDir, capture_logs, free_port, logs, tls};

const CS: &str = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true";
const WAIT: Duration = Duration::from_secs(20);

/// mosquitto with TLS on `port` requiring client certificates (user name = the
/// certificate's CN) and an ACL, plus a plain listener on `plain` for the test's
/// anonymous subscriber, which may only read.
fn secured_broker(acl_dir: &Path, plain: u16) -> Mosquitto {
    let acl = acl_dir.join("acl");
    std::fs::write(
        &acl,
        "topic read factory/#\n\
         user gateway-01\ntopic readwrite factory/asb/line1/#\ntopic readwrite factory/asb/status\n\
         user gateway-02\ntopic readwrite factory/asb/line1/#\ntopic readwrite factory/asb/status\n",
    )
    .unwrap();
    Mosquitto::start_with(MosquittoOptions {
        tls: true,
        extra: format!(
            "require_certificate true\nuse_identity_as_username true\nacl_file {}\n\
             listener {plain} 127.0.0.1\n",
            acl.display()
        ),
        ..Default::default()
    })
}

fn context(mqtt: &str) -> Arc<Context> {
    let text = format!(
        "[source]\nconnection_string = \"{CS}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n[mqtt]\n\
         client_id = \"gw-{}-{}\"\nprotocol = \"5\"\nkeep_alive_secs = 5\n{mqtt}\n",
        std::process::id(),
        fastrand::u32(..)
    );
    Context::new(Config::parse(&text, &LoadEnv::default()).expect("test config"))
}

fn append(ctx: &Context, topic: &str) -> u64 {
    let seq = ctx.journal.next_seq();
    let meta = EventMeta {
        message_id: Some(IdString::try_from(format!("m-{seq}").as_str()).unwrap()),
        content_type: Some(ContentType::try_from("application/json").unwrap()),
        ..Default::default()
    };
    let ev = EncodedEvent::encode(seq, &Topic::try_from(topic).unwrap(), &meta, b"{\"v\":1}");
    ctx.journal.append(ev, true).unwrap()
}

/// The client's own copy of the broker's CA and key, to sign certificates with.
fn ca_copy(broker: &Mosquitto, dir: &TempDir) -> std::path::PathBuf {
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(broker.dir().join(f), dir.join(f)).unwrap();
    }
    dir.join("ca.pem")
}

async fn wait_log(needle: &str) -> String {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(l) = logs().into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(
            t0.elapsed() < WAIT,
            "no log line with {needle:?}:\n{}",
            logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn mutual_tls_with_the_plant_ca_publishes_where_the_acl_allows() {
    capture_logs();
    let acl_dir = TempDir::new("acl");
    let plain = free_port();
    let broker = secured_broker(acl_dir.path(), plain);
    let certs = TempDir::new("mqtt-client");
    let ca = ca_copy(&broker, &certs);
    let (cert, key) = tls::client_cert(certs.path(), "ca", "gw", "gateway-01");
    let mut sub = Subscriber::start(plain, "factory/asb/#", false).await;
    sub.wait_subscribed(1).await;
    let ctx = context(&format!(
        "url = \"mqtts://127.0.0.1:{}\"\nca_file = {ca:?}\nca_only = true\n\
         client_cert = {cert:?}\nclient_key = {key:?}\n",
        broker.port
    ));
    let mut m = start(&ctx);
    let allowed = append(&ctx, "line1/press/temp");
    let refused = append(&ctx, "line2/press/temp");
    let after = append(&ctx, "line1/press/state");
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 3 {
        let h = tokio::time::timeout(WAIT, m.acks.recv())
            .await
            .unwrap_or_else(|_| panic!("handoffs {got:?}:\n{}", logs().join("\n")))
            .unwrap();
        got.insert(h.seq(), h);
    }
    assert_eq!(got[&allowed], Handoff::Delivered(allowed));
    assert_eq!(got[&after], Handoff::Delivered(after));
    match &got[&refused] {
        Handoff::Rejected { description, .. } => {
            assert!(
                description.contains("0x87")
                    || description.to_lowercase().contains("not authorized"),
                "{description}"
            )
        }
        other => panic!("the topic the ACL refuses is a poison event, got {other:?}"),
    }
    assert_eq!(
        ctx.metrics.mqtt_reconnects.get(),
        0,
        "a refusal is not a reconnect loop"
    );
    // the subscriber sees what the ACL let through, and not the refused topic
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let r = sub.next(WAIT).await.expect("events reach the subscriber");
        if r.topic != "factory/asb/status" {
            seen.push(r.topic);
        }
    }
    assert_eq!(
        seen,
        [
            "factory/asb/line1/press/temp",
            "factory/asb/line1/press/state"
        ]
    );
    m.stop().await;
}

#[tokio::test]
async fn without_a_certificate_or_with_another_cas_it_is_refused_naming_the_broker() {
    capture_logs();
    let acl_dir = TempDir::new("acl");
    let broker = secured_broker(acl_dir.path(), free_port());
    let certs = TempDir::new("mqtt-client");
    let ca = ca_copy(&broker, &certs);
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    // no client certificate
    let ctx = context(&format!(
        "url = \"{url}\"\nca_file = {ca:?}\nca_only = true\n"
    ));
    let m = start(&ctx);
    let line = wait_log(&format!("MQTT broker {url}")).await;
    assert!(line.contains("CertificateRequired"), "{line}");
    assert!(ctx.metrics.mirror_state.get() != PartState::Up, "{line}");
    m.stop().await;
    // a certificate from another CA
    let other = TempDir::new("other-ca");
    tls::make_ca(other.path(), "ca");
    let (cert, key) = tls::client_cert(other.path(), "ca", "gw", "gateway-01");
    let ctx = context(&format!(
        "url = \"{url}\"\nca_file = {ca:?}\nca_only = true\nclient_cert = {cert:?}\nclient_key = {key:?}\n"
    ));
    let before = logs().len();
    let m = start(&ctx);
    let t0 = std::time::Instant::now();
    loop {
        let l = logs();
        if let Some(line) = l[before..]
            .iter()
            .find(|l| l.contains(&format!("MQTT broker {url}")))
        {
            assert!(line.contains("UnknownCA"), "{line}");
            break;
        }
        assert!(t0.elapsed() < WAIT, "no refusal logged:\n{}", l.join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ctx.metrics.mirror_state.get() != PartState::Up);
    m.stop().await;
}

#[tokio::test]
async fn a_server_certificate_from_an_unknown_ca_is_an_error_not_a_fallback() {
    capture_logs();
    // TLS without client certificates; the mirror trusts only the platform's roots
    let broker = Mosquitto::start_with(MosquittoOptions {
        tls: true,
        ..Default::default()
    });
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let ctx = context(&format!("url = \"{url}\"\n"));
    let m = start(&ctx);
    let line = wait_log(&format!("MQTT broker {url}")).await;
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    assert!(ctx.metrics.mirror_state.get() != PartState::Up);
    m.stop().await;
    // and with the plant CA it connects
    let certs = TempDir::new("ca");
    let ca = ca_copy(&broker, &certs);
    let ctx = context(&format!("url = \"{url}\"\nca_file = {ca:?}\n"));
    let m = start(&ctx);
    let t0 = std::time::Instant::now();
    while ctx.metrics.mirror_state.get() != PartState::Up {
        assert!(t0.elapsed() < WAIT, "not connected:\n{}", logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.stop().await;
}

#[test]
fn client_certificate_keys_are_checked_when_the_config_is_read() {
    let d = TempDir::new("mqtt-keys");
    tls::make_ca(d.path(), "ca");
    let (cert, key) = tls::client_cert(d.path(), "ca", "gw", "gateway-01");
    let (_, other_key) = tls::client_cert(d.path(), "ca", "gw2", "gateway-02");
    let parse = |mqtt: &str| {
        Config::parse(
            &format!(
                "[source]\nconnection_string = \"{CS}\"\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n[mqtt]\n{mqtt}"
            ),
            &LoadEnv::default(),
        )
        .map_err(|e| e.to_string())
    };
    let ok = parse(&format!(
        "url = \"mqtts://b:8883\"\nclient_cert = {cert:?}\nclient_key = {key:?}\n"
    ))
    .unwrap();
    let w = ok.warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("mqtt.client_cert") && w.contains("expires in 1 days")),
        "{w:?}"
    );
    for (mqtt, want) in [
        (
            format!(
                "url = \"mqtts://b:8883\"\nclient_cert = {cert:?}\nclient_key = {other_key:?}\n"
            ),
            "mqtt.client_key",
        ),
        (
            format!("url = \"mqtts://b:8883\"\nclient_cert = {cert:?}\n"),
            "mqtt.client_key",
        ),
        (
            format!("url = \"mqtt://b:1883\"\nclient_cert = {cert:?}\nclient_key = {key:?}\n"),
            "needs mqtts://",
        ),
        (
            format!(
                "url = \"mqtt://b:1883\"\nca_file = {:?}\n",
                d.join("ca.pem")
            ),
            "mqtt.ca_file",
        ),
        (
            format!(
                "url = \"unix:///run/mqtt.sock\"\nclient_cert = {cert:?}\nclient_key = {key:?}\n"
            ),
            "needs mqtts://",
        ),
        (
            format!(
                "url = \"unix:///run/mqtt.sock\"\nca_file = {:?}\n",
                d.join("ca.pem")
            ),
            "mqtt.ca_file",
        ),
        (
            "url = \"mqtts://b:8883\"\nca_only = true\n".to_string(),
            "mqtt.ca_only",
        ),
        (
            "url = \"wss://b:443/mqtt\"\n".to_string(),
            "MQTT over WebSockets",
        ),
        (
            format!("url = \"mqtts://b:8883\"\nca_file = {key:?}\n"),
            "no PEM CERTIFICATE",
        ),
    ] {
        let e = parse(&mqtt).unwrap_err();
        assert!(e.contains(want), "{mqtt}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_used_from_the_next_connection_after_sighup() {
    let em = emulator().await;
    let acl_dir = TempDir::new("acl");
    let mut broker = secured_broker(acl_dir.path(), free_port());
    let certs = TempDir::new("mqtt-rotate");
    let ca = ca_copy(&broker, &certs);
    let (first, first_key) = tls::client_cert(certs.path(), "ca", "first", "gateway-01");
    let (cert, key) = (certs.join("client.pem"), certs.join("client.key"));
    std::fs::copy(&first, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let config = format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n\
         [panels]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = {ca:?}\nca_only = true\n\
         client_cert = {cert:?}\nclient_key = {key:?}\nkeep_alive_secs = 5\n",
        em.connection_string(),
        broker.port
    );
    let mut daemon = tokio::task::spawn_blocking(move || Daemon::start(&config))
        .await
        .unwrap();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(t0.elapsed() < WAIT, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("connected as gateway-01", &|| {
        broker.log().contains("u'gateway-01'")
    });
    // rotate the files, reload, and make the mirror reconnect
    let (second, second_key) = tls::client_cert(certs.path(), "ca", "second", "gateway-02");
    std::fs::copy(&second, &cert).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait("reload logged", &|| {
        daemon.log_text().contains("reload: mqtt.client_cert")
    });
    // The client certificates are valid for 2 days: the expiry is warned once at start
    // and once for the reload, and /metrics says how long is left.
    let warning = "mqtt.client_cert";
    let warnings = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(warning) && l.contains("the certificate expires in 1 days"))
        .count();
    assert_eq!(warnings, 2, "{}", daemon.log_text());
    let panels = daemon.panels();
    let (status, _, metrics) = crate::support::http::get(panels, "/metrics").await;
    assert_eq!(status, 200);
    let left: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("asbgw_mqtt_cert_expiry_seconds "))
        .unwrap_or_else(|| panic!("no asbgw_mqtt_cert_expiry_seconds:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(
        (2 * 86_400 - 3_600..=2 * 86_400).contains(&left),
        "{left} s left of a 2-day certificate"
    );
    broker.stop();
    broker.start_again();
    wait("reconnected as gateway-02", &|| {
        broker.log().contains("u'gateway-02'")
    });
    assert!(
        !daemon.log_text().contains("mqtt.client_cert kept"),
        "{}",
        daemon.log_text()
    );
    daemon.terminate();
}
