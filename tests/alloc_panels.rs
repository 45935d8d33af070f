//! Allocation check of the journal → panels path.
//!
//! DESIGN §2: "each event is encoded once and shared by reference with every reader: cost
//! per event must not grow with the number of panels". The per-event work a panel does
//! is: wake on the journal's watch, read a batch of `Arc`s into a reused Vec, match its
//! filters, hand the event's prebuilt frame bytes (a refcounted `Bytes`) to the WebSocket
//! layer, which copies them into its fixed write buffer, and flush. None of that should
//! allocate, so the allocations per event must be (nearly) the same with 1 panel and
//! with 200.
//!
//! How it is measured: a counting `#[global_allocator]` that counts only on threads of
//! the *server* runtime (flagged in `on_thread_start`). Clients run in a second runtime
//! and events are appended from the test thread, so neither the clients' decoding nor
//! the encoding of events (done once by the source, not per panel) is counted. Every
//! panel is connected, warmed up (buffers at their steady size) and caught up; then
//! events are appended one at a time, each waiting until every panel has received it,
//! and the server's allocations are read.
//!
//! Measured: 0 server allocations per event with 1 panel and with 200 (handing an
//! event's bytes to a reader is a refcount increment, not an allocation).
//!
//! The assertion: the extra allocations per event per additional panel,
//! (A₂₀₀ − A₁) / (events × 199), are at most 0.05 — i.e. a panel costs no allocation per
//! event (a few may come from runtime bookkeeping such as timer wheel or waker slabs
//! growing once). Without the shared-bytes design (e.g. a `String` per frame per panel)
//! this would be ≥ 1.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use asb_gateway::panels::{self, Options};
use asb_gateway::shutdown;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if SERVER_THREAD.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARMUP: u64 = 64;
const EVENTS: u64 = 300;

/// Server allocations while `EVENTS` events go to `panels` caught-up panels.
fn measure(panels: usize) -> u64 {
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

    let received = Arc::new(AtomicU64::new(0));
    let hellos = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..panels {
        let (received, hellos) = (received.clone(), hellos.clone());
        clients.push(client_rt.spawn(async move {
            let mut ws = support::panels::connect(addr, "filter=line1/%23").await;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    if t.as_str().starts_with("{\"type\":\"event\"") {
                        received.fetch_add(1, Relaxed);
                    } else if t.as_str().starts_with("{\"type\":\"hello\"") {
                        hellos.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    let wait = |cond: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "panels did not keep up"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    wait(&|| hellos.load(Relaxed) == panels as u64);
    // The counter works: accepting and upgrading connections allocates on the server.
    let setup = ALLOCS.load(Relaxed);
    assert!(
        setup > 0,
        "the counting allocator sees the server's threads"
    );
    println!(
        "{panels} panel(s): {:.0} server allocations per connection (handshake, buffers)",
        setup as f64 / panels as f64
    );

    let body = r#"{"temperature":21.5,"unit":"C","line":"line1"}"#;
    let send = |n: u64| {
        for _ in 0..n {
            let before = received.load(Relaxed);
            support::panels::append(&ctx, "line1/temp", body);
            wait(&|| received.load(Relaxed) == before + panels as u64);
        }
    };
    send(WARMUP);
    ALLOCS.store(0, Relaxed);
    send(EVENTS);
    let allocs = ALLOCS.load(Relaxed);

    assert_eq!(ctx.metrics.gaps.get(), 0, "all panels stayed caught up");
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
    allocs
}

#[test]
fn allocations_per_event_do_not_grow_with_panels() {
    let one = measure(1);
    let many = measure(200);
    let per_event_1 = one as f64 / EVENTS as f64;
    let per_event_200 = many as f64 / EVENTS as f64;
    let per_panel_per_event = (many.saturating_sub(one)) as f64 / (EVENTS as f64 * 199.0);
    println!(
        "server allocations per event: 1 panel {per_event_1:.3}, 200 panels {per_event_200:.3}; \
         extra per panel per event {per_panel_per_event:.5}"
    );
    assert!(
        per_panel_per_event <= 0.05,
        "a panel costs {per_panel_per_event:.3} allocations per event \
         (1 panel: {one}, 200 panels: {many}, {EVENTS} events)"
    );
}
