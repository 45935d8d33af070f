//! Steady-state heap of the source path: once the journal is full, a message in costs no
//! memory that stays.
//!
//! DESIGN §3: every queue has a capacity fixed before the first event and never grows,
//! and RSS stays under the budget under any load. The soak bench found RSS climbing by
//! ~350 B per message once the journal was full: with `rcv-settle-mode second` fe2o3
//! keeps each delivery in two maps until the broker echoes a settled disposition, and
//! fe2o3's own acceptor (the emulator) never sends that echo. The source now settles in
//! mode `first`; this test keeps it that way for any cause of per-message growth.
//!
//! How it is measured: a `#[global_allocator]` that keeps the live heap bytes of the whole
//! process (emulator, source, publisher — all in this test). Messages go in rounds of
//! `ROUND`; after each round the test waits until the emulator has every message
//! completed (nothing in flight anywhere), so the live heap is compared in the same state.
//! The first rounds fill the journal and let every map reach its working size; the growth
//! between the end of warm-up and the end of the run, divided by the messages in
//! between, must stay under `MAX_BYTES_PER_MESSAGE` (the leak measured 300+ B/message).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use asb_gateway::emulator::client::Publisher;
use support::source::*;

struct Live;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Live = Live;

const T: Duration = Duration::from_secs(30);
const ROUND: u64 = 500;
const WARMUP_ROUNDS: u64 = 3;
const ROUNDS: u64 = 12;
const MAX_BYTES_PER_MESSAGE: i64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_heap_does_not_grow_per_message_once_the_journal_is_full() {
    let em = start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let toml = format!(
        "[source]\nconnection_string = \"{}\"\n\
         [[source.subscriptions]]\ntopic = \"{TOPIC}\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 256\nunsettled = 64\n",
        em.connection_string()
    );
    let run = start(context(&toml), fast());
    let mut publisher = Publisher::connect(&em.connection_string(), TOPIC)
        .await
        .expect("publisher connects");
    let completed = || {
        em.stats()
            .get(&format!("{TOPIC}/Subscriptions/edge"))
            .map_or(0, |s| s.completed)
    };

    let mut sent = 0u64;
    let mut at_warmup = 0i64;
    for round in 1..=ROUNDS {
        for _ in 0..ROUND {
            let body = format!(r#"{{"i":{sent},"pad":"{:0>200}"}}"#, sent);
            tokio::time::timeout(
                T,
                publisher.send_json("temp", &[("line", "line1")], body, "application/json"),
            )
            .await
            .expect("send in time")
            .expect("send");
            sent += 1;
        }
        wait_for(T, "every message completed", || completed() == sent).await;
        // Let the last settlements and timers finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let live = LIVE.load(Relaxed);
        println!("round {round}: {sent} messages, live heap {live} B");
        if round == WARMUP_ROUNDS {
            at_warmup = live;
        }
    }
    let measured = ((ROUNDS - WARMUP_ROUNDS) * ROUND) as i64;
    let growth = LIVE.load(Relaxed) - at_warmup;
    println!(
        "live heap growth after warm-up: {growth} B over {measured} messages = {} B/message",
        growth / measured
    );
    assert_eq!(run.ctx.metrics.completed.get(), sent);
    assert!(
        growth < MAX_BYTES_PER_MESSAGE * measured,
        "live heap grew {growth} B over {measured} messages after warm-up \
         (limit {MAX_BYTES_PER_MESSAGE} B/message)"
    );
    publisher.close().await.unwrap();
    run.stop().await.unwrap();
    em.shutdown().await;
}
