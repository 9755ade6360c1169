// Restarts: queued and running jobs run again, buttons and reactions work on messages from before,
// and results whose interaction token expired meanwhile arrive as channel messages.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { JOB_DATABASE_FILE } from '../src/bot/bot.ts';
import { JobStore } from '../src/store/job-store.ts';
import { FakeDiscord } from '../src/testing/fake-discord.ts';
import { BotHarness, createTestEngine, isResult, pngParameters } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

test('a restart with queued and running jobs loses none; buttons and reactions work afterwards', async () => {
  let gated!: GatedEngine;
  const h = await BotHarness.start({
    env: { QUEUE_CONCURRENCY: '1', PROGRESS_INTERVAL_MS: '250' },
    engine: async () => (gated = new GatedEngine(await createTestEngine())),
  });
  try {
    const users = ['ann', 'ben', 'cat', 'dan'].map((name) => h.fake.user(name));
    const interactions = users.map((user, i) => h.imagine(user, { prompt: `before the restart ${i}`, seed: 100 + i }));
    await h.fake.waitFor(() => gated.waiting === 1, 5000, 'first job running');
    await interactions[3].waitFor((i) => /position 3/.test(i.original?.content ?? ''), 5000, 'last job queued');
    const statuses = () => interactions.map((i) => h.bot.store.get(h.bot.store.recentOfUser(i.user.id)[0].id)!.status);
    assert.deepEqual(statuses(), ['running', 'queued', 'queued', 'queued']);

    let second!: GatedEngine;
    await h.restart({ engine: async () => (second = new GatedEngine(await createTestEngine())) });
    // Everything is back in the queue, in the same order, and the users are told.
    await h.fake.waitFor(() => second.waiting === 1, 5000, 'first job running again');
    assert.equal(second.requests[0].prompt, 'before the restart 0');
    await interactions[3].waitFor((i) => /restarted.*position 3/.test(i.original?.content ?? ''), 5000, 'restart notice');
    second.open();

    const results = await Promise.all(interactions.map((i) => h.result(i)));
    results.forEach((message, i) => assert.equal(pngParameters(message.attachments[0].data).seed, 100 + i));
    const jobs = await Promise.all(results.map((m) => h.job(m.id)));
    assert.deepEqual(jobs.map((j) => j.status), ['done', 'done', 'done', 'done']);
    assert.equal(jobs[0].attempts, 2, 'the interrupted job ran again');
    assert.deepEqual(jobs.slice(1).map((j) => j.attempts), [1, 1, 1]);

    // Another restart empties every cache: the buttons and the 🔁 reaction still work.
    await h.restart({ engine: createTestEngine });
    const [, ben, cat] = users;
    const reroll = h.fake.buttonsOf(results[1]).find((b) => b.label === 'Reroll')!;
    const rerolled = await h.result(h.fake.pressButton(results[1].id, reroll.customId, { user: ben }));
    assert.equal(pngParameters(rerolled.attachments[0].data).prompt, 'before the restart 1');
    assert.notEqual(pngParameters(rerolled.attachments[0].data).seed, 101);

    const fetchesBefore = h.fake.requestsTo('GET', new RegExp(`/messages/${results[2].id}$`)).length;
    h.fake.react(results[2].id, '🔁', cat);
    const rerun = await h.fake.waitFor(() => h.fake.channelMessages().find((m) => m.replyTo === results[2].id && isResult(m)), 20_000, 'rerun');
    assert.equal(pngParameters(rerun.attachments[0].data).prompt, 'before the restart 2');
    assert.ok(h.fake.requestsTo('GET', new RegExp(`/messages/${results[2].id}$`)).length > fetchesBefore, 'the uncached message was fetched');
  } finally {
    await h.close();
  }
});

