// The /imagine size option: shapes mapped to sizes the package allows, end to end to the engine.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { PackageInfo } from '../src/engine/api.ts';
import { describeSize, SIZE_CHOICES, sizeFor } from '../src/bot/image-size.ts';
import { buildImagineRequest } from '../src/bot/imagine-request.ts';
import { BotHarness, createTestEngine, embedField, pngParameters } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

type SizeInfo = Pick<PackageInfo, 'defaults' | 'size'>;

function sizeInfo(width: number, height: number, min: number, max: number, multiple: number): SizeInfo {
  return { defaults: { steps: 20, guidance: 5, scheduler: 'ddim', width, height }, size: { min, max, multiple } };
}

const PACKAGES: SizeInfo[] = [
  sizeInfo(32, 32, 16, 64, 4), // the test fixture
  sizeInfo(64, 64, 32, 128, 8), // the demo
  sizeInfo(512, 512, 256, 1024, 8), // SD 1.5
  sizeInfo(1024, 1024, 512, 2048, 8), // SDXL
  sizeInfo(768, 512, 256, 1024, 8), // a landscape default
];

test('every shape maps to allowed sides near the default pixel count, with the right orientation', () => {
  for (const info of PACKAGES) {
    const pixels = info.defaults.width * info.defaults.height;
    for (const choice of SIZE_CHOICES) {
      const { width, height } = sizeFor(choice.value, info);
      const what = `${choice.value} for ${info.defaults.width}×${info.defaults.height}: ${width}×${height}`;
      for (const side of [width, height]) {
        assert.equal(side % info.size.multiple, 0, what);
        assert.ok(side >= info.size.min && side <= info.size.max, what);
      }
      const [rw, rh] = choice.ratio;
      assert.ok(Math.abs(Math.log(width / height / (rw / rh))) < 0.1, `${what}: aspect`);
      assert.ok(Math.abs(Math.log((width * height) / pixels)) < 0.25, `${what}: pixel count`);
      assert.equal(Math.sign(width - height), Math.sign(rw - rh), `${what}: orientation`);
    }
  }
  assert.deepEqual(sizeFor('square', PACKAGES[2]), { width: 512, height: 512 }, 'a square default stays as it is');
  assert.deepEqual(sizeFor('portrait', PACKAGES[2]), { width: 416, height: 624 });
  assert.deepEqual(sizeFor('wide', PACKAGES[3]), { width: 1368, height: 768 });
});

test('a package that allows one size gets it for every shape; the size is described with its shape', () => {
  const fixed = sizeInfo(64, 64, 64, 64, 8);
  for (const choice of SIZE_CHOICES) assert.deepEqual(sizeFor(choice.value, fixed), { width: 64, height: 64 });
  const info = PACKAGES[2];
  assert.equal(describeSize(416, 624, info), '416×624 (Portrait 2:3)');
  assert.equal(describeSize(512, 512, info), '512×512 (Square 1:1)');
  assert.equal(describeSize(520, 512, info), '520×512');
});

test('request building puts the mapped size in the request; no size leaves the package default', () => {
  const info = { ...PACKAGES[1], name: 'p', version: '1', description: '', experts: [{ id: 'a', title: 'A', description: '' }], ensembles: [], executionProvider: 'cpu' } as PackageInfo;
  const built = buildImagineRequest({ prompt: 'x', size: 'landscape' }, info, { blockedWords: [] });
  assert.ok(built.ok);
  assert.equal(built.request.width, 72);
  assert.equal(built.request.height, 48);
  const plain = buildImagineRequest({ prompt: 'x' }, info, { blockedWords: [] });
  assert.ok(plain.ok);
  assert.equal(plain.request.width, undefined);
  assert.equal(plain.request.height, undefined);
  const bad = buildImagineRequest({ prompt: 'x', size: 'huge' }, info, { blockedWords: [] });
  assert.equal(bad.ok, false);
  assert.match(bad.ok ? '' : bad.message, /Unknown size "huge"/);
});

let h: BotHarness;
let engine: GatedEngine;

before(async () => {
  h = await BotHarness.start({ engine: async () => (engine = new GatedEngine(await createTestEngine(), { open: true })) });
});
after(async () => {
  await h.close();
});

test('/imagine size:portrait reaches the engine with the mapped size; the result shows it', async () => {
  const user = h.fake.user('sizer');
  const expected = sizeFor('portrait', h.info);
  assert.ok(expected.height > expected.width);
  const before = engine.requests.length;
  const message = await h.result(h.imagine(user, { prompt: 'a tall red bar', size: 'portrait', model: h.info.experts[0].id, seed: 7 }));
  const request = engine.requests[before];
  assert.equal(request.width, expected.width);
  assert.equal(request.height, expected.height);
  assert.equal(embedField(message, 'Size'), `${expected.width}×${expected.height} (Portrait 2:3)`);
  const params = pngParameters(message.attachments[0].data);
  assert.equal(params.width, expected.width);
  assert.equal(params.height, expected.height);
  const job = await h.job(message.id);
  assert.equal(job.request.width, expected.width);
  assert.equal(job.request.height, expected.height);
});

test('/imagine size:wide on an ensemble: 🔍 Compare renders every part at the same size', async () => {
  const user = h.fake.user('wider');
  const expected = sizeFor('wide', h.info);
  const message = await h.result(h.imagine(user, { prompt: 'a wide blue stripe', size: 'wide', model: h.info.ensembles[0].id, seed: 8 }));
  const before = engine.requests.length;
  const compareId = h.fake.buttonsOf(message).find((b) => b.label === 'Compare')!.customId;
  await h.result(h.fake.pressButton(message.id, compareId, { user }));
  const compared = engine.requests.slice(before);
  assert.ok(compared.length >= 2);
  for (const request of compared) assert.deepEqual([request.width, request.height], [expected.width, expected.height]);
});
