//! The built-in page in a real browser: headless Chromium (Debian package, installed by
//! `scripts/setup/panels.sh`) loads `/` from an in-process panel server while events are
//! appended, and the rendered DOM must show the events and the state "live". The test
//! also saves a screenshot to `docs/panel.png` for the README.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use asb_gateway::panels::Options;
use common::*;

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

/// Run headless Chromium with `args` against `url`; returns stdout.
async fn run_chromium(args: &[&str], url: &str) -> String {
    let profile = tempdir();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(25), cmd.output())
        .await
        .expect("chromium timed out")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
            for i in 0.. {
                let topic = ["line1/temp", "line2/pressure", "line1/door"][i % 3];
                append(&ctx, topic, &format!("{{\"value\":{i},\"unit\":\"bar\"}}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let url = format!("http://{}/", srv.addr);
    let dom = run_chromium(&["--dump-dom", "--virtual-time-budget=3000"], &url).await;
    assert_eq!(state(&dom), "live", "{dom}");
    let got = rows(&dom);
    let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
    // newest first, no duplicates, the history replayed and live events after it
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&1), "history replayed: {seqs:?}");
    assert!(seqs[0] > 5, "live events arrived: {seqs:?}");
    assert!(dom.contains(r#"{"celsius":20}"#), "bodies rendered");
    assert!(dom.contains(r#"<b id="gaps">0</b>"#));

    // The filter in the page's URL goes to the server: only line1 topics.
    let dom = run_chromium(
        &["--dump-dom", "--virtual-time-budget=2000"],
        &format!("{url}?filter=line1/%23"),
    )
    .await;
    assert_eq!(state(&dom), "live", "{dom}");
    let got = rows(&dom);
    assert!(got.len() > 3, "{got:?}");
    assert!(got.iter().all(|(_, t)| t.starts_with("line1/")), "{got:?}");
    assert!(dom.contains("filters line1/#"), "{dom}");

    // A screenshot for the README: kept in the target dir, or written to docs/panel.png
    // with ASBGW_UPDATE_SCREENSHOT=1.
    let shot = if std::env::var_os("ASBGW_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/panel.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("panel-{}.png", std::process::id()))
    };
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    run_chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,640",
            "--virtual-time-budget=3000",
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    feeder.abort();
    srv.stop().await;
}
