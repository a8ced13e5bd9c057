// Serves the bundled runtime app on Deno: `deno run --allow-net --allow-read serve-deno.mjs <bundle>`.
const { default: app } = await import(new URL(`file://${Deno.args[0]}`).href);
Deno.serve(
  { port: 0, hostname: '127.0.0.1', onListen: ({ port }) => console.log(`LISTENING ${port}`) },
  app.fetch,
);
