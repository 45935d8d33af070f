//! The static memory budget: the worst case of every fixed-capacity buffer, computed from
//! the config, line by line. `check-config` prints it; `run` refuses a config whose total
//! exceeds `budget.memory_mib`.

use crate::config::Config;

/// Wire bytes of events a panel session queues for its socket before it flushes and
/// stops reading the journal (one larger event is queued on its own). The events are
/// the journal's shared bytes, queued by reference, not a copy: they cost memory of
/// their own only once the journal has evicted them, and that is counted in the shared
/// pool ([`held_pool_bytes`]), not per panel. 32 KiB, not 16: with 4 KiB events a
/// 16 KiB queue flushed 3 frames at a time and delivered 10–30% less at saturation.
pub const PANEL_WRITE_BUFFER: usize = 32 * 1024;
/// Frames a panel session queues for its socket before it flushes: with
/// [`PANEL_WRITE_BUFFER`], what one flush (one vectored write when the socket takes it)
/// sends at most.
pub const PANEL_WRITE_FRAMES: usize = 32;
/// Frames past [`PANEL_WRITE_FRAMES`] below which a panel's input is still read, so a
/// panel that is behind — its queue refilled with events after every flush — still gets
/// its pongs and its ops handled at once. 5: its room for control frames
/// ([`CONTROL_READ`]) stops reading after two of the largest anyway.
pub const PANEL_READ_HEADROOM: usize = 5;
/// Entries a panel's frame queue has room for of its own (no grant held): input is read
/// while fewer than `PANEL_WRITE_FRAMES + PANEL_READ_HEADROOM` frames are queued, a
/// client's control frame adds one reply, then our close may follow (a pump, which runs
/// only once the queue is written, stays within [`PANEL_WRITE_FRAMES`] and a gap and a
/// `synced` frame). One entry to spare; a debug build checks it.
pub const PANEL_QUEUE_OWN: usize = PANEL_WRITE_FRAMES + PANEL_READ_HEADROOM + 2;
/// Entries the queue may grow to while a grant ([`INPUT_GRANT`]) pays for an op's
/// replies (at most `MAX_FILTERS + 2` frames: the errors of an op's 8 filters, or a
/// start's hello, 8 errors and a gap).
pub const PANEL_QUEUE_MAX: usize = PANEL_QUEUE_OWN + MAX_FILTERS + 2;
/// Bytes per queued frame: a reference to the shared payload, the payload's mark
/// ([`crate::held::Mark`]), the opcode and a 2-byte prefix (the header is formatted
/// when the frame is written).
pub const PANEL_QUEUE_ENTRY: usize = 48;
/// Panels whose whole queue of evicted events the shared pool holds at once
/// ([`held_pool_bytes`]); beyond it, a panel whose unsent events are evicted is closed.
pub const HELD_POOL_PANELS: usize = 32;
/// The largest control frame a panel queues of its own, with its allocation: a pong
/// (the ping's payload, at most 125 B, §5.5), a close, a ping, a `gap` or a `synced`
/// frame (under 100 B with 20-digit seqs), each a 2-byte header, at most 125 B of
/// payload and 32 B for its allocation (`panels::socket`).
pub const OWN_CONTROL_FRAME: usize = 2 + 125 + 32;
/// A panel's input is read only while less than this is queued of its control frames:
/// room for two of the largest.
pub const CONTROL_READ: usize = 2 * OWN_CONTROL_FRAME;
/// Control frames a panel may have queued of its own (no grant held), in bytes. The most
/// it reaches: just under [`CONTROL_READ`], then the reply to one client frame and our
/// close; or, after a pump (which runs once the queue is written), one reply, a gap, a
/// `synced` frame and our close. Each at most [`OWN_CONTROL_FRAME`].
pub const CONTROL_OWN: usize = CONTROL_READ + 2 * OWN_CONTROL_FRAME;
const _: () = assert!(CONTROL_READ - 1 + 2 * OWN_CONTROL_FRAME <= CONTROL_OWN);
const _: () = assert!(4 * OWN_CONTROL_FRAME <= CONTROL_OWN);
/// Room for the replies to one op, or to a panel's start (hello with 8 filters, errors
/// at most `MAX_FILTERS + 2` frames of under 400 B: filters are at most 256 bytes and
/// errors show 64 characters of them). Paid by a grant ([`INPUT_GRANT`]).
pub const CONTROL_ROOM: usize = 8192;
/// Largest WebSocket frame header the server writes (unmasked, 64-bit length).
pub const FRAME_HEADER: usize = 10;
/// One share of the panels' input pool (`panels::inbound`): the buffer of one client
/// message ([`MAX_CLIENT_FRAME`]), the replies to it ([`CONTROL_ROOM`]) and the queue
/// entries past [`PANEL_QUEUE_OWN`] they take.
pub const INPUT_GRANT: usize =
    MAX_CLIENT_FRAME + CONTROL_ROOM + (PANEL_QUEUE_MAX - PANEL_QUEUE_OWN) * PANEL_QUEUE_ENTRY;
