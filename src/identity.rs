//! Microsoft Entra ID access tokens for Service Bus, for namespaces with SAS keys
//! disabled ("local authentication disabled"). The source puts them on `$cbs` as type
//! `jwt` and gets a new one before the last expires.
//!
//! Three credentials, as the Azure Identity libraries name them:
//! - [`Credential::ClientSecret`] and [`Credential::ClientCertificate`]: OAuth 2.0
//!   client credentials grant (RFC 6749 §4.4) at
//!   `{authority}/{tenant}/oauth2/v2.0/token`, scope `https://servicebus.azure.net/.default`;
//!   the certificate signs a client assertion (RFC 7523, header `x5t`/`x5t#S256`).
//! - [`Credential::ManagedIdentity`]: the Azure Arc agent's endpoint
//!   (`http://localhost:40342/metadata/identity/oauth2/token`): the first request is
//!   answered 401 with `WWW-Authenticate: Basic realm=<key file>`; the file's contents go
//!   back as `Authorization: Basic …`. An endpoint that answers at once (Azure IMDS) is
//!   taken as it is.
//!
//! Requests go over hyper's HTTP/1.1 client and the rustls/ring TLS the binary already
//! has, through the source's HTTP proxy for `https://` (the Arc endpoint is loopback).
//! Secrets (client secret, key, tokens, the Arc key) are never logged or put in errors.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::jwt::RsaSigner;
use crate::proxy::Route;

/// The scope of a Service Bus token (client credentials grant).
pub const SCOPE: &str = "https://servicebus.azure.net/.default";
/// The resource of a Service Bus token (managed identity).
pub const RESOURCE: &str = "https://servicebus.azure.net";
/// The Azure Arc agent's token endpoint (`IDENTITY_ENDPOINT` on Arc-enabled servers).
pub const ARC_ENDPOINT: &str = "http://localhost:40342/metadata/identity/oauth2/token";
/// Microsoft Entra ID's public cloud authority.
pub const AUTHORITY: &str = "https://login.microsoftonline.com";
/// Largest token endpoint response read, bytes.
const MAX_RESPONSE: usize = 64 * 1024;
/// Largest Arc key file read, bytes (the agent's are 64 hex characters).
const MAX_ARC_KEY: u64 = 4096;

/// Where a Service Bus token comes from.
#[derive(Clone)]
pub enum Credential {
    ClientSecret {
        /// `{authority}/{tenant}/oauth2/v2.0/token`.
        endpoint: Uri,
        client_id: String,
        secret: String,
    },
    ClientCertificate {
        endpoint: Uri,
        client_id: String,
        signer: Arc<RsaSigner>,
        /// base64url SHA-1 and SHA-256 of the certificate.
        x5t: String,
        x5t_s256: String,
    },
    ManagedIdentity {
        /// The agent's token endpoint (loopback `http://`).
        endpoint: Uri,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::ClientSecret {
                endpoint,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("endpoint", endpoint)
                .field("client_id", client_id)
                .field("secret", &"***")
                .finish(),
            Credential::ClientCertificate {
                endpoint,
                client_id,
                x5t_s256,
                ..
            } => f
                .debug_struct("ClientCertificate")
                .field("endpoint", endpoint)
                .field("client_id", client_id)
                .field("x5t#S256", x5t_s256)
                .finish_non_exhaustive(),
            Credential::ManagedIdentity { endpoint } => f
                .debug_struct("ManagedIdentity")
                .field("endpoint", endpoint)
                .finish(),
        }
    }
}

impl Credential {
    /// Is its endpoint `https://` (and so needs TLS roots)?
    pub fn uses_https(&self) -> bool {
        let endpoint = match self {
            Credential::ClientSecret { endpoint, .. }
            | Credential::ClientCertificate { endpoint, .. }
            | Credential::ManagedIdentity { endpoint } => endpoint,
        };
        endpoint.scheme_str() == Some("https")
    }
}

