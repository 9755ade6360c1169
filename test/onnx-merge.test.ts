// The streaming weight-space merge (src/engine/merge/): every storage layout of the tiny experts
// (inline raw_data, typed fields, external data in one file, per tensor, or only the larger tensors;
// float32 and float16) merges to the same weights, the merged graph runs in onnxruntime-node, and
// bad inputs get one-line errors.
import assert from 'node:assert/strict';
import { copyFile, cp, mkdir, mkdtemp, readFile, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { float32ToFloat16, floatFromHalfBits, halfBitsFromFloat } from '../src/engine/float16.ts';
import { float32ToHalfBits } from '../src/engine/merge/half.ts';
import { readLayout } from '../src/engine/merge/layout.ts';
import { mergeGraphs, type MergeInput } from '../src/engine/merge/stream-merge.ts';
import { maxAbsDiff } from './helpers/fixture.ts';
import { EXTERNAL, floatWeights, GRAPHS, input, runUnet } from './helpers/merge.ts';

const scratch = await mkdtemp(path.join(os.tmpdir(), 'merge-'));
after(() => rm(scratch, { recursive: true, force: true }));

let n = 0;
async function merge(inputs: MergeInput[], weights: number[]): Promise<string> {
  const dir = path.join(scratch, `m${n++}`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir);
  return mergeGraphs(inputs, weights, dir);
}

async function rejectsWith(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof EngineError, `expected an EngineError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    assert.ok(!err.message.includes('\n'), `one line: ${err.message}`);
    return true;
  });
}

const dataOf = (model: string) => readFile(path.join(path.dirname(model), 'model.onnx_data'));

describe('merging float32 experts', () => {
  test('Σ wᵢ θᵢ: every float weight is the weighted sum, rounded to float32 once', async () => {
    const merged = floatWeights(await merge([input('alpha'), input('beta')], [1, 3]));
    const a = floatWeights(GRAPHS.alpha);
    const b = floatWeights(GRAPHS.beta);
    assert.ok(a.size > 10);
    assert.deepEqual([...merged.keys()], [...a.keys()]);
    for (const [name, { values }] of merged) {
      const expected = Float32Array.from(a.get(name)!.values, (x, i) => 0.25 * x + 0.75 * b.get(name)!.values[i]);
      assert.deepEqual(Float32Array.from(values), expected, name);
    }
  });

  test('external data (one file, per tensor, only large tensors) and typed fields give the bytes of the inline merge', async () => {
    const reference = await merge([input('alpha'), input('beta')], [0.3, 0.7]);
    const referenceData = await dataOf(reference);
    for (const pair of [
      [input('alphaSingle'), input('betaPerTensor')],
      [input('alphaSome'), input('beta')], // mixed: some tensors external, the other graph inline
      [input('alpha'), input('betaPerTensor')], // mixed: inline with external
    ]) {
      const model = await merge(pair, [0.3, 0.7]);
      assert.ok((await dataOf(model)).equals(referenceData), `${pair.map((p) => p.label).join(' + ')}: weights differ`);
    }
  });

  test('the merged graph keeps its weights outside the protobuf and runs in onnxruntime-node', async () => {
    const model = await merge([input('alphaSingle'), input('betaPerTensor')], [0.5, 0.5]);
    assert.deepEqual((await readdir(path.dirname(model))).sort(), ['model.onnx', 'model.onnx_data']);
    const layout = readLayout(model);
    const external = layout.initializers.filter((t) => t.storage.kind === 'bytes' && t.storage.file !== model);
    assert.ok(external.length > 0);
    for (const t of external) {
      assert.equal(t.storage.kind === 'bytes' && path.basename(t.storage.file), 'model.onnx_data');
      assert.ok(t.count * t.elementBytes >= 1024, 'small tensors stay inline');
    }
    const inlineModel = await merge([input('alpha'), input('beta')], [0.5, 0.5]);
    const out = await runUnet(model);
    assert.deepEqual(out, await runUnet(inlineModel));
    assert.ok(maxAbsDiff(out, await runUnet(GRAPHS.alpha)) > 1e-3, 'an even merge is not alpha');
  });

  test('weights 1, 0 give the first graph exactly', async () => {
    const model = await merge([input('alphaSingle'), input('beta')], [1, 0]);
    assert.deepEqual(await runUnet(model), await runUnet(GRAPHS.alpha));
  });
});

describe('merging float16 experts', () => {
  test('float16 stays float16: external raw bytes and int32_data fields, rounded once from the float sum', async () => {
    const model = await merge([input('alphaFp16Single'), input('betaFp16Fields')], [0.5, 0.5]);
    const merged = floatWeights(model);
    const a = floatWeights(GRAPHS.alpha);
    const b = floatWeights(GRAPHS.beta);
    const half = (v: Float64Array) => Float64Array.from(float32ToFloat16(Float32Array.from(v)), floatFromHalfBits);
    let halves = 0;
    for (const [name, { dataType, values }] of merged) {
      const [x, y] = [a.get(name)!.values, b.get(name)!.values];
      if (dataType === 10) {
        halves++;
        // the fp16 exports hold float16(θ); the merge sums them in float and rounds once
        const [hx, hy] = [half(x), half(y)];
        assert.deepEqual(values, half(hx.map((v, i) => 0.5 * v + 0.5 * hy[i])), name);
      } else {
        assert.deepEqual(Float32Array.from(values), Float32Array.from(x, (v, i) => 0.5 * v + 0.5 * y[i]), name);
      }
    }
    assert.ok(halves > 10, `${halves} float16 weights`);
    const out = await runUnet(model);
    const fp32 = await runUnet(await merge([input('alpha'), input('beta')], [0.5, 0.5]));
    assert.ok(maxAbsDiff(out, fp32) < 0.05, `within float16 rounding: ${maxAbsDiff(out, fp32)}`);
  });
});

test('the fast float16 rounding gives the bits of halfBitsFromFloat (ties, subnormals, overflow, NaN)', () => {
  const special = [0, -0, 1, -1, 65504, 65519.99, 65520, 65536, -70000, Infinity, -Infinity, NaN, 2 ** -14, 2 ** -15, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 1e-8, -6e-5];
  // every tie between neighbouring float16 values of several binades, and values around them
  const ties: number[] = [];
  for (let h = 0x0001; h < 0x7bff; h += 97) {
    const mid = (floatFromHalfBits(h) + floatFromHalfBits(h + 1)) / 2;
    ties.push(mid, Math.fround(mid * (1 + 2 ** -23)), Math.fround(mid * (1 - 2 ** -23)), -mid);
  }
  const random = Array.from({ length: 20000 }, (_, i) => Math.sin(i * 12.9898) * 10 ** ((i % 14) - 9));
  const values = Float32Array.from([...special, ...ties, ...random]);
  const fast = new Uint16Array(values.length);
  float32ToHalfBits(values, values.length, fast);
  const slow = Uint16Array.from(values, (v) => halfBitsFromFloat(v));
  for (let i = 0; i < values.length; i++) assert.equal(fast[i], slow[i], `value ${values[i]}`);
});

describe('refusals', () => {
  test('different architectures: one line naming the first differing weight', async () => {
    await rejectsWith(
      merge([input('alpha'), input('odd')], [1, 1]),
      'bad_request',
      /^Cannot merge expert "alpha" with expert "odd": the graphs have different structures \(weight ".+" (is float32 \[.*\] vs float32 \[.*\]|is missing from the second)\)\. Use mode "average" instead\.$/,
    );
  });

  test('float32 vs float16 storage of the same U-Net is named', async () => {
    await rejectsWith(merge([input('alpha'), input('betaFp16Fields')], [1, 1]), 'bad_request', /weight ".+" is float32 \[.+\] vs float16 \[.+\]/);
  });

  test('a truncated external data file is named', async () => {
    const dir = path.join(scratch, 'truncated');
    await cp(path.join(EXTERNAL, 'alpha-single'), dir, { recursive: true });
    const data = path.join(dir, 'model.onnx_data');
    await truncate(data, (await readFile(data)).length - 100);
    await rejectsWith(
      merge([{ label: 'expert "cut"', file: path.join(dir, 'model.onnx') }, input('beta')], [1, 1]),
      'bad_package',
      /^Cannot read expert "cut" as an ONNX model: weight ".+" needs bytes \d+–\d+ of model\.onnx_data, which has only \d+ \(truncated\?\)\.$/,
    );
  });

  test('a missing external data file and a truncated graph are named', async () => {
    const dir = path.join(scratch, 'missing');
    await cp(path.join(EXTERNAL, 'alpha-single'), dir, { recursive: true });
    await rm(path.join(dir, 'model.onnx_data'));
    await rejectsWith(
      merge([{ label: 'expert "gone"', file: path.join(dir, 'model.onnx') }, input('beta')], [1, 1]),
      'bad_package',
      /expert "gone".*stored in model\.onnx_data, which is missing/,
    );
    const cut = path.join(scratch, 'cut.onnx');
    await copyFile(GRAPHS.beta, cut);
    await truncate(cut, 100_000);
    await rejectsWith(merge([input('alpha'), { label: 'expert "half"', file: cut }], [1, 1]), 'bad_package', /Cannot read expert "half" as an ONNX model: .*truncated/);
    await rejectsWith(merge([input('alpha'), { label: 'expert "none"', file: path.join(scratch, 'nope.onnx') }], [1, 1]), 'bad_package', /Missing graph: .*nope\.onnx/);
  });

  test('external data pointing out of the graph folder is refused', async () => {
    const dir = path.join(scratch, 'escape');
    await cp(path.join(EXTERNAL, 'alpha-single'), dir, { recursive: true });
    const model = path.join(dir, 'model.onnx');
    const bytes = await readFile(model);
    const from = Buffer.from('model.onnx_data');
    const to = Buffer.from('../a/model.onnx'); // same length: the protobuf stays valid
    const patched = Buffer.from(bytes);
    for (let i = patched.indexOf(from); i >= 0; i = patched.indexOf(from, i + 1)) to.copy(patched, i);
    await writeFile(model, patched);
    await rejectsWith(
      merge([{ label: 'expert "escape"', file: model }, input('beta')], [1, 1]),
      'bad_package',
      /expert "escape".*outside the graph's folder \(\.\.\/a\/model\.onnx\)/,
    );
  });

  test('bad weights', async () => {
    await rejectsWith(merge([input('alpha'), input('beta')], [0, 0]), 'bad_request', /not all zero/);
    await rejectsWith(merge([input('alpha')], [1]), 'bad_request', /at least two/);
  });
});
