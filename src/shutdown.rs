//! Graceful shutdown by broadcast (the mini-redis pattern): one [`Trigger`], any number of
//! [`Shutdown`] listeners; the trigger can wait until every listener is gone.

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// Listens for the shutdown signal. Clone one per task; drop it when the task is done.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Wait until every [`Shutdown`] clone has been dropped.
    pub async fn wait_for_tasks(&self) {
        self.tx.closed().await
    }

    pub fn listener(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been fired (at once if it already was). Cancel-safe.
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.rx.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fire_reaches_all_and_waits_for_tasks() {
        let (trigger, sd) = channel();
        let mut handles = Vec::new();
        for _ in 0..3 {
            let mut s = sd.clone();
            handles.push(tokio::spawn(async move {
                s.recv().await;
                assert!(s.is_shutdown());
            }));
        }
        drop(sd);
        trigger.fire();
        tokio::time::timeout(std::time::Duration::from_secs(5), trigger.wait_for_tasks())
            .await
            .unwrap();
        for h in handles {
            h.await.unwrap();
        }
    }
}
