// Moderation: /admin (allowed roles, daily quotas, pause/resume, block/unblock, the queue), blocked
// words on negative prompts and reruns, and moderators cancelling jobs; end to end through the real
// discord.js client and the fake Discord. Days are the test's clock; hand-offs, never sleeps.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { FairQueue, type FairQueueJob } from '../src/queue/fair-queue.ts';
import { openDatabase } from '../src/store/database.ts';
import { GuildSettingsStore } from '../src/store/guild-settings-store.ts';
import { PermissionFlagsBits } from 'discord.js';
import { utcDay } from '../src/bot/access.ts';
import { commands } from '../src/bot/commands/index.ts';
import { PERMISSIONS, type FakeInteraction, type FakeMessage, type FakeUser } from '../src/testing/fake-discord.ts';
import { BotHarness, createTestEngine, isResult } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

const DAY = 24 * 60 * 60 * 1000;

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

interface GuildJob extends FairQueueJob {
  guildId: string;
}

test('the fair queue passes held jobs by, and starts them after refresh() once they are no longer held', { timeout: 10_000 }, async () => {
  const paused = new Set(['g1']);
  const started: string[] = [];
  const gates = new Map<string, () => void>();
  const startedOne = new Map<string, () => void>();
  const whenStarted = (id: string) => new Promise<void>((resolve) => (started.includes(id) ? resolve() : startedOne.set(id, resolve)));
  const queue = new FairQueue<GuildJob>(
    { concurrency: 1, maxJobsPerUser: 10, maxQueued: 10, jobTimeoutMs: 60_000, isHeld: (job) => paused.has(job.guildId) },
    async (job) => {
      const gate = deferred();
      gates.set(job.id, gate.resolve);
      started.push(job.id);
      startedOne.get(job.id)?.();
      await gate.promise;
    },
  );
  queue.enqueue({ id: 'held', userId: 'alice', guildId: 'g1' });
  queue.enqueue({ id: 'free', userId: 'bob', guildId: 'g2' });
  await whenStarted('free');
  assert.deepEqual(queue.snapshot().waiting, [{ id: 'held', userId: 'alice', position: 1, held: true }]);
  gates.get('free')!();
  // Every slot task has run (the held job's found nothing to start): the held job is still waiting.
  await queue.onIdle();
  assert.deepEqual(started, ['free']);
  assert.equal(queue.waitingCount, 1);

  paused.delete('g1');
  queue.refresh();
  await whenStarted('held');
  gates.get('held')!();
  await queue.onIdle();
  assert.deepEqual(started, ['free', 'held']);
});

test('guild settings: pause, roles, blocks and quotas per server, in SQLite', () => {
  const db = openDatabase(':memory:');
  const guilds = new GuildSettingsStore(db);
  assert.deepEqual(guilds.get('g'), { paused: false, dailyQuota: null, allowedRoleIds: [], blocked: [], userQuotas: [] });
  assert.equal(guilds.setPaused('g', true), true);
  assert.equal(guilds.setPaused('g', true), false, 'already paused');
  assert.equal(guilds.isPaused('other'), false, 'per server');
  assert.equal(guilds.allowRole('g', 'r1'), true);
  assert.equal(guilds.allowRole('g', 'r1'), false);
  assert.equal(guilds.block('g', 'u1', 'admin', 5), true);
  assert.equal(guilds.isBlocked('g', 'u1'), true);
  assert.equal(guilds.isBlocked('other', 'u1'), false);
  assert.equal(guilds.quotaFor('g', 'u1'), undefined);
  guilds.setDailyQuota('g', 3);
  guilds.setUserQuota('g', 'u2', 10);
  assert.equal(guilds.quotaFor('g', 'u1'), 3);
  assert.equal(guilds.quotaFor('g', 'u2'), 10);
  assert.deepEqual(guilds.get('g'), {
    paused: true,
    dailyQuota: 3,
    allowedRoleIds: ['r1'],
    blocked: [{ userId: 'u1', blockedBy: 'admin', blockedAt: 5 }],
    userQuotas: [{ userId: 'u2', dailyQuota: 10 }],
  });
  guilds.setUserQuota('g', 'u2', null);
  guilds.setDailyQuota('g', null);
  assert.equal(guilds.quotaFor('g', 'u2'), undefined);
  assert.equal(guilds.unblock('g', 'u1'), true);
  assert.equal(guilds.removeRole('g', 'r1'), true);
  db.close();
});

