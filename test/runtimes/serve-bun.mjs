// Serves the bundled runtime app on Bun: `bun serve-bun.mjs <bundle>`; prints `LISTENING <port>`.
const { default: app } = await import(process.argv[2]);
const server = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: app.fetch });
console.log(`LISTENING ${server.port}`);
