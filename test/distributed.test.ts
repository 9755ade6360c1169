// The distributed mode against a real redis-server: two GPU worker processes (`npm run worker`'s entry)
// on the fixture package, the bot's RemoteEngineClient dispatching to them. A job stream, a worker
// killed with SIGKILL mid-job, cancellation of waiting and running jobs, a Redis restart, a worker whose
// package cannot load, a worker whose engine thread dies, and a job whose workers keep dying: nothing
// is lost, nothing completes twice.
//
// No test here depends on timing or on who wins a race (issue 13). The worker processes hold any job
// whose prompt starts with HOLD_PROMPT_PREFIX right after step HOLD_STEP (src/distributed/test-hold.ts),
// log 'job held' and go on when the test sends them SIGUSR2, so a test kills, cancels or restarts
// while a job is certainly running. Their locks are long, so that no live job ever loses its lock on a
// busy machine; where a killed worker's lock must run out, the test deletes it, as its expiry would.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Queue, QueueEvents, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { EngineError, type EngineClient, type GenerateRequest, type PackageInfo, type ProgressEvent } from '../src/engine/api.ts';
import { QUEUE_PREFIX, queueNameFor } from '../src/distributed/names.ts';
import { STALLED_MESSAGE, type RemoteJobData, type RemoteJobProgress } from '../src/distributed/protocol.ts';
import { RemoteEngineClient } from '../src/distributed/remote-engine.ts';
import { publishPackage } from '../src/distributed/registry.ts';
import { HOLD_PROMPT_PREFIX } from '../src/distributed/test-hold.ts';
import { WorkerHost } from '../src/distributed/worker-host.ts';
import { EngineThread, startEngineThread } from '../src/engine-host/engine-thread.ts';
import { StepHold } from '../src/engine-host/step-hold.ts';
import { copyOfTiny, REPO_ROOT, TINY } from './helpers/fixture.ts';
import { startRedis, type TestRedis } from '../src/testing/redis-server.ts';

type LogLine = { msg?: string; job?: string; worker?: string; reason?: string; run?: number; problem?: string; [k: string]: unknown };

const quiet = { debug() {}, info() {}, warn() {}, error() {} };

/** The step after which the worker processes hold HOLD_PROMPT_PREFIX jobs (WORKER_TEST_HOLD_STEP). */
const HOLD_STEP = 2;

function waitUntil<T>(probe: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs: number, what: string): Promise<T> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const tick = async (): Promise<void> => {
      try {
        const value = await probe();
        if (value) return resolve(value);
      } catch (error) {
        return reject(error);
      }
      if (Date.now() - started > timeoutMs) return reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      setTimeout(() => void tick(), 50);
    };
    void tick();
  });
}

/** A worker process, as `npm run worker` starts it; its JSON log lines are what the tests observe. */
class WorkerProcess {
  readonly lines: LogLine[] = [];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly listeners = new Set<() => void>();
  private readonly child: ChildProcess;

