//! Property test: random sequences of append / read / hand-on keep the journal's
//! invariants — seq strictly increasing, no reader sees an event twice or out of order,
//! gaps reported exactly (seen + missed = everything before the cursor), pinned events
//! never overwritten, and the fixed limits never exceeded.

use std::collections::BTreeSet;
use std::sync::Arc;

use asb_gateway::event::{EncodedEvent, EventMeta, Topic, max_entry_bytes};
use asb_gateway::journal::{Journal, JournalError, Limits};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append { pinned: bool, size: usize },
    Read { reader: usize, max: usize },
    HandOn { back: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0usize..600).prop_map(|(pinned, size)| Op::Append { pinned, size }),
        3 => (0usize..3, 1usize..12).prop_map(|(reader, max)| Op::Read { reader, max }),
        2 => (0u64..20).prop_map(|back| Op::HandOn { back }),
    ]
}

struct Reader {
    cursor: u64,
    seen: Vec<u64>,
    missed: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn journal_invariants(events in 1usize..16, kib in 2usize..12, ops in proptest::collection::vec(op(), 1..300)) {
        let limits = Limits { events, bytes: kib * 1024, max_entry_bytes: max_entry_bytes(600).min(kib * 1024), last_values: 4, last_values_bytes: 4096 };
        let j = Journal::new(limits, "p".into());
        let topic = Topic::try_from("t").unwrap();
        let mut readers: Vec<Reader> = (0..3).map(|_| Reader { cursor: 1, seen: vec![], missed: 0 }).collect();
        let mut pinned: BTreeSet<u64> = BTreeSet::new();
        let mut last_seq = 0u64;
        for op in ops {
            match op {
                Op::Append { pinned: pin, size } => {
                    let seq = j.next_seq();
                    prop_assert_eq!(seq, last_seq + 1);
                    let room = j.room();
                    let ev = EncodedEvent::encode(seq, &topic, &EventMeta::default(), &vec![b'x'; size]);
                    let bytes = ev.heap_bytes();
                    match j.append(ev, pin) {
                        Ok(s) => {
                            prop_assert_eq!(s, seq);
                            last_seq = s;
                            if pin { pinned.insert(s); }
                        }
                        Err(JournalError::Full) => prop_assert_eq!(room, 0, "room() promised space"),
                        Err(JournalError::TooLarge { .. }) => prop_assert!(bytes > limits.bytes.min(limits.max_entry_bytes)),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Read { reader, max } => {
                    let r = &mut readers[reader];
                    let before = r.cursor;
                    let mut out: Vec<Arc<EncodedEvent>> = Vec::new();
                    let gap = j.read(&mut r.cursor, &mut out, max);
                    let mut expect_next = before;
                    if let Some(g) = gap {
                        prop_assert_eq!(g.from, before);
                        prop_assert!(g.to >= g.from);
                        r.missed += g.missed();
                        expect_next = g.to + 1;
                    }
                    prop_assert!(out.len() <= max);
                    for e in &out {
                        prop_assert_eq!(e.seq, expect_next, "out of order or duplicate");
                        expect_next += 1;
                        r.seen.push(e.seq);
                    }
                    prop_assert_eq!(r.cursor, expect_next);
                    prop_assert_eq!(r.seen.len() as u64 + r.missed, r.cursor - 1);
                }
                Op::HandOn { back } => {
                    let seq = last_seq.saturating_sub(back);
                    let was = pinned.remove(&seq);
                    prop_assert_eq!(j.handed_on(seq), was);
                }
            }
            // pinned events are never overwritten; limits hold
            for s in &pinned {
                prop_assert!(j.get(*s).is_some(), "pinned {} was evicted", s);
            }
            prop_assert_eq!(j.pinned(), pinned.len());
            prop_assert!(j.len() <= limits.events);
            prop_assert!(j.bytes() <= limits.bytes);
            prop_assert_eq!(j.latest(), last_seq);
        }
        for r in &readers {
            prop_assert!(r.seen.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
