//! The built-in page in a real browser: headless Chromium (Debian package, installed by
//! `scripts/setup/panels.sh`), driven over the DevTools protocol; every wait is on the
//! page's state (DOM), never on a time budget.
//!
//! - The log view against an in-process panel server while events are appended: the
//!   rendered DOM shows the events and the state "live" (screenshot `docs/panel.png`);
//!   through a server restart it reconnects and resumes without a gap.
//! - The board view against a running `asb-gateway demo` (the built binary): one tile per
//!   topic the generator publishes, values changing, sparklines, alarms in the banner
//!   until acknowledged (screenshot `docs/board.png`); readable on a phone.
//! - Each event applied once (last value, replay, `{"op":"last"}` again), acknowledgements
//!   surviving a reload, and the page working under a reverse-proxy path prefix.

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
    // The log view (`#log`), as before the board existed.
    let url = format!("http://{}/", srv.addr);
    let mut cdp = Cdp::open(&format!("{url}#log")).await;
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
    let mut cdp = Cdp::open(&format!("{url}?filter=line1/%23#log")).await;
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
    /// `Network.*` events received so far (with [`Cdp::open_with`]'s `network`).
    events: Vec<serde_json::Value>,
    _child: tokio::process::Child,
    profile: PathBuf,
}

impl Cdp {
    async fn open(url: &str) -> Cdp {
        Cdp::open_with(url, &[], false).await
    }

    /// [`Cdp::open`] with more Chromium flags; with `network`, every request of the page
    /// from its first one on is recorded in `events` (`Network.enable` before navigating).
    async fn open_with(url: &str, flags: &[String], network: bool) -> Cdp {
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
            .args(flags)
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
            events: Vec::new(),
            _child: child,
            profile,
        };
        let first = if network { "about:blank" } else { url };
        let target = cdp
            .call("Target.createTarget", serde_json::json!({ "url": first }))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                serde_json::json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        cdp.session = attached["sessionId"].as_str().unwrap().to_string();
        if network {
            cdp.call("Network.enable", serde_json::json!({})).await;
            cdp.call("Page.navigate", serde_json::json!({ "url": url }))
                .await;
        }
        cdp
    }

    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let v = self.call_raw(method, params).await;
        assert!(v.get("error").is_none(), "CDP {method}: {v}");
        v["result"].clone()
    }

    /// The whole reply to a call: `result` or `error`.
    async fn call_raw(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
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
                return v;
            }
            if v["method"]
                .as_str()
                .is_some_and(|m| m.starts_with("Network."))
            {
                self.events.push(v);
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

    /// As [`Cdp::eval`], but `null` when the page cannot evaluate it (navigating, or the
    /// expression threw).
    async fn try_eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self
            .call_raw(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expr, "returnByValue": true }),
            )
            .await;
        r["result"]["result"]["value"].clone()
    }
}

impl Cdp {
    /// The rendered DOM, as `--dump-dom` prints it.
    async fn dom(&mut self) -> String {
        let v = self.eval("document.documentElement.outerHTML").await;
        v.as_str().expect("outerHTML").to_string()
    }

