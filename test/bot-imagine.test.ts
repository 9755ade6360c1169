// End to end through the real discord.js client and the fake Discord: /imagine, progress, results.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { EngineClient, GenerateCallOptions, GenerateRequest, GenerateResult, PackageInfo, ProgressEvent } from '../src/engine/api.ts';
import { BotHarness, createTestEngine, embedField, PNG_SIGNATURE, pngParameters } from './support/bot-harness.ts';

/**
 * Runs the generation at full speed underneath but passes its progress events on only as the test
 * releases them (then returns the result), so what the bot shows at each step does not depend on
 * how fast anything runs. While not `holding`, it passes everything on at once.
 */
class SteppedEngine implements EngineClient {
  holding = false;
  private allowed = 0;
  private wake: (() => void) | undefined;
  constructor(readonly base: EngineClient) {}

  /** Lets `n` more progress events through. */
  release(n: number): void {
    this.allowed += n;
    this.wake?.();
  }

  info(): Promise<PackageInfo> {
    return this.base.info();
  }

  async generate(request: GenerateRequest, options: GenerateCallOptions = {}): Promise<GenerateResult> {
    const events: ProgressEvent[] = [];
    const result = await this.base.generate(request, { signal: options.signal, onProgress: (event) => events.push(event) });
    for (const event of events) {
      if (this.holding) {
        while (this.allowed === 0) await new Promise<void>((resolve) => (this.wake = resolve));
        this.allowed--;
      }
      options.onProgress?.(event);
    }
    return result;
  }

  dispose(): Promise<void> {
    this.release(Infinity);
    return this.base.dispose();
  }
}

let h: BotHarness;
let stepped: SteppedEngine;

before(async () => {
  h = await BotHarness.start({ env: { PROGRESS_INTERVAL_MS: '250' }, engine: async () => (stepped = new SteppedEngine(await createTestEngine())) });
});
after(async () => {
  await h.close();
});

