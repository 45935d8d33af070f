//! The MQTT mirror running in the test process, with the handoffs it sends the source.

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
    let (tx, acks) = mpsc::channel(4096);
    let task = tokio::spawn({
        let (settings, shared) = ctx.mirror_inputs().expect("[mqtt] configured");
        mirror::run(settings, shared, tx, sd)
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
