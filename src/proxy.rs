//! HTTP proxies (`source.proxy`, or `HTTPS_PROXY`/`https_proxy` with `NO_PROXY`): a
//! tunnel to the namespace through `CONNECT host:port` (RFC 9110 §9.3.6), with
//! `Proxy-Authorization: Basic` (RFC 7617) when the proxy URL has credentials. TLS and
//! the WebSocket run inside the tunnel, end to end, as the Azure SDKs do.
//!
//! The credentials are a secret: [`Proxy`]'s `Debug` and [`Proxy::display`] show
//! `http://host:port` only, and no error repeats them.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::authority::{split_host_port, valid_host};

/// Largest proxy response head read, bytes; a longer one is refused.
const MAX_HEAD: usize = 8 * 1024;

/// A parsed `http://[user:password@]host:port` proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `Basic <base64(user:password)>`, when the URL has credentials (a secret: shown
    /// by no `Debug`, log or error).
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.display())
            .field("credentials", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Why a proxy URL is not usable. Never repeats the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    #[error("must start with http:// (the proxy is spoken to in plain HTTP; CONNECT tunnels TLS)")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("has an invalid port")]
    Port,
    #[error("has an invalid host: a DNS name or an IP address (IPv6 in brackets)")]
    BadHost,
    #[error("may hold only http://[user:password@]host[:port][/]; no path, query or fragment")]
    Extra,
    #[error("has user info that is not user:password, or is not valid percent-encoded UTF-8")]
    UserInfo,
}

/// Why the tunnel could not be opened. Each names the proxy (without credentials).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {proxy}: cannot connect: {reason}")]
    Connect { proxy: String, reason: String },
    /// 407 Proxy Authentication Required (RFC 9110 §15.5.8), or 401, which some proxies
    /// (tinyproxy) answer instead.
    #[error(
        "proxy {proxy} answered {} {}: {}",
        status,
        if *.status == 407 { "Proxy Authentication Required" } else { "Unauthorized" },
        if *.sent { "the user name or password in the proxy URL is wrong" } else { "it needs a user name and password (http://user:password@host:port)" }
    )]
    AuthRequired {
        proxy: String,
        status: u16,
        sent: bool,
    },
    #[error("proxy {proxy} answered 403 Forbidden: it does not allow a tunnel to {target}")]
    Forbidden { proxy: String, target: String },
    #[error("proxy {proxy} refused the tunnel to {target}: HTTP {status}")]
    Status {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("proxy {proxy}: {reason}")]
    Protocol { proxy: String, reason: String },
}

impl Proxy {
    /// Parse `http://[user:password@]host[:port][/]` (port 80 when absent; the user and
    /// password may be percent-encoded).
    ///
    /// Errors: [`ProxyUrlError`], naming what is wrong, never the value.
    pub fn parse(url: &str) -> Result<Proxy, ProxyUrlError> {
        let url = url.trim();
        let rest = match url.get(..7) {
            Some(s) if s.eq_ignore_ascii_case("http://") => &url[7..],
            _ => return Err(ProxyUrlError::Scheme),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(ProxyUrlError::Extra);
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let authorization = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').ok_or(ProxyUrlError::UserInfo)?;
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| ProxyUrlError::UserInfo)
                };
                let (user, pass) = (decode(user)?, decode(pass)?);
                if user.is_empty() {
                    return Err(ProxyUrlError::UserInfo);
                }
                let b64 =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                Some(format!("Basic {b64}"))
            }
        };
        let (host, port) = split_host_port(hostport, 80).ok_or(if hostport.starts_with('[') {
            ProxyUrlError::BadHost
        } else {
            ProxyUrlError::Port
        })?;
        if host.is_empty() {
            return Err(ProxyUrlError::NoHost);
        }
        if !crate::authority::valid_host(&host) {
            return Err(ProxyUrlError::BadHost);
        }
        Ok(Proxy {
            host,
            port,
            authorization,
        })
    }

    /// `http://host:port`, without credentials: for logs and errors.
    pub fn display(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }

    /// Does the URL carry credentials?
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }

    /// Open a TCP connection to the proxy and a `CONNECT` tunnel through it to
    /// `host:port`; each of the two steps is bounded by `step`. The returned stream
    /// carries the tunnelled bytes (nothing of the proxy's answer is left in it).
    ///
    /// Errors: [`ProxyError`]: unreachable proxy, 407 (credentials missing or wrong),
    /// 403, another status, or an answer that is not HTTP.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        step: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let proxy = self.display();
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let connect_err = |reason: String| ProxyError::Connect {
            proxy: proxy.clone(),
            reason,
        };
        let mut tcp = timeout(step, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.authorization {
            head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        let protocol = |reason: String| ProxyError::Protocol {
            proxy: proxy.clone(),
            reason,
        };
        let status = timeout(step, async {
            tcp.write_all(head.as_bytes()).await?;
            read_status(&mut tcp).await
        })
        .await
        .map_err(|_| protocol("no answer to CONNECT (timed out)".into()))?
        .map_err(|e| protocol(e.to_string()))?;
        match status {
            200..=299 => Ok(tcp),
            401 | 407 => Err(ProxyError::AuthRequired {
                proxy,
                status,
                sent: self.authorization.is_some(),
            }),
            403 => Err(ProxyError::Forbidden { proxy, target }),
            status => Err(ProxyError::Status {
                proxy,
                target,
                status,
            }),
        }
    }
}

