// What a supervisor (systemd Restart=always) sees of `npm start`: the connection to Discord lost for
// good ends the process with status 2 and the reason in words; transient closes do not end it; SIGTERM
// ends it even while a REST call waits out a rate limit of an hour; unfinished jobs stay queued.
// No test measures time: each step waits for an explicit sign (a gateway identify, a log line, a
// request the fake received), and the bounds on waiting for an exit only fail a process that never exits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { commands } from '../src/bot/commands/index.ts';
import { JOB_DATABASE_FILE } from '../src/bot/bot.ts';
import { JobStore, type JobRecord } from '../src/store/job-store.ts';
import { FakeDiscord, type FakeInteraction } from '../src/testing/fake-discord.ts';
import { BotHarness, FIXTURE_PACKAGE, isResult } from './support/bot-harness.ts';
import { exitStatus, logLines, runMain, type BotProcess } from './support/bot-process.ts';
import { ProceduralTestEngine } from './support/procedural-engine.ts';

const EXIT_BOUND_MS = 60_000;
const PINO_ERROR = 50;

async function startFake(): Promise<FakeDiscord> {
  return FakeDiscord.start({ commands: commands.map((c) => c.data.toJSON()) });
}

function startProcess(fake: FakeDiscord, dataDir: string, cwd: string): BotProcess {
  return runMain(
    {
      DISCORD_TOKEN: fake.token,
      DISCORD_APPLICATION_ID: fake.applicationId,
      DISCORD_API_URL: fake.apiBase,
      MODEL_DIR: FIXTURE_PACKAGE,
      DATA_DIR: dataDir,
      // debug: the "rate limited" line is the hand-off that the bot holds a request back.
      LOG_LEVEL: 'debug',
    },
    cwd,
  );
}

async function connected(fake: FakeDiscord, run: BotProcess, logsSoFar = 0): Promise<void> {
  await fake.waitFor(
    () => logLines(run.output()).filter((l) => l.msg === 'connected to Discord').length > logsSoFar || !run.running() || undefined,
    30_000,
    'the bot to connect',
  );
  assert.ok(run.running(), `the bot exited while starting:\n${run.output()}`);
}

