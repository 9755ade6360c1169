// Mode `fuse` (training-free feature fusion, issue 18) where modes are named and chosen: the mode list
// and its labels, the engine's choice of an ensemble by method, the bot's model choice, request
// building and the /models listing. No graph runs here (see test/fuse-e2e.test.ts).
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EngineError, isEnsembleMode, MODES, modeHasContributions, type GenerateRequest, type PackageInfo } from '../src/engine/api.ts';
import { MODE_LABELS, modeChoice } from '../src/engine/labels.ts';
import { ModelPackage } from '../src/engine/model-package.ts';
import { resolveRequest } from '../src/engine/resolve.ts';
import { modelsEmbed } from '../src/bot/commands/models.ts';
import { buildImagineRequest } from '../src/bot/imagine-request.ts';
import { describeModels } from '../src/bot/messages.ts';
import { modelSuggestions, resolveModelChoice } from '../src/bot/model-choice.ts';
import { TINY } from './helpers/fixture.ts';
import { shapesInfo, TRIO } from './helpers/package-info.ts';

test('fuse is a mode between the training-free baselines and AFA, named "Fuse"', () => {
  assert.deepEqual(MODES, ['single', 'average', 'merge', 'fuse', 'afa']);
  assert.equal(MODE_LABELS.fuse.name, 'Fuse');
  assert.match(modeChoice('fuse'), /^Fuse — training-free/);
  for (const mode of MODES) assert.ok(modeChoice(mode).length <= 100, `${mode}: a Discord choice name has at most 100 characters`);
  assert.deepEqual(MODES.filter(isEnsembleMode), ['fuse', 'afa']);
  assert.deepEqual(MODES.filter(modeHasContributions), ['average', 'fuse', 'afa']);
});

/**
 * A package folder whose manifest is the tiny fixture's with other ensembles; every path is absolute
 * into the fixture, and each ensemble's graph is the fixture's AFA graph: enough to resolve requests.
 */
async function tinyWithEnsembles(ensembles: Record<string, unknown>[]): Promise<string> {
  const manifest = JSON.parse(await readFile(path.join(TINY, 'manifest.json'), 'utf8')) as Record<string, unknown>;
  const abs = (p: string) => path.join(TINY, p);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'fuse-modes-'));
  for (const key of ['tokenizer', 'text_encoder', 'vae_decoder', 'vae_encoder', 'scheduler']) manifest[key] = abs(manifest[key] as string);
  manifest.experts = (manifest.experts as { unet: string }[]).map((e) => ({ ...e, unet: abs(e.unet) }));
  manifest.ensembles = ensembles.map((e) => ({ ...e, graph: abs('ensembles/duo/model.onnx') }));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
  return dir;
}