    /// Emulate a screen of `width` x `height` CSS pixels (a phone with `mobile`).
    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile
            }),
        )
        .await;
    }

    /// A PNG of the page at `width` x `height`.
    async fn screenshot(&mut self, width: u32, height: u32) -> Vec<u8> {
        use base64::Engine;
        self.viewport(width, height, false).await;
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
    until_js(cdp, what, PAGE_STATE, cond).await
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
    // An open gateway never asks for a token, not even after failed connections.
    assert_eq!(cdp.eval(AUTH_STATE).await["asked"], 0);
    drop(cdp);
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The page's state with the fleet fields: which gateway it is on, the epoch notice.
const FLEET_STATE: &str = "({state: document.getElementById('state').textContent, \
    gaps: +document.getElementById('gaps').textContent, \
    gateway: document.body.dataset.gateway, epochs: +(document.body.dataset.epochs || 0), \
    notice: document.getElementById('notice').textContent, \
    seqs: [...document.querySelectorAll('#rows tr')].map(r => +r.dataset.seq), \
    bodies: [...document.querySelectorAll('#rows tr td.body')].map(td => td.textContent)})";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_fails_over_to_a_peer_gateway_and_shows_its_epoch() {
    // Box B: another journal (another epoch) with its own history.
    let ctx_b = asb_gateway::app::Context::with_epoch(config(""), "fedcba987654".into());
    for i in 0..3 {
        append(&ctx_b, "line2/temp", &format!("{{\"b\":{i}}}"));
    }
    let srv_b = start(ctx_b.clone(), Options::default()).await;
    // Box A names B in panels.peer_gateways: its page's CSP allows B, the page lists it.
    let ctx_a = ctx(&format!(
        "[panels]\npeer_gateways = [\"http://{}/\"]\n",
        srv_b.addr
    ));
    for i in 0..4 {
        append(&ctx_a, "line1/temp", &format!("{{\"a\":{i}}}"));
    }
    let srv_a = start(ctx_a.clone(), Options::default()).await;
    let mut cdp = Cdp::open(&format!("http://{}/", srv_a.addr)).await;
    let s = until_js(&mut cdp, "live on A", FLEET_STATE, |s| {
        s["state"] == "live" && s["seqs"] == serde_json::json!([4, 3, 2, 1])
    })
    .await;
    assert_eq!(s["gateway"], "0", "{s}");
    assert_eq!(
        (s["gaps"].as_u64(), s["epochs"].as_u64()),
        (Some(0), Some(0))
    );

    // A goes away: the page moves to B (resuming with A's since), B's epoch differs, so
    // B says gap "epoch" and replays its own history, which replaces A's on the page.
    srv_a.stop().await;
    let s = until_js(&mut cdp, "live on B with B's history", FLEET_STATE, |s| {
        s["state"] == "live" && s["gateway"] == "1" && s["seqs"] == serde_json::json!([3, 2, 1])
    })
    .await;
    assert_eq!(s["epochs"], 1, "{s}");
    assert!(s["gaps"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["bodies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b.as_str().unwrap().contains("\"b\"")),
        "{s}"
    );
    let notice = s["notice"].as_str().unwrap();
    assert!(
        notice.contains("fedcba987654") && notice.contains(&srv_b.addr.to_string()),
        "{s}"
    );
    // and stays live on B
    append(&ctx_b, "line2/temp", "{\"b\":3}");
    until_js(&mut cdp, "B's next event", FLEET_STATE, |s| {
        s["seqs"] == serde_json::json!([4, 3, 2, 1]) && s["gateway"] == "1"
    })
    .await;
    drop(cdp);
    srv_b.stop().await;
}

// ---- the board ----

/// The board as the page renders it: tiles (topic, latest seq, value text, classes,
/// sparkline points), groups, the alarm banner, connection state.
const BOARD_STATE: &str = "(() => {
  const tiles = [...document.querySelectorAll('#groups .tile')].map(t => ({
    topic: t.dataset.topic, seq: +t.dataset.seq,
    group: t.closest('.group').querySelector('h2').textContent,
    value: t.querySelector('.value').textContent, cls: t.className,
    ago: t.querySelector('.ago').textContent,
    points: +t.querySelector('svg').dataset.points,
    drawn: (t.querySelector('polyline').getAttribute('points') || '').split(' ').filter(Boolean).length }));
  return { state: document.getElementById('state').textContent,
    syncs: +(document.body.dataset.syncs || 0), tiles,
    groups: [...document.querySelectorAll('#groups h2')].map(h => h.textContent),
    alarms: [...document.querySelectorAll('#alarm-list li')].map(li => ({
      topic: li.dataset.topic, seq: +li.dataset.seq, text: li.textContent })),
    banner: !document.getElementById('alarms').hidden,
    rows: [...document.querySelectorAll('#rows tr')].map(r => +r.dataset.seq) };
})()";

/// Poll `expr` until `cond` holds on its value; returns that value.
async fn until_js(
    cdp: &mut Cdp,
    what: &str,
    expr: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    until_js_within(cdp, PAGE_WAIT, what, expr, cond).await
}

/// [`until_js`] with its own failure bound.
async fn until_js_within(
    cdp: &mut Cdp,
    bound: Duration,
    what: &str,
    expr: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        // null while the page (re)loads
        let s = cdp.try_eval(expr).await;
        if cond(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < bound,
            "page never reached: {what}; last state {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tile<'a>(s: &'a serde_json::Value, topic: &str) -> Option<&'a serde_json::Value> {
    s["tiles"].as_array()?.iter().find(|t| t["topic"] == topic)
}

fn tile_topics(s: &serde_json::Value) -> Vec<String> {
    s["tiles"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| t["topic"].as_str().unwrap().to_string())
        .collect()
}

/// `asb-gateway demo` (the built binary) on a free loopback port, killed on drop.
struct Demo {
    url: String,
    _child: tokio::process::Child,
}

impl Demo {
    async fn start(rate: u32) -> Demo {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_asb-gateway"))
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--rate",
                &rate.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the demo starts");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // It prints "  panel page:  http://127.0.0.1:PORT/" once the port is bound.
        let url = tokio::time::timeout(PAGE_WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.trim().strip_prefix("panel page:") {
                    return rest.trim().to_string();
                }
            }
            panic!("the demo exited without printing its page address");
        })
        .await
        .expect("the demo's page address");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Demo { url, _child: child }
    }
}