  constructor(
    readonly id: string,
    env: Record<string, string>,
  ) {
    this.child = spawn(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src/distributed/worker-main.ts')], {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        WORKER_ID: id,
        MODEL_DIR: TINY,
        // a live job's lock is renewed every 30 s and lasts 60 s: no pause of a busy machine loses it
        WORKER_LOCK_MS: '60000',
        WORKER_STALLED_INTERVAL_MS: '1000',
        WORKER_HEARTBEAT_MS: '500',
        WORKER_TEST_HOLD_STEP: String(HOLD_STEP),
        LOG_LEVEL: 'info',
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let buffered = '';
    this.child.stdout!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        try {
          this.lines.push(JSON.parse(line) as LogLine);
        } catch {
          this.lines.push({ msg: line });
        }
      }
      for (const listener of this.listeners) listener();
    });
    this.child.stderr!.on('data', (chunk: Buffer) => this.lines.push({ msg: `stderr: ${chunk.toString()}` }));
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })));
  }

  /** Resolves with the first log line (past or future) that matches. */
  waitFor(match: (line: LogLine) => boolean, timeoutMs: number, what: string): Promise<LogLine> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const found = this.lines.find(match);
        if (!found) return false;
        cleanup();
        resolve(found);
        return true;
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`worker ${this.id}: timed out waiting for ${what}; log:\n${this.lines.map((l) => JSON.stringify(l)).join('\n')}`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.listeners.delete(listener);
      };
      const listener = (): void => void check();
      if (!check()) this.listeners.add(listener);
    });
  }

  ready(): Promise<LogLine> {
    return this.waitFor((l) => l.msg === 'worker ready', 60_000, 'ready');
  }

  jobs(msg: 'job started' | 'job completed' | 'job cancelled' | 'job failed'): string[] {
    return this.lines.filter((l) => l.msg === msg).map((l) => l.job!);
  }

  /** How many times a job was held (a HOLD_PROMPT_PREFIX job stopped after step HOLD_STEP). */
  get holds(): number {
    return this.lines.filter((l) => l.msg === 'job held').length;
  }

  /** Resolves once the worker has logged its `count`-th message `msg`, with that line. */
  waitForNth(msg: string, count: number, timeoutMs: number, what: string): Promise<LogLine> {
    return this.waitFor((l) => l.msg === msg && l === this.lines.filter((x) => x.msg === msg)[count - 1], timeoutMs, what);
  }

  /** Lets the job it holds go on. */
  release(): void {
    this.child.kill('SIGUSR2');
  }

  kill(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }
}

/** A generate() call, with the progress it reported so far. */
function track(client: RemoteEngineClient, request: GenerateRequest, signal?: AbortSignal) {
  const progress: ProgressEvent[] = [];
  const outcome = client.generate(request, { signal, onProgress: (e) => progress.push(e) });
  outcome.catch(() => undefined);
  return { progress, outcome };
}

const fast = (seed: number): GenerateRequest => ({ prompt: `stream job ${seed}`, mode: 'single', experts: ['alpha'], seed });
/**
 * Four images of 50 steps, which the worker running it holds after step HOLD_STEP (every run) until the
 * test releases it: a job that is certainly still running while the test acts.
 */
const held = (seed: number): GenerateRequest => ({ prompt: `${HOLD_PROMPT_PREFIX}slow job ${seed}`, mode: 'afa', ensemble: 'duo', seed, steps: 50, count: 4, width: 64, height: 64 });

