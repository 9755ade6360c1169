// The evaluation (`npm run eval`): prompt set, scoring, Fréchet distance, targets and report on
// synthetic inputs; the runner on the tiny fixture; end to end on a smoke package when one exists.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import type { ContributionMaps, PackageInfo, RgbImage } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { argmax, parseClassifierMeta, toClassifierInput, type ImageReader, type Reading } from '../src/eval/classifier.ts';
import { featureStats, frechetDistance, sqrtPsd, symmetricEigen } from '../src/eval/frechet.ts';
import { smallPromptSet, familyOrders, fullPromptSet, quickPromptSet, type EvalPrompt } from '../src/eval/prompts.ts';
import { floorAt, parseReference } from '../src/eval/reference.ts';
import { ANALYSIS_END, ANALYSIS_START, extractAnalysis, formatDistance, renderReport, type ReportInput } from '../src/eval/report.ts';
import { evalModes, runMode } from '../src/eval/run.ts';
import { routingShares, scoreReading, summarize } from '../src/eval/scoring.ts';
import { evaluateTargets, type ModeSummary } from '../src/eval/summary.ts';
import { BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, caption, familyOf, type Scene } from '../src/eval/world.ts';
import { REPO_ROOT, TINY } from './helpers/fixture.ts';

const run = promisify(execFile);

// trainer/demo/shapes.py's caption grammar
const OBJECT =
  `an? (?:(?:${SIZES.join('|')}) )?(?:(?:${COLOURS.join('|')}) )?(?:${SHAPES.join('|')})` +
  '(?: (?:on the left|on the right|at the top|at the bottom|in the center))?';
const CAPTION = new RegExp(`^${OBJECT}(?: and ${OBJECT})?(?:, (?:${BACKGROUNDS.join('|')}) background)?$`);

function count<T>(items: T[], key: (x: T) => string): Map<string, number> {
  const m = new Map<string, number>();
  for (const x of items) m.set(key(x), (m.get(key(x)) ?? 0) + 1);
  return m;
}

