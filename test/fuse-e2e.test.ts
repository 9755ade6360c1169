// Mode `fuse` end to end on the tiny fixture's fuse ensemble (a training-free variance-fusion graph with
// the AFA graph's inputs and outputs, issue 18): the engine's image and contribution maps, the CLI
// (--mode fuse, the contribution panel, --compare, `models`) and the bot (/imagine mode:Fuse with
// contributions, 🧩 Contributions and 🔍 Compare) through the real discord.js client and the fake
// Discord, on an engine thread.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { EnsembleInfo, GenerateRequest } from '../src/engine/api.ts';
import { startEngineThread } from '../src/engine-host/engine-thread.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { parseParameters, readPngText } from '../src/engine/render/index.ts';
import type { FakeMessage } from '../src/testing/fake-discord.ts';
import { REPO_ROOT, TINY, maxAbsDiff } from './helpers/fixture.ts';
import { runCli } from './helpers/cli.ts';
import { BotHarness, embedField, pngParameters } from './support/bot-harness.ts';
const prompt = 'a red circle on the left and a blue square on the right';

let engine: Engine;
let fuse: EnsembleInfo;
before(async () => {
  engine = await Engine.load(TINY);
  const found = engine.info().ensembles.find((e) => e.method === 'fuse');
  assert.ok(found, 'the tiny fixture has a fuse ensemble (python3 -m trainer.fixture)');
  fuse = found;
});
after(async () => engine?.dispose());

describe('engine', () => {
  const base = (): GenerateRequest => ({ prompt, mode: 'fuse', ensemble: fuse.id, seed: 5, steps: 4, contributions: true });

  test('a fuse ensemble draws images with contribution maps that sum to 1 per pixel', async () => {
    const result = await engine.generate({ ...base(), count: 2 });
    assert.equal(result.params.mode, 'fuse');
    assert.equal(result.params.ensemble, fuse.id);
    assert.deepEqual(result.params.experts, fuse.experts);
    assert.equal(result.params.weights, undefined, 'no user weights: the graph decides per pixel');
    assert.equal(result.images.length, 2);
    const info = engine.info();
    for (const image of result.images) {
      assert.equal(image.image.width, info.defaults.width);
      const maps = image.contributions!;
      assert.deepEqual(maps.experts, fuse.experts);
      assert.equal(maps.width, info.defaults.width / info.size.multiple);
      let worst = 0;
      let spread = 0;
      for (let p = 0; p < maps.width * maps.height; p++) {
        const column = maps.weights.map((w) => w[p]);
        worst = Math.max(worst, Math.abs(column.reduce((s, x) => s + x, 0) - 1));
        spread = Math.max(spread, Math.max(...column) - Math.min(...column));
        assert.ok(column.every((x) => x >= 0 && x <= 1), `weights in [0, 1] at ${p}`);
      }
      assert.ok(worst < 1e-4, `maps sum to 1 per pixel (off by ${worst})`);
      assert.ok(spread > 1e-3, 'the weights vary over the experts somewhere: a per-pixel rule, not a plain average');
      assert.ok(Math.abs(maps.shares.reduce((s, x) => s + x, 0) - 1) < 1e-6);
    }
    assert.ok(maxAbsDiff(result.images[0].image.data, result.images[1].image.data) > 0, 'seed + 1 is another picture');
  });

  test('the same seed gives the same picture; the fuse graph is not the average of the experts', async () => {
    const a = await engine.generate({ ...base(), contributions: false });
    const b = await engine.generate({ ...base(), contributions: false });
    assert.deepEqual(a.images[0].image.data, b.images[0].image.data);
    const average = await engine.generate({ ...base(), mode: 'average', ensemble: undefined, experts: [...fuse.experts], contributions: false });
    assert.ok(maxAbsDiff(a.images[0].image.data, average.images[0].image.data) > 0, 'fuse differs from the ε-average');
  });

  test('mode fuse finds the fuse ensemble of the experts asked; a subset runs when the graph allows it', async () => {
    const byExperts = await engine.generate({ ...base(), ensemble: undefined, experts: [...fuse.experts].reverse() });
    assert.equal(byExperts.params.ensemble, fuse.id);
    if (!fuse.subsets) return;
    const one = await engine.generate({ ...base(), experts: [fuse.experts[0]] });
    const maps = one.images[0].contributions!;
    assert.deepEqual(maps.experts, [fuse.experts[0]]);
    assert.ok(maps.weights[0].every((x) => Math.abs(x - 1) < 1e-4), 'one expert takes every pixel');
  });
});