test('UTC days', () => {
  const noon = Date.UTC(2030, 0, 15, 12);
  assert.deepEqual(utcDay(noon), { from: Date.UTC(2030, 0, 15), to: Date.UTC(2030, 0, 16) });
  assert.deepEqual(utcDay(Date.UTC(2030, 0, 16)), { from: Date.UTC(2030, 0, 16), to: Date.UTC(2030, 0, 17) });
});

// ---- end to end ----------------------------------------------------------------------------------

let h: BotHarness;
let engine: GatedEngine;
/** The bot's clock: a fixed instant the tests move on by whole days. */
let now = Date.UTC(2030, 0, 15, 12);
let admin: FakeUser;

before(async () => {
  h = await BotHarness.start({
    env: { MAX_JOBS_PER_USER: '10', BLOCKED_WORDS: 'forbidden' },
    clock: () => now,
    engine: async () => (engine = new GatedEngine(await createTestEngine(), { open: true })),
  });
  admin = h.fake.user('admin');
});
after(async () => {
  await h.close();
});

const ADMIN = { permissions: PERMISSIONS.manageGuild };

async function answered(interaction: FakeInteraction): Promise<string> {
  await interaction.waitFor((i) => i.acknowledged, 10_000, `answer to ${interaction.id}`);
  assert.equal(interaction.replyWasEphemeral, true, 'answered privately');
  return interaction.replyContent ?? '';
}

function adminCommand(sub: string, options: Record<string, string | number | boolean> = {}): Promise<string> {
  return answered(h.fake.slash(`admin ${sub}`, options, { user: admin, ...ADMIN }));
}

function button(message: FakeMessage, label: string): string {
  const found = h.fake.buttonsOf(message).find((b) => b.label === label);
  assert.ok(found, `button ${label}`);
  return found.customId;
}

/** The bot's channel reply to a reaction, mentioning the user. */
function reactionAnswer(user: FakeUser, to: FakeMessage): Promise<FakeMessage> {
  return h.fake.waitFor(() => h.fake.channelMessages().find((m) => m.replyTo === to.id && m.content.includes(`<@${user.id}>`)), 10_000, 'reaction answer');
}

test('/admin needs Manage Server; the command is registered for Manage Server by default', async () => {
  const member = h.fake.user('member');
  assert.match(await answered(h.fake.slash('admin show', {}, { user: member })), /Only members with Manage Server/);
  const definition = commands.find((c) => c.data.name === 'admin')!.data.toJSON();
  assert.equal(definition.default_member_permissions, String(PermissionFlagsBits.ManageGuild));
  assert.match(await adminCommand('show'), /\*\*Queue:\*\* running/);
});

test('daily quotas: the n+1-th job of the UTC day is refused, per-user quotas override, the next day starts afresh', async () => {
  const user = h.fake.user('quota-user');
  assert.match(await adminCommand('quota', { jobs: 2 }), /2 jobs per UTC day/);
  const first = await h.result(h.imagine(user, { prompt: 'one', model: h.info.experts[0].id }));
  await h.result(h.imagine(user, { prompt: 'two', model: h.info.experts[0].id }));
  await h.job(first.id);

  const third = await answered(h.imagine(user, { prompt: 'three' }));
  assert.match(third, /You have used your 2 jobs for today in this server \(daily quota\)\. More at 00:00 UTC, in 12 h 0 min\./);
  // Buttons start jobs too: the same quota.
  assert.match(await answered(h.fake.pressButton(first.id, button(first, 'Reroll'), { user })), /used your 2 jobs/);
  // And so does 🔁.
  h.fake.react(first.id, '🔁', user);
  assert.match((await reactionAnswer(user, first)).content, /used your 2 jobs/);
  assert.equal(h.bot.store.recentOfUser(user.id, 10).length, 2, 'no third job was stored');

  // An own quota replaces the default.
  assert.match(await adminCommand('quota', { jobs: 3, user: user.id }), /3 jobs per UTC day.*2 jobs today/);
  await h.result(h.imagine(user, { prompt: 'three, allowed now', model: h.info.experts[0].id }));
  assert.match(await answered(h.imagine(user, { prompt: 'four' })), /used your 3 jobs/);

  // The next UTC day.
  now += DAY;
  await h.result(h.imagine(user, { prompt: 'a new day', model: h.info.experts[0].id }));

  assert.match(await adminCommand('quota-remove', { user: user.id }), /no own quota/);
  assert.match(await adminCommand('quota-remove'), /removed/);
  assert.match(await adminCommand('show'), /\*\*Daily quota:\*\* no limit/);
});

