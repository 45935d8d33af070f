// RSS of idle panels: connects N panels (default 1000) to a running gateway, each waiting
// for its first frame (`hello`), then prints the growth of the gateway's VmRSS per panel.
// One panel connects first so the server's own tables and buffers are sized before the
// baseline. Release builds, since that is what a box runs (the heap test
// tests/mem_panels.rs measures the dev build's heap instead).
//
//   node bench/idle-rss.js PID URL [N]
//   e.g. asb-gateway run --config c.toml &   # [panels] listen = "127.0.0.1:18080"
//        node bench/idle-rss.js $! ws://127.0.0.1:18080/v1/stream 1000
//
// wss:// URLs accept any certificate (a self-signed one is enough). Needs `ws` from
// bench/package.json (scripts/setup/bench.sh installs it).
'use strict';
const fs = require('fs');
const WebSocket = require('ws');

const [pid, url, count] = process.argv.slice(2);
if (!pid || !url) {
  process.stderr.write('usage: node bench/idle-rss.js PID URL [N]\n');
  process.exit(2);
}
const n = Number(count || 1000);
const BATCH = 50;

function rssKiB() {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)[1]);
}

const open = [];
function connect() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ['asbgw.v1.json'], { rejectUnauthorized: false });
    ws.once('message', () => resolve());
    ws.once('error', reject);
    open.push(ws);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  await connect();
  await sleep(500);
  const before = rssKiB();
  for (let i = 0; i < n; i += BATCH) {
    await Promise.all(Array.from({ length: Math.min(BATCH, n - i) }, connect));
  }
  await sleep(1500);
  const after = rssKiB();
  const per = ((after - before) * 1024) / n;
  console.log(`${url}: VmRSS ${before} kB with 1 panel, ${after} kB with ${n + 1}: ${per.toFixed(0)} B per idle panel`);
  for (const ws of open) ws.terminate();
  process.exit(0);
})().catch((e) => {
  console.error(`idle-rss: ${e.message}`);
  process.exit(1);
});
