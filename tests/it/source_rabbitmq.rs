//! Interop: the source receiving from a third-party AMQP 1.0 broker, RabbitMQ 3.10 with
//! the `rabbitmq_amqp1_0` plugin (installed by `scripts/setup/source.sh`), over SASL PLAIN.
//! The test starts its own node (own epmd, free loopback ports, temp dirs) and stops it
//! by pid. Only accept and release are used: RabbitMQ ends the session on modified/drain.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::source::*;
use fe2o3_amqp::types::messaging::{Message, Properties};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body};
use fe2o3_amqp_types::primitives::SimpleValue;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// The body of the marker message that ends [`Node::drain`].
const END: &str = "end-of-queue";

/// A RabbitMQ node of this test, stopped (SIGTERM, then SIGKILL) on drop.
struct Node {
    dir: PathBuf,
    port: u16,
    server: Child,
    epmd: Child,
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Drop for Node {
    fn drop(&mut self) {
        let beam = std::fs::read_to_string(self.dir.join("rabbit.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        signal(self.server.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && beam.is_some_and(alive) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(b) = beam.filter(|b| alive(*b)) {
            signal(b, "-KILL");
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn start() -> Node {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "RabbitMQ is not installed: run scripts/setup/source.sh"
        );
        let dir = std::env::temp_dir().join(format!(
            "asbgw-rmq-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, dist, epmd_port) = (free_port(), free_port(), free_port());
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_amqp1_0].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\nlog.console = true\nlog.console.level = warning\n"
            ),
        )
        .unwrap();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (erlang-base) is installed");
        let name = format!(
            "asbgw{}x{:06x}@localhost",
            std::process::id(),
            fastrand::u32(..0xffffff)
        );
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let server = Command::new(SERVER)
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rabbitmq-server");
        Node {
            dir,
            port,
            server,
            epmd,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    async fn connect(&self) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>, String> {
        Connection::builder()
            .container_id(format!("test-{}", fastrand::u32(..)))
            .hostname("localhost")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
                username: "guest".into(),
                password: "guest".into(),
            })
            .open(format!("amqp://127.0.0.1:{}", self.port).as_str())
            .await
            .map_err(|e| e.to_string())
    }

    /// Wait until the node accepts AMQP 1.0 connections.
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(5), self.connect()).await
            {
                let _ = c.close().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ did not start within 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Publish `bodies` in order, each accepted before the next is sent. RabbitMQ has
    /// been seen to close a fresh connection (`close` without an error) part way
    /// through, and fe2o3's `send` then waits for ever: each send is bounded, and
    /// after a failure the rest goes out on a new connection (at most 5 of them), with
    /// the broker's log printed to say why.
    async fn publish(&self, address: &str, bodies: impl IntoIterator<Item = String>) {
        let bodies: Vec<String> = bodies.into_iter().collect();
        let mut next = 0;
        for attempt in 1.. {
            match self.publish_from(address, &bodies, &mut next).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(
                        attempt < 5,
                        "publishing to RabbitMQ failed 5 times, last: {e}\n{}",
                        self.log()
                    );
                    eprintln!(
                        "publish to RabbitMQ failed at message {next} of {}: {e}; again on a \
                         new connection. Broker log:\n{}",
                        bodies.len(),
                        self.log()
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Send `bodies[*next..]` on one connection, moving `next` past each accepted one.
    async fn publish_from(
        &self,
        address: &str,
        bodies: &[String],
        next: &mut usize,
    ) -> Result<(), String> {
        let step = Duration::from_secs(10);
        let within = |what: &'static str| move |_| format!("{what}: nothing within 10 s");
        let mut c = tokio::time::timeout(step, self.connect())
            .await
            .map_err(within("connect"))??;
        let mut s = tokio::time::timeout(step, Session::begin(&mut c))
            .await
            .map_err(within("begin"))?
            .map_err(|e| e.to_string())?;
        let mut tx = tokio::time::timeout(step, Sender::attach(&mut s, "publisher", address))
            .await
            .map_err(within("attach"))?
            .map_err(|e| e.to_string())?;
        while let Some(b) = bodies.get(*next) {
            let msg = Message::builder()
                .properties(
                    Properties::builder()
                        .message_id(format!("m-{b}"))
                        .subject("rmq".to_string())
                        .content_type("text/plain")
                        .build(),
                )
                .application_properties(
                    ApplicationProperties::builder()
                        .insert("n", SimpleValue::Long(*next as i64))
                        .build(),
                )
                .value(b.clone())
                .build();
            let outcome = tokio::time::timeout(step, tx.send(msg))
                .await
                .map_err(within("send"))?
                .map_err(|e| e.to_string())?;
            assert!(outcome.is_accepted(), "{outcome:?}");
            *next += 1;
        }
        // RabbitMQ 3.10 answers a closing detach in a way fe2o3 reports as an
        // illegal state; the messages are accepted already, so ignore it.
        let _ = tx.close().await;
        let _ = s.end().await;
        let _ = c.close().await;
        Ok(())
    }

    /// Drain what is left in the queue with a plain receiver (accepting it), up to the
    /// marker `END` published after it: the marker, not a quiet time, says nothing
    /// more is left.
    async fn drain(&self, address: &str) -> Vec<String> {
        self.publish(address, [END.to_string()]).await;
        let mut c = self.connect().await.unwrap();
        let mut s = Session::begin(&mut c).await.unwrap();
        let mut rx = Receiver::attach(&mut s, "drainer", address).await.unwrap();
        let mut out = Vec::new();
        loop {
            let d = rx.recv::<Body<Value>>().await.unwrap();
            rx.accept(&d).await.unwrap();
            if let Body::Value(v) = d.body()
                && let Value::String(s) = &v.0
            {
                if s == END {
                    break;
                }
                out.push(s.clone());
            }
        }
        let _ = rx.close().await;
        let _ = s.end().await;
        let _ = c.close().await;
        out
    }
}

/// The failure bound of every wait on RabbitMQ: generous, as an Erlang node on a loaded
/// machine is slow; each wait ends as soon as its condition holds.
const RMQ_WAIT: Duration = Duration::from_secs(60);

/// Fail instead of hanging.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(RMQ_WAIT, f)
        .await
        .expect("broker operation within 60 s")
}

fn config(port: u16, queue: &str, extra: &str) -> String {
    format!(
        r#"
[source]
connection_string = "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=guest;SharedAccessKey=guest;UseDevelopmentEmulator=true"
auth = "plain"
[[source.subscriptions]]
topic = "rabbit"
subscription = "{queue}"
address = "/queue/{queue}"
[routing]
topic = "{{topic}}/{{subject}}"
{extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_from_rabbitmq_with_sasl_plain_accept_and_release() {
    capture_all_logs();
    let node = Node::start();
    node.ready().await;
    let queue = "asbgw-interop";
    let address = format!("/queue/{queue}");

    // 1. Plain flow: everything arrives in order and is accepted (completed) once.
    bounded(node.publish(&address, (0..20).map(|i| format!("msg-{i}")))).await;
    let run = start(context(&config(node.port, queue, "")), fast());
    let ctx = run.ctx.clone();
    wait_for(RMQ_WAIT, "20 events from RabbitMQ", || {
        ctx.journal.latest() >= 20
    })
    .await;
    let want: Vec<String> = (0..20).map(|i| format!("msg-{i}")).collect();
    assert_eq!(bodies(&ctx), want);
    let evs = events(&ctx);
    let first = evs[0].frame().unwrap();
    assert_eq!(first.topic, "rabbit/rmq");
    assert_eq!(first.message_id, Some("m-msg-0"));
    assert_eq!(first.props, vec![("n", "0")]);
    wait_for(RMQ_WAIT, "20 completed", || {
        ctx.metrics.completed.get() == 20
    })
    .await;
    assert_eq!(ctx.metrics.source_state.get().as_str(), "up");
    run.stop().await.unwrap();

    // 2. A required mirror that never acknowledges: only `unsettled` (3) are taken;
    //    on shutdown they are released back to RabbitMQ.
    bounded(node.publish(&address, (20..25).map(|i| format!("msg-{i}")))).await;
    let extra = "[journal]\nunsettled = 3\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nrequired = true\n";
    let run = start(context(&config(node.port, queue, extra)), fast());
    let ctx = run.ctx.clone();
    // Credit spent is the fence: with none left, RabbitMQ can send nothing more.
    wait_for(RMQ_WAIT, "3 pinned events and no credit left", || {
        ctx.journal.latest() >= 3 && ctx.metrics.credit.get() == 0
    })
    .await;
    assert_eq!(
        ctx.journal.latest(),
        3,
        "credit limits delivery to the window"
    );
    assert_eq!(ctx.metrics.completed.get(), 0);
    assert_eq!(ctx.metrics.credit.get(), 0);
    let t0 = Instant::now();
    run.stop().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(4));
    assert_eq!(ctx.metrics.released.get(), 3);

    // 3. What is left: the 3 released and the 2 never delivered; none of the 20
    //    completed in step 1 comes back.
    let mut left = bounded(node.drain(&address)).await;
    left.sort();
    let want: Vec<String> = (20..25).map(|i| format!("msg-{i}")).collect();
    assert_eq!(left, want, "broker log:\n{}", node.log());
}