/// `{authority}/{tenant}/oauth2/v2.0/token`, or why not: the authority must be
/// `https://host[:port]` (`http://` only for a loopback host, for tests and local
/// stand-ins) and the tenant a plain name or GUID.
pub fn token_endpoint(authority: &str, tenant: &str) -> Result<Uri, String> {
    let base = authority.trim().trim_end_matches('/');
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err("tenant_id must be the directory's GUID or domain name".into());
    }
    let not_a_url = "authority_host must be a URL such as https://login.microsoftonline.com";
    let host: Uri = base.parse().map_err(|_| not_a_url)?;
    check_scheme(&host, "authority_host")?;
    // The tenant and the token path are appended: a path, query or fragment of its own
    // would send the request elsewhere (`https://h/common` + tenant, `https://h?x` + path).
    if !matches!(
        host.path_and_query().map(|p| p.as_str()),
        None | Some("" | "/")
    ) || base.contains('#')
    {
        return Err(
            "authority_host must be scheme and host only (https://login.microsoftonline.com): \
             the tenant and the token path are added to it"
                .into(),
        );
    }
    let uri: Uri = format!("{base}/{tenant}/oauth2/v2.0/token")
        .parse()
        .map_err(|_| not_a_url)?;
    Ok(uri)
}

/// A managed identity endpoint, checked like an authority. Errors never repeat the URL:
/// it may carry a credential.
pub fn identity_endpoint(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.trim().parse().map_err(|_| {
        format!(
            "is not a URL such as {ARC_ENDPOINT} (the value is not shown: it may hold a credential)"
        )
    })?;
    check_scheme(&uri, "endpoint")?;
    Ok(uri)
}

/// `https://` (or `http://` on a loopback or link-local host), a host, and no
/// `user:password@`: a token request authenticates with its own credential, and errors
/// and logs show the endpoint.
fn check_scheme(uri: &Uri, what: &str) -> Result<(), String> {
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{what} must not hold user:password@ (the value is not shown: it holds a credential)"
        ));
    }
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{what} has no host"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        Some("http") => Err(format!(
            "{what} may be http:// only on a loopback or link-local host (tokens would travel \
             in clear text)"
        )),
        _ => Err(format!("{what} must be an https:// URL")),
    }
}

/// Loopback, or IPv4 link-local (Azure IMDS's 169.254.169.254), also written as
/// IPv4-mapped IPv6 (`[::ffff:127.0.0.1]`): addresses a plain `http://` token request
/// never leaves the box or its host for.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_matches(['[', ']']);
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| match ip.to_canonical() {
                std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
                std::net::IpAddr::V6(v6) => v6.is_loopback(),
            })
}

/// An access token and when it expires (seconds since the Unix epoch).
#[derive(Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_on: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"***")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Why no token was obtained. Names the endpoint and, when the identity platform
/// refused, its error code and description — never a secret.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("token endpoint {endpoint}: cannot connect: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("token endpoint {endpoint}: {reason}")]
    Http { endpoint: String, reason: String },
    /// The endpoint answered with an error (Entra: `invalid_client`, `unauthorized_client`…).
    #[error("token endpoint {endpoint} refused: HTTP {status} {error}: {description}")]
    Refused {
        endpoint: String,
        status: u16,
        error: String,
        description: String,
    },
    #[error("managed identity endpoint {endpoint}: {reason}")]
    Challenge { endpoint: String, reason: String },
}

/// Gets tokens for one [`Credential`].
pub struct TokenClient {
    credential: Credential,
    proxy: Option<Route>,
    tls: Arc<ClientConfig>,
    step: Duration,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("credential", &self.credential)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

/// An HTTP response: status, `WWW-Authenticate`, body.
struct Response {
    status: u16,
    www_authenticate: Option<String>,
    body: Bytes,
}

impl TokenClient {
    /// `tls` verifies `https://` endpoints (the source's: platform roots plus
    /// `source.ca_file`); `proxy` tunnels them (unless its `NO_PROXY` names the
    /// endpoint's host); each request is bounded by `step`.
    pub fn new(
        credential: Credential,
        proxy: Option<Route>,
        tls: Arc<ClientConfig>,
        step: Duration,
    ) -> Self {
        TokenClient {
            credential,
            proxy,
            tls,
            step,
        }
    }

