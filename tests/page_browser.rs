//! The built-in page in a real browser: headless Chromium (Debian package, installed by
//! `scripts/setup/panels.sh`) loads `/` from an in-process panel server while events are
//! appended, and the rendered DOM must show the events and the state "live". The test
//! also saves a screenshot (see `docs/panels.md`). A second test drives the page through
//! a server restart: reconnect and resume without a gap. Both drive Chromium over the
//! DevTools protocol and wait for the page's state, never for a time budget.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use asb_gateway::panels::Options;
use support::panels::*;

/// The failure bound of every wait on the browser (Chromium starts slowly on a loaded
/// machine); each wait ends as soon as its condition holds.
const PAGE_WAIT: Duration = Duration::from_secs(30);

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "chromium is not installed: run `bash scripts/setup/panels.sh` (installs the Debian \
         `chromium` package) before running tests/page_browser.rs"
    );
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "asbgw-chromium-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The rows of the rendered event table: (seq, topic).
fn rows(dom: &str) -> Vec<(u64, String)> {
    dom.split("<tr class=\"fresh event\" ")
        .skip(1)
        .map(|row| {
            let attr = |name: &str| {
                let start = row.find(&format!("{name}=\"")).expect(name) + name.len() + 2;
                row[start..].split('"').next().unwrap().to_string()
            };
            (attr("data-seq").parse().unwrap(), attr("data-topic"))
        })
        .collect()
}

