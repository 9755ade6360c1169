// onnxruntime's optimized graphs kept in the engine cache (src/engine/session-cache.ts): written on the
// first open, opened from there next time with the same outputs, rebuilt when broken or stale.
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readdir, readFile, rm, stat, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import ort from 'onnxruntime-node';
import { packageCacheDir } from '../src/engine/cache-dir.ts';
import { ModelPackage } from '../src/engine/model-package.ts';
import { GraphSession, type FloatTensor } from '../src/engine/onnx-session.ts';
import { cacheKeyParts, ENTRY_DATA, ENTRY_MODEL, entryDir, openThroughCache } from '../src/engine/session-cache.ts';
import { createSession, ortSessionOptions } from '../src/engine/onnx-session.ts';
import { EngineError } from '../src/engine/api.ts';
import { copyOfTiny } from './helpers/fixture.ts';

async function runUnet(session: GraphSession): Promise<FloatTensor> {
  const sample = { data: Float32Array.from({ length: 2 * 4 * 8 * 8 }, (_, i) => Math.sin(i)), dims: [2, 4, 8, 8] };
  const text = { data: Float32Array.from({ length: 2 * 77 * 32 }, (_, i) => Math.cos(i / 7)), dims: [2, 77, 32] };
  const out = await session.run({
    sample: session.tensor('sample', sample),
    timestep: session.timestepTensor('timestep', 500, 2),
    encoder_hidden_states: session.tensor('encoder_hidden_states', text),
  });
  return out.out_sample;
}

