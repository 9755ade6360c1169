// `npm start` as a process: configuration errors, a full run against the fake Discord, token hygiene.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { commands } from '../src/bot/commands/index.ts';
import { FIXTURE_PACKAGE, isResult } from './support/bot-harness.ts';
import { runMain } from './support/bot-process.ts';
import { FakeDiscord } from '../src/testing/fake-discord.ts';

test('an invalid configuration stops the bot with one clear message per problem', async () => {
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-main-'));
  try {
    const run = runMain({ DISCORD_APPLICATION_ID: 'abc', QUEUE_MAX: 'lots', ALLOWED_CHANNEL_IDS: '123456789012345678,general' }, cwd);
    assert.equal(await run.exited, 1);
    const out = run.output();
    assert.match(out, /DISCORD_TOKEN is missing/);
    assert.match(out, /DISCORD_APPLICATION_ID must be the numeric application id/);
    assert.match(out, /QUEUE_MAX must be a whole number from 1 to 100000 \(got "lots"\)/);
    assert.match(out, /ALLOWED_CHANNEL_IDS .*general/);
    assert.match(out, /\.env\.example/);
    assert.doesNotMatch(out, /at .*\.ts:\d+/, 'no stack trace');
  } finally {
    rmSync(cwd, { recursive: true, force: true });
  }
});

test('npm start connects through DISCORD_API_URL, answers /imagine with the real engine, never logs the token, stops on SIGTERM', async () => {
  const fake = await FakeDiscord.start({ commands: commands.map((c) => c.data.toJSON()) });
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-main-'));
  const run = runMain(
    {
      DISCORD_TOKEN: fake.token,
      DISCORD_APPLICATION_ID: fake.applicationId,
      DISCORD_API_URL: fake.apiBase,
      MODEL_DIR: FIXTURE_PACKAGE,
      DATA_DIR: path.join(cwd, 'data'),
      // trace includes discord.js's debug lines, one of which prints the token.
      LOG_LEVEL: 'trace',
    },
    cwd,
  );
  try {
    await fake.waitFor(() => fake.gatewayIdentifies.length > 0 || undefined, 30_000, 'gateway identify');
    await fake.waitFor(() => /connected to Discord/.test(run.output()), 10_000, 'ready log');
    const interaction = fake.slash('imagine', { prompt: 'a process test', seed: 9 }, { user: fake.user('proc') });
    await interaction.waitFor((i) => isResult(i.original), 30_000, 'result');
    assert.equal(fake.gatewayIdentifies[0].intents, (1 << 0) | (1 << 10), 'intents Guilds + GuildMessageReactions');

    run.kill('SIGTERM');
    assert.equal(await run.exited, 0);
    const out = run.output();
    assert.ok(!out.includes(fake.token), 'the token never appears in the logs');
    assert.match(out, /Provided token: \[secret\]/, "discord.js's debug line was scrubbed, not dropped");
    assert.ok(!out.includes(interaction.token), 'interaction tokens are not logged either');
  } finally {
    run.kill('SIGKILL');
    await fake.close();
    rmSync(cwd, { recursive: true, force: true });
  }
});