describe('the engine picks an ensemble of the mode’s method', () => {
  const dirs: string[] = [];
  let pkg: ModelPackage;
  let afaOnly: ModelPackage;
  let fuseOnly: ModelPackage;
  before(async () => {
    // The fuse ensembles come first: mode afa must not take them, and exact sets win over supersets.
    dirs.push(
      await tinyWithEnsembles([
        { id: 'wide', title: 'Wide (fuse)', method: 'fuse', experts: ['alpha', 'beta', 'odd'], subsets: false },
        { id: 'blend', title: 'Blend (fuse)', method: 'fuse', experts: ['alpha', 'beta'], subsets: true },
        { id: 'duo', title: 'Duo (AFA)', method: 'afa', experts: ['alpha', 'beta'], subsets: true },
      ]),
      await tinyWithEnsembles([{ id: 'duo', title: 'Duo (AFA)', method: 'afa', experts: ['alpha', 'beta'], subsets: true }]),
      await tinyWithEnsembles([{ id: 'blend', title: 'Blend (fuse)', method: 'fuse', experts: ['alpha', 'beta'], subsets: false }]),
    );
    pkg = await ModelPackage.load(dirs[0]);
    afaOnly = await ModelPackage.load(dirs[1]);
    fuseOnly = await ModelPackage.load(dirs[2]);
  });
  after(async () => {
    for (const dir of dirs) await rm(dir, { recursive: true, force: true });
  });

  const base: GenerateRequest = { prompt: 'a red circle', mode: 'fuse', seed: 1 };
  const chosen = (p: ModelPackage, req: Partial<GenerateRequest>) => {
    const r = resolveRequest(p, { ...base, ...req });
    return [r.mode, r.ensemble?.id, r.experts.map((e) => e.id)];
  };
  const refused = (p: ModelPackage, req: Partial<GenerateRequest>, code: string, pattern: RegExp) =>
    assert.throws(
      () => resolveRequest(p, { ...base, ...req }),
      (err: unknown) => err instanceof EngineError && err.code === code && pattern.test(err.message),
    );

  test('mode fuse: by id, else the first fuse ensemble (of exactly the experts asked, then one that runs subsets)', () => {
    assert.deepEqual(chosen(pkg, { ensemble: 'blend' }), ['fuse', 'blend', ['alpha', 'beta']]);
    assert.deepEqual(chosen(pkg, {}), ['fuse', 'wide', ['alpha', 'beta', 'odd']]);
    assert.deepEqual(chosen(pkg, { experts: ['beta', 'alpha'] }), ['fuse', 'blend', ['alpha', 'beta']]);
    assert.deepEqual(chosen(pkg, { experts: ['beta'] }), ['fuse', 'blend', ['beta']]);
    assert.deepEqual(chosen(pkg, { experts: ['odd', 'alpha', 'beta'] }), ['fuse', 'wide', ['alpha', 'beta', 'odd']]);
    const r = resolveRequest(pkg, { ...base, ensemble: 'blend' });
    assert.deepEqual(r.weights, [0.5, 0.5]);
  });

  test('mode afa takes only AFA ensembles, mode fuse only fuse ones', () => {
    assert.deepEqual(chosen(pkg, { mode: 'afa' }), ['afa', 'duo', ['alpha', 'beta']]);
    assert.deepEqual(chosen(pkg, { mode: 'afa', experts: ['alpha'] }), ['afa', 'duo', ['alpha']]);
    refused(pkg, { mode: 'afa', ensemble: 'blend' }, 'bad_request', /"blend" is a training-free fuse ensemble: run it with mode "fuse", or pick a trained AFA ensemble for mode "afa": duo \(alpha\+beta\)/);
    refused(pkg, { ensemble: 'duo' }, 'bad_request', /"duo" is a trained AFA ensemble: run it with mode "afa", or pick a training-free fuse ensemble for mode "fuse": wide/);
    refused(pkg, { mode: 'afa', experts: ['odd'] }, 'bad_request', /Mode "afa" needs a trained AFA ensemble; none covers odd\. Ensembles: duo \(alpha\+beta\)/);
    refused(pkg, { experts: ['alpha', 'odd'] }, 'bad_request', /Ensemble "wide" only works with all of its experts/);
    refused(pkg, { experts: ['gamma'] }, 'unknown_model', /Unknown expert "gamma"/);
    refused(pkg, { ensemble: 'nope' }, 'unknown_model', /Unknown ensemble "nope"/);
  });

  test('a package without a fuse ensemble says how to add one', () => {
    refused(
      afaOnly,
      { experts: ['alpha', 'beta'] },
      'unknown_model',
      /this model package has none; add one with python3 -m trainer\.export --add-to \S+ --method fuse --experts alpha,beta \(or use mode "afa", "average" or "merge"\)/,
    );
    refused(afaOnly, {}, 'unknown_model', /--method fuse --experts alpha,beta,odd/);
    refused(fuseOnly, { mode: 'afa' }, 'unknown_model', /Mode "afa" needs a trained ensemble, and this model package has none\. Use "fuse", "average" or "merge"\./);
    refused(fuseOnly, { experts: ['alpha'] }, 'bad_request', /Ensemble "blend" only works with all of its experts/);
    // The other modes are as before.
    assert.deepEqual(chosen(afaOnly, { mode: 'afa' }), ['afa', 'duo', ['alpha', 'beta']]);
    assert.deepEqual(chosen(afaOnly, { mode: 'average', ensemble: 'duo' }), ['average', undefined, ['alpha', 'beta']]);
  });
});

const INFO: PackageInfo = shapesInfo([
  TRIO,
  { id: 'fuse', title: 'Fuse (training-free)', description: 'variance fusion', method: 'fuse', experts: ['curves', 'blocks', 'spikes'], subsets: true },
  { id: 'surf', title: 'Surf (fuse)', description: 'two', method: 'fuse', experts: ['blocks', 'waves'], subsets: false },
]);
const AFA_ONLY: PackageInfo = { ...INFO, ensembles: INFO.ensembles.filter((e) => e.method === 'afa') };

type ModeName = (typeof MODES)[number];
function selection(value: string | null, mode?: ModeName, info = INFO) {
  const result = resolveModelChoice(value, mode, info);
  if (!result.ok) throw new Error(result.message);
  return result.selection;
}
function refusal(value: string | null, mode?: ModeName, info = INFO): string {
  const result = resolveModelChoice(value, mode, info);
  assert.equal(result.ok, false, `${value} ${mode} should be refused`);
  return result.ok ? '' : result.message;
}