    /// A new token.
    ///
    /// Errors: [`IdentityError`]: the endpoint cannot be reached, refused the
    /// credential (Entra's error code and description), or answered nonsense.
    pub async fn token(&self) -> Result<AccessToken, IdentityError> {
        match &self.credential {
            Credential::ClientSecret {
                endpoint,
                client_id,
                secret,
            } => {
                let form = form(&[
                    ("client_id", client_id),
                    ("scope", SCOPE),
                    ("grant_type", "client_credentials"),
                    ("client_secret", secret),
                ]);
                let r = self.send(endpoint, "POST", None, Some(form)).await?;
                parse_token(endpoint, r)
            }
            Credential::ClientCertificate {
                endpoint,
                client_id,
                signer,
                x5t,
                x5t_s256,
            } => {
                let now = crate::sas::now_unix();
                let mut header = serde_json::Map::new();
                header.insert("x5t".into(), x5t.clone().into());
                header.insert("x5t#S256".into(), x5t_s256.clone().into());
                let claims = serde_json::json!({
                    "aud": endpoint.to_string(),
                    "iss": client_id,
                    "sub": client_id,
                    "jti": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                    "nbf": now,
                    "iat": now,
                    "exp": now + 600,
                });
                let assertion = signer.sign(header, &claims);
                let form = form(&[
                    ("client_id", client_id),
                    ("scope", SCOPE),
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                ]);
                let r = self.send(endpoint, "POST", None, Some(form)).await?;
                parse_token(endpoint, r)
            }
            Credential::ManagedIdentity { endpoint } => {
                let sep = if endpoint.query().is_some() { '&' } else { '?' };
                let uri: Uri = format!(
                    "{endpoint}{sep}api-version=2020-06-01&resource={}",
                    encode(RESOURCE)
                )
                .parse()
                .map_err(|_| IdentityError::Http {
                    endpoint: endpoint.to_string(),
                    reason: "the endpoint with its query is not a URL".into(),
                })?;
                let first = self.send(&uri, "GET", None, None).await?;
                let r = if first.status == 401 {
                    let key = arc_key(endpoint, first.www_authenticate.as_deref())?;
                    self.send(&uri, "GET", Some(&format!("Basic {key}")), None)
                        .await?
                } else {
                    first
                };
                parse_token(endpoint, r)
            }
        }
    }

