// Engine behaviour on the tiny fixture package: modes, batches, maps, cancellation and bad input.
import assert from 'node:assert/strict';
import { mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EngineError, type GenerateRequest } from '../src/engine/api.ts';
import type { EnsembleEntry, ExpertEntry } from '../src/engine/manifest.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { ContributionAccumulator } from '../src/engine/pipeline/contributions.ts';
import { ClassifierFreeGuidance } from '../src/engine/pipeline/guidance.ts';
import { SeededNoise, type LatentShape } from '../src/engine/pipeline/latents.ts';
import { TorchGenerator } from '../src/engine/random.ts';
import { copyOfTiny, maxAbsDiff, TINY } from './helpers/fixture.ts';

const base: GenerateRequest = { prompt: 'a red circle on the left', mode: 'single', experts: ['alpha'], seed: 11, steps: 4 };

async function rejectsWith(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof EngineError, `expected an EngineError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    return true;
  });
}

describe('engine on the tiny package', () => {
  let engine: Engine;
  before(async () => {
    engine = await Engine.load(TINY);
  });
  after(async () => engine.dispose());

  test('info lists experts, ensembles and defaults', () => {
    const info = engine.info();
    assert.deepEqual(info.experts.map((e) => e.id), ['alpha', 'beta', 'odd']);
    assert.deepEqual(info.ensembles.map((e) => [e.id, e.method, e.experts, e.subsets]), [
      ['duo', 'afa', ['alpha', 'beta'], true],
      ['fuse', 'fuse', ['alpha', 'beta'], true],
    ]);
    assert.equal(info.defaults.width, 32);
  });

  test('same seed, same image; another seed, another image', async () => {
    const a = await engine.generate(base);
    const b = await engine.generate(base);
    const c = await engine.generate({ ...base, seed: 12 });
    assert.deepEqual(a.images[0].image.data, b.images[0].image.data);
    assert.ok(maxAbsDiff(a.images[0].image.data, c.images[0].image.data) > 10);
    assert.equal(a.params.model, 'tiny@1.0.0');
    assert.equal(a.params.steps, 4);
  });

  test('image i of a batch is the image of seed + i', async () => {
    const batch = await engine.generate({ ...base, count: 2 });
    const second = await engine.generate({ ...base, seed: base.seed + 1 });
    assert.deepEqual(batch.images.map((i) => i.seed), [11, 12]);
    assert.ok(maxAbsDiff(batch.images[1].image.data, second.images[0].image.data) <= 1);
  });

  test('average with weights 1,0 is the first expert alone; merge with 1,0 too', async () => {
    const alone = await engine.generate(base);
    const avg = await engine.generate({ ...base, mode: 'average', experts: ['alpha', 'beta'], weights: [1, 0] });
    const merged = await engine.generate({ ...base, mode: 'merge', experts: ['alpha', 'beta'], weights: [1, 0] });
    assert.ok(maxAbsDiff(alone.images[0].image.data, avg.images[0].image.data) <= 1);
    assert.ok(maxAbsDiff(alone.images[0].image.data, merged.images[0].image.data) <= 1);
  });

  test('an even merge differs from both experts and from the average', async () => {
    const req = { ...base, experts: ['alpha', 'beta'] };
    const merged = await engine.generate({ ...req, mode: 'merge' });
    const avg = await engine.generate({ ...req, mode: 'average' });
    const beta = await engine.generate({ ...base, experts: ['beta'] });
    const alpha = await engine.generate(base);
    for (const other of [avg, alpha, beta]) assert.ok(maxAbsDiff(merged.images[0].image.data, other.images[0].image.data) > 5);
  });

  test('afa with one expert present is that expert alone (masking removes the other)', async () => {
    const afa = await engine.generate({ ...base, mode: 'afa', ensemble: 'duo', experts: ['alpha'], contributions: true });
    const alone = await engine.generate(base);
    assert.ok(maxAbsDiff(afa.images[0].image.data, alone.images[0].image.data) <= 1);
    assert.deepEqual(afa.images[0].contributions?.shares, [1]);
  });

  test('afa contribution maps sum to one per pixel and shares sum to one', async () => {
    const r = await engine.generate({ ...base, mode: 'afa', ensemble: 'duo', experts: undefined, contributions: true });
    const maps = r.images[0].contributions!;
    assert.deepEqual(maps.experts, ['alpha', 'beta']);
    assert.equal(maps.width, 8);
    for (let p = 0; p < maps.width * maps.height; p++) {
      assert.ok(Math.abs(maps.weights[0][p] + maps.weights[1][p] - 1) < 1e-4);
    }
    assert.ok(Math.abs(maps.shares[0] + maps.shares[1] - 1) < 1e-6);
    assert.ok(Math.abs(maps.shares[0] - 0.5) > 1e-3, 'the fixture aggregator is not uniform');
  });

  test('progress is reported every step and previews come when asked', async () => {
    const events: { step: number; steps: number; preview: boolean }[] = [];
    await engine.generate({ ...base, steps: 5, preview: true }, { onProgress: (e) => events.push({ step: e.step, steps: e.steps, preview: !!e.preview }) });
    assert.deepEqual(events.map((e) => e.step), [1, 2, 3, 4, 5]);
    assert.ok(events.some((e) => e.preview));
  });

  test('an AbortSignal cancels between steps', async () => {
    const controller = new AbortController();
    let seen = 0;
    await rejectsWith(
      engine.generate({ ...base, steps: 20 }, { signal: controller.signal, onProgress: () => ++seen === 2 && controller.abort() }),
      'cancelled',
      /cancelled/,
    );
    assert.equal(seen, 2);
  });

  test('schedulers and sizes', async () => {
    for (const scheduler of ['ddim', 'euler', 'euler_a', 'dpmpp_2m'] as const) {
      const r = await engine.generate({ ...base, scheduler, width: 48, height: 16 });
      assert.equal(r.images[0].image.width, 48);
      assert.equal(r.images[0].image.height, 16);
      assert.equal(r.images[0].image.data.length, 48 * 16 * 3);
    }
    const karras = await engine.generate({ ...base, scheduler: 'euler', karras: true });
    assert.equal(karras.params.karras, true);
  });

  test('a long prompt is truncated with a warning naming the dropped words', async () => {
    const words = Array.from({ length: 90 }, (_, i) => (i < 80 ? 'red' : `word${i}`));
    const r = await engine.generate({ ...base, prompt: words.join(' ') });
    assert.equal(r.warnings.length, 1);
    assert.match(r.warnings[0], /word89/);
    assert.ok(r.params.truncatedWords.includes('word85'));
  });

  test('bad requests get clear errors', async () => {
    await rejectsWith(engine.generate({ ...base, experts: ['gamma'] }), 'unknown_model', /Unknown expert "gamma".*alpha, beta, odd/);
    await rejectsWith(engine.generate({ ...base, mode: 'afa', ensemble: 'trio', experts: undefined }), 'unknown_model', /Available ensembles: duo/);
    await rejectsWith(engine.generate({ ...base, steps: 0 }), 'bad_request', /Steps must be between 1 and 50/);
    await rejectsWith(engine.generate({ ...base, steps: 2.5 }), 'bad_request', /Steps must be a whole number/);
    await rejectsWith(engine.generate({ ...base, seed: -1 }), 'bad_request', /Seed/);
    await rejectsWith(engine.generate({ ...base, seed: Number.NaN }), 'bad_request', /Seed/);
    await rejectsWith(engine.generate({ ...base, guidance: 99 }), 'bad_request', /Guidance must be between/);
    await rejectsWith(engine.generate({ ...base, width: 30 }), 'bad_request', /multiple of 4/);
    await rejectsWith(engine.generate({ ...base, width: 512 }), 'bad_request', /Width must be between 16 and 64/);
    await rejectsWith(engine.generate({ ...base, prompt: '   ' }), 'bad_request', /empty/);
    await rejectsWith(engine.generate({ ...base, experts: ['alpha', 'beta'] }), 'bad_request', /exactly one expert/);
    await rejectsWith(engine.generate({ ...base, mode: 'average' }), 'bad_request', /two or more/);
    await rejectsWith(engine.generate({ ...base, mode: 'afa', ensemble: 'duo', experts: ['odd'] }), 'bad_request', /not part of ensemble "duo"/);
    await rejectsWith(engine.generate({ ...base, scheduler: 'ddim', karras: true }), 'bad_request', /Karras/i);
  });

  test('merging different architectures is refused with a clear message', async () => {
    await rejectsWith(
      engine.generate({ ...base, mode: 'merge', experts: ['alpha', 'odd'] }),
      'bad_request',
      /different structures.*average/,
    );
  });

  test('the odd expert (int64 timestep) works alone and in an average', async () => {
    const r = await engine.generate({ ...base, mode: 'average', experts: ['alpha', 'odd'] });
    assert.equal(r.images.length, 1);
  });
});

describe('broken packages', () => {
  test('a missing graph is named', async () => {
    const dir = await copyOfTiny();
    await rm(path.join(dir, 'experts/beta/unet/model.onnx'));
    await rejectsWith(Engine.load(dir), 'bad_package', /expert "beta" U-Net: .*experts\/beta\/unet\/model\.onnx/);
  });

  test('a corrupt graph is named when it is used', async () => {
    const dir = await copyOfTiny();
    await writeFile(path.join(dir, 'experts/beta/unet/model.onnx'), 'not an onnx model');
    const engine = await Engine.load(dir);
    await rejectsWith(engine.generate({ ...base, experts: ['beta'] }), 'bad_package', /Cannot load graph .*beta\/unet\/model\.onnx.*corrupt/);
    await assert.doesNotReject(engine.generate(base));
    await engine.dispose();
  });

  test('a graph whose inputs do not match the manifest is refused', async () => {
    const dir = await copyOfTiny();
    const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
    manifest.experts[1].unet = 'vae_decoder/model.onnx';
    await writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    const engine = await Engine.load(dir);
    await rejectsWith(engine.generate({ ...base, experts: ['beta'] }), 'bad_package', /does not match the manifest: it lacks input "sample"/);
    await engine.dispose();
  });

  test('an invalid manifest lists its problems', async () => {
    const dir = await copyOfTiny();
    const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
    delete manifest.latent;
    manifest.ensembles[0].experts = ['alpha', 'nobody'];
    await writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    await rejectsWith(Engine.load(dir), 'bad_package', /latent/);
    await writeFile(path.join(dir, 'manifest.json'), '{ not json');
    await rejectsWith(Engine.load(dir), 'bad_package', /not valid JSON/);
  });

  test('an Optimum-style SD folder serves as an expert with its own text encoder', async () => {
    const dir = await copyOfTiny();
    const optimum = path.join(dir, 'optimum-sd');
    for (const sub of ['unet', 'text_encoder']) await mkdir(path.join(optimum, sub), { recursive: true });
    await symlink(path.join(TINY, 'experts/beta/unet/model.onnx'), path.join(optimum, 'unet/model.onnx'));
    await symlink(path.join(TINY, 'text_encoder/model.onnx'), path.join(optimum, 'text_encoder/model.onnx'));
    await symlink(path.join(TINY, 'tokenizer'), path.join(optimum, 'tokenizer'));
    const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
    manifest.experts.push({ id: 'sdfolder', description: 'Optimum export', path: 'optimum-sd' });
    await writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    const engine = await Engine.load(dir);
    const fromFolder = await engine.generate({ ...base, experts: ['sdfolder'] });
    const beta = await engine.generate({ ...base, experts: ['beta'] });
    assert.ok(maxAbsDiff(fromFolder.images[0].image.data, beta.images[0].image.data) <= 1);
    const avg = await engine.generate({ ...base, mode: 'average', experts: ['alpha', 'sdfolder'] });
    assert.equal(avg.images.length, 1);
    await engine.dispose();
  });
});

describe('pipeline steps', () => {
  const shape: LatentShape = { batch: 2, channels: 1, height: 1, width: 2, perImage: 2 };

  test('seeded noise: image i draws from seed + i, first x_T, then the ancestral noise', () => {
    const noise = new SeededNoise(40, shape);
    const first = noise.initialLatents(2);
    const second = noise.next();
    const [g40, g41] = [new TorchGenerator(40), new TorchGenerator(41)];
    const expected = [...g40.randn(2), ...g41.randn(2)].map((v) => Math.fround(v * 2));
    assert.deepEqual(Array.from(first), expected);
    assert.deepEqual(Array.from(second), [...g40.randn(2), ...g41.randn(2)]);
  });

  test('classifier-free guidance: [uncond; cond] rows, and no uncond half at a scale of 1', () => {
    const cfg = new ClassifierFreeGuidance(3, 1);
    assert.deepEqual([cfg.rows, cfg.firstPromptRow], [2, 1]);
    assert.deepEqual(Array.from(cfg.modelInput(Float32Array.from([5]))), [5, 5]);
    assert.deepEqual(Array.from(cfg.combine(Float32Array.from([1, 2]))), [4]);
    const off = new ClassifierFreeGuidance(1, 2);
    assert.deepEqual([off.rows, off.firstPromptRow], [2, 0]);
  });

  test('the contribution accumulator averages the prompt rows over steps, picking the experts of an ensemble', () => {
    const expert = (id: string) => ({ id }) as ExpertEntry;
    const ensemble = { experts: ['a', 'b', 'c'] } as EnsembleEntry;
    const acc = ContributionAccumulator.for([expert('c'), expert('a')], ensemble, shape);
    // [rows = 4 (uncond × 2, cond × 2), 3 experts, 1 × 2 pixels]; the uncond rows must not count.
    const step = (cond: number[][]) => Float32Array.from([...Array(12).fill(9), ...cond.flat()]);
    acc.add(step([[0.2, 0.4], [0, 0], [0.8, 0.6], [0.5, 0.5], [0, 0], [0.5, 0.5]]), 4, 2);
    acc.add(step([[0.4, 0.2], [0, 0], [0.6, 0.8], [1, 1], [0, 0], [0, 0]]), 4, 2);
    const first = acc.mean(0);
    assert.deepEqual(first.experts, ['c', 'a']);
    assert.deepEqual(Array.from(first.weights[0], (v) => +v.toFixed(6)), [0.7, 0.7]);
    assert.deepEqual(Array.from(first.weights[1], (v) => +v.toFixed(6)), [0.3, 0.3]);
    assert.deepEqual(first.shares.map((v) => +v.toFixed(6)), [0.7, 0.3]);
    assert.deepEqual(acc.mean(1).shares.map((v) => +v.toFixed(6)), [0.25, 0.75]);
  });
});
