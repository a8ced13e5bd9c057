/**
 * The server side of the benchmark, run in its own process with plain Node.js on the built package (dist/), as
 * users run it. Usage: node bench/server.mjs <bare|idempotent>; prints the port it listens on.
 */
import express from 'express';
import { idempotencyHeader } from '../dist/express.mjs';
import { MemoryBackend } from '../dist/index.mjs';

const mode = process.argv[2] ?? 'bare';
const app = express();
app.use(express.json());
if (mode === 'idempotent')
  app.use(
    idempotencyHeader({ backend: new MemoryBackend({ maxEntries: 10_000_000, maxBytes: 4 * 1024 ** 3 }) }),
  );
else if (mode !== 'bare') throw new Error(`unknown mode ${mode}`);

let orders = 0;
app.post('/orders', (req, res) => {
  orders++;
  res.status(201).json({ id: orders, item: req.body.item, quantity: req.body.quantity });
});

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
