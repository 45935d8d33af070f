//! Reload by broadcast (SIGHUP, `systemctl reload`): one [`ReloadTrigger`], any number of
//! [`Reload`] listeners. A listener sees each reload fired after it was made (reloads
//! fired while it was busy are seen once). What a part re-reads is its own business;
//! today that is the panel port's TLS certificate.

use tokio::sync::watch;

/// Fires a reload.
#[derive(Debug)]
pub struct ReloadTrigger {
    tx: watch::Sender<u64>,
}

/// Listens for reloads. Clone one per part.
#[derive(Debug, Clone)]
pub struct Reload {
    rx: watch::Receiver<u64>,
}

pub fn channel() -> (ReloadTrigger, Reload) {
    let (tx, rx) = watch::channel(0);
    (ReloadTrigger { tx }, Reload { rx })
}

impl ReloadTrigger {
    pub fn fire(&self) {
        self.tx.send_modify(|n| *n += 1);
    }
}

impl Reload {
    /// A listener that never fires (no process signal behind it: tests, the demo).
    pub fn never() -> Reload {
        channel().1
    }

    /// Resolves at the next reload; never when the trigger is gone. Cancel-safe.
    pub async fn recv(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn each_listener_sees_a_reload_and_never_fires_without_trigger() {
        let (trigger, r) = channel();
        let (mut a, mut b) = (r.clone(), r);
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(1), a.recv())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), b.recv())
            .await
            .unwrap();
        let mut never = Reload::never();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), never.recv())
                .await
                .is_err()
        );
    }
}
