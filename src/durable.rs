//! The journal across restarts (`journal.state_dir`): restore at start, periodic
//! checkpoints, the seq lease, and the snapshot written at graceful stop. The file
//! format is in [`crate::journal::snapshot`].
//!
//! - **Start** ([`restore`]): the snapshot is streamed into a new journal of the same
//!   epoch; the duplicate-suppression window is re-filled; the next seq is the lease's
//!   `reserved_until` (equal to the snapshot's `next_seq` after a graceful stop; past it
//!   after a crash, the seqs in between reported as lost). A damaged snapshot or lease is
//!   moved aside, logged once with the reason, and the daemon starts a new epoch.
//! - **Run** ([`checkpoints`]): every `journal.checkpoint_secs` when something changed,
//!   the snapshot is rewritten; whenever half of the reserved seqs are used, the lease is
//!   extended *before* the journal may issue them. Failures are logged (once per streak)
//!   and counted, never fatal; a lease that cannot be extended makes the daemon remove
//!   its state (so a crash cannot restore a stale epoch) and go on in memory; if even that
//!   fails (read-only filesystem), ingest pauses at the bound until the disk recovers.
//! - **Graceful stop** ([`Persistence::checkpoint`] with `clean`): snapshot, then a lease
//!   equal to its `next_seq`.
//!
//! Events pinned for the mirror are saved pinned. After a restart the mirror starts at
//! the oldest of them; their messages, released at shutdown, come back as redeliveries
//! that the restored window recognises: they are held until the mirror has the event,
//! then completed, and panels never see them twice.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::event::EncodedEvent;
use crate::journal::snapshot::{
    DedupRecord, Lease, Meta, Reader, Record, SnapshotError, StateDir, Writer, read_lease,
    write_lease,
};
use crate::journal::{Journal, Limits};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::source::tracker::{Dedup, DedupKey, SharedDedup};

/// Seqs reserved ahead by the lease: the most a crash can skip. The lease is extended
/// when half of them are used (at 200 events/s: one small write every ~160 s).
pub const RESERVE_SEQS: u64 = 1 << 16;

/// Where and how the journal is kept.
#[derive(Debug, Clone)]
pub struct DurableSettings {
    pub state: StateDir,
    /// 0 = at graceful stop only.
    pub checkpoint: Duration,
    /// Source addresses, in link order (the dedup window refers to links by index).
    pub subscriptions: Vec<String>,
    /// Restored pinned events stay pinned only when the mirror is required.
    pub mirror_required: bool,
}

/// What [`restore`] built.
#[derive(Debug)]
pub struct Restored {
    pub journal: Arc<Journal>,
    pub dedup: Arc<SharedDedup>,
    /// `None`: the state directory cannot be used; the journal lives in memory only.
    pub persistence: Option<Arc<Persistence>>,
}

/// Writes the snapshot and the lease; one write at a time.
#[derive(Debug)]
pub struct Persistence {
    settings: DurableSettings,
    journal: Arc<Journal>,
    dedup: Arc<SharedDedup>,
    metrics: Arc<Metrics>,
    scratch: Mutex<Scratch>,
}

/// Reused between writes (capacity fixed at start: the journal's and window's sizes).
#[derive(Debug)]
struct Scratch {
    last: Vec<Arc<EncodedEvent>>,
    events: Vec<(Arc<EncodedEvent>, bool)>,
    lost: Vec<(u64, u64)>,
    dedup: Vec<DedupRecord>,
    /// `Journal::changes` at the last snapshot written.
    written: Option<u64>,
    /// A failure streak is logged once.
    failing: bool,
}

/// Why the saved state was not used.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error("snapshot {0}")]
    Snapshot(SnapshotError),
    #[error("lease {0}")]
    Lease(SnapshotError),
    #[error("no seq lease for epoch {0}: cannot tell which seqs were issued")]
    NoLease(String),
}

