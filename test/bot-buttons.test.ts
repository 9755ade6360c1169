// Buttons (🔁 🧩 🔍 🗑️) and the 🔁 reaction on result messages, end to end.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { PERMISSIONS } from '../src/testing/fake-discord.ts';
import { BotHarness, embedField, isResult, pngParameters } from './support/bot-harness.ts';

let h: BotHarness;

before(async () => {
  h = await BotHarness.start();
});
after(async () => {
  await h.close();
});

async function firstResult(prompt: string, options: Record<string, string | number | boolean> = {}) {
  const owner = h.fake.user(`owner-${Math.random().toString(36).slice(2, 7)}`);
  const interaction = h.imagine(owner, { prompt, seed: 1000, ...options });
  const message = await h.result(interaction);
  return { owner, interaction, message };
}

function button(message: Parameters<typeof h.fake.buttonsOf>[0], label: string): string {
  const found = h.fake.buttonsOf(message).find((b) => b.label === label);
  assert.ok(found, `button ${label}`);
  return found.customId;
}

test('🔁 Reroll posts a new result with the same request and a new seed', async () => {
  const { owner, message } = await firstResult('a green square', { model: h.info.experts[0].id });
  const press = h.fake.pressButton(message.id, button(message, 'Reroll'), { user: owner });
  const rerolled = await h.result(press);
  assert.equal(press.acks[0].type, 5);
  assert.notEqual(rerolled.id, message.id);
  const before = pngParameters(message.attachments[0].data);
  const after = pngParameters(rerolled.attachments[0].data);
  assert.equal(after.prompt, 'a green square');
  assert.deepEqual(after.experts, before.experts);
  assert.notEqual(after.seed, before.seed);
  const job = await h.job(rerolled.id);
  assert.equal(job?.kind, 'reroll');
  assert.equal(job?.parentJobId, (await h.job(message.id))?.id);
});

test('🧩 Contributions renders the panel for the same seed; 🔍 Compare shows each expert next to the ensemble', async () => {
  const ensemble = h.info.ensembles[0];
  const { owner, message } = await firstResult('a blue ring', { model: ensemble.id });
  const panel = await h.result(h.fake.pressButton(message.id, button(message, 'Contributions'), { user: owner }));
  assert.ok(panel.attachments[0].filename.includes('contributions'));
  assert.equal(embedField(panel, 'Seed'), '1000');
  assert.match(String(panel.embeds[0].description), /%/);

  const compare = await h.result(h.fake.pressButton(message.id, button(message, 'Compare'), { user: owner }));
  assert.ok(compare.attachments[0].filename.endsWith('-compare.png'));
  const labels = String(compare.embeds[0].description);
  for (const id of ensemble.experts) {
    assert.ok(labels.includes(h.info.experts.find((e) => e.id === id)!.title), `compare shows ${id}`);
  }
  assert.ok(labels.includes(ensemble.title), 'compare shows the ensemble');
});

test('🧩 on a single-model image and 🗑️ by a stranger get ephemeral explanations; requester and moderators may delete', async () => {
  const { owner, message } = await firstResult('one model only', { model: h.info.experts[0].id });
  assert.equal(h.fake.buttonsOf(message).find((b) => b.label === 'Contributions')?.disabled, true);
  const panel = h.fake.pressButton(message.id, button(message, 'Contributions'), { user: owner });
  await panel.waitFor((i) => i.acknowledged);
  assert.equal(panel.replyWasEphemeral, true);
  assert.match(panel.replyContent ?? '', /several models/);

  const stranger = h.fake.user('stranger');
  const refused = h.fake.pressButton(message.id, button(message, 'Delete'), { user: stranger });
  await refused.waitFor((i) => i.acknowledged);
  assert.equal(refused.replyWasEphemeral, true);
  assert.match(refused.replyContent ?? '', /Manage Messages/);
  assert.equal(message.deleted, false);

  const byOwner = h.fake.pressButton(message.id, button(message, 'Delete'), { user: owner });
  await byOwner.waitFor(() => message.deleted);
  assert.equal(byOwner.acks[0].type, 6, 'acknowledged as an update');
  await h.fake.waitFor(() => h.bot.store.findByMessage(message.id)?.deleted, 5000, 'marked deleted');

  const other = await firstResult('moderated away');
  const moderator = h.fake.user('mod');
  h.fake.pressButton(other.message.id, button(other.message, 'Delete'), { user: moderator, permissions: PERMISSIONS.manageMessages | PERMISSIONS.viewChannel });
  await h.fake.waitFor(() => other.message.deleted, 5000, 'moderator delete');
});

test('reacting 🔁 reruns with a new seed and replies to the original; the bot\'s own 🔁 does not', async () => {
  const { message } = await firstResult('a yellow star');
  const replies = () => h.fake.channelMessages().filter((m) => m.replyTo === message.id);
  // The bot adds 🔁 itself so people can click it; that reaction must not start a job.
  await h.fake.waitFor(() => message.reactions.get('🔁')?.has(h.fake.botUser.id), 5000, 'bot reaction');

  const fan = h.fake.user('fan');
  h.fake.react(message.id, '🔁', fan);
  const rerun = await h.fake.waitFor(
    () => h.fake.channelMessages().find((m) => m.replyTo === message.id && isResult(m)),
    20_000,
    'rerun reply',
  );
  // Ordering barrier: the fake gateway sends events in order and the bot handles them in order, on
  // the same path (a 🔁 is looked up, then submitted). The fan's 🔁 came after the bot's own, so by
  // the time it produced a result, a job started by the bot's reaction would already be stored.
  assert.deepEqual(h.bot.store.recentOfUser(h.fake.botUser.id), [], 'the bot\'s own 🔁 started no job');
  assert.deepEqual(replies().map((m) => m.id), [rerun.id]);
  assert.ok(rerun.content.includes(`<@${fan.id}>`));
  const seedBefore = pngParameters(message.attachments[0].data).seed;
  const seedAfter = pngParameters(rerun.attachments[0].data).seed;
  assert.equal(pngParameters(rerun.attachments[0].data).prompt, 'a yellow star');
  assert.notEqual(seedAfter, seedBefore);
  const job = await h.job(rerun.id);
  assert.equal(job?.userId, fan.id);
  assert.equal(job?.reply.type, 'channel');

  // Other emoji are ignored. Barrier again: a 🔁 from someone else after the 👍 must give a result;
  // by then a job started by the 👍 would be stored (and submitted before the second rerun).
  h.fake.react(message.id, '👍', fan);
  const other = h.fake.user('other fan');
  h.fake.react(message.id, '🔁', other);
  const second = await h.fake.waitFor(
    () => h.fake.channelMessages().find((m) => m.replyTo === message.id && isResult(m) && m.content.includes(`<@${other.id}>`)),
    20_000,
    'second rerun reply',
  );
  assert.deepEqual(h.bot.store.recentOfUser(fan.id).map((j) => j.id), [job.id], '👍 started no job');
  assert.deepEqual(replies().map((m) => m.id), [rerun.id, second.id]);
});
