// The /imagine model option and request building, from PackageInfo alone (no Discord, no engine).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { PackageInfo } from '../src/engine/api.ts';
import { buttonId, parseButtonId } from '../src/bot/custom-ids.ts';
import { buildImagineRequest, findBlockedWord } from '../src/bot/imagine-request.ts';
import { modelSuggestions, resolveModelChoice } from '../src/bot/model-choice.ts';
import { commands } from '../src/bot/commands/index.ts';
import { commandLimitProblems } from '../src/bot/deploy-commands.ts';
import { shapesInfo, TRIO } from './helpers/package-info.ts';

const INFO: PackageInfo = shapesInfo([
  TRIO,
  { id: 'pair', title: 'Pair (AFA)', description: 'two', method: 'afa', experts: ['blocks', 'waves'], subsets: false },
]);

function selection(value: string | null, mode?: 'afa' | 'average' | 'merge' | 'single') {
  const result = resolveModelChoice(value, mode, INFO);
  if (!result.ok) throw new Error(result.message);
  return result.selection;
}

function refusal(value: string | null, mode?: 'afa' | 'average' | 'merge' | 'single'): string {
  const result = resolveModelChoice(value, mode, INFO);
  assert.equal(result.ok, false, `${value} ${mode} should be refused`);
  return result.ok ? '' : result.message;
}

