// End to end through the real discord.js client and the fake Discord: /imagine, progress, results.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { BotHarness, createTestEngine, embedField, PNG_SIGNATURE, pngParameters } from './support/bot-harness.ts';
import { SlowMotionEngine } from './support/engine-wrappers.ts';

let h: BotHarness;

before(async () => {
  // 24 steps take about a second whatever the engine's speed, so several progress edits are due.
  h = await BotHarness.start({ env: { PROGRESS_INTERVAL_MS: '250' }, engine: async () => new SlowMotionEngine(await createTestEngine(), 40) });
});
after(async () => {
  await h.close();
});

test('/imagine is deferred at once, shows its queue position and progress, and ends with a PNG that carries its parameters', async () => {
  const alice = h.fake.user('alice');
  const ensemble = h.info.ensembles[0];
  const interaction = h.imagine(alice, { prompt: 'a red circle on a blue sky', model: ensemble.id, seed: 4242, steps: 24, guidance: 6.5 });
  const message = await h.result(interaction);

  assert.equal(interaction.acks[0].type, 5, 'first response is a deferred reply');
  assert.ok(interaction.ackLatencyMs! < 3000);
  const texts = message.history.map((state) => state.content);
  assert.ok(texts.some((t) => /Queued|Drawing/.test(t)), `status shown before the result: ${texts.join(' | ')}`);
  const progress = texts.filter((t) => /step \d+\/24/.test(t));
  assert.ok(progress.length >= 2, `several progress edits: ${progress.length}`);
  assert.ok(
    message.history.some((state) => /step/.test(state.content) && state.attachments.some((name) => name.endsWith('-preview.png'))),
    'progress shows a preview image',
  );
  // Edits are throttled: consecutive progress edits are at least ~the interval apart.
  const progressTimes = message.history.filter((s) => /step \d+\/24/.test(s.content)).map((s) => s.at);
  for (let i = 1; i < progressTimes.length; i++) assert.ok(progressTimes[i] - progressTimes[i - 1] >= 200);
  assert.ok(progressTimes.length < 24, 'not one edit per step');

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
  assert.deepEqual(buttons, ['Reroll', 'Contributions', 'Compare', 'Delete']);

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
  assert.ok(all.ackLatencyMs! < 3000);

  const [first, second] = h.info.experts;
  const combo = h.fake.autocomplete('imagine', { prompt: 'x', model: `${first.id}+` }, 'model', { user: carol });
  const comboChoices = await combo.waitFor((i) => i.choices);
  assert.ok(comboChoices.some((c) => c.value === `${first.id}+${second.id}`));
  assert.ok(comboChoices.every((c) => String(c.value).startsWith(`${first.id}+`)));
});
