// Graph precision variants (docs/model-package.md, "Precision"): a graph reference is a path or
// {"fp32": path, "fp16": path}; the engine takes fp16 under CUDA and fp32 on the CPU where present,
// else the other one (with a warning on the CPU). The "fp16" variants here are copies of other fp32
// graphs of the tiny fixture under model.fp16.onnx names, so the result shows which file ran.
import assert from 'node:assert/strict';
import { copyFile, link, mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { loadManifest, pickVariant, precisionOf } from '../src/engine/manifest.ts';
import { ModelPackage } from '../src/engine/model-package.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { copyOfTiny } from './helpers/fixture.ts';

const cacheDir = path.join(os.tmpdir(), `precision-cache-${process.pid}`);
process.env.ENGINE_CACHE_DIR = cacheDir;

async function editManifest(dir: string, edit: (m: any) => void): Promise<void> {
  const file = path.join(dir, 'manifest.json');
  const m = JSON.parse(await readFile(file, 'utf8'));
  edit(m);
  await writeFile(file, JSON.stringify(m, null, 2));
}

const request = { prompt: 'a red circle', seed: 3, steps: 3, width: 32, height: 32 };

describe('graph precision variants', () => {
  let dir: string;
  const dirs: string[] = [];

  before(async () => {
    dir = await copyOfTiny();
    dirs.push(dir);
    // alpha's "fp16" variant is beta's U-Net: a run through it draws beta's picture.
    await copyFile(path.join(dir, 'experts/beta/unet/model.onnx'), path.join(dir, 'experts/alpha/unet/model.fp16.onnx'));
    await copyFile(path.join(dir, 'vae_decoder/model.onnx'), path.join(dir, 'vae_decoder/model.fp16.onnx'));
    await editManifest(dir, (m) => {
      m.experts[0].unet = { fp32: 'experts/alpha/unet/model.onnx', fp16: 'experts/alpha/unet/model.fp16.onnx' };
      m.vae_decoder = { fp16: 'vae_decoder/model.fp16.onnx', fp32: 'vae_decoder/model.onnx' };
      m.experts[1].unet = { fp32: 'experts/beta/unet/model.onnx' };
    });
  });

  after(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
    await rm(cacheDir, { recursive: true, force: true });
  });

  test('pickVariant: the asked precision when present, else the other', () => {
    assert.deepEqual(pickVariant('a.onnx', 'fp16'), { path: 'a.onnx', precision: 'fp32' });
    assert.deepEqual(pickVariant({ fp32: 'a.onnx', fp16: 'a.fp16.onnx' }, 'fp16'), { path: 'a.fp16.onnx', precision: 'fp16' });
    assert.deepEqual(pickVariant({ fp32: 'a.onnx', fp16: 'a.fp16.onnx' }, 'fp32'), { path: 'a.onnx', precision: 'fp32' });
    assert.deepEqual(pickVariant({ fp16: 'a.fp16.onnx' }, 'fp32'), { path: 'a.fp16.onnx', precision: 'fp16' });
  });

  test('the CPU resolution takes the fp32 files, the CUDA one (fp16) the fp16 files where they exist', async () => {
    const cpu = await loadManifest(dir);
    assert.equal(cpu.experts[0].unet, path.join(dir, 'experts/alpha/unet/model.onnx'));
    assert.equal(cpu.vaeDecoder, path.join(dir, 'vae_decoder/model.onnx'));
    assert.equal(precisionOf(cpu, cpu.experts[0].unet), 'fp32');
    assert.deepEqual(cpu.fallbacks, []);

    const gpu = await loadManifest(dir, { precision: 'fp16' });
    assert.equal(gpu.experts[0].unet, path.join(dir, 'experts/alpha/unet/model.fp16.onnx'));
    assert.equal(gpu.vaeDecoder, path.join(dir, 'vae_decoder/model.fp16.onnx'));
    assert.equal(precisionOf(gpu, gpu.experts[0].unet), 'fp16');
    // graphs without an fp16 variant stay fp32 under CUDA
    assert.equal(gpu.experts[1].unet, path.join(dir, 'experts/beta/unet/model.onnx'));
    assert.equal(gpu.textEncoder, path.join(dir, 'text_encoder/model.onnx'));
    const withFp16 = ['expert "alpha" U-Net', 'VAE decoder'];
    assert.deepEqual(
      gpu.fallbacks.map((g) => g.what).sort(),
      gpu.graphs.map((g) => g.what).filter((w) => !withFp16.includes(w)).sort(),
    );
    assert.ok(gpu.fallbacks.some((g) => g.what === 'expert "beta" U-Net') && gpu.fallbacks.every((g) => g.precision === 'fp32'));
    const alpha = gpu.graphs.find((g) => g.what === 'expert "alpha" U-Net')!;
    assert.deepEqual(alpha.variants, {
      fp32: path.join(dir, 'experts/alpha/unet/model.onnx'),
      fp16: path.join(dir, 'experts/alpha/unet/model.fp16.onnx'),
    });
  });

  test('the engine runs the variant it picked: alpha through its fp16 file draws what beta draws', async () => {
    const cpu = await Engine.load(dir, { executionProvider: 'cpu', optimizedCache: false });
    const fp16 = await Engine.load(dir, { executionProvider: 'cpu', precision: 'fp16', optimizedCache: false });
    try {
      const alpha32 = await cpu.generate({ ...request, mode: 'single', experts: ['alpha'] });
      const beta32 = await cpu.generate({ ...request, mode: 'single', experts: ['beta'] });
      const alpha16 = await fp16.generate({ ...request, mode: 'single', experts: ['alpha'] });
      assert.equal(cpu.info().precision, 'fp32');
      assert.equal(fp16.info().precision, 'mixed');
      assert.notDeepEqual(alpha32.images[0].image.data, beta32.images[0].image.data);
      assert.deepEqual(alpha16.images[0].image.data, beta32.images[0].image.data);
    } finally {
      await cpu.dispose();
      await fp16.dispose();
    }
  });

  test('a graph with only an fp16 variant loads on the CPU with a warning that names it', async () => {
    const only16 = await copyOfTiny();
    dirs.push(only16);
    await copyFile(path.join(only16, 'experts/beta/unet/model.onnx'), path.join(only16, 'experts/beta/unet/model.fp16.onnx'));
    await editManifest(only16, (m) => {
      m.experts[1].unet = { fp16: 'experts/beta/unet/model.fp16.onnx' };
    });
    const warnings: string[] = [];
    const pkg = await ModelPackage.load(only16, { warn: (w) => warnings.push(w), optimizedCache: false });
    assert.equal(pkg.expert('beta').unet, path.join(only16, 'experts/beta/unet/model.fp16.onnx'));
    assert.equal(warnings.length, 1);
    assert.match(warnings[0], /expert "beta" U-Net has only an fp16-compute graph/);
    const quiet: string[] = [];
    await ModelPackage.load(dir, { warn: (w) => quiet.push(w), optimizedCache: false });
    assert.deepEqual(quiet, []);
  });

  test('a missing variant file is named with its precision, even when another is used', async () => {
    const broken = await copyOfTiny();
    dirs.push(broken);
    await editManifest(broken, (m) => {
      m.vae_decoder = { fp32: 'vae_decoder/model.onnx', fp16: 'vae_decoder/model.fp16.onnx' };
    });
    await assert.rejects(loadManifest(broken), (err: Error) => {
      assert.ok(err instanceof EngineError && err.code === 'bad_package');
      assert.match(err.message, /VAE decoder \(fp16\): .*vae_decoder\/model\.fp16\.onnx/);
      return true;
    });
  });
});

