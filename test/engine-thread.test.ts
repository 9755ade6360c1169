// The engine in a worker_thread: the caller's event loop keeps serving callbacks while it generates.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { EngineThread, startEngineThread } from '../src/engine-host/engine-thread.ts';
import { StepHold } from '../src/engine-host/step-hold.ts';
import { copyOfTiny, maxAbsDiff, TINY } from './helpers/fixture.ts';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

const request = { prompt: 'a blue square at the top', mode: 'afa' as const, ensemble: 'duo', seed: 5, steps: 30, contributions: true };

const cancelled = (e: unknown) => e instanceof EngineError && e.code === 'cancelled';

describe('engine thread', () => {
  let client: EngineThread;
  before(async () => {
    client = await EngineThread.start({ modelDir: TINY, warmUp: true });
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

  test('the main event loop keeps serving callbacks while a generation is in progress', async () => {
    // The job is held on its thread after step 2 (the thread blocks in Atomics.wait) until the last
    // of TURNS callbacks, each queued by the one before and so each needing its own turn of this
    // thread's event loop, releases it. Were the engine on this thread, the hold would block this
    // event loop and no callback could run: the job would never finish. Ordering, not durations.
    const TURNS = 20;
    const log: string[] = [];
    const hold = new StepHold(2);
    let turns = 0;
    const turn = (): void => {
      log.push(`turn ${++turns}`);
      if (turns < TURNS) setImmediate(turn);
      else hold.release();
    };
    const result = await client.generate(
      { ...request, steps: 40, count: 2 },
      {
        hold,
        onProgress: (e) => {
          log.push(`step ${e.step}`);
          if (e.step === 2) setImmediate(turn);
        },
      },
    );
    assert.equal(result.images.length, 2);
    assert.deepEqual(log, [
      'step 1',
      'step 2',
      ...Array.from({ length: TURNS }, (_, k) => `turn ${k + 1}`),
      ...Array.from({ length: 38 }, (_, k) => `step ${k + 3}`),
    ]);
  });

  test('cancel stops a running job and the thread goes on with the next', async () => {
    // Held after step 3, the job cannot finish before the abort reaches it: cancelling releases the
    // hold, and the thread sees the cancellation at the next step boundary.
    const controller = new AbortController();
    const hold = new StepHold(3);
    const seen: number[] = [];
    const running = client.generate(
      { ...request, steps: 50 },
      { signal: controller.signal, hold, onProgress: (e) => (seen.push(e.step), e.step === 3 && controller.abort()) },
    );
    await assert.rejects(running, cancelled);
    assert.deepEqual(seen, [1, 2, 3], 'stopped right after the step it was cancelled at');
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
  await assert.rejects(startEngineThread({ modelDir: dir, warmUp: true }), (e: unknown) => e instanceof EngineError && /vae_decoder\/model\.onnx/.test(e.message));
});
