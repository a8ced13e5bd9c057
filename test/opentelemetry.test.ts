/**
 * The OpenTelemetry integration (`idempotency-header/opentelemetry`): spans and metrics from the middleware's
 * events, recorded with the OpenTelemetry SDK's in-memory exporters through a real Express app.
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import {
  AggregationTemporality,
  InMemoryMetricExporter,
  MeterProvider,
  PeriodicExportingMetricReader,
} from '@opentelemetry/sdk-metrics';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import express from 'express';
import { afterAll, describe, expect, it } from 'vitest';
import { idempotencyHeader } from '../src/adapters/express.js';
import { MemoryBackend } from '../src/backends/memory.js';
import type { IdempotencyEvent } from '../src/core/options.js';
import { openTelemetry } from '../src/opentelemetry.js';
import { listen, send } from './support/http.js';

describe('openTelemetry()', () => {
  const spans = new InMemorySpanExporter();
  const tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] });
  const metricExporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const reader = new PeriodicExportingMetricReader({
    exporter: metricExporter,
    exportIntervalMillis: 60_000,
  });
  const meterProvider = new MeterProvider({ readers: [reader] });

  afterAll(async () => {
    await tracerProvider.shutdown();
    await meterProvider.shutdown();
  });

  it('records a span per handled request and counts outcomes, and hands events on', async () => {
    const seen: IdempotencyEvent[] = [];
    const app = express();
    app.use(express.json());
    app.use(
      idempotencyHeader({
        backend: new MemoryBackend(),
        onEvent: openTelemetry({
          tracer: tracerProvider.getTracer('test'),
          meter: meterProvider.getMeter('test'),
          onEvent: (event) => seen.push(event),
        }),
      }),
    );
    app.post('/orders', (_req, res) => {
      res.status(201).json({ id: 1 });
    });
    const server = await listen(createServer(app));
    try {
      const key = randomUUID();
      await send(`${server.url}/orders`, { key, body: {} });
      await send(`${server.url}/orders`, { key, body: {} });
      await send(`${server.url}/orders`, { key, body: { other: true } });
    } finally {
      await server.close();
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(seen.map((event) => event.outcome)).toEqual(['executed', 'replayed', 'mismatch']);

    const finished = spans.getFinishedSpans();
    expect(finished.map((span) => span.name)).toEqual([
      'idempotency executed',
      'idempotency replayed',
      'idempotency mismatch',
    ]);
    const [executed] = finished;
    expect(executed!.attributes['idempotency.outcome']).toBe('executed');
    expect(executed!.attributes['http.response.status_code']).toBe(201);
    expect(executed!.attributes['idempotency.key_hash']).toMatch(/^[0-9a-f]{64}$/);
    expect(typeof executed!.attributes['idempotency.backend.duration_ms']).toBe('number');
    expect(JSON.stringify(finished.map((span) => span.attributes))).not.toContain('"key"');

    await reader.forceFlush();
    const metrics = metricExporter
      .getMetrics()
      .flatMap((resource) => resource.scopeMetrics.flatMap((scope) => scope.metrics));
    const sum = (name: string) =>
      metrics
        .filter((metric) => metric.descriptor.name === name)
        .flatMap((metric) => metric.dataPoints as { value: unknown }[])
        .reduce((total, point) => total + (point.value as number), 0);
    expect(sum('idempotency.requests')).toBe(3);
    expect(sum('idempotency.replays')).toBe(1);
    expect(sum('idempotency.mismatches')).toBe(1);
    expect(metrics.some((metric) => metric.descriptor.name === 'idempotency.backend.duration')).toBe(true);
  });

  it('marks spans of failures as errors, with the exception', () => {
    const record = openTelemetry({
      tracer: tracerProvider.getTracer('test'),
      meter: meterProvider.getMeter('test'),
    });
    const error = new Error('redis down');
    record({
      outcome: 'backend-error',
      keyHash: undefined,
      method: 'POST',
      status: 503,
      durationMs: 3,
      error,
    });
    const span = spans.getFinishedSpans().at(-1)!;
    expect(span.name).toBe('idempotency backend-error');
    expect(span.status.code).toBe(2);
    expect(span.events.some((event) => event.name === 'exception')).toBe(true);
  });
});
