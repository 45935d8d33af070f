// The "usual first version" of a panel gateway in Node.js, used as a peer by
// benches/pipeline.rs: one WebSocket server; the connection on /feed sends events, every
// event is broadcast as-is to all other connected clients. No filters, no back-pressure,
// no per-client limits (ws buffers what a slow client does not read).
// Prints "listening PORT" on stdout once it accepts connections.
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 0);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('listening', () => {
  process.stdout.write(`listening ${wss.address().port}\n`);
});

wss.on('connection', (ws, req) => {
  if (req.url && req.url.startsWith('/feed')) {
    ws.on('message', (data, isBinary) => {
      for (const client of wss.clients) {
        if (client !== ws && client.readyState === WebSocket.OPEN) {
          client.send(data, { binary: isBinary });
        }
      }
    });
  }
  ws.on('error', () => {});
});

process.on('SIGTERM', () => process.exit(0));
