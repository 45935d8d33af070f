// The built-in panel page: protocol v1 over WebSocket (asbgw.v1.json).
// Newest events first, at most MAX_ROWS rows; reconnects with backoff and resumes from
// the last event seen (since=EPOCH:SEQ); counts gaps; topic filters via subscribe ops.
"use strict";
(function () {
  const MAX_ROWS = 200;
  const PING_MS = 20000;
  const SILENT_MS = 60000;
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  let filters = params.getAll("filter").filter(Boolean);
  if (filters.length === 0) filters = ["#"];

  let ws = null;
  let epoch = null;
  let lastSeq = null; // highest seq seen in this epoch
  let backoff = 500;
  let retry = null;
  let lastHeard = 0;
  let count = 0, gaps = 0, missed = 0;
  const rows = new Map(); // seq -> <tr>

  const $ = (id) => document.getElementById(id);
  const tbody = $("rows");
  $("filter").value = filters.join(" ");

  function setState(s, detail) {
    const el = $("state");
    el.textContent = s;
    el.className = "state " + s;
    el.title = detail || "";
  }

  function streamUrl() {
    const u = new URL("/v1/stream", location.href);
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    for (const f of filters) u.searchParams.append("filter", f);
    if (epoch !== null && lastSeq !== null) u.searchParams.set("since", epoch + ":" + lastSeq);
    if (token) u.searchParams.set("token", token);
    return u.toString();
  }

  function connect() {
    clearTimeout(retry);
    setState("connecting");
    let sock;
    try {
      sock = new WebSocket(streamUrl(), "asbgw.v1.json");
    } catch (e) {
      schedule(String(e));
      return;
    }
    ws = sock;
    sock.onmessage = (ev) => {
      lastHeard = Date.now();
      let f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      handle(f, sock);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      schedule(ev.code + (ev.reason ? " " + ev.reason : ""));
    };
  }

  function schedule(why) {
    setState("offline", why);
    clearTimeout(retry);
    retry = setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function handle(f, sock) {
    switch (f.type) {
      case "hello": {
        backoff = 500;
        setState("live");
        $("error").textContent = "";
        $("info").textContent = "epoch " + f.epoch + " · journal " + f.oldest + "–" + f.latest +
          " · filters " + f.filters.join(" ");
        const first = lastSeq === null;
        epoch = f.epoch;
        if (first) {
          // First connection: replay recent history, then stay live.
          lastSeq = 0;
          const from = Math.max(f.oldest, f.latest - MAX_ROWS + 1);
          if (f.latest >= from) sock.send(JSON.stringify({ op: "resume", since: f.epoch + ":" + (from - 1) }));
        }
        break;
      }
      case "event":
        addRow(f);
        if (f.seq > lastSeq) lastSeq = f.seq;
        break;
      case "gap":
        gaps += 1;
        missed += Math.max(0, f.to - f.from + 1);
        $("gaps").textContent = gaps;
        $("missed").textContent = missed;
        if (f.reason === "epoch") {
          // A new journal: old sequence numbers mean nothing any more.
          rows.clear();
          tbody.replaceChildren();
          lastSeq = 0;
        }
        break;
      case "error":
        $("error").textContent = f.code + ": " + f.message;
        break;
      default:
        break;
    }
  }

  function fmtTime(f) {
    if (f.enqueued_at) return f.enqueued_at.replace("T", " ").replace("Z", "");
    return new Date().toISOString().replace("T", " ").replace("Z", "") + " (recv)";
  }

  function fmtBody(f) {
    let s;
    if (f.body_encoding === "base64") s = "base64:" + f.body;
    else if (typeof f.body === "string") s = f.body;
    else s = JSON.stringify(f.body);
    return s.length > 300 ? s.slice(0, 300) + "…" : s;
  }

  function addRow(f) {
    if (rows.has(f.seq)) return;
    const tr = document.createElement("tr");
    tr.className = "fresh event";
    tr.dataset.seq = f.seq;
    tr.dataset.topic = f.topic;
    for (const [cls, text] of [["seq", String(f.seq)], ["time", fmtTime(f)], ["topic", f.topic],
                               ["subject", f.subject || ""], ["body", fmtBody(f)]]) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      td.title = text;
      tr.appendChild(td);
    }
    // Newest first: insert before the first row with a smaller seq.
    let before = null;
    for (const r of tbody.children) {
      if (Number(r.dataset.seq) < f.seq) { before = r; break; }
    }
    tbody.insertBefore(tr, before);
    rows.set(f.seq, tr);
    count += 1;
    $("count").textContent = count;
    while (tbody.children.length > MAX_ROWS) {
      const last = tbody.lastElementChild;
      rows.delete(Number(last.dataset.seq));
      last.remove();
    }
  }

  // MQTT filter match, as the server does it.
  function matches(filter, topic) {
    if (topic.startsWith("$") && (filter[0] === "+" || filter[0] === "#")) return false;
    const f = filter.split("/"), t = topic.split("/");
    for (let i = 0; ; i++) {
      if (f[i] === "#") return true;
      if (i >= f.length || i >= t.length) return f.length === t.length;
      if (f[i] !== "+" && f[i] !== t[i]) return false;
    }
  }

  $("filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = $("filter").value.split(/[\s,]+/).filter(Boolean);
    const wanted = next.length ? next : ["#"];
    send({ op: "unsubscribe", filters: filters.filter((f) => !wanted.includes(f)) });
    send({ op: "subscribe", filters: wanted });
    filters = wanted;
    for (const [seq, tr] of rows) {
      if (!filters.some((f) => matches(f, tr.dataset.topic))) { tr.remove(); rows.delete(seq); }
    }
    const u = new URL(location.href);
    u.searchParams.delete("filter");
    for (const f of filters) u.searchParams.append("filter", f);
    history.replaceState(null, "", u.toString());
  });

  // Application-level heartbeat: a silent connection is replaced.
  setInterval(() => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENT_MS) { const s = ws; ws = null; s.close(); schedule("silent"); return; }
    send({ op: "ping" });
  }, PING_MS);

  connect();
})();
