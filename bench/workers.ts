// `npm run bench:workers [-- --json] [--model-dir DIR] [--jobs N] [--latency-jobs N] [--steps N] [--threads N] [--redis-url URL]`
// The distributed mode against the embedded one, on this machine, in one run:
//  1. jobs per minute: N jobs kept flowing as the bot's fair queue would dispatch them (as many in
//     flight as there are engines), embedded (one engine thread, the default) and through Redis with
//     1 and 2 worker processes (`npm run worker`'s entry, spawned here);
//  2. dispatch → start latency, p50/p99, over one-at-a-time jobs on idle engines. "Start" is the
//     first progress event as the dispatcher sees it (after step 1), measured the same way in both
//     modes, so the difference between them is what the queue adds (Redis round trips, the worker
//     noticing the job, the progress event's way back).
// Every number is also printed as a ratio to the embedded mode. Without --redis-url a throwaway
// redis-server is started (as the tests do). Each engine gets --threads onnxruntime threads (default
// 1: on a small shared CPU, onnxruntime's own choice makes its threads spin against each other and
// every other process, and the timings mostly measure that; 0 = onnxruntime's choice).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cpus } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { EngineClient, GenerateRequest, PackageInfo } from '../src/engine/api.ts';
import { RemoteEngineClient } from '../src/distributed/remote-engine.ts';
import { startEngineThread } from '../src/engine-host/engine-thread.ts';
import { startRedis, type TestRedis } from '../src/testing/redis-server.ts';

const { values } = parseArgs({
  options: {
    json: { type: 'boolean' },
    'model-dir': { type: 'string' },
    jobs: { type: 'string', default: '48' },
    'latency-jobs': { type: 'string', default: '30' },
    steps: { type: 'string' },
    threads: { type: 'string', default: '1' },
    'redis-url': { type: 'string' },
  },
});

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const modelDir = path.resolve(
  values['model-dir'] ?? process.env.MODEL_DIR ?? (existsSync(path.join(root, 'models/demo/manifest.json')) ? path.join(root, 'models/demo') : path.join(root, 'test/fixtures/tiny')),
);
const executionProvider = process.env.EXECUTION_PROVIDER === 'cuda' ? 'cuda' : 'cpu';
const jobCount = Number(values.jobs);
const latencyJobs = Number(values['latency-jobs']);
const threads = Number(values.threads) || undefined;
const log = (s: string): void => void process.stderr.write(`${s}\n`);
const quiet = { debug() {}, info() {}, warn: (o: object, m?: string) => log(`warn: ${m ?? ''} ${JSON.stringify(o)}`), error: (o: object, m?: string) => log(`error: ${m ?? ''} ${JSON.stringify(o)}`) };
const prompt = 'a red circle on the left and a blue square on the right, white background';

function percentile(xs: number[], p: number): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

function requestFor(info: PackageInfo, steps: number): (seed: number) => GenerateRequest {
  const ensemble = info.ensembles[0]?.id;
  return (seed) =>
    ensemble ? { prompt, mode: 'afa', ensemble, seed, steps } : { prompt, mode: 'single', experts: [info.experts[0].id], seed, steps };
}

interface Measured {
  jobsPerMinute: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
}

/** Jobs/min with `inFlight` dispatch slots, then dispatch → first progress latency one job at a time. */
async function measure(engine: EngineClient, request: (seed: number) => GenerateRequest, inFlight: number, label: string): Promise<Measured> {
  await Promise.all(Array.from({ length: inFlight * 2 }, (_, i) => engine.generate(request(i + 1))));
  let next = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: inFlight }, async () => {
      while (next < jobCount) await engine.generate(request(1000 + next++));
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const latencies: number[] = [];
  for (let i = 0; i < latencyJobs; i++) {
    const dispatched = performance.now();
    let first: number | undefined;
    await engine.generate(request(5000 + i), { onProgress: () => (first ??= performance.now()) });
    latencies.push(first! - dispatched);
  }
  const measured = { jobsPerMinute: (jobCount / seconds) * 60, latencyP50Ms: percentile(latencies, 50), latencyP99Ms: percentile(latencies, 99) };
  log(
    `${label}: ${jobCount} jobs in ${seconds.toFixed(1)} s → ${measured.jobsPerMinute.toFixed(1)} jobs/min; ` +
      `dispatch → start p50 ${measured.latencyP50Ms.toFixed(1)} ms, p99 ${measured.latencyP99Ms.toFixed(1)} ms`,
  );
  return measured;
}