/// Read the proxy's response head, byte by byte so nothing of the tunnel is consumed,
/// and return its status code.
async fn read_status(tcp: &mut TcpStream) -> std::io::Result<u16> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut buf = Vec::with_capacity(256);
    loop {
        let b = tcp.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("closed the connection without an answer to CONNECT")
            } else {
                e
            }
        })?;
        buf.push(b);
        if buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n") {
            break;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("answered CONNECT with a head over 8 KiB"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf) {
        Ok(httparse::Status::Complete(_)) => resp
            .code
            .ok_or_else(|| bad("answered CONNECT without a status")),
        _ => Err(bad("answered CONNECT with something that is not HTTP/1.x")),
    }
}

/// The source's proxy and the hosts that bypass it: `NO_PROXY` applies to every host
/// the source reaches — the namespace and the Entra ID token endpoint alike — each
/// checked by name when it is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    proxy: Proxy,
    /// The `NO_PROXY` list (environment only; `source.proxy` proxies every host).
    no_proxy: Option<String>,
}

impl Route {
    pub fn new(proxy: Proxy, no_proxy: Option<String>) -> Self {
        Route { proxy, no_proxy }
    }

    /// The `NO_PROXY` entries that can never match a host ([`no_proxy_unusable`]).
    pub fn unusable_no_proxy(&self) -> Vec<&str> {
        self.no_proxy
            .as_deref()
            .map(no_proxy_unusable)
            .unwrap_or_default()
    }

    /// The proxy to reach `host` through, or None when `NO_PROXY` names it.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        let bypass = self
            .no_proxy
            .as_deref()
            .is_some_and(|np| no_proxy_matches(np, host));
        (!bypass).then_some(&self.proxy)
    }
}

/// One entry of a `NO_PROXY` list, as curl, Go and Python read it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxyEntry {
    /// `*`: every host.
    Any,
    /// An IP address (`10.0.0.7`, `::1`, `[::1]:443`): that address.
    Address(IpAddr),
    /// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`): every address in it.
    Network(IpAddr, u8),
    /// A host name, lower case, without `:port` or a leading `.` or `*.`: the name and
    /// its subdomains.
    Name(String),
}

