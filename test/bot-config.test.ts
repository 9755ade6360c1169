import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { commands } from '../src/bot/commands/index.ts';
import { readFileSync } from 'node:fs';
import { parse as parseDotenv } from 'dotenv';
import { CONFIG_VARIABLES, ConfigError, loadConfig } from '../src/bot/config.ts';
import { deployCommands } from '../src/bot/deploy-commands.ts';
import { createLogger } from '../src/log/logger.ts';
import { FakeDiscord } from '../src/testing/fake-discord.ts';

const BASE = { DISCORD_TOKEN: 'abc.def.ghi-secret-token', DISCORD_APPLICATION_ID: '123456789012345678' };

test('defaults fill everything but the token and application id', () => {
  const config = loadConfig(BASE);
  assert.deepEqual(config, {
    discordToken: BASE.DISCORD_TOKEN,
    applicationId: BASE.DISCORD_APPLICATION_ID,
    guildId: undefined,
    apiUrl: undefined,
    modelDir: 'models/demo',
    executionProvider: 'cpu',
    queueConcurrency: 1,
    maxJobsPerUser: 2,
    queueMax: 50,
    jobTimeoutMs: 600_000,
    progressIntervalMs: 3000,
    allowedChannelIds: [],
    blockedWords: [],
    dataDir: './data',
    logLevel: 'info',
  });
});

test('values are parsed, trimmed and normalised; empty values count as unset', () => {
  const config = loadConfig({
    ...BASE,
    DISCORD_GUILD_ID: ' 223456789012345678 ',
    DISCORD_API_URL: 'http://127.0.0.1:3000/api/',
    EXECUTION_PROVIDER: 'CUDA',
    QUEUE_CONCURRENCY: '3',
    MAX_JOBS_PER_USER: '5',
    QUEUE_MAX: '',
    ALLOWED_CHANNEL_IDS: '323456789012345678, 423456789012345678,',
    BLOCKED_WORDS: 'Gore,  nsfw ,',
    LOG_LEVEL: 'DEBUG',
  });
  assert.equal(config.guildId, '223456789012345678');
  assert.equal(config.apiUrl, 'http://127.0.0.1:3000/api');
  assert.equal(config.executionProvider, 'cuda');
  assert.equal(config.queueConcurrency, 3);
  assert.equal(config.maxJobsPerUser, 5);
  assert.equal(config.queueMax, 50);
  assert.deepEqual(config.allowedChannelIds, ['323456789012345678', '423456789012345678']);
  assert.deepEqual(config.blockedWords, ['gore', 'nsfw']);
  assert.equal(config.logLevel, 'debug');
});

test('every problem is reported at once, and the token never appears in the message', () => {
  try {
    loadConfig({
      DISCORD_TOKEN: '',
      DISCORD_APPLICATION_ID: 'my-app',
      DISCORD_API_URL: 'localhost:3000',
      QUEUE_CONCURRENCY: '0',
      MAX_JOBS_PER_USER: '1.5',
      EXECUTION_PROVIDER: 'tpu',
      LOG_LEVEL: 'loud',
    });
    assert.fail('should have thrown');
  } catch (error) {
    assert.ok(error instanceof ConfigError);
    assert.equal(error.problems.length, 7);
    assert.match(error.message, /DISCORD_TOKEN is missing/);
    assert.match(error.message, /DISCORD_APPLICATION_ID/);
    assert.match(error.message, /DISCORD_API_URL must be an http\(s\) URL/);
    assert.match(error.message, /QUEUE_CONCURRENCY must be a whole number from 1 to 64 \(got "0"\)/);
    assert.match(error.message, /MAX_JOBS_PER_USER .*"1.5"/);
    assert.match(error.message, /EXECUTION_PROVIDER must be cpu or cuda/);
    assert.match(error.message, /LOG_LEVEL must be one of/);
  }
  try {
    loadConfig({ ...BASE, QUEUE_MAX: '-1' });
    assert.fail('should have thrown');
  } catch (error) {
    assert.ok(!(error as Error).message.includes(BASE.DISCORD_TOKEN));
  }
});

test('the logger replaces secrets in messages, fields and errors', () => {
  let out = '';
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      out += chunk.toString();
      done();
    },
  });
  const logger = createLogger({ level: 'trace', secrets: [BASE.DISCORD_TOKEN], destination: sink });
  logger.trace(`Provided token: ${BASE.DISCORD_TOKEN}`);
  logger.info({ detail: { note: `x ${BASE.DISCORD_TOKEN} y` }, token: 'interaction-token-value' }, 'fields');
  logger.error({ err: Object.assign(new Error(`bad ${BASE.DISCORD_TOKEN}`), { code: 50027, status: 401, url: 'https://x/webhooks/1/interaction-token-value' }) }, 'boom');
  assert.ok(!out.includes(BASE.DISCORD_TOKEN));
  assert.ok(!out.includes('interaction-token-value'));
  assert.match(out, /Provided token: \[secret\]/);
  assert.match(out, /"code":50027/);
  assert.match(out, /"status":401/);
});

test('deploy-commands registers every command for the guild when DISCORD_GUILD_ID is set, else globally', async () => {
  const fake = await FakeDiscord.start();
  try {
    const config = { discordToken: fake.token, applicationId: fake.applicationId, apiUrl: fake.apiBase };
    const guild = await deployCommands({ ...config, guildId: fake.guildId });
    assert.equal(guild.scope, 'guild');
    assert.deepEqual(guild.names, ['imagine', 'models', 'queue', 'cancel', 'settings', 'admin']);
    const registered = fake.deployedCommands.get(fake.guildId)!;
    const imagine = registered.find((c) => c.name === 'imagine') as { options: { name: string; autocomplete?: boolean; choices?: unknown[] }[] };
    assert.deepEqual(
      imagine.options.map((o) => o.name),
      ['prompt', 'model', 'mode', 'negative', 'seed', 'steps', 'guidance', 'scheduler', 'size', 'count', 'contributions', 'image', 'strength'],
    );
    assert.equal(imagine.options.find((o) => o.name === 'model')?.autocomplete, true);
    assert.equal(imagine.options.find((o) => o.name === 'scheduler')?.choices?.length, 4);
    const modes = imagine.options.find((o) => o.name === 'mode')?.choices as { name: string; value: string }[];
    assert.deepEqual(modes.map((c) => c.value), ['single', 'average', 'merge', 'fuse', 'afa']);
    assert.match(modes[3].name, /^Fuse — training-free/);
    assert.ok(registered.every((c) => JSON.stringify(c.contexts) === '[0]'), 'server channels only');
    assert.equal(fake.requestsTo('PUT', /^\/applications\/\d+\/guilds\/\d+\/commands$/)[0].auth, `Bot ${fake.token}`);

    const global = await deployCommands(config);
    assert.equal(global.scope, 'global');
    assert.equal(fake.deployedCommands.get('global')?.length, commands.length);
  } finally {
    await fake.close();
  }
});

test('.env.example documents every variable and its values are valid', () => {
  const example = parseDotenv(readFileSync(new URL('../.env.example', import.meta.url)));
  assert.deepEqual(Object.keys(example).sort(), [...CONFIG_VARIABLES].sort());
  const config = loadConfig({ ...example, ...BASE });
  assert.equal(config.modelDir, 'models/demo');
  assert.equal(config.progressIntervalMs, 3000);
});
