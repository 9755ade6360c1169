import { z } from 'zod';

/** The bot's settings, validated from the environment (`.env` through dotenv). */
export interface BotConfig {
  discordToken: string;
  applicationId: string;
  guildId?: string;
  /** Base of a Discord-compatible API (discord.js `rest.api`), e.g. http://127.0.0.1:3000/api. */
  apiUrl?: string;
  modelDir: string;
  executionProvider: 'cpu' | 'cuda';
  /**
   * memory (or absent): the engine runs in this process (worker thread); redis: GPU workers take the
   * jobs through BullMQ on `redisUrl`.
   */
  queueBackend?: 'memory' | 'redis';
  redisUrl?: string;
  /** Embedded: engine threads. Redis: jobs dispatched to the GPU workers at once (their number). */
  queueConcurrency: number;
  maxJobsPerUser: number;
  queueMax: number;
  jobTimeoutMs: number;
  /** Minimum time between two progress edits of one message. */
  progressIntervalMs: number;
  /** Empty: every channel. */
  allowedChannelIds: string[];
  /** Lower-case words refused in prompts. */
  blockedWords: string[];
  dataDir: string;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}\nSee .env.example for every setting.`);
    this.name = 'ConfigError';
  }
}

const SNOWFLAKE = /^\d{15,21}$/;

/** dotenv turns `X=` into an empty string: treat it as unset. */
const optionalText = z
  .string()
  .transform((value) => value.trim())
  .optional()
  .transform((value) => (value === undefined || value === '' ? undefined : value));

function integer(name: string, fallback: number, min: number, max: number) {
  return optionalText.transform((value, ctx) => {
    if (value === undefined) return fallback;
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `${name} must be a whole number from ${min} to ${max} (got "${value}")` });
      return z.NEVER;
    }
    return n;
  });
}

function list(value: string | undefined): string[] {
  return (value ?? '')
    .split(',')
    .map((item) => item.trim())
    .filter((item) => item !== '');
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const schema = z.object({
  DISCORD_TOKEN: optionalText.refine((v) => v !== undefined, {
    message: 'DISCORD_TOKEN is missing: copy the bot token from the Discord developer portal (Bot → Reset Token)',
  }),
  DISCORD_APPLICATION_ID: optionalText.refine((v) => v !== undefined && SNOWFLAKE.test(v), {
    message: 'DISCORD_APPLICATION_ID must be the numeric application id (developer portal → General Information)',
  }),
  DISCORD_GUILD_ID: optionalText.refine((v) => v === undefined || SNOWFLAKE.test(v), {
    message: 'DISCORD_GUILD_ID must be a numeric server id (or left empty)',
  }),
  DISCORD_API_URL: optionalText.refine((v) => v === undefined || /^https?:\/\/[^\s/]+(\/\S*)?$/.test(v), {
    message: 'DISCORD_API_URL must be an http(s) URL such as http://127.0.0.1:3000/api (or left empty)',
  }),
  MODEL_DIR: optionalText.transform((v) => v ?? 'models/demo'),
  EXECUTION_PROVIDER: optionalText.transform((value, ctx) => {
    const provider = (value ?? 'cpu').toLowerCase();
    if (provider !== 'cpu' && provider !== 'cuda') {
      ctx.addIssue({ code: 'custom', message: `EXECUTION_PROVIDER must be cpu or cuda (got "${value}")` });
      return z.NEVER;
    }
    return provider;
  }),
  QUEUE_BACKEND: optionalText.transform((value, ctx) => {
    const backend = (value ?? 'memory').toLowerCase();
    if (backend !== 'memory' && backend !== 'redis') {
      ctx.addIssue({ code: 'custom', message: `QUEUE_BACKEND must be memory or redis (got "${value}")` });
      return z.NEVER;
    }
    return backend;
  }),
  REDIS_URL: optionalText.refine((v) => v === undefined || /^rediss?:\/\/\S+$/.test(v), {
    message: 'REDIS_URL must be a redis:// (or rediss://) URL such as redis://127.0.0.1:6379',
  }),
  QUEUE_CONCURRENCY: integer('QUEUE_CONCURRENCY', 1, 1, 64),
  MAX_JOBS_PER_USER: integer('MAX_JOBS_PER_USER', 2, 1, 1000),
  QUEUE_MAX: integer('QUEUE_MAX', 50, 1, 100_000),
  JOB_TIMEOUT_SECONDS: integer('JOB_TIMEOUT_SECONDS', 600, 1, 86_400),
  PROGRESS_INTERVAL_MS: integer('PROGRESS_INTERVAL_MS', 3000, 250, 60_000),
  ALLOWED_CHANNEL_IDS: optionalText.transform((value, ctx) => {
    const ids = list(value);
    const bad = ids.filter((id) => !SNOWFLAKE.test(id));
    if (bad.length > 0) {
      ctx.addIssue({ code: 'custom', message: `ALLOWED_CHANNEL_IDS must be comma-separated channel ids; not ids: ${bad.join(', ')}` });
      return z.NEVER;
    }
    return ids;
  }),
  BLOCKED_WORDS: optionalText.transform((value) => list(value).map((word) => word.toLowerCase())),
  DATA_DIR: optionalText.transform((v) => v ?? './data'),
  LOG_LEVEL: optionalText.transform((value, ctx) => {
    const level = (value ?? 'info').toLowerCase();
    if (!(LOG_LEVELS as readonly string[]).includes(level)) {
      ctx.addIssue({ code: 'custom', message: `LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')} (got "${value}")` });
      return z.NEVER;
    }
    return level as BotConfig['logLevel'];
  }),
});