/// The topics the demo's generator publishes (`src/generator.rs`).
fn demo_topics() -> Vec<String> {
    let mut v = Vec::new();
    for line in ["line1", "line2", "line3"] {
        for station in ["press", "weld", "paint", "pack"] {
            for subject in ["temp", "state", "alarm"] {
                v.push(format!("{line}/{station}/{subject}"));
            }
        }
    }
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn board_shows_the_demo_in_chromium() {
    let demo = Demo::start(200).await;
    let mut cdp = Cdp::open(&demo.url).await;

    // One tile per topic the generator publishes, grouped by line. The generator is
    // seeded: its first 885 events cover all 36 topics, 4.5 s at 200 events/s; a loaded
    // machine publishes slower, hence the longer bound.
    let s = until_js_within(
        &mut cdp,
        2 * PAGE_WAIT,
        "a tile for each of the 36 demo topics",
        BOARD_STATE,
        |s| s["state"] == "live" && tile_topics(s).len() >= 36,
    )
    .await;
    let mut topics = tile_topics(&s);
    let n = topics.len();
    topics.sort();
    topics.dedup();
    assert_eq!(topics.len(), n, "one tile per topic: {s}");
    assert_eq!(topics, demo_topics(), "{s}");
    assert_eq!(s["groups"], serde_json::json!(["line1", "line2", "line3"]));
    for t in s["tiles"].as_array().unwrap() {
        let topic = t["topic"].as_str().unwrap();
        assert!(
            topic.starts_with(&format!("{}/", t["group"].as_str().unwrap())),
            "{t}"
        );
        let value = t["value"].as_str().unwrap();
        let cls = t["cls"].as_str().unwrap();
        // the value big and readable: a number with its unit, or a state word, coloured
        if topic.ends_with("/temp") {
            let num = value
                .strip_suffix("°C")
                .unwrap_or_else(|| panic!("unit: {t}"));
            num.parse::<f64>().unwrap_or_else(|_| panic!("number: {t}"));
        } else if topic.ends_with("/state") {
            let want = match value {
                "running" => "good",
                "idle" | "setup" => "warn",
                "stopped" => "bad",
                _ => panic!("state word: {t}"),
            };
            assert!(cls.split(' ').any(|c| c == want), "{want}: {t}");
        } else {
            assert!(
                ["E101", "E205", "E310", "W020"]
                    .iter()
                    .any(|c| value.starts_with(c)),
                "alarm code and text: {t}"
            );
        }
        assert!(t["ago"].as_str().unwrap().ends_with(" ago"), "{t}");
    }

    // A tile's value changes as events arrive; its sparkline fills from them.
    let topic = "line1/press/temp";
    let before = tile(&s, topic).unwrap().clone();
    let s = until_js(&mut cdp, "line1/press/temp changes", BOARD_STATE, |s| {
        tile(s, topic).is_some_and(|t| {
            t["seq"].as_u64() > before["seq"].as_u64() && t["value"] != before["value"]
        })
    })
    .await;
    let s2 = until_js(
        &mut cdp,
        "a sparkline of several points",
        BOARD_STATE,
        |s| tile(s, topic).is_some_and(|t| t["points"].as_u64() >= Some(8)),
    )
    .await;
    let t = tile(&s2, topic).unwrap();
    assert_eq!(t["points"], t["drawn"], "every point drawn: {t}");
    assert_eq!(
        tile(&s, "line1/press/state").unwrap()["points"],
        0,
        "no sparkline for words"
    );

    // An alarm shows in the banner and leaves it when acknowledged.
    let s = until_js(&mut cdp, "an alarm in the banner", BOARD_STATE, |s| {
        s["banner"] == true && s["alarms"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let a = &s["alarms"][0];
    assert!(a["topic"].as_str().unwrap().ends_with("/alarm"), "{s}");
    let alarm_tile = tile(&s, a["topic"].as_str().unwrap()).unwrap();
    assert!(
        a["text"]
            .as_str()
            .unwrap()
            .contains(alarm_tile["value"].as_str().unwrap()),
        "{s}"
    );
    assert!(
        alarm_tile["cls"].as_str().unwrap().contains("bad"),
        "{alarm_tile}"
    );
    // One click (an operator's tap) on the first alarm's button; the result is read in
    // the same task, before any further event can arrive.
    let acked = cdp
        .eval(
            "(() => { const li = document.querySelector('#alarm-list li');
              const topic = li.dataset.topic, seq = +li.dataset.seq;
              li.querySelector('button.ack').click();
              const tile = document.querySelector(`.tile[data-topic=\"${topic}\"]`);
              return { topic, seq,
                still: [...document.querySelectorAll('#alarm-list li')]
                  .filter(l => l.dataset.topic === topic).length,
                tileSeq: +tile.dataset.seq, tileCls: tile.className }; })()",
        )
        .await;
    assert_eq!(
        acked["still"], 0,
        "acknowledged alarm left the banner: {acked}"
    );
    assert_eq!(acked["seq"], acked["tileSeq"], "{acked}");
    assert!(
        !acked["tileCls"].as_str().unwrap().contains("bad"),
        "{acked}"
    );
    // It stays acknowledged while other events arrive: only a newer alarm on that topic
    // raises it again.
    let seen = s["tiles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["seq"].as_u64())
        .max()
        .unwrap();
    let s = until_js(&mut cdp, "more events", BOARD_STATE, |s| {
        s["tiles"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["seq"].as_u64())
            .max()
            .unwrap()
            > seen + 50
    })
    .await;
    for a in s["alarms"].as_array().unwrap() {
        if a["topic"] == acked["topic"] {
            assert!(
                a["seq"].as_u64() > acked["seq"].as_u64(),
                "{a} after {acked}"
            );
        }
    }
    // "acknowledge all" empties the banner.
    let all = cdp
        .eval(
            "(() => { document.getElementById('ack-all').click();
              return { left: document.querySelectorAll('#alarm-list li').length,
                       hidden: document.getElementById('alarms').hidden }; })()",
        )
        .await;
    assert_eq!(all, serde_json::json!({ "left": 0, "hidden": true }));

    // A screenshot of the board on a 1280x800 panel PC, once a fresh alarm is up: kept in
    // the target dir, or written to docs/board.png with ASBGW_UPDATE_SCREENSHOT=1.
    until_js(&mut cdp, "a fresh alarm", BOARD_STATE, |s| {
        s["banner"] == true
    })
    .await;
    let png = cdp.screenshot(1280, 800).await;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    let shot = if std::env::var_os("ASBGW_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/board.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("board-{}.png", std::process::id()))
    };
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, &png).expect("screenshot written");

    // On a phone: nothing wider than the screen, touch targets at least 40 px high.
    cdp.viewport(390, 844, true).await;
    let phone = cdp
        .eval(
            "(() => ({ width: document.documentElement.scrollWidth, screen: innerWidth,
               small: [...document.querySelectorAll('button, input')]
                 .filter(b => b.offsetParent !== null && b.getBoundingClientRect().height < 40)
                 .map(b => b.id || b.textContent) }))()",
        )
        .await;
    assert!(
        phone["width"].as_u64() <= phone["screen"].as_u64(),
        "{phone}"
    );
    assert_eq!(phone["small"], serde_json::json!([]), "{phone}");
    let log = cdp
        .eval(
            "(() => { document.getElementById('tab-log').click();
              return { width: document.documentElement.scrollWidth, screen: innerWidth,
                       rows: document.querySelectorAll('#rows tr').length }; })()",
        )
        .await;
    assert!(log["width"].as_u64() <= log["screen"].as_u64(), "{log}");
    assert!(log["rows"].as_u64() > Some(0), "{log}");
    drop(cdp);
    drop(demo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn board_applies_each_event_once() {
    let ctx = ctx("");
    for c in 0..6 {
        append(
            &ctx,
            "line1/press/temp",
            &format!("{{\"celsius\":{}}}", 40 + c),
        );
    }
    append(&ctx, "line1/press/state", r#"{"state":"idle"}"#);
    append(
        &ctx,
        "line1/press/alarm",
        r#"{"code":"E101","text":"overtemperature"}"#,
    );
    append(&ctx, "line2/weld/state", r#"{"state":"running"}"#);
    let srv = start(ctx.clone(), Options::default()).await;
    let mut cdp = Cdp::open(&format!("http://{}/", srv.addr)).await;

    // Last values first (flagged), then the replay of the same 9 events: each once.
    let s = until_js(&mut cdp, "synced and replayed", BOARD_STATE, |s| {
        s["syncs"] == 1 && s["rows"].as_array().is_some_and(|r| r.len() == 9)
    })
    .await;
    assert_eq!(tile_topics(&s).len(), 4, "{s}");
    let t = tile(&s, "line1/press/temp").unwrap();
    assert_eq!(
        (t["value"].as_str(), t["seq"].as_u64()),
        (Some("45°C"), Some(6)),
        "{t}"
    );
    assert_eq!(t["points"], 6, "each replayed event is one point: {t}");
    assert!(
        tile(&s, "line1/press/state").unwrap()["cls"]
            .as_str()
            .unwrap()
            .contains("warn")
    );
    assert!(
        tile(&s, "line2/weld/state").unwrap()["cls"]
            .as_str()
            .unwrap()
            .contains("good")
    );
    assert_eq!(s["alarms"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["alarms"][0]["seq"], 8, "{s}");

    // A live event adds one point; {"op":"last"} again (a filter added in the page)
    // sends every last value once more, which changes nothing.
    append(&ctx, "line1/press/temp", r#"{"celsius":39.5}"#);
    until_js(&mut cdp, "the live event", BOARD_STATE, |s| {
        tile(s, "line1/press/temp").is_some_and(|t| t["points"] == 7 && t["value"] == "39.5°C")
    })
    .await;
    cdp.eval(
        "(() => { document.getElementById('filter').value = '# $sys/#';
          document.querySelector('#filter-form button').click(); })()",
    )
    .await;
    let s = until_js(&mut cdp, "synced again", BOARD_STATE, |s| s["syncs"] == 2).await;
    let t = tile(&s, "line1/press/temp").unwrap();
    assert_eq!(
        (t["points"].as_u64(), t["seq"].as_u64()),
        (Some(7), Some(10)),
        "{t}"
    );
    assert_eq!(s["alarms"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["rows"].as_array().unwrap().len(), 10, "{s}");

    // An acknowledged alarm stays acknowledged through a reload (same journal epoch).
    cdp.eval("document.querySelector('#alarm-list button.ack').click()")
        .await;
    cdp.eval("location.reload()").await;
    let s = until_js(&mut cdp, "reloaded and synced", BOARD_STATE, |s| {
        s["syncs"] == 1 && s["rows"].as_array().is_some_and(|r| r.len() == 10)
    })
    .await;
    assert_eq!(s["banner"], false, "{s}");
    assert!(
        tile(&s, "line1/press/alarm").unwrap()["cls"]
            .as_str()
            .unwrap()
            .contains("acked"),
        "{s}"
    );
    // A newer alarm on that topic raises it again.
    append(
        &ctx,
        "line1/press/alarm",
        r#"{"code":"E205","text":"jam detected"}"#,
    );
    let s = until_js(&mut cdp, "the new alarm", BOARD_STATE, |s| {
        s["banner"] == true
    })
    .await;
    assert_eq!(s["alarms"][0]["seq"], 11, "{s}");
    assert!(
        s["alarms"][0]["text"]
            .as_str()
            .unwrap()
            .contains("E205 jam detected"),
        "{s}"
    );
    drop(cdp);
    srv.stop().await;
}

/// A reverse proxy serving the gateway under `/gw/`, like nginx `location /gw/ {
/// proxy_pass http://gateway/; }`: each connection carries one request, its path loses
/// the prefix (anything outside `/gw/` is a 404), and an upgraded connection is piped
/// through. Returns its address and the paths requested.
async fn prefix_proxy(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                // the request head, byte by byte so nothing after it is consumed
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if client.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let (line, rest) = head.split_once("\r\n").unwrap();
                let mut parts = line.splitn(3, ' ');
                let (method, target, version) = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                );
                seen.lock().unwrap().push(target.to_string());
                let Some(path) = target.strip_prefix("/gw") else {
                    let _ = client
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let upgrade = rest.to_ascii_lowercase().contains("upgrade: websocket");
                let rest: String = if upgrade {
                    rest.to_string()
                } else {
                    rest.split("\r\n")
                        .filter(|h| !h.to_ascii_lowercase().starts_with("connection:"))
                        .map(|h| {
                            if h.is_empty() {
                                h.to_string()
                            } else {
                                format!("{h}\r\n")
                            }
                        })
                        .collect::<String>()
                        + "connection: close\r\n\r\n"
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if up
                    .write_all(format!("{method} {path} {version}\r\n{rest}").as_bytes())
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (addr, paths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_works_under_a_path_prefix() {
    let ctx = ctx("");
    for i in 0..3 {
        append(
            &ctx,
            &format!("line{}/press/temp", i + 1),
            &format!("{{\"celsius\":{}}}", 30 + i),
        );
    }
    let srv = start(ctx.clone(), Options::default()).await;
    let (proxy, paths) = prefix_proxy(srv.addr).await;
    let mut cdp = Cdp::open(&format!("http://{proxy}/gw/")).await;
    let s = until_js(
        &mut cdp,
        "live through the proxy, a tile per topic, history replayed",
        BOARD_STATE,
        |s| {
            s["state"] == "live"
                && tile_topics(s).len() == 3
                && s["rows"] == serde_json::json!([3, 2, 1])
        },
    )
    .await;
    assert_eq!(s["rows"], serde_json::json!([3, 2, 1]), "{s}");
    // (the browser's own /favicon.ico request is not the page's)
    let paths: Vec<String> = paths
        .lock()
        .unwrap()
        .iter()
        .filter(|p| *p != "/favicon.ico")
        .cloned()
        .collect();
    assert!(
        paths.iter().all(|p| p.starts_with("/gw/")),
        "only relative URLs: {paths:?}"
    );
    assert!(paths.iter().any(|p| p == "/gw/page.js"), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("/gw/v1/stream?")),
        "{paths:?}"
    );
    drop(cdp);
    srv.stop().await;
}

// ---- tokens ----

/// A token with characters that break a query string and that base64 spells with `+`,
/// `/` and padding (base64url without padding must be sent).
const PAGE_TOKEN: &str = "line1-panel-7f3a?~~~&???!";

fn token_config(token: &str) -> String {
    use sha2::Digest;
    format!(
        "[[panels.tokens]]\nname = \"panel\"\nsha256 = \"{}\"\n",
        hex(&sha2::Sha256::digest(token.as_bytes()))
    )
}

/// What the page shows and keeps about its token.
const AUTH_STATE: &str = "({ state: document.getElementById('state').textContent,
    form: !document.getElementById('token-form').hidden,
    asked: +(document.body.dataset.asked || 0),
    error: document.getElementById('error').textContent,
    href: location.href, search: location.search,
    stored: sessionStorage.getItem('asbgw.token'),
    tiles: [...document.querySelectorAll('#groups .tile')].map(t => t.dataset.topic + '@' + t.dataset.seq) })";

/// Type `text` into the token form and press Enter, as an operator does (DevTools input
/// events, not a script setting the value).
async fn type_token(cdp: &mut Cdp, text: &str) {
    cdp.eval("document.getElementById('token').focus()").await;
    cdp.call("Input.insertText", serde_json::json!({ "text": text }))
        .await;
    for kind in ["keyDown", "keyUp"] {
        cdp.call(
            "Input.dispatchKeyEvent",
            serde_json::json!({ "type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13, "text": "\r" }),
        )
        .await;
    }
}

/// The URLs the page requested (`Network.requestWillBeSent`, `Network.webSocketCreated`)
/// and the request headers of its WebSocket handshakes and fetches of `v1/last`, from
/// the recorded DevTools events.
fn requests(cdp: &Cdp) -> (Vec<String>, Vec<serde_json::Value>) {
    let mut urls = Vec::new();
    let mut headers = Vec::new();
    for e in &cdp.events {
        let p = &e["params"];
        match e["method"].as_str().unwrap_or_default() {
            "Network.requestWillBeSent" => {
                let url = p["request"]["url"].as_str().unwrap().to_string();
                if url.contains("/v1/last") {
                    headers.push(p["request"]["headers"].clone());
                }
                urls.push(url);
            }
            "Network.webSocketCreated" => urls.push(p["url"].as_str().unwrap().to_string()),
            "Network.webSocketWillSendHandshakeRequest" => {
                headers.push(p["request"]["headers"].clone())
            }
            _ => {}
        }
    }
    (urls, headers)
}

/// A header of a DevTools `headers` object, whatever its case.
fn header<'a>(headers: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    headers
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

/// No URL carries `token` in any spelling, nor a `token=` parameter.
fn assert_no_token_in(urls: &[String], token: &str) {
    use base64::Engine;
    let spellings = [
        token.to_string(),
        url_encode(token),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token),
        "token=".to_string(),
    ];
    for url in urls {
        for s in &spellings {
            assert!(!url.contains(s.as_str()), "{url} contains {s:?}");
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_over_https_asks_for_the_token_once_and_keeps_it_out_of_urls() {
    use asb_gateway::tls::CertFiles;
    use asb_gateway::tls::server::ServerTls;
    use base64::Engine;
    let dir = support::TempDir::new("page-tls");
    support::tls::make_ca(dir.path(), "ca");
    let (cert, key) = support::tls::server_cert(dir.path(), "ca", "server", 30);
    // Chromium trusts this certificate (by its key) and no other invalid one.
    let spki = support::tls::spki_sha256(dir.path(), &cert);
    let ctx = ctx(&token_config(PAGE_TOKEN));
    append(&ctx, "line1/press/temp", "{\"celsius\":41}");
    let mut settings = ctx.panel_settings();
    settings.tls = Some(ServerTls::load(CertFiles { cert, key }).unwrap());
    let srv = start_with(ctx.clone(), settings, Options::default()).await;
    let url = format!("https://127.0.0.1:{}/", srv.addr.port());
    let mut cdp = Cdp::open_with(
        &url,
        &[format!("--ignore-certificate-errors-spki-list={spki}")],
        true,
    )
    .await;

    // No token yet: the stream is refused, v1/last says 401, the page asks.
    let s = until_js(&mut cdp, "the token form", AUTH_STATE, |s| {
        s["form"] == true
    })
    .await;
    assert_eq!(
        (s["state"].as_str(), s["asked"].as_u64()),
        (Some("offline"), Some(1)),
        "{s}"
    );
    assert_eq!(s["tiles"], serde_json::json!([]), "{s}");
    assert!(s["href"].as_str().unwrap().starts_with("https://"), "{s}");
    // Touch-sized on a phone, nothing wider than the screen.
    cdp.viewport(390, 844, true).await;
    let form = cdp
        .eval(
            "(() => ({ width: document.documentElement.scrollWidth, screen: innerWidth,
               heights: [...document.querySelectorAll('#token-form input, #token-form button')]
                 .map(e => e.getBoundingClientRect().height) }))()",
        )
        .await;
    assert!(form["width"].as_u64() <= form["screen"].as_u64(), "{form}");
    let heights = form["heights"].as_array().unwrap();
    assert!(
        heights.len() == 2 && heights.iter().all(|h| h.as_f64() >= Some(40.0)),
        "{form}"
    );

    // The operator types it: the board goes live, and an event appended shows.
    type_token(&mut cdp, PAGE_TOKEN).await;
    until_js(&mut cdp, "live with the last value", AUTH_STATE, |s| {
        s["state"] == "live" && s["tiles"] == serde_json::json!(["line1/press/temp@1"])
    })
    .await;
    let seq = append(&ctx, "line1/press/temp", "{\"celsius\":42.5}");
    let s = until_js(&mut cdp, "the appended event", BOARD_STATE, |s| {
        tile(s, "line1/press/temp").is_some_and(|t| t["seq"] == seq)
    })
    .await;
    assert_eq!(tile(&s, "line1/press/temp").unwrap()["value"], "42.5°C");
    let s = cdp.eval(AUTH_STATE).await;
    assert_eq!(
        (
            s["form"].as_bool(),
            s["asked"].as_u64(),
            s["search"].as_str()
        ),
        (Some(false), Some(1), Some("")),
        "{s}"
    );
    assert_eq!(s["stored"], PAGE_TOKEN, "kept for the session: {s}");
    assert_eq!(
        ctx.metrics.panels_auth_failures.get(),
        0,
        "no wrong token was ever presented"
    );

    // What went over the wire: no URL with the token; the WebSocket handshake carried it
    // as a subprotocol entry, the check of the typed token as a bearer header.
    let entry = format!(
        "asbgw.token.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(PAGE_TOKEN)
    );
    let (urls, headers) = requests(&cdp);
    assert!(
        urls.iter().any(|u| u.starts_with(&format!("{url}page.js"))),
        "{urls:?}"
    );
    assert!(
        urls.iter()
            .any(|u| u.starts_with(&format!("wss://127.0.0.1:{}/v1/stream?", srv.addr.port()))),
        "{urls:?}"
    );
    assert_no_token_in(&urls, PAGE_TOKEN);
    assert!(
        headers.iter().any(
            |h| header(h, "sec-websocket-protocol") == Some(&format!("asbgw.v1.json, {entry}"))
        ),
        "{headers:?}"
    );
    let bearer = format!("Bearer {PAGE_TOKEN}");
    assert!(
        headers
            .iter()
            .any(|h| header(h, "authorization") == Some(&bearer)),
        "{headers:?}"
    );

    // A reload goes live on the kept token without asking (the new document has not
    // asked: `asked` is 0 there).
    cdp.events.clear();
    cdp.eval("location.reload()").await;
    let s = until_js(&mut cdp, "live again after the reload", AUTH_STATE, |s| {
        s["state"] == "live"
            && s["asked"] == 0
            && s["tiles"] == serde_json::json!([format!("line1/press/temp@{seq}")])
    })
    .await;
    assert_eq!(
        (s["form"].as_bool(), s["stored"].as_str()),
        (Some(false), Some(PAGE_TOKEN)),
        "{s}"
    );
    let (urls, headers) = requests(&cdp);
    assert!(urls.iter().any(|u| u.contains("/v1/stream?")), "{urls:?}");
    assert_no_token_in(&urls, PAGE_TOKEN);
    assert!(
        headers.iter().any(
            |h| header(h, "sec-websocket-protocol") == Some(&format!("asbgw.v1.json, {entry}"))
        ),
        "{headers:?}"
    );
    assert_eq!(ctx.metrics.panels_auth_failures.get(), 0);
    drop(cdp);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_token_url_is_cleaned_and_a_rotated_token_asks_again() {
    let ctx = ctx(&token_config(PAGE_TOKEN));
    append(&ctx, "line1/press/temp", "{\"celsius\":41}");
    let srv = start(ctx.clone(), Options::default()).await;
    let addr = srv.addr;
    let page = format!("http://{addr}/?token={}#log", url_encode(PAGE_TOKEN));
    let mut cdp = Cdp::open_with(&page, &[], true).await;

    // A bookmark from before: the page goes live on it, the address bar loses it.
    let s = until_js(
        &mut cdp,
        "live on the token from the URL",
        AUTH_STATE,
        |s| s["state"] == "live" && s["tiles"] == serde_json::json!(["line1/press/temp@1"]),
    )
    .await;
    assert_eq!(s["href"], format!("http://{addr}/#log"), "{s}");
    assert_eq!(
        (s["stored"].as_str(), s["asked"].as_u64()),
        (Some(PAGE_TOKEN), Some(0)),
        "{s}"
    );
    // The tab's history holds the cleaned URL only (replaced, not pushed).
    let history = cdp
        .call("Page.getNavigationHistory", serde_json::json!({}))
        .await;
    let entries: Vec<&str> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        entries,
        ["about:blank", &format!("http://{addr}/#log")],
        "{history}"
    );
    // Only the page itself was requested with it; the page's own requests were not.
    let (urls, _) = requests(&cdp);
    assert_eq!(urls[0], page.trim_end_matches("#log"), "{urls:?}");
    assert_no_token_in(&urls[1..], PAGE_TOKEN);

    // The token is rotated (the server comes back with another one): the page asks
    // instead of reconnecting for ever, after one refused connection and one check.
    srv.stop().await;
    until_js(&mut cdp, "offline", AUTH_STATE, |s| s["state"] != "live").await;
    // (not ASCII: no HTTP header can carry it, the subprotocol entry can)
    const ROTATED: &str = "Linie-1-Schlüssel-€";
    let mut settings = ctx.panel_settings();
    settings.policy.tokens = support::panels::ctx(&token_config(ROTATED))
        .panel_settings()
        .policy
        .tokens;
    let failures = ctx.metrics.panels_auth_failures.get();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("rebind the port");
    let (trigger, sd) = asb_gateway::shutdown::channel();
    let task = tokio::spawn(asb_gateway::panels::serve_with(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        settings,
        sd,
        Options::default(),
    ));
    let s = until_js(&mut cdp, "the token form again", AUTH_STATE, |s| {
        s["form"] == true
    })
    .await;
    assert_eq!(
        (
            s["state"].as_str(),
            s["error"].as_str(),
            s["stored"].as_str()
        ),
        (Some("offline"), Some("token not accepted"), None),
        "{s}"
    );
    let refused = ctx.metrics.panels_auth_failures.get() - failures;
    // (the stream's upgrade and the check, or the check alone if the page's last
    // attempt found the port closed)
    assert!(
        (1..=2).contains(&refused),
        "{refused} wrong tokens presented"
    );
    // A wrong one typed: asked again, not stored.
    type_token(&mut cdp, "not-the-token").await;
    let s = until_js(&mut cdp, "asked again", AUTH_STATE, |s| s["asked"] == 2).await;
    assert_eq!(
        (
            s["form"].as_bool(),
            s["error"].as_str(),
            s["stored"].as_str()
        ),
        (Some(true), Some("token not accepted"), None),
        "{s}"
    );
    // The new one: live again.
    append(&ctx, "line1/press/temp", "{\"celsius\":43}");
    type_token(&mut cdp, ROTATED).await;
    let s = until_js(&mut cdp, "live on the new token", AUTH_STATE, |s| {
        s["state"] == "live" && s["tiles"] == serde_json::json!(["line1/press/temp@2"])
    })
    .await;
    assert_eq!(
        (s["form"].as_bool(), s["stored"].as_str()),
        (Some(false), Some(ROTATED)),
        "{s}"
    );
    assert_eq!(
        ctx.metrics.panels_auth_failures.get() - failures,
        refused + 1,
        "no retries on the old token while the form was up"
    );
    let (urls, _) = requests(&cdp);
    assert_no_token_in(&urls[1..], ROTATED);
    drop(cdp);
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The page is small, loads nothing from elsewhere and refers to its own files and the
/// stream only by relative URLs (so a reverse proxy may put it under a path prefix).
#[test]
fn page_is_small_and_self_contained() {
    let html = include_str!("../src/panels/page.html");
    let js = include_str!("../src/panels/page.js");
    let size = html.len() + js.len();
    assert!(
        size < 40 * 1024,
        "page.html + page.js = {size} bytes, over 40 KiB"
    );
    for (name, text) in [("page.html", html), ("page.js", js)] {
        for bad in [
            "src=\"/", "href=\"/", "URL(\"/", "url(", "@import", "//cdn", "https://",
        ] {
            assert!(!text.contains(bad), "{name} contains {bad:?}");
        }
        let external = text
            .match_indices("http://")
            .filter(|(i, _)| !text[*i..].starts_with("http://www.w3.org/2000/svg"))
            .count();
        assert_eq!(external, 0, "{name} refers to another host");
    }
    assert!(html.contains("<script src=\"page.js\"></script>"));
    // the stream is relative to the page (the first gateway is the page's own)
    assert!(js.contains("const gateways = [location.href];"));
    assert!(js.contains("new URL(\"v1/stream\", gateways[current])"));
}
