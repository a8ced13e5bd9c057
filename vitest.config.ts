import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
    // Most suites spend their time waiting on sockets, timers and servers, not on the CPU: four workers on two
    // cores keep them busy without starving one another.
    maxWorkers: 4,
  },
});