test('a quota of 0 refuses at once', async () => {
  const user = h.fake.user('no-jobs');
  await adminCommand('quota', { jobs: 0, user: user.id });
  assert.match(await answered(h.imagine(user, { prompt: 'anything' })), /daily quota in this server is 0 jobs/);
  await adminCommand('quota-remove', { user: user.id });
});

test('a blocked user is refused on every command, button and 🔁; unblocked, they draw again', async () => {
  const owner = h.fake.user('owner');
  const result = await h.result(h.imagine(owner, { prompt: 'someone else’s picture', model: h.info.experts[0].id }));
  await h.job(result.id);
  const user = h.fake.user('troll');
  assert.match(await adminCommand('block', { user: user.id }), /is blocked here/);
  assert.match(await adminCommand('show'), new RegExp(`\\*\\*Blocked:\\*\\* <@${user.id}>`));

  for (const [name, options] of [
    ['imagine', { prompt: 'let me' }],
    ['queue', {}],
    ['models', {}],
    ['settings', { steps: 4 }],
    ['cancel', {}],
  ] as const) {
    assert.match(await answered(h.fake.slash(name, options, { user })), /You are blocked from using this bot in this server/, `/${name}`);
  }
  assert.deepEqual(h.bot.settings.get(user.id), {}, '/settings was not applied');
  const autocomplete = h.fake.autocomplete('imagine', { prompt: 'x', model: '' }, 'model', { user });
  await autocomplete.waitFor((i) => i.acknowledged);
  assert.deepEqual(autocomplete.choices, []);
  for (const label of ['Reroll', 'Compare', 'Delete']) {
    assert.match(await answered(h.fake.pressButton(result.id, button(result, label), { user })), /You are blocked/, label);
  }
  assert.equal(result.deleted, false);
  h.fake.react(result.id, '🔁', user);
  assert.match((await reactionAnswer(user, result)).content, /You are blocked/);
  assert.equal(h.bot.store.recentOfUser(user.id, 10).length, 0, 'no job of theirs was stored');

  assert.match(await adminCommand('unblock', { user: user.id }), /no longer blocked/);
  await h.result(h.imagine(user, { prompt: 'behaving now', model: h.info.experts[0].id }));
});

test('pause: a running job finishes, a new job is accepted and waits, /queue says so; resume starts it', async () => {
  const user = h.fake.user('patient');
  engine.close();
  const running = h.imagine(user, { prompt: 'already drawing', model: h.info.experts[0].id });
  await h.fake.waitFor(() => engine.waiting === 1, 10_000, 'a job at the engine');
  assert.match(await adminCommand('pause'), /Paused/);

  const requestsBefore = engine.requests.length;
  const waiting = h.imagine(user, { prompt: 'waits for resume', model: h.info.experts[0].id });
  await waiting.waitFor((i) => i.original?.history.some((s) => /queue of this server is paused/.test(s.content)), 10_000, 'paused notice');
  assert.equal(waiting.replyWasEphemeral, false, 'accepted like any job');

  engine.open();
  await h.result(running);
  // Every slot task of the queue has run: the paused job had its turn and did not start.
  await h.bot.jobs.queue.onIdle();
  assert.equal(engine.requests.length, requestsBefore, 'the waiting job never reached the engine');
  const job = h.bot.store.recentOfUser(user.id, 1)[0];
  assert.equal(job.status, 'queued');
  assert.match(await answered(h.fake.slash('queue', {}, { user })), /queue of this server is paused[\s\S]*waits for resume.*waiting for the queue to resume/);
  assert.match(await adminCommand('queue'), new RegExp(`Paused[\\s\\S]*⏸️ \`${job.id}\` <@${user.id}> waits for resume`));

  assert.match(await adminCommand('resume'), /Resumed; 1 waiting job/);
  await h.result(waiting);
  assert.equal(engine.requests.at(-1)?.prompt, 'waits for resume');
  assert.doesNotMatch(await answered(h.fake.slash('queue', {}, { user })), /paused/);
});

