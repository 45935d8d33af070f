//! Namespaces with SAS keys disabled: the daemon gets Microsoft Entra ID tokens — a
//! service principal's client secret, its certificate (a signed client assertion), the
//! Azure Arc managed identity's challenge flow — from a stand-in token endpoint
//! (`support::entra`), puts them on `$cbs` as type `jwt`, and the emulator checks them
//! (RS256 with the stand-in's key, audience Service Bus, expiry). Messages flow; tokens
//! are renewed on the live connection before they expire; a wrong secret or a disabled
//! application is a clear error, retried with backoff, with no secret in the log.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use asb_gateway::emulator::{EmulatorHandle, EmulatorOptions, client::Publisher};
use asb_gateway::jwt::RsaVerifier;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::daemon::Daemon;
use crate::support::entra::{self, CLIENT_ID, Entra, SECRET, TENANT};
use crate::support::{self, TempDir};

const ENTITY: &str = "operational-events/Subscriptions/edge";
const T: Duration = Duration::from_secs(30);

struct Setup {
    em: EmulatorHandle,
    entra: Arc<Entra>,
    dir: TempDir,
    client_pem: std::path::PathBuf,
}

/// The emulator trusting the stand-in's signing key, and the stand-in.
async fn setup() -> Setup {
    let dir = TempDir::new("entra");
    let signing = entra::rsa_key(dir.path(), "signing");
    let public = entra::public_key(dir.path(), &signing, "signing");
    let (client_pem, client_key) = entra::client_certificate(dir.path());
    let em = support::emulator::start(EmulatorOptions {
        jwt_key: Some(Arc::new(
            RsaVerifier::from_pem(&std::fs::read(public).unwrap()).unwrap(),
        )),
        ..Default::default()
    })
    .await;
    let entra = Entra::start(dir.path(), &signing, Some(client_key)).await;
    Setup {
        em,
        entra,
        dir,
        client_pem,
    }
}

/// The emulator's endpoint with no key: `Endpoint=sb://127.0.0.1:PORT;UseDevelopmentEmulator=true`.
fn keyless(em: &EmulatorHandle) -> String {
    format!(
        "Endpoint=sb://127.0.0.1:{};UseDevelopmentEmulator=true",
        em.addr().port()
    )
}

fn config(em: &EmulatorHandle, auth: &str) -> String {
    format!(
        "[source]\nconnection_string = {:?}\n{auth}\n\
         [[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n\
         [panels]\nlisten = \"127.0.0.1:0\"\n",
        keyless(em)
    )
}

fn entra_secret(s: &Setup, secret_file: &std::path::Path) -> String {
    format!(
        "auth = \"entra\"\n[source.entra]\ntenant_id = {TENANT:?}\nclient_id = {CLIENT_ID:?}\n\
         client_secret_file = {:?}\nauthority_host = {:?}",
        secret_file.display().to_string(),
        s.entra.authority()
    )
}

