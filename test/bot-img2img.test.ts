// Image-to-image in the bot, end to end against the fake Discord: /imagine image:<attachment>, the
// 🎨 Vary and ⬆️ Upscale buttons (also after a restart), and attachments refused with a reason.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { deflateSync } from 'node:zlib';
import sharp from 'sharp';
import { crc32 } from '../src/engine/render/index.ts';
import type { FakeInteraction, FakeMessage } from '../src/testing/fake-discord.ts';
import { BotHarness, createTestEngine, isResult, pngParameters } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

let h: BotHarness;
let engine: GatedEngine;

before(async () => {
  h = await BotHarness.start({ engine: async () => (engine = new GatedEngine(await createTestEngine(), { open: true })) });
});
after(async () => {
  await h.close();
});

function button(message: FakeMessage, label: string): string {
  const found = h.fake.buttonsOf(message).find((b) => b.label === label);
  assert.ok(found, `button ${label} (has ${h.fake.buttonsOf(message).map((b) => b.label).join(', ')})`);
  return found.customId;
}

/** The ephemeral answer of a refused interaction (a reply, or a follow-up after a defer). */
async function refusal(interaction: FakeInteraction): Promise<string> {
  return interaction.waitFor(
    (i) => {
      const direct = i.acks.find((a) => a.type === 4)?.data?.content;
      if (typeof direct === 'string') return direct;
      const followup = i.followupIds.map((id) => h.fake.messages.get(id)).find((m) => m !== undefined);
      return followup?.content;
    },
    10_000,
    `refusal of ${interaction.id}`,
  );
}

async function png(width: number, height: number, colour = { r: 200, g: 30, b: 30 }): Promise<Buffer> {
  return sharp({ create: { width, height, channels: 3, background: colour } }).png().toBuffer();
}

test('the package can draw from an image, so results have Vary and Upscale buttons', async () => {
  assert.equal(h.info.img2img, true);
  const owner = h.fake.user('vera');
  const message = await h.result(h.imagine(owner, { prompt: 'a red circle', seed: 7 }));
  const labels = h.fake.buttonsOf(message).map((b) => b.label);
  for (const label of ['Vary (Subtle)', 'Vary (Strong)', 'Upscale ×2']) assert.ok(labels.includes(label), label);
  assert.ok(message.components.length <= 5);
  for (const b of h.fake.buttonsOf(message)) assert.ok(b.customId.length <= 100);
});

test('🎨 Vary (Subtle) and (Strong): a new job from the result image, new seed, same models and size', async () => {
  const owner = h.fake.user('vic');
  const model = h.info.ensembles[0].id;
  const message = await h.result(h.imagine(owner, { prompt: 'a blue square', seed: 11, model }));
  const parent = await h.job(message.id);
  const stored = h.bot.store.getImage(parent.id, 'result', 0);
  assert.ok(stored, 'the result image is kept with the job');

  for (const [label, strength] of [['Vary (Subtle)', 0.35], ['Vary (Strong)', 0.65]] as const) {
    const before = engine.requests.length;
    const varied = await h.result(h.fake.pressButton(message.id, button(message, label), { user: owner }));
    const request = engine.requests[before];
    assert.equal(request.strength, strength);
    assert.equal(request.ensemble, model);
    assert.equal(request.mode, parent.request.mode);
    assert.equal(request.prompt, 'a blue square');
    assert.notEqual(request.seed, 11);
    assert.equal(request.count, 1);
    assert.ok(request.initImage, 'the engine gets an init image');
    assert.equal(request.initImage.width, h.info.defaults.width);
    assert.equal(request.initImage.height, h.info.defaults.height);
    // The init image is the stored result, pixel for pixel.
    const pixels: Buffer = await sharp(stored).removeAlpha().raw().toBuffer();
    assert.deepEqual(Buffer.from(request.initImage.data), pixels);
    const job = await h.job(varied.id);
    assert.equal(job.kind, 'vary');
    assert.equal(job.parentJobId, parent.id);
    assert.match(varied.content, /Variation/);
    assert.ok(h.fake.buttonsOf(varied).some((b) => b.label === 'Upscale ×2'), 'the variation has its own buttons');
    assert.equal(pngParameters(varied.attachments[0].data).prompt, 'a blue square');
  }
});

test('⬆️ Upscale ×2 draws again at twice the size from the upscaled result; at the largest size it says so', async () => {
  const owner = h.fake.user('uma');
  const message = await h.result(h.imagine(owner, { prompt: 'a green ring', seed: 21 }));
  const before = engine.requests.length;
  const upscaled = await h.result(h.fake.pressButton(message.id, button(message, 'Upscale ×2'), { user: owner }));
  const request = engine.requests[before];
  const { width, height } = h.info.defaults;
  assert.equal(request.width, Math.min(2 * width, h.info.size.max));
  assert.equal(request.height, Math.min(2 * height, h.info.size.max));
  assert.equal(request.strength, 0.5);
  assert.equal(request.seed, 21);
  assert.equal(request.initImage?.width, request.width);
  assert.equal(request.initImage?.height, request.height);
  const job = await h.job(upscaled.id);
  assert.equal(job.kind, 'upscale');
  assert.equal(job.result?.params.width, request.width);
  assert.match(upscaled.content, /Upscaled/);

  // The tiny package draws at most 64×64: upscaling the 64×64 result is refused with a reason.
  assert.equal(request.width, h.info.size.max);
  const again = h.fake.pressButton(upscaled.id, button(upscaled, 'Upscale ×2'), { user: owner });
  assert.match(await refusal(again), /already as large/);
  assert.equal(engine.requests.length, before + 1);
});

