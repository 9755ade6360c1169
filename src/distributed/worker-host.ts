// A GPU host's side of the distributed mode: takes jobs for its model package from BullMQ, runs them
// on its engine (an engine thread, so lock renewals keep ticking during session.run), reports progress,
// stores the result, honours cancellations and advertises itself with a heartbeat.
import { hostname } from 'node:os';
import { Worker as BullWorker, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import { EngineError, type EngineClient, type PackageInfo, type ProgressEvent } from '../engine/api.ts';
import { packageId, QUEUE_PREFIX, queueNameFor, redisKeys } from './names.ts';
import { decodeFailure, decodeRequest, encodeFailure, MAX_STALLED_RUNS, type RemoteJobData, type RemoteJobProgress, type RemoteJobReturn } from './protocol.ts';
import { bullConnection, createRedis, type DistributedLogger } from './redis.ts';
import { advertise, publishPackage, withdraw, type WorkerAdvert } from './registry.ts';
import { encodeImage, encodeResult } from './result-codec.ts';

export interface WorkerTimings {
  /** BullMQ's job lock: a worker that stops renewing it (killed, frozen) loses the job after this long. */
  lockDurationMs: number;
  /** How often workers look for jobs whose lock expired, to run them again. */
  stalledIntervalMs: number;
  /** How often the advertisement is renewed; it expires after three missed beats. */
  heartbeatMs: number;
  /** How long a finished job's images wait in Redis for the bot. */
  resultTtlMs: number;
  /** How often a running job checks whether it was cancelled. */
  cancelPollMs: number;
}

export const DEFAULT_WORKER_TIMINGS: WorkerTimings = {
  lockDurationMs: 30_000,
  stalledIntervalMs: 30_000,
  heartbeatMs: 5000,
  resultTtlMs: 3_600_000,
  cancelPollMs: 250,
};

export interface WorkerHostOptions {
  redisUrl: string;
  engine: EngineClient;
  workerId?: string;
  logger: DistributedLogger;
  timings?: Partial<WorkerTimings>;
  /**
   * The engine died mid-job (EngineError 'unavailable'): the host has stopped, without finishing or
   * failing the job, so BullMQ runs it again on another worker once its lock runs out (within the
   * same limit as a killed worker's). The process should exit non-zero for its supervisor to restart it.
   */
  onEngineLost?: (error: EngineError) => void;
}

export function defaultWorkerId(): string {
  return `${hostname()}-${process.pid}`;
}

/** Sends a job's progress to BullMQ, one update at a time, skipping to the newest when Redis lags. */
class ProgressSender {
  private pending: ProgressEvent | undefined;
  private pump: Promise<void> | undefined;

  constructor(
    private readonly job: Job<RemoteJobData, RemoteJobReturn>,
    private readonly redis: Redis,
    private readonly ttlMs: number,
    private readonly logger: DistributedLogger,
  ) {}

  send(event: ProgressEvent): void {
    this.pending = { ...event, preview: event.preview ?? this.pending?.preview };
    this.pump ??= this.run().finally(() => (this.pump = undefined));
  }

  async flush(): Promise<void> {
    while (this.pump) await this.pump;
  }

  private async run(): Promise<void> {
    while (this.pending) {
      const event = this.pending;
      this.pending = undefined;
      try {
        if (event.preview) await this.redis.set(redisKeys.preview(this.job.id!), encodeImage(event.preview), 'PX', this.ttlMs);
        const progress: RemoteJobProgress = { step: event.step, steps: event.steps, ...(event.preview ? { preview: true } : {}) };
        await this.job.updateProgress(progress as unknown as object);
      } catch (error) {
        this.logger.debug({ job: this.job.id, err: error }, 'progress update failed');
      }
    }
  }
}

export class WorkerHost {
  readonly workerId: string;
  private readonly timings: WorkerTimings;
  private readonly redis: Redis;
  /** BullMQ's consumer of this package's queue. */
  private consumer: BullWorker<RemoteJobData, RemoteJobReturn> | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private advert: WorkerAdvert;
  private stopping: Promise<void> | undefined;
  /** Set once the advertisement is being withdrawn: no heartbeat may bring it back. */
  private withdrawn = false;

  private constructor(
    private readonly options: WorkerHostOptions,
    readonly info: PackageInfo,
  ) {
    this.workerId = options.workerId ?? defaultWorkerId();
    this.timings = { ...DEFAULT_WORKER_TIMINGS, ...options.timings };
    this.redis = createRedis(options.redisUrl, options.logger, `worker ${this.workerId}`);
    this.advert = {
      id: this.workerId,
      host: hostname(),
      pid: process.pid,
      package: packageId(info),
      experts: info.experts.map((e) => e.id),
      ensembles: info.ensembles.map((e) => e.id),
      executionProvider: info.executionProvider,
      healthy: true,
      state: 'idle',
      jobsDone: 0,
      startedAt: Date.now(),
      seenAt: Date.now(),
    };
  }

  /** Advertises the worker and starts taking jobs for its engine's package. */
  static async start(options: WorkerHostOptions): Promise<WorkerHost> {
    const host = new WorkerHost(options, await options.engine.info());
    await host.begin();
    return host;
  }

  get queueName(): string {
    return queueNameFor(this.info);
  }

  private async begin(): Promise<void> {
    const { logger } = this.options;
    await publishPackage(this.redis, this.info);
    await this.beat();
    this.heartbeat = setInterval(() => void this.beat(), this.timings.heartbeatMs);
    const consumer = new BullWorker<RemoteJobData, RemoteJobReturn>(this.queueName, (job) => this.process(job), {
      connection: bullConnection(this.options.redisUrl),
      prefix: QUEUE_PREFIX,
      name: this.workerId,
      concurrency: 1,
      lockDuration: this.timings.lockDurationMs,
      stalledInterval: this.timings.stalledIntervalMs,
      maxStalledCount: MAX_STALLED_RUNS,
      removeOnComplete: { age: 3600, count: 1000 },
      removeOnFail: { age: 24 * 3600, count: 1000 },
    });
    this.consumer = consumer;
    consumer.on('error', (error) => logger.warn({ err: error }, 'queue error'));
    consumer.on('completed', (job) => logger.info({ job: job.id, worker: this.workerId }, 'job completed'));
    consumer.on('failed', (job, error) => {
      const failure = decodeFailure(error.message);
      logger.info({ job: job?.id, worker: this.workerId, reason: failure.message }, failure.code === 'cancelled' ? 'job cancelled' : 'job failed');
    });
    consumer.on('stalled', (jobId) => logger.warn({ job: jobId }, 'a job lost its worker; it runs again'));
    await consumer.waitUntilReady();
    logger.info(
      { worker: this.workerId, package: this.advert.package, queue: this.queueName, ep: this.info.executionProvider },
      'worker ready',
    );
  }

  private async beat(): Promise<void> {
    if (this.withdrawn) return;
    try {
      await advertise(this.redis, this.advert, this.timings.heartbeatMs * 3);
    } catch (error) {
      this.options.logger.debug({ err: error }, 'heartbeat failed');
    }
  }

  private setState(state: WorkerAdvert['state'], jobId?: string): void {
    if (this.advert.state === 'stopping' && state !== 'stopping') state = 'stopping';
    this.advert = { ...this.advert, state, jobId };
    void this.beat();
  }

  private async process(job: Job<RemoteJobData, RemoteJobReturn>): Promise<RemoteJobReturn> {
    const { logger, engine } = this.options;
    const jobId = job.id!;
    const cancelled = async (): Promise<boolean> => (await this.redis.exists(redisKeys.cancel(jobId))) === 1;
    this.setState('busy', jobId);
    const controller = new AbortController();
    const poll = setInterval(() => {
      cancelled().then(
        (yes) => yes && controller.abort(),
        () => undefined,
      );
    }, this.timings.cancelPollMs);
    const progress = new ProgressSender(job, this.redis, this.timings.resultTtlMs, logger);
    try {
      if (await cancelled()) throw new EngineError('cancelled', 'The generation was cancelled.');
      logger.info({ job: jobId, worker: this.workerId, run: job.attemptsStarted, stalls: job.stalledCounter }, 'job started');
      const result = await engine.generate(decodeRequest(job.data.request), { signal: controller.signal, onProgress: (event) => progress.send(event) });
      await progress.flush();
      const encoded = encodeResult(result);
      await this.redis.set(redisKeys.result(jobId), encoded, 'PX', this.timings.resultTtlMs);
      this.advert.jobsDone += 1;
      return { worker: this.workerId, bytes: encoded.length };
    } catch (error) {
      await progress.flush();
      if (error instanceof EngineError && error.code === 'unavailable' && !controller.signal.aborted) {
        logger.error({ job: jobId, worker: this.workerId, reason: error.message }, 'the engine stopped; leaving the job to another worker');
        void this.abandon(error);
        // never settled here: the job stays active until its lock expires, then runs again elsewhere
        return new Promise<never>(() => undefined);
      }
      throw new Error(encodeFailure(error));
    } finally {
      clearInterval(poll);
      await this.redis.del(redisKeys.preview(jobId)).catch(() => undefined);
      this.setState('idle');
    }
  }

  private async abandon(error: EngineError): Promise<void> {
    this.advert = { ...this.advert, healthy: false, problem: error.message };
    await this.stop({ force: true });
    this.options.onEngineLost?.(error);
  }

  /** Takes no more jobs, lets the running one finish (or, with `force`, leaves it to another worker), withdraws the advertisement. */
  stop(options: { force?: boolean } = {}): Promise<void> {
    this.stopping ??= (async () => {
      this.setState('stopping', this.advert.jobId);
      await this.consumer?.close(options.force);
      clearInterval(this.heartbeat);
      this.withdrawn = true;
      await withdraw(this.redis, this.workerId).catch(() => undefined);
      await this.redis.quit().catch(() => undefined);
      this.options.logger.info({ worker: this.workerId }, 'worker stopped');
    })();
    return this.stopping;
  }
}

/** For a worker whose models could not be loaded: tells the bot (and /queue) why, and takes no jobs. */
export async function advertiseUnhealthy(
  redisUrl: string,
  workerId: string,
  problem: string,
  logger: DistributedLogger,
  ttlMs = 10 * 60_000,
): Promise<void> {
  const redis = createRedis(redisUrl, logger, `worker ${workerId}`);
  try {
    const advert: WorkerAdvert = {
      id: workerId,
      host: hostname(),
      pid: process.pid,
      package: '',
      experts: [],
      ensembles: [],
      executionProvider: '',
      healthy: false,
      problem,
      state: 'stopping',
      jobsDone: 0,
      startedAt: Date.now(),
      seenAt: Date.now(),
    };
    await advertise(redis, advert, ttlMs);
  } finally {
    await redis.quit().catch(() => undefined);
  }
}
