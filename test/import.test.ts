// `npm run import` end to end: miniature SD1.x checkpoints in the real layouts (LDM single files in fp16
// and fp32, an EMA-only one, one with a retrained CLIP, a diffusers folder; trainer/importer/miniature.py)
// become a package that the engine draws from at once in single, average and merge; bad inputs are
// refused with one line and leave nothing behind.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import type { GenerateRequest } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { REPO_ROOT } from './helpers/fixture.ts';

const exec = promisify(execFile);
const PYTHON = process.env.PYTHON || '/usr/bin/python3';
const work = await mkdtemp(path.join(os.tmpdir(), 'import-'));
process.env.ENGINE_CACHE_DIR = path.join(work, 'cache');
const CK = path.join(work, 'ck');
const INPUTS = ['alpha.safetensors', 'beta_fp32.safetensors', 'gamma-pruned-emaonly.safetensors', 'retrained.safetensors', 'delta'];

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** `npm run import -- …` as a person types it in `work` (npm sets INIT_CWD to that folder). */
async function importCli(args: string[]): Promise<Run> {
  try {
    const { stdout, stderr } = await exec(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src/cli/import.ts'), ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, INIT_CWD: work },
      maxBuffer: 16 << 20,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

async function leftovers(): Promise<string[]> {
  return (await readdir(work)).filter((f) => f.includes('.import-'));
}

function distinctBytes(data: Uint8Array): number {
  return new Set(data).size;
}

before(async () => {
  await exec(PYTHON, ['-m', 'trainer.importer.miniature', CK, '--errors'], {
    cwd: REPO_ROOT,
    env: { ...process.env, PYTHONPATH: REPO_ROOT, OMP_WAIT_POLICY: 'PASSIVE' },
  });
});
after(async () => rm(work, { recursive: true, force: true }));

describe('an imported package', () => {
  const pkg = path.join(work, 'mine');
  let engine: Engine;
  before(async () => {
    const r = await importCli(['--out', 'mine', '--size', '32', '--steps', '3', '--check', 'off', ...INPUTS.map((f) => path.join('ck', f))]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /VAE: from alpha\.safetensors/);
    engine = await Engine.load(pkg);
  });
  after(async () => engine?.dispose());

  test('has one expert per checkpoint, ids from the file names, one architecture', async () => {
    const manifest = JSON.parse(await readFile(path.join(pkg, 'manifest.json'), 'utf8'));
    assert.deepEqual(manifest.experts.map((e: { id: string }) => e.id), ['alpha', 'beta', 'gamma', 'retrained', 'delta']);
    assert.equal(manifest.experts[2].title, 'Gamma');
    assert.equal(new Set(manifest.experts.map((e: { architecture: string }) => e.architecture)).size, 1);
    assert.deepEqual(manifest.latent, { channels: 4, downsample: 4, scale_factor: 0.18215 });
    assert.deepEqual(manifest.defaults, { steps: 3, guidance: 7.5, scheduler: 'dpmpp_2m', width: 32, height: 32 });
    const scheduler = JSON.parse(await readFile(path.join(pkg, 'scheduler/scheduler_config.json'), 'utf8'));
    assert.equal(scheduler.beta_schedule, 'scaled_linear');
    assert.equal(scheduler.steps_offset, 1);
    const vocab = JSON.parse(await readFile(path.join(pkg, 'tokenizer/vocab.json'), 'utf8'));
    assert.equal(vocab['<|endoftext|>'], 49407);
  });

  test('writes the shared text encoder once and the retrained one separately', async () => {
    const manifest = JSON.parse(await readFile(path.join(pkg, 'manifest.json'), 'utf8'));
    const own = manifest.experts.filter((e: { text_encoder?: string }) => e.text_encoder);
    assert.deepEqual(own.map((e: { id: string; text_encoder: string }) => [e.id, e.text_encoder]), [
      ['retrained', 'experts/retrained/text_encoder/model.onnx'],
    ]);
    const graphs: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      for (const entry of await readdir(dir, { withFileTypes: true })) {
        const full = path.join(dir, entry.name);
        if (entry.isDirectory()) await walk(full);
        else if (full.includes('text_encoder') && entry.name.endsWith('.onnx')) graphs.push(path.relative(pkg, full));
      }
    };
    await walk(pkg);
    assert.deepEqual(graphs.sort(), ['experts/retrained/text_encoder/model.onnx', 'text_encoder/model.onnx']);
  });

  test('records each expert’s source in sources.json', async () => {
    const sources = JSON.parse(await readFile(path.join(pkg, 'sources.json'), 'utf8'));
    const alpha = sources.experts.alpha;
    assert.equal(alpha.path, path.join(CK, 'alpha.safetensors'));
    assert.equal(alpha.format, 'single-file');
    assert.equal(alpha.sha256, createHash('sha256').update(await readFile(alpha.path)).digest('hex'));
    assert.equal(sources.experts.delta.format, 'diffusers');
    assert.equal(sources.experts.delta.path, path.join(CK, 'delta'));
  });

  const base: GenerateRequest = { prompt: 'a red circle on the left', mode: 'single', experts: ['alpha'], seed: 5 };

  test('single draws a real picture, the same for the same seed', async () => {
    const a = (await engine.generate(base)).images[0].image;
    assert.equal(a.width, 32);
    assert.equal(a.height, 32);
    assert.equal(a.data.length, 32 * 32 * 3);
    assert.ok(distinctBytes(a.data) > 16, 'the picture is not flat');
    const again = (await engine.generate(base)).images[0].image;
    assert.deepEqual(again.data, a.data);
    const other = (await engine.generate({ ...base, seed: 6 })).images[0].image;
    assert.notDeepEqual(other.data, a.data);
  });

  test('every expert draws, the EMA-only, retrained and diffusers ones too, each differently', async () => {
    const pictures = new Map<string, Uint8Array>();
    for (const id of ['alpha', 'beta', 'gamma', 'retrained', 'delta']) {
      const img = (await engine.generate({ ...base, experts: [id] })).images[0].image;
      assert.ok(distinctBytes(img.data) > 16, id);
      pictures.set(id, img.data);
    }
    const all = [...pictures.values()].map((d) => Buffer.from(d).toString('hex'));
    assert.equal(new Set(all).size, 5);
  });

  test('average and merge work at once, and differ from the single experts', async () => {
    const single = (await engine.generate(base)).images[0].image.data;
    const average = (await engine.generate({ ...base, mode: 'average', experts: ['alpha', 'retrained'] })).images[0].image;
    assert.ok(distinctBytes(average.data) > 16);
    assert.notDeepEqual(average.data, single);
    const merge = (await engine.generate({ ...base, mode: 'merge', experts: ['alpha', 'beta', 'delta'] })).images[0].image;
    assert.equal(merge.data.length, 32 * 32 * 3);
    assert.ok(distinctBytes(merge.data) > 16);
    assert.notDeepEqual(merge.data, single);
    const again = (await engine.generate({ ...base, mode: 'merge', experts: ['alpha', 'beta', 'delta'] })).images[0].image;
    assert.deepEqual(again.data, merge.data);
  });

  test('npm run imagine draws from it', async () => {
    const out = path.join(work, 'out');
    const { stdout } = await exec(
      process.execPath,
      ['--import', 'tsx', path.join(REPO_ROOT, 'src/cli/imagine.ts'), 'a blue square', '--model-dir', pkg, '--experts', 'alpha,gamma', '--mode', 'merge', '--seed', '9', '--out', out, '--json'],
      { cwd: REPO_ROOT, env: process.env },
    );
    const report = JSON.parse(stdout.trim().split('\n').pop()!);
    assert.equal(report.images.length, 1);
    assert.ok((await stat(report.images[0].path)).size > 0);
  });
});

describe('bad input: one line, exit 1, nothing written', () => {
  const cases: [string, string[], RegExp][] = [
    ['an SDXL checkpoint', ['ck/bad/sdxl.safetensors'], /^import failed: sdxl\.safetensors: this is an SDXL checkpoint; only SD1\.x is supported$/],
    ['an SD2.x checkpoint', ['ck/bad/sd2.safetensors'], /^import failed: sd2\.safetensors: this is an SD2\.x checkpoint .*; only SD1\.x is supported$/],
    ['a truncated file', ['ck/alpha.safetensors', 'ck/bad/truncated.safetensors'], /^import failed: truncated\.safetensors is truncated: its header describes \d+ bytes of tensors, the file holds \d+/],
    ['a pickled .ckpt without --allow-pickle', ['ck/bad/pickled.ckpt'], /^import failed: pickled\.ckpt is a pickled checkpoint \(\.ckpt\), which can run arbitrary code .*--allow-pickle/],
    ['the same file twice', ['ck/beta_fp32.safetensors', 'ck/bad/../beta_fp32.safetensors'], /^import failed: ck\/bad\/\.\.\/beta_fp32\.safetensors is given twice/],
    ['two files giving the same id', ['ck/alpha.safetensors', 'ck/bad/alpha.safetensors'], /^import failed: ck\/alpha\.safetensors and ck\/bad\/alpha\.safetensors both give the expert id 'alpha'; rename one of the files/],
  ];
  for (const [what, inputs, message] of cases) {
    test(what, async () => {
      const r = await importCli(['--out', 'refused', '--check', 'off', ...inputs]);
      assert.equal(r.code, 1, r.stderr);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0], message);
      assert.equal(existsSync(path.join(work, 'refused')), false);
      assert.deepEqual(await leftovers(), []);
    });
  }

  test('an existing --out is kept unless --force', async () => {
    const r = await importCli(['--out', 'mine', '--check', 'off', 'ck/alpha.safetensors']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr.trim(), 'import failed: mine already exists; pass --force to replace it');
    const manifest = JSON.parse(await readFile(path.join(work, 'mine', 'manifest.json'), 'utf8'));
    assert.equal(manifest.experts.length, 5);
  });
});