async fn publish(em: &EmulatorHandle, tag: &str, n: usize) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for i in 0..n {
        p.send_json(
            &format!("{tag}-{i}"),
            &[],
            "{}".to_string(),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

/// Connect a panel, publish `n`, and read them back.
async fn flows(em: &EmulatorHandle, d: &Daemon, tag: &str, n: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/stream", d.panels()))
        .await
        .unwrap();
    publish(em, tag, n).await;
    let mut got = 0;
    while got < n {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{tag}: {got} of {n} events; log:\n{}", d.log_text()));
        if let Some(Ok(Message::Text(t))) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "event" {
                assert!(v["subject"].as_str().unwrap().starts_with(tag));
                got += 1;
            }
        }
    }
}

async fn wait_for(what: &str, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_certificate_and_arc_managed_identity_each_get_a_token_the_emulator_accepts()
{
    let s = setup().await;
    let secret_file = s.dir.join("entra-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let mut completed = 0;

    let cases = [
        ("secret", entra_secret(&s, &secret_file)),
        (
            "certificate",
            format!(
                "auth = \"entra\"\n[source.entra]\ntenant_id = {TENANT:?}\nclient_id = {CLIENT_ID:?}\n\
                 certificate_file = {:?}\nauthority_host = {:?}",
                s.client_pem.display().to_string(),
                s.entra.authority()
            ),
        ),
        (
            "arc",
            format!(
                "auth = \"managed-identity\"\n[source.managed_identity]\nendpoint = {:?}",
                s.entra.identity_endpoint()
            ),
        ),
    ];
    for (grant, auth) in cases {
        let d = Daemon::with_config(&config(&s.em, &auth))
            .rust_log("trace")
            .start();
        flows(&s.em, &d, grant, 5).await;
        completed += 5;
        wait_for("completed", &d, || {
            s.em.stats()[ENTITY].completed == completed
        })
        .await;
        assert!(s.entra.issued(grant) >= 1, "{grant}: no token issued");
        let log = d.log_text();
        for secret in [SECRET, entra::ARC_KEY] {
            assert!(!log.contains(secret), "{grant}: a secret is in the log");
        }
        drop(d);
    }
    assert_eq!(s.entra.refused.load(Ordering::Relaxed), 0);
    // The Arc flow took the challenge: the first request of each round was refused
    // with 401 and answered with the key (counted as issued only then).
    s.em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_on_the_live_connection_before_they_expire() {
    let s = setup().await;
    // Tokens live 4 s; the emulator closes a connection whose token expired.
    s.entra.lifetime.store(4, Ordering::Relaxed);
    let secret_file = s.dir.join("entra-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let d = Daemon::start(&config(&s.em, &entra_secret(&s, &secret_file)));
    flows(&s.em, &d, "before", 3).await;
    // Three lifetimes later, with the same connection:
    let first = s.entra.issued("secret");
    wait_for("three renewals", &d, || {
        s.entra.issued("secret") >= first + 3
    })
    .await;
    flows(&s.em, &d, "after", 3).await;
    let (status, _, metrics) = support::http::get(d.panels(), "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("asbgw_source_reconnects_total"),
        0,
        "the connection was never lost to an expired token:\n{}",
        d.log_text()
    );
    assert!(value("asbgw_token_refreshes_total") >= 3);
    s.em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_or_a_disabled_application_is_a_clear_error_with_backoff() {
    let s = setup().await;
    let wrong = s.dir.join("wrong-secret");
    const WRONG: &str = "Not-The-Secret-0815";
    std::fs::write(&wrong, WRONG).unwrap();
    let d = Daemon::with_config(&config(&s.em, &entra_secret(&s, &wrong)))
        .rust_log("debug")
        .start();
    let want = format!(
        "source down: token endpoint {} refused: HTTP 401 invalid_client: AADSTS7000215: Invalid client secret provided.",
        s.entra.token_endpoint()
    );
    wait_for("the refusal", &d, || d.log_text().contains(&want)).await;
    let retries = |log: &str| log.matches("source still down: token endpoint").count();
    let at = retries(&d.log_text());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = retries(&d.log_text()) - at;
    assert!(
        (1..=8).contains(&n),
        "{n} retries in 3 s (backoff from 100 ms)"
    );
    let log = d.log_text();
    assert_eq!(log.matches(&want).count(), 1, "logged once as a warning");
    assert!(!log.contains(WRONG), "the secret is in the log");
    let (status, _, _) = support::http::get(d.panels(), "/healthz").await;
    assert_eq!(status, 503);
    drop(d);

    // The right secret, but the application is disabled.
    s.entra.disabled.store(true, Ordering::Relaxed);
    let right = s.dir.join("secret");
    std::fs::write(&right, SECRET).unwrap();
    let d = Daemon::start(&config(&s.em, &entra_secret(&s, &right)));
    wait_for("the disabled application", &d, || {
        d.log_text()
            .contains("HTTP 400 unauthorized_client: AADSTS7000112: Application is disabled.")
    })
    .await;
    drop(d);
    s.entra.disabled.store(false, Ordering::Relaxed);

    // A token the emulator does not accept (signed by another key): the put-token is
    // refused with 401, as Service Bus refuses a token from another issuer.
    let other = entra::rsa_key(s.dir.path(), "other");
    let impostor = Entra::start(s.dir.path(), &other, None).await;
    let auth = format!(
        "auth = \"entra\"\n[source.entra]\ntenant_id = {TENANT:?}\nclient_id = {CLIENT_ID:?}\n\
         client_secret_file = {:?}\nauthority_host = {:?}",
        right.display().to_string(),
        impostor.authority()
    );
    let d = Daemon::start(&config(&s.em, &auth));
    wait_for("the put-token refusal", &d, || {
        let log = d.log_text();
        log.contains("CBS token for")
            && log.contains("status 401")
            && log.contains("InvalidSignature")
    })
    .await;
    drop(d);
    s.em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_go_through_the_proxy_and_trust_the_plant_ca() {
    use asb_gateway::tls::{CertFiles, server::ServerTls};
    let s = setup().await;
    support::tls::make_ca(s.dir.path(), "plant-ca");
    let (cert, key) = support::tls::server_cert(s.dir.path(), "plant-ca", "login", 2);
    let signing = s.dir.join("signing.pem");
    let https = Entra::start_with(
        s.dir.path(),
        &signing,
        None,
        Some(ServerTls::load(CertFiles { cert, key }).unwrap()),
    )
    .await;
    let proxy = crate::support::tinyproxy::Tinyproxy::start(None);
    let secret = s.dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let auth = format!(
        "auth = \"entra\"\nproxy = {:?}\nca_file = {:?}\n[source.entra]\ntenant_id = {TENANT:?}\n\
         client_id = {CLIENT_ID:?}\nclient_secret_file = {:?}\nauthority_host = {:?}",
        proxy.url(None),
        s.dir.join("plant-ca.pem").display().to_string(),
        secret.display().to_string(),
        https.authority()
    );
    let d = Daemon::start(&config(&s.em, &auth));
    flows(&s.em, &d, "via-proxy", 3).await;
    assert_eq!(https.issued("secret"), 1);
    // The token request was tunnelled (the AMQP connection to the plain emulator is
    // tunnelled too: one proxy for the source).
    let log = proxy.log();
    assert!(
        log.contains(&format!("CONNECT localhost:{}", https.addr.port())),
        "{log}"
    );
    drop(d);
    s.em.shutdown().await;
}

#[test]
fn entra_settings_are_checked_and_name_their_key() {
    use asb_gateway::config::{Config, LoadEnv};
    let dir = TempDir::new("entra-cfg");
    let env = LoadEnv::default();
    let cs = "Endpoint=sb://ns.servicebus.windows.net/";
    let parse = |auth: &str| {
        Config::parse(
            &format!(
                "[source]\nconnection_string = {cs:?}\n{auth}\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n"
            ),
            &env,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let secret = dir.join("s");
    std::fs::write(&secret, "x").unwrap();
    let s = secret.display().to_string();
    assert!(
        parse("")
            .unwrap_err()
            .starts_with("source.connection_string: needs SharedAccessKeyName")
    );
    assert!(
        parse("auth = \"entra\"")
            .unwrap_err()
            .starts_with("source.entra: missing")
    );
    let table = |extra: &str| {
        format!("auth = \"entra\"\n[source.entra]\ntenant_id = \"t1\"\nclient_id = \"c1\"\n{extra}")
    };
    parse(&table(&format!("client_secret_file = {s:?}"))).unwrap();
    assert!(
        parse(&table(""))
            .unwrap_err()
            .contains("exactly one of client_secret_file and certificate_file")
    );
    assert!(
        parse(&table(&format!(
            "client_secret_file = {s:?}\nauthority_host = \"http://login.example\""
        )))
        .unwrap_err()
        .starts_with("source.entra.authority_host:")
    );
    assert!(
        parse(&table(&format!("certificate_file = {s:?}")))
            .unwrap_err()
            .starts_with("source.entra.certificate_file:")
    );
    assert!(
        parse("auth = \"managed-identity\"\n[source.managed_identity]\nendpoint = \"http://10.1.2.3/token\"")
            .unwrap_err()
            .starts_with("source.managed_identity.endpoint:")
    );
    parse("auth = \"managed-identity\"").unwrap();
    // A key in the connection string and Entra ID: one or the other.
    let keyed = Config::parse(
        "[source]\nconnection_string = \"Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=v\"\nauth = \"managed-identity\"\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n",
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(keyed.starts_with("source.auth:"), "{keyed}");
}