test('/admin queue shows who is waiting; a moderator cancels someone’s job with /cancel job:<id>', async () => {
  const [alice, bob] = [h.fake.user('alice'), h.fake.user('bob')];
  engine.close();
  const a = h.imagine(alice, { prompt: 'alice draws', model: h.info.experts[0].id });
  await h.fake.waitFor(() => engine.waiting === 1, 10_000, 'alice at the engine');
  const b = h.imagine(bob, { prompt: 'bob waits', model: h.info.experts[0].id });
  await b.waitFor((i) => i.original?.history.some((s) => /position 1/.test(s.content)), 10_000, 'bob queued');
  const bobJob = h.bot.store.recentOfUser(bob.id, 1)[0];
  const view = await adminCommand('queue');
  assert.match(view, new RegExp(`🎨 \`\\w+\` <@${alice.id}> alice draws — drawing`));
  assert.match(view, new RegExp(`⏳ 1\\. \`${bobJob.id}\` <@${bob.id}> bob waits`));

  assert.match(await answered(h.fake.slash('cancel', { job: bobJob.id }, { user: alice })), /not your job/);
  const moderator = h.fake.user('moderator');
  const cancel = h.fake.slash('cancel', { job: bobJob.id }, { user: moderator, permissions: PERMISSIONS.manageMessages });
  assert.match(await answered(cancel), /Cancelled `\w+` before it started/);
  await b.waitFor((i) => /Cancelled by a moderator/.test(i.original?.content ?? ''), 10_000, 'bob told');
  engine.open();
  await h.result(a);
  assert.equal(h.bot.store.get(bobJob.id)?.status, 'cancelled');
});

test('allowed roles: only members with one may draw (commands, buttons, 🔁); none left, everyone may', async () => {
  const artists = h.fake.role('artists');
  const artist = h.fake.user('artist', { roles: [artists.id] });
  const outsider = h.fake.user('outsider');
  const before = await h.result(h.imagine(outsider, { prompt: 'before the rule', model: h.info.experts[0].id }));
  await h.job(before.id);

  assert.match(await adminCommand('allow-role', { role: artists.id }), new RegExp(`Only members with <@&${artists.id}> may draw`));
  assert.match(await answered(h.imagine(outsider, { prompt: 'not allowed' })), new RegExp(`Only members with the role <@&${artists.id}> may draw here`));
  assert.match(await answered(h.fake.pressButton(before.id, button(before, 'Reroll'), { user: outsider })), /Only members with the role/);
  h.fake.react(before.id, '🔁', outsider);
  assert.match((await reactionAnswer(outsider, before)).content, /Only members with the role/);
  // Commands that start nothing stay open to everyone.
  assert.match(await answered(h.fake.slash('queue', {}, { user: outsider })), /no jobs/);

  const allowed = await h.result(h.imagine(artist, { prompt: 'an artist draws', model: h.info.experts[0].id }));
  await h.job(allowed.id);
  h.fake.react(allowed.id, '🔁', artist);
  await h.fake.waitFor(() => h.fake.channelMessages().find((m) => m.replyTo === allowed.id && isResult(m)), 20_000, 'the artist’s 🔁 result');

  assert.match(await adminCommand('remove-role', { role: artists.id }), /everyone may draw/);
  await h.result(h.imagine(outsider, { prompt: 'everyone again', model: h.info.experts[0].id }));
});

test('blocked words apply to the negative prompt and to reruns of older pictures', async () => {
  const user = h.fake.user('wordsmith');
  assert.match(await answered(h.imagine(user, { prompt: 'a circle', negative: 'forbidden things' })), /negative prompt contains a word that is not allowed here \("forbidden"\)/);

  const old = await h.result(h.imagine(user, { prompt: 'a square with stripes', model: h.info.experts[0].id }));
  await h.job(old.id);
  // The word list changes (at a restart); the old picture's prompt now has a blocked word.
  await h.restart({ env: { MAX_JOBS_PER_USER: '10', BLOCKED_WORDS: 'stripes' } });
  assert.match(await answered(h.fake.pressButton(old.id, button(old, 'Reroll'), { user })), /cannot draw this again: the prompt contains a word that is not allowed here \("stripes"\)/);
  h.fake.react(old.id, '🔁', user);
  assert.match((await reactionAnswer(user, old)).content, /cannot draw this again/);
});
