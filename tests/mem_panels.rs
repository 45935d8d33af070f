//! Memory of an idle panel: the live heap a connected panel that receives nothing holds
//! on the server (issue 18: "a panel must cost kilobytes").
//!
//! How it is measured: a `#[global_allocator]` that keeps the live bytes (allocated minus
//! freed) of the *server* runtime's threads (flagged in `on_thread_start`). Clients run in
//! a second runtime. One panel connects first (the server's own buffers and tables reach
//! their size), then 200 more connect and each gets its `hello`; after a short settle the
//! growth of the live heap divided by 200 is the heap one idle panel costs: the session
//! task (with the client-frame reader's fixed bytes), the socket registration, the
//! cursor and filters. The kernel's socket buffers are not heap (`SO_SNDBUF` is capped
//! separately, `budget::PANEL_SNDBUF`).
//!
//! Measured (dev profile, as CI runs it): 20,300 B per idle panel before issue 18's
//! changes (an 8 KiB WebSocket read buffer zero-filled on every read, 8 inline filters
//! of ~260 B each, the HTTP connection's state kept in the task), 8,828 B after them
//! (512 B read buffer that grows for a larger client frame, filters on the heap as
//! needed, the HTTP exchange boxed and freed at the upgrade); 8,287 B with frames sent by
//! reference (no write buffer in tungstenite); 4,407 B once the connection task stopped
//! being sized for its start (the TLS stream and the HTTP exchange's result, kept in the
//! task for the panel's whole life) and the session's state was held once, not also as
//! the arguments it was built from (the task went from 5,928 to 2,176 B); 4,119 B with
//! client frames read without tungstenite's read buffer and state; 3,521 B with the
//! journal's read batch kept per runtime thread rather than per panel (512 B), queue
//! entries of 48 B (the header formatted when written) and filters of 258 B. Issue 18's
//! goal is 6 KiB; the bound [`IDLE_PANEL_HEAP`] is kept near what is measured, so that
//! a panel growing by a few hundred bytes fails here. The budget (`check-config`)
//! counts each panel's worst case: a full frame queue, which a panel reaches only while
//! events flow, and the state the second test measures.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use asb_gateway::panels::{self, Options};
use asb_gateway::shutdown;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Most heap bytes one connected idle panel may hold on the server (3,521 B measured).
const IDLE_PANEL_HEAP: i64 = 4 * 1024;
const PANELS: usize = 200;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn on_server() -> bool {
    SERVER_THREAD.try_with(Cell::get).unwrap_or(false)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if on_server() {
            LIVE.fetch_add(layout.size() as i64, Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if on_server() {
            LIVE.fetch_add(layout.size() as i64, Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if on_server() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if on_server() {
            LIVE.fetch_sub(layout.size() as i64, Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests share the allocator's counter: one at a time (`cargo test` runs them on
/// threads of one process; nextest, in processes of their own).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn an_idle_panel_holds_a_few_kilobytes_of_heap() {
    let per_panel = heap_per_panel("filter=line1/%23", &[]);
    println!("{per_panel} B per idle panel (bound {IDLE_PANEL_HEAP} B)");
    assert!(
        per_panel <= IDLE_PANEL_HEAP,
        "an idle panel holds {per_panel} B of heap (bound {IDLE_PANEL_HEAP} B)"
    );
}

/// The budget's state per panel (`budget::PANEL_STATE`) covers the most a connected panel
/// keeps besides its frame queue and control frames: 8 filters of the longest length,
/// and the most `Origin` and `Host` it may keep (`budget::PANEL_ADMISSION`). The panel's
/// queue is measured with it: after the hello it has room for 8 frames (its first
/// growth), which the budget counts in the queue's line, not in the state.
#[test]
fn a_panel_with_the_most_filters_and_headers_stays_within_the_budgets_state() {
    let filter = |i: usize| format!("{i}/{}", "f".repeat(asb_gateway::routing::FILTER_MAX - 2));
    let query: Vec<String> = (0..asb_gateway::budget::MAX_FILTERS)
        .map(|i| format!("filter={}", filter(i)))
        .collect();
    // With the separator, the Origin line fills what a panel may keep.
    let host_len = "127.0.0.1:65535".len();
    let origin = format!(
        "https://{}.example",
        "o".repeat(asb_gateway::budget::PANEL_ADMISSION - host_len - 1 - 8 - 8)
    );
    let per_panel = heap_per_panel(&query.join("&"), &[("Origin", &origin)]);
    let state = asb_gateway::budget::PANEL_STATE as i64;
    let queue = 8 * asb_gateway::budget::PANEL_QUEUE_ENTRY as i64;
    println!(
        "{per_panel} B per panel with 8 longest filters (the budget: {state} B of state, \
         {queue} B for the queue's first 8 entries)"
    );
    assert!(
        per_panel <= state + queue,
        "such a panel holds {per_panel} B of heap (the budget counts {state} B of state and \
         {queue} B for the queue's room it has)"
    );
}

/// Live server heap per connected panel: one panel connects first (the server's own
/// buffers and tables reach their size), then [`PANELS`] more with `query` and
/// `headers`, each gets its `hello`; after a short settle the growth of the live heap
/// divided by [`PANELS`].
fn heap_per_panel(query: &str, headers: &[(&str, &str)]) -> i64 {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| SERVER_THREAD.with(|f| f.set(true)))
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ctx = support::panels::ctx("[journal]\nevents = 1024\n");
    let (trigger, sd) = shutdown::channel();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server_rt.spawn(panels::serve_with(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.panel_settings(),
        sd,
        Options::default(),
    ));
    let hellos = Arc::new(AtomicU64::new(0));
    let connect = |n: usize| {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let hellos = hellos.clone();
            let query = query.to_string();
            let headers: Vec<(String, String)> = (headers.iter())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tasks.push(client_rt.spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut ws = support::panels::try_connect(addr, &query, None, &headers)
                    .await
                    .expect("connect");
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m
                        && t.as_str().starts_with("{\"type\":\"hello\"")
                    {
                        hellos.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
        tasks
    };
    let wait_hellos = |n: u64| {
        let t0 = Instant::now();
        while hellos.load(Relaxed) < n {
            assert!(t0.elapsed() < Duration::from_secs(20), "panels connect");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the server finish what follows the hello (flush, back to waiting).
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut clients = connect(1);
    wait_hellos(1);
    let before = LIVE.load(Relaxed);
    clients.extend(connect(PANELS));
    wait_hellos(PANELS as u64 + 1);
    let after = LIVE.load(Relaxed);
    let per_panel = (after - before) / PANELS as i64;
    println!(
        "live server heap: {before} B with 1 panel, {after} B with {} panels",
        PANELS + 1
    );
    assert_eq!(ctx.metrics.panels_connected.get(), PANELS as u64 + 1);
    assert!(
        per_panel > 0,
        "the counting allocator sees the server's threads"
    );
    trigger.fire();
    server_rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await })
        .expect("server stops")
        .unwrap()
        .unwrap();
    for c in clients {
        c.abort();
    }
    client_rt.shutdown_timeout(Duration::from_secs(1));
    server_rt.shutdown_timeout(Duration::from_secs(1));
    per_panel
}
