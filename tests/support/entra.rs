//! A Microsoft Entra ID stand-in on a loopback port, for the gateway's token requests:
//! the v2.0 token endpoint (`POST /{tenant}/oauth2/v2.0/token`, client credentials with
//! a client secret or a certificate's client assertion) and the Azure Arc agent's
//! managed identity endpoint (`GET /metadata/identity/oauth2/token`: 401 with a
//! `Basic realm=<key file>` challenge, then the file's contents as `Authorization:
//! Basic`). It issues RS256 access tokens for `https://servicebus.azure.net`, signed by
//! a key whose public half the emulator gets (`EmulatorOptions::jwt_key`), and answers
//! refusals with Entra's error JSON (`invalid_client`, `unauthorized_client`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use asb_gateway::jwt::{RsaSigner, RsaVerifier};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const SECRET: &str = "Client-Secret~with.odd_chars";
pub const ARC_KEY: &str = "4f2d0c8a9b1e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8";

/// A fresh 2048-bit RSA key in PKCS#8 PEM at `dir/name.pem` (openssl).
pub fn rsa_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl genpkey");
    path
}

/// `openssl pkey -pubout` of a key file, at `dir/name.pub.pem`.
pub fn public_key(dir: &Path, key: &Path, name: &str) -> PathBuf {
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = dir.join(format!("{name}.pub.pem"));
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// A self-signed RSA certificate with its key in one PEM file (`certificate_file`),
/// and the certificate's public key (for checking assertions).
pub fn client_certificate(dir: &Path) -> (PathBuf, RsaVerifier) {
    let key = rsa_key(dir, "client-key");
    let cert = dir.join("client-cert.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=asb-gateway-test",
            "-key",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl req");
    let both = dir.join("client.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    std::fs::write(&both, pem).unwrap();
    let verifier =
        RsaVerifier::from_pem(&std::fs::read(public_key(dir, &key, "client")).unwrap()).unwrap();
    (both, verifier)
}

/// How the stand-in behaves; changeable while it runs.
pub struct Entra {
    pub addr: SocketAddr,
    /// Tokens issued, by grant (`secret`, `certificate`, `arc`).
    issued: Mutex<HashMap<&'static str, usize>>,
    /// Requests refused.
    pub refused: AtomicUsize,
    /// Lifetime of the tokens issued, seconds.
    pub lifetime: AtomicU64,
    /// Answer every client credentials request with "Application is disabled".
    pub disabled: AtomicBool,
    signer: RsaSigner,
    /// Client assertions are checked with this key (the client certificate's).
    client_cert: Mutex<Option<RsaVerifier>>,
    arc_key_file: PathBuf,
    https: bool,
}

impl Entra {
    /// Start it; tokens are signed with the key at `signing_key` (PEM), assertions are
    /// checked with `client_cert`'s key. Arc's key file is written into `dir`.
    pub async fn start(
        dir: &Path,
        signing_key: &Path,
        client_cert: Option<RsaVerifier>,
    ) -> Arc<Entra> {
        Self::start_with(dir, signing_key, client_cert, None).await
    }

    /// The same over HTTPS with `tls` (a certificate for localhost).
    pub async fn start_with(
        dir: &Path,
        signing_key: &Path,
        client_cert: Option<RsaVerifier>,
        tls: Option<Arc<asb_gateway::tls::server::ServerTls>>,
    ) -> Arc<Entra> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let arc_key_file = dir.join("arc-token.key");
        std::fs::write(&arc_key_file, ARC_KEY).unwrap();
        let e = Arc::new(Entra {
            addr: l.local_addr().unwrap(),
            issued: Mutex::new(HashMap::new()),
            refused: AtomicUsize::new(0),
            lifetime: AtomicU64::new(3600),
            disabled: AtomicBool::new(false),
            signer: RsaSigner::from_pem(&std::fs::read(signing_key).unwrap()).unwrap(),
            client_cert: Mutex::new(client_cert),
            arc_key_file,
            https: tls.is_some(),
        });
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config()));
        let served = e.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let e = served.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let e = e.clone();
                        async move { Ok::<_, std::convert::Infallible>(e.handle(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        }
                    }
                });
            }
        });
        e
    }

    /// `http://127.0.0.1:PORT` (the authority host), or `https://localhost:PORT`.
    pub fn authority(&self) -> String {
        if self.https {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The managed identity endpoint.
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}/metadata/identity/oauth2/token", self.addr)
    }

    /// The token endpoint of [`TENANT`].
    pub fn token_endpoint(&self) -> String {
        format!("{}/{TENANT}/oauth2/v2.0/token", self.authority())
    }

    pub fn issued(&self, grant: &str) -> usize {
        self.issued.lock().unwrap().get(grant).copied().unwrap_or(0)
    }

    fn issue(&self, grant: &'static str, expires: &str) -> Response<Full<Bytes>> {
        *self.issued.lock().unwrap().entry(grant).or_default() += 1;
        let now = asb_gateway::sas::now_unix();
        let lifetime = self.lifetime.load(Ordering::Relaxed);
        let token = self.signer.sign(
            serde_json::Map::new(),
            &serde_json::json!({
                "aud": "https://servicebus.azure.net",
                "iss": format!("https://sts.windows.net/{TENANT}/"),
                "appid": CLIENT_ID,
                "nbf": now,
                "exp": now + lifetime,
            }),
        );
        let body = if expires == "expires_on" {
            serde_json::json!({"access_token": token, "expires_on": (now + lifetime).to_string(),
                               "resource": "https://servicebus.azure.net", "token_type": "Bearer"})
        } else {
            serde_json::json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})
        };
        json(StatusCode::OK, body)
    }

    fn refuse(&self, status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        json(
            status,
            serde_json::json!({"error": error, "error_description":
                format!("{description}\r\nTrace ID: 0000 Correlation ID: 0000 Timestamp: 2026-12-01"),
                "error_codes": [7000215]}),
        )
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let metadata = req.headers().get("Metadata").is_some_and(|v| v == "true");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        if path == "/metadata/identity/oauth2/token" {
            let q = form(&query);
            if !metadata
                || q.get("resource").map(String::as_str) != Some("https://servicebus.azure.net")
            {
                return self.refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Metadata header or resource missing",
                );
            }
            return match auth {
                Some(a) if a == format!("Basic {ARC_KEY}") => self.issue("arc", "expires_on"),
                Some(_) => self.refuse(StatusCode::UNAUTHORIZED, "invalid_request", "wrong key"),
                None => {
                    let mut r = json(StatusCode::UNAUTHORIZED, serde_json::json!({}));
                    r.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        format!("Basic realm={}", self.arc_key_file.display())
                            .parse()
                            .unwrap(),
                    );
                    r
                }
            };
        }
        if path != format!("/{TENANT}/oauth2/v2.0/token") {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "invalid_tenant",
                "AADSTS90002: Tenant not found.",
            );
        }
        let f = form(std::str::from_utf8(&body).unwrap_or(""));
        let get = |k: &str| f.get(k).map(String::as_str);
        if get("grant_type") != Some("client_credentials")
            || get("scope") != Some("https://servicebus.azure.net/.default")
        {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS900144: bad grant or scope",
            );
        }
        if get("client_id") != Some(CLIENT_ID) {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "AADSTS700016: Application not found.",
            );
        }
        if self.disabled.load(Ordering::Relaxed) {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "AADSTS7000112: Application is disabled.",
            );
        }
        if let Some(secret) = get("client_secret") {
            return if secret == SECRET {
                self.issue("secret", "expires_in")
            } else {
                self.refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "AADSTS7000215: Invalid client secret provided.",
                )
            };
        }
        if get("client_assertion_type")
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            && let Some(assertion) = get("client_assertion")
        {
            let verifier = self.client_cert.lock().unwrap().clone();
            let ok = verifier.is_some_and(|v| match v.verify(assertion) {
                Ok(c) => {
                    let now = asb_gateway::sas::now_unix();
                    c.get("aud").and_then(|a| a.as_str()) == Some(self.token_endpoint().as_str())
                        && c.get("iss").and_then(|a| a.as_str()) == Some(CLIENT_ID)
                        && c.get("sub").and_then(|a| a.as_str()) == Some(CLIENT_ID)
                        && c.get("exp")
                            .and_then(|e| e.as_u64())
                            .is_some_and(|e| e > now)
                }
                Err(_) => false,
            });
            return if ok && header_has_thumbprint(assertion) {
                self.issue("certificate", "expires_in")
            } else {
                self.refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "AADSTS700027: Client assertion failed signature validation.",
                )
            };
        }
        self.refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "AADSTS7000216: client_assertion or client_secret is required.",
        )
    }
}

/// The assertion's header names the certificate (`x5t` and `x5t#S256`).
fn header_has_thumbprint(jwt: &str) -> bool {
    use base64::Engine as _;
    let Some(h) = jwt.split('.').next() else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h) else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
    v.get("x5t").is_some() && v.get("x5t#S256").is_some()
}

fn form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let d = |x: &str| {
                percent_encoding::percent_decode_str(&x.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}
