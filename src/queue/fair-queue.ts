import PQueue from 'p-queue';

/** Why a running job's signal was aborted. */
export type AbortCause = 'cancelled' | 'timeout' | 'shutdown';

export class JobAbortedError extends Error {
  constructor(public readonly kind: AbortCause, message: string) {
    super(message);
    this.name = 'JobAbortedError';
  }
}

export interface FairQueueJob {
  id: string;
  userId: string;
}

export interface FairQueueOptions<J extends FairQueueJob = FairQueueJob> {
  /** Jobs run at the same time (engine threads, or jobs handed to the GPU workers). */
  concurrency: number;
  /** Waiting + running jobs one user may have. */
  maxJobsPerUser: number;
  /** Waiting jobs in the whole queue. */
  maxQueued: number;
  /** A running job is aborted (cause `timeout`) after this long; its slot is freed at once. */
  jobTimeoutMs: number;
  /** Called (synchronously, coalesced per tick) whenever the waiting order or the running set changed. */
  onChange?: () => void;
  /**
   * A held job waits without starting (e.g. its server's queue is paused) while others pass it; it
   * counts against the limits like any waiting job. Asked again whenever a slot frees up: call
   * refresh() when a job stops being held.
   */
  isHeld?: (job: J) => boolean;
}

export type RunJob<J> = (job: J, signal: AbortSignal) => Promise<void>;

export type EnqueueResult =
  | { accepted: true; position: number }
  | { accepted: false; reason: 'user_limit' | 'queue_full' | 'duplicate' | 'stopped'; message: string };

export interface QueueSnapshot {
  /** Waiting jobs in the order they will start; held ones last, in the order they came. */
  waiting: { id: string; userId: string; position: number; held: boolean }[];
  running: { id: string; userId: string; startedAt: number }[];
  concurrency: number;
  maxQueued: number;
}

interface RunningEntry<J> {
  job: J;
  controller: AbortController;
  startedAt: number;
}

/**
 * A fair job queue: p-queue limits concurrency, and every time a slot frees up the next job is taken
 * from the user who was served least recently (round robin over users, FIFO within one user), so
 * one person queueing many jobs cannot starve the others.
 */
export class FairQueue<J extends FairQueueJob> {
  private readonly slots: PQueue;
  private readonly waitingByUser = new Map<string, J[]>();
  private readonly enqueuedAt = new Map<string, number>();
  private readonly lastServedTurn = new Map<string, number>();
  private readonly running = new Map<string, RunningEntry<J>>();
  private readonly settling = new Set<Promise<void>>();
  private turn = 0;
  private enqueueCounter = 0;
  private stopped = false;
  private changeScheduled = false;

  constructor(
    private readonly options: FairQueueOptions<J>,
    private readonly run: RunJob<J>,
  ) {
    if (!Number.isInteger(options.concurrency) || options.concurrency < 1) {
      throw new RangeError('concurrency must be a positive integer');
    }
    this.slots = new PQueue({ concurrency: options.concurrency });
  }

  get waitingCount(): number {
    let n = 0;
    for (const list of this.waitingByUser.values()) n += list.length;
    return n;
  }

  get runningCount(): number {
    return this.running.size;
  }

  get concurrency(): number {
    return this.options.concurrency;
  }

  /** Waiting plus running jobs of one user. */
  activeCountOf(userId: string): number {
    let n = this.waitingByUser.get(userId)?.length ?? 0;
    for (const entry of this.running.values()) if (entry.job.userId === userId) n++;
    return n;
  }

  has(jobId: string): boolean {
    return this.running.has(jobId) || this.findWaiting(jobId) !== undefined;
  }

  isRunning(jobId: string): boolean {
    return this.running.has(jobId);
  }

