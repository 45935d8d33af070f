//! Debian's `tinyproxy` as the plant's HTTP proxy: started by the test on a free loopback
//! port (optionally with `BasicAuth`), allowing `CONNECT` to any port, with its log kept
//! so a test can see which tunnels it opened. Stopped (killed) on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

pub struct Tinyproxy {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Tinyproxy {
    /// Start tinyproxy; `auth`: `(user, password)` it requires (407 otherwise).
    pub fn start(auth: Option<(&str, &str)>) -> Tinyproxy {
        let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("tinyproxy not found: run scripts/setup/source.sh");
        let dir = TempDir::new("tinyproxy");
        let port = super::free_port();
        let log = dir.join("tinyproxy.log");
        // No ConnectPort line: CONNECT to every port is allowed (tinyproxy.conf(5)).
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\nAllow 127.0.0.1\n\
             LogFile \"{}\"\nLogLevel Info\nDisableViaHeader Yes\n",
            log.display()
        );
        if let Some((user, password)) = auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Tinyproxy {
            port,
            child,
            log,
            _dir: dir,
        }
    }

    /// `http://[user:password@]127.0.0.1:PORT`.
    pub fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// What tinyproxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `CONNECT` requests to `127.0.0.1:port` it has logged.
    pub fn connects_to(&self, port: u16) -> usize {
        let needle = format!("CONNECT 127.0.0.1:{port}");
        self.log().matches(&needle).count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
