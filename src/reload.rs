//! Reload by broadcast (SIGHUP, `systemctl reload`): one [`ReloadTrigger`], any number of
//! [`Reload`] listeners. A listener sees each reload fired after it was made (reloads
//! fired while it was busy are seen once). A listener may carry the config file the
//! process was started with, which the daemon reads again on each reload.

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
    config_file: Option<std::path::PathBuf>,
}

pub fn channel() -> (ReloadTrigger, Reload) {
    let (tx, rx) = watch::channel(0);
    (
        ReloadTrigger { tx },
        Reload {
            rx,
            config_file: None,
        },
    )
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

    /// The same listener, re-reading the config at `path` on each reload.
    pub fn with_config_file(mut self, path: impl Into<std::path::PathBuf>) -> Reload {
        self.config_file = Some(path.into());
        self
    }

    /// The config file a reload reads again (`None`: only certificates are re-read).
    pub fn config_file(&self) -> Option<&std::path::Path> {
        self.config_file.as_deref()
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
