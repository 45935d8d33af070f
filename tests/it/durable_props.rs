//! Property test: random sequences of append / hand-on / read / checkpoint / crash /
//! graceful stop + restore, on a real state directory, keep the journal's invariants
//! across restarts — the epoch survives, seqs strictly increase and are never reissued
//! (a crash skips the reserved range), a graceful stop loses nothing, a resuming reader
//! gets every seq as an event or inside a gap, and no seq names two different events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use asb_gateway::durable::{self, DurableSettings, Restored};
use asb_gateway::event::{EncodedEvent, EventMeta, IdString, Topic, max_entry_bytes};
use asb_gateway::journal::snapshot::StateDir;
use asb_gateway::journal::{GapKind, Limits};
use asb_gateway::metrics::Metrics;
use proptest::prelude::*;

use crate::support::TempDir;

#[derive(Debug, Clone)]
enum Op {
    Append { pinned: bool },
    HandOn { back: u64 },
    Read { max: usize },
    Checkpoint,
    Crash,
    Stop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<bool>().prop_map(|pinned| Op::Append { pinned }),
        2 => (0u64..8).prop_map(|back| Op::HandOn { back }),
        3 => (1usize..6).prop_map(|max| Op::Read { max }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
        1 => Just(Op::Stop),
    ]
}

fn open(dir: &std::path::Path, limits: Limits) -> Restored {
    durable::restore(
        DurableSettings {
            state: StateDir::new(dir),
            checkpoint: Duration::from_secs(30),
            subscriptions: vec!["t/Subscriptions/s".into()],
            mirror_required: true,
        },
        limits,
        16,
        asb_gateway::journal::new_epoch(),
        Arc::new(Metrics::default()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn restarts_keep_the_journal_invariants(events in 1usize..10, ops in proptest::collection::vec(op(), 1..60)) {
        let dir = TempDir::new("durable-props");
        let limits = Limits { events, bytes: 1 << 20, max_entry_bytes: max_entry_bytes(64), last_values: 4, last_values_bytes: 4096 };
        let topic = Topic::try_from("t").unwrap();
        let mut r = open(dir.path(), limits);
        let epoch = r.journal.epoch().to_string();
        // every seq ever issued in the epoch -> the id of its event
        let mut issued: BTreeMap<u64, String> = BTreeMap::new();
        let mut cursor = 1u64;
        let mut n = 0u64;
        for op in ops {
            let j = r.journal.clone();
            let p = r.persistence.clone().expect("the state directory works");
            match op {
                Op::Append { pinned } => {
                    if j.room() == 0 {
                        continue; // the source grants no credit
                    }
                    let seq = j.next_seq();
                    if let Some((&last, _)) = issued.last_key_value() {
                        prop_assert!(seq > last, "seq {seq} after {last}");
                    }
                    n += 1;
                    let id = format!("m{n}");
                    let meta = EventMeta { message_id: Some(IdString::try_from(id.as_str()).unwrap()), ..Default::default() };
                    let got = j.append(EncodedEvent::encode(seq, &topic, &meta, id.as_bytes()), pinned);
                    prop_assert_eq!(got, Ok(seq));
                    prop_assert!(issued.insert(seq, id).is_none(), "seq {} reused", seq);
                    if p.lease_due() {
                        p.extend_lease().unwrap();
                    }
                }
                Op::HandOn { back } => {
                    let _ = j.handed_on(j.latest().saturating_sub(back));
                }
                Op::Read { max } => {
                    let mut out = Vec::new();
                    let before = cursor;
                    let gap = j.read(&mut cursor, &mut out, max);
                    let mut at = before;
                    if let Some(g) = gap {
                        prop_assert_eq!(g.from, before);
                        prop_assert!(g.to >= g.from);
                        if g.kind == GapKind::Overwritten {
                            prop_assert!(g.to < j.oldest());
                        }
                        at = g.to + 1;
                    }
                    for ev in &out {
                        prop_assert_eq!(ev.seq, at, "events follow the gap without a hole");
                        let want = issued.get(&ev.seq).cloned();
                        prop_assert_eq!(ev.frame().unwrap().message_id.map(str::to_string), want);
                        at += 1;
                    }
                    prop_assert_eq!(cursor, at);
                }
                Op::Checkpoint => {
                    p.checkpoint(false).unwrap();
                }
                Op::Crash | Op::Stop => {
                    let clean = matches!(op, Op::Stop);
                    let next_before = j.next_seq();
                    if clean {
                        p.checkpoint(true).unwrap();
                    }
                    drop((j, p));
                    drop(r);
                    r = open(dir.path(), limits);
                    let j = &r.journal;
                    prop_assert_eq!(j.epoch(), epoch.as_str(), "the epoch survives");
                    if clean {
                        prop_assert_eq!(j.next_seq(), next_before, "a graceful stop loses nothing");
                    } else {
                        prop_assert!(j.next_seq() >= next_before, "a crash never goes back");
                    }
                    // every retained event is the one issued under its seq
                    let mut c = j.oldest();
                    let mut out = Vec::new();
                    while c < j.next_seq() {
                        let _ = j.read(&mut c, &mut out, 64);
                    }
                    for ev in &out {
                        let want = issued.get(&ev.seq).cloned();
                        prop_assert_eq!(ev.frame().unwrap().message_id.map(str::to_string), want);
                    }
                    prop_assert!(cursor <= j.next_seq());
                }
            }
        }
    }
}