test('/imagine is deferred at once, shows its queue position and progress, and ends with a PNG that carries its parameters', async () => {
  const alice = h.fake.user('alice');
  const ensemble = h.info.ensembles[0];
  stepped.holding = true;
  const interaction = h.imagine(alice, { prompt: 'a red circle on a blue sky', model: ensemble.id, seed: 4242, steps: 24, guidance: 6.5 });
  const shown = (pattern: RegExp, what: string) =>
    interaction.waitFor((i) => i.original?.history.find((state) => pattern.test(state.content)), 10_000, what);
  try {
    // The status goes out before any progress exists.
    await shown(/starting/, 'the starting status');
    // Step 1 alone: it gets an edit of its own.
    stepped.release(1);
    await shown(/step 1\/24/, 'step 1 shown');
    // Steps 2 to 4 at once: coalesced into one edit with the newest step and its preview (steps 4, 8, … carry one).
    stepped.release(3);
    const withPreview = await shown(/step 4\/24/, 'step 4 shown');
    assert.ok(withPreview.attachments.some((name) => name.endsWith('-preview.png')), 'progress shows a preview image');
  } finally {
    // The last 20 steps at once, then the result: at most one more progress edit, not one per step.
    stepped.holding = false;
    stepped.release(Infinity);
  }
  const message = await h.result(interaction);

  // (the 3 s window itself is proven by order in bot-resilience's burst test, not by a clock)
  assert.equal(interaction.acks[0].type, 5, 'first response is a deferred reply');
  const texts = message.history.map((state) => state.content);
  assert.ok(texts.findIndex((t) => /starting/.test(t)) < texts.findIndex((t) => /step \d+\/24/.test(t)), `status shown before progress: ${texts.join(' | ')}`);
  const progress = texts.filter((t) => /step \d+\/24/.test(t)).map((t) => Number(/step (\d+)\/24/.exec(t)![1]));
  assert.deepEqual(progress.slice(0, 2), [1, 4], `one edit for step 1, one for steps 2-4: ${progress.join(', ')}`);
  assert.ok(progress.length <= 3, `the last 20 steps at once gave at most one edit: ${progress.join(', ')}`);
  assert.ok(progress.every((step, i) => i === 0 || step > progress[i - 1]), 'never an older or the same step again');

  const png = message.attachments.find((a) => a.filename.endsWith('.png'));
  assert.ok(png, 'a PNG is attached');
  assert.deepEqual(png.data.subarray(0, 8), PNG_SIGNATURE);
  const params = pngParameters(png.data);
  assert.equal(params.prompt, 'a red circle on a blue sky');
  assert.equal(params.seed, 4242);
  assert.equal(params.steps, 24);
  assert.equal(params.guidance, 6.5);
  assert.equal(params.mode, 'afa');
  assert.equal(params.ensemble, ensemble.id);

  assert.equal(embedField(message, 'Seed'), '4242');
  assert.equal(embedField(message, 'Steps'), '24');
  assert.equal(embedField(message, 'Guidance'), '6.5');
  assert.ok(embedField(message, 'Scheduler'));
  assert.ok(embedField(message, 'Models')?.includes(ensemble.title));
  assert.ok(embedField(message, 'Time')?.endsWith('s'));
  assert.equal((message.embeds[0].image as { url: string }).url, `attachment://${png.filename}`);
  const buttons = h.fake.buttonsOf(message).map((b) => b.label);
  // The fixture has a VAE encoder: image-to-image buttons too (test/bot-img2img.test.ts).
  assert.deepEqual(buttons, ['Reroll', 'Contributions', 'Compare', 'Delete', 'Vary (Subtle)', 'Vary (Strong)', 'Upscale ×2']);

  const job = await h.job(message.id);
  assert.equal(job?.status, 'done');
  assert.equal(job?.request.seed, 4242);
  assert.equal(job?.resultMessageId, message.id);
  assert.ok(job?.startedAt && job.finishedAt && job.finishedAt >= job.startedAt);
});

test('count 3 gives one grid; contributions:true attaches the contribution panel too', async () => {
  const bob = h.fake.user('bob');
  const grid = h.imagine(bob, { prompt: 'three squares', count: 3, seed: 10 });
  const gridMessage = await h.result(grid);
  assert.deepEqual(gridMessage.attachments.map((a) => a.filename.endsWith('-grid.png')), [true]);
  assert.equal(embedField(gridMessage, 'Seed'), '10, 11, 12');
  assert.equal(pngParameters(gridMessage.attachments[0].data).seed, 10);

  const panel = h.imagine(bob, { prompt: 'a ring', contributions: true, seed: 7 });
  const panelMessage = await h.result(panel);
  const names = panelMessage.attachments.map((a) => a.filename);
  assert.equal(names.length, 2);
  assert.ok(names[1].includes('contributions'));
});

test('autocomplete answers model suggestions from memory', async () => {
  const carol = h.fake.user('carol');
  const all = h.fake.autocomplete('imagine', { prompt: 'x', model: '' }, 'model', { user: carol });
  const choices = await all.waitFor((i) => i.choices);
  const values = choices.map((c) => c.value);
  for (const e of h.info.ensembles) assert.ok(values.includes(e.id));
  for (const e of h.info.experts) assert.ok(values.includes(e.id));
  assert.ok(choices.length <= 25);
  // Autocomplete answers come from memory (they cannot be deferred); the test asserts what they offer.

  const [first, second] = h.info.experts;
  const combo = h.fake.autocomplete('imagine', { prompt: 'x', model: `${first.id}+` }, 'model', { user: carol });
  const comboChoices = await combo.waitFor((i) => i.choices);
  assert.ok(comboChoices.some((c) => c.value === `${first.id}+${second.id}`));
  assert.ok(comboChoices.every((c) => String(c.value).startsWith(`${first.id}+`)));
});