describe('prompt set', () => {
  test('is deterministic; ids, seeds and subsets are stable', () => {
    const full = fullPromptSet();
    assert.deepEqual(fullPromptSet(), full);
    assert.equal(full.length, 144);
    assert.deepEqual(full.map((p) => p.id), full.map((_, i) => i));
    assert.ok(full.every((p) => p.seed === 1000 + p.id));
    assert.equal(full.filter((p) => p.kind === 'single').length, 108);
    assert.ok(full.slice(108).every((p) => p.kind === 'pair'));
    for (const [subset, singles, pairs] of [[smallPromptSet(), 36, 24], [quickPromptSet(), 6, 2]] as const) {
      assert.equal(subset.filter((p) => p.kind === 'single').length, singles);
      assert.equal(subset.filter((p) => p.kind === 'pair').length, pairs);
      for (const p of subset) assert.deepEqual(p, full[p.id]);
    }
    assert.equal(full[0].text, 'a small red circle on the left, white background');
  });

  test('captions follow the world grammar and say what the scene holds', () => {
    for (const p of fullPromptSet()) {
      assert.match(p.text, CAPTION);
      assert.equal(p.text, caption(p.scene));
    }
    const scene: Scene = {
      objects: [
        { shape: 'circle', colour: 'red', position: 'left' },
        { shape: 'square', colour: 'blue', position: 'right' },
      ],
      background: 'white',
    };
    assert.equal(caption(scene), 'a red circle on the left and a blue square on the right, white background');
    assert.equal(caption({ objects: [{ shape: 'ring', colour: 'orange' }] }), 'an orange ring');
    assert.equal(caption({ objects: [{ shape: 'star', size: 'large' }] }), 'a large star');
  });

  test('single-object prompts cover every shape × colour, and every shape meets every size, position and background', () => {
    const check = (singles: EvalPrompt[], perCombo: number) => {
      const objects = singles.map((p) => ({ ...p.scene.objects[0], background: p.scene.background }));
      assert.ok(objects.every((o) => o.size && o.position && o.colour && o.background), 'every attribute stated');
      const combos = count(objects, (o) => `${o.shape} ${o.colour}`);
      assert.equal(combos.size, SHAPES.length * COLOURS.length);
      assert.ok([...combos.values()].every((n) => n === perCombo));
      for (const shape of SHAPES) {
        const mine = objects.filter((o) => o.shape === shape);
        assert.equal(new Set(mine.map((o) => o.size)).size, SIZES.length, `${shape}: sizes`);
        assert.equal(new Set(mine.map((o) => o.position)).size, POSITIONS.length, `${shape}: positions`);
        assert.equal(new Set(mine.map((o) => o.background)).size, BACKGROUNDS.length, `${shape}: backgrounds`);
      }
      for (const colour of COLOURS) {
        const mine = objects.filter((o) => o.colour === colour);
        assert.equal(new Set(mine.map((o) => o.background)).size, BACKGROUNDS.length, `${colour}: backgrounds`);
        assert.equal(new Set(mine.map((o) => o.size)).size, SIZES.length, `${colour}: sizes`);
      }
      return objects;
    };
    check(smallPromptSet().filter((p) => p.kind === 'single'), 1);
    const full = check(fullPromptSet().filter((p) => p.kind === 'single'), 3);
    // in the full set each shape × colour is drawn on every background
    for (const [combo, n] of count(full, (o) => `${o.shape} ${o.colour} ${o.background}`)) assert.equal(n, 1, combo);
    const sizes = count(full, (o) => o.size!);
    assert.deepEqual([sizes.get('small'), sizes.get('large')], [54, 54]);
  });

  test('two-object prompts pair different families at left and right, in every order, colour and background', () => {
    const check = (pairs: EvalPrompt[], perOrder: number) => {
      for (const p of pairs) {
        const [left, right] = p.scene.objects;
        assert.equal(p.scene.objects.length, 2);
        assert.deepEqual([left.position, right.position], ['left', 'right']);
        assert.notEqual(familyOf(left.shape), familyOf(right.shape), p.text);
        assert.notEqual(left.colour, right.colour, p.text);
        assert.ok(left.size && right.size && p.scene.background);
      }
      const orders = count(pairs, (p) => p.scene.objects.map((o) => familyOf(o.shape)).join('>'));
      assert.equal(orders.size, familyOrders().length);
      assert.ok([...orders.values()].every((n) => n === perOrder));
      for (const side of [0, 1]) {
        assert.equal(new Set(pairs.map((p) => p.scene.objects[side].shape)).size, SHAPES.length, `shapes on side ${side}`);
        assert.equal(new Set(pairs.map((p) => p.scene.objects[side].colour)).size, COLOURS.length, `colours on side ${side}`);
        assert.equal(new Set(pairs.map((p) => p.scene.objects[side].size)).size, SIZES.length, `sizes on side ${side}`);
      }
      assert.equal(new Set(pairs.map((p) => p.scene.background)).size, BACKGROUNDS.length);
    };
    const bySmall = smallPromptSet().filter((p) => p.kind === 'pair');
    check(bySmall, 4);
    check(fullPromptSet().filter((p) => p.kind === 'pair'), 6);
    // the small set holds each ordered family pair's four shape combinations
    assert.equal(new Set(bySmall.map((p) => p.scene.objects.map((o) => o.shape).join('+'))).size, familyOrders().length * 4);
  });
});

const SINGLE: Scene = { objects: [{ shape: 'star', colour: 'blue', size: 'large', position: 'top' }], background: 'gray' };
const PAIR: Scene = {
  objects: [
    { shape: 'circle', colour: 'red', size: 'small', position: 'left' },
    { shape: 'square', colour: 'blue', size: 'large', position: 'right' },
  ],
  background: 'white',
};
const singleRight = { background: 'gray', count: 'one', colour: 'blue', shape: 'star', size: 'large', position: 'top' };
const pairRight = {
  background: 'white',
  count: 'two',
  left_colour: 'red',
  left_shape: 'circle',
  left_size: 'small',
  right_colour: 'blue',
  right_shape: 'square',
  right_size: 'large',
};

