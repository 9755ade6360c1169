import { z } from 'zod';
import { DEFAULT_WORKER_TIMINGS, defaultWorkerId, type WorkerTimings } from './worker-host.ts';

/** Settings of `npm run worker` (one process per GPU), validated from the environment. */
export interface WorkerConfig {
  redisUrl: string;
  modelDir: string;
  executionProvider: 'cpu' | 'cuda';
  /** onnxruntime intra-op threads (CPU); unset: onnxruntime's default. */
  threads?: number;
  workerId: string;
  timings: Pick<WorkerTimings, 'lockDurationMs' | 'stalledIntervalMs' | 'heartbeatMs'>;
  logLevel: string;
}

export class WorkerConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid worker configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'WorkerConfigError';
  }
}

const text = z
  .string()
  .optional()
  .transform((v) => (v === undefined || v.trim() === '' ? undefined : v.trim()));

function integer(name: string, min: number, max: number) {
  return text.transform((value, ctx) => {
    if (value === undefined) return undefined;
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `${name} must be a whole number from ${min} to ${max} (got "${value}")` });
      return z.NEVER;
    }
    return n;
  });
}

export const REDIS_URL_PATTERN = /^rediss?:\/\/\S+$/;

const schema = z.object({
  REDIS_URL: text.refine((v) => v !== undefined && REDIS_URL_PATTERN.test(v), {
    message: 'REDIS_URL must be the Redis the bot uses, e.g. redis://:password@bot-host:6379 (rediss:// for TLS)',
  }),
  MODEL_DIR: text.transform((v) => v ?? 'models/demo'),
  EXECUTION_PROVIDER: text.transform((value, ctx) => {
    const provider = (value ?? 'cpu').toLowerCase();
    if (provider !== 'cpu' && provider !== 'cuda') {
      ctx.addIssue({ code: 'custom', message: `EXECUTION_PROVIDER must be cpu or cuda (got "${value}")` });
      return z.NEVER;
    }
    return provider;
  }),
  ENGINE_THREADS: integer('ENGINE_THREADS', 1, 256),
  WORKER_ID: text.refine((v) => v === undefined || /^[\w.@-]{1,100}$/.test(v), {
    message: 'WORKER_ID may use letters, digits, . _ - @ (at most 100)',
  }),
  WORKER_LOCK_MS: integer('WORKER_LOCK_MS', 1000, 600_000),
  WORKER_STALLED_INTERVAL_MS: integer('WORKER_STALLED_INTERVAL_MS', 500, 600_000),
  WORKER_HEARTBEAT_MS: integer('WORKER_HEARTBEAT_MS', 200, 60_000),
  LOG_LEVEL: text.transform((v) => (v ?? 'info').toLowerCase()),
});

export function loadWorkerConfig(env: Record<string, string | undefined> = process.env): WorkerConfig {
  const parsed = schema.safeParse(env);
  if (!parsed.success) throw new WorkerConfigError(parsed.error.issues.map((issue) => issue.message));
  const v = parsed.data;
  return {
    redisUrl: v.REDIS_URL!,
    modelDir: v.MODEL_DIR,
    executionProvider: v.EXECUTION_PROVIDER,
    threads: v.ENGINE_THREADS,
    workerId: v.WORKER_ID ?? defaultWorkerId(),
    timings: {
      lockDurationMs: v.WORKER_LOCK_MS ?? DEFAULT_WORKER_TIMINGS.lockDurationMs,
      stalledIntervalMs: v.WORKER_STALLED_INTERVAL_MS ?? DEFAULT_WORKER_TIMINGS.stalledIntervalMs,
      heartbeatMs: v.WORKER_HEARTBEAT_MS ?? DEFAULT_WORKER_TIMINGS.heartbeatMs,
    },
    logLevel: v.LOG_LEVEL,
  };
}
