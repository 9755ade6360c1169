// The queue seen from Discord: limits with ephemeral refusals, /queue, /cancel, per-job timeout.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BotHarness, createTestEngine } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';
import type { FakeInteraction } from '../src/testing/fake-discord.ts';

async function ephemeral(interaction: FakeInteraction): Promise<string> {
  await interaction.waitFor((i) => i.acknowledged, 5000, 'acknowledgement');
  assert.equal(interaction.replyWasEphemeral, true);
  return interaction.replyContent ?? '';
}

function lastContent(interaction: FakeInteraction): string {
  return interaction.original?.content ?? '';
}

interface HeldTimer {
  fire(): void;
  fired: boolean;
  cleared: boolean;
}

/**
 * Holds the queue's per-job timers instead of letting the clock run them. With JOB_TIMEOUT_SECONDS
 * set to a time no test ever reaches, a job's timer is the one setTimeout with exactly that delay (the
 * queue arms it when the job starts); it is kept here and fires only when the test fires it, so no job
 * times out because the machine was slow. Every other timer runs as usual.
 */
class HeldJobTimers {
  readonly armed: HeldTimer[] = [];
  private readonly realSetTimeout = globalThis.setTimeout;
  private readonly realClearTimeout = globalThis.clearTimeout;

  constructor(delayMs: number) {
    const realSetTimeout = this.realSetTimeout;
    const realClearTimeout = this.realClearTimeout;
    globalThis.setTimeout = ((callback: (...args: unknown[]) => void, ms?: number, ...args: unknown[]) => {
      if (ms !== delayMs) return realSetTimeout(callback, ms, ...args);
      const timer = {
        fired: false,
        cleared: false,
        fire(): void {
          if (timer.fired || timer.cleared) throw new Error('this job timer is no longer armed');
          timer.fired = true;
          callback(...args);
        },
        unref: () => timer,
        ref: () => timer,
        hasRef: () => false,
      };
      this.armed.push(timer);
      return timer;
    }) as unknown as typeof setTimeout;
    globalThis.clearTimeout = ((timer: unknown) => {
      const held = this.armed.find((t) => t === timer);
      if (held) held.cleared = true;
      else realClearTimeout(timer as Parameters<typeof clearTimeout>[0]);
    }) as typeof clearTimeout;
  }

  restore(): void {
    globalThis.setTimeout = this.realSetTimeout;
    globalThis.clearTimeout = this.realClearTimeout;
  }
}

test('per-user limit and queue cap refuse clearly; /queue shows positions; /cancel stops queued and running jobs', async () => {
  let gated!: GatedEngine;
  const h = await BotHarness.start({
    env: { MAX_JOBS_PER_USER: '2', QUEUE_MAX: '3', QUEUE_CONCURRENCY: '1', PROGRESS_INTERVAL_MS: '250' },
    engine: async () => (gated = new GatedEngine(await createTestEngine())),
  });
  try {
    const [alice, bob, carol, dave] = ['alice', 'bob', 'carol', 'dave'].map((name) => h.fake.user(name));
    const a1 = h.imagine(alice, { prompt: 'first' });
    await h.fake.waitFor(() => gated.waiting === 1, 5000, 'a1 running');
    const a2 = h.imagine(alice, { prompt: 'second' });
    await a2.waitFor((i) => /Queued\*\* — position 1/.test(lastContent(i)), 5000, 'a2 queued at 1');

    assert.match(await ephemeral(h.imagine(alice, { prompt: 'third' })), /limit is 2/);

    const b1 = h.imagine(bob, { prompt: 'bob one' });
    const c1 = h.imagine(carol, { prompt: 'carol one' });
    // Round robin: alice was just served, so bob and carol (never served) go before her second job.
    await a2.waitFor((i) => /position 3/.test(lastContent(i)), 5000, 'a2 moved to 3');
    await b1.waitFor((i) => /position 1/.test(lastContent(i)), 5000, 'b1 at 1');
    await c1.waitFor((i) => /position 2/.test(lastContent(i)), 5000, 'c1 at 2');
    assert.match(await ephemeral(h.imagine(dave, { prompt: 'too many' })), /queue is full/);

    const queue = h.fake.slash('queue', {}, { user: alice });
    const view = await ephemeral(queue);
    assert.match(view, /first.*drawing/);
    assert.match(view, /second.*position 3/);
    assert.match(view, /3 waiting/);

    const a1Job = h.bot.store.recentOfUser(alice.id).find((j) => j.request.prompt === 'first')!;
    assert.match(await ephemeral(h.fake.slash('cancel', { job: a1Job.id }, { user: bob })), /not your job/);

    // Without an option, /cancel takes the newest: the queued second job.
    assert.match(await ephemeral(h.fake.slash('cancel', {}, { user: alice })), /before it started/);
    await a2.waitFor((i) => /Cancelled/.test(lastContent(i)), 5000, 'a2 cancelled message');
    assert.equal(h.bot.store.recentOfUser(alice.id).find((j) => j.request.prompt === 'second')?.status, 'cancelled');

    assert.match(await ephemeral(h.fake.slash('cancel', {}, { user: alice })), /Stopping/);
    await a1.waitFor((i) => /Cancelled/.test(lastContent(i)), 5000, 'a1 cancelled message');
    assert.equal(h.bot.store.get(a1Job.id)?.status, 'cancelled');

    // The queue moves on: bob's job starts and, once the engine is let through, everyone finishes.
    await h.fake.waitFor(() => gated.waiting === 1 && gated.requests.at(-1)?.prompt === 'bob one', 5000, 'b1 started');
    gated.open();
    await h.result(b1);
    await h.result(c1);
    assert.match(await ephemeral(h.fake.slash('cancel', {}, { user: alice })), /no queued or running job/);
  } finally {
    await h.close();
  }
});