/// Build the journal from the state directory (or a new one of `new_epoch`).
pub fn restore(
    settings: DurableSettings,
    limits: Limits,
    dedup_window: usize,
    new_epoch: String,
    metrics: Arc<Metrics>,
) -> Restored {
    let dedup = Arc::new(SharedDedup::new(Dedup::new(dedup_window)));
    let state = settings.state.clone();
    let restored = match load(&settings, limits, &dedup) {
        Ok(Some(j)) => Some(j),
        Ok(None) => None,
        Err((path, why)) => {
            let aside = match path.as_deref().map(|p| state.move_aside(p)) {
                Some(Ok(to)) => format!("; moved aside to {}", to.display()),
                Some(Err(e)) => format!("; could not move it aside: {e}"),
                None => String::new(),
            };
            log::warn!("journal: saved state not used ({why}){aside}; starting a new epoch");
            *lock(&dedup) = Dedup::new(dedup_window);
            None
        }
    };
    let journal = restored.unwrap_or_else(|| Journal::new(limits, new_epoch.clone()));
    let p = Arc::new(Persistence {
        scratch: Mutex::new(Scratch {
            last: Vec::with_capacity(limits.last_values),
            events: Vec::with_capacity(limits.events),
            lost: Vec::with_capacity(crate::journal::LOST_MAX),
            dedup: Vec::with_capacity(dedup_window),
            written: None,
            failing: false,
        }),
        settings,
        journal: journal.clone(),
        dedup: dedup.clone(),
        metrics: metrics.clone(),
    });
    metrics.journal_restored_events.set(journal.len() as u64);
    // No seq is issued before the lease covers it.
    let next = journal.next_seq();
    journal.set_reserved_until(next);
    let fresh = journal.epoch() == new_epoch;
    let leased = p.extend_lease().and_then(|()| {
        // A new epoch is on disk at once: a crash before the first checkpoint keeps it.
        if fresh {
            p.checkpoint(false).map(|_| ())
        } else {
            Ok(())
        }
    });
    match leased {
        Ok(()) => Restored {
            journal,
            dedup,
            persistence: Some(p),
        },
        Err(e) => {
            // The saved state cannot be kept consistent: run in memory, in an epoch no
            // file names (a stale snapshot restored later cannot collide with it).
            log::error!(
                "journal: state directory {} is not writable ({e}); keeping the journal in \
                 memory only, new epoch",
                state.dir().display()
            );
            metrics.journal_snapshot_errors.inc();
            metrics.journal_restored_events.set(0);
            let epoch = if journal.epoch() == new_epoch {
                crate::journal::new_epoch()
            } else {
                new_epoch
            };
            Restored {
                journal: Journal::new(limits, epoch),
                dedup: Arc::new(SharedDedup::new(Dedup::new(dedup_window))),
                persistence: None,
            }
        }
    }
}

fn lock(d: &SharedDedup) -> std::sync::MutexGuard<'_, Dedup> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

type LoadError = (Option<std::path::PathBuf>, Unusable);