describe('scoring', () => {
  test('single objects: each stated attribute from the whole-image heads; full match needs all and one object', () => {
    const right = scoreReading(SINGLE, singleRight);
    assert.equal(right.full, true);
    assert.deepEqual(right.correct, right.stated);
    assert.deepEqual(right.stated, { background: 1, colour: 1, shape: 1, size: 1, position: 1 });

    const wrongShape = scoreReading(SINGLE, { ...singleRight, shape: 'triangle' });
    assert.equal(wrongShape.full, false);
    assert.equal(wrongShape.correct.shape, 0);
    assert.equal(wrongShape.correct.colour, 1);

    const twoSeen = scoreReading(SINGLE, { ...singleRight, count: 'two' });
    assert.equal(twoSeen.countRight, false);
    assert.equal(twoSeen.full, false);

    // unstated attributes are neither counted nor needed
    const loose = scoreReading({ objects: [{ shape: 'star' }] }, { ...singleRight, colour: 'red', background: 'black' });
    assert.deepEqual(loose.stated, { background: 0, colour: 0, shape: 1, size: 0, position: 0 });
    assert.equal(loose.full, true);
  });

  test('pairs: read per half; position right only when both objects are in their stated halves', () => {
    const right = scoreReading(PAIR, pairRight);
    assert.equal(right.full, true);
    assert.deepEqual(right.stated, { background: 1, colour: 2, shape: 2, size: 2, position: 1 });

    const swapped = scoreReading(PAIR, {
      ...pairRight,
      left_colour: 'blue',
      left_shape: 'square',
      right_colour: 'red',
      right_shape: 'circle',
    });
    assert.equal(swapped.correct.position, 0);
    assert.equal(swapped.correct.colour, 0);
    assert.equal(swapped.full, false);

    const oneSeen = scoreReading(PAIR, { ...pairRight, count: 'one' });
    assert.equal(oneSeen.correct.position, 0, 'a pair seen as one object is not placed');
    assert.equal(oneSeen.correct.colour, 2);
    assert.equal(oneSeen.full, false);

    const wrongSize = scoreReading(PAIR, { ...pairRight, right_size: 'small' });
    assert.equal(wrongSize.correct.position, 1, 'size does not decide placement');
    assert.equal(wrongSize.correct.size, 1);
    assert.equal(wrongSize.full, false);

    // a caption listing the right object first is read the same way
    const reversed = scoreReading({ ...PAIR, objects: [PAIR.objects[1], PAIR.objects[0]] }, pairRight);
    assert.equal(reversed.full, true);

    // without stated positions, either order may fit
    const open: Scene = { objects: PAIR.objects.map(({ position: _p, ...o }) => o) };
    const openSwapped = scoreReading(open, { ...pairRight, left_colour: 'blue', left_shape: 'square', left_size: 'large', right_colour: 'red', right_shape: 'circle', right_size: 'small' });
    assert.equal(openSwapped.stated.position, 0);
    assert.equal(openSwapped.full, true);
  });

  test('summaries are ratios over stated values; nothing stated gives null', () => {
    const scores = [
      scoreReading(SINGLE, singleRight),
      scoreReading(SINGLE, { ...singleRight, colour: 'red' }),
      scoreReading({ objects: [{ shape: 'star', colour: 'blue' }] }, singleRight),
    ];
    const s = summarize(scores);
    assert.equal(s.n, 3);
    assert.equal(s.attributes.colour, 2 / 3);
    assert.equal(s.attributes.shape, 1);
    assert.equal(s.attributes.size, 1);
    assert.equal(s.attributes.background, 1);
    assert.equal(s.full, 2 / 3);
    assert.equal(summarize([]).full, null);
    assert.equal(summarize([scoreReading({ objects: [{ shape: 'ring' }] }, singleRight)]).attributes.colour, null);
  });

  test('routing: the family expert’s mean weight in its object’s half', () => {
    // 4 × 2 latent maps, experts in another order than the families
    const maps: ContributionMaps = {
      experts: ['spikes', 'curves', 'blocks'],
      width: 4,
      height: 2,
      weights: [
        Float32Array.from([0, 0, 0, 0, 0, 0, 0, 0]),
        Float32Array.from([0.9, 0.7, 0.2, 0.2, 0.8, 0.6, 0.1, 0.1]),
        Float32Array.from([0.1, 0.3, 0.8, 0.8, 0.2, 0.4, 0.9, 0.9]),
      ],
      shares: [0, 0.45, 0.55],
    };
    const [left, right] = routingShares(PAIR, maps)!;
    assert.ok(Math.abs(left - 0.75) < 1e-6, `left ${left}`);
    assert.ok(Math.abs(right - 0.85) < 1e-6, `right ${right}`);
    const sameFamily: Scene = { objects: [PAIR.objects[0], { ...PAIR.objects[1], shape: 'ring' }] };
    assert.equal(routingShares(sameFamily, maps), null);
    assert.equal(routingShares(PAIR, { ...maps, experts: ['alpha', 'beta', 'gamma'] }), null);
    assert.equal(routingShares(SINGLE, maps), null);
  });
});

