// Accepts jobs (store + fair queue), runs them on the engine, and reports them through their messages.
import type { REST } from 'discord.js';
import { EngineError, isEnsembleMode, modeHasContributions, type EngineClient, type GenerateRequest, type GenerateResult, type PackageInfo, type RgbImage } from '../engine/api.ts';
import { MODE_LABELS } from '../engine/labels.ts';
import { FairQueue, JobAbortedError, type EnqueueResult, type FairQueueJob } from '../queue/fair-queue.ts';
import type { JobRecord, JobResultSummary, JobStore, NewJob } from '../store/job-store.ts';
import type { Logger } from '../log/logger.ts';
import type { BotConfig } from './config.ts';
import { JobMessenger, type MessengerOptions } from './job-messenger.ts';
import { JobReporter } from './job-reporter.ts';
import {
  clip,
  expertTitle,
  failureMessage,
  imageButtons,
  progressMessage,
  queuedMessage,
  resultButtons,
  resultEmbed,
  startingMessage,
  type OutgoingFile,
  type OutgoingMessage,
} from './messages.ts';
import { renderComparison, renderImages, renderPanels, renderPreview } from './result-render.ts';
import { encodePng, loadRgbImage } from '../engine/render/index.ts';
import { ActionRowBuilder, ButtonBuilder, ButtonStyle, type APIActionRowComponent, type APIButtonComponentWithCustomId } from 'discord.js';
import { buttonId } from './custom-ids.ts';

export const RERUN_EMOJI = '🔁';

/** The line above a result, by the kind of job. */
const RESULT_CONTENT: Partial<Record<JobRecord['kind'], (job: JobRecord) => string>> = {
  reroll: () => '🔁 Reroll with a new seed',
  vary: (job) => `🎨 Variation (strength ${job.request.strength})`,
  upscale: (job) => `⬆️ Upscaled ×2 to ${job.request.width}×${job.request.height} (strength ${job.request.strength})`,
};

export interface JobServiceOptions {
  rest: REST;
  store: JobStore;
  engine: EngineClient;
  info: PackageInfo;
  config: Pick<BotConfig, 'queueConcurrency' | 'maxJobsPerUser' | 'queueMax' | 'jobTimeoutMs' | 'progressIntervalMs'>;
  logger: Logger;
  messenger?: Partial<Omit<MessengerOptions, 'rest' | 'store' | 'logger'>>;
  /** Whether a server's queue is paused (/admin pause): its waiting jobs do not start. */
  isPaused?: (guildId: string) => boolean;
  /** The time jobs are stamped with (daily quotas count by it); tests inject a clock. */
  now?: () => number;
}

/** What the fair queue holds of a job. */
interface QueuedJob extends FairQueueJob {
  guildId: string | null;
}

export type SubmitResult =
  | { accepted: true; job: JobRecord; position: number }
  | Extract<EnqueueResult, { accepted: false }>;

export interface UserQueueView {
  /** held: waiting in a paused server's queue. */
  jobs: { job: JobRecord; state: 'waiting' | 'running'; position?: number; held?: boolean; step?: number; steps?: number }[];
  waiting: number;
  running: number;
  workers: number;
  maxQueued: number;
}

interface RunOutput {
  message: OutgoingMessage;
  summary: JobResultSummary;
  rerunnable: boolean;
}

/** Rejects with the signal's reason as soon as it aborts, even if `work` never settles. */
function raceAbort<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    work.catch(() => undefined);
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    work.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(error);
      },
    );
  });
}

function summarize(result: GenerateResult, startedAt: number): JobResultSummary {
  return {
    params: result.params,
    seeds: result.images.map((img) => img.seed),
    timings: { ...result.timings, totalMs: Date.now() - startedAt },
    warnings: result.warnings,
  };
}

function deleteOnlyButtons(job: JobRecord): APIActionRowComponent<APIButtonComponentWithCustomId> {
  return new ActionRowBuilder<ButtonBuilder>()
    .addComponents(new ButtonBuilder().setCustomId(buttonId('delete', job.id)).setLabel('Delete').setEmoji('🗑️').setStyle(ButtonStyle.Danger))
    .toJSON() as APIActionRowComponent<APIButtonComponentWithCustomId>;
}

