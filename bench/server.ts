/**
 * The server side of the benchmark, run in its own process so that the load generator does not share its core.
 * Usage: tsx bench/server.ts <bare|idempotent>; prints the port it listens on.
 */
import type { AddressInfo } from 'node:net';
import express from 'express';
import { idempotencyHeader } from '../src/adapters/express.js';
import { MemoryBackend } from '../src/index.js';

const mode = process.argv[2] ?? 'bare';
const app = express();
app.use(express.json());
if (mode === 'idempotent') app.use(idempotencyHeader({ backend: new MemoryBackend() }));
else if (mode !== 'bare') throw new Error(`unknown mode ${mode}`);

let orders = 0;
app.post('/orders', (req, res) => {
  orders++;
  res.status(201).json({ id: orders, item: req.body.item, quantity: req.body.quantity });
});

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${(server.address() as AddressInfo).port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
