import { randomUUID } from 'node:crypto';
import express from 'express';
import { idempotencyHeader } from '../../src/adapters/express.js';
import { MemoryBackend } from '../../src/index.js';

const port = Number(process.env.PORT ?? 3000);
const host = process.env.HOST ?? '127.0.0.1';

const app = express();
app.use(express.json());
app.use(idempotencyHeader({ backend: new MemoryBackend() }));

app.post('/orders', (req, res) => {
  res
    .status(201)
    .json({ id: randomUUID(), item: req.body?.item ?? null, createdAt: new Date().toISOString() });
});

app.listen(port, host, () => {
  const url = `http://${host}:${port}/orders`;
  const key = randomUUID();
  console.log(`Example app listening on ${url}`);
  console.log(
    'Send this twice: the first runs, the second is a replay with the same id and Idempotent-Replayed: true',
  );
  console.log(
    `  curl -i -X POST ${url} -H 'Idempotency-Key: ${key}' -H 'Content-Type: application/json' -d '{"item":"book"}'`,
  );
  console.log(
    `  curl -i -X POST ${url} -H 'Idempotency-Key: ${key}' -H 'Content-Type: application/json' -d '{"item":"book"}'`,
  );
});
