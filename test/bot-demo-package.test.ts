// The bot's newer features end to end on the package users get by default (models/demo), not only on
// the tiny fixture: /settings defaults, size:, image:, and the Vary / Upscale buttons through the real
// discord.js client against the fake Discord, with the demo's real graphs on an engine thread.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { startEngineThread } from '../src/engine-host/engine-thread.ts';
import type { FakeMessage } from '../src/testing/fake-discord.ts';
import { BotHarness, embedField, pngParameters } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

const DEMO = fileURLToPath(new URL('../models/demo', import.meta.url));
let h: BotHarness;
let engine: GatedEngine;

before(async () => {
  h = await BotHarness.start({ engine: async () => (engine = new GatedEngine(await startEngineThread({ modelDir: DEMO }), { open: true })) });
});
after(async () => {
  await h.close();
});

function button(message: FakeMessage, label: string): string {
  const found = h.fake.buttonsOf(message).find((b) => b.label === label);
  assert.ok(found, `button ${label} (has ${h.fake.buttonsOf(message).map((b) => b.label).join(', ')})`);
  return found.customId;
}

/** The drawn size, from the PNG's parameters (the attachment itself may be enlarged for display). */
const sizeOf = (message: FakeMessage) => {
  const { width, height } = pngParameters(message.attachments[0].data);
  return { width, height };
};

test('on the demo package: /settings defaults, size:, Vary and Upscale', { timeout: 180_000 }, async () => {
  assert.equal(h.info.name, 'demo');
  assert.equal(h.info.img2img, true, 'the demo package ships a VAE encoder');
  const user = h.fake.user('demo-user');

  const saved = h.fake.slash('settings', { steps: 6, size: 'landscape' }, { user });
  await saved.waitFor((i) => i.acks.length > 0 || i.followupIds.length > 0, 10_000, 'settings saved');

  const message = await h.result(h.imagine(user, { prompt: 'a red circle on the left, white background', seed: 3 }));
  const first = engine.requests.at(-1)!;
  assert.equal(first.steps, 6, '/settings steps applied');
  assert.ok(first.width! > first.height!, 'landscape from /settings');
  const drawn = sizeOf(message);
  assert.deepEqual([drawn.width, drawn.height], [first.width, first.height]);

  const varied = await h.result(h.fake.pressButton(message.id, button(message, 'Vary (Subtle)'), { user }));
  const vary = engine.requests.at(-1)!;
  assert.equal(vary.strength, 0.35);
  assert.deepEqual([vary.initImage?.width, vary.initImage?.height], [first.width, first.height]);
  assert.equal(pngParameters(varied.attachments[0].data).prompt, 'a red circle on the left, white background');

  const upscaled = await h.result(h.fake.pressButton(message.id, button(message, 'Upscale ×2'), { user }));
  const up = engine.requests.at(-1)!;
  assert.ok(up.width! > first.width! && up.width! <= h.info.size.max, `upscaled within size.max (${up.width})`);
  const big = sizeOf(upscaled);
  assert.deepEqual([big.width, big.height], [up.width, up.height]);
});

test('on the demo package: /imagine image: draws from an attachment', { timeout: 180_000 }, async () => {
  const user = h.fake.user('demo-artist');
  const picture = await sharp({ create: { width: 80, height: 80, channels: 3, background: { r: 255, g: 255, b: 255 } } })
    .composite([{ input: await sharp({ create: { width: 30, height: 30, channels: 3, background: { r: 220, g: 20, b: 20 } } }).png().toBuffer(), left: 10, top: 25 }])
    .png()
    .toBuffer();
  const id = h.fake.attach(picture, { filename: 'sketch.png', contentType: 'image/png', width: 80, height: 80 });
  const message = await h.result(h.imagine(user, { prompt: 'a red square on the left, white background', seed: 9, image: id, strength: 0.5 }));
  const request = engine.requests.at(-1)!;
  assert.equal(request.strength, 0.5);
  assert.deepEqual([request.initImage?.width, request.initImage?.height], [h.info.defaults.width, h.info.defaults.height]);
  assert.equal(pngParameters(message.attachments[0].data).prompt, 'a red square on the left, white background');
});

test('on the demo package: /imagine mode:Fuse runs the training-free fuse ensemble of its three experts, with 🧩 and 🔍', { timeout: 180_000 }, async () => {
  const fuse = h.info.ensembles.find((e) => e.method === 'fuse');
  assert.ok(fuse, `the demo ships a fuse ensemble (ensembles: ${h.info.ensembles.map((e) => `${e.id} ${e.method}`).join(', ')})`);
  assert.deepEqual(fuse.experts, ['curves', 'blocks', 'spikes']);
  const user = h.fake.user('demo-fuser');
  const prompt = 'a red circle on the left and a blue square on the right, white background';
  // The first fuse job also opens the fuse graph's session: more than the default 20 s on a busy machine.
  const message = await h.result(h.imagine(user, { prompt, mode: 'fuse', seed: 5, steps: 6, contributions: true }), 60_000);
  const request = engine.requests.at(-1)!;
  assert.deepEqual([request.mode, request.ensemble, request.contributions], ['fuse', fuse.id, true]);
  const params = pngParameters(message.attachments[0].data);
  assert.deepEqual([params.mode, params.ensemble], ['fuse', fuse.id]);
  assert.ok(message.attachments[1]?.filename.includes('contributions'), 'the contribution panel is attached');
  assert.match(embedField(message, 'Models') ?? '', new RegExp(`^${fuse.title.replace(/[()]/g, '\\$&')}: Curves \\+ Blocks \\+ Spikes`));

  const compare = await h.result(h.fake.pressButton(message.id, button(message, 'Compare'), { user }), 60_000);
  const labels = String(compare.embeds[0].description);
  for (const title of ['Curves', 'Blocks', 'Spikes', fuse.title]) assert.ok(labels.includes(title), `compare shows ${title}: ${labels}`);
  assert.deepEqual(engine.requests.slice(-4).map((r) => r.mode), ['single', 'single', 'single', 'fuse']);
});