describe('Fréchet distance', () => {
  const a = [[0, 0, 1], [1, 2, 0], [2, 1, 1], [0, 1, 3], [1, 0, 0]];
  const b = [[1, 1, 1], [2, 0, 1], [0, 2, 2], [3, 1, 0]];

  test('matches trainer/demo/classifier.py frechet_distance on a fixed example', () => {
    // python3 -c "from trainer.demo.classifier import frechet_distance; print(frechet_distance(a, b))"
    const expected = 1.5660013403429138;
    assert.ok(Math.abs(frechetDistance(featureStats(a), featureStats(b)) - expected) < 1e-9);
    assert.ok(Math.abs(frechetDistance(featureStats(b), featureStats(a)) - expected) < 1e-9);
    assert.ok(Math.abs(frechetDistance(featureStats(a), featureStats(a))) < 1e-9);
  });

  test('diagonal covariances: |Δμ|² + Σ (√σa − √σb)²', () => {
    const stats = (mean: number[], variances: number[]) => ({
      n: 10,
      dim: mean.length,
      mean: Float64Array.from(mean),
      cov: Float64Array.from(variances.flatMap((v, i) => variances.map((_, j) => (i === j ? v : 0)))),
    });
    const fd = frechetDistance(stats([1, 2, 3], [4, 1, 9]), stats([0, 2, 5], [1, 1, 4]));
    assert.ok(Math.abs(fd - (1 + 0 + 4 + 1 + 0 + 1)) < 1e-9, `got ${fd}`);
  });

  test('Jacobi eigenvalues and the PSD square root', () => {
    const { values } = symmetricEigen(Float64Array.from([2, 1, 1, 2]), 2);
    assert.deepEqual([...values].sort().map((x) => Math.round(x * 1e9) / 1e9), [1, 3]);
    const m = featureStats(Array.from({ length: 30 }, (_, i) => [Math.sin(i), Math.cos(3 * i), Math.sin(i) + 0.5 * Math.cos(7 * i), i % 4]));
    const root = sqrtPsd(m.cov, 4);
    for (let i = 0; i < 4; i++) {
      for (let j = 0; j < 4; j++) {
        let s = 0;
        for (let k = 0; k < 4; k++) s += root[i * 4 + k] * root[k * 4 + j];
        assert.ok(Math.abs(s - m.cov[i * 4 + j]) < 1e-9);
      }
    }
  });

  test('reference files: covariance from base64 float32, nearest floor, probe images', () => {
    const cov = Float32Array.from([2, 0.5, 0.5, 1]);
    const probe = Uint8Array.from({ length: 2 * 2 * 3 }, (_, i) => i * 10);
    const json = {
      format: 'shapes-classifier-reference-features',
      classifier: { weights: 'float16', feature_dim: 2 },
      sets: { single: { n: 100, mean: [1, -1], cov_f32: Buffer.from(cov.buffer).toString('base64') } },
      floor: { single: { n: [6, 36, 108], frechet: [3, 1, 0.5] } },
      probe: {
        count: 1,
        width: 2,
        height: 2,
        images_rgb_base64: Buffer.from(probe).toString('base64'),
        features: [[0.1, 0.2]],
        scenes: [SINGLE],
      },
    };
    const ref = parseReference(json);
    assert.deepEqual([...ref.sets.single!.cov], [2, 0.5, 0.5, 1]);
    assert.equal(ref.sets.pair, undefined);
    assert.deepEqual(floorAt(ref, 'single', 40), { n: 36, frechet: 1 });
    assert.deepEqual(floorAt(ref, 'single', 1000), { n: 108, frechet: 0.5 });
    assert.equal(floorAt(ref, 'pair', 40), null);
    assert.deepEqual([...ref.probe!.images[0].data], [...probe]);
    assert.deepEqual(ref.probe!.scenes, [SINGLE]);
    assert.throws(() => parseReference({ format: 'other' }), /not a reference feature file/);
  });
});