describe('optimized-graph cache', () => {
  let dir: string;
  let cache: string;
  let unet: string;
  let reference: FloatTensor;
  const options = () => ({ executionProvider: 'cpu' as const, optimizedCacheDir: cache, optimizedCacheMinBytes: 0 });
  const entries = async () => (await readdir(cache).catch(() => [] as string[])).sort();

  before(async () => {
    dir = await copyOfTiny();
    cache = await mkdtemp(path.join(os.tmpdir(), 'optimized-'));
    unet = path.join(dir, 'experts/alpha/unet/model.onnx');
    const plain = await GraphSession.open(unet, { executionProvider: 'cpu' });
    reference = await runUnet(plain);
    assert.equal(plain.cacheOutcome, undefined);
    await plain.release();
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
    await rm(cache, { recursive: true, force: true });
  });

  test('the first open writes an entry, the next opens it; outputs equal the graph\'s own', async () => {
    const first = await GraphSession.open(unet, options());
    assert.equal(first.cacheOutcome, 'written');
    assert.deepEqual(await runUnet(first), reference);
    await first.release();
    const [entry, ...rest] = await entries();
    assert.deepEqual(rest, []);
    const files = (await readdir(path.join(cache, entry))).sort();
    assert.deepEqual(files, ['entry.json', ENTRY_MODEL, ENTRY_DATA].sort());
    const meta = JSON.parse(await readFile(path.join(cache, entry, 'entry.json'), 'utf8'));
    assert.equal(meta.key.graph, unet);
    assert.equal(meta.key.optimizationLevel, 'all');

    const second = await GraphSession.open(unet, options());
    assert.equal(second.cacheOutcome, 'hit');
    assert.deepEqual(await runUnet(second), reference);
    await second.release();
  });

  test('a damaged entry is deleted and rebuilt; a truncated one is not even opened', async () => {
    const [entry] = await entries();
    await writeFile(path.join(cache, entry, ENTRY_MODEL), 'garbage that is no ONNX model');
    // the recorded sizes no longer match: the entry is invalid and written again
    const rewritten = await GraphSession.open(unet, options());
    assert.equal(rewritten.cacheOutcome, 'written');
    assert.deepEqual(await runUnet(rewritten), reference);
    await rewritten.release();

    // same size, other bytes: onnxruntime cannot open it, so it is rebuilt
    const model = path.join(cache, entry, ENTRY_MODEL);
    const size = (await stat(model)).size;
    await writeFile(model, Buffer.alloc(size, 7));
    const rebuilt = await GraphSession.open(unet, options());
    assert.equal(rebuilt.cacheOutcome, 'rebuilt');
    assert.deepEqual(await runUnet(rebuilt), reference);
    await rebuilt.release();
    const again = await GraphSession.open(unet, options());
    assert.equal(again.cacheOutcome, 'hit');
    await again.release();
  });

  test('a changed graph gets a new entry and its old one goes', async () => {
    const before = await entries();
    await copyFile(path.join(dir, 'experts/beta/unet/model.onnx'), unet);
    await utimes(unet, new Date(), new Date(Date.now() + 5000));
    const changed = await GraphSession.open(unet, options());
    assert.equal(changed.cacheOutcome, 'written');
    assert.notDeepEqual(await runUnet(changed), reference);
    await changed.release();
    const after = await entries();
    assert.equal(after.length, 1);
    assert.notEqual(after[0], before[0]);
  });

  test('without a child process the engine writes the entry itself; a broken graph is a bad_package error either way', async () => {
    const own = await mkdtemp(path.join(os.tmpdir(), 'optimized-own-'));
    try {
      const cpu = { executionProvider: 'cpu' as const };
      const create = (file: string, o: Parameters<typeof createSession>[1]) => createSession(file, o, cpu, file);
      const opened = await openThroughCache(unet, ortSessionOptions(cpu), own, create, { inChild: false });
      assert.equal(opened.outcome, 'written');
      await opened.session.release();
      assert.equal((await readdir(own)).length, 1);
      const hit = await GraphSession.open(unet, { ...cpu, optimizedCacheDir: own, optimizedCacheMinBytes: 0 });
      assert.equal(hit.cacheOutcome, 'hit');
      await hit.release();

      const broken = path.join(dir, 'broken.onnx');
      await writeFile(broken, 'this is not an ONNX model at all');
      await assert.rejects(GraphSession.open(broken, { ...cpu, optimizedCacheDir: own, optimizedCacheMinBytes: 0 }), (err: Error) => {
        assert.ok(err instanceof EngineError && err.code === 'bad_package', String(err));
        assert.match(err.message, /broken\.onnx: it is corrupt or not an ONNX model/);
        return true;
      });
      assert.ok((await readdir(own)).every((name) => !name.includes('.tmp-')), 'no temporary folder is left behind');
    } finally {
      await rm(own, { recursive: true, force: true });
    }
  });

  test('the key covers external-data files beside the graph, not other graphs or configs', async () => {
    const graph = path.join(dir, 'experts/beta/unet/model.onnx');
    const key = async () => entryDir(cache, await cacheKeyParts(graph, 'cpu', 'all'));
    const first = await key();
    await writeFile(path.join(dir, 'experts/beta/unet/config.json'), '{}');
    await writeFile(path.join(dir, 'experts/beta/unet/model.fp16.onnx'), 'another graph');
    assert.equal(await key(), first);
    await writeFile(path.join(dir, 'experts/beta/unet/weights.onnx_data'), 'shared weights');
    const second = await key();
    assert.notEqual(second, first);
    await writeFile(path.join(dir, 'experts/beta/unet/weights.onnx_data'), 'shared weights, changed');
    assert.notEqual(await key(), second);
    assert.equal(path.dirname(second), cache);
    await rm(path.join(dir, 'experts/beta/unet/weights.onnx_data'));
  });

  test('a graph whose optimized form onnxruntime cannot reopen is recorded as uncacheable and opened directly', async () => {
    // The tiny fixture's text encoder (an older export) has an If node; the optimized graph ORT saves
    // from it repeats an initializer's name in the If branch, and ORT refuses to load that file.
    const textEncoder = path.join(dir, 'text_encoder/model.onnx');
    const ids = BigInt64Array.from({ length: 77 }, (_, i) => BigInt((i * 37) % 599)); // the tiny vocabulary: 600
    const encode = async (s: GraphSession) => (await s.session.run({ input_ids: new ort.Tensor('int64', ids, [1, 77]) })).last_hidden_state.data as Float32Array;
    const plain = await GraphSession.open(textEncoder, { executionProvider: 'cpu' });
    const want = await encode(plain);
    await plain.release();
    const before = new Set(await entries());
    const first = await GraphSession.open(textEncoder, options());
    assert.equal(first.cacheOutcome, 'uncacheable');
    assert.deepEqual(await encode(first), want);
    await first.release();
    const added = (await entries()).filter((e) => !before.has(e));
    assert.equal(added.length, 1);
    assert.deepEqual(await readdir(path.join(cache, added[0])), ['entry.json']); // no 500 MB that cannot be used
    const meta = JSON.parse(await readFile(path.join(cache, added[0], 'entry.json'), 'utf8'));
    assert.match(meta.uncacheable, /initializer name is not unique|invalid model/i);
    let optimized = 0;
    const counting = async (file: string, opts: Parameters<typeof createSession>[1]) => {
      if (opts.optimizedModelFilePath) optimized++;
      return createSession(file, opts, { executionProvider: 'cpu' }, file);
    };
    const again = await openThroughCache(textEncoder, ortSessionOptions({ executionProvider: 'cpu' }), cache, counting);
    assert.equal(again.outcome, 'uncacheable');
    assert.equal(optimized, 0); // no second attempt to cache it
    await again.session.release();
  });

  test('a merged U-Net is optimized once, into its merged folder (pruning the merge removes it)', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 'engine-cache-'));
    const saved = process.env.ENGINE_CACHE_DIR;
    process.env.ENGINE_CACHE_DIR = root;
    try {
      const open = async () => {
        const pkg = await ModelPackage.load(dir, { optimizedCacheMinBytes: 0 });
        const session = await pkg.mergedUnet([pkg.expert('alpha'), pkg.expert('beta')], [0.5, 0.5]);
        const result = { outcome: session.cacheOutcome, file: session.file, out: await runUnet(session) };
        await pkg.dispose();
        return result;
      };
      const first = await open();
      assert.equal(first.outcome, 'written');
      const merged = path.dirname(first.file);
      assert.ok(merged.startsWith(packageCacheDir(dir, 'merged')), merged);
      assert.equal((await readdir(path.join(merged, 'optimized'))).length, 1);
      const second = await open();
      assert.equal(second.outcome, 'hit');
      assert.deepEqual(second.out, first.out);
    } finally {
      if (saved === undefined) delete process.env.ENGINE_CACHE_DIR;
      else process.env.ENGINE_CACHE_DIR = saved;
      await rm(root, { recursive: true, force: true });
    }
  });

  test('ModelPackage keeps its graphs in the package cache folder on the CPU, only past the size threshold', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 'engine-cache-'));
    const saved = process.env.ENGINE_CACHE_DIR;
    process.env.ENGINE_CACHE_DIR = root;
    try {
      const pkg = await ModelPackage.load(dir, { optimizedCacheMinBytes: 0 });
      const session = await pkg.session(pkg.manifest.vaeDecoder);
      assert.equal(session.cacheOutcome, 'written');
      assert.equal((await readdir(packageCacheDir(dir, 'optimized'))).length, 1);
      await pkg.dispose();
      const small = await ModelPackage.load(dir); // the tiny graphs are under the default 32 MiB
      assert.equal((await small.session(small.manifest.textEncoder)).cacheOutcome, undefined);
      await small.dispose();
      const off = await ModelPackage.load(dir, { optimizedCacheMinBytes: 0, optimizedCache: false });
      assert.equal((await off.session(off.manifest.textEncoder)).cacheOutcome, undefined);
      await off.dispose();
    } finally {
      if (saved === undefined) delete process.env.ENGINE_CACHE_DIR;
      else process.env.ENGINE_CACHE_DIR = saved;
      await rm(root, { recursive: true, force: true });
    }
  });
});
