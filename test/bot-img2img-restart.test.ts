// Image-to-image across a restart (the pictures are in SQLite, not in memory or on Discord), and a
// package without a VAE encoder (no Vary/Upscale buttons, /imagine image: refused before a download).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import type { EngineClient, PackageInfo } from '../src/engine/api.ts';
import { buttonId } from '../src/bot/custom-ids.ts';
import { NO_ENCODER_MESSAGE } from '../src/bot/init-image.ts';
import type { FakeInteraction } from '../src/testing/fake-discord.ts';
import { BotHarness, createTestEngine, isResult } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

function refusal(interaction: FakeInteraction): Promise<string> {
  return interaction.waitFor((i) => {
    const content = i.acks.find((a) => a.type === 4)?.data?.content;
    return typeof content === 'string' ? content : undefined;
  }, 10_000, 'refusal');
}

test('Vary and Upscale work on results from before a restart; a queued /imagine image: job runs after it from its stored picture', async () => {
  let gated!: GatedEngine;
  const h = await BotHarness.start({
    env: { QUEUE_CONCURRENCY: '1' },
    engine: async () => (gated = new GatedEngine(await createTestEngine(), { open: true })),
  });
  try {
    const owner = h.fake.user('rita');
    const message = await h.result(h.imagine(owner, { prompt: 'a yellow star', seed: 41 }));
    const parent = await h.job(message.id);
    const stored = h.bot.store.getImage(parent.id, 'result', 0)!;

    // A job from an attachment waits behind a held one when the bot stops.
    gated.close();
    const blocker = h.imagine(h.fake.user('blocker'), { prompt: 'holds the queue', seed: 1 });
    await h.fake.waitFor(() => gated.waiting === 1, 5000, 'the blocker holds the engine');
    const picture = await sharp({ create: { width: 40, height: 40, channels: 3, background: { r: 10, g: 200, b: 10 } } }).png().toBuffer();
    const attachment = h.fake.attach(picture, { filename: 'green.png', contentType: 'image/png' });
    const fromImage = h.imagine(owner, { prompt: 'greener', seed: 42, image: attachment, strength: 0.7 });
    await fromImage.waitFor((i) => /Queued/.test(i.original?.content ?? ''), 5000, 'queued image job');

    let second!: GatedEngine;
    await h.restart({ engine: async () => (second = new GatedEngine(await createTestEngine(), { open: true })) });
    const [, queued] = await Promise.all([h.result(blocker), h.result(fromImage)]);
    const rerun = second.requests.find((r) => r.prompt === 'greener')!;
    assert.equal(rerun.strength, 0.7);
    assert.ok(rerun.initImage, 'the init image came from the store');
    assert.ok(rerun.initImage.data[1] > 150 && rerun.initImage.data[0] < 80, 'the green attachment');
    assert.ok(isResult(queued));

    // The result from before the restart: Vary and Upscale start from its stored picture.
    const vary = h.fake.buttonsOf(message).find((b) => b.label === 'Vary (Subtle)')!;
    const varied = await h.result(h.fake.pressButton(message.id, vary.customId, { user: owner }));
    const varyRequest = second.requests.at(-1)!;
    assert.equal(varyRequest.strength, 0.35);
    assert.deepEqual(Buffer.from(varyRequest.initImage!.data), await sharp(stored).removeAlpha().raw().toBuffer());
    assert.ok(h.fake.buttonsOf(varied).some((b) => b.label === 'Vary (Strong)'));

    const upscale = h.fake.buttonsOf(message).find((b) => b.label === 'Upscale ×2')!;
    const upscaled = await h.result(h.fake.pressButton(message.id, upscale.customId, { user: owner }));
    const upRequest = second.requests.at(-1)!;
    assert.equal(upRequest.width, 2 * h.info.defaults.width);
    assert.equal(upRequest.strength, 0.5);
    assert.equal((await h.job(upscaled.id)).kind, 'upscale');
  } finally {
    await h.close();
  }
});

class NoEncoderEngine implements EngineClient {
  constructor(private readonly base: EngineClient) {}
  async info(): Promise<PackageInfo> {
    return { ...(await this.base.info()), img2img: false };
  }
  generate: EngineClient['generate'] = (request, options) => this.base.generate(request, options);
  dispose(): Promise<void> {
    return this.base.dispose();
  }
}

test('a package without a VAE encoder: no Vary/Upscale buttons, and /imagine image: is refused without a download', async () => {
  const h = await BotHarness.start({ engine: async () => new NoEncoderEngine(await createTestEngine()) });
  try {
    const owner = h.fake.user('nora');
    const message = await h.result(h.imagine(owner, { prompt: 'a plain square', seed: 3 }));
    const labels = h.fake.buttonsOf(message).map((b) => b.label);
    assert.deepEqual(labels, ['Reroll', 'Contributions', 'Compare', 'Delete']);

    const attachment = h.fake.attach(Buffer.from('irrelevant'), { filename: 'a.png', contentType: 'image/png' });
    assert.equal(await refusal(h.imagine(owner, { prompt: 'x', image: attachment })), NO_ENCODER_MESSAGE);
    assert.deepEqual(h.fake.attachmentDownloads, []);

    // An old Vary button (from when the package had an encoder) says why it cannot.
    const job = await h.job(message.id);
    assert.equal(await refusal(h.fake.pressButton(message.id, buttonId('subtle', job.id), { user: owner })), NO_ENCODER_MESSAGE);
  } finally {
    await h.close();
  }
});