/// Grants in the input pool: panels that may read an op (or start) at once; the others
/// wait their turn, their sockets unread.
pub const INPUT_GRANTS: usize = 32;
/// Per-panel state besides buffers and filters: the task (cursor, the client-frame
/// reader's header and control-frame bytes), the socket and its registration, the
/// connection's slot. Measured at 2,864 B in a dev build (`tests/mem_panels.rs`; the
/// task's future alone is 2,136 B of it).
pub const PANEL_TASK: usize = 3 * 1024;
/// Per-panel state: [`PANEL_TASK`], [`MAX_FILTERS`] filters of the longest length, and
/// the `Origin` and `Host` it keeps ([`PANEL_ADMISSION`]). `tests/mem_panels.rs` holds
/// a panel with all of them within it.
pub const PANEL_STATE: usize =
    PANEL_TASK + MAX_FILTERS * std::mem::size_of::<crate::routing::Filter>() + PANEL_ADMISSION;
/// Bytes of `Origin` lines and `Host` a panel keeps to check them again after a reload
/// (part of [`PANEL_STATE`]); a request with more gets 431.
pub const PANEL_ADMISSION: usize = 512;
/// `SO_SNDBUF` asked for each panel socket (the kernel doubles it for bookkeeping).
pub const PANEL_SNDBUF: usize = 8 * 1024;
/// Most filters one panel may hold.
pub const MAX_FILTERS: usize = 8;
/// Largest inbound panel frame.
pub const MAX_CLIENT_FRAME: usize = 4 * 1024;
/// Per-journal-slot index overhead.
pub const JOURNAL_SLOT: usize = 16;
/// Per entry of the source's duplicate-suppression window (`journal.events` entries,
/// `source::tracker::Dedup`): the key in its order queue (16 B) and the key and value
/// in its hash map (32 B, plus a control byte), whose table is a power of two at most
/// 7/8 full, so up to 2.3 slots per entry: 16 + 2.3 × 33 ≈ 92 B.
pub const DEDUP_ENTRY: usize = 96;
/// Executable, runtime, allocator and thread stacks in use: a measured ceiling.
pub const RUNTIME_BASE: usize = 8 << 20;
/// Per AMQP link: decode buffers and the tracker entry of each unsettled delivery.
pub const AMQP_LINK: usize = 64 * 1024;
pub const TRACKER_ENTRY: usize = 256;
/// Unsent TLS data rustls may hold per panel (`set_buffer_limit`).
pub const PANEL_TLS_SEND_LIMIT: usize = 16 * 1024;
/// Per panel with TLS: the send limit plus one record beyond it, the largest incoming
/// record (16 KiB + header and tag) and the session state.
pub const PANEL_TLS: usize = PANEL_TLS_SEND_LIMIT + 2 * (16 * 1024 + 256) + 4 * 1024;
/// Source addresses the panel port's brute-force table tracks (`panels::throttle`).
pub const AUTH_THROTTLE_ENTRIES: usize = 1024;
/// Bytes per tracked address (key, entry, hash table slack).
pub const AUTH_THROTTLE_ENTRY: usize = 128;
/// Per journal event while a snapshot is written: the shared view (`Arc` + pinned flag)
/// and the exported duplicate-suppression entry.
pub const SNAPSHOT_ENTRY: usize = 48;

/// The most a panel's write side holds of its own, in bytes: its frame queue's entries
/// and control frames. The events it queues are the journal's (or, once evicted, the
/// shared pool's: [`held_pool_bytes`]); an op's replies are its grant's
/// ([`input_pool_bytes`]).
pub const fn panel_write_capacity() -> usize {
    PANEL_QUEUE_OWN * PANEL_QUEUE_ENTRY + CONTROL_OWN
}

/// The most one panel holds of its own, in bytes: [`panel_write_capacity`] and
/// [`PANEL_STATE`] (the kernel's socket buffers are a line of their own).
pub const fn panel_bytes() -> usize {
    panel_write_capacity() + PANEL_STATE
}
// Issue 18: a panel's worst case, besides the kernel's socket buffers, is at most 8 KiB.
const _: () = assert!(panel_bytes() <= 8 * 1024);

/// The panels' input pool: [`INPUT_GRANTS`] (or `max_panels`, if fewer) grants of
/// [`INPUT_GRANT`] bytes.
pub fn input_pool_bytes(max_panels: usize) -> usize {
    max_panels.min(INPUT_GRANTS) * INPUT_GRANT
}

