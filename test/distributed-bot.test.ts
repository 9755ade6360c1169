// The bot end to end through the fake Discord with QUEUE_BACKEND=redis: it loads no model, a GPU worker
// (in this process: WorkerHost on the engine thread) draws, progress and results come back through
// Redis; /cancel reaches the worker; a bot restart with queued jobs loses none and runs none twice.
// Jobs wait at the GatedEngine's gate or at a StepHold while the test looks, never on a clock (issue 13).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { RemoteEngineClient } from '../src/distributed/remote-engine.ts';
import { WorkerHost } from '../src/distributed/worker-host.ts';
import { EngineThread } from '../src/engine-host/engine-thread.ts';
import { StepHold } from '../src/engine-host/step-hold.ts';
import type { EngineClient, GenerateCallOptions, GenerateRequest, GenerateResult, PackageInfo } from '../src/engine/api.ts';
import { BotHarness, FIXTURE_PACKAGE, pngParameters } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';
import type { FakeInteraction } from '../src/testing/fake-discord.ts';
import { startRedis, type TestRedis } from '../src/testing/redis-server.ts';

type Logged = { msg: string; job?: string; reason?: string };

/** What the worker logs, kept for the assertions. */
class CapturingLogger {
  readonly lines: Logged[] = [];
  private add(obj: object, msg?: string): void {
    this.lines.push({ ...(obj as Record<string, unknown>), msg: msg ?? '' } as Logged);
  }
  debug(): void {}
  info(obj: object, msg?: string): void {
    this.add(obj, msg);
  }
  warn(obj: object, msg?: string): void {
    this.add(obj, msg);
  }
  error(obj: object, msg?: string): void {
    this.add(obj, msg);
  }
  jobs(msg: string): string[] {
    return this.lines.filter((l) => l.msg === msg).map((l) => l.job!);
  }
}

/** The engine thread; the test can have the next job stop after one of its steps (a StepHold) until it releases it. */
class HoldingEngine implements EngineClient {
  private next: StepHold | undefined;

  constructor(private readonly thread: EngineThread) {}

  /** Holds the next generate() call after `step`. */
  holdNext(step: number): StepHold {
    return (this.next = new StepHold(step));
  }

  info(): Promise<PackageInfo> {
    return this.thread.info();
  }

  generate(request: GenerateRequest, options: GenerateCallOptions = {}): Promise<GenerateResult> {
    const hold = this.next;
    this.next = undefined;
    return this.thread.generate(request, { ...options, hold });
  }

  dispose(): Promise<void> {
    return this.thread.dispose();
  }
}

const lastContent = (i: FakeInteraction): string => i.original?.content ?? '';