interface ReferenceCase {
  name: string;
  request: GenerateRequest;
  images: { seed: number; file: string; width: number; height: number; contributions?: { file: string; experts: string[]; dims: number[] } }[];
}

describe('parity with the PyTorch reference sampler (reference/fuse.json)', () => {
  const referenceDir = path.join(TINY, 'reference');
  const cases = (JSON.parse(readFileSync(path.join(referenceDir, 'fuse.json'), 'utf8')) as { cases: ReferenceCase[] }).cases;
  const f32 = (file: string) => {
    const b = readFileSync(path.join(referenceDir, file));
    return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
  };

  test('the reference covers mode fuse with maps, all experts and a subset', () => {
    assert.ok(cases.every((c) => c.request.mode === 'fuse' && c.images.every((i) => i.contributions)));
    assert.ok(cases.some((c) => c.request.experts === undefined));
    assert.ok(cases.some((c) => c.request.experts !== undefined));
  });

  for (const c of cases) {
    test(c.name, async () => {
      const result = await engine.generate(c.request);
      assert.equal(result.params.mode, 'fuse');
      assert.equal(result.images.length, c.images.length);
      c.images.forEach((ref, i) => {
        const got = result.images[i];
        assert.equal(got.seed, ref.seed);
        assert.deepEqual([got.image.width, got.image.height], [ref.width, ref.height]);
        const diff = maxAbsDiff(got.image.data, readFileSync(path.join(referenceDir, ref.file)));
        assert.ok(diff <= 2, `${c.name} image ${i}: max abs difference ${diff}/255 > 2/255`);
        const maps = got.contributions;
        assert.ok(maps && ref.contributions, 'contribution maps on both sides');
        const [, h, w] = ref.contributions.dims;
        const gold = f32(ref.contributions.file);
        ref.contributions.experts.forEach((id, k) => {
          const idx = maps.experts.indexOf(id);
          const mine = idx >= 0 ? maps.weights[idx] : new Float32Array(h * w);
          const d = maxAbsDiff(mine, gold.subarray(k * h * w, (k + 1) * h * w));
          assert.ok(d < 1e-3, `${c.name}: contribution map of ${id} differs by ${d}`);
        });
      });
    });
  }
});