  /** Checks the limits without enqueueing. */
  check(userId: string): EnqueueResult {
    if (this.stopped) return { accepted: false, reason: 'stopped', message: 'The bot is shutting down; try again in a minute.' };
    const mine = this.activeCountOf(userId);
    if (mine >= this.options.maxJobsPerUser) {
      return {
        accepted: false,
        reason: 'user_limit',
        message: `You already have ${mine} job${mine === 1 ? '' : 's'} in the queue (the limit is ${this.options.maxJobsPerUser}). Wait for one to finish or use /cancel.`,
      };
    }
    if (this.waitingCount >= this.options.maxQueued) {
      return {
        accepted: false,
        reason: 'queue_full',
        message: `The queue is full (${this.options.maxQueued} jobs waiting). Please try again in a few minutes.`,
      };
    }
    return { accepted: true, position: this.waitingCount + 1 };
  }

  /**
   * Adds a job unless a limit refuses it. `force` skips the per-user limit and the cap (used to
   * restore jobs that were accepted before a restart).
   */
  enqueue(job: J, opts: { force?: boolean } = {}): EnqueueResult {
    if (this.has(job.id)) return { accepted: false, reason: 'duplicate', message: 'This job is already queued.' };
    if (this.stopped) return this.check(job.userId);
    if (!opts.force) {
      const verdict = this.check(job.userId);
      if (!verdict.accepted) return verdict;
    }
    const list = this.waitingByUser.get(job.userId);
    if (list) list.push(job);
    else this.waitingByUser.set(job.userId, [job]);
    this.enqueuedAt.set(job.id, this.enqueueCounter++);
    void this.slots.add(() => this.startNext());
    this.changed();
    return { accepted: true, position: this.positionOf(job.id) ?? 0 };
  }

  /** 1-based place among the waiting jobs, or undefined when the job is not waiting. */
  positionOf(jobId: string): number | undefined {
    const index = this.waitingOrder().findIndex((job) => job.id === jobId);
    return index < 0 ? undefined : index + 1;
  }

  snapshot(): QueueSnapshot {
    return {
      waiting: this.waitingOrder().map((job, i) => ({ id: job.id, userId: job.userId, position: i + 1, held: this.isHeld(job) })),
      running: [...this.running.values()].map((e) => ({ id: e.job.id, userId: e.job.userId, startedAt: e.startedAt })),
      concurrency: this.options.concurrency,
      maxQueued: this.options.maxQueued,
    };
  }

  /** Removes a waiting job or aborts a running one (`reason`: the abort's message). Returns what it was, or false if unknown. */
  cancel(jobId: string, reason = 'Cancelled.'): 'waiting' | 'running' | false {
    const entry = this.running.get(jobId);
    if (entry) {
      entry.controller.abort(new JobAbortedError('cancelled', reason));
      return 'running';
    }
    const found = this.findWaiting(jobId);
    if (!found) return false;
    found.list.splice(found.index, 1);
    if (found.list.length === 0) this.waitingByUser.delete(found.userId);
    this.enqueuedAt.delete(jobId);
    this.changed();
    return 'waiting';
  }

  /**
   * Stops taking and starting jobs: waiting jobs are dropped from memory (their records stay queued
   * in the store) and running ones are aborted with cause `shutdown`.
   */
  async stop(graceMs = 5000): Promise<void> {
    this.stopped = true;
    this.slots.clear();
    this.waitingByUser.clear();
    this.enqueuedAt.clear();
    for (const entry of this.running.values()) {
      entry.controller.abort(new JobAbortedError('shutdown', 'The bot is restarting; this job will run again.'));
    }
    const pending = Promise.allSettled([...this.settling]);
    await Promise.race([pending, new Promise((resolve) => setTimeout(resolve, graceMs).unref())]);
  }

  /**
   * Makes sure every waiting job that is not held has a slot task to start it: after jobs stopped
   * being held (their tasks may have found nothing to start while they were), and to show the new order.
   */
  refresh(): void {
    if (this.stopped) return;
    let startable = 0;
    for (const list of this.waitingByUser.values()) for (const job of list) if (!this.isHeld(job)) startable++;
    for (let missing = startable - this.slots.size; missing > 0; missing--) void this.slots.add(() => this.startNext());
    this.changed();
  }