fn state(dom: &str) -> &str {
    let start = dom.find("id=\"state\"").expect("state element");
    let rest = &dom[start..];
    let text = &rest[rest.find('>').unwrap() + 1..];
    &text[..text.find('<').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_live_events_in_chromium() {
    let ctx = ctx("");
    let srv = start(ctx.clone(), Options::default()).await;
    // history before the page loads, then a steady trickle while it is open
    for i in 0..5 {
        append(
            &ctx,
            &format!("line{}/temp", i % 2 + 1),
            &format!("{{\"celsius\":{}}}", 20 + i),
        );
    }
    let feeder = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Bounded: 5 + 150 events stay within the page's 200 rows however slowly
            // Chromium starts on a loaded machine, so the oldest row is always seq 1.
            for i in 0..150 {
                let topic = ["line1/temp", "line2/pressure", "line1/door"][i % 3];
                append(&ctx, topic, &format!("{{\"value\":{i},\"unit\":\"bar\"}}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Each check waits for the page to reach the state it needs (DevTools protocol),
    // never for a time budget: Chromium may take seconds to start on a loaded machine.
    let url = format!("http://{}/", srv.addr);
    let mut cdp = Cdp::open(&url).await;
    until(
        &mut cdp,
        "live, history replayed and live events after it",
        |s| {
            let seqs = s["seqs"].as_array().map(Vec::as_slice).unwrap_or_default();
            s["state"] == "live"
                && seqs.last() == Some(&serde_json::json!(1))
                && seqs.first().and_then(|v| v.as_u64()).is_some_and(|n| n > 5)
        },
    )
    .await;
    let dom = cdp.dom().await;
    assert_eq!(state(&dom), "live", "{dom}");
    let got = rows(&dom);
    let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
    // newest first, no duplicates, the history replayed and live events after it
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&1), "history replayed: {seqs:?}");
    assert!(seqs[0] > 5, "live events arrived: {seqs:?}");
    assert!(dom.contains(r#"{"celsius":20}"#), "bodies rendered");
    assert!(dom.contains(r#"<b id="gaps">0</b>"#));

    // A screenshot for the README, of the page just checked: kept in the target dir, or
    // written to docs/panel.png with ASBGW_UPDATE_SCREENSHOT=1.
    let shot = if std::env::var_os("ASBGW_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/panel.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("panel-{}.png", std::process::id()))
    };
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let png = cdp.screenshot(1280, 640).await;
    std::fs::write(&shot, &png).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    drop(cdp);

    // The filter in the page's URL goes to the server: only line1 topics.
    let mut cdp = Cdp::open(&format!("{url}?filter=line1/%23")).await;
    until(&mut cdp, "live with more than 3 filtered rows", |s| {
        s["state"] == "live" && s["seqs"].as_array().is_some_and(|a| a.len() > 3)
    })
    .await;
    let dom = cdp.dom().await;
    assert_eq!(state(&dom), "live", "{dom}");
    let got = rows(&dom);
    assert!(got.len() > 3, "{got:?}");
    assert!(got.iter().all(|(_, t)| t.starts_with("line1/")), "{got:?}");
    assert!(dom.contains("filters line1/#"), "{dom}");
    drop(cdp);

    feeder.abort();
    srv.stop().await;
}

/// A minimal Chrome DevTools Protocol client over the browser's WebSocket.
struct Cdp {
    ws: Client,
    session: String,
    next_id: u64,
    _child: tokio::process::Child,
    profile: PathBuf,
}

impl Cdp {
    async fn open(url: &str) -> Cdp {
        use tokio::io::AsyncBufReadExt;
        let profile = tempdir();
        let mut child = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = tokio::time::timeout(PAGE_WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(i) = line.find("ws://") {
                    return line[i..].trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("DevTools endpoint");
        // keep draining stderr so chromium never blocks on it
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(browser_ws).await.unwrap();
        let mut cdp = Cdp {
            ws,
            session: String::new(),
            next_id: 0,
            _child: child,
            profile,
        };
        let target = cdp
            .call("Target.createTarget", serde_json::json!({ "url": url }))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                serde_json::json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        cdp.session = attached["sessionId"].as_str().unwrap().to_string();
        cdp
    }

    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(PAGE_WAIT, self.ws.next())
                .await
                .expect("CDP reply")
                .unwrap()
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "CDP {method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression returning JSON-serialisable data.
    async fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expr, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }
}

impl Cdp {
    /// The rendered DOM, as `--dump-dom` prints it.
    async fn dom(&mut self) -> String {
        let v = self.eval("document.documentElement.outerHTML").await;
        v.as_str().expect("outerHTML").to_string()
    }

    /// A PNG of the page at `width` x `height`.
    async fn screenshot(&mut self, width: u32, height: u32) -> Vec<u8> {
        use base64::Engine;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false
            }),
        )
        .await;
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png" }),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        let _ = self._child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

const PAGE_STATE: &str = "({state: document.getElementById('state').textContent, \
    gaps: +document.getElementById('gaps').textContent, \
    seqs: [...document.querySelectorAll('#rows tr')].map(r => +r.dataset.seq)})";

/// Poll the page until `cond` holds on its state; returns that state.
async fn until(
    cdp: &mut Cdp,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let s = cdp.eval(PAGE_STATE).await;
        if cond(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < PAGE_WAIT,
            "page never reached: {what}; last state {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_reconnects_and_resumes_without_losing_events() {
    let ctx = ctx("");
    for _ in 0..3 {
        append(&ctx, "line1/temp", "{\"v\":0}");
    }
    let srv = start(ctx.clone(), Options::default()).await;
    let addr = srv.addr;
    let mut cdp = Cdp::open(&format!("http://{addr}/")).await;
    let s = until(&mut cdp, "live with history", |s| {
        s["state"] == "live" && s["seqs"] == serde_json::json!([3, 2, 1])
    })
    .await;
    assert_eq!(s["gaps"], 0);

    // The server goes away; events keep arriving in the journal meanwhile.
    srv.stop().await;
    until(&mut cdp, "offline", |s| s["state"] != "live").await;
    for _ in 0..5 {
        append(&ctx, "line2/temp", "{\"v\":1}");
    }
    // The server comes back on the same port: the page reconnects with since=EPOCH:3
    // and gets 4..=8 without a gap, then live events.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("rebind the port");
    let (trigger, sd) = asb_gateway::shutdown::channel();
    let task = tokio::spawn(asb_gateway::panels::serve_with(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.panel_settings(),
        sd,
        Options::default(),
    ));
    until(&mut cdp, "live again", |s| s["state"] == "live").await;
    append(&ctx, "line1/temp", "{\"v\":2}");
    let s = until(&mut cdp, "all events", |s| {
        s["seqs"].as_array().unwrap().len() == 9
    })
    .await;
    assert_eq!(s["seqs"], serde_json::json!([9, 8, 7, 6, 5, 4, 3, 2, 1]));
    assert_eq!(s["gaps"], 0, "resumed, nothing missed");
    drop(cdp);
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
