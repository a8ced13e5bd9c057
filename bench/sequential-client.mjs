// Sends N POSTs with new Idempotency-Keys over 4 keep-alive connections, then exits. Usage: node bench/sequential-client.mjs PORT N
import http from 'node:http';

const [port, n] = [Number(process.argv[2]), Number(process.argv[3])];
const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
const body = '{"item":"book","quantity":2}';
let i = 0;
function one() {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        port,
        host: '127.0.0.1',
        path: '/orders',
        method: 'POST',
        agent,
        headers: {
          'content-type': 'application/json',
          'content-length': body.length,
          'idempotency-key': `k-${process.pid}-${i++}`,
        },
      },
      (res) => {
        res.resume();
        res.on('end', resolve);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}
const workers = Array.from({ length: 4 }, async () => {
  while (i < n) await one();
});
await Promise.all(workers);
agent.destroy();
