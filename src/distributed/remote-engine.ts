// The bot's EngineClient in the distributed mode: each generation becomes a BullMQ job in its model
// package's queue; a GPU worker runs it and the result comes back through Redis. The bot's fair queue
// still decides what is dispatched and when (QUEUE_CONCURRENCY jobs at a time), so positions and
// per-user limits work as in the embedded mode; the bot itself never loads a model.
import { randomUUID } from 'node:crypto';
import { Queue, QueueEvents, type JobType } from 'bullmq';
import type { Redis } from 'ioredis';
import { EngineError, type EngineClient, type GenerateCallOptions, type GenerateRequest, type GenerateResult, type PackageInfo, type ProgressEvent } from '../engine/api.ts';
import { packageId, QUEUE_PREFIX, queueNameFor, redisKeys } from './names.ts';
import { decodeFailure, encodeRequest, JOB_NAME, type RemoteJobData, type RemoteJobProgress } from './protocol.ts';
import { bullConnection, createRedis, type DistributedLogger } from './redis.ts';
import { choosePackage, listPackages, listWorkers, type WorkerAdvert } from './registry.ts';
import { decodeImage, decodeResult } from './result-codec.ts';

export interface RemoteEngineOptions {
  redisUrl: string;
  /** Who dispatches (the bot's application id). A restarted bot cancels the jobs it left behind. */
  owner: string;
  logger: DistributedLogger;
  /** `name@version` to serve; default: the package most live workers have (see choosePackage). */
  packageId?: string;
  /** How long connect() waits for a worker to publish a package (default: until one does). */
  waitForPackageMs?: number;
  /** How often unfinished jobs are looked up, in case an event was missed (default 3000). */
  checkIntervalMs?: number;
}

/** Dispatched job state a bot keeps: how to deliver its outcome. */
interface Dispatched {
  data: RemoteJobData;
  dispatchedAt: number;
  resolve: (result: GenerateResult) => void;
  reject: (error: Error) => void;
  onProgress?: (event: ProgressEvent) => void;
  /** Progress and the result are delivered in order, one after the other. */
  chain: Promise<void>;
  cleanup: () => void;
}

/** How long a cancellation mark stays (a worker that picks the job up later still sees it). */
const CANCEL_TTL_MS = 3_600_000;
const UNFINISHED_STATES: JobType[] = ['waiting', 'active', 'delayed', 'prioritized', 'waiting-children'];

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitForPackage(redis: Redis, options: RemoteEngineOptions): Promise<PackageInfo> {
  const deadline = Date.now() + (options.waitForPackageMs ?? Infinity);
  let loggedAt = 0;
  for (;;) {
    const info = choosePackage(await listWorkers(redis), await listPackages(redis), options.packageId);
    if (info) return info;
    const what = options.packageId ? `the model package ${options.packageId}` : 'a model package';
    if (Date.now() >= deadline) {
      throw new EngineError('bad_package', `No GPU worker has published ${what} in Redis: start \`npm run worker\` on a GPU host with the same REDIS_URL.`);
    }
    if (Date.now() - loggedAt > 30_000) {
      options.logger.info({}, `waiting for a GPU worker to publish ${what} (npm run worker)`);
      loggedAt = Date.now();
    }
    await sleep(250);
  }
}

export class RemoteEngineClient implements EngineClient {
  private readonly dispatched = new Map<string, Dispatched>();
  private readonly cancelling = new Set<Promise<void>>();
  private readonly checkTimer: NodeJS.Timeout;
  private checking = false;
  private disposed = false;