describe('the bot with QUEUE_BACKEND=redis', () => {
  let redis: TestRedis;
  let holding: HoldingEngine;
  let engine: GatedEngine;
  let worker: WorkerHost;
  const log = new CapturingLogger();
  const env = (): Record<string, string> => ({ QUEUE_BACKEND: 'redis', REDIS_URL: redis.url, QUEUE_CONCURRENCY: '1', PROGRESS_INTERVAL_MS: '250' });
  const noEmbeddedEngine = async (): Promise<never> => {
    throw new Error('the bot must not load models in redis mode');
  };

  before(async () => {
    redis = await startRedis();
    holding = new HoldingEngine(await EngineThread.start({ modelDir: FIXTURE_PACKAGE }));
    engine = new GatedEngine(holding, { open: true });
    // The advert is written at each change of state; a slow beat cannot let it lapse on a busy machine.
    worker = await WorkerHost.start({ redisUrl: redis.url, engine, workerId: 'gpu0', logger: log, timings: { heartbeatMs: 60_000 } });
  });

  after(async () => {
    await worker?.stop();
    await engine?.dispose();
    await redis?.stop();
  });

  test('/imagine: queue position, progress with previews and the PNG come through the GPU worker', async () => {
    const h = await BotHarness.start({ env: env(), engine: noEmbeddedEngine });
    let hold: StepHold | undefined;
    try {
      assert.ok(h.bot.engine instanceof RemoteEngineClient);
      assert.equal(`${h.info.name}@${h.info.version}`, 'tiny@1.0.0');
      engine.close();
      const [ann, bob] = [h.fake.user('ann'), h.fake.user('bob')];
      const first = h.imagine(ann, { prompt: 'a blue square at the top', seed: 42, steps: 30 });
      await h.fake.waitFor(() => engine.waiting === 1, 20_000, 'the first job at the worker');
      const second = h.imagine(bob, { prompt: 'a red circle', seed: 43, model: 'duo', contributions: true });
      await second.waitFor((i) => /position 1/.test(lastContent(i)), 20_000, 'the second job queued');
      const queueView = h.fake.slash('queue', {}, { user: bob });
      await queueView.waitFor((i) => /GPU worker/.test(i.replyContent ?? ''), 20_000, '/queue lists the workers');
      assert.match(queueView.replyContent ?? '', /1 GPU worker for tiny@1\.0\.0, 1 busy/);
      // The first job stops after step 6 (one with a preview: every 6th of 30) until the bot has shown that step.
      hold = holding.holdNext(6);
      engine.open();
      await first.waitFor(
        (i) => i.edits.some((e) => /step 6\/30/.test(String(e.body.content ?? '')) && e.files.some((f) => /preview/.test(f))),
        20_000,
        'the progress edit of the step the job is held at, with its preview',
      );
      hold.release();

      const [one, two] = await Promise.all([h.result(first, 30_000), h.result(second, 30_000)]);
      assert.equal(pngParameters(one.attachments[0].data).seed, 42);
      assert.equal(pngParameters(one.attachments[0].data).steps, 30);
      assert.ok(two.attachments.length >= 2, 'the image and its contribution map');
      assert.ok(
        first.edits.some((e) => /step \d+\/30/.test(String(e.body.content ?? ''))),
        'a progress edit from the worker',
      );
      assert.ok(first.edits.some((e) => e.files.some((f) => /preview/.test(f))), 'a preview from the worker');
      const jobs = await Promise.all([h.job(one.id), h.job(two.id)]);
      assert.deepEqual(jobs.map((j) => j.status), ['done', 'done']);
    } finally {
      hold?.release();
      engine.open();
      await h.close();
    }
  });

  test('/cancel stops a running job on the worker', async () => {
    const h = await BotHarness.start({ env: env(), engine: noEmbeddedEngine });
    try {
      engine.close();
      const completedBefore = log.jobs('job completed').length;
      const cat = h.fake.user('cat');
      const running = h.imagine(cat, { prompt: 'never finished' });
      await h.fake.waitFor(() => engine.waiting === 1, 20_000, 'the job at the worker');
      const cancelledBefore = log.jobs('job cancelled').length;
      const reply = h.fake.slash('cancel', {}, { user: cat });
      await reply.waitFor((i) => /Stopping/.test(i.replyContent ?? ''), 20_000, 'the cancel reply');
      await running.waitFor((i) => /Cancelled/.test(lastContent(i)), 20_000, 'the cancelled message');
      await h.fake.waitFor(() => log.jobs('job cancelled').length > cancelledBefore, 20_000, 'the worker to stop the job');
      assert.equal(engine.waiting, 0);
      assert.equal(log.jobs('job completed').length, completedBefore, 'it never completed');
    } finally {
      engine.open();
      await h.close();
    }
  });

  test('a bot restart with queued jobs and one running on the worker: all delivered, none completed twice', async () => {
    const h = await BotHarness.start({ env: env(), engine: noEmbeddedEngine });
    try {
      engine.close();
      const completedBefore = log.jobs('job completed').length;
      const users = ['dan', 'eve', 'fay', 'gus'].map((name) => h.fake.user(name));
      const interactions = users.map((user, i) => h.imagine(user, { prompt: `through a restart ${i}`, seed: 200 + i }));
      await h.fake.waitFor(() => engine.waiting === 1, 20_000, 'the first job at the worker');
      await interactions[3].waitFor((i) => /position 3/.test(lastContent(i)), 20_000, 'the last job queued');

      const cancelledBefore = log.jobs('job cancelled').length;
      await h.restart();
      // The interrupted job was withdrawn from the worker, and is dispatched again by the new bot.
      await h.fake.waitFor(() => log.jobs('job cancelled').length > cancelledBefore, 20_000, 'the old run withdrawn');
      await h.fake.waitFor(() => engine.waiting === 1 && engine.requests.at(-1)?.prompt === 'through a restart 0', 20_000, 'the first job again');
      await interactions[3].waitFor((i) => /restarted.*position 3/.test(lastContent(i)), 20_000, 'the restart notice');
      engine.open();

      const results = await Promise.all(interactions.map((i) => h.result(i, 30_000)));
      results.forEach((message, i) => assert.equal(pngParameters(message.attachments[0].data).seed, 200 + i));
      const jobs = await Promise.all(results.map((m) => h.job(m.id)));
      assert.deepEqual(jobs.map((j) => j.status), ['done', 'done', 'done', 'done']);
      assert.deepEqual(jobs.map((j) => j.attempts), [2, 1, 1, 1]);
      const completed = log.jobs('job completed').slice(completedBefore);
      assert.equal(completed.length, 4, 'four completions on the worker, not five');
      assert.equal(new Set(completed).size, 4);
    } finally {
      engine.open();
      await h.close();
    }
  });

  test('🎨 Vary through the GPU worker: the init image crosses Redis intact', async () => {
    const h = await BotHarness.start({ env: env(), engine: noEmbeddedEngine });
    try {
      engine.open();
      assert.equal(h.info.img2img, true, 'the worker advertises an encoder');
      const owner = h.fake.user('vera');
      const message = await h.result(h.imagine(owner, { prompt: 'a green ring', seed: 77 }), 30_000);
      const vary = h.fake.buttonsOf(message).find((b) => b.label === 'Vary (Subtle)');
      assert.ok(vary, 'results have Vary buttons');
      const before = engine.requests.length;
      const varied = await h.result(h.fake.pressButton(message.id, vary.customId, { user: owner }), 30_000);
      const request = engine.requests[before];
      assert.equal(request.strength, 0.35);
      assert.ok(request.initImage?.data instanceof Uint8Array, 'a Uint8Array again on the worker');
      const stored = h.bot.store.getImage((await h.job(message.id)).id, 'result', 0)!;
      const { default: sharp } = await import('sharp');
      assert.deepEqual(Buffer.from(request.initImage.data), await sharp(stored).removeAlpha().raw().toBuffer());
      assert.equal((await h.job(varied.id)).kind, 'vary');
    } finally {
      engine.open();
      await h.close();
    }
  });
});
