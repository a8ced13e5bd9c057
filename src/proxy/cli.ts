#!/usr/bin/env node
/**
 * The `idempotency-header` executable (package.json `bin`, built to `dist/cli.mjs`): `npx idempotency-header
 * proxy --upstream http://127.0.0.1:8080` puts an idempotent reverse proxy in front of a running service.
 */
import { main } from './main.js';

process.exitCode = await main(process.argv.slice(2), process.env);
