// The engine in a worker_thread: the caller's event loop keeps ticking while it generates.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { EngineError, type EngineClient } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { startEngineWorker } from '../src/worker/engine-worker.ts';
import { copyOfTiny, maxAbsDiff, TINY } from './helpers/fixture.ts';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

const request = { prompt: 'a blue square at the top', mode: 'afa' as const, ensemble: 'duo', seed: 5, steps: 30, contributions: true };

describe('engine worker thread', () => {
  let client: EngineClient;
  before(async () => {
    client = await startEngineWorker({ modelDir: TINY, warmUp: true });
  });
  after(async () => client.dispose());

  test('generates the same image as the in-process engine, with progress events', async () => {
    const steps: number[] = [];
    const result = await client.generate(request, { onProgress: (e) => steps.push(e.step) });
    assert.equal(steps.length, 30);
    const engine = await Engine.load(TINY);
    const direct = await engine.generate(request);
    await engine.dispose();
    assert.equal(maxAbsDiff(result.images[0].image.data, direct.images[0].image.data), 0);
    assert.ok(result.images[0].contributions!.weights[0] instanceof Float32Array);
    assert.equal((await client.info()).name, 'tiny');
  });

  test('the main event loop keeps ticking (lag < 50 ms) during a generation', async () => {
    let worst = 0;
    let last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      worst = Math.max(worst, now - last - 5);
      last = now;
    }, 5);
    const started = performance.now();
    await client.generate({ ...request, steps: 40, count: 2 });
    const took = performance.now() - started;
    clearInterval(timer);
    assert.ok(took > 100, `the generation should take a while to make the test meaningful (${took.toFixed(0)} ms)`);
    assert.ok(worst < 50, `event loop lag ${worst.toFixed(1)} ms`);
  });

  test('cancel stops a running job and the worker goes on with the next', async () => {
    const controller = new AbortController();
    const running = client.generate({ ...request, steps: 50 }, { signal: controller.signal, onProgress: (e) => e.step === 3 && controller.abort() });
    await assert.rejects(running, (e: unknown) => e instanceof EngineError && e.code === 'cancelled');
    const next = await client.generate({ ...request, steps: 3 });
    assert.equal(next.images.length, 1);
  });

  test('bad requests come back as EngineErrors with their message', async () => {
    await assert.rejects(client.generate({ ...request, ensemble: 'nope' }), (e: unknown) => e instanceof EngineError && e.code === 'unknown_model' && /duo/.test(e.message));
  });
});

test('a package that cannot load fails the start with the reason', async () => {
  const dir = await copyOfTiny();
  await writeFile(path.join(dir, 'vae_decoder/model.onnx'), 'garbage');
  await assert.rejects(startEngineWorker({ modelDir: dir, warmUp: true }), (e: unknown) => e instanceof EngineError && /vae_decoder\/model\.onnx/.test(e.message));
});