describe('distributed mode with two worker processes', () => {
  let redis: TestRedis;
  let client: RemoteEngineClient;
  /** BullMQ's view of the fixture package's queue, to see where jobs are. */
  let inspect: Queue<RemoteJobData>;
  let w1: WorkerProcess;
  let w2: WorkerProcess;
  /** A worker given a package it cannot load. */
  let broken: WorkerProcess;
  /** The worker left after the SIGKILL test. */
  let survivor: WorkerProcess;
  let brokenDir: string;
  const completedEverywhere = (): string[] => [w1, w2].flatMap((w) => w.jobs('job completed'));
  /** Counts the holds of w1 and w2 now; the function returned resolves with the one that holds a job since. */
  const watchForHold = (): (() => Promise<WorkerProcess>) => {
    const counts = [w1.holds, w2.holds];
    return () => waitUntil(() => [w1, w2].find((w, i) => w.holds > counts[i]), 60_000, 'a worker to hold the job');
  };
  /** The progress steps BullMQ's event stream recorded for a job, once it has completed or failed. */
  const historyOf = async (jobId: string): Promise<{ steps: number[]; end: 'completed' | 'failed' }> => {
    // read from the stream's start: events are in order, and every step precedes the job's end
    const events = new QueueEvents(inspect.name, { connection: { url: redis.url, maxRetriesPerRequest: null }, prefix: QUEUE_PREFIX, lastEventId: '0-0' });
    try {
      return await new Promise((resolve) => {
        const steps: number[] = [];
        events.on('progress', ({ jobId: id, data }) => void (id === jobId && steps.push((data as unknown as RemoteJobProgress).step)));
        events.on('completed', ({ jobId: id }) => void (id === jobId && resolve({ steps, end: 'completed' })));
        events.on('failed', ({ jobId: id }) => void (id === jobId && resolve({ steps, end: 'failed' })));
      });
    } finally {
      await events.close();
    }
  };

  before(async () => {
    redis = await startRedis();
    brokenDir = await copyOfTiny();
    await writeFile(path.join(brokenDir, 'vae_decoder/model.onnx'), 'garbage');
    w1 = new WorkerProcess('w1', { REDIS_URL: redis.url });
    w2 = new WorkerProcess('w2', { REDIS_URL: redis.url });
    broken = new WorkerProcess('broken', { REDIS_URL: redis.url, MODEL_DIR: brokenDir });
    client = await RemoteEngineClient.connect({ redisUrl: redis.url, owner: 'test-bot', logger: quiet, checkIntervalMs: 1000 });
    inspect = new Queue(queueNameFor(await client.info()), { connection: { url: redis.url, maxRetriesPerRequest: null }, prefix: QUEUE_PREFIX });
    await Promise.all([w1.ready(), w2.ready()]);
  });

  after(async () => {
    await client?.dispose();
    await inspect?.close();
    for (const w of [w1, w2, broken]) w?.kill('SIGKILL');
    await Promise.all([w1?.exited, w2?.exited, broken?.exited]);
    await redis?.stop();
    if (brokenDir) await rm(brokenDir, { recursive: true, force: true });
  });

  test('the bot serves the package the workers advertise; a worker that cannot load it exits and says why', async () => {
    const info = await client.info();
    assert.equal(`${info.name}@${info.version}`, 'tiny@1.0.0');
    assert.deepEqual(info.experts.map((e) => e.id), ['alpha', 'beta', 'odd']);

    const { code } = await broken.exited;
    assert.equal(code, 1, 'the broken worker exits non-zero');
    assert.ok(broken.lines.some((l) => /could not be loaded/.test(l.msg ?? '') && /vae_decoder/.test(l.problem ?? '')));
    assert.equal(broken.lines.filter((l) => l.msg === 'worker ready').length, 0, 'it never took jobs');

    const adverts = await waitUntil(async () => {
      const list = await client.workers();
      return list.length === 3 && list;
    }, 20_000, 'three adverts');
    assert.deepEqual(adverts.map((w) => [w.id, w.package, w.healthy, w.executionProvider]), [
      ['broken', '', false, ''],
      ['w1', 'tiny@1.0.0', true, 'cpu'],
      ['w2', 'tiny@1.0.0', true, 'cpu'],
    ]);
    assert.match(adverts[0].problem ?? '', /vae_decoder\/model\.onnx/);
    assert.deepEqual(adverts[1].experts, ['alpha', 'beta', 'odd']);
    assert.deepEqual(adverts[1].ensembles, ['duo', 'fuse']);
  });

  test('a stream of jobs is shared by both workers; every job completes once, with the same pixels as the embedded engine', async () => {
    // The first job is held by whichever worker takes it (a), so the stream's next job must go to the
    // other (b); a lets it go on only once b has started a job of its own.
    const holder = watchForHold();
    const startedBefore = new Map([w1, w2].map((w) => [w, w.jobs('job started').length]));
    const jobs = [track(client, { ...fast(100), prompt: `${HOLD_PROMPT_PREFIX}stream job 100` })];
    const a = await holder();
    const b = a === w1 ? w2 : w1;
    const heldJob = a.jobs('job started').at(-1)!;
    jobs.push(...Array.from({ length: 7 }, (_, i) => track(client, fast(101 + i))));
    let taken: LogLine;
    try {
      taken = await b.waitForNth('job started', startedBefore.get(b)! + 1, 20_000, 'the other worker to take a job while the first is held');
    } finally {
      a.release();
    }

    const results = await Promise.all(jobs.map((j) => j.outcome));
    results.forEach((result, i) => {
      assert.equal(result.images[0].seed, 100 + i);
      assert.equal(result.params.model, 'tiny@1.0.0');
      assert.equal(jobs[i].progress.at(-1)?.step, result.params.steps, 'progress reached the last step');
    });
    // a worker logs a completion just after the bot hears of it
    const completed = await waitUntil(() => completedEverywhere().length >= 8 && completedEverywhere(), 20_000, '8 completions logged');
    assert.equal(new Set(completed).size, 8, 'no job completed twice');
    assert.ok(a.jobs('job completed').includes(heldJob), 'the held job completed where it was held');
    assert.ok(b.jobs('job completed').includes(taken.job!), 'the other worker completed the job it took meanwhile');
    assert.ok(w1.jobs('job completed').length > 0 && w2.jobs('job completed').length > 0, 'both workers took jobs');

    const embedded = await startEngineThread({ modelDir: TINY });
    try {
      // Held on its worker after step HOLD_STEP (of 8, each but the last with a preview) until the bot
      // has a preview: a preview is kept in Redis only while its job runs. The embedded engine holds nothing.
      const request: GenerateRequest = { prompt: `${HOLD_PROMPT_PREFIX}same everywhere`, mode: 'afa', ensemble: 'duo', seed: 7, contributions: true, preview: true };
      const previews: ProgressEvent[] = [];
      const holder = watchForHold();
      const remoteOutcome = client.generate(request, { onProgress: (e) => e.preview && previews.push(e) });
      remoteOutcome.catch(() => undefined);
      const worker = await holder();
      try {
        await waitUntil(() => previews.length > 0, 20_000, 'a preview of the held job');
      } finally {
        worker.release();
      }
      const [remote, local] = await Promise.all([remoteOutcome, embedded.generate(request)]);
      assert.deepEqual(Buffer.from(remote.images[0].image.data), Buffer.from(local.images[0].image.data));
      assert.deepEqual(remote.images[0].contributions!.weights, local.images[0].contributions!.weights);
      assert.deepEqual(remote.images[0].contributions!.shares, local.images[0].contributions!.shares);
      assert.ok(previews.length > 0, 'previews came through');
      assert.equal(previews[0].preview!.data.length, previews[0].preview!.width * previews[0].preview!.height * 3);
      await waitUntil(() => completedEverywhere().length === 9, 20_000, 'the ninth completion logged');
    } finally {
      await embedded.dispose();
    }
  });

  test('a worker killed with SIGKILL mid-job: the job runs again on the other worker and completes once', async () => {
    const earlier = new Set(completedEverywhere());
    const holder = watchForHold();
    const job = track(client, held(1));
    // the job is held after step HOLD_STEP by whichever worker took it: that one dies mid-job
    const victim = await holder();
    survivor = victim === w1 ? w2 : w1;
    const jobId = victim.jobs('job started').at(-1)!;
    const survivorHolds = survivor.holds;
    victim.kill('SIGKILL');
    assert.equal((await victim.exited).signal, 'SIGKILL');
    // Its lock would run out WORKER_LOCK_MS after the last renewal; the test ends it now instead of waiting.
    const admin = new Redis(redis.url);
    try {
      assert.equal(await admin.del(`${inspect.toKey(jobId)}:lock`), 1, 'the killed worker still held the job');
    } finally {
      await admin.quit();
    }

    // The survivor finds the job stalled and runs it again (held again, as each run is), then finishes it.
    try {
      await Promise.race([
        survivor.waitForNth('job held', survivorHolds + 1, 60_000, 'the job held again on the survivor'),
        job.outcome.then(() => assert.fail('the job finished before it was held again')), // a job given up fails the test here at once
      ]);
      assert.ok(survivor.lines.some((l) => l.msg === 'job started' && l.job === jobId && l.run === 2), 'its second run, on the survivor');
    } finally {
      survivor.release();
    }
    const result = await job.outcome;
    assert.equal(result.images.length, 4);
    await survivor.waitFor((l) => l.msg === 'job completed' && l.job === jobId, 20_000, 'the completion logged');
    assert.deepEqual(victim.jobs('job completed').filter((id) => id === jobId), []);
    assert.deepEqual(completedEverywhere().filter((id) => !earlier.has(id)), [jobId], 'completed exactly once');
    // The dead worker's advertisement expires with its heartbeat.
    await waitUntil(async () => !(await client.workers()).some((w) => w.id === victim.id), 20_000, 'the advert to expire');
  });

  test('cancelling a waiting job removes it; cancelling a running job stops it at its next step', async () => {
    const running = new AbortController();
    const waiting = new AbortController();
    const startedBefore = survivor.jobs('job started').length;
    const cancelledBefore = survivor.jobs('job cancelled').length;
    const holdsBefore = survivor.holds;
    const first = track(client, held(2), running.signal);
    await survivor.waitForNth('job held', holdsBefore + 1, 60_000, 'the first job held on the worker');
    const firstId = survivor.jobs('job started').at(-1)!;
    const second = track(client, fast(3), waiting.signal);
    await waitUntil(async () => (await inspect.getWaitingCount()) === 1, 20_000, 'the second job waiting in Redis');

    waiting.abort();
    await assert.rejects(second.outcome, (e: unknown) => e instanceof EngineError && e.code === 'cancelled');
    await waitUntil(async () => (await inspect.getWaitingCount()) === 0, 20_000, 'the waiting job removed');

    // The running job is held after step HOLD_STEP; its cancellation ends the hold, and the job must
    // stop at the next step boundary: its last step stays HOLD_STEP of 50.
    running.abort();
    await assert.rejects(first.outcome, (e: unknown) => e instanceof EngineError && e.code === 'cancelled');
    const stopped = await survivor.waitForNth('job cancelled', cancelledBefore + 1, 20_000, 'the running job to stop');
    assert.equal(stopped.job, firstId);
    const history = await historyOf(firstId);
    assert.equal(history.end, 'failed');
    assert.equal(Math.max(...history.steps), HOLD_STEP, `stopped right after the step it was held at (steps ${history.steps.join(', ')})`);

    // The worker goes on with the next job; the cancelled waiting job never started.
    const next = await client.generate(fast(300));
    assert.equal(next.images.length, 1);
    await waitUntil(() => survivor.jobs('job completed').includes(survivor.jobs('job started').at(-1)!), 20_000, 'its completion logged');
    const startedSince = survivor.jobs('job started').slice(startedBefore);
    assert.equal(startedSince.length, 2, `only the running job and the next one started: ${startedSince.join(', ')}`);
    assert.equal(startedSince[0], stopped.job);
  });

  test('a Redis restart loses neither the running job nor the one waiting for a worker', async () => {
    const earlier = new Set(completedEverywhere());
    const holdsBefore = survivor.holds;
    const first = track(client, held(4));
    await survivor.waitForNth('job held', holdsBefore + 1, 60_000, 'the first job held on the worker');
    const second = track(client, fast(400));
    await waitUntil(async () => (await inspect.getWaitingCount()) === 1, 20_000, 'the second job waiting in Redis');

    // the first job is mid-run through the whole restart, and goes on only after it
    try {
      await redis.restart();
    } finally {
      survivor.release();
    }
    const [a, b] = await Promise.all([first.outcome, second.outcome]);
    assert.equal(a.images.length, 4);
    assert.equal(b.images[0].seed, 400);
    const completedSince = () => completedEverywhere().filter((id) => !earlier.has(id));
    const completed = await waitUntil(() => completedSince().length >= 2 && completedSince(), 20_000, 'two completions logged');
    assert.equal(new Set(completed).size, 2, 'each completed once');
  });

  test('a worker whose engine thread dies mid-job stops and leaves the job to another worker', async () => {
    // A package of its own, so that only these two in-process workers see the job.
    const renamed = (engine: EngineThread, hold?: StepHold): EngineClient => ({
      info: async () => ({ ...(await engine.info()), name: 'fragile' }),
      generate: (request, options) => engine.generate(request, { ...options, hold }),
      dispose: () => engine.dispose(),
    });
    // The doomed worker's short lock is the stall this test waits for; its job is held (then its
    // thread crashes), so nothing depends on that lock being renewed in time. The rescuer, whose run
    // of the job must not stall on a busy machine, renews a long lock; it checks for stalls often.
    const dyingTimings = { lockDurationMs: 1500, stalledIntervalMs: 500 };
    const rescuerTimings = { lockDurationMs: 60_000, stalledIntervalMs: 500 };
    const doomedEngine = await EngineThread.start({ modelDir: TINY });
    // the doomed thread stops after step 1 until the test has asked it to crash
    const hold = new StepHold(1);
    const lost: EngineError[] = [];
    const dying = await WorkerHost.start({ redisUrl: redis.url, engine: renamed(doomedEngine, hold), workerId: 'fragile-1', logger: quiet, timings: dyingTimings, onEngineLost: (e) => lost.push(e) });
    const fragileClient = await RemoteEngineClient.connect({ redisUrl: redis.url, owner: 'test-bot', packageId: 'fragile@1.0.0', logger: quiet, checkIntervalMs: 1000 });
    let rescuer: WorkerHost | undefined;
    let rescuerEngine: EngineClient | undefined;
    try {
      // the thread ends at the step boundary after crash(), which the hold keeps it at
      const job = track(fragileClient, { ...fast(600), steps: 50 });
      await waitUntil(() => job.progress.length >= 1, 60_000, 'the job under way');
      doomedEngine.crash();
      hold.release();
      await waitUntil(() => lost.length === 1, 20_000, 'the worker to give up');
      assert.equal(lost[0].code, 'unavailable');
      assert.equal(doomedEngine.stopped, true);

      rescuerEngine = renamed(await EngineThread.start({ modelDir: TINY }));
      rescuer = await WorkerHost.start({ redisUrl: redis.url, engine: rescuerEngine, workerId: 'fragile-2', logger: quiet, timings: rescuerTimings });
      const result = await job.outcome;
      assert.equal(result.params.steps, 50);
      assert.equal(result.images[0].seed, 600);
    } finally {
      await rescuer?.stop();
      await rescuerEngine?.dispose();
      await dying.stop();
      await fragileClient.dispose();
    }
  });

  test('a job whose workers keep dying runs at most three times, then fails with a clear message', async () => {
    // Workers that take the job and never renew its lock look exactly like killed ones to BullMQ.
    const info: PackageInfo = { ...(await client.info()), name: 'doomed' };
    const admin = new Redis(redis.url);
    await publishPackage(admin, info);
    await admin.quit();
    const doomedClient = await RemoteEngineClient.connect({ redisUrl: redis.url, owner: 'test-bot', packageId: 'doomed@1.0.0', logger: quiet, checkIntervalMs: 1000 });
    const runs: string[] = [];
    const zombies = Array.from(
      { length: 4 },
      (_, i) =>
        new Worker<RemoteJobData>(
          queueNameFor(info),
          async (job) => {
            runs.push(`${i}:${job.id}`);
            await new Promise(() => undefined);
          },
          { connection: { url: redis.url, maxRetriesPerRequest: null }, prefix: QUEUE_PREFIX, skipLockRenewal: true, lockDuration: 1000, stalledInterval: 500, maxStalledCount: 2 },
        ),
    );
    try {
      const outcome = doomedClient.generate(fast(500));
      await assert.rejects(outcome, (e: unknown) => e instanceof EngineError && e.message === STALLED_MESSAGE);
      assert.equal(runs.length, 3, `runs: ${runs.join(', ')}`);
      assert.match(STALLED_MESSAGE, /stopped 3 times .*again on another worker 2 times/);
    } finally {
      await Promise.all(zombies.map((z) => z.close(true)));
      await doomedClient.dispose();
    }
  });
});
