// /settings: per-user /imagine defaults in SQLite, applied when options are left out, validated
// against the package, reset; private (ephemeral) replies. Also the database migrations.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { openDatabase, SCHEMA_VERSION } from '../src/store/database.ts';
import { JobStore } from '../src/store/job-store.ts';
import { UserSettingsStore } from '../src/store/user-settings-store.ts';
import { sizeFor } from '../src/bot/image-size.ts';
import type { FakeInteraction } from '../src/testing/fake-discord.ts';
import { BotHarness, createTestEngine, embedField } from './support/bot-harness.ts';
import { GatedEngine } from './support/engine-wrappers.ts';

/** The jobs table as databases made before migrations existed have it (user_version 0). */
const LEGACY_SCHEMA = `
CREATE TABLE jobs (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, user_id TEXT NOT NULL, guild_id TEXT,
  channel_id TEXT NOT NULL, request TEXT NOT NULL, seed INTEGER NOT NULL, reply TEXT NOT NULL,
  parent_job_id TEXT, reply_to_message_id TEXT, status_message_id TEXT, result_message_id TEXT,
  error TEXT, result TEXT, created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
  attempts INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_status ON jobs(status, created_at);
`;

test('a database from before migrations keeps its jobs and gains the new tables; a newer one is refused', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'bot-migrate-'));
  try {
    const file = path.join(dir, 'jobs.sqlite');
    const legacy = new Database(file);
    legacy.exec(LEGACY_SCHEMA);
    legacy
      .prepare(`INSERT INTO jobs (id, kind, status, user_id, guild_id, channel_id, request, seed, reply, created_at)
                VALUES ('old', 'imagine', 'queued', 'u1', 'g1', 'c1', ?, 5, '{"type":"channel"}', 1)`)
      .run(JSON.stringify({ prompt: 'kept', mode: 'single', experts: ['a'], seed: 5 }));
    legacy.close();

    const store = new JobStore(file);
    assert.equal(store.get('old')?.request.prompt, 'kept');
    assert.deepEqual(store.unfinished().map((job) => job.id), ['old']);
    assert.equal(store.db.pragma('user_version', { simple: true }), SCHEMA_VERSION);
    const settings = new UserSettingsStore(store.db);
    settings.set('u1', { steps: 12 });
    store.close();

    const reopened = openDatabase(file);
    assert.deepEqual(new UserSettingsStore(reopened).get('u1'), { steps: 12 }, 'migrations run once; data stays');
    reopened.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    reopened.close();
    assert.throws(() => openDatabase(file), /newer than this bot/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('user settings round-trip; an empty set or reset removes them; unreadable stored fields are dropped', () => {
  const db = openDatabase(':memory:');
  const store = new UserSettingsStore(db);
  assert.deepEqual(store.get('u'), {});
  store.set('u', { model: 'trio', steps: 30, visibility: 'private', contributions: false });
  assert.deepEqual(store.get('u'), { model: 'trio', steps: 30, visibility: 'private', contributions: false });
  store.set('u', {});
  assert.deepEqual(store.get('u'), {});
  store.set('u', { guidance: 2 });
  store.reset('u');
  assert.deepEqual(store.get('u'), {});
  db.prepare(`INSERT INTO user_settings VALUES ('v', ?, 0)`).run(JSON.stringify({ steps: 'many', scheduler: 'plms', guidance: 4, extra: 1 }));
  assert.deepEqual(store.get('v'), { guidance: 4 });
  db.close();
});

let h: BotHarness;
let engine: GatedEngine;

before(async () => {
  h = await BotHarness.start({ engine: async () => (engine = new GatedEngine(await createTestEngine(), { open: true })) });
});
after(async () => {
  await h.close();
});

async function settings(user: ReturnType<typeof h.fake.user>, options: Record<string, string | number | boolean> = {}): Promise<FakeInteraction> {
  const interaction = h.fake.slash('settings', options, { user });
  await interaction.waitFor((i) => i.acknowledged, 10_000, '/settings reply');
  assert.equal(interaction.replyWasEphemeral, true, '/settings answers privately');
  return interaction;
}

/** Runs /imagine to its result and returns the request the engine got. */
async function imagineRequest(user: ReturnType<typeof h.fake.user>, options: Record<string, string | number | boolean>) {
  const before = engine.requests.length;
  const message = await h.result(h.imagine(user, options));
  return { request: engine.requests[before], message };
}

test('/settings without options shows the package defaults; saved defaults fill what /imagine leaves out', async () => {
  const user = h.fake.user('settler');
  const shown = await settings(user);
  assert.match(shown.replyContent ?? '', /Steps: 8 \(default\)/);
  assert.match(shown.replyContent ?? '', /Replies: public \(default\)/);

  const expert = h.info.experts[1].id;
  const saved = await settings(user, { model: expert, steps: 5, guidance: 2.5, scheduler: 'euler', size: 'landscape' });
  assert.match(saved.replyContent ?? '', /^Saved/);
  assert.match(saved.replyContent ?? '', /Steps: \*\*5\*\*/);
  assert.deepEqual(h.bot.settings.get(user.id), { model: expert, steps: 5, guidance: 2.5, scheduler: 'euler', size: 'landscape' });

  const landscape = sizeFor('landscape', h.info);
  const { request, message } = await imagineRequest(user, { prompt: 'with my defaults' });
  assert.equal(request.mode, 'single');
  assert.deepEqual(request.experts, [expert]);
  assert.equal(request.steps, 5);
  assert.equal(request.guidance, 2.5);
  assert.equal(request.scheduler, 'euler');
  assert.deepEqual([request.width, request.height], [landscape.width, landscape.height]);
  assert.equal(embedField(message, 'Steps'), '5');

  // Options given in the command win; the model and mode of /settings go only together.
  const ensemble = h.info.ensembles[0].id;
  const own = await imagineRequest(user, { prompt: 'my own options', steps: 3, model: ensemble });
  assert.equal(own.request.steps, 3);
  assert.equal(own.request.mode, 'afa');
  assert.equal(own.request.ensemble, ensemble);
  assert.equal(own.request.scheduler, 'euler', 'other defaults still apply');

  const reset = await settings(user, { reset: true });
  assert.match(reset.replyContent ?? '', /reset/);
  assert.deepEqual(h.bot.settings.get(user.id), {});
  const plain = await imagineRequest(user, { prompt: 'package defaults again' });
  assert.equal(plain.request.steps, undefined);
  assert.equal(plain.request.scheduler, undefined);
  assert.equal(plain.request.width, undefined);
  assert.equal(plain.request.mode, 'afa', 'the package default model again');
});

test('/settings refuses an unknown model or an impossible mode and saves nothing; clear forgets one default', async () => {
  const user = h.fake.user('typo');
  await settings(user, { steps: 6 });
  const unknown = await settings(user, { model: 'no-such-model', steps: 7 });
  assert.match(unknown.replyContent ?? '', /Nothing was saved: Unknown model "no-such-model"/);
  assert.deepEqual(h.bot.settings.get(user.id), { steps: 6 });

  const impossible = await settings(user, { model: h.info.experts[0].id, mode: 'merge' });
  assert.match(impossible.replyContent ?? '', /Nothing was saved: Mode merge needs two or more models/);

  await settings(user, { guidance: 1.5 });
  await settings(user, { clear: 'steps' });
  assert.deepEqual(h.bot.settings.get(user.id), { guidance: 1.5 });
});

test('a saved model the package no longer has is explained when /imagine uses it', async () => {
  const user = h.fake.user('stale');
  h.bot.settings.set(user.id, { model: 'retired-model' });
  const interaction = h.imagine(user, { prompt: 'a stale default' });
  await interaction.waitFor((i) => i.acknowledged);
  assert.equal(interaction.replyWasEphemeral, true);
  assert.match(interaction.replyContent ?? '', /Unknown model "retired-model"/);
  assert.match(interaction.replyContent ?? '', /Your \/settings filled in: model/);
});

test('contributions by default only where several models draw', async () => {
  const user = h.fake.user('mapper');
  await settings(user, { contributions: true });
  const ensemble = await imagineRequest(user, { prompt: 'mapped', model: h.info.ensembles[0].id });
  assert.equal(ensemble.request.contributions, true);
  const single = await imagineRequest(user, { prompt: 'not mapped', model: h.info.experts[0].id });
  assert.equal(single.request.contributions, undefined);
});

test('visibility private: /imagine and Reroll answer ephemerally, without the 🔁 reaction; Delete removes the private result', async () => {
  const user = h.fake.user('shy');
  await settings(user, { visibility: 'private' });
  const interaction = h.imagine(user, { prompt: 'only for me', model: h.info.experts[0].id });
  const message = await h.result(interaction);
  assert.equal(interaction.replyWasEphemeral, true);
  assert.ok(message.flags & (1 << 6), 'the result is ephemeral');
  assert.equal(message.reactions.size, 0, 'no 🔁 reaction on an ephemeral message');
  assert.equal(h.fake.requestsTo('PUT', new RegExp(`/messages/${message.id}/reactions/`)).length, 0);

  const rerollId = h.fake.buttonsOf(message).find((b) => b.label === 'Reroll')!.customId;
  const press = h.fake.pressButton(message.id, rerollId, { user });
  const rerolled = await h.result(press);
  assert.equal(press.replyWasEphemeral, true);
  assert.ok(rerolled.flags & (1 << 6));

  const deleteId = h.fake.buttonsOf(message).find((b) => b.label === 'Delete')!.customId;
  h.fake.pressButton(message.id, deleteId, { user });
  await h.fake.waitFor(() => message.deleted, 5000, 'private result deleted');
  assert.equal(h.fake.requestsTo('DELETE', /^\/webhooks\/\d+\/[^/]+\/messages\/@original$/).length > 0, true);

  await settings(user, { visibility: 'public' });
  const open = h.imagine(user, { prompt: 'for everyone', model: h.info.experts[0].id });
  await h.result(open);
  assert.equal(open.replyWasEphemeral, false);
});

test('a private job whose interaction has expired is not posted in the channel', async () => {
  const user = h.fake.user('secretive');
  await settings(user, { visibility: 'private' });
  engine.close();
  const interaction = h.imagine(user, { prompt: 'a secret drawing', model: h.info.experts[0].id });
  await h.fake.waitFor(() => engine.waiting > 0, 10_000, 'job held at the engine');
  h.fake.expireToken(interaction);
  engine.open();
  const job = await h.fake.waitFor(
    () => h.bot.store.recentOfUser(user.id, 1).find((j) => j.status === 'failed'),
    20_000,
    'the job to end undelivered',
  );
  assert.equal(job.reply.type, 'interaction', 'never moved to the channel');
  assert.deepEqual(
    h.fake.channelMessages().filter((m) => m.content.includes(user.id) || m.content.includes('secret')),
    [],
  );
});
