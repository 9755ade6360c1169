// `npm run worker`: a GPU worker of the distributed mode (one process per GPU). Loads MODEL_DIR, then
// takes that package's jobs from Redis (REDIS_URL). A package that cannot be loaded takes no jobs: the
// worker says why in its log and in its advertisement, and exits non-zero. If the engine thread dies
// mid-job, the worker exits too (status 70) and leaves the job to another worker.
import { config as loadDotenv } from 'dotenv';
import type { EngineClient } from '../engine/api.ts';
import { EngineThread } from '../engine-host/engine-thread.ts';
import { createLogger } from '../log/logger.ts';
import { holdingForTests, testHoldStep } from './test-hold.ts';
import { loadWorkerConfig, WorkerConfigError, type WorkerConfig } from './worker-config.ts';
import { advertiseUnhealthy, WorkerHost } from './worker-host.ts';

function redisPassword(url: string): string[] {
  try {
    const password = decodeURIComponent(new URL(url).password);
    return password ? [password] : [];
  } catch {
    return [];
  }
}

function withTimeout<T>(work: Promise<T>, ms: number): Promise<T | undefined> {
  return Promise.race([work, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), ms).unref())]);
}

async function main(): Promise<void> {
  loadDotenv({ quiet: true });
  let config: WorkerConfig;
  try {
    config = loadWorkerConfig(process.env);
  } catch (error) {
    if (error instanceof WorkerConfigError) {
      console.error(error.message);
      process.exit(1);
    }
    throw error;
  }
  const logger = createLogger({ level: config.logLevel, secrets: redisPassword(config.redisUrl) });
  process.on('unhandledRejection', (reason) => logger.error({ err: reason }, 'unhandled rejection'));

  let thread: EngineThread;
  try {
    thread = await EngineThread.start({
      modelDir: config.modelDir,
      executionProvider: config.executionProvider,
      threads: config.threads,
      warmUp: true,
    });
  } catch (error) {
    const problem = `cannot load the model package ${config.modelDir}: ${error instanceof Error ? error.message : String(error)}`;
    logger.error({ worker: config.workerId, problem }, 'the model package could not be loaded; this worker takes no jobs');
    await withTimeout(advertiseUnhealthy(config.redisUrl, config.workerId, problem, logger), 10_000).catch(() => undefined);
    process.exit(1);
  }
  // test seam (test/distributed.test.ts only): holds marked jobs at a step until SIGUSR2; see test-hold.ts
  const holdStep = testHoldStep(process.env);
  const engine: EngineClient = holdStep === undefined ? thread : holdingForTests(thread, holdStep, logger);

  const host = await WorkerHost.start({
    redisUrl: config.redisUrl,
    engine,
    workerId: config.workerId,
    logger,
    timings: config.timings,
    onEngineLost: () => process.exit(70),
  });

  let signals = 0;
  const shutdown = (signal: string): void => {
    signals += 1;
    if (signals > 1) {
      // a second signal: leave the running job to another worker (its lock expires)
      logger.warn({ signal }, 'stopping at once');
      process.exit(1);
    }
    logger.info({ signal }, 'finishing the running job, then stopping');
    host
      .stop()
      .then(() => engine.dispose())
      .then(
        () => process.exit(0),
        (error: unknown) => {
          logger.error({ err: error }, 'shutdown failed');
          process.exit(1);
        },
      );
  };
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('SIGTERM', () => shutdown('SIGTERM'));
}

main().catch((error: unknown) => {
  console.error(`The worker could not start: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
});
