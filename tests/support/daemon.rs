//! The gateway as users run it: `asb-gateway run --config FILE` as a child process. The
//! fixture waits for the `panels on ADDR` line and parses the address, keeps every line
//! the daemon writes (stderr and stdout) in memory, prints that log when the test fails,
//! and kills the process on drop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TempDir;

/// The daemon's output lines, oldest first; shared by the starts of one test when it
/// restarts the daemon (see [`Builder::log`]).
pub type Log = Arc<Mutex<VecDeque<String>>>;

type OnLine = Arc<dyn Fn(&str) + Send + Sync>;

/// How to start the daemon.
pub struct Builder {
    program: String,
    prefix: Vec<String>,
    config: PathBuf,
    dir: Option<TempDir>,
    envs: Vec<(String, Option<String>)>,
    log: Log,
    max_lines: usize,
    wait_panels: bool,
    timeout: Duration,
    on_line: Option<OnLine>,
}

/// A running daemon; killed (SIGKILL) on drop.
pub struct Daemon {
    child: Child,
    panels: Option<SocketAddr>,
    log: Log,
    readers: Vec<JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl Daemon {
    /// Write `config` to a private temp dir and start the daemon with `RUST_LOG=info`;
    /// returns once it logged `panels on ADDR`.
    pub fn start(config: &str) -> Daemon {
        Daemon::with_config(config).start()
    }

    /// A daemon with `config` written to a private temp dir (removed with the daemon).
    pub fn with_config(config: &str) -> Builder {
        let dir = TempDir::new("daemon");
        let path = dir.join("config.toml");
        std::fs::write(&path, config).unwrap();
        let mut b = Daemon::with_config_file(&path);
        b.dir = Some(dir);
        b
    }

    /// A daemon with the config file at `path`.
    pub fn with_config_file(path: &Path) -> Builder {
        Builder {
            program: super::EXE.to_string(),
            prefix: Vec::new(),
            config: path.to_path_buf(),
            dir: None,
            envs: vec![
                ("RUST_LOG".into(), Some("info".into())),
                ("NOTIFY_SOCKET".into(), None),
                ("JOURNAL_STREAM".into(), None),
                // Tests reach the emulator on loopback; a proxy of the machine running
                // them must not be used (tests that want one set it).
                ("HTTPS_PROXY".into(), None),
                ("https_proxy".into(), None),
                ("NO_PROXY".into(), None),
                ("no_proxy".into(), None),
            ],
            log: Log::default(),
            max_lines: 200_000,
            wait_panels: true,
            timeout: Duration::from_secs(20),
            on_line: None,
        }
    }

    /// The panel server's address (from the `panels on` line).
    pub fn panels(&self) -> SocketAddr {
        self.panels
            .expect("started without waiting for `panels on` (Builder::no_wait)")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line kept so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().cloned().collect()
    }

    /// The log as one text, for failure messages.
    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// SIGTERM, then the exit code and how long the process took to exit (panics after
    /// 10 s). The output the daemon wrote until its exit is in the log on return.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = t0.elapsed();
                self.join_readers();
                return (status.code(), took);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                self.kill();
                panic!("daemon ignored SIGTERM for 10 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, up to `grace` for the exit, then SIGKILL: the exit code of a graceful
    /// exit. Never panics (for `Drop` of a bench's server).
    pub fn stop(&mut self, grace: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait (bounded) until the output pipes are closed: every line is in the log.
    fn join_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        self.join_readers();
        // Every daemon's log is kept for the whole run's secret grep
        // (scripts/ci/secrets-in-logs.sh, run by scripts/test.sh).
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-logs");
        if std::fs::create_dir_all(&dir).is_ok() {
            let text: Vec<String> = self.log.lock().unwrap().iter().cloned().collect();
            let text = text.join("\n");
            let _ = std::fs::write(dir.join(format!("{}.log", self.child.id())), text);
        }
        if std::thread::panicking() {
            let log = self.log.lock().unwrap();
            eprintln!(
                "---- asb-gateway log (pid {}, {} lines kept) ----",
                self.child.id(),
                log.len()
            );
            for l in log.iter() {
                eprintln!("{l}");
            }
        }
    }
}

impl Builder {
    /// `RUST_LOG` for the daemon (default `info`).
    pub fn rust_log(self, filter: &str) -> Builder {
        self.env("RUST_LOG", filter)
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Builder {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), Some(value)));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Builder {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), None));
        self
    }

    /// Run another build of the gateway (a bench comparing releases).
    pub fn program(mut self, program: &str) -> Builder {
        self.program = program.into();
        self
    }

    /// Run the daemon under a command, e.g. `["taskset", "-c", "0"]`.
    pub fn prefix(mut self, prefix: &[&str]) -> Builder {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Keep the lines in `log` (shared across restarts), at most `max_lines` (oldest
    /// dropped first).
    pub fn log(mut self, log: &Log, max_lines: usize) -> Builder {
        self.log = log.clone();
        self.max_lines = max_lines;
        self
    }

    /// Return at once instead of waiting for `panels on` (a config without panels, or a
    /// test that watches the start itself).
    pub fn no_wait(mut self) -> Builder {
        self.wait_panels = false;
        self
    }

    /// Call `f` with each output line as it arrives (on the reader thread).
    pub fn on_line(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Builder {
        self.on_line = Some(Arc::new(f));
        self
    }

    pub fn start(self) -> Daemon {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program));
        let (tx, rx) = mpsc::channel::<String>();
        let readers = vec![
            self.reader(child.stderr.take().unwrap(), tx.clone()),
            self.reader(child.stdout.take().unwrap(), tx),
        ];
        let mut daemon = Daemon {
            child,
            panels: None,
            log: self.log.clone(),
            readers,
            _dir: self.dir,
        };
        if !self.wait_panels {
            return daemon;
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => l,
                Err(_) => {
                    daemon.kill();
                    daemon.join_readers();
                    panic!(
                        "daemon did not log `panels on` within {:?}; log:\n{}",
                        self.timeout,
                        daemon.log_text()
                    );
                }
            };
            if let Some(rest) = line.split("panels on ").nth(1) {
                let addr = rest.split(',').next().unwrap().trim();
                daemon.panels = Some(
                    addr.parse()
                        .unwrap_or_else(|e| panic!("panel address {addr:?}: {e}")),
                );
                return daemon;
            }
        }
    }

    /// A thread that keeps the lines of `pipe` (and hands them to `tx` while the start
    /// waits for them).
    fn reader(&self, pipe: impl Read + Send + 'static, tx: mpsc::Sender<String>) -> JoinHandle<()> {
        let log = self.log.clone();
        let max = self.max_lines;
        let on_line = self.on_line.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(f) = &on_line {
                    f(&line);
                }
                {
                    let mut l = log.lock().unwrap();
                    if l.len() >= max {
                        l.pop_front();
                    }
                    l.push_back(line.clone());
                }
                let _ = tx.send(line);
            }
        })
    }
}
