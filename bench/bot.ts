// `npm run bench:bot [-- --json] [--model-dir DIR] [--commands N] [--jobs N] [--steps N] [--concurrency N]`
// The bot under load, through the real discord.js client and the fake Discord on 127.0.0.1:
//  1. acknowledgement latency (p50/p99/max) of N concurrent /imagine while a generation runs;
//  2. jobs per minute through the whole bot (queue, engine thread, PNG rendering, Discord edits)
//     against the engine alone (the same engine thread, generate() back to back).
// The fake Discord runs in the same process as the bot, so its own work is included in the latency.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { commands } from '../src/bot/commands/index.ts';
import { startBot } from '../src/bot/bot.ts';
import { loadConfig } from '../src/bot/config.ts';
import { createLogger } from '../src/log/logger.ts';
import type { GenerateRequest } from '../src/engine/api.ts';
import { startEngineThread } from '../src/engine-host/engine-thread.ts';
import { FakeDiscord } from '../src/testing/fake-discord.ts';

const { values } = parseArgs({
  options: {
    json: { type: 'boolean' },
    'model-dir': { type: 'string' },
    commands: { type: 'string', default: '50' },
    jobs: { type: 'string', default: '10' },
    steps: { type: 'string' },
    concurrency: { type: 'string', default: '1' },
  },
});

const modelDir = path.resolve(
  values['model-dir'] ?? process.env.MODEL_DIR ?? (existsSync('models/demo/manifest.json') ? 'models/demo' : 'test/fixtures/tiny'),
);
const executionProvider = process.env.EXECUTION_PROVIDER === 'cuda' ? 'cuda' : 'cpu';
const commandCount = Number(values.commands);
const jobCount = Number(values.jobs);
const concurrency = Number(values.concurrency);
const log = (s: string): void => void process.stderr.write(`${s}\n`);
const prompt = 'a red circle on the left and a blue square on the right, white background';

function percentile(xs: number[], p: number): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

// ---- 1. the engine alone -------------------------------------------------------------------------
const engine = await startEngineThread({ modelDir, executionProvider });
const info = await engine.info();
const steps = values.steps ? Number(values.steps) : info.defaults.steps;
const model = info.ensembles[0]?.id ?? info.experts[0].id;
const request = (seed: number): GenerateRequest =>
  info.ensembles[0] ? { prompt, mode: 'afa', ensemble: model, seed, steps } : { prompt, mode: 'single', experts: [model], seed, steps };
log(`bench:bot ${info.name}@${info.version} (${modelDir}), ${executionProvider}, ${cpus().length} cores, model ${model}, ${steps} steps`);
await engine.generate(request(1));
const engineStart = performance.now();
for (let i = 0; i < jobCount; i++) await engine.generate(request(100 + i));
const engineSeconds = (performance.now() - engineStart) / 1000;
await engine.dispose();
const engineJobsPerMinute = (jobCount / engineSeconds) * 60;
log(`engine alone: ${jobCount} jobs in ${engineSeconds.toFixed(1)} s → ${engineJobsPerMinute.toFixed(1)} jobs/min`);

// ---- 2. through the bot ---------------------------------------------------------------------------
const fake = await FakeDiscord.start({ commands: commands.map((c) => c.data.toJSON()) });
const dataDir = mkdtempSync(path.join(tmpdir(), 'bench-bot-'));
const config = loadConfig({
  DISCORD_TOKEN: fake.token,
  DISCORD_APPLICATION_ID: fake.applicationId,
  DISCORD_API_URL: fake.apiBase,
  DATA_DIR: dataDir,
  MODEL_DIR: modelDir,
  EXECUTION_PROVIDER: executionProvider,
  QUEUE_CONCURRENCY: String(concurrency),
  QUEUE_MAX: String(Math.max(50, commandCount + jobCount)),
  LOG_LEVEL: 'warn',
});
const bot = await startBot({
  config,
  logger: createLogger({ level: 'warn', secrets: [config.discordToken] }),
  engineFactory: (c) => startEngineThread({ modelDir: c.modelDir, executionProvider: c.executionProvider }),
});
const BURST_SEED = 100_000;
const optionsFor = (seed: number) => ({ prompt, model, seed, steps });
const isDone = (message: { components: unknown[]; deleted: boolean } | undefined): boolean =>
  message !== undefined && !message.deleted && message.components.length > 0;

