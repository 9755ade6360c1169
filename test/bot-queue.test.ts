import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FairQueue, JobAbortedError, type FairQueueJob } from '../src/queue/fair-queue.ts';

interface Job extends FairQueueJob {
  label: string;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const job = (id: string, userId: string): Job => ({ id, userId, label: id });

/** One real event-loop turn: every microtask-driven step of the queue (p-queue, promise chains) has run. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

/** Job starts in order; `count(n)` resolves once n jobs have started (no clock involved). */
class Starts {
  readonly ids: string[] = [];
  private readonly waiters: { n: number; resolve: () => void }[] = [];
  record(id: string): void {
    this.ids.push(id);
    for (const w of [...this.waiters]) {
      if (this.ids.length >= w.n) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve();
      }
    }
  }
  count(n: number): Promise<void> {
    if (this.ids.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }
}

test('serves users round robin instead of first come first served', { timeout: 10_000 }, async () => {
  const starts = new Starts();
  const gates = new Map<string, () => void>();
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 10, maxQueued: 50, jobTimeoutMs: 60_000 },
    async (j) => {
      const gate = deferred();
      gates.set(j.id, gate.resolve);
      starts.record(j.id);
      await gate.promise;
    },
  );
  queue.enqueue(job('a1', 'alice'));
  queue.enqueue(job('a2', 'alice'));
  queue.enqueue(job('a3', 'alice'));
  queue.enqueue(job('b1', 'bob'));
  queue.enqueue(job('b2', 'bob'));
  queue.enqueue(job('c1', 'carol'));
  await starts.count(1);
  // a1 runs; alice was just served, so bob and carol come before her next job.
  assert.deepEqual(
    queue.snapshot().waiting.map((w) => w.id),
    ['b1', 'c1', 'a2', 'b2', 'a3'],
  );
  assert.equal(queue.positionOf('c1'), 2);
  assert.equal(queue.positionOf('a1'), undefined);
  for (let i = 0; i < 6; i++) {
    await starts.count(i + 1);
    gates.get(starts.ids[i])!();
  }
  await queue.onIdle();
  assert.deepEqual(starts.ids, ['a1', 'b1', 'c1', 'a2', 'b2', 'a3']);
});

test('refuses over the per-user limit and over the queue cap, with a message', { timeout: 10_000 }, async () => {
  const gate = deferred();
  const starts = new Starts();
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 2, maxQueued: 3, jobTimeoutMs: 60_000 },
    (j) => {
      starts.record(j.id);
      return gate.promise;
    },
  );
  assert.equal(queue.enqueue(job('a1', 'alice')).accepted, true);
  assert.equal(queue.enqueue(job('a2', 'alice')).accepted, true);
  const third = queue.enqueue(job('a3', 'alice'));
  assert.equal(third.accepted, false);
  assert.equal(!third.accepted && third.reason, 'user_limit');
  assert.match(!third.accepted ? third.message : '', /limit is 2/);
  await starts.count(1);
  assert.equal(queue.runningCount, 1);
  // waiting: a2; the cap counts waiting jobs only
  assert.equal(queue.enqueue(job('b1', 'bob')).accepted, true);
  assert.equal(queue.enqueue(job('c1', 'carol')).accepted, true);
  const full = queue.enqueue(job('d1', 'dave'));
  assert.equal(!full.accepted && full.reason, 'queue_full');
  // restored jobs bypass the limits
  assert.equal(queue.enqueue(job('a9', 'alice'), { force: true }).accepted, true);
  assert.equal(queue.enqueue(job('a9', 'alice'), { force: true }).accepted, false);
  gate.resolve();
  await queue.onIdle();
});

test('cancels waiting and running jobs; a running job sees the abort cause', { timeout: 10_000 }, async () => {
  const causes: string[] = [];
  const starts = new Starts();
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000 },
    (j, signal) => {
      starts.record(j.id);
      return new Promise<void>((_resolve, reject) => {
        signal.addEventListener('abort', () => {
          causes.push((signal.reason as JobAbortedError).kind);
          reject(signal.reason);
        });
      });
    },
  );
  queue.enqueue(job('a1', 'alice'));
  queue.enqueue(job('a2', 'alice'));
  queue.enqueue(job('a3', 'alice'));
  await starts.count(1);
  assert.equal(queue.runningCount, 1);
  assert.equal(queue.cancel('a2'), 'waiting');
  assert.equal(queue.cancel('a2'), false);
  assert.equal(queue.cancel('a1'), 'running');
  await starts.count(2);
  assert.deepEqual(starts.ids, ['a1', 'a3']);
  assert.deepEqual(causes, ['cancelled']);
  queue.cancel('a3');
  await queue.onIdle();
  assert.deepEqual(starts.ids, ['a1', 'a3'], 'the cancelled waiting job never ran');
  assert.deepEqual(causes, ['cancelled', 'cancelled']);
  assert.equal(queue.activeCountOf('alice'), 0);
});