impl NoProxyEntry {
    /// The entry, or None when it can never match a host (a URL, a path, a bad network).
    fn parse(entry: &str) -> Option<NoProxyEntry> {
        if entry == "*" {
            return Some(NoProxyEntry::Any);
        }
        if let Some((net, bits)) = entry.split_once('/') {
            let net: IpAddr = net.trim_matches(['[', ']']).parse().ok()?;
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| bits.bytes().all(|c| c.is_ascii_digit()) && *b <= max_bits(net))?;
            return Some(NoProxyEntry::Network(net, bits));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Some(NoProxyEntry::Address(ip));
        }
        let (host, _) = split_host_port(entry, 0)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(NoProxyEntry::Address(ip));
        }
        let name = host.trim_start_matches("*.").trim_start_matches('.');
        (!name.is_empty() && valid_host(name))
            .then(|| NoProxyEntry::Name(name.to_ascii_lowercase()))
    }

    /// Does it name `host` (a name, or an address without brackets)?
    fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        match self {
            NoProxyEntry::Any => true,
            NoProxyEntry::Address(a) => ip == Some(*a),
            NoProxyEntry::Network(net, bits) => ip.is_some_and(|ip| in_network(ip, *net, *bits)),
            NoProxyEntry::Name(name) => {
                host == name
                    || host
                        .strip_suffix(name.as_str())
                        .is_some_and(|prefix| prefix.ends_with('.'))
            }
        }
    }
}

fn max_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Is `ip` in `net/bits`? Addresses of the other family never are.
fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u32::from(a) as u128, u32::from(n) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    shift >= width || (ip >> shift) == (net >> shift)
}

