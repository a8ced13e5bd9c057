/**
 * NestJS example: an order endpoint made safe to retry, on the in-memory backend, on Nest's Express platform
 * (PLATFORM=fastify for Fastify).
 *
 *   npm run example:nestjs   # http://127.0.0.1:3000
 *
 * Environment: PORT (3000; 0 picks a free one), HOST (127.0.0.1), PLATFORM (express or fastify).
 * Nest needs legacy decorators: this directory's tsconfig.json turns them on, and the npm script hands it to tsx.
 */
import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import { Body, Controller, Inject, Injectable, Module, NotFoundException, Post, Req } from '@nestjs/common';
import { APP_INTERCEPTOR, NestFactory } from '@nestjs/core';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { MemoryBackend } from 'idempotency-header';
import {
  IdempotencyInterceptor,
  IdempotencyModule,
  Idempotent,
  idempotencyOf,
} from 'idempotency-header/nestjs';

@Injectable()
class OrdersService {
  #count = 0;

  create(item: string | undefined, key: string | undefined) {
    return { number: ++this.#count, item: item ?? null, key: key ?? null };
  }
}

@Controller()
class OrdersController {
  // tsx (esbuild) does not emit decorator metadata, so the dependency is named rather than read from its type.
  constructor(@Inject(OrdersService) private readonly orders: OrdersService) {}

  // Covered by the global interceptor: POST and PATCH with an Idempotency-Key header.
  @Post('orders')
  create(@Body() body: { item?: string }, @Req() req: object) {
    return this.orders.create(body?.item, idempotencyOf(req)?.key);
  }

  // Its own options: the key is required here.
  @Post('payments')
  @Idempotent({ required: true })
  pay(@Body() body: { amount?: number }) {
    if (!body?.amount) throw new NotFoundException('nothing to pay'); // a 4xx: stored and replayed like a response
    return { paid: body.amount };
  }

  // A route that must never be deduplicated opts out.
  @Post('webhooks')
  @Idempotent(false)
  webhook() {
    return { received: true };
  }
}

@Module({
  imports: [IdempotencyModule.forRoot({ backend: new MemoryBackend() })],
  controllers: [OrdersController],
  providers: [OrdersService, { provide: APP_INTERCEPTOR, useClass: IdempotencyInterceptor }],
})
class AppModule {}

const platform = process.env.PLATFORM === 'fastify' ? 'fastify' : 'express';
const app =
  platform === 'fastify'
    ? await NestFactory.create(AppModule, new FastifyAdapter(), { logger: ['error', 'warn'] })
    : await NestFactory.create(AppModule, { logger: ['error', 'warn'] });
app.enableShutdownHooks();
await app.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1');
const address = (await app.getUrl()).replace('[::1]', 'localhost');
const curl = `curl -i -X POST ${address}/orders -H 'Idempotency-Key: ${randomUUID()}' -H 'Content-Type: application/json' -d '{"item":"book"}'`;
console.log(`Listening on ${address}/orders (NestJS on ${platform}, MemoryBackend)`);
console.log(
  'Run this twice: the first creates order 1; the second replays it, with Idempotent-Replayed: true.',
);
console.log(`  ${curl}\n  ${curl}`);