try {
  // Warm-up (first PNG encode, first REST calls).
  const warm = fake.slash('imagine', optionsFor(1), { user: fake.user('warm') });
  await fake.waitFor(() => isDone(warm.original), 600_000, 'warm-up result');

  // Acknowledgements while the engine is busy: one job runs, then N commands arrive at once.
  const busy = fake.slash('imagine', optionsFor(2), { user: fake.user('busy') });
  await fake.waitFor(() => bot.jobs.queue.runningCount > 0, 60_000, 'a running generation');
  const burst = Array.from({ length: commandCount }, (_, i) => fake.slash('imagine', optionsFor(BURST_SEED + i), { user: fake.user(`burst${i}`) }));
  await fake.waitFor(() => burst.every((i) => i.acknowledged), 60_000, 'acknowledgements');
  const ackLatencies = burst.map((i) => i.ackLatencyMs!);
  const busyDuringBurst = bot.jobs.queue.runningCount > 0;
  const refused = burst.filter((i) => i.acks[0].type !== 5).length;
  log(`acks: ${commandCount} concurrent /imagine, p50 ${percentile(ackLatencies, 50)} ms, p99 ${percentile(ackLatencies, 99)} ms, max ${Math.max(...ackLatencies)} ms${busyDuringBurst ? ', engine busy' : ''}`);
  for (const waiting of bot.jobs.queue.snapshot().waiting) await bot.jobs.cancel(waiting.id, 'bench');
  await fake.waitFor(() => isDone(busy.original) && bot.jobs.queue.runningCount === 0, 600_000, 'queue drained');
  await new Promise((resolve) => setTimeout(resolve, 500));

  // Throughput: J jobs from J people, from the first command to the last result message.
  const throughputStart = performance.now();
  const throughput = Array.from({ length: jobCount }, (_, i) => fake.slash('imagine', optionsFor(1000 + i), { user: fake.user(`worker${i}`) }));
  await fake.waitFor(() => throughput.every((i) => isDone(i.original)), 3_600_000, 'throughput results');
  const botSeconds = (performance.now() - throughputStart) / 1000;
  const botJobsPerMinute = (jobCount / botSeconds) * 60;
  log(`through the bot: ${jobCount} jobs in ${botSeconds.toFixed(1)} s → ${botJobsPerMinute.toFixed(1)} jobs/min (${((botJobsPerMinute / engineJobsPerMinute) * 100).toFixed(0)}% of the engine alone)`);

  const summary = {
    package: `${info.name}@${info.version}`,
    executionProvider,
    cores: cpus().length,
    steps,
    model,
    concurrentCommands: commandCount,
    ackP50Ms: percentile(ackLatencies, 50),
    ackP99Ms: percentile(ackLatencies, 99),
    ackMaxMs: Math.max(...ackLatencies),
    refused,
    engineBusyDuringBurst: busyDuringBurst,
    jobs: jobCount,
    engineJobsPerMinute: Number(engineJobsPerMinute.toFixed(2)),
    botJobsPerMinute: Number(botJobsPerMinute.toFixed(2)),
    botVsEngine: Number((botJobsPerMinute / engineJobsPerMinute).toFixed(3)),
  };
  if (values.json) console.log(JSON.stringify(summary));
  else console.table(summary);
} finally {
  await bot.stop();
  await fake.close();
  rmSync(dataDir, { recursive: true, force: true });
}