/// Stream the snapshot into a journal. `Ok(None)`: there is none.
fn load(
    settings: &DurableSettings,
    limits: Limits,
    dedup: &SharedDedup,
) -> Result<Option<Arc<Journal>>, LoadError> {
    let snap = settings.state.snapshot();
    let lease_path = settings.state.lease();
    let bad = |e| (Some(snap.clone()), Unusable::Snapshot(e));
    let Some(mut reader) = Reader::open(&snap, limits.max_entry_bytes).map_err(bad)? else {
        return Ok(None);
    };
    let meta = match reader.next_record().map_err(bad)? {
        Some(Record::Meta(m)) => m,
        _ => {
            return Err(bad(SnapshotError::Truncated("no meta record first")));
        }
    };
    // Map the saved links to the configured ones by address.
    let links: Vec<Option<usize>> = meta
        .subscriptions
        .iter()
        .map(|a| settings.subscriptions.iter().position(|s| s == a))
        .collect();
    let journal = Journal::new(limits, meta.epoch.clone());
    let mut skipped = 0u64;
    while let Some(rec) = reader.next_record().map_err(bad)? {
        match rec {
            Record::Event { pinned, frame } => {
                let Some(ev) = EncodedEvent::from_postcard(frame) else {
                    return Err(bad(SnapshotError::Malformed {
                        record: 0,
                        reason: "an event record is not an event frame".into(),
                    }));
                };
                if journal
                    .restore(ev, pinned && settings.mirror_required)
                    .is_err()
                {
                    // Out of order or larger than this config allows: not kept.
                    skipped += 1;
                }
            }
            Record::LastValue(frame) => match EncodedEvent::from_postcard(frame) {
                Some(ev) if ev.heap_bytes() <= limits.max_entry_bytes => {
                    journal.restore_last_value(ev)
                }
                Some(_) => skipped += 1,
                None => {
                    return Err(bad(SnapshotError::Malformed {
                        record: 0,
                        reason: "a last-value record is not an event frame".into(),
                    }));
                }
            },
            Record::Dedup(d) => {
                if let Some(Some(link)) = links.get(d.subscription as usize) {
                    let key = DedupKey {
                        link: *link,
                        asb_seq: d.asb_seq,
                    };
                    lock(dedup).insert(key, d.fingerprint, d.seq);
                }
            }
            Record::Meta(_) | Record::Lease(_) => {
                return Err(bad(SnapshotError::Malformed {
                    record: 0,
                    reason: "a second header record".into(),
                }));
            }
        }
    }
    if skipped > 0 {
        log::warn!("journal: {skipped} saved event(s) do not fit this config; not restored");
    }
    // The lease says how far seqs may have been issued.
    let lease = match read_lease(&lease_path) {
        Ok(Some(l)) if l.epoch == meta.epoch && l.reserved_until >= meta.next_seq => l,
        Ok(_) => return Err((None, Unusable::NoLease(meta.epoch))),
        Err(e) => return Err((Some(lease_path), Unusable::Lease(e))),
    };
    let lost =
        (lease.reserved_until > meta.next_seq).then(|| (meta.next_seq, lease.reserved_until - 1));
    journal.resume_at(lease.reserved_until, meta.lost.iter().copied().chain(lost));
    let how = match lost {
        None => "clean".to_string(),
        Some((from, to)) => format!("unclean stop: seqs {from}..={to} lost"),
    };
    log::info!(
        "journal: restored {} event(s) of epoch {} from {} ({how}); next seq {}",
        journal.len(),
        meta.epoch,
        snap.display(),
        journal.next_seq()
    );
    Ok(Some(journal))
}

impl Persistence {
    pub fn settings(&self) -> &DurableSettings {
        &self.settings
    }

    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Extend the lease when less than half of the reserved seqs are left.
    pub fn lease_due(&self) -> bool {
        let bound = self.journal.reserved_until();
        bound == u64::MAX || bound < self.journal.next_seq() + RESERVE_SEQS / 2
    }