describe('classifier input and output', () => {
  test('RGB bytes become channels-first floats in [0, 1]; heads read by arg-max', () => {
    const image: RgbImage = { width: 2, height: 1, data: Uint8Array.from([255, 0, 51, 0, 102, 255]) };
    const out = new Float32Array(1 + 6);
    toClassifierInput(image, out, 1);
    assert.deepEqual([...out].map((x) => Math.round(x * 100) / 100), [0, 1, 0, 0, 0.4, 0.2, 1]);
    assert.equal(argmax(Float32Array.from([5, 1, 9, 3, 2]), 1, 3), 1);
    const meta = parseClassifierMeta({
      input: { name: 'image', shape: [null, 3, 64, 64] },
      heads: { background: ['white'], count: ['one', 'two'], colour: ['red'], shape: ['circle'], size: ['small'], position: ['left'] },
      features: { name: 'features', dim: 8 },
    });
    assert.equal(meta.size, 64);
    assert.throws(() => parseClassifierMeta({ input: { shape: [null, 3, 64, 32] }, heads: {} }), /input.shape/);
  });
});

function summary(label: string, mode: string, single: number | null, pair: number | null, extra: Partial<ModeSummary> = {}): ModeSummary {
  const adherence = (full: number | null) => ({
    n: 10,
    attributes: { background: 1, colour: 0.9, shape: full, size: 0.8, position: 0.7 },
    count: 1,
    full,
  });
  // the classifier's colour head reads more colours right than the strict reading (0.9)
  const lenient = (full: number | null) => ({ ...adherence(full === null ? null : full + 0.1), attributes: { ...adherence(full).attributes, colour: 0.97 } });
  return {
    key: label,
    label,
    mode,
    single: adherence(single),
    pair: adherence(pair),
    classifierSingle: lenient(single),
    classifierPair: lenient(pair),
    offColour: { objects: 30, mixed: 0, unclear: 1, none: 0 },
    frechet: { single: 1.5, pair: null },
    seconds: 3,
    ...extra,
  };
}

const SUMMARIES: ModeSummary[] = [
  summary('Curves alone', 'single', 0.6, 0.2, { expert: 'curves', ownFamily: { family: 'curves', shape: 0.9, n: 12 } }),
  summary('Blocks alone', 'single', 0.65, 0.25, { expert: 'blocks', ownFamily: { family: 'blocks', shape: 0.8, n: 12 } }),
  summary('Average of 2', 'average', 0.5, 0.3),
  summary('Merge of 2', 'merge', 0.4, 0.1),
  summary('Fuse of 2', 'fuse', 0.45, 0.2, {
    routing: { mean: 0.4, n: 8, atLeastTarget: 0.25, byFamily: { curves: { mean: 0.45, n: 4 }, blocks: { mean: 0.35, n: 4 } } },
  }),
  summary('AFA trio', 'afa', 0.72, 0.5, {
    offColour: { objects: 30, mixed: 2, unclear: 1, none: 0 },
    routing: { mean: 0.55, n: 8, atLeastTarget: 0.5, byFamily: { curves: { mean: 0.6, n: 4 }, blocks: { mean: 0.5, n: 4 } } },
  }),
];