const checked = schema.superRefine((v, ctx) => {
  if (v.QUEUE_BACKEND === 'redis' && v.REDIS_URL === undefined) {
    ctx.addIssue({ code: 'custom', message: 'REDIS_URL is missing: QUEUE_BACKEND=redis needs the Redis that the GPU workers use, e.g. redis://127.0.0.1:6379' });
  }
});

/** Every environment variable the bot reads (documented in .env.example). */
export const CONFIG_VARIABLES: readonly string[] = Object.keys(schema.shape);

/** Validates the environment; throws ConfigError listing every problem at once. */
export function loadConfig(env: Record<string, string | undefined> = process.env): BotConfig {
  const parsed = checked.safeParse(env);
  if (!parsed.success) {
    throw new ConfigError(parsed.error.issues.map((issue) => issue.message));
  }
  const v = parsed.data;
  return {
    discordToken: v.DISCORD_TOKEN!,
    applicationId: v.DISCORD_APPLICATION_ID!,
    guildId: v.DISCORD_GUILD_ID,
    apiUrl: v.DISCORD_API_URL?.replace(/\/+$/, ''),
    modelDir: v.MODEL_DIR,
    executionProvider: v.EXECUTION_PROVIDER,
    ...(v.QUEUE_BACKEND === 'redis' ? { queueBackend: 'redis' as const, redisUrl: v.REDIS_URL } : {}),
    queueConcurrency: v.QUEUE_CONCURRENCY,
    maxJobsPerUser: v.MAX_JOBS_PER_USER,
    queueMax: v.QUEUE_MAX,
    jobTimeoutMs: v.JOB_TIMEOUT_SECONDS * 1000,
    progressIntervalMs: v.PROGRESS_INTERVAL_MS,
    allowedChannelIds: v.ALLOWED_CHANNEL_IDS,
    blockedWords: v.BLOCKED_WORDS,
    dataDir: v.DATA_DIR,
    logLevel: v.LOG_LEVEL,
  };
}

/** For entry points: the validated configuration, or each problem printed and exit code 1. */
export function loadConfigOrExit(env: Record<string, string | undefined> = process.env): BotConfig {
  try {
    return loadConfig(env);
  } catch (error) {
    if (error instanceof ConfigError) {
      console.error(error.message);
      process.exit(1);
    }
    throw error;
  }
}
