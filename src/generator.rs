//! The demo's source of synthetic factory events: three lines with a few stations each,
//! publishing machine states, temperatures and alarms as JSON messages (subject `state`,
//! `temp` or `alarm`; application properties `line` and `station`) into a topic with
//! the emulator's [`Publisher`]. One message in flight at a time, paced by a timer.

use std::time::Duration;

use crate::emulator::client::{ClientError, Publisher};
use crate::shutdown::Shutdown;

const LINES: [&str; 3] = ["line1", "line2", "line3"];
const STATIONS: [&str; 4] = ["press", "weld", "paint", "pack"];
const STATES: [&str; 4] = ["running", "idle", "setup", "stopped"];
const ALARMS: [(&str, &str); 4] = [
    ("E101", "overtemperature"),
    ("E205", "jam detected"),
    ("E310", "door open"),
    ("W020", "maintenance due"),
];

/// One synthetic event: subject, (line, station), JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub subject: &'static str,
    pub line: &'static str,
    pub station: &'static str,
    pub body: String,
}

/// A deterministic event source (seeded), so the demo and tests are reproducible.
#[derive(Debug)]
pub struct Factory {
    rng: fastrand::Rng,
    temps: [[f64; 4]; 3],
    n: u64,
}

impl Factory {
    pub fn new(seed: u64) -> Self {
        Factory {
            rng: fastrand::Rng::with_seed(seed),
            temps: [[40.0; 4]; 3],
            n: 0,
        }
    }

    pub fn next_event(&mut self) -> Event {
        self.n += 1;
        let li = self.rng.usize(..LINES.len());
        let si = self.rng.usize(..STATIONS.len());
        let (line, station) = (LINES[li], STATIONS[si]);
        let roll = self.rng.u8(..100);
        if roll < 70 {
            let t = &mut self.temps[li][si];
            *t = (*t + (self.rng.f64() - 0.5) * 2.0).clamp(20.0, 95.0);
            Event {
                subject: "temp",
                line,
                station,
                body: format!(
                    r#"{{"line":"{line}","station":"{station}","celsius":{:.1},"n":{}}}"#,
                    *t, self.n
                ),
            }
        } else if roll < 95 {
            let state = STATES[self.rng.usize(..STATES.len())];
            Event {
                subject: "state",
                line,
                station,
                body: format!(
                    r#"{{"line":"{line}","station":"{station}","state":"{state}","n":{}}}"#,
                    self.n
                ),
            }
        } else {
            let (code, text) = ALARMS[self.rng.usize(..ALARMS.len())];
            Event {
                subject: "alarm",
                line,
                station,
                body: format!(
                    r#"{{"line":"{line}","station":"{station}","code":"{code}","text":"{text}","n":{}}}"#,
                    self.n
                ),
            }
        }
    }
}

/// Publish synthetic events to `topic` at `rate_per_sec` until `shutdown` fires.
/// Reconnects (after a pause) when the broker goes away.
pub async fn run(
    conn_str: &str,
    topic: &str,
    rate_per_sec: f64,
    mut shutdown: Shutdown,
) -> Result<(), ClientError> {
    let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
        rate_per_sec
    } else {
        1.0
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut factory = Factory::new(0x5eed);
    let mut publisher: Option<Publisher> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = tick.tick() => {}
        }
        let p = match publisher.as_mut() {
            Some(p) => p,
            None => match Publisher::connect(conn_str, topic).await {
                Ok(p) => {
                    if warned {
                        log::info!("generator: connected again");
                    }
                    warned = false;
                    publisher.insert(p)
                }
                Err(e) => {
                    if !warned {
                        log::warn!("generator: cannot publish to {topic}: {e}; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.recv() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            },
        };
        let ev = factory.next_event();
        let props = [("line", ev.line), ("station", ev.station)];
        if let Err(e) = p
            .send_json(ev.subject, &props, ev.body.into_bytes(), "application/json")
            .await
        {
            log::warn!("generator: send failed: {e}; reconnecting");
            warned = true;
            publisher = None;
        }
    }
    if let Some(p) = publisher {
        let _ = p.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_json_with_all_kinds() {
        let mut f = Factory::new(1);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let e = f.next_event();
            let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
            assert_eq!(v["line"], e.line);
            assert_eq!(v["station"], e.station);
            kinds.insert(e.subject);
        }
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["alarm", "state", "temp"]
        );
    }
}