fn no_proxy_entries(no_proxy: &str) -> impl Iterator<Item = &str> {
    no_proxy
        .split([',', ' ', '\t'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// Is `host` excluded from the proxy by a `NO_PROXY` list (comma- or space-separated:
/// `*`; host names matching themselves and their subdomains, a leading `.` or `*.`
/// allowed; IP addresses matched exactly and networks in CIDR notation (`10.0.0.0/8`);
/// an optional `:port` ignored; case-insensitive)? Entries that can never match are
/// skipped: [`no_proxy_unusable`] names them.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    no_proxy_entries(no_proxy)
        .filter_map(|e| NoProxyEntry::parse(&e.to_ascii_lowercase()))
        .any(|e| e.matches(&host, ip))
}

/// The entries of a `NO_PROXY` list that can never match a host (a URL such as
/// `http://x`, a path, a network with a bad prefix length): each is skipped, as other
/// programs skip it, and the operator should hear of it.
pub fn no_proxy_unusable(no_proxy: &str) -> Vec<&str> {
    no_proxy_entries(no_proxy)
        .filter(|e| NoProxyEntry::parse(&e.to_ascii_lowercase()).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_show_their_password() {
        let p = Proxy::parse("http://user:p%40ss@proxy.plant:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.plant", 3128));
        assert!(p.has_credentials());
        assert_eq!(p.display(), "http://proxy.plant:3128");
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("p@ss") && !dbg.contains("user:"), "{dbg}");
        assert_eq!(
            p.authorization.as_deref().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("user:p@ss")
            )
        );
        let p = Proxy::parse("HTTP://[fd00::1]").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.display().as_str()),
            ("fd00::1", 80, "http://[fd00::1]:80")
        );
        for (bad, err) in [
            ("https://proxy:3128", ProxyUrlError::Scheme),
            ("proxy:3128", ProxyUrlError::Scheme),
            ("http://:3128", ProxyUrlError::NoHost),
            ("http://proxy:0", ProxyUrlError::Port),
            ("http://proxy:99999", ProxyUrlError::Port),
            ("http://proxy:3128/path", ProxyUrlError::Extra),
            ("http://proxy:3128?x", ProxyUrlError::Extra),
            ("http://secretonly@proxy:3128", ProxyUrlError::UserInfo),
            ("http://:pw@proxy:3128", ProxyUrlError::UserInfo),
            ("http://pr%oxy:3128", ProxyUrlError::BadHost),
            ("http://pr oxy:3128", ProxyUrlError::BadHost),
            ("http://proxy:+3128", ProxyUrlError::Port),
            ("http://[proxy]:3128", ProxyUrlError::BadHost),
        ] {
            assert_eq!(Proxy::parse(bad), Err(err.clone()), "{bad}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    #[test]
    fn no_proxy_lists_match_hosts_and_their_subdomains() {
        let list = "localhost, .plant.local,*.corp.example,10.0.0.7:8080 servicebus.windows.net";
        for host in [
            "localhost",
            "gw.plant.local",
            "plant.local",
            "a.b.corp.example",
            "10.0.0.7",
            "ns.servicebus.windows.net",
            "NS.ServiceBus.Windows.Net",
        ] {
            assert!(no_proxy_matches(list, host), "{host}");
        }
        for host in ["example.com", "notplant.local", "10.0.0.70", "windows.net"] {
            assert!(!no_proxy_matches(list, host), "{host}");
        }
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "anything"));
    }

    #[test]
    fn no_proxy_networks_match_the_addresses_in_them() {
        let list = "10.0.0.0/8,192.168.4.0/23 fd00::/8,[2001:db8::1],0.0.0.0/0x,172.16.0.0/33";
        for host in [
            "10.1.2.3",
            "192.168.5.255",
            "fd12::1",
            "[fd00::2]",
            "2001:db8::1",
        ] {
            assert!(no_proxy_matches(list, host), "{host}");
        }
        for host in [
            "11.0.0.1",
            "192.168.6.0",
            "fe80::1",
            "2001:db8::2",
            "10.example",
            "172.16.0.1",
        ] {
            assert!(!no_proxy_matches(list, host), "{host}");
        }
        assert!(no_proxy_matches("0.0.0.0/0", "203.0.113.9"));
        assert!(
            !no_proxy_matches("0.0.0.0/0", "::1"),
            "IPv4 networks hold no IPv6 host"
        );
        assert!(no_proxy_matches("::/0", "::1"));
        assert!(no_proxy_matches("10.0.0.7/32", "10.0.0.7"));
        assert!(!no_proxy_matches("10.0.0.7/32", "10.0.0.6"));
    }

    #[test]
    fn no_proxy_entries_that_never_match_are_named() {
        assert_eq!(
            no_proxy_unusable(
                "localhost,http://proxy.corp:3128, .corp,10.0.0.0/40,a/b,,*,::1,10.0.0.0/8"
            ),
            ["http://proxy.corp:3128", "10.0.0.0/40", "a/b"]
        );
        assert!(no_proxy_unusable("").is_empty());
        // They are skipped, and the rest of the list still applies.
        assert!(no_proxy_matches("http://x, .corp", "a.corp"));
    }

    #[tokio::test]
    async fn connect_reads_the_status_and_leaves_the_tunnel_untouched() {
        // A minimal proxy: answers each CONNECT with the scripted status, then "hello".
        async fn serve(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let task = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(s.read_u8().await.unwrap());
                }
                s.write_all(format!("HTTP/1.1 {status}\r\nVia: test\r\n\r\nhello").as_bytes())
                    .await
                    .unwrap();
                String::from_utf8(head).unwrap()
            });
            (port, task)
        }
        let step = Duration::from_secs(5);
        let (port, task) = serve("200 Connection established").await;
        let p = Proxy::parse(&format!("http://u:pw@127.0.0.1:{port}")).unwrap();
        let mut tcp = p.connect("ns.example", 443, step).await.unwrap();
        let mut rest = String::new();
        tcp.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello");
        let head = task.await.unwrap();
        assert!(
            head.starts_with("CONNECT ns.example:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic dTpwdw==\r\n"),
            "{head}"
        );

        let (port, _t) = serve("407 Proxy Authentication Required").await;
        let p = Proxy::parse(&format!("http://u:pw@127.0.0.1:{port}")).unwrap();
        let e = p.connect("ns.example", 443, step).await.unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, ProxyError::AuthRequired { sent: true, .. }),
            "{text}"
        );
        assert!(
            text.contains(&format!("http://127.0.0.1:{port}")) && !text.contains("pw"),
            "{text}"
        );

        let (port, _t) = serve("403 Forbidden").await;
        let p = Proxy::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = p.connect("ns.example", 5671, step).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("does not allow a tunnel to ns.example:5671"),
            "{e}"
        );
    }
}