test('a grid has numbered Vary and Upscale buttons, one per image', async () => {
  const owner = h.fake.user('gus');
  const message = await h.result(h.imagine(owner, { prompt: 'two dots', seed: 31, count: 2 }));
  const labels = h.fake.buttonsOf(message).map((b) => b.label);
  for (const label of ['S1', 'S2', 'V1', 'V2', 'U1', 'U2']) assert.ok(labels.includes(label), label);
  const parent = await h.job(message.id);
  const before = engine.requests.length;
  await h.result(h.fake.pressButton(message.id, button(message, 'U2'), { user: owner }));
  const request = engine.requests[before];
  assert.equal(request.seed, 32, 'the second image (seed + 1)');
  const second = await sharp(h.bot.store.getImage(parent.id, 'result', 1)!)
    .resize(request.width, request.height, { kernel: 'lanczos3' })
    .removeAlpha()
    .raw()
    .toBuffer();
  assert.deepEqual(Buffer.from(request.initImage!.data), second);
});

test('/imagine image: downloads the attachment, fits it to the size and keeps it with the job', async () => {
  const owner = h.fake.user('ivy');
  const picture = await png(90, 60);
  const id = h.fake.attach(picture, { filename: 'photo.png', contentType: 'image/png', width: 90, height: 60 });
  const before = engine.requests.length;
  const message = await h.result(h.imagine(owner, { prompt: 'the same, in blue', seed: 5, image: id, strength: 0.6 }));
  assert.deepEqual(h.fake.attachmentDownloads.filter((d) => d === id), [id]);
  const request = engine.requests[before];
  assert.equal(request.strength, 0.6);
  assert.equal(request.initImage?.width, h.info.defaults.width);
  const red = request.initImage!.data;
  assert.ok(red[0] > 150 && red[1] < 80, 'the init image is the attachment (red)');
  const job = await h.job(message.id);
  assert.ok(h.bot.store.getImage(job.id, 'init'), 'the fitted picture is stored with the job');
  assert.equal(job.request.initImage, undefined, 'not in the request JSON');
  assert.equal(pngParameters(message.attachments[0].data).seed, 5);

  // 🔁 on an image-to-image result starts from the same picture.
  const rerolled = await h.result(h.fake.pressButton(message.id, button(message, 'Reroll'), { user: owner }));
  const rerun = engine.requests.at(-1)!;
  assert.equal(rerun.strength, 0.6);
  assert.deepEqual(rerun.initImage?.data, request.initImage?.data);
  assert.ok(isResult(rerolled));
});

test('attachments refused: too big before any download, not an image, too many pixels, strength without image', async () => {
  const owner = h.fake.user('rex');
  const downloads = () => h.fake.attachmentDownloads.length;

  const bigId = h.fake.attach(await png(8, 8), { filename: 'big.png', contentType: 'image/png', size: 11 * 1024 * 1024 });
  const start = downloads();
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: bigId })), /too big/);
  assert.equal(downloads(), start, 'nothing was downloaded');

  const wideId = h.fake.attach(await png(8, 8), { filename: 'wide.png', contentType: 'image/png', width: 5000, height: 100 });
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: wideId })), /too large/);
  const textId = h.fake.attach(Buffer.from('hello'), { filename: 'notes.txt', contentType: 'text/plain' });
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: textId })), /PNG, JPEG or WebP/);
  assert.equal(downloads(), start, 'nothing was downloaded');

  // Named like a picture, but is not one: downloaded, then refused.
  const fakeId = h.fake.attach(Buffer.from('not really a png at all'), { filename: 'fake.png', contentType: 'image/png' });
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: fakeId })), /not a PNG, JPEG or WebP/);

  // A download longer than Discord announced is cut off and refused.
  const longId = h.fake.attach(await png(32, 32), { filename: 'long.png', contentType: 'image/png', size: 20 });
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: longId })), /longer than Discord announced/);

  // A PNG whose header says 10000×10000 (Discord announces no size): refused from the header by sharp.
  const hugeId = h.fake.attach(pngHeaderOnly(10_000, 10_000), { filename: 'huge.png', contentType: 'image/png' });
  assert.match(await refusal(h.imagine(owner, { prompt: 'x', image: hugeId })), /too many pixels/);

  assert.match(await refusal(h.imagine(owner, { prompt: 'x', strength: 0.5 })), /attach one/);
  assert.equal(h.bot.store.recentOfUser(owner.id).length, 0, 'no job was created');
});

/** A PNG signature, an IHDR for width × height (8-bit RGB), one tiny IDAT and IEND: a few dozen bytes. */
function pngHeaderOnly(width: number, height: number): Buffer {
  const chunk = (type: string, data: Buffer) => {
    const length = Buffer.alloc(4);
    length.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body) >>> 0);
    return Buffer.concat([length, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8;
  ihdr[9] = 2;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.alloc(16))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}
