// Merged graphs in the engine's cache (src/engine/merge/cache.ts): reused while the experts are
// unchanged, rebuilt when one changes, never left half-written, pruned to the most recently used;
// and the engine's merge mode on a package whose experts keep their weights as external data.
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, stat, truncate, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { EngineError, type GenerateRequest } from '../src/engine/api.ts';
import { packageCacheDir } from '../src/engine/cache-dir.ts';
import { mergedGraph, MERGED_KEEP, pruneMerged } from '../src/engine/merge/cache.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { copyOfTiny } from './helpers/fixture.ts';
import { EXTERNAL, input, runUnet } from './helpers/merge.ts';

const scratch = await mkdtemp(path.join(os.tmpdir(), 'merge-cache-'));
const cacheRoot = path.join(scratch, 'cache');
process.env.ENGINE_CACHE_DIR = cacheRoot;
const env = { ENGINE_CACHE_DIR: cacheRoot };
after(() => rm(scratch, { recursive: true, force: true }));

async function fingerprint(file: string): Promise<string> {
  const s = await stat(file);
  return `${s.ino}:${s.mtimeMs}:${s.size}`;
}

describe('the merged-graph cache', () => {
  test('a second merge of the same experts and weights reuses the graph; other weights get another', async () => {
    const pkg = path.join(scratch, 'pkg-a');
    const inputs = [input('alphaSingle'), input('betaPerTensor')];
    const first = await mergedGraph(pkg, inputs, [1, 1], env);
    assert.ok(first.startsWith(packageCacheDir(pkg, 'merged', env) + path.sep), first);
    const data = path.join(path.dirname(first), 'model.onnx_data');
    const before = [await fingerprint(first), await fingerprint(data)];
    const again = await mergedGraph(pkg, inputs, [0.5, 0.5000000001], env);
    assert.equal(again, first);
    assert.deepEqual([await fingerprint(first), await fingerprint(data)], before, 'not rewritten');
    const other = await mergedGraph(pkg, inputs, [1, 2], env);
    assert.notEqual(path.dirname(other), path.dirname(first));
    const about = JSON.parse(await readFile(path.join(path.dirname(other), 'merge.json'), 'utf8'));
    assert.deepEqual(about.experts.map((e: { weight: number }) => e.weight), [0.333333, 0.666667]);
  });

  test('a changed expert file (graph or external data) gives a new merge', async () => {
    const pkg = path.join(scratch, 'pkg-b');
    const dir = path.join(scratch, 'alpha-copy');
    await cp(path.join(EXTERNAL, 'alpha-single'), dir, { recursive: true });
    const inputs = [{ label: 'expert "alpha"', file: path.join(dir, 'model.onnx') }, input('beta')];
    const first = await mergedGraph(pkg, inputs, [1, 1], env);
    const out1 = await runUnet(first);
    // same bytes, new modification time of the external data file: a new key
    const data = path.join(dir, 'model.onnx_data');
    await utimes(data, new Date(2001, 1, 1), new Date(2001, 1, 1));
    const second = await mergedGraph(pkg, inputs, [1, 1], env);
    assert.notEqual(second, first);
    // new weights in the expert: the merge follows them
    const bytes = await readFile(data);
    for (let i = 0; i < bytes.length; i += 4) bytes.writeFloatLE(bytes.readFloatLE(i) * 0.5, i);
    await writeFile(data, bytes);
    const third = await mergedGraph(pkg, inputs, [1, 1], env);
    assert.ok(![first, second].includes(third));
    const out3 = await runUnet(third);
    assert.notDeepEqual(out3, out1);
  });

  test('a failed merge leaves no folder behind, and a crashed one is not used', async () => {
    const pkg = path.join(scratch, 'pkg-c');
    const root = packageCacheDir(pkg, 'merged', env);
    const dir = path.join(scratch, 'beta-cut');
    await cp(path.join(EXTERNAL, 'beta-per-tensor'), dir, { recursive: true });
    const victim = path.join(dir, 'w010.bin');
    const size = (await stat(victim)).size;
    await truncate(victim, size - 4);
    await assert.rejects(
      mergedGraph(pkg, [input('alpha'), { label: 'expert "cut"', file: path.join(dir, 'model.onnx') }], [1, 1], env),
      (err: unknown) => err instanceof EngineError && /expert "cut".*w010\.bin.*truncated/.test(err.message),
    );
    assert.deepEqual(await readdir(root).catch(() => []), []);
    // a crash's left-over: a temporary folder with a half graph is ignored
    await mkdir(root, { recursive: true });
    const good = [input('alpha'), input('beta')];
    const done = await mergedGraph(pkg, good, [1, 1], env);
    const key = path.basename(path.dirname(done));
    await rm(path.dirname(done), { recursive: true });
    await mkdir(path.join(root, `${key}.tmp-1-dead`));
    await writeFile(path.join(root, `${key}.tmp-1-dead`, 'model.onnx'), 'half');
    const redone = await mergedGraph(pkg, good, [1, 1], env);
    assert.equal(redone, done);
    assert.ok((await runUnet(redone)).length > 0);
  });

  test('pruning keeps the most recently used merges and drops stale temporary folders', async () => {
    const root = path.join(scratch, 'prune');
    const names = ['a', 'b', 'c', 'd', 'e', 'f'];
    for (const [i, name] of names.entries()) {
      await mkdir(path.join(root, name), { recursive: true });
      const t = new Date(2020, 0, 1 + i);
      await utimes(path.join(root, name), t, t);
    }
    await mkdir(path.join(root, 'x.tmp-1-old'));
    await utimes(path.join(root, 'x.tmp-1-old'), new Date(2020, 0, 1), new Date(2020, 0, 1));
    await mkdir(path.join(root, 'y.tmp-2-now'));
    await pruneMerged(root, path.join(root, 'a'));
    const kept = (await readdir(root)).sort();
    assert.deepEqual(kept, ['a', ...names.slice(-(MERGED_KEEP - 1)), 'y.tmp-2-now'].sort());
  });
});

describe('merge mode on a package whose experts store their weights as external data', () => {
  test('gives the image of the merge of the inline experts', async () => {
    const dir = await copyOfTiny();
    for (const [expert, layout] of [
      ['alpha', 'alpha-single'],
      ['beta', 'beta-per-tensor'],
    ]) {
      await rm(path.join(dir, 'experts', expert, 'unet'), { recursive: true });
      await cp(path.join(EXTERNAL, layout), path.join(dir, 'experts', expert, 'unet'), { recursive: true });
    }
    const request: GenerateRequest = { prompt: 'a red circle', mode: 'merge', experts: ['alpha', 'beta'], weights: [2, 1], seed: 3, steps: 3 };
    const external = await Engine.load(dir);
    const inline = await Engine.load(await copyOfTiny());
    try {
      const a = await external.generate(request);
      const b = await inline.generate(request);
      assert.deepEqual(a.images[0].image.data, b.images[0].image.data);
      const merged = await readdir(packageCacheDir(dir, 'merged'));
      assert.equal(merged.length, 1);
    } finally {
      await external.dispose();
      await inline.dispose();
    }
  });
});
