import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { TorchGenerator, normaliseSeed, randn } from '../src/engine/random.ts';

interface RandnCase {
  seed: number;
  shape: number[];
  first: number[];
  last: number[];
  sum: number;
  sumsq: number;
}

const golden: { cases: RandnCase[] } = JSON.parse(
  readFileSync(new URL('fixtures/golden/torch_randn_golden.json', import.meta.url), 'utf8'),
);

function assertClose(actual: ArrayLike<number>, expected: number[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(Math.abs(actual[i] - expected[i]) <= 1e-6, `${what}[${i}]: ${actual[i]} vs ${expected[i]}`);
  }
}

test('golden file has the expected variety of cases', () => {
  assert.ok(golden.cases.length >= 5);
  assert.ok(golden.cases.some((c) => c.shape.reduce((a, b) => a * b, 1) < 16), 'a small (scalar path) case');
  assert.ok(golden.cases.some((c) => c.seed >= 2 ** 32 - 1), 'a large seed');
});

for (const c of golden.cases) {
  test(`torch.randn(${JSON.stringify(c.shape)}) with seed ${c.seed} matches torch`, () => {
    const values = randn(c.shape, c.seed);
    const count = c.shape.reduce((a, b) => a * b, 1);
    assert.equal(values.length, count);
    assertClose(values.subarray(0, c.first.length), c.first, 'first');
    assertClose(values.subarray(count - c.last.length), c.last, 'last');
    let sum = 0;
    let sumsq = 0;
    for (const v of values) {
      sum += v;
      sumsq += v * v;
    }
    assert.ok(Math.abs(sum - c.sum) <= 1e-6 * count, `sum ${sum} vs ${c.sum}`);
    assert.ok(Math.abs(sumsq - c.sumsq) <= 1e-6 * count, `sumsq ${sumsq} vs ${c.sumsq}`);
  });
}

test('a seed is taken modulo 2^64 and only its low 32 bits seed the engine, as in torch', () => {
  assert.equal(normaliseSeed(-1), 2n ** 64n - 1n);
  assert.equal(normaliseSeed(2n ** 64n + 3n), 3n);
  assert.deepEqual(randn([40], 5), randn([40], 2 ** 32 + 5));
  assert.deepEqual(randn([40], -1), randn([40], 2n ** 64n - 1n));
  assert.notDeepEqual(randn([40], 5), randn([40], 6));
  // Values torch 1.13 gives for torch.randn(4, generator=torch.Generator().manual_seed(2**64 - 1)).
  assertClose(randn([4], 2n ** 64n - 1n), [1.2197630405426025, -0.3929794728755951, 1.0230751037597656, -0.3734211325645447], 'u64 max');
  assert.throws(() => randn([4], 2 ** 60), /bigint/);
  assert.throws(() => randn([4], 1.5), /integer/);
});

test('draws continue across calls the way torch consumes its generator', () => {
  // Whole blocks of 16 use the same uniforms whether drawn at once or in pieces.
  const whole = new TorchGenerator(99).randn(64);
  const pieces = new TorchGenerator(99);
  const joined = [...pieces.randn(32), ...pieces.randn(32)];
  assert.deepEqual(joined, [...whole]);

  // The scalar path caches the second Box-Muller value in the generator, across calls.
  const three = new TorchGenerator(7).randn(3);
  const single = new TorchGenerator(7);
  assert.deepEqual([...single.randn(1), ...single.randn(1), ...single.randn(1)], [...three]);

  // A partial last block redraws the final 16 elements, so 20 values consume 36 uniforms.
  const g = new TorchGenerator(3);
  g.randn(20);
  const reference = new TorchGenerator(3);
  for (let i = 0; i < 36; i++) reference.nextUint32();
  assert.equal(g.nextUint32(), reference.nextUint32());
});

test('the noise looks standard normal', () => {
  const values = randn([4, 64, 64], 2024);
  let mean = 0;
  for (const v of values) mean += v / values.length;
  let variance = 0;
  for (const v of values) variance += (v - mean) ** 2 / values.length;
  assert.ok(Math.abs(mean) < 0.03, `mean ${mean}`);
  assert.ok(Math.abs(variance - 1) < 0.05, `variance ${variance}`);
  assert.equal(randn([0], 1).length, 0);
  assert.throws(() => randn([2, -1], 1), /dimension/);
});