    /// Reserve seqs ahead: the lease is written before the journal may use them.
    /// On failure the saved state is removed so that a crash cannot restore it; if that
    /// fails too, the journal keeps its bound (ingest pauses when it is reached).
    pub fn extend_lease(&self) -> Result<(), SnapshotError> {
        let mut s = self.scratch();
        let bound = self.journal.reserved_until();
        let mut target = self.journal.next_seq() + RESERVE_SEQS;
        if bound == u64::MAX {
            // Memory only since a failure: bind the journal before anything is on disk.
            self.journal.set_reserved_until(target);
        } else {
            target = target.max(bound);
        }
        let lease = Lease {
            epoch: self.journal.epoch().to_string(),
            reserved_until: target,
        };
        match write_lease(&self.settings.state.lease(), &lease) {
            Ok(_) => {
                self.journal.set_reserved_until(target);
                if std::mem::take(&mut s.failing) {
                    log::info!("journal: state directory writable again");
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.journal_snapshot_errors.inc();
                let removed = remove(&self.settings.state.snapshot())
                    .and_then(|()| remove(&self.settings.state.lease()));
                if !std::mem::replace(&mut s.failing, true) {
                    match &removed {
                        Ok(()) => log::error!(
                            "journal: cannot extend the seq lease ({e}); saved state removed, \
                             the journal is in memory only until a write succeeds"
                        ),
                        Err(r) => log::error!(
                            "journal: cannot extend the seq lease ({e}) nor remove the saved \
                             state ({r}); ingest pauses at seq {bound} until the state \
                             directory is writable"
                        ),
                    }
                }
                if removed.is_ok() {
                    // Nothing on disk names this epoch's seqs: no bound is needed.
                    self.journal.set_reserved_until(u64::MAX);
                    s.written = None;
                }
                Err(e)
            }
        }
    }

    /// Write the snapshot: at graceful stop (`clean`: always, then a lease equal to its
    /// next seq) or as a checkpoint (only when something changed). Errors are logged and
    /// counted by the caller's choice; returns whether a snapshot was written.
    pub fn checkpoint(&self, clean: bool) -> Result<bool, SnapshotError> {
        if !clean && self.journal.reserved_until() == u64::MAX {
            // Memory only after a lease failure: try to get the lease back first.
            self.extend_lease()?;
        }
        let mut guard = self.scratch();
        let s = &mut *guard;
        let changes = self.journal.changes();
        if !clean && s.written == Some(changes) {
            return Ok(false);
        }
        let started = Instant::now();
        s.last.clear();
        s.events.clear();
        s.lost.clear();
        s.dedup.clear();
        let next_seq = self
            .journal
            .snapshot_view(&mut s.last, &mut s.events, &mut s.lost);
        s.dedup
            .extend(lock(&self.dedup).entries().filter_map(|(k, fp, seq)| {
                Some(DedupRecord {
                    subscription: u32::try_from(k.link).ok()?,
                    asb_seq: k.asb_seq,
                    fingerprint: fp,
                    seq,
                })
            }));
        let meta = Meta {
            epoch: self.journal.epoch().to_string(),
            next_seq,
            clean,
            written_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            lost: s.lost.clone(),
            subscriptions: self.settings.subscriptions.clone(),
        };
        let result = (|| {
            let mut w = Writer::create(&self.settings.state.snapshot())?;
            w.meta(&meta)?;
            for ev in &s.last {
                w.last_value(&ev.postcard)?;
            }
            for (ev, pinned) in &s.events {
                w.event(*pinned, &ev.postcard)?;
            }
            for d in &s.dedup {
                w.dedup(d)?;
            }
            let bytes = w.commit()?;
            if clean {
                write_lease(
                    &self.settings.state.lease(),
                    &Lease {
                        epoch: meta.epoch.clone(),
                        reserved_until: next_seq,
                    },
                )?;
            }
            Ok(bytes)
        })();
        // Drop the shared events now: they may be evicted from the journal meanwhile.
        s.last.clear();
        s.events.clear();
        match result {
            Ok(bytes) => {
                s.written = Some(changes);
                self.metrics.journal_snapshot_bytes.set(bytes);
                self.metrics.journal_snapshot_seconds.set(started.elapsed());
                if std::mem::take(&mut s.failing) {
                    log::info!("journal: snapshot written again");
                }
                Ok(true)
            }
            Err(e) => {
                self.metrics.journal_snapshot_errors.inc();
                if !std::mem::replace(&mut s.failing, true) {
                    log::error!("journal: snapshot not written: {e}");
                }
                Err(e)
            }
        }
    }
}

fn remove(path: &Path) -> Result<(), io::Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The checkpoint task: a snapshot every `checkpoint` when something changed, and the
/// lease extended whenever it is due. Each write runs on the blocking pool, one at a
/// time; a failed write is retried at the next tick, never in a loop.
pub async fn checkpoints(p: Arc<Persistence>, mut shutdown: Shutdown) {
    let period = p.settings.checkpoint;
    let mut latest = p.journal.subscribe();
    let mut tick = tokio::time::interval(if period.is_zero() {
        Duration::from_secs(3600)
    } else {
        period
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // After a failed lease write, wait before the next attempt.
    let mut lease_retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {
                if period.is_zero() {
                    continue;
                }
                let p = p.clone();
                let _ = tokio::task::spawn_blocking(move || p.checkpoint(false)).await;
            }
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
                if !p.lease_due() || lease_retry_at.is_some_and(|t| t > tokio::time::Instant::now()) {
                    continue;
                }
                let q = p.clone();
                let ok = tokio::task::spawn_blocking(move || q.extend_lease().is_ok()).await;
                lease_retry_at = match ok {
                    Ok(true) => None,
                    _ => Some(tokio::time::Instant::now() + Duration::from_secs(5)),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventMeta, Topic, max_entry_bytes};

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "asbgw-durable-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn settings(d: &Path) -> DurableSettings {
        DurableSettings {
            state: StateDir::new(d),
            checkpoint: Duration::from_secs(30),
            subscriptions: vec!["t/Subscriptions/s".into()],
            mirror_required: true,
        }
    }

    fn limits(events: usize) -> Limits {
        Limits {
            events,
            bytes: 1 << 20,
            max_entry_bytes: max_entry_bytes(256),
            last_values: 16,
            last_values_bytes: 1 << 20,
        }
    }

    fn start(d: &Path, events: usize) -> Restored {
        restore(
            settings(d),
            limits(events),
            64,
            crate::journal::new_epoch(),
            Arc::new(Metrics::default()),
        )
    }

    fn append(j: &Journal, body: &str, pinned: bool) -> u64 {
        let m = EventMeta {
            message_id: Some(crate::event::IdString::try_from(body).unwrap()),
            ..Default::default()
        };
        let ev = EncodedEvent::encode(
            j.next_seq(),
            &Topic::try_from("t").unwrap(),
            &m,
            body.as_bytes(),
        );
        j.append(ev, pinned).unwrap()
    }

    fn append_on(j: &Journal, topic: &str, body: &str) -> u64 {
        let ev = EncodedEvent::encode(
            j.next_seq(),
            &Topic::try_from(topic).unwrap(),
            &EventMeta::default(),
            body.as_bytes(),
        );
        j.append(ev, false).unwrap()
    }

    fn last_values(j: &Journal) -> Vec<(String, u64, bytes::Bytes)> {
        let mut out = Vec::new();
        j.last_values_page(0, u64::MAX, |_| true, &mut out, usize::MAX);
        out.iter()
            .map(|e| (e.topic.to_string(), e.seq, e.body()))
            .collect()
    }

    #[test]
    fn last_values_survive_a_restart_also_those_the_journal_no_longer_holds() {
        let d = dir("last");
        let r = start(&d, 4);
        append_on(&r.journal, "line3/state", "stopped");
        append_on(&r.journal, "line2/state", "idle");
        for i in 0..10 {
            append_on(&r.journal, "line1/temp", &format!("{i}"));
        }
        assert_eq!(r.journal.oldest(), 9, "the states are only in the table");
        let before = last_values(&r.journal);
        assert_eq!(
            before
                .iter()
                .map(|(t, s, _)| (t.as_str(), *s))
                .collect::<Vec<_>>(),
            [("line3/state", 1), ("line2/state", 2), ("line1/temp", 12)]
        );
        // a checkpoint (not only a clean stop) carries them, then a crash
        assert!(r.persistence.as_ref().unwrap().checkpoint(false).unwrap());
        drop(r);
        let r = start(&d, 4);
        assert_eq!(last_values(&r.journal), before);
        assert_eq!(r.journal.last_value_stats().topics, 3);
        assert!(r.journal.last_value_stats().outside_bytes > 0);
        // and they keep working: a new value replaces the restored one
        let s = append_on(&r.journal, "line3/state", "running");
        assert_eq!(
            last_values(&r.journal)[2],
            ("line3/state".into(), s, "running".into())
        );
    }

    #[test]
    fn clean_stop_continues_the_epoch_and_seq() {
        let d = dir("clean");
        let r = start(&d, 8);
        let epoch = r.journal.epoch().to_string();
        for i in 0..5 {
            append(&r.journal, &format!("m{i}"), i == 4);
        }
        lock(&r.dedup).insert(
            DedupKey {
                link: 0,
                asb_seq: 7,
            },
            9,
            5,
        );
        assert!(r.persistence.as_ref().unwrap().checkpoint(true).unwrap());
        drop(r);
        let r = start(&d, 8);
        assert_eq!(r.journal.epoch(), epoch);
        assert_eq!((r.journal.oldest(), r.journal.latest()), (1, 5));
        assert!(r.journal.is_pinned(5) && !r.journal.is_pinned(4));
        assert_eq!(r.journal.first_unhanded(), 5);
        assert_eq!(
            lock(&r.dedup).get(
                DedupKey {
                    link: 0,
                    asb_seq: 7
                },
                9
            ),
            Some(5)
        );
        let mut cur = 4;
        let mut out = Vec::new();
        assert_eq!(r.journal.read(&mut cur, &mut out, 10), None);
        assert_eq!(out.len(), 2);
        assert_eq!(r.journal.get(3).unwrap().json, {
            let m = EventMeta {
                message_id: Some(crate::event::IdString::try_from("m2").unwrap()),
                ..Default::default()
            };
            EncodedEvent::encode(3, &Topic::try_from("t").unwrap(), &m, b"m2").json
        });
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn crash_skips_the_reserved_range_as_lost() {
        let d = dir("crash");
        let r = start(&d, 4);
        let epoch = r.journal.epoch().to_string();
        for i in 0..3 {
            append(&r.journal, &format!("m{i}"), false);
        }
        r.persistence.as_ref().unwrap().checkpoint(false).unwrap();
        append(&r.journal, "after", false);
        drop(r); // a crash: no clean snapshot
        let r = start(&d, 2); // smaller journal: keeps the newest
        assert_eq!(r.journal.epoch(), epoch);
        assert_eq!(r.journal.oldest(), 2);
        let next = r.journal.next_seq();
        assert_eq!(next, 1 + RESERVE_SEQS);
        let mut cur = 4;
        let mut out = Vec::new();
        let gap = r.journal.read(&mut cur, &mut out, 10).unwrap();
        assert_eq!(
            (gap.from, gap.to, gap.kind),
            (4, next - 1, crate::journal::GapKind::Lost)
        );
        assert!(r.journal.is_lost(4, next - 1));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_state_dir_that_cannot_be_written_is_counted_and_recovered_from() {
        let d = dir("fail");
        let r = start(&d, 4);
        let p = r.persistence.clone().unwrap();
        append(&r.journal, "a", false);
        p.checkpoint(false).unwrap();
        // The lease cannot be written (a non-empty directory took its temporary name;
        // a full disk fails the same step).
        let lease = d.join("journal.lease.tmp");
        std::fs::create_dir(&lease).unwrap();
        std::fs::write(lease.join("x"), b"x").unwrap();
        assert!(p.extend_lease().is_err());
        assert_eq!(p.metrics.journal_snapshot_errors.get(), 1);
        assert!(!d.join("journal.lease").exists());
        // the saved state is gone (a crash now starts a new epoch) and ingest goes on
        assert!(!d.join("journal.snap").exists());
        assert_eq!(r.journal.reserved_until(), u64::MAX);
        assert!(r.journal.room() > 0);
        append(&r.journal, "b", false);
        // a checkpoint keeps failing (retried at the next tick, never in a loop)...
        assert!(p.checkpoint(false).is_err());
        assert_eq!(p.metrics.journal_snapshot_errors.get(), 2);
        // ...until the directory is writable again: lease first, then the snapshot
        std::fs::remove_dir_all(&lease).unwrap();
        assert!(p.checkpoint(false).unwrap());
        assert_eq!(
            r.journal.reserved_until(),
            r.journal.next_seq() + RESERVE_SEQS
        );
        let epoch = r.journal.epoch().to_string();
        drop((r, p));
        let r = start(&d, 4);
        assert_eq!(r.journal.epoch(), epoch);
        assert_eq!(r.journal.len(), 2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn damaged_state_is_moved_aside_and_a_new_epoch_starts() {
        let d = dir("bad");
        let r = start(&d, 4);
        let epoch = r.journal.epoch().to_string();
        append(&r.journal, "a", false);
        r.persistence.as_ref().unwrap().checkpoint(true).unwrap();
        drop(r);
        let snap = d.join("journal.snap");
        let mut b = std::fs::read(&snap).unwrap();
        let n = b.len();
        b[n - 20] ^= 4;
        std::fs::write(&snap, b).unwrap();
        let r = start(&d, 4);
        assert_ne!(r.journal.epoch(), epoch);
        assert!(r.journal.is_empty());
        let aside: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.snap.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }
}