  /** Resolves when nothing is waiting or running. */
  async onIdle(): Promise<void> {
    await this.slots.onIdle();
  }

  private isHeld(job: J): boolean {
    return this.options.isHeld?.(job) ?? false;
  }

  /** Each user's waiting jobs that are not held, in their order. */
  private startableLists(): Map<string, J[]> {
    const lists = new Map<string, J[]>();
    for (const [user, list] of this.waitingByUser) {
      const startable = list.filter((job) => !this.isHeld(job));
      if (startable.length > 0) lists.set(user, startable);
    }
    return lists;
  }

  private waitingOrder(): J[] {
    const lists = this.startableLists();
    const held = [...this.waitingByUser.values()]
      .flat()
      .filter((job) => this.isHeld(job))
      .sort((a, b) => (this.enqueuedAt.get(a.id) ?? 0) - (this.enqueuedAt.get(b.id) ?? 0));
    const served = new Map(this.lastServedTurn);
    const order: J[] = [];
    let turn = this.turn;
    for (;;) {
      const user = this.pickUser(lists, served);
      if (user === undefined) break;
      const list = lists.get(user)!;
      order.push(list.shift()!);
      if (list.length === 0) lists.delete(user);
      served.set(user, turn++);
    }
    return [...order, ...held];
  }

  /** The user served least recently; ties go to whoever's next job was enqueued first. */
  private pickUser(lists: Map<string, J[]>, served: Map<string, number>): string | undefined {
    let best: string | undefined;
    let bestTurn = Infinity;
    let bestSeq = Infinity;
    for (const [user, list] of lists) {
      if (list.length === 0) continue;
      const turn = served.get(user) ?? -1;
      const seq = this.enqueuedAt.get(list[0].id) ?? Infinity;
      if (turn < bestTurn || (turn === bestTurn && seq < bestSeq)) {
        best = user;
        bestTurn = turn;
        bestSeq = seq;
      }
    }
    return best;
  }

  private async startNext(): Promise<void> {
    if (this.stopped) return;
    const user = this.pickUser(this.startableLists(), this.lastServedTurn);
    if (user === undefined) return;
    const list = this.waitingByUser.get(user)!;
    const job = list.splice(list.findIndex((waiting) => !this.isHeld(waiting)), 1)[0];
    if (list.length === 0) this.waitingByUser.delete(user);
    this.enqueuedAt.delete(job.id);
    this.lastServedTurn.set(user, this.turn++);

    const controller = new AbortController();
    const entry: RunningEntry<J> = { job, controller, startedAt: Date.now() };
    this.running.set(job.id, entry);
    this.changed();

    const timer = setTimeout(() => {
      controller.abort(
        new JobAbortedError('timeout', `Timed out after ${Math.round(this.options.jobTimeoutMs / 1000)} s.`),
      );
    }, this.options.jobTimeoutMs);
    timer.unref();

    const work = Promise.resolve()
      .then(() => this.run(job, controller.signal))
      .catch(() => undefined);
    this.settling.add(work);
    void work.finally(() => this.settling.delete(work));
    const aborted = new Promise<void>((resolve) => {
      if (controller.signal.aborted) resolve();
      else controller.signal.addEventListener('abort', () => resolve(), { once: true });
    });
    try {
      // A run that ignores its abort signal must not hold the slot forever.
      await Promise.race([work, aborted]);
    } finally {
      clearTimeout(timer);
      this.running.delete(job.id);
      this.changed();
    }
  }

  private findWaiting(jobId: string): { userId: string; list: J[]; index: number } | undefined {
    for (const [userId, list] of this.waitingByUser) {
      const index = list.findIndex((job) => job.id === jobId);
      if (index >= 0) return { userId, list, index };
    }
    return undefined;
  }

  private changed(): void {
    if (!this.options.onChange || this.changeScheduled) return;
    this.changeScheduled = true;
    queueMicrotask(() => {
      this.changeScheduled = false;
      this.options.onChange?.();
    });
  }
}