/** Sends /imagine while the bot's edits of its replies are answered 429 with retry_after 3600, and waits until the bot holds one back. */
async function imagineStuckBehindRateLimit(fake: FakeDiscord, run: BotProcess, global: boolean): Promise<FakeInteraction> {
  fake.failRequests({ method: 'PATCH', path: /^\/webhooks\//, status: 429, retryAfter: 3600, global });
  const interaction = fake.slash('imagine', { prompt: 'a job that outlives the process', seed: 4 }, { user: fake.user('patient') });
  await interaction.waitFor((i) => i.acknowledged, 30_000, 'the deferral');
  await fake.waitFor(() => fake.requestsTo('PATCH', /^\/webhooks\//).some((r) => r.status === 429), 30_000, 'a 429 on the first edit');
  await fake.waitFor(() => logLines(run.output()).some((l) => l.msg === 'rate limited'), 30_000, 'the bot to hold the edit back');
  return interaction;
}

/** SQLite in WAL mode removes its -wal file when the last connection closes cleanly. */
function closedCleanly(dataDir: string): boolean {
  return existsSync(path.join(dataDir, JOB_DATABASE_FILE)) && !existsSync(path.join(dataDir, `${JOB_DATABASE_FILE}-wal`));
}

function unfinishedJobs(dataDir: string): JobRecord[] {
  const store = new JobStore(path.join(dataDir, JOB_DATABASE_FILE));
  try {
    return store.unfinished();
  } finally {
    store.close();
  }
}

test('Discord closing the gateway with 4004 (token reset) ends the process with status 2, the reason in one error line, and the unfinished job kept', async () => {
  const fake = await startFake();
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-ops-'));
  const dataDir = path.join(cwd, 'data');
  const run = startProcess(fake, dataDir, cwd);
  try {
    await connected(fake, run);
    // The job's messages wait behind the global rate limit: nothing REST gets through any more.
    const interaction = await imagineStuckBehindRateLimit(fake, run, true);

    fake.closeGateway(4004, 'Authentication failed.');
    assert.equal(await exitStatus(run, EXIT_BOUND_MS, 'after close 4004'), 2);

    const out = run.output();
    const errors = logLines(out).filter((l) => l.level >= PINO_ERROR);
    assert.equal(errors.length, 1, `one error line:\n${out}`);
    assert.match(errors[0].msg, /Discord refused the token \(close 4004\): check DISCORD_TOKEN/);
    assert.equal(errors[0].code, 4004);
    assert.ok(logLines(out).some((l) => l.msg === 'stopped'), 'the shutdown ran to its end');
    assert.ok(!out.includes(fake.token) && !out.includes(interaction.token), 'no token in the logs');
    assert.ok(closedCleanly(dataDir), 'the SQLite store was closed');

    const jobs = unfinishedJobs(dataDir);
    assert.deepEqual(
      jobs.map((j) => [j.request.prompt, j.status]),
      [['a job that outlives the process', 'queued']],
    );
  } finally {
    run.kill('SIGKILL');
    await fake.close();
    rmSync(cwd, { recursive: true, force: true });
  }
});

test('transient gateway closes (4000, 1001, a dropped connection, 1000, 4008) do not end the process: discord.js resumes or identifies again and the bot still answers', async () => {
  const fake = await startFake();
  fake.acceptResume = true;
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-ops-'));
  const run = startProcess(fake, path.join(cwd, 'data'), cwd);
  try {
    await connected(fake, run);
    const user = fake.user('steady');
    // What @discordjs/ws 1.2 does on each: resume (4000, 1001 and other unlisted codes), identify again
    // (1000, 4008); a dropped connection resumes, or identifies again when the socket reported a network error.
    const closes: [number | 'drop', 'resume' | 'identify' | 'either'][] = [
      [4000, 'resume'],
      [1001, 'resume'],
      ['drop', 'either'],
      [1000, 'identify'],
      [4008, 'identify'],
    ];
    for (const [n, [close, expected]] of closes.entries()) {
      const identified = fake.gatewayIdentifies.length;
      const resumed = fake.gatewayResumes.length;
      if (close === 'drop') fake.dropGateway();
      else fake.closeGateway(close, 'test');
      const back = await fake.waitFor(
        () =>
          fake.gatewayResumes.length > resumed ? 'resume' : fake.gatewayIdentifies.length > identified ? 'identify' : !run.running() ? 'exited' : undefined,
        30_000,
        `the bot to come back after ${close}`,
      );
      assert.notEqual(back, 'exited', `the bot exited after close ${close}:\n${run.output()}`);
      if (expected !== 'either') assert.equal(back, expected, `after close ${close}`);
      if (n === 0 || n === closes.length - 1) {
        const interaction = fake.slash('imagine', { prompt: `after ${close}`, seed: n }, { user });
        await interaction.waitFor((i) => isResult(i.original), 30_000, `the result after ${close}`);
      }
    }
    assert.ok(run.running());
    const lines = logLines(run.output());
    assert.deepEqual(lines.filter((l) => l.level >= PINO_ERROR), [], 'no error lines');
    assert.ok(lines.some((l) => l.msg === 'gateway connection closed; discord.js reconnects'));

    run.kill('SIGTERM');
    assert.equal(await exitStatus(run, EXIT_BOUND_MS, 'after SIGTERM'), 0);
  } finally {
    run.kill('SIGKILL');
    await fake.close();
    rmSync(cwd, { recursive: true, force: true });
  }
});

test('SIGTERM ends the process while an edit waits out a 429 with retry_after 3600; the unfinished job runs after the restart', async () => {
  const fake = await startFake();
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-ops-'));
  const dataDir = path.join(cwd, 'data');
  const first = startProcess(fake, dataDir, cwd);
  let second: BotProcess | undefined;
  try {
    await connected(fake, first);
    const interaction = await imagineStuckBehindRateLimit(fake, first, false);

    first.kill('SIGTERM');
    assert.equal(await exitStatus(first, EXIT_BOUND_MS, 'after SIGTERM'), 0);
    const lines = logLines(first.output());
    const heldBack = lines.find((l) => l.msg.startsWith('not waiting for REST requests held back by a rate limit'));
    assert.ok(heldBack, `the shutdown names what it did not wait for:\n${first.output()}`);
    assert.match(String((heldBack.requests as string[])[0]), /^PATCH \/webhooks\/:id\/:token\/messages\/\S+ \(rate limited for another \d+ s\)$/);
    assert.ok(!first.output().includes(interaction.token), 'routes are logged without the interaction token');
    assert.ok(closedCleanly(dataDir), 'the SQLite store was closed');
    assert.deepEqual(unfinishedJobs(dataDir).map((j) => [j.request.prompt, j.status]), [['a job that outlives the process', 'queued']]);

    fake.clearFailures();
    second = startProcess(fake, dataDir, cwd);
    await connected(fake, second);
    await interaction.waitFor((i) => isResult(i.original), 30_000, 'the restored job to finish');
    assert.ok(logLines(second.output()).some((l) => l.msg === 'restored unfinished jobs' && l.restored === 1));
    // Marked done once Discord has taken the result, so after the fake shows it: wait for the store.
    await fake.waitFor(() => unfinishedJobs(dataDir).length === 0, 10_000, 'the job to be marked done');

    second.kill('SIGTERM');
    assert.equal(await exitStatus(second, EXIT_BOUND_MS, 'after the second SIGTERM'), 0);
  } finally {
    first.kill('SIGKILL');
    second?.kill('SIGKILL');
    await fake.close();
    rmSync(cwd, { recursive: true, force: true });
  }
});

test('a shutdown that hangs (the gateway stops answering, even the close) ends at its deadline with status 0, naming what it waited for', async () => {
  const fake = await startFake();
  const cwd = mkdtempSync(path.join(tmpdir(), 'bot-ops-'));
  const dataDir = path.join(cwd, 'data');
  const run = startProcess(fake, dataDir, cwd);
  try {
    await connected(fake, run);
    fake.freezeGateway();
    run.kill('SIGTERM');
    assert.equal(await exitStatus(run, EXIT_BOUND_MS, 'after SIGTERM'), 0);
    const lines = logLines(run.output());
    const late = lines.find((l) => l.msg.startsWith('shutdown still unfinished after 8 s; exiting anyway'));
    assert.ok(late, `the deadline's line:\n${run.output()}`);
    assert.deepEqual(late.pending, ['waiting for the Discord gateway to close']);
    assert.ok(!lines.some((l) => l.msg === 'stopped'));
    assert.ok(closedCleanly(dataDir), 'the SQLite store was closed');
  } finally {
    run.kill('SIGKILL');
    await fake.close();
    rmSync(cwd, { recursive: true, force: true });
  }
});

test('a gateway that refuses the bot while it logs in fails the start with the reason in words, not "Authentication failed"', async () => {
  const fake = await startFake();
  const dataDir = mkdtempSync(path.join(tmpdir(), 'bot-ops-'));
  try {
    for (const [code, reason] of [
      [4004, /^Discord refused the token \(close 4004\): check DISCORD_TOKEN/],
      [4014, /^Discord refused the gateway intents \(close 4014, disallowed intents\)/],
    ] as const) {
      fake.refuseIdentifyWith = code;
      await assert.rejects(BotHarness.start({ fake, dataDir, engine: async () => new ProceduralTestEngine() }), { message: reason });
    }
  } finally {
    await fake.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
