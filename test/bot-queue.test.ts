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

function waitFor(predicate: () => boolean, timeoutMs = 2000): Promise<void> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      if (predicate()) resolve();
      else if (Date.now() - started > timeoutMs) reject(new Error('condition not reached'));
      else setTimeout(tick, 2);
    };
    tick();
  });
}

test('serves users round robin instead of first come first served', async () => {
  const started: string[] = [];
  const gates = new Map<string, () => void>();
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 10, maxQueued: 50, jobTimeoutMs: 60_000 },
    async (j) => {
      started.push(j.id);
      const gate = deferred();
      gates.set(j.id, gate.resolve);
      await gate.promise;
    },
  );
  queue.enqueue(job('a1', 'alice'));
  queue.enqueue(job('a2', 'alice'));
  queue.enqueue(job('a3', 'alice'));
  queue.enqueue(job('b1', 'bob'));
  queue.enqueue(job('b2', 'bob'));
  queue.enqueue(job('c1', 'carol'));
  await waitFor(() => started.length === 1);
  // a1 runs; alice was just served, so bob and carol come before her next job.
  assert.deepEqual(
    queue.snapshot().waiting.map((w) => w.id),
    ['b1', 'c1', 'a2', 'b2', 'a3'],
  );
  assert.equal(queue.positionOf('c1'), 2);
  assert.equal(queue.positionOf('a1'), undefined);
  for (let i = 0; i < 6; i++) {
    await waitFor(() => started.length === i + 1);
    gates.get(started[i])!();
  }
  await queue.onIdle();
  assert.deepEqual(started, ['a1', 'b1', 'c1', 'a2', 'b2', 'a3']);
});

test('refuses over the per-user limit and over the queue cap, with a message', async () => {
  const gate = deferred();
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 2, maxQueued: 3, jobTimeoutMs: 60_000 },
    () => gate.promise,
  );
  assert.equal(queue.enqueue(job('a1', 'alice')).accepted, true);
  assert.equal(queue.enqueue(job('a2', 'alice')).accepted, true);
  const third = queue.enqueue(job('a3', 'alice'));
  assert.equal(third.accepted, false);
  assert.equal(!third.accepted && third.reason, 'user_limit');
  assert.match(!third.accepted ? third.message : '', /limit is 2/);
  await waitFor(() => queue.runningCount === 1);
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

test('cancels waiting and running jobs; a running job sees the abort cause', async () => {
  const causes: string[] = [];
  const ran: string[] = [];
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000 },
    (j, signal) => {
      ran.push(j.id);
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
  await waitFor(() => queue.runningCount === 1);
  assert.equal(queue.cancel('a2'), 'waiting');
  assert.equal(queue.cancel('a2'), false);
  assert.equal(queue.cancel('a1'), 'running');
  await waitFor(() => ran.includes('a3'));
  assert.deepEqual(ran, ['a1', 'a3']);
  assert.deepEqual(causes, ['cancelled']);
  queue.cancel('a3');
  await queue.onIdle();
  assert.equal(queue.activeCountOf('alice'), 0);
});

test('a job that overruns its timeout is aborted and frees its slot even if it ignores the signal', async () => {
  const ran: string[] = [];
  let timeoutCause: string | undefined;
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 50 },
    async (j, signal) => {
      ran.push(j.id);
      if (j.id === 'stuck') {
        signal.addEventListener('abort', () => (timeoutCause = (signal.reason as JobAbortedError).kind));
        await new Promise(() => undefined); // never settles
      }
    },
  );
  const t0 = Date.now();
  queue.enqueue(job('stuck', 'alice'));
  queue.enqueue(job('next', 'bob'));
  await waitFor(() => ran.includes('next'));
  assert.equal(timeoutCause, 'timeout');
  assert.ok(Date.now() - t0 < 1000);
});

test('runs up to `concurrency` jobs at once and reports changes', async () => {
  let changes = 0;
  let active = 0;
  let peak = 0;
  const queue = new FairQueue<Job>(
    { concurrency: 2, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000, onChange: () => changes++ },
    async () => {
      active++;
      peak = Math.max(peak, active);
      await new Promise((r) => setTimeout(r, 20));
      active--;
    },
  );
  for (let i = 0; i < 6; i++) queue.enqueue(job(`j${i}`, `user${i % 3}`));
  await queue.onIdle();
  assert.equal(peak, 2);
  assert.ok(changes >= 3);
});

test('stop aborts running jobs with cause shutdown and starts nothing more', async () => {
  const ran: string[] = [];
  let cause: string | undefined;
  const queue = new FairQueue<Job>(
    { concurrency: 1, maxJobsPerUser: 5, maxQueued: 50, jobTimeoutMs: 60_000 },
    (j, signal) => {
      ran.push(j.id);
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
  await waitFor(() => ran.length === 1);
  await queue.stop();
  assert.equal(cause, 'shutdown');
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(ran, ['a1']);
  assert.equal(queue.enqueue(job('c1', 'carol')).accepted, false);
});
