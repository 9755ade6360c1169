// The embedded engine survives the death of its thread: restarted, and the job runs again once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { startSupervisedEngine } from '../src/worker/supervised-engine.ts';
import { TINY } from './helpers/fixture.ts';

const request = { prompt: 'a green ring', mode: 'single' as const, experts: ['alpha'], seed: 9, steps: 40 };

test('a job whose engine thread dies mid-run completes on a restarted thread', async () => {
  const reasons: string[] = [];
  const engine = await startSupervisedEngine({ modelDir: TINY }, { onRestart: (r) => reasons.push(r) });
  try {
    const reference = await engine.generate(request);
    let killed = false;
    const result = await engine.generate(
      request,
      {
        onProgress: (e) => {
          if (e.step === 2 && !killed) {
            killed = true;
            void engine.worker().then((w) => w.crash());
          }
        },
      },
    );
    assert.ok(killed);
    assert.equal(engine.restarts, 1);
    assert.equal(reasons.length, 1);
    assert.deepEqual(result.images[0].image.data, reference.images[0].image.data);
  } finally {
    await engine.dispose();
  }
});

test('a job that kills its engine every time fails with a clear message', async () => {
  const engine = await startSupervisedEngine({ modelDir: TINY });
  try {
    await assert.rejects(
      engine.generate(request, { onProgress: (e) => e.step === 1 && void engine.worker().then((w) => w.crash()) }),
      (err: unknown) => err instanceof EngineError && err.code === 'unavailable' && /stopped 2 times/.test(err.message),
    );
    const after = await engine.generate({ ...request, steps: 2 });
    assert.equal(after.images.length, 1);
  } finally {
    await engine.dispose();
  }
});

test('an engine pool runs jobs on several threads at once', async () => {
  const { startEnginePool, EnginePool } = await import('../src/worker/engine-pool.ts');
  const pool = await startEnginePool({ modelDir: TINY }, 2);
  try {
    assert.ok(pool instanceof EnginePool && pool.size === 2);
    const spans = new Map<number, { first: number; last: number }>();
    const job = (seed: number) =>
      pool.generate({ ...request, seed, steps: 50, count: 4 }, {
        onProgress: () => {
          const now = performance.now();
          const span = spans.get(seed) ?? { first: now, last: now };
          span.last = now;
          spans.set(seed, span);
        },
      });
    const [a, b] = await Promise.all([job(1), job(2)]);
    const [s1, s2] = [spans.get(1)!, spans.get(2)!];
    assert.ok(Math.max(s1.first, s2.first) < Math.min(s1.last, s2.last), 'both jobs were in progress at the same time');
    assert.deepEqual([a.images[0].seed, b.images[0].seed], [1, 2]);
  } finally {
    await pool.dispose();
  }
});