describe('shared text encoders', () => {
  let dir: string;
  before(async () => {
    dir = await copyOfTiny();
    // An Optimum-style folder whose text encoder is the package's (a hard link), with its own tokenizer
    // (a copy), and an expert naming the package's encoder explicitly through a symbolic link.
    const optimum = path.join(dir, 'optimum');
    await mkdir(path.join(optimum, 'unet'), { recursive: true });
    await mkdir(path.join(optimum, 'text_encoder'), { recursive: true });
    await mkdir(path.join(optimum, 'tokenizer'), { recursive: true });
    await copyFile(path.join(dir, 'experts/beta/unet/model.onnx'), path.join(optimum, 'unet/model.onnx'));
    await link(path.join(dir, 'text_encoder/model.onnx'), path.join(optimum, 'text_encoder/model.onnx'));
    for (const f of ['vocab.json', 'merges.txt']) await copyFile(path.join(dir, 'tokenizer', f), path.join(optimum, 'tokenizer', f));
    await mkdir(path.join(dir, 'linked'));
    await symlink(path.join(dir, 'text_encoder/model.onnx'), path.join(dir, 'linked/model.onnx'));
    await editManifest(dir, (m) => {
      m.experts[0].text_encoder = 'linked/model.onnx';
      m.experts.push({ id: 'opt', path: 'optimum' });
    });
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('experts whose text encoder is the same file share one session and one encoding per prompt', async () => {
    const engine = await Engine.load(dir, { executionProvider: 'cpu', optimizedCache: false });
    try {
      const m = engine.pkg.manifest;
      assert.equal(m.experts[0].textEncoder, m.textEncoder);
      assert.equal(m.experts.find((e) => e.id === 'opt')!.textEncoder, m.textEncoder);
      assert.equal(await engine.pkg.session(m.experts[0].textEncoder!), await engine.pkg.session(m.textEncoder));
      await engine.generate({ ...request, mode: 'average', experts: ['alpha', 'beta', 'opt'] });
      const sessions = await engine.pkg.openSessions();
      const encoders = sessions.filter((s) => s.file.endsWith(path.join('text_encoder', 'model.onnx')) || s.file.endsWith(path.join('linked', 'model.onnx')));
      assert.equal(encoders.length, 1);
      // One run for alpha and beta (same file, same tokenizer folder) and one for opt (its own tokenizer folder).
      assert.equal(encoders[0].runs, 2);
    } finally {
      await engine.dispose();
    }
  });
});

describe('warm-up', () => {
  test('with warmUp each graph runs once when it opens, at the default size; without, not at all', async () => {
    const dir = await copyOfTiny();
    try {
      const warm = await ModelPackage.load(dir, { warmUp: true, optimizedCache: false });
      const cold = await ModelPackage.load(dir, { optimizedCache: false });
      assert.equal(cold.options.warmUp, false);
      for (const g of warm.manifest.graphs) {
        const s = await warm.session(g.path);
        assert.equal(s.runs, 1, g.what);
        assert.equal((await cold.session(g.path)).runs, 0, g.what);
      }
      await warm.dispose();
      await cold.dispose();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