  private constructor(
    private readonly options: RemoteEngineOptions,
    private readonly redis: Redis,
    private readonly packageInfo: PackageInfo,
    private readonly queue: Queue<RemoteJobData>,
    private readonly events: QueueEvents,
  ) {
    const { logger } = options;
    events.on('progress', ({ jobId, data }) => this.onProgress(jobId, data as unknown as RemoteJobProgress));
    events.on('completed', ({ jobId }) => this.onCompleted(jobId));
    events.on('failed', ({ jobId, failedReason }) => this.settle(jobId, decodeFailure(failedReason)));
    events.on('stalled', ({ jobId }) => {
      if (this.dispatched.has(jobId)) logger.warn({ job: jobId }, 'the GPU worker running a job stopped; the job runs again on another worker');
    });
    events.on('error', (error) => logger.warn({ err: error }, 'queue events error'));
    queue.on('error', (error) => logger.warn({ err: error }, 'queue error'));
    this.checkTimer = setInterval(() => void this.checkUnfinished(), options.checkIntervalMs ?? 3000);
  }

  /** Connects to Redis, picks the package to serve (waiting for a worker to publish one) and cancels this bot's leftovers. */
  static async connect(options: RemoteEngineOptions): Promise<RemoteEngineClient> {
    const redis = createRedis(options.redisUrl, options.logger, 'bot');
    try {
      const info = await waitForPackage(redis, options);
      const name = queueNameFor(info);
      const queue = new Queue<RemoteJobData>(name, { connection: bullConnection(options.redisUrl), prefix: QUEUE_PREFIX });
      const events = new QueueEvents(name, { connection: bullConnection(options.redisUrl), prefix: QUEUE_PREFIX });
      await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
      const client = new RemoteEngineClient(options, redis, info, queue, events);
      await client.cancelLeftovers();
      options.logger.info({ package: packageId(info), queue: name }, 'dispatching jobs to GPU workers through Redis');
      return client;
    } catch (error) {
      await redis.quit().catch(() => undefined);
      throw error;
    }
  }

  async info(): Promise<PackageInfo> {
    return this.packageInfo;
  }

  /** The workers that advertise themselves now (any package), healthy or not. */
  workers(): Promise<WorkerAdvert[]> {
    return listWorkers(this.redis);
  }

  /** Jobs handed to BullMQ and not finished yet. */
  get dispatchedCount(): number {
    return this.dispatched.size;
  }

