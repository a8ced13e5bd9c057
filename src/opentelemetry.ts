import {
  type Attributes,
  type Meter,
  metrics,
  SpanKind,
  SpanStatusCode,
  type Tracer,
  trace,
} from '@opentelemetry/api';
import type { IdempotencyEvent, IdempotencyOutcome } from './core/options.js';

/**
 * Options of {@link openTelemetry}.
 *
 * @example
 * ```ts
 * const options: OpenTelemetryOptions = { tracer: provider.getTracer('payments') };
 * ```
 */
export interface OpenTelemetryOptions {
  /** Where spans go. @default the global tracer provider's `idempotency-header` tracer */
  tracer?: Tracer;
  /** Where metrics go. @default the global meter provider's `idempotency-header` meter */
  meter?: Meter;
  /** Called with every event too, after it was recorded: for your own logging. */
  onEvent?: (event: IdempotencyEvent) => void;
}

/** Outcomes that each have a counter of their own, besides `idempotency.requests` by outcome. */
const COUNTED: Partial<Record<IdempotencyOutcome, [name: string, description: string]>> = {
  replayed: ['idempotency.replays', 'Stored responses sent again instead of running the handler'],
  conflict: ['idempotency.conflicts', 'Duplicates answered 409 while the first request ran'],
  mismatch: ['idempotency.mismatches', 'Keys reused for a different request (422)'],
  'lease-lost': ['idempotency.lease_takeovers', 'Requests whose lease lapsed and was taken over by another'],
  'backend-error': ['idempotency.backend_errors', 'Backend failures on lookup or release'],
  'store-failed': ['idempotency.store_failures', 'Responses that could not be stored after every attempt'],
};

/** Outcomes that mean something went wrong on the server's side: their spans are marked as errors. */
const FAILED = new Set<IdempotencyOutcome>(['backend-error', 'store-failed', 'lease-lost', 'abandoned']);

/**
 * Records the middleware's events in OpenTelemetry: a span per handled request (`idempotency <outcome>`, from
 * when the middleware saw the request to its outcome, with the outcome, the hashed key, the status and the time
 * spent in the backend), a counter of requests by outcome, counters of replays, conflicts, mismatches, lease
 * takeovers, backend errors and failed stores, and a histogram of backend time. Pass it as `onEvent`.
 *
 * Only this module imports `@opentelemetry/api` (an optional peer dependency): an application that does not use
 * it loads nothing of OpenTelemetry. Without an SDK registered, the API's no-op tracer and meter make it free.
 *
 * @example
 * ```ts
 * import { openTelemetry } from 'idempotency-header/opentelemetry';
 *
 * app.use(idempotencyHeader({ backend, onEvent: openTelemetry() }));
 * ```
 */
export function openTelemetry(options: OpenTelemetryOptions = {}): (event: IdempotencyEvent) => void {
  const tracer = options.tracer ?? trace.getTracer('idempotency-header');
  const meter = options.meter ?? metrics.getMeter('idempotency-header');
  const requests = meter.createCounter('idempotency.requests', {
    description: 'Requests the idempotency middleware handled, by outcome',
  });
  const counters = new Map(
    Object.entries(COUNTED).map(([outcome, [name, description]]) => [
      outcome,
      meter.createCounter(name, { description }),
    ]),
  );
  const backendTime = meter.createHistogram('idempotency.backend.duration', {
    description: 'Time spent waiting for the idempotency backend, per request',
    unit: 'ms',
  });
  const next = options.onEvent;
  return function recordIdempotencyEvent(event) {
    const attributes: Attributes = {
      'idempotency.outcome': event.outcome,
      'http.request.method': event.method,
    };
    if (event.status !== undefined) attributes['http.response.status_code'] = event.status;
    requests.add(1, attributes);
    counters.get(event.outcome)?.add(1, attributes);
    if (event.backendMs !== undefined) backendTime.record(event.backendMs, attributes);

    const endTime = performance.timeOrigin + performance.now();
    const span = tracer.startSpan(`idempotency ${event.outcome}`, {
      kind: SpanKind.INTERNAL,
      startTime: endTime - event.durationMs,
      attributes: {
        ...attributes,
        ...(event.keyHash === undefined ? {} : { 'idempotency.key_hash': event.keyHash }),
        ...(event.backendMs === undefined ? {} : { 'idempotency.backend.duration_ms': event.backendMs }),
        ...(event.clientGone ? { 'idempotency.client_gone': true } : {}),
      },
    });
    if (event.error instanceof Error) span.recordException(event.error);
    if (FAILED.has(event.outcome)) span.setStatus({ code: SpanStatusCode.ERROR, message: event.outcome });
    span.end(endTime);
    next?.(event);
  };
}