test('a job that overruns its timeout is aborted and frees its slot even if it ignores the signal', { timeout: 10_000 }, async (t) => {
  // The queue's per-job timer runs on the mock clock: the timeout fires at exactly 50 ms, however busy the machine.
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 0 });
  const starts = new Starts();
  let timeoutCause: string | undefined;
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 50 },
    async (j, signal) => {
      starts.record(j.id);
      if (j.id === 'stuck') {
        signal.addEventListener('abort', () => (timeoutCause = (signal.reason as JobAbortedError).kind));
        await new Promise(() => undefined); // never settles
      }
    },
  );
  queue.enqueue(job('stuck', 'alice'));
  queue.enqueue(job('next', 'bob'));
  await starts.count(1);
  await settle();
  t.mock.timers.tick(49);
  await settle();
  assert.equal(timeoutCause, undefined, 'not before the timeout');
  assert.deepEqual(starts.ids, ['stuck'], 'the slot is still held');
  t.mock.timers.tick(1);
  assert.equal(timeoutCause, 'timeout');
  await starts.count(2);
  assert.deepEqual(starts.ids, ['stuck', 'next']);
  await queue.onIdle();
  assert.equal(queue.runningCount, 0, 'the stuck job no longer holds a slot');
});

test('runs up to `concurrency` jobs at once and reports changes', { timeout: 10_000 }, async () => {
  let changes = 0;
  let active = 0;
  let peak = 0;
  const starts = new Starts();
  const gates = new Map<string, () => void>();
  const queue = new FairQueue<Job>(
    { concurrency: 2, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000, onChange: () => changes++ },
    async (j) => {
      active++;
      peak = Math.max(peak, active);
      const gate = deferred();
      gates.set(j.id, gate.resolve);
      starts.record(j.id);
      // Each job holds its slot until the test releases it, so any job that started while two are
      // held would count towards `peak`.
      await gate.promise;
      active--;
    },
  );
  for (let i = 0; i < 6; i++) queue.enqueue(job(`j${i}`, `user${i % 3}`));
  await starts.count(2);
  await settle();
  assert.equal(active, 2);
  assert.equal(queue.runningCount, 2);
  assert.equal(queue.waitingCount, 4);
  // Release the jobs one by one: each release lets exactly one more start, never a third at once.
  for (let released = 0; released < 6; released++) {
    const before = changes;
    gates.get(starts.ids[released])!();
    if (released + 2 < 6) await starts.count(released + 3);
    await settle();
    assert.equal(starts.ids.length, Math.min(6, released + 3), `after ${released + 1} released`);
    assert.equal(active, Math.min(2, 6 - released - 1));
    assert.ok(changes > before, 'onChange reported the finish and the start');
  }
  await queue.onIdle();
  assert.equal(peak, 2);
  assert.equal(active, 0);
});

test('stop aborts running jobs with cause shutdown and starts nothing more', { timeout: 10_000 }, async () => {
  const starts = new Starts();
  let cause: string | undefined;
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000 },
    (j, signal) => {
      starts.record(j.id);
      // Only the first job waits for its abort; any other that started would end at once, so
      // onIdle below would wait for it and the assertion after it would see it.
      if (j.id !== 'a1') return Promise.resolve();
      return new Promise<void>((resolve) =>
        signal.addEventListener('abort', () => {
          cause = (signal.reason as JobAbortedError).kind;
          resolve();
        }),
      );
    },
  );
  queue.enqueue(job('a1', 'alice'));
  queue.enqueue(job('b1', 'bob'));
  await starts.count(1);
  await queue.stop();
  assert.equal(cause, 'shutdown');
  // Ordering barrier: onIdle resolves only once the queue has nothing running and nothing left to
  // start, i.e. after b1 would have run had stop not dropped it.
  await queue.onIdle();
  assert.deepEqual(starts.ids, ['a1']);
  assert.equal(queue.enqueue(job('c1', 'carol')).accepted, false);
  assert.equal(queue.runningCount + queue.waitingCount, 0);
});