  generate(
    request: GenerateRequest,
    options: GenerateCallOptions = {},
  ): Promise<GenerateResult> {
    if (this.disposed) return Promise.reject(new EngineError('internal', 'The connection to the GPU workers is closed.'));
    if (options.signal?.aborted) return Promise.reject(new EngineError('cancelled', 'The generation was cancelled.'));
    const jobId = randomUUID();
    const data: RemoteJobData = { request: encodeRequest(request), owner: this.options.owner, dispatchedAt: Date.now() };
    return new Promise<GenerateResult>((resolve, reject) => {
      const { signal } = options;
      const onAbort = (): void => {
        this.settle(jobId, new EngineError('cancelled', 'The generation was cancelled.'));
        this.cancelRemote(jobId);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.dispatched.set(jobId, {
        data,
        dispatchedAt: Date.now(),
        resolve,
        reject,
        onProgress: options.onProgress,
        chain: Promise.resolve(),
        cleanup: () => signal?.removeEventListener('abort', onAbort),
      });
      this.queue.add(JOB_NAME, data, { jobId }).catch((error: Error) => {
        this.settle(jobId, new EngineError('internal', `The job could not be queued for the GPU workers: ${error.message}`));
      });
    });
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    clearInterval(this.checkTimer);
    for (const jobId of [...this.dispatched.keys()]) {
      this.settle(jobId, new EngineError('internal', 'The bot stopped before the job finished.'));
      this.cancelRemote(jobId);
    }
    await Promise.allSettled([...this.cancelling]);
    await Promise.allSettled([this.events.close(), this.queue.close()]);
    await this.redis.quit().catch(() => undefined);
  }

  /** Marks a job cancelled (a worker running it stops at its next step) and removes it if no worker has it yet. */
  private cancelRemote(jobId: string): void {
    const work = (async () => {
      await this.redis.set(redisKeys.cancel(jobId), '1', 'PX', CANCEL_TTL_MS);
      const removed = await this.queue.remove(jobId).catch(() => 0);
      this.options.logger.debug({ job: jobId, removed: removed === 1 }, 'job cancelled on the GPU workers');
    })().catch((error: unknown) => this.options.logger.warn({ job: jobId, err: error }, 'could not cancel a job on the GPU workers'));
    this.cancelling.add(work);
    void work.finally(() => this.cancelling.delete(work));
  }

  /** Jobs that an earlier run of this bot dispatched and never collected: its store runs them again. */
  private async cancelLeftovers(): Promise<void> {
    const jobs = await this.queue.getJobs(UNFINISHED_STATES);
    const mine = jobs.filter((job) => job?.id && job.data?.owner === this.options.owner);
    for (const job of mine) this.cancelRemote(job.id!);
    await Promise.allSettled([...this.cancelling]);
    if (mine.length > 0) this.options.logger.info({ jobs: mine.length }, 'cancelled jobs left on the GPU workers by the previous run');
  }

  private onProgress(jobId: string, progress: RemoteJobProgress): void {
    const entry = this.dispatched.get(jobId);
    if (!entry?.onProgress || typeof progress?.step !== 'number') return;
    const deliver = entry.onProgress;
    entry.chain = entry.chain.then(async () => {
      const event: ProgressEvent = { step: progress.step, steps: progress.steps };
      if (progress.preview) {
        const bytes = await this.redis.getBuffer(redisKeys.preview(jobId)).catch(() => null);
        if (bytes) event.preview = decodeImage(bytes);
      }
      if (this.dispatched.has(jobId)) deliver(event);
    });
  }

  private onCompleted(jobId: string): void {
    const entry = this.dispatched.get(jobId);
    if (!entry) return;
    entry.chain = entry.chain.then(async () => {
      const key = redisKeys.result(jobId);
      const bytes = await this.redis.getBuffer(key);
      if (!bytes) {
        this.settle(jobId, new EngineError('internal', 'The GPU worker finished, but its images expired before the bot collected them.'));
        return;
      }
      void this.redis.del(key).catch(() => undefined);
      this.settle(jobId, decodeResult(bytes));
    }).catch((error: unknown) => {
      this.settle(jobId, new EngineError('internal', `The result could not be read from Redis: ${(error as Error).message}`));
    });
  }

  private settle(jobId: string, outcome: GenerateResult | Error): void {
    const entry = this.dispatched.get(jobId);
    if (!entry) return;
    this.dispatched.delete(jobId);
    entry.cleanup();
    if (outcome instanceof Error) entry.reject(outcome);
    else entry.resolve(outcome);
  }

  /**
   * Events can be missed (the bot's connection dropped, Redis restarted): unfinished jobs are looked
   * up now and then. A job that vanished (a Redis crash lost its last second of writes) is queued again.
   */
  private async checkUnfinished(): Promise<void> {
    if (this.checking || this.disposed) return;
    this.checking = true;
    try {
      const interval = this.options.checkIntervalMs ?? 3000;
      for (const [jobId, entry] of [...this.dispatched]) {
        if (Date.now() - entry.dispatchedAt < interval) continue;
        const state = await this.queue.getJobState(jobId);
        if (!this.dispatched.has(jobId)) continue;
        if (state === 'completed') this.onCompleted(jobId);
        else if (state === 'failed') this.settle(jobId, decodeFailure((await this.queue.getJob(jobId))?.failedReason));
        else if (state === 'unknown') {
          this.options.logger.warn({ job: jobId }, 'a dispatched job is missing from Redis; dispatching it again');
          await this.queue.add(JOB_NAME, entry.data, { jobId });
        }
      }
    } catch (error) {
      this.options.logger.debug({ err: error }, 'could not check unfinished jobs');
    } finally {
      this.checking = false;
    }
  }
}