/// Bytes of events one panel can have queued: [`PANEL_WRITE_BUFFER`], or one larger
/// event frame.
pub fn queued_event_bytes(max_event_bytes: usize) -> usize {
    PANEL_WRITE_BUFFER.max(crate::event::max_frame_bytes(max_event_bytes) + FRAME_HEADER)
}

/// The shared pool of evicted frames ([`crate::held`]): bytes of events panels may still
/// hold after the journal evicted them, enough for [`HELD_POOL_PANELS`] (or
/// `max_panels`, if fewer) stalled panels with full queues.
pub fn held_pool_bytes(max_panels: usize, max_event_bytes: usize) -> usize {
    held_pool_for(max_panels, queued_event_bytes(max_event_bytes))
}

/// [`held_pool_bytes`] from one panel's [`queued_event_bytes`].
pub fn held_pool_for(max_panels: usize, queued_event_bytes: usize) -> usize {
    max_panels.min(HELD_POOL_PANELS) * queued_event_bytes
}

/// Evicted events panels may hold before they next pay for them: the journal announces
/// evictions once an eighth of its bytes (`journal.memory_mib`) was evicted, or an
/// eighth of its events, and one append evicts at most one largest entry (`entry`,
/// bytes) past that.
pub fn unpaid_evicted_bytes(journal_memory_mib: usize, entry: usize) -> usize {
    (journal_memory_mib << 20) / 8 + entry
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub item: &'static str,
    pub detail: String,
    pub bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub lines: Vec<Line>,
    pub limit_bytes: usize,
}

