// The engine's images equal the trainer's PyTorch reference sampler's (test/fixtures/tiny/reference).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { GenerateRequest } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { maxAbsDiff, TINY } from './helpers/fixture.ts';

interface ReferenceCase {
  name: string;
  request: GenerateRequest & { negative: string };
  images: { seed: number; file: string; width: number; height: number; contributions?: { file: string; experts: string[]; dims: number[] } }[];
}

const referenceDir = path.join(TINY, 'reference');
const cases = (JSON.parse(readFileSync(path.join(referenceDir, 'cases.json'), 'utf8')) as { cases: ReferenceCase[] }).cases;
const f32 = (file: string) => {
  const b = readFileSync(path.join(referenceDir, file));
  return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
};

describe('parity with the PyTorch reference sampler', () => {
  let engine: Engine;
  before(async () => {
    engine = await Engine.load(TINY);
  });
  after(async () => engine.dispose());

  test('the reference covers single and afa', () => {
    assert.ok(cases.some((c) => c.request.mode === 'single'));
    assert.ok(cases.some((c) => c.request.mode === 'afa'));
  });

  for (const c of cases) {
    test(c.name, async () => {
      const result = await engine.generate(c.request);
      assert.equal(result.images.length, c.images.length);
      c.images.forEach((ref, i) => {
        const got = result.images[i];
        assert.equal(got.seed, ref.seed);
        assert.equal(got.image.width, ref.width);
        assert.equal(got.image.height, ref.height);
        const expected = readFileSync(path.join(referenceDir, ref.file));
        const diff = maxAbsDiff(got.image.data, expected);
        assert.ok(diff <= 2, `${c.name} image ${i}: max abs difference ${diff}/255 > 2/255`);
        if (ref.contributions) {
          const maps = got.contributions;
          assert.ok(maps, 'contribution maps were asked for');
          const [, h, w] = ref.contributions.dims;
          const gold = f32(ref.contributions.file);
          ref.contributions.experts.forEach((id, k) => {
            const goldMap = gold.subarray(k * h * w, (k + 1) * h * w);
            const idx = maps.experts.indexOf(id);
            const mine = idx >= 0 ? maps.weights[idx] : new Float32Array(h * w);
            assert.ok(maxAbsDiff(mine, goldMap) < 1e-3, `${c.name}: contribution map of ${id} differs`);
          });
        }
      });
    });
  }
});