test('a job that exceeds JOB_TIMEOUT_SECONDS fails with a message and the queue goes on', async () => {
  // The clock of the jobs' timeouts is the test's: the stuck job runs out of time when the test says
  // so, and the next one (which draws for real) never does, however slow the machine.
  const timeoutSeconds = 86_399;
  const timers = new HeldJobTimers(timeoutSeconds * 1000);
  try {
    let gated!: GatedEngine;
    const h = await BotHarness.start({
      env: { JOB_TIMEOUT_SECONDS: String(timeoutSeconds), QUEUE_CONCURRENCY: '1' },
      // The engine ignores the abort signal: the queue must not wait for it.
      engine: async () => (gated = new GatedEngine(await createTestEngine(), { ignoreAbort: true })),
    });
    try {
      const stuck = h.imagine(h.fake.user('patient'), { prompt: 'never ends' });
      await h.fake.waitFor(() => gated.waiting === 1, 5000, 'the stuck job at the engine');
      const next = h.imagine(h.fake.user('next'), { prompt: 'after the stuck one' });
      await h.fake.waitFor(() => h.bot.jobs.queue.waitingCount === 1, 5000, 'the next job queued');
      assert.equal(timers.armed.length, 1, 'one job running, one timer armed');
      assert.deepEqual(gated.requests.map((r) => r.prompt), ['never ends'], 'the next job waits for the slot');

      timers.armed[0].fire(); // the stuck job's time is up
      await stuck.waitFor((i) => /took too long/.test(lastContent(i)), 10_000, 'timeout message');
      const job = await h.job(stuck.originalMessageId!);
      assert.equal(job?.status, 'failed');
      assert.match(job?.error ?? '', /Timed out/);
      await h.fake.waitFor(() => gated.requests.some((r) => r.prompt === 'after the stuck one'), 5000, 'next job started');
      // The stuck engine call never returned (it ignores the abort): the slot was freed without it.
      assert.equal(gated.waiting, 2, 'the stuck call still waits at the gate');
      assert.equal(timers.armed.length, 2, 'the next job has its own timer');
      gated.open();
      await h.result(next);
    } finally {
      await h.close();
    }
  } finally {
    timers.restore();
  }
});

test('a 🔁 reaction over the per-user limit is answered in the channel instead of starting a job', async () => {
  let gated!: GatedEngine;
  const h = await BotHarness.start({
    env: { MAX_JOBS_PER_USER: '2', QUEUE_CONCURRENCY: '1' },
    engine: async () => (gated = new GatedEngine(await createTestEngine(), { open: true })),
  });
  try {
    const original = await h.result(h.imagine(h.fake.user('artist'), { prompt: 'worth a rerun' }));
    gated.close();
    const fan = h.fake.user('fan');
    h.imagine(fan, { prompt: 'mine one' });
    h.imagine(fan, { prompt: 'mine two' });
    await h.fake.waitFor(() => h.bot.jobs.queue.activeCountOf(fan.id) === 2, 5000, 'fan at the limit');
    h.fake.react(original.id, '🔁', fan);
    const answer = await h.fake.waitFor(() => h.fake.channelMessages().find((m) => m.replyTo === original.id), 5000, 'channel answer');
    assert.match(answer.content, new RegExp(`<@${fan.id}>.*limit is 2`));
    assert.equal(h.bot.store.recentOfUser(fan.id).length, 2, 'no third job');
    gated.open();
  } finally {
    await h.close();
  }
});
