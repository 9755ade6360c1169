// The distributed mode's pieces that need no Redis: the result encoding, failure reasons, which
// package the bot serves, queue names, the worker summary for /queue, and the worker's and the bot's settings.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadConfig, ConfigError } from '../src/bot/config.ts';
import { EngineError, type GenerateRequest, type GenerateResult, type PackageInfo } from '../src/engine/api.ts';
import { queueNameFor } from '../src/distributed/names.ts';
import { decodeFailure, decodeRequest, encodeFailure, encodeRequest, STALLED_MESSAGE } from '../src/distributed/protocol.ts';
import { choosePackage, type PublishedPackage, type WorkerAdvert } from '../src/distributed/registry.ts';
import { decodeImage, decodeResult, encodeImage, encodeResult } from '../src/distributed/result-codec.ts';
import { loadWorkerConfig, WorkerConfigError } from '../src/distributed/worker-config.ts';
import { describeWorkers } from '../src/distributed/worker-summary.ts';

function sampleResult(): GenerateResult {
  const pixels = (seed: number) => Uint8Array.from({ length: 4 * 3 * 3 }, (_, i) => (i * 7 + seed) % 256);
  return {
    params: {
      prompt: 'a red circle',
      negative: '',
      mode: 'afa',
      ensemble: 'duo',
      experts: ['alpha', 'beta'],
      seed: 5,
      steps: 8,
      guidance: 5,
      scheduler: 'ddim',
      karras: false,
      width: 4,
      height: 3,
      count: 2,
      model: 'tiny@1.0.0',
      truncatedWords: [],
    },
    images: [5, 6].map((seed) => ({
      seed,
      image: { width: 4, height: 3, data: pixels(seed) },
      contributions: {
        experts: ['alpha', 'beta'],
        width: 2,
        height: 1,
        weights: [Float32Array.from([0.25, 1 / 3]), Float32Array.from([0.75, 2 / 3])],
        shares: [0.2916, 0.7083],
      },
    })),
    timings: { totalMs: 10, denoiseMs: 8, decodeMs: 1, runMs: 7, denoiseRunMs: 6 },
    warnings: ['a warning'],
  };
}