export class JobService {
  readonly queue: FairQueue<QueuedJob>;
  private readonly reporters = new Map<string, JobReporter>();
  private readonly progress = new Map<string, { step: number; steps: number }>();
  private stopping = false;

  constructor(private readonly options: JobServiceOptions) {
    const { config } = options;
    const isPaused = options.isPaused;
    this.queue = new FairQueue<QueuedJob>(
      {
        concurrency: config.queueConcurrency,
        maxJobsPerUser: config.maxJobsPerUser,
        maxQueued: config.queueMax,
        jobTimeoutMs: config.jobTimeoutMs,
        onChange: () => this.showPositions(),
        isHeld: isPaused && ((job) => job.guildId !== null && isPaused(job.guildId)),
      },
      (entry, signal) => this.run(entry.id, signal),
    );
  }

  get info(): PackageInfo {
    return this.options.info;
  }

  /** The time of the bot's clock. */
  now(): number {
    return this.options.now?.() ?? Date.now();
  }

  /** A server's queue was paused or resumed: show it on the waiting jobs, start those that may start now. */
  pauseChanged(): void {
    this.queue.refresh();
  }

  /** Whether a job from this user would be accepted now. */
  check(userId: string): EnqueueResult {
    return this.queue.check(userId);
  }

  /**
   * Stores and enqueues a job (synchronously, so limits hold under bursts). `ack` is the pending
   * acknowledgement of its interaction; messages wait for it.
   */
  submit(newJob: NewJob, ack?: Promise<unknown>): SubmitResult {
    const verdict = this.queue.check(newJob.userId);
    if (!verdict.accepted) return verdict;
    // A rerun of an image-to-image job (🔁, Contributions, Compare) starts from its parent's picture.
    const inherited =
      newJob.initImagePng === undefined && newJob.request.strength !== undefined && newJob.parentJobId !== null
        ? this.options.store.getImage(newJob.parentJobId, 'init')
        : undefined;
    const job = this.options.store.create({ createdAt: this.now(), ...newJob, ...(inherited ? { initImagePng: inherited } : {}) });
    this.reporters.set(job.id, this.createReporter(job, ack, false));
    const queued = this.queue.enqueue({ id: job.id, userId: job.userId, guildId: job.guildId });
    if (!queued.accepted) {
      this.options.store.finish(job.id, 'failed', { error: queued.message });
      this.reporters.get(job.id)?.close();
      this.reporters.delete(job.id);
      return queued;
    }
    return { accepted: true, job, position: queued.position };
  }

  /** Puts jobs that were queued or running when the bot stopped back in the queue, oldest first. */
  restore(): number {
    let restored = 0;
    for (const job of this.options.store.unfinished()) {
      if (this.queue.has(job.id)) continue;
      this.options.store.requeue(job.id);
      const fresh = this.options.store.get(job.id)!;
      this.reporters.set(job.id, this.createReporter(fresh, undefined, true));
      const result = this.queue.enqueue({ id: job.id, userId: job.userId, guildId: job.guildId }, { force: true });
      if (result.accepted) restored++;
    }
    if (restored > 0) this.options.logger.info({ restored }, 'restored unfinished jobs');
    return restored;
  }

  /**
   * Cancels a waiting or running job (`byModerator`: someone else than its requester, which its
   * message says). Returns false if it is not active.
   */
  async cancel(jobId: string, byUserId: string, options: { byModerator?: boolean } = {}): Promise<'waiting' | 'running' | false> {
    const reason = options.byModerator ? 'Cancelled by a moderator.' : 'Cancelled.';
    const what = this.queue.cancel(jobId, reason);
    if (what === 'waiting') {
      const job = this.options.store.get(jobId);
      this.options.store.finish(jobId, 'cancelled', { error: `cancelled by ${byUserId}` });
      const reporter = this.reporters.get(jobId);
      this.reporters.delete(jobId);
      if (job && reporter) {
        await reporter
          .final(failureMessage(job, this.info, reason, '🚫'))
          .catch((error: unknown) => this.options.logger.warn({ job: jobId, err: error }, 'could not show the cancellation'));
      }
    }
    return what;
  }

