// Float16-compute variants written by `python3 -m trainer.export.fp16_compute` (contract C1), seen from
// the engine: the manifest names them, each has its float32 graph's inputs and outputs (so the engine
// feeds the same tensors), the CPU keeps drawing with the float32 graphs, and a package whose graphs
// all run in float16 draws nearly the fixture's reference pictures. onnxruntime's CPU provider runs
// float16 graphs by casting to float32 around the operators it has no float16 kernel for, so this is
// a check of the graphs and of the engine's handling of them, not of the GPU's arithmetic.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import ort from 'onnxruntime-node';
import type { GenerateRequest } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { copyOfTiny, maxAbsDiff, REPO_ROOT, TINY } from './helpers/fixture.ts';

const cacheDir = path.join(os.tmpdir(), `fp16-compute-cache-${process.pid}`);
process.env.ENGINE_CACHE_DIR = cacheDir;
const python = process.env.PYTHON || '/usr/bin/python3';

interface ReferenceCase {
  name: string;
  request: GenerateRequest;
  images: { file: string }[];
}
const cases = (JSON.parse(await readFile(path.join(TINY, 'reference', 'cases.json'), 'utf8')) as { cases: ReferenceCase[] }).cases;

const GRAPHS = [
  'text_encoder/model',
  'vae_decoder/model',
  'vae_encoder/model',
  'experts/alpha/unet/model',
  'experts/odd/unet/model',
  'ensembles/duo/model',
  'ensembles/fuse/model',
];

async function signature(file: string) {
  const session = await ort.InferenceSession.create(file);
  try {
    const io = (list: readonly ort.InferenceSession.ValueMetadata[]) =>
      list.map((m) => (m.isTensor ? `${m.name}:${m.type}[${m.shape.length}]` : m.name));
    return { inputs: io(session.inputMetadata), outputs: io(session.outputMetadata) };
  } finally {
    await session.release();
  }
}

describe('float16-compute variants (trainer.export.fp16_compute)', () => {
  let dir: string;

  before(async () => {
    dir = await copyOfTiny();
    const run = spawnSync(python, ['-m', 'trainer.export.fp16_compute', '--package', dir], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      env: { ...process.env, PYTHONPATH: REPO_ROOT, OMP_WAIT_POLICY: 'PASSIVE' },
    });
    assert.equal(run.status, 0, `fp16_compute failed:\n${run.stderr}`);
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
    await rm(cacheDir, { recursive: true, force: true });
  });

  test('the manifest names both variants of every graph', async () => {
    const m = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
    assert.deepEqual(m.text_encoder, { fp32: 'text_encoder/model.onnx', fp16: 'text_encoder/model.fp16.onnx' });
    for (const e of m.experts) assert.deepEqual(e.unet, { fp32: `experts/${e.id}/unet/model.onnx`, fp16: `experts/${e.id}/unet/model.fp16.onnx` });
    for (const e of m.ensembles) assert.equal(e.graph.fp16, e.graph.fp32.replace(/\.onnx$/, '.fp16.onnx'));
  });

  for (const graph of GRAPHS) {
    test(`${graph}: the fp16 graph has the fp32 graph's inputs and outputs`, async () => {
      const fp32 = await signature(path.join(dir, `${graph}.onnx`));
      const fp16 = await signature(path.join(dir, `${graph}.fp16.onnx`));
      assert.deepEqual(fp16, fp32);
      assert.ok(!JSON.stringify(fp16).includes('float16'));
    });
  }

  test('the CPU draws with the fp32 graphs: the reference pictures exactly as before', async () => {
    const engine = await Engine.load(dir);
    try {
      for (const name of ['single_ddim', 'afa_ddim']) {
        const c = cases.find((k) => k.name === name)!;
        const result = await engine.generate(c.request);
        const expected = await readFile(path.join(TINY, 'reference', c.images[0].file));
        assert.ok(maxAbsDiff(result.images[0].image.data, expected) <= 2, name);
      }
    } finally {
      await engine.dispose();
    }
  });

  test('with every graph in float16 the engine draws the reference pictures within a few levels', async (t) => {
    const warnings: string[] = [];
    const engine = await Engine.load(dir, { precision: 'fp16', warn: (w: string) => warnings.push(w) });
    try {
      for (const name of ['single_ddim', 'afa_ddim', 'odd_int64_timestep']) {
        const c = cases.find((k) => k.name === name)!;
        const result = await engine.generate(c.request);
        const expected = await readFile(path.join(TINY, 'reference', c.images[0].file));
        const got = result.images[0].image.data;
        let sum = 0;
        for (let i = 0; i < got.length; i++) sum += Math.abs(got[i] - expected[i]);
        const mean = sum / got.length;
        const max = maxAbsDiff(got, expected);
        t.diagnostic(`${name}: mean ${mean.toFixed(3)}, max ${max} levels of 255`);
        assert.ok(mean <= 1 && max <= 10, `${name}: fp16 picture differs by mean ${mean.toFixed(2)}, max ${max} levels of 255`);
      }
    } finally {
      await engine.dispose();
    }
  });
});