test('results and previews survive the binary encoding exactly', () => {
  const result = sampleResult();
  const decoded = decodeResult(encodeResult(result));
  assert.deepEqual(decoded, result);
  assert.ok(decoded.images[1].contributions!.weights[0] instanceof Float32Array);
  assert.equal(decoded.images[1].contributions!.weights[0][1], Math.fround(1 / 3));

  const noMaps: GenerateResult = { ...result, images: result.images.map(({ seed, image }) => ({ seed, image })) };
  assert.deepEqual(decodeResult(encodeResult(noMaps)), noMaps);

  // A view into a larger buffer encodes only its own bytes.
  const backing = new Uint8Array(100).fill(9);
  const view = backing.subarray(10, 10 + 2 * 2 * 3);
  view.set([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  assert.deepEqual(decodeImage(encodeImage({ width: 2, height: 2, data: view })), { width: 2, height: 2, data: Uint8Array.from(view) });

  assert.throws(() => decodeResult(Buffer.from('not a result')), /not an encoded result/);
  assert.throws(() => decodeResult(encodeResult(result).subarray(0, 60)));
});

test('failure reasons keep the engine error code; stalled jobs get a clear message', () => {
  const bad = decodeFailure(encodeFailure(new EngineError('unknown_model', 'There is no model "nope".')));
  assert.equal(bad.code, 'unknown_model');
  assert.equal(bad.message, 'There is no model "nope".');
  const crash = decodeFailure(encodeFailure(new TypeError('x is undefined')));
  assert.equal(crash.code, 'internal');
  assert.match(crash.message, /GPU worker failed: x is undefined/);

  const stalled = decodeFailure('job stalled more than allowable limit');
  assert.equal(stalled.code, 'internal');
  assert.equal(stalled.message, STALLED_MESSAGE);
  assert.match(STALLED_MESSAGE, /stopped 3 times/);
  assert.match(decodeFailure(undefined).message, /no reason given/);
});

test('queue names follow the package and its version, without the characters BullMQ refuses', () => {
  assert.equal(queueNameFor({ name: 'demo', version: '1.2.0' }), 'pkg.demo@1.2.0');
  assert.equal(queueNameFor({ name: 'my:pack age', version: '2' }), 'pkg.my_pack_age@2');
  assert.notEqual(queueNameFor({ name: 'demo', version: '1.2.0' }), queueNameFor({ name: 'demo', version: '1.3.0' }));
});

test('the bot serves the package most live workers have, else the newest published one', () => {
  const info = (name: string, version = '1.0.0') => ({ name, version }) as PackageInfo;
  const published = (name: string, at: number, version = '1.0.0'): PublishedPackage => ({ info: info(name, version), publishedAt: at });
  const worker = (id: string, pkg: string, startedAt: number, healthy = true) => ({ id, package: pkg, healthy, startedAt }) as WorkerAdvert;
  const packages = [published('demo', 1), published('demo', 3, '2.0.0'), published('other', 2)];

  assert.equal(choosePackage([], []), undefined);
  assert.equal(choosePackage([], packages)?.version, '2.0.0', 'no worker online: the newest published');
  const two = [worker('a', 'demo@1.0.0', 10), worker('b', 'demo@1.0.0', 11), worker('c', 'demo@2.0.0', 12)];
  assert.equal(choosePackage(two, packages)?.version, '1.0.0', 'the most workers');
  const tie = [worker('a', 'demo@1.0.0', 10), worker('c', 'other@1.0.0', 12)];
  assert.equal(choosePackage(tie, packages)?.name, 'other', 'ties: the most recently started worker');
  const sick = [worker('a', 'demo@1.0.0', 10, false), worker('c', 'other@1.0.0', 12)];
  assert.equal(choosePackage([...sick, worker('d', 'demo@1.0.0', 13, false)], packages)?.name, 'other', 'unhealthy workers do not count');
  assert.equal(choosePackage(two, packages, 'other@1.0.0')?.name, 'other', 'an explicit choice wins');
  assert.equal(choosePackage(two, packages, 'missing@1'), undefined);
});

test('worker settings: REDIS_URL required, numbers checked, defaults for the rest', () => {
  const config = loadWorkerConfig({ REDIS_URL: 'redis://:pw@gpu-box:6379', WORKER_ID: 'gpu-1.a', EXECUTION_PROVIDER: 'CUDA' });
  assert.equal(config.redisUrl, 'redis://:pw@gpu-box:6379');
  assert.equal(config.executionProvider, 'cuda');
  assert.equal(config.modelDir, 'models/demo');
  assert.equal(config.workerId, 'gpu-1.a');
  assert.deepEqual(config.timings, { lockDurationMs: 30_000, stalledIntervalMs: 30_000, heartbeatMs: 5000 });
  assert.match(loadWorkerConfig({ REDIS_URL: 'rediss://h:1' }).workerId, /-\d+$/);

  assert.throws(
    () => loadWorkerConfig({ REDIS_URL: 'http://h', EXECUTION_PROVIDER: 'tpu', WORKER_LOCK_MS: '5', WORKER_ID: 'a b' }),
    (e: unknown) =>
      e instanceof WorkerConfigError &&
      e.problems.length === 4 &&
      /REDIS_URL/.test(e.problems[0]) &&
      e.problems.some((p) => /EXECUTION_PROVIDER/.test(p)) &&
      e.problems.some((p) => /WORKER_LOCK_MS must be a whole number from 1000/.test(p)) &&
      e.problems.some((p) => /WORKER_ID/.test(p)),
  );
});

test('bot settings: QUEUE_BACKEND=redis needs a redis:// REDIS_URL; memory stays the default', () => {
  const base = { DISCORD_TOKEN: 'abc.def.ghi-secret-token', DISCORD_APPLICATION_ID: '123456789012345678' };
  assert.equal(loadConfig(base).queueBackend ?? 'memory', 'memory');
  const redis = loadConfig({ ...base, QUEUE_BACKEND: 'Redis', REDIS_URL: 'redis://127.0.0.1:6379' });
  assert.equal(redis.queueBackend, 'redis');
  assert.equal(redis.redisUrl, 'redis://127.0.0.1:6379');
  assert.throws(() => loadConfig({ ...base, QUEUE_BACKEND: 'redis' }), (e: unknown) => e instanceof ConfigError && /REDIS_URL is missing/.test(e.message));
  assert.throws(
    () => loadConfig({ ...base, QUEUE_BACKEND: 'kafka', REDIS_URL: 'localhost:6379' }),
    (e: unknown) => e instanceof ConfigError && e.problems.length === 2 && /QUEUE_BACKEND must be memory or redis/.test(e.message),
  );
});

test('/queue summary of the GPU workers: busy ones first, unhealthy ones with their reason', () => {
  const advert = (id: string, over: Partial<WorkerAdvert>): WorkerAdvert => ({
    id,
    host: 'h',
    pid: 1,
    package: 'demo@1.0.0',
    experts: [],
    ensembles: [],
    executionProvider: 'cuda',
    healthy: true,
    state: 'idle',
    jobsDone: 0,
    startedAt: 0,
    seenAt: 0,
    ...over,
  });
  const text = describeWorkers(
    [
      advert('b-gpu0', { jobsDone: 3 }),
      advert('a-gpu1', { state: 'busy', jobId: 'x', jobsDone: 1 }),
      advert('old', { package: 'demo@0.9.0' }),
      advert('c-gpu0', { healthy: false, package: '', problem: 'cannot load the model package models/demo: bad graph' }),
    ],
    'demo@1.0.0',
  );
  assert.deepEqual(text.split('\n'), [
    '2 GPU workers for demo@1.0.0, 1 busy:',
    '• `a-gpu1` (cuda) — drawing, 1 job done',
    '• `b-gpu0` (cuda) — idle, 3 jobs done',
    '• ⚠️ `c-gpu0` takes no jobs: cannot load the model package models/demo: bad graph',
  ]);
  assert.match(describeWorkers([], 'demo@1.0.0'), /No GPU worker is online for demo@1\.0\.0/);
});

test('an image-to-image request survives the JSON of a BullMQ job: the init image travels as base64', () => {
  const data = new Uint8Array(4 * 3 * 3).map((_, i) => (i * 37) % 256);
  const request: GenerateRequest = { prompt: 'a red circle', mode: 'afa', ensemble: 'trio', seed: 9, width: 4, height: 3, strength: 0.35, initImage: { width: 4, height: 3, data } };
  const wire = JSON.parse(JSON.stringify({ request: encodeRequest(request) })).request;
  assert.equal(typeof wire.initImage.base64, 'string');
  const back = decodeRequest(wire);
  assert.deepEqual({ ...back, initImage: undefined }, { ...request, initImage: undefined });
  assert.ok(back.initImage!.data instanceof Uint8Array);
  assert.deepEqual(Array.from(back.initImage!.data), Array.from(data));
  assert.deepEqual([back.initImage!.width, back.initImage!.height], [4, 3]);

  // Without an init image the request is unchanged; a damaged one is the engine's bad_request.
  const plain: GenerateRequest = { prompt: 'x', mode: 'single', experts: ['curves'], seed: 1 };
  assert.deepEqual(decodeRequest(JSON.parse(JSON.stringify(encodeRequest(plain)))), plain);
  assert.throws(
    () => decodeRequest({ ...plain, initImage: { width: 4, height: 3, base64: 'AAAA' } }),
    (error: unknown) => error instanceof EngineError && error.code === 'bad_request',
  );
});
