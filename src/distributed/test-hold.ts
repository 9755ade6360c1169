// A test seam of `npm run worker`, for test/distributed.test.ts only. That test runs workers as child
// processes, where a StepHold (src/engine-host/step-hold.ts) created by the test cannot reach, yet it
// must act (SIGKILL a worker, cancel a job, restart Redis) while a job is certainly running, without
// racing the engine (no test may depend on timing). With WORKER_TEST_HOLD_STEP=N in the
// worker's environment, every run of a job whose prompt starts with HOLD_PROMPT_PREFIX stops on the
// engine thread right after step N, the worker logs 'job held', and the job goes on when the process
// gets SIGUSR2 (or is cancelled). Without the variable, which production never sets, nothing changes.
import type { EngineClient, GenerateCallOptions, GenerateRequest } from '../engine/api.ts';
import type { EngineThread } from '../engine-host/engine-thread.ts';
import { StepHold } from '../engine-host/step-hold.ts';
import type { DistributedLogger } from './redis.ts';

/** The prompt prefix of the jobs that a worker started with WORKER_TEST_HOLD_STEP holds. */
export const HOLD_PROMPT_PREFIX = '[hold] ';

/** The step WORKER_TEST_HOLD_STEP names, if it is set (a whole number from 1). */
export function testHoldStep(env: Record<string, string | undefined>): number | undefined {
  const value = env.WORKER_TEST_HOLD_STEP;
  if (value === undefined || value === '') return undefined;
  const step = Number(value);
  if (!Number.isInteger(step) || step < 1) throw new Error(`WORKER_TEST_HOLD_STEP must be a whole number from 1 (got "${value}")`);
  return step;
}

/** The engine thread, holding the marked jobs after `step` until SIGUSR2 (see above). */
export function holdingForTests(engine: EngineThread, step: number, logger: DistributedLogger): EngineClient {
  /** The marked job running now (the worker runs one at a time). */
  let current: StepHold | undefined;
  process.on('SIGUSR2', () => current?.release());
  return {
    info: () => engine.info(),
    dispose: () => engine.dispose(),
    async generate(request: GenerateRequest, options: GenerateCallOptions = {}) {
      if (!request.prompt.startsWith(HOLD_PROMPT_PREFIX)) return engine.generate(request, options);
      const hold = new StepHold(step);
      current = hold;
      try {
        return await engine.generate(request, {
          ...options,
          hold,
          onProgress: (event) => {
            options.onProgress?.(event);
            // the engine thread marked itself held before it sent this step's event
            if (event.step === step && !options.signal?.aborted) logger.info({ step }, 'job held');
          },
        });
      } finally {
        if (current === hold) current = undefined;
      }
    },
  };
}
