//! A real mosquitto broker for tests: started on a free loopback port with a generated
//! config in a private temp dir, waited for until it accepts connections, stopped by pid
//! (and the dir removed) on drop. `stop` + `start_again` restart it on the same port.
//!
//! Needs `mosquitto` (Debian package; `scripts/setup/mirror.sh` installs it).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::free_port;

/// File name of the broker's Unix-domain socket in its directory.
const UNIX_SOCKET: &str = "mqtt.sock";

/// How a broker is configured.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// Require this user name and password (anonymous clients are refused).
    pub credentials: Option<(String, String)>,
    /// Keep sessions and queued messages across a graceful restart (persistence on).
    pub persistent: bool,
    /// Serve TLS on the port with a certificate for 127.0.0.1 signed by a fresh test CA
    /// ([`Mosquitto::ca_file`]); needs the `openssl` command.
    pub tls: bool,
    /// More lines for mosquitto.conf (e.g. `max_queued_messages 0` for benchmarks, or a
    /// second listener).
    pub extra: String,
    /// Run the broker pinned to this CPU (`taskset -c N`), for benchmarks.
    pub pin_cpu: Option<usize>,
    /// Also listen on a Unix-domain socket ([`Mosquitto::unix_url`]).
    pub unix_socket: bool,
}

pub struct Mosquitto {
    pub port: u16,
    tls: bool,
    pin_cpu: Option<usize>,
    dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    for p in ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).is_file() {
            return p.into();
        }
    }
    panic!("mosquitto not found: run scripts/setup/mirror.sh");
}

fn unique_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "asbgw-mosquitto-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub use super::tls::make_ca;

/// A CA (`ca.pem`) and a server certificate (`server.pem`, `server.key`) for
/// 127.0.0.1/localhost signed by it.
fn make_certs(dir: &Path) {
    make_ca(dir, "ca");
    super::tls::server_cert(dir, "ca", "server", 2);
}

fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "root".into())
}

impl Mosquitto {
    /// An anonymous broker without persistence.
    pub fn start() -> Mosquitto {
        Self::start_with(MosquittoOptions::default())
    }

    pub fn start_with(opts: MosquittoOptions) -> Mosquitto {
        let mut last_err = String::new();
        // A free port can be taken by someone else before mosquitto binds it: retry.
        for _ in 0..5 {
            let dir = unique_dir();
            let port = free_port();
            let conf = dir.join("mosquitto.conf");
            let mut text = format!(
                "listener {port} 127.0.0.1\n\
                 user {user}\n\
                 log_dest file {log}\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 connection_messages true\n",
                user = current_user(),
                log = dir.join("mosquitto.log").display()
            );
            if opts.persistent {
                text.push_str(&format!(
                    "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                    dir.display()
                ));
            } else {
                text.push_str("persistence false\n");
            }
            if opts.tls {
                make_certs(&dir);
                text.push_str(&format!(
                    "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
                    d = dir.display()
                ));
            }
            text.push_str(&opts.extra);
            text.push('\n');
            if opts.unix_socket {
                let socket = dir.join(UNIX_SOCKET);
                assert!(
                    socket.as_os_str().len() <= asb_gateway::config::UNIX_PATH_MAX,
                    "{} is too long for a Unix socket: use a shorter TMPDIR",
                    socket.display()
                );
                text.push_str(&format!("listener 0 {}\n", socket.display()));
            }
            match &opts.credentials {
                Some((user, pass)) => {
                    let pw = dir.join("passwd");
                    std::fs::write(&pw, "").unwrap();
                    let st = Command::new(binary().with_file_name("mosquitto_passwd"))
                        .arg("-b")
                        .arg(&pw)
                        .arg(user)
                        .arg(pass)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .or_else(|_| {
                            Command::new("mosquitto_passwd")
                                .arg("-b")
                                .arg(&pw)
                                .arg(user)
                                .arg(pass)
                                .status()
                        })
                        .expect("mosquitto_passwd");
                    assert!(st.success(), "mosquitto_passwd failed");
                    text.push_str(&format!(
                        "allow_anonymous false\npassword_file {}\n",
                        pw.display()
                    ));
                }
                None => text.push_str("allow_anonymous true\n"),
            }
            std::fs::write(&conf, text).unwrap();
            let mut m = Mosquitto {
                port,
                tls: opts.tls,
                pin_cpu: opts.pin_cpu,
                dir,
                conf,
                child: None,
            };
            match m.spawn() {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = match self.pin_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = cmd
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("mosquitto exited ({status}): {}", self.log()));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err("mosquitto did not accept connections within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `unix:///…/mqtt.sock`, the broker's Unix-domain socket (with `unix_socket`).
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.join(UNIX_SOCKET).display())
    }

    /// The test CA that signed the broker's certificate (with `tls`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A private directory that is removed with the broker.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stop the broker gracefully (SIGTERM: a persistent broker saves its state) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Start it again on the same port with the same config.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "mosquitto is still running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may be in TIME_WAIT for a moment.
                Err(e) if Instant::now() > deadline => panic!("mosquitto restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
