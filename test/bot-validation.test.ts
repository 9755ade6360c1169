// Bad input gets a short ephemeral explanation and never crashes the bot.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { EngineError } from '../src/engine/api.ts';
import { BotHarness, createTestEngine } from './support/bot-harness.ts';
import { RejectingEngine } from './support/engine-wrappers.ts';
import type { FakeInteraction } from '../src/testing/fake-discord.ts';

let h: BotHarness;

before(async () => {
  h = await BotHarness.start({
    env: { BLOCKED_WORDS: 'gore, Nasty Thing' },
    // Stands in for the engine refusing a request it cannot run (e.g. merging different architectures).
    engine: async () =>
      new RejectingEngine(await createTestEngine(), (request) =>
        request.mode === 'merge' && request.prompt.includes('incompatible')
          ? new EngineError('bad_request', 'cannot merge these experts: their U-Nets have different architectures')
          : undefined,
      ),
  });
});
after(async () => {
  await h.close();
});

async function ephemeralReply(interaction: FakeInteraction): Promise<string> {
  await interaction.waitFor((i) => i.acknowledged, 5000, 'acknowledgement');
  assert.equal(interaction.acks[0].type, 4, 'answered directly, not deferred');
  assert.equal(interaction.replyWasEphemeral, true, 'ephemeral');
  return interaction.replyContent ?? '';
}

test('invalid /imagine options are refused with ephemeral explanations', async () => {
  const user = h.fake.user('tester');
  const [expertA, expertB] = h.info.experts;
  const ensemble = h.info.ensembles[0];
  const cases: [Record<string, string | number | boolean>, RegExp][] = [
    [{ prompt: '   ' }, /empty/],
    [{ prompt: 'x'.repeat(1001) }, /too long/],
    [{ prompt: 'a cat', model: 'no-such-model' }, /Unknown model/],
    [{ prompt: 'a cat', model: `${expertA.id}+nope` }, /Unknown expert/],
    [{ prompt: 'a cat', model: `${expertA.id}+${expertA.id}` }, /twice/],
    [{ prompt: 'a cat', model: ensemble.id, mode: 'single' }, /single/],
    [{ prompt: 'a cat', model: expertA.id, mode: 'average' }, /two or more/],
    [{ prompt: 'a cat', mode: 'bogus' }, /Unknown mode/],
    [{ prompt: 'a cat', steps: 0 }, /steps must be/],
    [{ prompt: 'a cat', steps: 1000 }, /steps must be/],
    [{ prompt: 'a cat', guidance: 99 }, /guidance must be/],
    [{ prompt: 'a cat', count: 9 }, /count must be/],
    [{ prompt: 'a cat', seed: -1 }, /seed must be/],
    [{ prompt: 'a cat', scheduler: 'plms' }, /Unknown scheduler/],
    [{ prompt: 'a cat', model: expertB.id, contributions: true }, /contributions|Contributions/],
    [{ prompt: 'lots of GORE here' }, /not allowed/],
    [{ prompt: 'a nasty thing indeed' }, /not allowed/],
  ];
  const interactions = cases.map(([options]) => h.imagine(user, options));
  for (const [i, [, expected]] of cases.entries()) {
    assert.match(await ephemeralReply(interactions[i]), expected, JSON.stringify(cases[i][0]).slice(0, 80));
  }
  assert.equal(h.bot.store.recentOfUser(user.id).length, 0, 'no job was stored');
});

test('afa for experts without a trained ensemble is refused', async (t) => {
  const ids = h.info.experts.map((e) => e.id);
  const covered = (pair: string[]): boolean =>
    h.info.ensembles.some(
      (e) => (e.experts.length === 2 && pair.every((id) => e.experts.includes(id))) || (e.subsets && pair.every((id) => e.experts.includes(id))),
    );
  const pair = ids.flatMap((a, i) => ids.slice(i + 1).map((b) => [a, b])).find((p) => !covered(p));
  if (!pair) return t.skip('every pair of experts has an ensemble in this package');
  const reply = await ephemeralReply(h.imagine(h.fake.user('afa'), { prompt: 'x', model: pair.join('+'), mode: 'afa' }));
  assert.match(reply, /No trained AFA ensemble/);
});

test('a request the engine rejects ends as an ephemeral follow-up and the public response is removed', async () => {
  const [a, b] = h.info.experts;
  const merger = h.fake.user('merger');
  const interaction = h.imagine(merger, { prompt: 'incompatible merge', model: `${a.id}+${b.id}`, mode: 'merge' });
  await interaction.waitFor((i) => i.followups.length > 0 && i.original?.deleted, 10_000, 'ephemeral follow-up');
  assert.equal(interaction.acks[0].type, 5);
  const followup = interaction.followups[0];
  assert.equal(followup.flags & 64, 64, 'ephemeral');
  assert.match(followup.content, /different architectures/);
  assert.equal(h.bot.store.recentOfUser(merger.id)[0]?.status, 'failed');
});

test('commands outside ALLOWED_CHANNEL_IDS are refused; unknown buttons are explained', async () => {
  await h.restart({ env: { ALLOWED_CHANNEL_IDS: h.fake.channelId } });
  const user = h.fake.user('elsewhere');
  const other = h.fake.channelIds[1];
  const refused = h.imagine(user, { prompt: 'a cat' }, other);
  assert.match(await ephemeralReply(refused), new RegExp(`<#${h.fake.channelId}>`));
  const allowed = h.imagine(user, { prompt: 'a cat' });
  await h.result(allowed);

  const press = h.fake.pressButton(allowed.originalMessageId!, 'job:reroll:doesnotexist', { user });
  assert.match(await ephemeralReply(press), /no longer have/);
  const garbage = h.fake.pressButton(allowed.originalMessageId!, 'something-else', { user });
  assert.match(await ephemeralReply(garbage), /not one of mine/);

  // Still alive and answering.
  const models = h.fake.slash('models', {}, { user });
  await models.waitFor((i) => i.acknowledged);
  assert.equal(models.replyWasEphemeral, true);
  const fields = (models.acks[0].data?.embeds as { fields: { value: string }[] }[])[0].fields.map((f) => f.value).join('\n');
  for (const expert of h.info.experts) assert.ok(fields.includes(expert.id));
  for (const ensemble of h.info.ensembles) assert.ok(fields.includes(ensemble.id));
});