test('ensemble ids mean AFA, expert ids a single model, a+b a combination', () => {
  assert.deepEqual(selection('trio'), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('TRIO'), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('trio', 'average'), { mode: 'average', experts: ['curves', 'blocks', 'spikes'], expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('curves'), { mode: 'single', experts: ['curves'], expertIds: ['curves'] });
  // A subset of an ensemble that supports subsets runs on its graph.
  assert.deepEqual(selection('curves+spikes'), { mode: 'afa', ensemble: 'trio', experts: ['curves', 'spikes'], expertIds: ['curves', 'spikes'] });
  // The whole set of an ensemble: no subset mask needed.
  assert.deepEqual(selection('waves + blocks'), { mode: 'afa', ensemble: 'pair', expertIds: ['waves', 'blocks'] });
  // No ensemble covers curves+waves: average by default, merge when asked.
  assert.deepEqual(selection('curves+waves'), { mode: 'average', experts: ['curves', 'waves'], expertIds: ['curves', 'waves'] });
  assert.deepEqual(selection('curves+waves', 'merge'), { mode: 'merge', experts: ['curves', 'waves'], expertIds: ['curves', 'waves'] });
  // Nothing chosen: the first ensemble.
  assert.deepEqual(selection(null), { mode: 'afa', ensemble: 'trio', expertIds: ['curves', 'blocks', 'spikes'] });
  assert.deepEqual(selection('', 'single'), { mode: 'single', experts: ['curves'], expertIds: ['curves'] });
});

test('impossible choices are explained', () => {
  assert.match(refusal('nope'), /Unknown model "nope"/);
  assert.match(refusal('curves+nope'), /Unknown expert "nope"/);
  assert.match(refusal('curves+curves'), /twice/);
  assert.match(refusal('curves+'), /joined by \+/);
  assert.match(refusal('curves+waves', 'afa'), /No trained AFA ensemble combines curves\+waves/);
  assert.match(refusal('curves', 'average'), /two or more/);
  assert.match(refusal('trio', 'single'), /one expert/);
  assert.match(refusal('curves+blocks', 'single'), /one expert/);
  const noEnsembles = { ...INFO, ensembles: [] };
  const result = resolveModelChoice(null, 'afa', noEnsembles);
  assert.equal(result.ok, false);
});

test('autocomplete: ensembles, experts and pairs, filtered, at most 25, combinations continue after +', () => {
  const all = modelSuggestions('', INFO);
  assert.deepEqual(all.slice(0, 6).map((c) => c.value), ['trio', 'pair', 'curves', 'blocks', 'spikes', 'waves']);
  assert.ok(all.some((c) => c.value === 'curves+waves' && /average/.test(c.name)));
  assert.ok(all.some((c) => c.value === 'curves+blocks' && /AFA \(trio\)/.test(c.name)));
  assert.ok(all.length <= 25);
  assert.deepEqual(modelSuggestions('ring', INFO).map((c) => c.value), ['curves']);
  assert.deepEqual(modelSuggestions('curves+', INFO).map((c) => c.value), ['curves+blocks', 'curves+spikes', 'curves+waves']);
  assert.deepEqual(modelSuggestions('curves+bl', INFO).map((c) => c.value), ['curves+blocks']);
  assert.deepEqual(modelSuggestions('curves+blocks+', INFO).map((c) => c.value), ['curves+blocks+spikes', 'curves+blocks+waves']);
  assert.deepEqual(modelSuggestions('nope+', INFO), []);
  const many: PackageInfo = {
    ...INFO,
    experts: Array.from({ length: 40 }, (_, i) => ({ id: `e${i}`, title: `Expert ${i}`, description: 'x'.repeat(150) })),
  };
  const capped = modelSuggestions('', many);
  assert.equal(capped.length, 25);
  assert.ok(capped.every((c) => c.name.length <= 100));
});

test('request building applies options, random seeds and limits', () => {
  const built = buildImagineRequest(
    { prompt: '  a red ring  ', model: 'trio', negative: 'blurry', seed: 7, steps: 30, guidance: 7.5, scheduler: 'euler_a', count: 2, contributions: true },
    INFO,
    { blockedWords: [] },
  );
  assert.ok(built.ok);
  assert.deepEqual(built.request, {
    prompt: 'a red ring', negative: 'blurry', mode: 'afa', ensemble: 'trio', seed: 7, steps: 30, guidance: 7.5,
    scheduler: 'euler_a', count: 2, contributions: true,
  });
  const seeds = new Set(Array.from({ length: 20 }, () => {
    const r = buildImagineRequest({ prompt: 'x' }, INFO, { blockedWords: [] });
    assert.ok(r.ok);
    assert.ok(Number.isInteger(r.request.seed) && r.request.seed >= 0 && r.request.seed <= 4_294_967_295);
    return r.request.seed;
  }));
  assert.ok(seeds.size > 15, 'seeds are random');
  const merge = buildImagineRequest({ prompt: 'x', model: 'curves+waves', mode: 'merge', contributions: true }, INFO, { blockedWords: [] });
  assert.equal(merge.ok, false);
});

test('blocked words match whole words case-insensitively; phrases and symbols match as substrings', () => {
  assert.equal(findBlockedWord('A Gory scene', ['gore']), undefined);
  assert.equal(findBlockedWord('so much GORE.', ['gore']), 'gore');
  assert.equal(findBlockedWord('très sanglant', ['sanglant']), 'sanglant');
  assert.equal(findBlockedWord('a bad thing here', ['bad thing']), 'bad thing');
  assert.equal(findBlockedWord('nothing', []), undefined);
});

test('button ids round-trip and reject anything else', () => {
  assert.deepEqual(parseButtonId(buttonId('compare', 'abc_DEF-1')), { action: 'compare', jobId: 'abc_DEF-1', imageIndex: 0 });
  assert.equal(parseButtonId('job:explode:abc'), undefined);
  assert.equal(parseButtonId('job:reroll:'), undefined);
  assert.equal(parseButtonId('other:reroll:abc'), undefined);
  assert.ok(buttonId('delete', 'x'.repeat(12)).length <= 100);
});

test('command definitions respect Discord limits, subcommands included', () => {
  const definitions = commands.map((command) => command.data.toJSON());
  assert.deepEqual(commandLimitProblems(definitions), []);
  for (const json of definitions) {
    assert.match(json.name, /^[a-z]{1,32}$/);
    assert.ok(json.description.length <= 100);
    assert.ok((json.options?.length ?? 0) <= 25);
  }
  // The check itself catches what Discord would refuse.
  const crowded = {
    name: 'crowded',
    description: 'x',
    options: Array.from({ length: 26 }, (_, i) => ({
      type: 3,
      name: `o${i}`,
      description: 'd',
      ...(i === 0 ? { choices: Array.from({ length: 26 }, (_, j) => ({ name: `c${j}`, value: `c${j}` })) } : {}),
    })),
  };
  const problems = commandLimitProblems([crowded as never]);
  assert.ok(problems.some((p) => /26 options/.test(p)));
  assert.ok(problems.some((p) => /crowded o0: 26 choices/.test(p)));
});