describe('CLI', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const dir of dirs) await rm(dir, { recursive: true, force: true });
  });

  test('imagine --mode fuse writes the PNG, its contribution panel and maps, and a comparison with each expert', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'fuse-cli-'));
    dirs.push(out);
    const r = await runCli('imagine.ts', [prompt, '--mode', 'fuse', '--seed', '9', '--steps', '3', '--contributions', '--compare', '--out', out, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout.trim().split('\n').pop()!);
    const params = parseParameters(readPngText(await readFile(report.images[0].path)).parameters);
    assert.equal(params.mode, 'fuse');
    assert.equal(params.ensemble, fuse.id);
    const shares = report.contributions[0].shares as Record<string, number>;
    assert.deepEqual(Object.keys(shares), fuse.experts);
    assert.ok(Math.abs(Object.values(shares).reduce((s, x) => s + x, 0) - 1) < 1e-6);
    const maps = JSON.parse(await readFile(report.contributions[0].maps, 'utf8'));
    assert.deepEqual(maps.experts, fuse.experts);
    await readFile(report.contributions[0].path);
    assert.equal(report.compare.length, 1);
    await readFile(report.compare[0].path);

    // --ensemble alone runs the ensemble in its own mode.
    const byId = await runCli('imagine.ts', [prompt, '--ensemble', fuse.id, '--seed', '9', '--steps', '2', '--out', out, '--json']);
    assert.equal(byId.code, 0, byId.stderr);
    const first = JSON.parse(byId.stdout.trim().split('\n').pop()!).images[0].path;
    assert.equal(parseParameters(readPngText(await readFile(first)).parameters).mode, 'fuse');
  });

  test('models lists the fuse ensemble with its method; a wrong mode is one line', async () => {
    const models = await runCli('models.ts', []);
    assert.equal(models.code, 0, models.stderr);
    assert.match(models.stdout, new RegExp(`^  ${fuse.id}\\s+fuse\\s+${fuse.title.replace(/[()]/g, '\\$&')}`, 'm'));
    const bad = await runCli('imagine.ts', [prompt, '--mode', 'fused', '--steps', '1']);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /--mode must be one of single, average, merge, fuse, afa \(got "fused"\)/);
    assert.doesNotMatch(bad.stderr, /\n\s+at /, 'no stack trace');
  });
});

describe('bot', () => {
  let h: BotHarness;
  before(async () => {
    h = await BotHarness.start({ engine: () => startEngineThread({ modelDir: TINY }) });
  });
  after(async () => h?.close());

  function button(message: FakeMessage, label: string): string {
    const found = h.fake.buttonsOf(message).find((b) => b.label === label);
    assert.ok(found, `button ${label} (has ${h.fake.buttonsOf(message).map((b) => b.label).join(', ')})`);
    return found.customId;
  }

  test('/imagine mode:Fuse draws with the fuse ensemble and its contribution panel; 🧩 and 🔍 work on it', async () => {
    const user = h.fake.user('fuser');
    const message = await h.result(h.imagine(user, { prompt, mode: 'fuse', seed: 21, steps: 3, contributions: true }));
    const names = message.attachments.map((a) => a.filename);
    assert.equal(names.length, 2, names.join(', '));
    assert.ok(names[1].includes('contributions'));
    const params = pngParameters(message.attachments[0].data);
    assert.equal(params.mode, 'fuse');
    assert.equal(params.ensemble, fuse.id);
    assert.equal(embedField(message, 'Mode'), 'Fuse ensemble');
    assert.ok(embedField(message, 'Models')?.startsWith(`${fuse.title}:`), embedField(message, 'Models'));
    assert.equal(h.fake.buttonsOf(message).find((b) => b.label === 'Contributions')?.disabled ?? false, false);

    const panel = await h.result(h.fake.pressButton(message.id, button(message, 'Contributions'), { user }));
    assert.ok(panel.attachments[0].filename.includes('contributions'));
    assert.match(String(panel.embeds[0].description), /%/);

    const compare = await h.result(h.fake.pressButton(message.id, button(message, 'Compare'), { user }));
    const labels = String(compare.embeds[0].description);
    for (const id of fuse.experts) assert.ok(labels.includes(h.info.experts.find((e) => e.id === id)!.title), `compare shows ${id}`);
    assert.ok(labels.includes(fuse.title), 'compare shows the fuse ensemble');

    // The ensemble picked by its id runs in its own mode; /models names its method.
    const byId = await h.result(h.imagine(user, { prompt, model: fuse.id, seed: 22, steps: 2 }));
    assert.equal(pngParameters(byId.attachments[0].data).mode, 'fuse');
    const models = h.fake.slash('models', {}, { user });
    await models.waitFor((i) => i.acknowledged, 10_000, '/models');
    const embeds = models.acks[0].data?.embeds as { fields: { name: string; value: string }[] }[];
    const field = embeds[0].fields.find((f) => f.name.startsWith('Ensembles'));
    assert.match(field?.value ?? '', new RegExp(`\`${fuse.id}\` — Fuse of`));
  });
});