describe('targets and report', () => {
  test('targets: pass or miss, and by how much', () => {
    const targets = evaluateTargets(SUMMARIES);
    const find = (text: string) => targets.find((t) => t.target.includes(text))!;
    assert.deepEqual([find('single-object full match ≥ 85%').pass, Math.round(find('single-object full match ≥ 85%').margin! * 10) / 10], [false, -13]);
    assert.deepEqual([find('two-object full match ≥ 80%').pass, Math.round(find('two-object full match ≥ 80%').margin! * 10) / 10], [false, -30]);
    assert.equal(find('Curves alone').pass, true);
    assert.deepEqual([find('Blocks alone').pass, Math.round(find('Blocks alone').margin!)], [false, -5]);
    const best = find('best single expert');
    assert.equal(best.pass, false);
    assert.ok(Math.abs(best.margin! - (72 - 65 - 10)) < 1e-9);
    assert.match(best.measured, /Blocks alone 65\.0%/);
    assert.ok(Math.abs(find('≥ average + 25').margin! + 5) < 1e-9);
    assert.ok(Math.abs(find('≥ merge + 25').margin! - 15) < 1e-9);
    assert.ok(Math.abs(find('≥ fuse + 25').margin! - 5) < 1e-9);
    assert.match(find('≥ fuse + 25').measured, /AFA 50\.0% vs fuse 20\.0%/);
    const mixed = find('mixed');
    assert.deepEqual([mixed.pass, mixed.margin, mixed.measured], [false, -2, '2 of 30 objects']);
    assert.equal(evaluateTargets(SUMMARIES.map((s) => ({ ...s, offColour: { ...s.offColour, mixed: 0 } }))).find((t) => t.target.includes('mixed'))!.pass, true);
    const routing = find('routing');
    assert.equal(routing.unit, 'weight');
    assert.ok(Math.abs(routing.margin! + 0.05) < 1e-9);
    // without an AFA row nothing about AFA can be claimed
    const noAfa = evaluateTargets(SUMMARIES.filter((s) => s.mode !== 'afa'));
    assert.ok(noAfa.filter((t) => t.target.includes('AFA')).every((t) => t.pass === null));
  });

  test('the report holds the tables, targets, figures and a kept analysis', () => {
    const input: ReportInput = {
      packageLabel: 'demo@1.0.0',
      date: '2026-01-01 00:00:00 UTC',
      command: 'npm run eval',
      promptSet: { name: 'full', single: 108, pair: 36 },
      generation: { steps: 20, guidance: 5, scheduler: 'ddim', width: 64, height: 64 },
      machine: { cpu: 'Test CPU', cores: 2, node: '20', threads: 1, jobs: 2, provider: 'cpu' },
      totalSeconds: 600,
      summaries: SUMMARIES,
      targets: evaluateTargets(SUMMARIES),
      reference: { status: 'missing', file: '../models/demo/eval/reference_features.json' },
      classifierAccuracy: { shape: 0.99, min: 0.9 },
      notes: ['merge left out: test'],
      figures: {
        panel: { file: 'results/contributions.png', prompt: 'a red circle on the left and a blue square on the right', shares: 'Curves 50%' },
        grid: { file: 'results/compare.png', prompts: ['a red circle'], modes: ['Curves alone', 'AFA trio'] },
      },
      perPromptFile: 'results/per-prompt.json',
    };
    const md = renderReport(input);
    assert.match(md, /Package \*\*demo@1\.0\.0\*\*, evaluated 2026-01-01/);
    assert.match(md, /`npm run eval`/);
    assert.match(md, /\| AFA trio \| 100\.0 \| 90\.0 \| 72\.0 \| 80\.0 \| 70\.0 \| \*\*72\.0\*\* \| 1\.50 \|/);
    assert.deepEqual([formatDistance(1234.567), formatDistance(12.345), formatDistance(null)], ['1235', '12.35', '–']);
    assert.match(md, /\| AFA trio \| 100\.0 \| 90\.0 \| 50\.0 \| 80\.0 \| 70\.0 \| 100\.0 \| \*\*50\.0\*\* \| – \|/);
    assert.match(md, /AFA single-object full match ≥ 85% \| 72\.0% \| \*\*miss\*\* \(by 13\.0 points\)/);
    assert.match(md, /≥ merge \+ 25 points \| AFA 50\.0% vs merge 10\.0% \| pass \(by 15\.0 points\)/);
    assert.match(md, /none reads "mixed".*\| 2 of 30 objects \| \*\*miss\*\* \(by 2 objects\)/);
    // the strict reading next to the classifier's colour head
    assert.match(md, /### Colour read by the classifier and read strictly/);
    assert.match(md, /\| AFA trio \| 97\.0 \| 90\.0 \| 82\.0 \| \*\*72\.0\*\* \| 97\.0 \| 90\.0 \| 60\.0 \| \*\*50\.0\*\* \| 2 \/ 1 of 30 \|/);
    assert.match(md, /### Routing of Fuse of 2[\s\S]*mean \*\*0\.400\*\*[\s\S]*### Routing of AFA trio[\s\S]*mean \*\*0\.550\*\* over 8 objects \(target ≥ 0\.6\)/);
    assert.match(md, /\*\*miss\*\* \(by 0\.050\)/);
    assert.match(md, /!\[contribution panel\]\(results\/contributions\.png\)/);
    assert.match(md, /!\[compare grid\]\(results\/compare\.png\)/);
    assert.match(md, /reference_features\.json` is missing/);
    assert.match(md, /\| curves \| 4 \| 0\.600 \|/);
    assert.equal(extractAnalysis(md), null);

    const analysis = 'Routing misses because the aggregator saw few pairs.';
    const edited = md.replace(/(<!-- analysis:start[^>]*-->)[\s\S]*?(<!-- analysis:end -->)/, `$1\n${analysis}\n$2`);
    assert.equal(extractAnalysis(edited), analysis);
    const again = renderReport({ ...input, analysis: extractAnalysis(edited) });
    assert.ok(again.includes(`${ANALYSIS_START}\n\n${analysis}\n\n${ANALYSIS_END}`));
  });
});

describe('runner on the tiny fixture', () => {
  let engine: Engine;
  let info: PackageInfo;
  before(async () => {
    engine = await Engine.load(TINY);
    info = engine.info();
  });
  after(async () => engine.dispose());

  test('modes: each expert alone, average, merge, fuse and AFA over the ensemble’s experts', () => {
    const afaOnly = { ...info, ensembles: info.ensembles.filter((e) => e.method === 'afa') };
    const { modes, notes } = evalModes(afaOnly);
    assert.deepEqual(modes.map((m) => m.key), ['single:alpha', 'single:beta', 'average', 'merge', 'afa:duo']);
    assert.deepEqual(notes.length, 1);
    assert.match(notes[0], /fuse left out: .*--add-to PKG --method fuse --experts alpha,beta/);
    // a fuse ensemble over the same experts gets the row before AFA's, even when listed first
    const duo = afaOnly.ensembles[0];
    const withFuse = { ...afaOnly, ensembles: [{ ...duo, id: 'blend', method: 'fuse' as const }, { ...duo, id: 'half', method: 'fuse' as const, experts: ['alpha'] }, duo] };
    for (const chosen of [undefined, 'duo', 'blend']) {
      const rows = evalModes(withFuse, chosen);
      assert.deepEqual(rows.modes.map((m) => m.key), ['single:alpha', 'single:beta', 'average', 'merge', 'fuse:blend', 'afa:duo'], String(chosen));
      assert.deepEqual(rows.notes, []);
      assert.deepEqual(rows.modes[4].request, { mode: 'fuse', ensemble: 'blend', contributions: true });
      assert.equal(rows.modes[4].label, 'Fuse of 2');
    }
    const different = { ...info, architectures: { alpha: 'a', beta: 'b' } };
    assert.ok(!evalModes(different).modes.some((m) => m.key === 'merge'));
    assert.match(evalModes(different).notes[0], /merge left out/);
    const bare = evalModes({ ...info, ensembles: [] });
    assert.ok(!bare.modes.some((m) => m.request.mode === 'afa'));
    assert.ok(bare.modes.some((m) => m.key === 'single:odd'));
    assert.throws(() => evalModes(info, 'nope'), /no ensemble "nope"/);
  });

  test('generates every prompt in order (two at a time), reads it back and keeps the asked images', async () => {
    const prompts = quickPromptSet().filter((_, i) => i % 3 === 0);
    const seen: RgbImage[] = [];
    const reader: ImageReader = {
      meta: { size: 32 },
      async classify(images: RgbImage[]): Promise<Reading[]> {
        seen.push(...images);
        return images.map(() => ({ labels: { ...singleRight }, features: Float32Array.from([1, 2]) }));
      },
    };
    const afa = evalModes(info).modes.find((m) => m.request.mode === 'afa')!;
    const keepId = prompts[1].id;
    const result = await runMode(engine, reader, afa, prompts, { steps: 2, concurrency: 2, keepImages: new Set([keepId]) });
    assert.equal(result.outcomes.length, prompts.length);
    assert.deepEqual(result.outcomes.map((o) => o.promptId), prompts.map((p) => p.id));
    assert.deepEqual([...result.kept.keys()], [keepId]);
    const direct = await engine.generate({ ...afa.request, prompt: prompts[1].text, seed: prompts[1].seed, steps: 2, width: 32, height: 32 });
    assert.deepEqual(result.kept.get(keepId)!.image.data, direct.images[0].image.data);
    assert.deepEqual(seen[1].data, direct.images[0].image.data);
    assert.equal(result.kept.get(keepId)!.contributions?.experts.length, 2);
    assert.ok(result.outcomes.every((o) => o.shares?.length === 2));
    // the fixture's experts are not named after families: no routing to measure
    assert.ok(result.outcomes.every((o) => o.routing === undefined || o.routing === null));
  });
});

const SMOKE_CANDIDATES = [process.env.EVAL_SMOKE_PACKAGE, '/tmp/demo-smoke/package', path.join(REPO_ROOT, 'trainer/runs/demo-smoke/package')];
const SMOKE = SMOKE_CANDIDATES.find((dir): dir is string => !!dir && existsSync(path.join(dir, 'eval', 'classifier.onnx')));

describe('npm run eval on a smoke package', { skip: SMOKE ? false : 'no smoke package (python3 -m trainer.build_demo --smoke)' }, () => {
  test('--quick writes the report, the figures and the per-prompt readings', { timeout: 240_000 }, async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'eval-'));
    try {
      const out = path.join(dir, 'results.md');
      await writeFile(out, `old\n${ANALYSIS_START}\nKept words.\n${ANALYSIS_END}\n`);
      const { stdout, stderr } = await run(
        process.execPath,
        ['--import', 'tsx', 'src/eval/main.ts', '--quick', '--model-dir', SMOKE!, '--out', out, '--steps', '2'],
        { cwd: REPO_ROOT, timeout: 230_000 },
      );
      // six rows, or seven when the smoke package has a fuse ensemble (built after issue 18)
      const modes = Number(stderr.match(/8 prompts \(quick set\) × (\d) modes/)?.[1]);
      assert.ok(modes === 6 || modes === 7, stderr);
      assert.match(stdout, /results\.md/);
      const md = await readFile(out, 'utf8');
      for (const row of ['Curves alone', 'Blocks alone', 'Spikes alone', 'Average of 3', 'Merge of 3', ...(modes === 7 ? ['Fuse of 3'] : []), 'AFA trio']) {
        assert.equal(md.split('\n').filter((l) => l.startsWith(`| ${row} |`)).length >= 2, true, row);
      }
      assert.match(md, /Quick subset/);
      assert.match(md, /--quick --model-dir/);
      assert.equal(extractAnalysis(md), 'Kept words.');
      for (const png of ['contributions.png', 'compare.png']) assert.ok((await stat(path.join(dir, 'results', png))).size > 1000);
      const perPrompt = JSON.parse(await readFile(path.join(dir, 'results', 'per-prompt.json'), 'utf8'));
      assert.equal(perPrompt.modes.length, modes);
      assert.ok(perPrompt.modes.every((m: { outcomes: unknown[] }) => m.outcomes.length === 8));
      const afa = perPrompt.modes.find((m: { key: string }) => m.key === 'afa:trio');
      assert.equal(afa.outcomes.filter((o: { routing?: number[] }) => o.routing?.length === 2).length, 2);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
