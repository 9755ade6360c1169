// Progress edit pacing: at most one edit per interval, never two at once, latest state wins.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import type { JobMessenger } from '../src/bot/job-messenger.ts';
import { JobReporter } from '../src/bot/job-reporter.ts';
import type { OutgoingMessage } from '../src/bot/messages.ts';
import type { JobRecord } from '../src/store/job-store.ts';

const JOB = { id: 'job1' } as JobRecord;
const silent = pino({ level: 'silent' });

class RecordingMessenger {
  readonly updates: { at: number; content: string; done: number }[] = [];
  readonly delivered: { at: number; content: string }[] = [];
  abandoned = 0;
  inFlight = 0;
  maxInFlight = 0;
  constructor(private readonly latencyMs: number) {}
  async update(message: OutgoingMessage): Promise<void> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const at = Date.now();
    await new Promise((r) => setTimeout(r, this.latencyMs));
    this.inFlight--;
    this.updates.push({ at, content: message.content, done: Date.now() });
  }
  async deliver(message: OutgoingMessage): Promise<string> {
    assert.equal(this.inFlight, 0, 'final waits for the edit in flight');
    this.delivered.push({ at: Date.now(), content: message.content });
    return 'message-id';
  }
  async refuse(): Promise<void> {}
  abandonInteraction(): void {
    this.abandoned++;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('updates are coalesced to one per interval, serialised, and the final message waits and wins', async () => {
  const messenger = new RecordingMessenger(60);
  const interval = 200;
  const created = Date.now();
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, interval, silent, sleep(50));
  for (let step = 1; step <= 40; step++) {
    reporter.update(() => ({ content: `step ${step}` }));
    await sleep(25);
  }
  const id = await reporter.final({ content: 'done' });
  assert.equal(id, 'message-id');
  reporter.update(() => ({ content: 'too late' }));
  await sleep(interval + 50);

  const times = messenger.updates.map((u) => u.at);
  assert.ok(times[0] - created >= interval - 5, 'the first edit waits a little so acknowledgements go first');
  for (let i = 1; i < times.length; i++) assert.ok(times[i] - times[i - 1] >= interval - 5, `gap ${times[i] - times[i - 1]} ms`);
  assert.ok(messenger.updates.length >= 3 && messenger.updates.length <= 6, `${messenger.updates.length} edits for 40 updates`);
  assert.equal(messenger.maxInFlight, 1);
  // Each edit shows the newest state at the time it was sent, never an older one.
  const steps = messenger.updates.map((u) => Number(u.content.split(' ')[1]));
  assert.deepEqual(steps, [...steps].sort((a, b) => a - b));
  assert.ok(!messenger.updates.some((u) => u.content === 'too late'));
  assert.ok(steps.at(-1)! >= 30, `the last edit shows a recent step (${steps.at(-1)})`);
  assert.deepEqual(messenger.delivered.map((d) => d.content), ['done']);
  assert.ok(messenger.delivered[0].at >= messenger.updates.at(-1)!.done);
});

test('an update with the key already shown is skipped; a failed acknowledgement moves the job to the channel', async () => {
  const messenger = new RecordingMessenger(1);
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, 50, silent, Promise.reject(new Error('10062 Unknown interaction')));
  reporter.update(() => ({ content: 'queued #2' }), 'queued:2');
  await sleep(120);
  reporter.update(() => ({ content: 'queued #2 again' }), 'queued:2');
  await sleep(120);
  reporter.update(() => ({ content: 'queued #1' }), 'queued:1');
  await sleep(120);
  assert.deepEqual(messenger.updates.map((u) => u.content), ['queued #2', 'queued #1']);
  assert.equal(messenger.abandoned, 1);
  reporter.close();
});