test('bot: an ensemble runs in its method’s mode; mode Fuse finds the fuse ensemble of the models chosen', () => {
  assert.deepEqual(selection('fuse'), { mode: 'fuse', ensemble: 'fuse', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('surf'), { mode: 'fuse', ensemble: 'surf', expertIds: ['blocks', 'waves'] });
  assert.deepEqual(selection('trio'), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  // The AFA ensemble's experts, fused without training (and back).
  assert.deepEqual(selection('trio', 'fuse'), { mode: 'fuse', ensemble: 'fuse', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('fuse', 'afa'), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection(null, 'fuse'), { mode: 'fuse', ensemble: 'fuse', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('curves+spikes', 'fuse'), { mode: 'fuse', ensemble: 'fuse', experts: ['curves', 'spikes'], expertIds: ['curves', 'spikes'] });
  assert.deepEqual(selection('waves+blocks', 'fuse'), { mode: 'fuse', ensemble: 'surf', expertIds: ['waves', 'blocks'] });
  // Without a mode, a combination takes the AFA ensemble first, a fuse one when it is the only one.
  assert.deepEqual(selection('curves+blocks'), { mode: 'afa', ensemble: 'trio', experts: ['curves', 'blocks'], expertIds: ['curves', 'blocks'] });
  assert.deepEqual(selection('waves+blocks'), { mode: 'fuse', ensemble: 'surf', expertIds: ['waves', 'blocks'] });
  assert.deepEqual(selection('fuse', 'average'), { mode: 'average', experts: ['curves', 'blocks', 'spikes'], expertIds: ['curves', 'blocks', 'spikes'] });
  // Nothing chosen: the first ensemble, in its own mode.
  assert.deepEqual(selection(null), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection(null, undefined, { ...INFO, ensembles: INFO.ensembles.slice(1) }), {
    mode: 'fuse',
    ensemble: 'fuse',
    expertIds: ['curves', 'blocks', 'spikes'],
  });
});

test('bot: impossible fuse choices are explained', () => {
  assert.match(refusal('curves+waves', 'fuse'), /No fuse ensemble combines curves\+waves; use mode afa, average or merge/);
  assert.match(refusal('curves+waves', 'afa'), /No trained AFA ensemble combines curves\+waves; use mode fuse, average or merge/);
  assert.match(refusal('surf', 'afa'), /surf is a fuse ensemble and no AFA ensemble combines its experts \(blocks\+waves\); choose mode fuse, average or merge/);
  assert.match(refusal(null, 'fuse', AFA_ONLY), /no fuse ensemble \(training-free feature fusion\); use mode afa, average or merge\..*--add-to <package> --method fuse/);
  assert.match(refusal('trio', 'fuse', AFA_ONLY), /no fuse ensemble/);
  assert.match(refusal('curves+blocks', 'fuse', AFA_ONLY), /no fuse ensemble/);
  assert.match(refusal(null, 'afa', { ...INFO, ensembles: INFO.ensembles.slice(1) }), /no trained AFA ensemble; use mode fuse, average or merge, or single/);
  assert.match(refusal('fuse', 'single'), /one expert/);
});

test('bot: autocomplete names each ensemble’s method', () => {
  const all = modelSuggestions('', INFO);
  assert.ok(all.some((c) => c.value === 'fuse' && /— Fuse ensemble of Curves, Blocks, Spikes/.test(c.name)));
  assert.ok(all.some((c) => c.value === 'trio' && /— AFA ensemble of/.test(c.name)));
  assert.ok(all.some((c) => c.value === 'blocks+waves' && /— Fuse \(surf\)/.test(c.name)));
  assert.ok(all.some((c) => c.value === 'curves+blocks' && /— AFA \(trio\)/.test(c.name)));
});

test('bot: fuse results can show contributions; captions and /models name the fuse ensemble', () => {
  const built = buildImagineRequest({ prompt: 'a red ring', model: 'fuse', seed: 3, contributions: true }, INFO, { blockedWords: [] });
  assert.ok(built.ok);
  assert.deepEqual(built.request, { prompt: 'a red ring', mode: 'fuse', ensemble: 'fuse', seed: 3, count: 1, contributions: true });
  // The /settings preference for contributions applies to fuse too.
  const preferred = buildImagineRequest({ prompt: 'x', mode: 'fuse' }, INFO, { blockedWords: [], preferContributions: true });
  assert.ok(preferred.ok && preferred.request.contributions === true);
  const merge = buildImagineRequest({ prompt: 'x', model: 'curves+blocks', mode: 'merge', contributions: true }, INFO, { blockedWords: [] });
  assert.ok(!merge.ok && /need mode afa, fuse or average, not merge/.test(merge.message));
  const unknown = buildImagineRequest({ prompt: 'x', mode: 'blend' }, INFO, { blockedWords: [] });
  assert.ok(!unknown.ok && /choose one of single, average, merge, fuse, afa/.test(unknown.message));

  assert.equal(describeModels({ mode: 'fuse', ensemble: 'fuse' }, INFO), 'Fuse (training-free): Curves + Blocks + Spikes');
  assert.equal(describeModels({ mode: 'fuse', ensemble: 'fuse', experts: ['curves', 'spikes'] }, INFO), 'Fuse (training-free): Curves + Spikes');

  const fields = modelsEmbed(INFO).toJSON().fields ?? [];
  const ensembles = fields.find((f) => f.name === 'Ensembles (mode afa or fuse)');
  assert.ok(ensembles, JSON.stringify(fields.map((f) => f.name)));
  assert.match(ensembles.value, /\*\*Trio \(AFA\)\*\* `trio` — AFA of Curves, Blocks, Spikes/);
  assert.match(ensembles.value, /\*\*Surf \(fuse\)\*\* `surf` — Fuse of Blocks, Waves/);
});
