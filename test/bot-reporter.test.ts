// Progress edit pacing: at most one edit per interval, never two at once, latest state wins.
// Every test runs on Node's mock timers (setTimeout and Date), so the pacing is checked to the
// millisecond on a virtual clock and a busy machine cannot change the outcome.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import type { JobMessenger } from '../src/bot/job-messenger.ts';
import { JobReporter } from '../src/bot/job-reporter.ts';
import type { OutgoingMessage } from '../src/bot/messages.ts';
import type { JobRecord } from '../src/store/job-store.ts';

const JOB = { id: 'job1' } as JobRecord;
const silent = pino({ level: 'silent' });

/**
 * Starts the virtual clock at 0 ms and returns `advance(ms)`, which moves it 1 ms at a time. After
 * every millisecond it lets the promise chains that the due timers released run to their next timer
 * (setImmediate is not mocked: one real turn runs every pending microtask), then fires the timers
 * those chains set for "now" (0 ms waits), so everything happens at the virtual time it is due.
 */
function virtualClock(t: TestContext): (ms: number) => Promise<void> {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 0 });
  const settle = () => new Promise<void>((resolve) => setImmediate(resolve));
  const runDue = async () => {
    await settle();
    t.mock.timers.tick(0);
    await settle();
  };
  return async (ms: number) => {
    await runDue();
    for (let i = 0; i < ms; i++) {
      t.mock.timers.tick(1);
      await runDue();
    }
  };
}

/** A messenger whose edits take `latencyMs` of (virtual) time; it records when each started and ended. */
class RecordingMessenger {
  /** Edits as they start. */
  readonly started: { at: number; content: string }[] = [];
  /** Edits as they end. */
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
    this.started.push({ at, content: message.content });
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

test('updates are coalesced to one per interval, serialised, and the final message waits and wins', async (t) => {
  const advance = virtualClock(t);
  const messenger = new RecordingMessenger(60);
  const interval = 200;
  // The interaction is acknowledged 50 ms after the job was created.
  const ack = new Promise((r) => setTimeout(r, 50));
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, interval, silent, ack);
  // One update every 25 ms: step k at (k - 1) * 25 ms, the last (40) at 975 ms.
  for (let step = 1; step <= 40; step++) {
    reporter.update(() => ({ content: `step ${step}` }));
    await advance(25);
  }
  assert.equal(Date.now(), 1000);
  // The edit that started at 1000 ms (step 40) is in flight; this update is pending when final comes.
  assert.equal(messenger.inFlight, 1);
  reporter.update(() => ({ content: 'step 41' }));
  const final = reporter.final({ content: 'done' });
  await advance(60);
  assert.equal(await final, 'message-id');
  reporter.update(() => ({ content: 'too late' }));
  await advance(3 * interval);

  // The first edit waits one interval (at most 1 s) so acknowledgements go first; then exactly one
  // interval between edits, each starting after the previous one ended, each with the newest step.
  assert.deepEqual(
    messenger.updates.map((u) => [u.at, u.content, u.done]),
    [
      [200, 'step 8', 260],
      [400, 'step 16', 460],
      [600, 'step 24', 660],
      [800, 'step 32', 860],
      [1000, 'step 40', 1060],
    ],
  );
  assert.equal(messenger.maxInFlight, 1);
  // The final message waited for the edit in flight, and the pending and late updates were dropped.
  assert.deepEqual(messenger.delivered, [{ at: 1060, content: 'done' }]);
});

test('no edit goes out before the acknowledgement; then the pending one goes at once', async (t) => {
  const advance = virtualClock(t);
  const messenger = new RecordingMessenger(10);
  let acknowledge!: () => void;
  const ack = new Promise<void>((r) => (acknowledge = r));
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, 200, silent, ack);
  reporter.update(() => ({ content: 'queued #3' }));
  await advance(100);
  reporter.update(() => ({ content: 'queued #2' }));
  await advance(400);
  assert.equal(messenger.started.length, 0, 'nothing before the acknowledgement (500 ms)');
  acknowledge();
  await advance(0);
  // The update that was newest when its timer fired (200 ms) goes out the moment the ack arrives.
  assert.deepEqual(messenger.started, [{ at: 500, content: 'queued #2' }]);
  await advance(10);
  // The next one is paced from that edit: one interval after 500 ms.
  reporter.update(() => ({ content: 'queued #1' }));
  await advance(189);
  assert.equal(messenger.started.length, 1);
  await advance(1);
  assert.deepEqual(messenger.started.map((u) => [u.at, u.content]), [[500, 'queued #2'], [700, 'queued #1']]);
  reporter.close();
});

test('with a long interval the first edit waits 1 s, not a whole interval; later ones a whole interval', async (t) => {
  const advance = virtualClock(t);
  const messenger = new RecordingMessenger(5);
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, 5000, silent);
  reporter.update(() => ({ content: 'a' }));
  await advance(999);
  assert.equal(messenger.started.length, 0);
  await advance(1);
  assert.deepEqual(messenger.started, [{ at: 1000, content: 'a' }]);
  reporter.update(() => ({ content: 'b' }));
  await advance(5999 - 1000);
  assert.equal(messenger.started.length, 1);
  await advance(1);
  assert.deepEqual(messenger.started, [{ at: 1000, content: 'a' }, { at: 6000, content: 'b' }]);
  reporter.close();
});

test('an edit slower than the interval is never overlapped: the next one starts when it ends', async (t) => {
  const advance = virtualClock(t);
  const messenger = new RecordingMessenger(300);
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, 200, silent);
  for (let step = 1; step <= 40; step++) {
    reporter.update(() => ({ content: `step ${step}` }));
    await advance(25);
  }
  reporter.close();
  await advance(300);
  // 200: first edit (step 8), busy until 500; the next starts at 500 (step 20), busy until 800; ...
  assert.deepEqual(
    messenger.updates.map((u) => [u.at, u.content, u.done]),
    [
      [200, 'step 8', 500],
      [500, 'step 20', 800],
      [800, 'step 32', 1100],
    ],
  );
  assert.equal(messenger.maxInFlight, 1);
});

test('an update with the key already shown is skipped; a failed acknowledgement moves the job to the channel', async (t) => {
  const advance = virtualClock(t);
  const messenger = new RecordingMessenger(1);
  const reporter = new JobReporter(JOB, messenger as unknown as JobMessenger, 50, silent, Promise.reject(new Error('10062 Unknown interaction')));
  reporter.update(() => ({ content: 'queued #2' }), 'queued:2');
  await advance(120);
  reporter.update(() => ({ content: 'queued #2 again' }), 'queued:2');
  await advance(120);
  reporter.update(() => ({ content: 'queued #1' }), 'queued:1');
  await advance(120);
  // The skipped update sends nothing; the next new key goes out at once (the interval has long passed).
  assert.deepEqual(messenger.updates.map((u) => [u.at, u.content]), [[50, 'queued #2'], [240, 'queued #1']]);
  assert.equal(messenger.abandoned, 1);
  reporter.close();
});
