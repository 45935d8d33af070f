//! The MQTT mirror running in the test process, with the handoffs it sends the source.
//! The test stands in for the source: each handoff unpins its event in the journal (as
//! the source does) before the test sees it, so `journal.pinned()` counts the pinned
//! events the mirror has not handed on.

use std::sync::Arc;
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::journal::Handoff;
use asb_gateway::{mirror, shutdown};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub struct Running {
    pub trigger: shutdown::Trigger,
    pub task: JoinHandle<Result<(), mirror::MirrorError>>,
    pub acks: mpsc::Receiver<Handoff>,
}

pub fn start(ctx: &Arc<Context>) -> Running {
    let (trigger, sd) = shutdown::channel();
    let (tx, mut from_mirror) = mpsc::channel::<Handoff>(4096);
    let (to_test, acks) = mpsc::channel(4096);
    let task = tokio::spawn({
        let (settings, shared) = ctx.mirror_inputs().expect("[mqtt] configured");
        mirror::run(settings, shared, tx, sd)
    });
    let journal = ctx.journal.clone();
    tokio::spawn(async move {
        while let Some(h) = from_mirror.recv().await {
            journal.handed_on(h.seq());
            if to_test.send(h).await.is_err() {
                break;
            }
        }
    });
    Running {
        trigger,
        task,
        acks,
    }
}

impl Running {
    /// Graceful stop, which must return within about 2 s.
    pub async fn stop(self) {
        self.trigger.fire();
        let r = tokio::time::timeout(Duration::from_millis(2500), self.task)
            .await
            .expect("mirror did not stop within 2.5 s")
            .expect("mirror task panicked");
        r.expect("mirror ended with an error");
    }
}