function spawnWorker(id: string, redisUrl: string): { child: ChildProcess; ready: Promise<void> } {
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(root, 'src/distributed/worker-main.ts')], {
    cwd: root,
    env: {
      ...process.env,
      REDIS_URL: redisUrl,
      MODEL_DIR: modelDir,
      EXECUTION_PROVIDER: executionProvider,
      ENGINE_THREADS: threads ? String(threads) : '',
      WORKER_ID: id,
      LOG_LEVEL: 'info',
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const ready = new Promise<void>((resolve, reject) => {
    let seen = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      seen += chunk.toString();
      if (seen.includes('"msg":"worker ready"')) resolve();
      const lines = seen.split('\n');
      seen = lines.pop()!;
      for (const line of lines) if (/"level":[4-6]0/.test(line)) log(`[${id}] ${line}`);
    });
    child.once('exit', (code) => reject(new Error(`worker ${id} exited (${code}) before it was ready`)));
  });
  return { child, ready };
}

async function stopWorkers(children: ChildProcess[]): Promise<void> {
  await Promise.all(
    children.map(
      (child) =>
        new Promise<void>((resolve) => {
          if (child.exitCode !== null) return resolve();
          child.once('exit', () => resolve());
          child.kill('SIGTERM');
        }),
    ),
  );
}

// ---- embedded: the engine in a worker thread of this process -------------------------------------
const embedded = await startEngineThread({ modelDir, executionProvider, threads });
const info = await embedded.info();
const steps = values.steps ? Number(values.steps) : info.defaults.steps;
const request = requestFor(info, steps);
log(`bench:workers ${info.name}@${info.version} (${modelDir}), ${executionProvider}, ${cpus().length} cores, ${threads ?? 'default'} onnxruntime thread(s) per engine, ${steps} steps, ${jobCount} jobs, ${latencyJobs} latency samples`);
const results: Record<string, Measured> = {};
try {
  results.embedded = await measure(embedded, request, 1, 'embedded (engine in a worker thread)');
} finally {
  await embedded.dispose();
}

// ---- redis: 1 and 2 worker processes -------------------------------------------------------------
let redis: TestRedis | undefined;
const redisUrl = values['redis-url'] ?? (redis = await startRedis()).url;
const children: ChildProcess[] = [];
let client: RemoteEngineClient | undefined;
try {
  for (const workers of [1, 2]) {
    while (children.length < workers) {
      const worker = spawnWorker(`bench-${children.length + 1}`, redisUrl);
      children.push(worker.child);
      await worker.ready;
    }
    client ??= await RemoteEngineClient.connect({ redisUrl, owner: `bench-${process.pid}`, packageId: `${info.name}@${info.version}`, logger: quiet });
    results[`redis, ${workers} worker${workers > 1 ? 's' : ''}`] = await measure(client, request, workers, `redis, ${workers} worker process${workers > 1 ? 'es' : ''}`);
  }
} finally {
  await client?.dispose();
  await stopWorkers(children);
  await redis?.stop();
}

const base = results.embedded;
const rows = Object.entries(results).map(([mode, m]) => ({
  mode,
  'jobs/min': Number(m.jobsPerMinute.toFixed(1)),
  'jobs/min ÷ embedded': Number((m.jobsPerMinute / base.jobsPerMinute).toFixed(2)),
  'start p50 ms': Number(m.latencyP50Ms.toFixed(1)),
  'p50 ÷ embedded': Number((m.latencyP50Ms / base.latencyP50Ms).toFixed(2)),
  'start p99 ms': Number(m.latencyP99Ms.toFixed(1)),
  'p99 ÷ embedded': Number((m.latencyP99Ms / base.latencyP99Ms).toFixed(2)),
}));
if (values.json) {
  console.log(JSON.stringify({ package: `${info.name}@${info.version}`, executionProvider, cores: cpus().length, threads: threads ?? 0, steps, jobs: jobCount, latencyJobs, rows }));
} else {
  console.table(rows);
}
