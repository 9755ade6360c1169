// Starts the real bot (real discord.js client) against the fake Discord, with a throwaway DATA_DIR.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { commands } from '../../src/bot/commands/index.ts';
import { startBot, type RunningBot } from '../../src/bot/bot.ts';
import { loadConfig, type BotConfig } from '../../src/bot/config.ts';
import type { EngineClient, PackageInfo } from '../../src/engine/api.ts';
import type { JobRecord } from '../../src/store/job-store.ts';
import { parseParameters, readPngText } from '../../src/engine/render/index.ts';
import { FakeDiscord, type FakeInteraction, type FakeMessage, type FakeUser, type OptionValue } from '../../src/testing/fake-discord.ts';
import { ProceduralTestEngine } from './procedural-engine.ts';
import { startEngineThread } from '../../src/engine-host/engine-thread.ts';

/**
 * The engine every end-to-end bot test runs on: the real engine (worker thread) on the fixture
 * package. BOT_TEST_ENGINE=procedural swaps in the procedural test double (no models, faster).
 */
export async function createTestEngine(): Promise<EngineClient> {
  if (process.env.BOT_TEST_ENGINE === 'procedural') return new ProceduralTestEngine({ stepDelayMs: 15 });
  return startEngineThread({ modelDir: FIXTURE_PACKAGE });
}

export const FIXTURE_PACKAGE = fileURLToPath(new URL('../fixtures/tiny', import.meta.url));

export interface HarnessOptions {
  /** Extra environment (as in .env) on top of what points the bot at the fake. */
  env?: Record<string, string>;
  /** Wraps or replaces the test engine. */
  engine?: () => Promise<EngineClient>;
  fake?: FakeDiscord;
  dataDir?: string;
  tokenLifetimeMs?: number;
  /** The bot's clock for jobs and daily quotas (tests move days on it); Date.now when absent. */
  clock?: () => number;
}

export class BotHarness {
  private constructor(
    readonly fake: FakeDiscord,
    public bot: RunningBot,
    readonly dataDir: string,
    readonly config: BotConfig,
    private readonly options: HarnessOptions,
    private readonly ownsDataDir: boolean,
  ) {}

  static async start(options: HarnessOptions = {}): Promise<BotHarness> {
    const fake = options.fake ?? (await FakeDiscord.start({ commands: commands.map((c) => c.data.toJSON()) }));
    fake.setCommands(commands.map((c) => c.data.toJSON()));
    const dataDir = options.dataDir ?? mkdtempSync(path.join(tmpdir(), 'bot-test-'));
    const config = loadConfig({
      DISCORD_TOKEN: fake.token,
      DISCORD_APPLICATION_ID: fake.applicationId,
      DISCORD_API_URL: fake.apiBase,
      DATA_DIR: dataDir,
      LOG_LEVEL: process.env.BOT_TEST_LOG_LEVEL ?? 'silent',
      ...options.env,
    });
    const bot = await BotHarness.launch(config, options);
    return new BotHarness(fake, bot, dataDir, config, options, options.dataDir === undefined);
  }

  private static launch(config: BotConfig, options: HarnessOptions): Promise<RunningBot> {
    return startBot({
      config,
      engineFactory: options.engine ?? createTestEngine,
      messenger: { retryDelayMs: 20, ...(options.tokenLifetimeMs ? { tokenLifetimeMs: options.tokenLifetimeMs } : {}) },
      clock: options.clock,
    });
  }

  get info(): PackageInfo {
    return this.bot.info;
  }

  /** Stops the bot (as a shutdown would) and starts a new one on the same fake Discord and data. */
  async restart(options: Pick<HarnessOptions, 'engine' | 'env'> & { downtimeMs?: number } = {}): Promise<void> {
    await this.bot.stop();
    if (options.downtimeMs) await new Promise((resolve) => setTimeout(resolve, options.downtimeMs));
    const config = options.env ? { ...this.config, ...loadConfig({ ...configEnv(this.config), ...options.env }) } : this.config;
    this.bot = await BotHarness.launch(config, { ...this.options, ...options });
  }

  imagine(user: FakeUser, options: Record<string, OptionValue | undefined>, channelId?: string): FakeInteraction {
    return this.fake.slash('imagine', options, { user, channelId });
  }

  /** Waits for the interaction's original response to become a finished result (it has buttons). */
  async result(interaction: FakeInteraction, timeoutMs = 20_000): Promise<FakeMessage> {
    return interaction.waitFor((i) => (isResult(i.original) ? i.original : undefined), timeoutMs, `result of ${interaction.id}`);
  }

  /** The stored job behind a message, once the bot has recorded how it ended (it learns ids from Discord's replies). */
  async job(messageId: string, timeoutMs = 5000): Promise<JobRecord> {
    return this.fake.waitFor(
      () => {
        const job = this.bot.store.findByMessage(messageId);
        return job && job.status !== 'queued' && job.status !== 'running' && (job.status !== 'done' || job.resultMessageId) ? job : undefined;
      },
      timeoutMs,
      `job of message ${messageId}`,
    );
  }

  async close(): Promise<void> {
    await this.bot.stop();
    await this.fake.close();
    if (this.ownsDataDir) rmSync(this.dataDir, { recursive: true, force: true });
  }
}

function configEnv(config: BotConfig): Record<string, string> {
  return {
    DISCORD_TOKEN: config.discordToken,
    DISCORD_APPLICATION_ID: config.applicationId,
    DISCORD_API_URL: config.apiUrl ?? '',
    DATA_DIR: config.dataDir,
    LOG_LEVEL: config.logLevel,
  };
}

/** A finished result message: it carries buttons. */
export function isResult(message: FakeMessage | undefined): boolean {
  return message !== undefined && !message.deleted && message.components.length > 0;
}

/** The A1111 parameters embedded in a PNG attachment. */
export function pngParameters(data: Buffer): ReturnType<typeof parseParameters> {
  const text = readPngText(data).parameters;
  if (text === undefined) throw new Error('PNG has no parameters chunk');
  return parseParameters(text);
}

export function embedField(message: FakeMessage, name: string): string | undefined {
  const fields = (message.embeds[0]?.fields as { name: string; value: string }[] | undefined) ?? [];
  return fields.find((f) => f.name === name)?.value;
}

export const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