test('results of jobs whose interaction token expired while the bot was down are posted in the channel', async () => {
  let gated!: GatedEngine;
  // Tokens live the usual 15 minutes while the first bot runs, however long its part takes.
  const h = await BotHarness.start({
    env: { QUEUE_CONCURRENCY: '1', PROGRESS_INTERVAL_MS: '250' },
    engine: async () => (gated = new GatedEngine(await createTestEngine())),
  });
  try {
    const eve = h.fake.user('eve');
    const fay = h.fake.user('fay');
    const running = h.imagine(eve, { prompt: 'drawn after a long outage', seed: 5 });
    const waiting = h.imagine(fay, { prompt: 'queued through the outage', seed: 6 });
    await running.waitFor((i) => /starting/.test(i.original?.content ?? ''), 5000, 'running status');
    await waiting.waitFor((i) => /Queued/.test(i.original?.content ?? ''), 5000, 'queued status');
    assert.equal(gated.waiting, 1);

    // An outage longer than the tokens' lifetime, without waiting for one: Discord refuses both
    // tokens from now on, and the restarted bot's clock finds them too old (its token lifetime is
    // 1 ms; HarnessOptions.tokenLifetimeMs, which restart passes on to the new bot).
    h.fake.expireToken(running);
    h.fake.expireToken(waiting);
    const requestsBefore = h.fake.requests.length;
    const afterOutage = { engine: createTestEngine, tokenLifetimeMs: 1 };
    await h.restart(afterOutage);
    const fromChannel = (interaction: typeof running) =>
      h.fake.waitFor(() => h.fake.channelMessages().find((m) => m.replyTo === interaction.originalMessageId && isResult(m)), 20_000, 'channel result');
    const [first, second] = await Promise.all([fromChannel(running), fromChannel(waiting)]);
    assert.equal(pngParameters(first.attachments[0].data).seed, 5);
    assert.equal(pngParameters(second.attachments[0].data).seed, 6);
    assert.ok(first.content.includes(`<@${eve.id}>`));
    assert.ok(second.content.includes(`<@${fay.id}>`));
    // The bot knew the tokens were too old: it did not even try the interaction webhooks again.
    const lateWebhookCalls = h.fake.requests.slice(requestsBefore).filter((r) => r.path.startsWith('/webhooks/'));
    assert.deepEqual(lateWebhookCalls.map((r) => r.path), []);
    assert.equal((await h.job(first.id)).reply.type, 'channel');
  } finally {
    await h.close();
  }
});

test('a job left running by a crash runs again at start and is delivered', async () => {
  const fake = await FakeDiscord.start();
  const dataDir = mkdtempSync(path.join(tmpdir(), 'bot-crash-'));
  const user = fake.user('crashed');
  const probe = await createTestEngine();
  const expert = (await probe.info()).experts[0].id;
  await probe.dispose();
  // What a killed bot leaves behind: a job marked running, its interaction unknown to Discord now.
  const store = new JobStore(path.join(dataDir, JOB_DATABASE_FILE));
  store.create({
    id: 'crashjob1',
    kind: 'imagine',
    userId: user.id,
    guildId: fake.guildId,
    channelId: fake.channelId,
    request: { prompt: 'survived a crash', mode: 'single', experts: [expert], seed: 31337 },
    reply: { type: 'interaction', applicationId: fake.applicationId, interactionId: '1', token: 'gone-token', tokenIssuedAt: Date.now() },
    parentJobId: null,
    replyToMessageId: null,
  });
  store.markRunning('crashjob1');
  store.close();

  const h = await BotHarness.start({ fake, dataDir });
  try {
    const posted = await fake.waitFor(() => fake.channelMessages().find((m) => isResult(m)), 20_000, 'result in the channel');
    assert.equal(pngParameters(posted.attachments[0].data).seed, 31337);
    assert.ok(posted.content.includes(`<@${user.id}>`));
    const job = await h.job(posted.id);
    assert.equal(job.id, 'crashjob1');
    assert.equal(job.attempts, 2);
  } finally {
    await h.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
