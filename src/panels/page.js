// The built-in panel page: protocol v1 over WebSocket (asbgw.v1.json), relative URLs only
// (works under a reverse-proxy path prefix).
// Board view: one tile per topic, grouped by the first topic level, with the latest value,
// how long ago it changed, a colour by state (docs/panels.md) and a sparkline of numeric
// values; a banner of active alarms until acknowledged. Log view: newest events first, at
// most MAX_ROWS rows. Connects with last=true (the latest event of every topic, then
// "synced"), replays recent history once to seed the sparklines and the log, reconnects
// with backoff resuming from the last event seen (since=EPOCH:SEQ), counts gaps. Every
// event is applied idempotently by seq: one seen twice (last value, then replay) changes
// nothing the second time.
// Tokens never go in a URL: the stream gets one as a subprotocol entry
// (asbgw.token.<base64url>), v1/last as Authorization: Bearer. A connection that fails
// before it opens (the browser only sees 1006) is explained by GET v1/last: 401 shows the
// token form (asked once, kept in sessionStorage), 429 waits Retry-After.
// Fleet (docs/fleet.md): the gateways are this page's own, then the peers the server
// names in <meta name="asbgw-peers"> (panels.peer_gateways; the CSP allows exactly those).
// A lost or failed connection moves on to the next gateway, with the same backoff and
// since=EPOCH:SEQ; another box has another epoch, so it answers with a gap "epoch" and
// its own history, which replaces what the page showed.
"use strict";
(function () {
  const MAX_ROWS = 200; // log rows
  const SEED = 1000; // events replayed on first load: sparklines and log
  const SPARK = 40; // points per sparkline
  const PING_MS = 20000;
  const SILENT_MS = 60000;
  // Colour by state, on these fields of a JSON body (the first that is a string).
  const STATE_KEYS = ["state", "status", "severity", "level"];
  const BAD = /^(alarm|fault|faulted|error|critical|fatal|emergency|failed|failure|stopped|down|offline|tripped)$/i;
  const WARN = /^(idle|setup|warning|warn|maintenance|paused|starting|stopping|degraded|blocked|starved|standby)$/i;
  const GOOD = /^(running|ok|good|normal|up|online|active|ready|cleared|clear|info|producing)$/i;
  // Numeric fields whose name is their unit.
  const UNITS = {
    celsius: "°C", fahrenheit: "°F", kelvin: "K", percent: "%", humidity: "%", rpm: "rpm",
    bar: "bar", mbar: "mbar", psi: "psi", pa: "Pa", kpa: "kPa", volts: "V", voltage: "V",
    amps: "A", current: "A", watts: "W", power: "W", kw: "kW", kwh: "kWh", hz: "Hz",
    mm: "mm", kg: "kg",
  };
  const NOT_VALUES = new Set(["n", "seq", "id", "ts", "time", "timestamp"]);
  const SVG = "http://www.w3.org/2000/svg";

  const params = new URLSearchParams(location.search);
  let token = null;
  try { token = sessionStorage.getItem("asbgw.token"); } catch (e) { /* memory only */ }
  // A legacy ?token= bookmark: kept for the session, taken out of the address bar.
  if (params.has("token")) {
    if (params.get("token")) keep(params.get("token"));
    setParams("token", []);
  }
  let filters = params.getAll("filter").filter(Boolean);
  if (filters.length === 0) filters = ["#"];
  let alarmFilters = params.getAll("alarm").filter(Boolean);
  if (alarmFilters.length === 0) alarmFilters = words(store("asbgw.alarm") || "+/+/alarm");

  const gateways = [location.href];
  const peersMeta = document.querySelector('meta[name="asbgw-peers"]');
  for (const p of words(peersMeta ? peersMeta.content : "")) {
    try {
      const u = new URL(p);
      if (u.protocol !== "http:" && u.protocol !== "https:") continue;
      if (!u.pathname.endsWith("/")) u.pathname += "/";
      gateways.push(u.toString());
    } catch (e) { /* not a URL: skipped */ }
  }
  let current = 0; // index into gateways

  let ws = null;
  let epoch = null;
  let lastSeq = null; // highest seq seen in this epoch (events of the stream, not last values)
  let backoff = 500;
  let retry = null;
  let lastHeard = 0;
  let lastOps = 0; // {"op":"last"} sent and not yet answered by "synced"
  let count = 0, gaps = 0, missed = 0;
  const rows = new Map(); // seq -> <tr>
  const tiles = new Map(); // topic -> tile
  const groups = new Map(); // first topic level -> <section>
  const alarmItems = new Map(); // topic -> <li>
  let acks = {}; // topic -> acknowledged seq, for this epoch (kept in localStorage)

  const $ = (id) => document.getElementById(id);
  const tbody = $("rows");
  $("filter").value = filters.join(" ");
  $("alarm-filter").value = alarmFilters.join(" ");

  function words(s) { return s.split(/[\s,]+/).filter(Boolean); }

  function store(key, value) {
    try {
      if (value === undefined) return localStorage.getItem(key);
      localStorage.setItem(key, value);
    } catch (e) { /* storage disabled: acknowledgements last until reload */ }
    return null;
  }

  function keep(t) {
    token = t;
    try {
      if (t) sessionStorage.setItem("asbgw.token", t);
      else sessionStorage.removeItem("asbgw.token");
    } catch (e) { /* storage disabled: the token lasts until reload */ }
  }

  // The token as a subprotocol entry: its UTF-8 in base64url without padding.
  function tokenEntry(t) {
    let bin = "";
    for (const b of new TextEncoder().encode(t)) bin += String.fromCharCode(b);
    return "asbgw.token." + btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function setState(s, detail) {
    const el = $("state");
    el.textContent = s;
    el.className = "state " + s;
    el.title = detail || "";
  }

  function streamUrl() {
    // Relative to the page (or the peer's page), so a path prefix (reverse proxy) is kept.
    const u = new URL("v1/stream", gateways[current]);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.search = "";
    u.hash = "";
    u.searchParams.set("last", "true");
    for (const f of filters) u.searchParams.append("filter", f);
    if (epoch !== null && lastSeq !== null) u.searchParams.set("since", epoch + ":" + lastSeq);
    return u.toString();
  }

  function lastUrl() {
    const u = new URL("v1/last", location.href);
    u.search = "";
    u.hash = "";
    for (const f of filters) u.searchParams.append("filter", f);
    return u.toString();
  }

  function connect() {
    clearTimeout(retry);
    if (ws) { const s = ws; ws = null; s.close(); }
    setState("connecting");
    lastOps = 0;
    const protocols = ["asbgw.v1.json"];
    if (token) protocols.push(tokenEntry(token));
    let sock, opened = false;
    try {
      sock = new WebSocket(streamUrl(), protocols);
    } catch (e) {
      schedule(String(e));
      return;
    }
    ws = sock;
    sock.onopen = () => { opened = true; };
    sock.onmessage = (ev) => {
      lastHeard = Date.now();
      let f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      handle(f, sock);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      const why = ev.code + (ev.reason ? " " + ev.reason : "");
      if (opened || current !== 0) schedule(why);
      else check(why, false); // only the page's own gateway can be asked why (same origin)
    };
  }

  // An HTTP header carries printable ASCII only; the subprotocol entry carries any token.
  const headerSafe = (t) => /^[\x20-\x7e]+$/.test(t);

  // GET v1/last with the token: its status (0: unreachable), Retry-After, refusal text.
  async function probe() {
    try {
      const r = await fetch(lastUrl(), {
        headers: token && headerSafe(token) ? { Authorization: "Bearer " + token } : {},
        cache: "no-store",
      });
      const text = r.ok ? "" : await r.text();
      if (r.ok && r.body) r.body.cancel(); // only the status matters
      return { status: r.status, wait: Number(r.headers.get("Retry-After")) || 60, text: text.trim() };
    } catch (e) {
      return { status: 0 };
    }
  }

  // Why did the stream fail (or: is a token just typed accepted)? 401 asks for a token
  // and stops retrying; 429 waits; anything else retries (at once if `now`).
  async function check(why, now) {
    setState(now ? "connecting" : "offline", why);
    if (now && token && !headerSafe(token)) { connect(); return; } // the stream will tell
    const p = await probe();
    if (p.status === 401) { ask(token ? "token not accepted" : ""); return; }
    if (p.status === 429) {
      setState("offline", "429");
      $("error").textContent = "too many wrong tokens from this address: retry in " + p.wait + " s";
      clearTimeout(retry);
      retry = setTimeout(connect, p.wait * 1000);
      return;
    }
    if (p.status > 299) $("error").textContent = p.status + ": " + p.text;
    if (now) connect();
    else schedule(why);
  }

  function ask(msg) {
    keep(null);
    clearTimeout(retry);
    setState("offline", "a token is required");
    $("error").textContent = msg;
    $("token-form").hidden = false;
    document.body.dataset.asked = (Number(document.body.dataset.asked) || 0) + 1;
    $("token").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    $("token").value = "";
    $("token-form").hidden = true;
    keep(t);
    check("", true);
  });

  function schedule(why) {
    setState("offline", why);
    clearTimeout(retry);
    current = (current + 1) % gateways.length; // the next box of the fleet, if any
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
          " · filters " + f.filters.join(" ") +
          (gateways.length > 1 ? " · gateway " + new URL(gateways[current]).host : "");
        document.body.dataset.gateway = current;
        $("notice").textContent = "";
        if (epoch !== null && f.epoch !== epoch) {
          // A new journal: old sequence numbers mean nothing any more.
          clearRows();
          clearTiles();
          lastSeq = 0;
        }
        if (f.epoch !== epoch) {
          epoch = f.epoch;
          try { acks = JSON.parse(store("asbgw.ack." + epoch)) || {}; } catch (e) { acks = {}; }
        }
        if (lastSeq === null) {
          // First connection: replay recent history (sparklines, log), then stay live.
          const from = Math.max(f.oldest, f.latest - SEED + 1);
          lastSeq = from - 1;
          if (f.latest >= from) sock.send(JSON.stringify({ op: "resume", since: f.epoch + ":" + lastSeq }));
        }
        break;
      }
      case "event":
        tile(f);
        if (!f.last) {
          addRow(f);
          if (f.seq > lastSeq) lastSeq = f.seq;
        }
        break;
      case "synced":
        // After {"op":"last"} the stream goes on from latest+1; after connecting it goes on
        // from `since` (the replay) or is live.
        if (lastOps > 0) {
          lastOps -= 1;
          if (f.latest > lastSeq) lastSeq = f.latest;
        }
        document.body.dataset.synced = f.latest;
        document.body.dataset.syncs = (Number(document.body.dataset.syncs) || 0) + 1;
        $("board-empty").textContent = "no topic has an event yet";
        break;
      case "gap":
        gaps += 1;
        missed += Math.max(0, f.to - f.from + 1);
        $("gaps").textContent = gaps;
        $("missed").textContent = missed;
        if (f.reason === "epoch") {
          clearRows();
          lastSeq = 0;
          // Say what happened: another journal (another box, or this one restarted
          // without its snapshot); what follows is its history, numbered anew.
          $("notice").textContent = "new journal (epoch " + epoch + ") on " +
            new URL(gateways[current]).host + ": showing its history; events from before may be missing";
          document.body.dataset.epochs = (Number(document.body.dataset.epochs) || 0) + 1;
        }
        break;
      case "error":
        $("error").textContent = f.code + ": " + f.message;
        break;
      default:
        break;
    }
  }

  // ---- the log ----

  function clearRows() {
    rows.clear();
    tbody.replaceChildren();
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

  // ---- the board ----

  function classOf(word) {
    return BAD.test(word) ? "bad" : WARN.test(word) ? "warn" : GOOD.test(word) ? "good" : "";
  }

  // What a tile shows for an event: {text} (a state word or text), or {num, unit}; cls by
  // the state convention.
  function valueOf(f) {
    const b = f.body;
    const v = { text: "", num: null, unit: "", cls: "" };
    if (f.body_encoding === "base64") {
      v.text = "binary";
    } else if (typeof b === "number") {
      v.num = b;
    } else if (typeof b === "string") {
      const s = b.trim();
      if (s !== "" && isFinite(s)) v.num = Number(s);
      else { v.text = s; v.cls = classOf(s); }
    } else if (b && typeof b === "object" && !Array.isArray(b)) {
      const keys = Object.keys(b);
      for (const k of STATE_KEYS) {
        if (typeof b[k] === "string") { v.text = b[k]; v.cls = classOf(b[k]); break; }
      }
      if (!v.text) {
        v.text = [b.code, b.text || b.message].filter((x) => typeof x === "string").join(" ");
      }
      const unit = typeof b.unit === "string" ? b.unit : "";
      const k = keys.find((k) => typeof b[k] === "number" && UNITS[k.toLowerCase()]) ||
        (typeof b.value === "number" ? "value" : null) ||
        keys.find((k) => typeof b[k] === "number" && !NOT_VALUES.has(k.toLowerCase()));
      if (k) {
        v.num = b[k];
        v.unit = UNITS[k.toLowerCase()] || unit || (k === "value" ? "" : k);
      }
      if (!v.text && v.num === null) v.text = JSON.stringify(b);
    } else {
      v.text = JSON.stringify(b);
    }
    if (v.num === null && !v.text) v.text = "(empty)";
    return v;
  }

  function fmtNum(n) {
    if (Number.isInteger(n)) return String(n);
    return n.toFixed(Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2);
  }

  function fmtAgo(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  function evTime(f) {
    const t = f.enqueued_at ? Date.parse(f.enqueued_at) : NaN;
    return Number.isNaN(t) ? Date.now() : t;
  }

  const byName = (a, b) => a.localeCompare(b, undefined, { numeric: true });

  function el(tag, cls, parent) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }

  function insertSorted(parent, node, key) {
    const before = [...parent.children].find((c) => byName(c.dataset.key, key) > 0) || null;
    node.dataset.key = key;
    parent.insertBefore(node, before);
  }

  function groupOf(name) {
    let g = groups.get(name);
    if (!g) {
      g = el("section", "group");
      el("h2", "", g).textContent = name;
      g.list = el("div", "tiles", g);
      insertSorted($("groups"), g, name);
      groups.set(name, g);
    }
    return g;
  }

  function makeTile(topic) {
    const i = topic.indexOf("/");
    const group = i > 0 ? topic.slice(0, i) : "other";
    const t = { topic, group, seq: null, points: [], shown: "", changed: 0, at: 0 };
    t.el = el("div", "tile");
    t.el.dataset.topic = topic;
    t.el.title = topic;
    el("div", "name", t.el).textContent = i > 0 ? topic.slice(i + 1) : topic;
    t.value = el("div", "value", t.el);
    const foot = el("div", "foot", t.el);
    t.svg = document.createElementNS(SVG, "svg");
    t.svg.setAttribute("class", "spark");
    t.svg.setAttribute("viewBox", "0 0 100 30");
    t.svg.setAttribute("preserveAspectRatio", "none");
    t.svg.setAttribute("aria-hidden", "true");
    t.svg.dataset.points = 0;
    t.line = document.createElementNS(SVG, "polyline");
    t.svg.appendChild(t.line);
    t.svg.style.visibility = "hidden";
    foot.appendChild(t.svg);
    t.ago = el("span", "ago", foot);
    insertSorted(groupOf(group).list, t.el, topic);
    tiles.set(topic, t);
    $("board-empty").hidden = true;
    return t;
  }

  function clearTiles() {
    tiles.clear();
    groups.clear();
    $("groups").replaceChildren();
    $("board-empty").hidden = false;
    renderAlarms();
  }

  function removeTile(t) {
    tiles.delete(t.topic);
    t.el.remove();
    const g = groups.get(t.group);
    if (g && g.list.children.length === 0) { g.remove(); groups.delete(t.group); }
    $("board-empty").hidden = tiles.size > 0;
  }

  // Apply one event to its topic's tile: the value only if it is newer than the one shown,
  // the sparkline point only once per seq.
  function tile(f) {
    const t = tiles.get(f.topic) || makeTile(f.topic);
    const v = valueOf(f);
    if (v.num !== null && addPoint(t, f.seq, v.num)) drawSpark(t);
    if (t.seq !== null && f.seq <= t.seq) return;
    t.seq = f.seq;
    t.v = v;
    t.at = evTime(f);
    const shown = v.text || fmtNum(v.num) + " " + v.unit;
    if (shown !== t.shown) { t.shown = shown; t.changed = t.at; }
    t.el.dataset.seq = f.seq;
    t.value.replaceChildren();
    t.value.classList.toggle("long", v.text.length > 9);
    if (v.text) {
      t.value.textContent = v.text;
    } else {
      t.value.textContent = fmtNum(v.num);
      if (v.unit) el("small", "", t.value).textContent = v.unit;
    }
    t.value.title = shown;
    // Flash: switching between two identical animations restarts it without a reflow.
    t.flip = !t.flip;
    t.el.classList.toggle("fa", t.flip);
    t.el.classList.toggle("fb", !t.flip);
    paint(t);
    if (isAlarm(t)) renderAlarms();
  }

  function addPoint(t, seq, num) {
    const p = t.points;
    let i = p.length;
    while (i > 0 && p[i - 1][0] > seq) i--;
    if (i > 0 && p[i - 1][0] === seq) return false;
    if (p.length >= SPARK && i === 0) return false; // older than every point kept
    p.splice(i, 0, [seq, num]);
    if (p.length > SPARK) p.shift();
    return true;
  }

  function drawSpark(t) {
    const p = t.points;
    let lo = Infinity, hi = -Infinity;
    for (const [, v] of p) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    const span = hi - lo || 1;
    const step = p.length > 1 ? 100 / (p.length - 1) : 0;
    t.line.setAttribute("points", p.map(([, v], i) =>
      (i * step).toFixed(1) + "," + (28 - ((v - lo) / span) * 26).toFixed(1)).join(" "));
    t.svg.dataset.points = p.length;
    t.svg.style.visibility = p.length > 1 ? "visible" : "hidden";
  }

  function isAlarm(t) {
    return alarmFilters.some((f) => matches(f, t.topic));
  }

  // An alarm is active until acknowledged, or until its topic reports a good state.
  function alarmActive(t) {
    return t.seq !== null && isAlarm(t) && !(acks[t.topic] >= t.seq) && t.v.cls !== "good";
  }

  function paint(t) {
    let cls = t.v ? t.v.cls : "";
    if (t.v && isAlarm(t)) cls = alarmActive(t) ? "bad" : cls || "acked";
    for (const c of ["good", "warn", "bad", "acked"]) t.el.classList.toggle(c, c === cls);
    const ago = t.seq === null ? "" : fmtAgo(Date.now() - t.changed);
    if (t.ago.textContent !== ago) t.ago.textContent = ago;
  }

  function renderAlarms() {
    const list = $("alarm-list");
    const active = [...tiles.values()].filter(alarmActive).sort((a, b) => b.seq - a.seq);
    for (const [topic, li] of alarmItems) {
      if (!active.some((t) => t.topic === topic)) { li.remove(); alarmItems.delete(topic); }
    }
    let prev = null;
    for (const t of active) {
      let li = alarmItems.get(t.topic);
      if (!li) {
        li = el("li");
        li.dataset.topic = t.topic;
        const d = el("div", "", li);
        d.append(el("small"), el("b"));
        const ack = el("button", "ack", li);
        ack.type = "button";
        ack.textContent = "acknowledge";
        alarmItems.set(t.topic, li);
      }
      li.dataset.seq = t.seq;
      setAlarmText(li, t);
      if ((prev ? prev.nextSibling : list.firstChild) !== li) list.insertBefore(li, prev ? prev.nextSibling : list.firstChild);
      prev = li;
    }
    $("alarms").hidden = active.length === 0;
    $("alarm-count").textContent = active.length + (active.length === 1 ? " active alarm" : " active alarms");
  }

  function setAlarmText(li, t) {
    li.firstChild.firstChild.textContent = t.topic + " · " + fmtAgo(Date.now() - t.at);
    li.firstChild.lastChild.textContent = t.shown;
  }

  function acknowledge(topics) {
    for (const topic of topics) {
      const t = tiles.get(topic);
      if (t && t.seq !== null) { acks[topic] = t.seq; paint(t); }
    }
    store("asbgw.ack." + epoch, JSON.stringify(acks));
    renderAlarms();
  }

  $("alarm-list").addEventListener("click", (ev) => {
    const b = ev.target.closest("button.ack");
    if (b) acknowledge([b.parentNode.dataset.topic]);
  });
  $("ack-all").addEventListener("click", () => acknowledge([...alarmItems.keys()]));

  $("alarm-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = words($("alarm-filter").value);
    alarmFilters = next.length ? next : ["+/+/alarm"];
    $("alarm-filter").value = alarmFilters.join(" ");
    store("asbgw.alarm", alarmFilters.join(" "));
    setParams("alarm", alarmFilters);
    for (const t of tiles.values()) paint(t);
    renderAlarms();
  });

  // ---- views, filters, heartbeat ----

  function show(view) {
    for (const v of ["board", "log"]) {
      $(v).hidden = v !== view;
      $("tab-" + v).setAttribute("aria-selected", String(v === view));
    }
    const u = new URL(location.href);
    u.hash = view === "log" ? "log" : "";
    history.replaceState(null, "", u.toString());
  }
  $("tab-board").addEventListener("click", () => show("board"));
  $("tab-log").addEventListener("click", () => show("log"));
  show(location.hash === "#log" ? "log" : "board");

  function setParams(name, values) {
    const u = new URL(location.href);
    u.searchParams.delete(name);
    for (const v of values) u.searchParams.append(name, v);
    history.replaceState(null, "", u.toString());
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
    const next = words($("filter").value);
    const wanted = next.length ? next : ["#"];
    const added = wanted.filter((f) => !filters.includes(f));
    send({ op: "unsubscribe", filters: filters.filter((f) => !wanted.includes(f)) });
    send({ op: "subscribe", filters: wanted });
    filters = wanted;
    for (const [seq, tr] of rows) {
      if (!filters.some((f) => matches(f, tr.dataset.topic))) { tr.remove(); rows.delete(seq); }
    }
    for (const t of [...tiles.values()]) {
      if (!filters.some((f) => matches(f, t.topic))) removeTile(t);
    }
    renderAlarms();
    if (added.length && ws && ws.readyState === WebSocket.OPEN) {
      // The latest value of the topics just added.
      lastOps += 1;
      send({ op: "last" });
    }
    setParams("filter", filters);
  });

  // Application-level heartbeat: a silent connection is replaced.
  setInterval(() => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENT_MS) { const s = ws; ws = null; s.close(); schedule("silent"); return; }
    send({ op: "ping" });
  }, PING_MS);

  // "changed … ago" keeps counting.
  setInterval(() => {
    for (const t of tiles.values()) paint(t);
    for (const [topic, li] of alarmItems) {
      const t = tiles.get(topic);
      if (t) setAlarmText(li, t);
    }
  }, 1000);

  connect();
})();