    /// One HTTP/1.1 request (hyper) on a new connection: through the proxy and in TLS
    /// for `https://`.
    async fn send(
        &self,
        uri: &Uri,
        method: &str,
        authorization: Option<&str>,
        form: Option<String>,
    ) -> Result<Response, IdentityError> {
        let endpoint = strip_query(uri);
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .unwrap_or("")
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let connect_err = |reason: String| IdentityError::Connect {
            endpoint: endpoint.clone(),
            reason,
        };
        let proxy = self.proxy.as_ref().and_then(|r| r.for_host(&host));
        let tcp = match (proxy, https) {
            (Some(p), true) => p
                .connect(&host, port, self.step)
                .await
                .map_err(|e| connect_err(e.to_string()))?,
            _ => timeout(self.step, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| connect_err("timed out".into()))?
                .map_err(|e| connect_err(e.to_string()))?,
        };
        let _ = tcp.set_nodelay(true);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                hyper::header::HOST,
                uri.authority().map_or("", |a| a.as_str()),
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("asb-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::ACCEPT, "application/json");
        if matches!(self.credential, Credential::ManagedIdentity { .. }) {
            req = req.header("Metadata", "true");
        }
        if let Some(a) = authorization {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let body = match form {
            Some(f) => {
                req = req.header(
                    hyper::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                );
                Bytes::from(f)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| IdentityError::Http {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
        let exchange = async {
            if https {
                let name = ServerName::try_from(host.clone())
                    .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
                let tls = TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {host} failed: {e}"))?;
                exchange(tls, req).await
            } else {
                exchange(tcp, req).await
            }
        };
        timeout(self.step * 2, exchange)
            .await
            .map_err(|_| IdentityError::Http {
                endpoint: endpoint.clone(),
                reason: "no answer (timed out)".into(),
            })?
            .map_err(|reason| IdentityError::Http { endpoint, reason })
    }
}

/// Send `req` on `io` and read the response (at most [`MAX_RESPONSE`] bytes of body).
async fn exchange<S>(io: S, req: hyper::Request<Full<Bytes>>) -> Result<Response, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let www_authenticate = resp
            .headers()
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        Ok(Response {
            status,
            www_authenticate,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

/// The endpoint without its query (for errors and logs).
fn strip_query(uri: &Uri) -> String {
    let s = uri.to_string();
    s.split('?').next().unwrap_or(&s).to_string()
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The Arc agent's challenge: `Basic realm=<path of a key file>`; returns the file's
/// contents. The file must end in `.key` and hold at most 4 KiB (as the Azure Identity
/// libraries check).
fn arc_key(endpoint: &Uri, challenge: Option<&str>) -> Result<String, IdentityError> {
    let err = |reason: String| IdentityError::Challenge {
        endpoint: strip_query(endpoint),
        reason,
    };
    let challenge =
        challenge.ok_or_else(|| err("answered 401 without a WWW-Authenticate challenge".into()))?;
    let path = challenge
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, params)| params.trim().strip_prefix("realm="))
        .map(|p| p.trim().trim_matches('"'))
        .ok_or_else(|| {
            err(format!(
                "the challenge \"{}\" is not Basic realm=<key file>",
                crate::redact::peer_text(challenge)
            ))
        })?;
    let path = std::path::Path::new(path);
    if path.extension().and_then(|e| e.to_str()) != Some("key") || !path.is_absolute() {
        return Err(err(format!(
            "the challenge names {}, not an absolute path to a .key file",
            crate::redact::peer_text(&path.to_string_lossy())
        )));
    }
    // The path is the endpoint's text: shown as a peer's.
    let shown = crate::redact::peer_text(&path.to_string_lossy()).into_owned();
    // Capped as it is read: a size from the metadata says nothing of a device.
    let key = crate::file_limit::read_capped(path, MAX_ARC_KEY)
        .map_err(|e| err(format!("cannot read the key file {shown}: {e}")))?;
    let key = String::from_utf8(key)
        .map_err(|_| err(format!("the key file {shown} is not UTF-8 text")))?;
    Ok(key.trim().to_string())
}

/// A token from a 200 response (`access_token` with `expires_in` — Entra — or
/// `expires_on` — managed identity; numbers or strings), or the endpoint's error.
fn parse_token(endpoint: &Uri, r: Response) -> Result<AccessToken, IdentityError> {
    let endpoint = strip_query(endpoint);
    let json: Option<serde_json::Value> = serde_json::from_slice(&r.body).ok();
    let field = |k: &str| json.as_ref().and_then(|j| j.get(k));
    let text = |k: &str| field(k).and_then(|v| v.as_str()).map(str::to_string);
    let number = |k: &str| {
        field(k).and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    if r.status != 200 {
        // Entra's error and the first line of its description (no secret is ever in it).
        let description: String = text("error_description")
            .map(|d| d.lines().next().unwrap_or("").to_string())
            .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
        return Err(IdentityError::Refused {
            endpoint,
            status: r.status,
            error: text("error")
                .map(|e| crate::redact::peer_text(&e).into_owned())
                .unwrap_or_else(|| "error".into()),
            description: crate::redact::peer_text(&description).into_owned(),
        });
    }
    let token = text("access_token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| IdentityError::Http {
            endpoint: endpoint.clone(),
            reason: "answered 200 without an access_token".into(),
        })?;
    let now = crate::sas::now_unix();
    // `expires_in` (relative) first: `expires_on` is the server's clock, and this box's
    // may be off by more than a token's life.
    let lifetime = match (number("expires_in"), number("expires_on")) {
        (Some(life), _) => life,
        (None, Some(at)) if at > now => at - now,
        (None, Some(_)) => {
            log::warn!(
                "token endpoint {endpoint} issued a token that expired before now by this \
                 box's clock; its clock is probably wrong (check NTP). Using it for {} s",
                TOKEN_LIFETIME_SKEWED
            );
            TOKEN_LIFETIME_SKEWED
        }
        (None, None) => {
            return Err(IdentityError::Http {
                endpoint: endpoint.clone(),
                reason: "answered without expires_in or expires_on".into(),
            });
        }
    };
    Ok(AccessToken {
        token,
        expires_on: now.saturating_add(lifetime.clamp(1, TOKEN_LIFETIME_MAX)),
    })
}

/// The life assumed for a token whose `expires_on` is already past by this box's clock
/// (a clock running ahead of the token service's), in seconds: renewals then come every
/// 4 minutes, not as fast as the 1 s floor allows.
pub const TOKEN_LIFETIME_SKEWED: u64 = 300;
/// Longest token life believed (s): Entra ID tokens live 1–24 h; a larger figure is a
/// malformed answer, and would overflow the timers.
pub const TOKEN_LIFETIME_MAX: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_or_loopback_http() {
        assert_eq!(
            token_endpoint(AUTHORITY, "contoso.onmicrosoft.com")
                .unwrap()
                .to_string(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(token_endpoint("http://127.0.0.1:9000/", "t").is_ok());
        assert!(
            token_endpoint("http://login.example", "t")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(token_endpoint(AUTHORITY, "a/b").is_err());
        for authority in [
            "https://login.microsoftonline.com/common",
            "https://login.microsoftonline.com/?x=1",
            "https://login.microsoftonline.com?x=1",
            "https://login.microsoftonline.com/#f",
        ] {
            assert!(
                token_endpoint(authority, "t")
                    .unwrap_err()
                    .contains("scheme and host only"),
                "{authority}"
            );
        }
        assert!(token_endpoint("https://login.microsoftonline.us:443/", "t").is_ok());
        assert!(identity_endpoint(ARC_ENDPOINT).is_ok());
        let imds = "http://169.254.169.254/metadata/identity/oauth2/token";
        assert!(identity_endpoint(imds).is_ok(), "Azure IMDS is link-local");
        assert!(identity_endpoint("http://10.0.0.1/token").is_err());
        // The same addresses written as IPv4-mapped IPv6, and IPv6 loopback.
        for local in [
            "http://[::ffff:127.0.0.1]:40342/token",
            "http://[::ffff:169.254.169.254]/token",
            "http://[::1]:40342/token",
        ] {
            assert!(identity_endpoint(local).is_ok(), "{local}");
        }
        assert!(identity_endpoint("http://[::ffff:10.0.0.1]/token").is_err());
        assert!(identity_endpoint("ftp://localhost/x").is_err());
    }

    #[test]
    fn credentials_in_an_endpoint_are_refused_and_never_shown() {
        for (url, why) in [
            (
                "http://user:PW-SECRET@localhost:40342/token",
                "user:password@",
            ),
            ("https://user:PW-SECRET@idp example/", "not a URL"),
            ("https://PW-SECRET@login.example/", "user:password@"),
        ] {
            let e = identity_endpoint(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("PW-SECRET"), "{url}: {e}");
        }
        let e = token_endpoint("https://u:PW-SECRET@login.example", "t").unwrap_err();
        assert!(
            e.contains("user:password@") && !e.contains("PW-SECRET"),
            "{e}"
        );
    }

    #[test]
    fn token_responses_and_errors() {
        let uri: Uri = "https://login.example/t/oauth2/v2.0/token".parse().unwrap();
        let resp = |status: u16, body: &str| Response {
            status,
            www_authenticate: None,
            body: Bytes::from(body.to_string()),
        };
        let t = parse_token(
            &uri,
            resp(200, r#"{"access_token":"abc","expires_in":"3599"}"#),
        )
        .unwrap();
        assert_eq!(t.token, "abc");
        assert!(t.expires_on >= crate::sas::now_unix() + 3598);
        // An absolute expiry (managed identity) is read against this box's clock; one in
        // the past (a clock running ahead) is taken as 5 minutes, one absurdly far ahead
        // (a malformed answer) as 24 h; given both, the relative one wins.
        let now = crate::sas::now_unix();
        let cases = [
            (format!(r#""expires_on":"{}""#, now + 3600), 3600),
            (
                r#""expires_on":1700000000"#.to_string(),
                TOKEN_LIFETIME_SKEWED,
            ),
            (
                r#""expires_on":18000000000000000000"#.to_string(),
                TOKEN_LIFETIME_MAX,
            ),
            (
                r#""expires_in":"18446744073709551615""#.to_string(),
                TOKEN_LIFETIME_MAX,
            ),
            (r#""expires_in":0"#.to_string(), 1),
            (r#""expires_in":4"#.to_string(), 4),
            (
                format!(r#""expires_in":"3599","expires_on":"{}""#, now - 10),
                3599,
            ),
        ];
        for (field, life) in cases {
            let body = format!(r#"{{"access_token":"abc",{field}}}"#);
            let t = parse_token(&uri, resp(200, &body)).unwrap();
            let got = t.expires_on - crate::sas::now_unix();
            assert!(got.abs_diff(life) <= 2, "{field}: {got} s, want {life}");
        }
        let e = parse_token(
            &uri,
            resp(
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#,
            ),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "token endpoint https://login.example/t/oauth2/v2.0/token refused: HTTP 401 invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        assert!(format!("{t:?}").contains("***"));
    }

    #[test]
    fn the_arc_challenge_names_a_key_file() {
        let dir = std::env::temp_dir().join(format!("asbgw-arc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("abc.key");
        std::fs::write(&key, "0123abcd\n").unwrap();
        let uri: Uri = ARC_ENDPOINT.parse().unwrap();
        let got = arc_key(&uri, Some(&format!("Basic realm={}", key.display()))).unwrap();
        assert_eq!(got, "0123abcd");
        let txt = dir.join("abc.txt");
        std::fs::write(&txt, "x").unwrap();
        assert!(arc_key(&uri, Some(&format!("Basic realm={}", txt.display()))).is_err());
        assert!(arc_key(&uri, Some("Bearer realm=x")).is_err());
        assert!(arc_key(&uri, None).is_err());
        // The path is the endpoint's text: errors show it without control characters,
        // whether it fails the shape check or the read.
        for realm in ["/tmp/x\u{1b}[31m.txt", "/nonexistent/x\u{1b}[31m.key"] {
            let e = arc_key(&uri, Some(&format!("Basic realm={realm}")))
                .unwrap_err()
                .to_string();
            assert!(!e.contains('\u{1b}'), "{e:?}");
        }
        // Twice the cap is refused as it is read.
        let big = dir.join("big.key");
        std::fs::write(&big, vec![b'a'; 2 * MAX_ARC_KEY as usize]).unwrap();
        let e = arc_key(&uri, Some(&format!("Basic realm={}", big.display())));
        assert!(e.unwrap_err().to_string().contains("more than 4 KiB"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
