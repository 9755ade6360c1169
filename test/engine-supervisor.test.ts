// The embedded engine survives the death of its thread: restarted, and the job runs again once.
// Jobs are held at a step (StepHold) while the test acts, so nothing depends on how fast a thread runs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { StepHold } from '../src/engine-host/step-hold.ts';
import { startSupervisedEngine } from '../src/engine-host/supervised-engine.ts';
import { TINY } from './helpers/fixture.ts';

const request = { prompt: 'a green ring', mode: 'single' as const, experts: ['alpha'], seed: 9, steps: 40 };

test('a job whose engine thread dies mid-run completes on a restarted thread', async () => {
  const reasons: string[] = [];
  const engine = await startSupervisedEngine({ modelDir: TINY }, { onRestart: (r) => reasons.push(r) });
  try {
    const reference = await engine.generate(request);
    // held after step 2 on every run: the first run is killed there, the rerun goes on
    const hold = new StepHold(2);
    let killed = false;
    const result = await engine.generate(request, {
      hold,
      onProgress: async (e) => {
        if (e.step !== 2) return;
        if (!killed) {
          killed = true;
          (await engine.thread()).crash();
        }
        hold.release();
      },
    });
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
    const hold = new StepHold(1);
    const killAtStep1 = async (e: { step: number }) => {
      if (e.step !== 1) return;
      (await engine.thread()).crash();
      hold.release();
    };
    await assert.rejects(
      engine.generate(request, { hold, onProgress: (e) => void killAtStep1(e) }),
      (err: unknown) => err instanceof EngineError && err.code === 'unavailable' && /stopped 2 times/.test(err.message),
    );
    const after = await engine.generate({ ...request, steps: 2 });
    assert.equal(after.images.length, 1);
  } finally {
    await engine.dispose();
  }
});

test('an engine pool runs jobs on several threads at once', { timeout: 120_000 }, async () => {
  const { startEnginePool, EnginePool } = await import('../src/engine-host/engine-pool.ts');
  const pool = await startEnginePool({ modelDir: TINY }, 2);
  try {
    assert.ok(pool instanceof EnginePool && pool.size === 2);
    // Job A stops after its first step and stays there until job B has finished: on one thread B
    // could never start (the test would time out); on two, B runs to the end while A waits.
    const hold = new StepHold(1);
    let aReachedStep1!: () => void;
    const aAtStep1 = new Promise<void>((resolve) => (aReachedStep1 = resolve));
    let bFinished = false;
    const aSteps: number[] = [];
    const a = pool.generate({ ...request, seed: 1, steps: 3 }, {
      hold,
      onProgress: (e) => {
        aSteps.push(e.step);
        if (e.step === 1) aReachedStep1();
      },
    });
    await aAtStep1;
    const b = await pool.generate({ ...request, seed: 2, steps: 3 });
    bFinished = true;
    assert.deepEqual(aSteps, [1], 'A was still held at step 1 when B finished');
    hold.release();
    const resultA = await a;
    assert.ok(bFinished);
    assert.deepEqual(aSteps, [1, 2, 3]);
    assert.deepEqual([resultA.images[0].seed, b.images[0].seed], [1, 2]);
  } finally {
    await pool.dispose();
  }
});