  /** The user's active jobs and the queue's state, for /queue and /cancel. */
  viewFor(userId: string): UserQueueView {
    return this.view((job) => job.userId === userId);
  }

  /** A server's active jobs, everyone's (for /admin queue), and the queue's state. */
  viewOfGuild(guildId: string): UserQueueView {
    return this.view((job) => job.guildId === guildId);
  }

  private view(wanted: (job: JobRecord) => boolean): UserQueueView {
    const snapshot = this.queue.snapshot();
    const jobs: UserQueueView['jobs'] = [];
    for (const running of snapshot.running) {
      const job = this.options.store.get(running.id);
      if (job && wanted(job)) jobs.push({ job, state: 'running', ...this.progress.get(running.id) });
    }
    for (const waiting of snapshot.waiting) {
      const job = this.options.store.get(waiting.id);
      if (job && wanted(job)) jobs.push({ job, state: 'waiting', position: waiting.position, held: waiting.held });
    }
    return {
      jobs,
      waiting: snapshot.waiting.length,
      running: snapshot.running.length,
      workers: snapshot.concurrency,
      maxQueued: snapshot.maxQueued,
    };
  }

  /** Stops starting jobs; running ones are interrupted and stay queued in the store for the next start. */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.queue.stop();
    for (const reporter of this.reporters.values()) reporter.close();
    this.reporters.clear();
  }

  private createReporter(job: JobRecord, ack: Promise<unknown> | undefined, restored: boolean): JobReporter {
    const messenger = new JobMessenger(job, {
      rest: this.options.rest,
      store: this.options.store,
      logger: this.options.logger,
      ...this.options.messenger,
    });
    return new JobReporter(job, messenger, this.options.config.progressIntervalMs, this.options.logger, ack, restored);
  }

  private showPositions(): void {
    if (this.stopping) return;
    for (const waiting of this.queue.snapshot().waiting) {
      const reporter = this.reporters.get(waiting.id);
      if (!reporter) continue;
      reporter.update(
        () => queuedMessage(reporter.job, this.info, waiting.position, { restarted: reporter.restored, paused: waiting.held }),
        `queued:${waiting.position}:${waiting.held}`,
      );
    }
  }

  private async run(jobId: string, signal: AbortSignal): Promise<void> {
    const reporter = this.reporters.get(jobId);
    const stored = this.options.store.get(jobId);
    if (!reporter || !stored || !this.options.store.markRunning(jobId)) return;
    const job = reporter.job;
    const startedAt = Date.now();
    reporter.update(() => startingMessage(job, this.info), 'starting');
    try {
      const output = await this.execute(job, signal, reporter);
      if (signal.aborted && (signal.reason as JobAbortedError).kind !== 'timeout') throw signal.reason;
      const messageId = await reporter.final(output.message);
      this.options.store.finish(jobId, 'done', { result: { ...output.summary, timings: { ...output.summary.timings, totalMs: Date.now() - startedAt } } });
      this.options.store.setResultMessage(jobId, messageId);
      // Nobody but the requester sees a private result, and ephemeral messages take no reactions.
      if (output.rerunnable && !reporter.messenger.isPrivate) void reporter.messenger.react(messageId, RERUN_EMOJI);
    } catch (error) {
      await this.fail(job, reporter, signal.aborted ? signal.reason : error);
    } finally {
      this.reporters.delete(jobId);
      this.progress.delete(jobId);
    }
  }

  private async fail(job: JobRecord, reporter: JobReporter, error: unknown): Promise<void> {
    const { store, logger } = this.options;
    const show = async (send: () => Promise<unknown>): Promise<void> => {
      await send().catch((err: unknown) => logger.error({ job: job.id, err }, 'could not tell the user that a job failed'));
    };
    if (error instanceof JobAbortedError) {
      if (error.kind === 'shutdown') {
        reporter.close();
        store.requeue(job.id);
        return;
      }
      if (error.kind === 'cancelled') {
        store.finish(job.id, 'cancelled', { error: 'cancelled' });
        await show(() => reporter.final(failureMessage(job, this.info, error.message, '🚫')));
        return;
      }
      store.finish(job.id, 'failed', { error: error.message });
      await show(() => reporter.final(failureMessage(job, this.info, `This job took too long and was stopped (${error.message})`, '⏱️')));
      return;
    }
    if (error instanceof EngineError && (error.code === 'bad_request' || error.code === 'unknown_model')) {
      store.finish(job.id, 'failed', { error: error.message });
      await show(() => reporter.refuse(`❌ ${error.message}`));
      return;
    }
    const message = error instanceof EngineError ? error.message : 'something went wrong while drawing.';
    logger.error({ job: job.id, err: error }, 'job failed');
    store.finish(job.id, 'failed', { error: error instanceof Error ? error.message : String(error) });
    await show(() => reporter.final(failureMessage(job, this.info, `Failed: ${clip(message, 300)}`)));
  }

  private generate(
    request: GenerateRequest,
    signal: AbortSignal,
    reporter: JobReporter,
    stage?: string,
  ): Promise<GenerateResult> {
    const job = reporter.job;
    // The engine sends a preview with some steps only; the newest one stays on the following edits.
    let preview: { image: RgbImage; file?: Promise<OutgoingFile> } | undefined;
    const work = this.options.engine.generate(
      { ...request, preview: true },
      {
        signal,
        onProgress: (event) => {
          this.progress.set(job.id, { step: event.step, steps: event.steps });
          if (event.preview) preview = { image: event.preview };
          const shown = preview;
          reporter.update(async () => {
            if (shown) shown.file ??= renderPreview(job.id, shown.image);
            return progressMessage(job, this.info, { step: event.step, steps: event.steps, stage }, shown ? await shown.file : undefined);
          });
        },
      },
    );
    return raceAbort(work, signal);
  }

  /**
   * An image-to-image job's init image (stored as PNG with the job), fitted to the request's size: a
   * Vary's is already that size, an Upscale's is its source result, scaled here (lanczos) to twice it.
   */
  private async initImage(job: JobRecord): Promise<Pick<GenerateRequest, 'initImage'>> {
    if (job.request.strength === undefined) return {};
    const png = this.options.store.getImage(job.id, 'init');
    if (!png) throw new EngineError('bad_request', 'The picture this job starts from is no longer stored.');
    const width = job.request.width ?? this.info.defaults.width;
    const height = job.request.height ?? this.info.defaults.height;
    return { initImage: await loadRgbImage(png, width, height) };
  }

  /** Keeps a result's images (PNG, no parameters) for 🎨 Vary and ⬆️ Upscale, also after a restart. */
  private async keepResults(job: JobRecord, result: GenerateResult): Promise<void> {
    if (!this.info.img2img) return;
    for (const [i, img] of result.images.entries()) this.options.store.putImage(job.id, 'result', i, await encodePng(img.image));
  }

  private async execute(job: JobRecord, signal: AbortSignal, reporter: JobReporter): Promise<RunOutput> {
    const startedAt = Date.now();
    const info = this.info;
    const init = await this.initImage(job);
    if (job.kind === 'compare') return this.executeCompare(job, signal, reporter, startedAt, init);

    const request: GenerateRequest = job.kind === 'panel' ? { ...job.request, ...init, contributions: true } : { ...job.request, ...init };
    const result = await this.generate(request, signal, reporter);
    const summary = summarize(result, startedAt);
    const elapsedMs = Date.now() - startedAt;

    if (job.kind === 'panel') {
      const panels = await renderPanels(job.id, result, info);
      if (panels.length === 0) throw new EngineError('bad_request', 'These models produced no contribution maps.');
      const shares = result.images[0].contributions!;
      const shareText = shares.experts.map((id, i) => `${expertTitle(info, id)} ${Math.round(shares.shares[i] * 100)}%`).join(' · ');
      return {
        message: {
          content: '',
          embeds: [
            {
              ...resultEmbed(job, info, result.params, { seeds: summary.seeds, elapsedMs, imageFile: panels[0].name, title: `🧩 Contributions — ${clip(result.params.prompt, 200)}` }),
              description: `Which model drew which part (mean share: ${shareText}).`,
            },
          ],
          components: [deleteOnlyButtons(job)],
          files: panels,
        },
        summary,
        rerunnable: false,
      };
    }

    const rendered = await renderImages(job.id, result, info, Boolean(request.contributions));
    await this.keepResults(job, result);
    const canMap = modeHasContributions(result.params.mode);
    return {
      message: {
        content: RESULT_CONTENT[job.kind]?.(job) ?? '',
        embeds: [resultEmbed(job, info, result.params, { seeds: summary.seeds, elapsedMs, imageFile: rendered.mainFile, warnings: result.warnings })],
        components: [
          resultButtons(job, { contributions: canMap, compare: info.experts.length > 1 }),
          ...(info.img2img ? imageButtons(job, result.images.length) : []),
        ],
        files: rendered.files,
      },
      summary,
      rerunnable: true,
    };
  }

  /** Each expert alone, then the ensemble (unless the job was a single model), same prompt and seed. */
  private async executeCompare(
    job: JobRecord,
    signal: AbortSignal,
    reporter: JobReporter,
    startedAt: number,
    init: Pick<GenerateRequest, 'initImage'>,
  ): Promise<RunOutput> {
    const info = this.info;
    const base = job.request;
    const ensemble = base.ensemble ? info.ensembles.find((e) => e.id === base.ensemble) : undefined;
    const own = base.experts ?? ensemble?.experts ?? [];
    const experts = own.length > 1 ? own : info.experts.map((e) => e.id);
    const common: GenerateRequest = {
      prompt: base.prompt,
      ...(base.negative !== undefined ? { negative: base.negative } : {}),
      mode: 'single',
      seed: base.seed,
      ...(base.steps !== undefined ? { steps: base.steps } : {}),
      ...(base.guidance !== undefined ? { guidance: base.guidance } : {}),
      ...(base.scheduler !== undefined ? { scheduler: base.scheduler } : {}),
      ...(base.karras !== undefined ? { karras: base.karras } : {}),
      ...(base.width !== undefined ? { width: base.width } : {}),
      ...(base.height !== undefined ? { height: base.height } : {}),
      ...(base.strength !== undefined ? { strength: base.strength } : {}),
      ...init,
      count: 1,
    };
    const plan: { label: string; request: GenerateRequest }[] = experts.map((id) => ({
      label: expertTitle(info, id),
      request: { ...common, experts: [id] },
    }));
    if (base.mode !== 'single') {
      const label = isEnsembleMode(base.mode) ? (ensemble?.title ?? base.ensemble ?? MODE_LABELS[base.mode].name) : MODE_LABELS[base.mode].name;
      plan.push({ label, request: { ...base, ...init, count: 1, contributions: false } });
    }
    const runs: { label: string; result: GenerateResult }[] = [];
    for (const [i, entry] of plan.entries()) {
      const result = await this.generate(entry.request, signal, reporter, `${entry.label} (${i + 1}/${plan.length})`);
      runs.push({ label: entry.label, result });
    }
    const rendered = await renderComparison(job.id, runs, info);
    const last = runs[runs.length - 1].result;
    const summary = summarize(last, startedAt);
    return {
      message: {
        content: '',
        embeds: [
          {
            ...resultEmbed(job, info, last.params, {
              seeds: [base.seed],
              elapsedMs: Date.now() - startedAt,
              imageFile: rendered.mainFile,
              title: `🔍 Compare — ${clip(base.prompt, 200)}`,
            }),
            description: `Same prompt and seed: ${runs.map((r) => r.label).join(' | ')}`,
          },
        ],
        components: [deleteOnlyButtons(job)],
        files: rendered.files,
      },
      summary,
      rerunnable: false,
    };
  }
}