impl Budget {
    pub fn total(&self) -> usize {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    pub fn fits(&self) -> bool {
        self.total() <= self.limit_bytes
    }

    /// What to do about a budget that does not fit: the smallest `budget.memory_mib`
    /// that would, and the largest line (what to lower instead). Empty when it fits.
    pub fn advice(&self) -> String {
        if self.fits() {
            return String::new();
        }
        let need = self.total().div_ceil(1 << 20);
        let largest = self.lines.iter().max_by_key(|l| l.bytes);
        format!(
            "the worst case is {}, over budget.memory_mib ({}): set budget.memory_mib = {need} \
             or more (and the unit's MemoryMax with it), or lower the largest line{}",
            mib(self.total()),
            mib(self.limit_bytes),
            largest.map_or(String::new(), |l| format!(", {}: {}", l.item, l.detail))
        )
    }

    /// The budget as a table.
    pub fn render(&self) -> String {
        let mut s = String::from("memory budget (worst case)\n");
        for l in &self.lines {
            s += &format!("  {:<28} {:>10}  {}\n", l.item, mib(l.bytes), l.detail);
        }
        s += &format!("  {:<28} {:>10}\n", "total", mib(self.total()));
        s += &format!(
            "  {:<28} {:>10}  {}\n",
            "budget.memory_mib",
            mib(self.limit_bytes),
            if self.fits() { "ok" } else { "EXCEEDED" }
        );
        s
    }
}

fn mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

/// The worst-case memory this config can use.
pub fn compute(c: &Config) -> Budget {
    let j = &c.journal;
    let entry = crate::event::max_entry_bytes(j.max_event_bytes);
    let links = c.source.subscriptions.len();
    let panel_write = panel_write_capacity();
    let frame = crate::event::max_frame_bytes(j.max_event_bytes);
    let mut lines = vec![
        Line {
            item: "journal index",
            detail: format!("{} events x {} B", j.events, JOURNAL_SLOT),
            bytes: j.events * JOURNAL_SLOT,
        },
        Line {
            item: "duplicate window",
            detail: format!("{} recent deliveries x {} B", j.events, DEDUP_ENTRY),
            bytes: j.events * DEDUP_ENTRY,
        },
        Line {
            item: "journal frames",
            detail: format!(
                "journal.memory_mib; one event encodes to {} B at most",
                entry
            ),
            bytes: j.memory_mib << 20,
        },
        Line {
            item: "amqp receive window",
            detail: format!(
                "{} unsettled x {} B body + {} link(s) x {} B",
                j.unsettled, j.max_event_bytes, links, AMQP_LINK
            ),
            bytes: j.unsettled * (j.max_event_bytes + TRACKER_ENTRY) + links * AMQP_LINK,
        },
        Line {
            item: "panel sessions",
            detail: format!(
                "{} panels x ({} B write (frame queue, control frames) + {} B state)",
                c.panels.max_panels, panel_write, PANEL_STATE
            ),
            bytes: c.panels.max_panels * panel_bytes(),
        },
        Line {
            item: "panel input",
            detail: format!(
                "pool: {} panels' ops read at once x {} B ({} B message, {} B of replies and their queue entries); the others wait",
                c.panels.max_panels.min(INPUT_GRANTS),
                INPUT_GRANT,
                MAX_CLIENT_FRAME,
                INPUT_GRANT - MAX_CLIENT_FRAME
            ),
            bytes: input_pool_bytes(c.panels.max_panels),
        },
        Line {
            item: "evicted panel frames",
            detail: format!(
                "pool: {} stalled panels x {} B of queued events the journal evicted (a panel that cannot pay is closed) + {} B evicted between two checks (1/8 of journal.memory_mib and one event)",
                c.panels.max_panels.min(HELD_POOL_PANELS),
                queued_event_bytes(j.max_event_bytes),
                unpaid_evicted_bytes(j.memory_mib, entry)
            ),
            bytes: held_pool_bytes(c.panels.max_panels, j.max_event_bytes)
                + unpaid_evicted_bytes(j.memory_mib, entry),
        },
        Line {
            item: "panel socket buffers",
            detail: format!(
                "{} panels x 2 x SO_SNDBUF {} B (kernel)",
                c.panels.max_panels, PANEL_SNDBUF
            ),
            bytes: c.panels.max_panels * 2 * PANEL_SNDBUF,
        },
    ];
    if c.panels.tls.is_some() {
        lines.push(Line {
            item: "panel TLS",
            detail: format!(
                "{} panels x {} B (rustls send limit {} B, one record each way, state)",
                c.panels.max_panels, PANEL_TLS, PANEL_TLS_SEND_LIMIT
            ),
            bytes: c.panels.max_panels * PANEL_TLS,
        });
    }
    lines.push(Line {
        item: "panel auth throttle",
        detail: format!(
            "{} source addresses x {} B",
            AUTH_THROTTLE_ENTRIES, AUTH_THROTTLE_ENTRY
        ),
        bytes: AUTH_THROTTLE_ENTRIES * AUTH_THROTTLE_ENTRY,
    });
    if c.panels.last_values > 0 {
        let index = crate::journal::LAST_VALUE_INDEX_BYTES;
        lines.push(Line {
            item: "last values",
            detail: format!(
                "{} topics x {} B index + panels.last_values_mib of events the journal no longer holds",
                c.panels.last_values, index
            ),
            bytes: c.panels.last_values * index + (c.panels.last_values_mib << 20),
        });
    }
    if let Some(m) = &c.mqtt {
        // Publishes share the journal's bytes; the client holds per publish its topic and
        // properties, and its socket buffers at most a couple of frames.
        lines.push(Line {
            item: "mqtt in-flight",
            detail: format!(
                "{} publishes x 1 KiB + 2 x {} B frame + 64 KiB client",
                m.inflight, frame
            ),
            bytes: m.inflight * 1024 + 2 * frame + 64 * 1024,
        });
    }
    if let Some(dir) = &j.state_dir {
        lines.push(Line {
            item: "journal snapshot",
            detail: format!(
                "{}: {} B file buffer + {} events x {} B view (streamed, no copy of events)",
                dir.display(),
                crate::journal::snapshot::IO_BUFFER,
                j.events,
                SNAPSHOT_ENTRY
            ),
            bytes: crate::journal::snapshot::IO_BUFFER + j.events * SNAPSHOT_ENTRY,
        });
    }
    lines.push(Line {
        item: "runtime base",
        detail: "executable, runtime, allocator, stacks".into(),
        bytes: RUNTIME_BASE,
    });
    Budget {
        lines,
        limit_bytes: c.budget.memory_mib << 20,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LoadEnv};

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[source]\nconnection_string = \"Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=v\"\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n{extra}"
        );
        Config::parse(&text, &LoadEnv::default()).unwrap()
    }

    #[test]
    fn defaults_fit_the_default_budget() {
        let b = compute(&cfg("[mqtt]\n"));
        assert!(b.fits(), "{}", b.render());
        assert!(b.render().contains("journal frames"));
        assert!(!b.render().contains("journal snapshot"));
        let b = compute(&cfg("[journal]\nstate_dir = \"/var/lib/asb-gateway\"\n"));
        assert!(b.render().contains("journal snapshot"), "{}", b.render());
        assert!(b.fits());
    }

    #[test]
    fn budget_grows_with_panels_and_can_be_exceeded() {
        let small = compute(&cfg(""));
        let big = compute(&cfg("[panels]\nmax_panels = 5000\n"));
        assert!(big.total() > small.total());
        assert!(!big.fits());
        assert!(big.render().contains("EXCEEDED"));
        let advice = big.advice();
        let need = big.total().div_ceil(1 << 20);
        assert!(
            advice.contains(&format!("set budget.memory_mib = {need} or more"))
                && advice.contains("panel"),
            "{advice}"
        );
        assert!(compute(&cfg("")).advice().is_empty());
    }
}
