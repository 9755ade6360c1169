// Starts the bot: store, engine (in-process, or GPU workers through Redis), discord.js client, handlers;
// restores unfinished jobs once connected.
import path from 'node:path';
import { Events, type Client } from 'discord.js';
import type { EngineClient, PackageInfo } from '../engine/api.ts';
import { RemoteEngineClient } from '../distributed/remote-engine.ts';
import { packageId } from '../distributed/names.ts';
import { describeWorkers } from '../distributed/worker-summary.ts';
import { JobStore } from '../store/job-store.ts';
import { UserSettingsStore } from '../store/user-settings-store.ts';
import { GuildSettingsStore } from '../store/guild-settings-store.ts';
import { createLogger, type Logger } from '../log/logger.ts';
import { commands } from './commands/index.ts';
import { createDiscordClient } from './client.ts';
import type { BotConfig } from './config.ts';
import type { BotContext } from './context.ts';
import { createInteractionRouter } from './interactions.ts';
import { JobService, type JobServiceOptions } from './job-service.ts';
import { handleReaction } from './reactions.ts';

export type EngineFactory = (config: BotConfig) => Promise<EngineClient>;

export interface BotOptions {
  config: BotConfig;
  /**
   * Starts the embedded engine (the worker thread in production; a test double or the fixture in
   * tests). Not used with QUEUE_BACKEND=redis: then GPU workers run the jobs and the bot loads no model.
   */
  engineFactory: EngineFactory;
  logger?: Logger;
  /** Delivery tuning (tests shorten the retry delays). */
  messenger?: JobServiceOptions['messenger'];
  /** The clock of jobs and daily quotas (tests move it to another day); Date.now by default. */
  clock?: () => number;
}

export interface RunningBot {
  client: Client;
  jobs: JobService;
  store: JobStore;
  settings: UserSettingsStore;
  guilds: GuildSettingsStore;
  engine: EngineClient;
  info: PackageInfo;
  logger: Logger;
  /** Graceful stop: running jobs are interrupted and stay queued in the store for the next start. */
  stop(): Promise<void>;
}

export const JOB_DATABASE_FILE = 'jobs.sqlite';

export async function startBot(options: BotOptions): Promise<RunningBot> {
  const { config } = options;
  const logger = options.logger ?? createLogger({ level: config.logLevel, secrets: [config.discordToken] });
  // One database for jobs and settings (migrated to the current schema when opened).
  const store = new JobStore(path.join(config.dataDir, JOB_DATABASE_FILE));
  const settings = new UserSettingsStore(store.db);
  const guilds = new GuildSettingsStore(store.db);
  let engine: EngineClient | undefined;
  let client: Client | undefined;
  try {
    engine =
      config.queueBackend === 'redis'
        ? await RemoteEngineClient.connect({ redisUrl: config.redisUrl!, owner: config.applicationId, logger })
        : await options.engineFactory(config);
    const info = await engine.info();
    logger.info(
      { package: `${info.name}@${info.version}`, experts: info.experts.length, ensembles: info.ensembles.length, ep: info.executionProvider },
      'engine ready',
    );
    const discord = createDiscordClient(config);
    client = discord;
    const jobs = new JobService({
      rest: discord.rest,
      store,
      engine,
      info,
      config,
      logger,
      messenger: options.messenger,
      isPaused: (guildId) => guilds.isPaused(guildId),
      now: options.clock,
    });
    const remote = engine instanceof RemoteEngineClient ? engine : undefined;
    const ctx: BotContext = {
      config,
      info,
      jobs,
      store,
      settings,
      guilds,
      now: options.clock ?? Date.now,
      logger,
      describeWorkers: remote && (async () => describeWorkers(await remote.workers(), packageId(info))),
    };

    const route = createInteractionRouter(ctx, commands);
    discord.on(Events.InteractionCreate, (interaction) => void route(interaction));
    discord.on(Events.MessageReactionAdd, (reaction, user) => {
      handleReaction(reaction, user, ctx, discord.user?.id ?? config.applicationId).catch((error: unknown) =>
        logger.warn({ err: error }, 'reaction handling failed'),
      );
    });
    discord.on(Events.Error, (error) => logger.error({ err: error }, 'discord client error'));
    discord.on(Events.Warn, (message) => logger.warn(message));
    discord.on(Events.Debug, (message) => logger.trace(message));
    discord.rest.on('rateLimited', (info) => logger.debug({ route: info.route, retryAfter: info.retryAfter }, 'rate limited'));

    const ready = new Promise<void>((resolve) => discord.once(Events.ClientReady, () => resolve()));
    await discord.login(config.discordToken);
    await ready;
    logger.info({ user: discord.user?.tag, guilds: discord.guilds.cache.size }, 'connected to Discord');
    jobs.restore();

    let stopped = false;
    return {
      client: discord,
      jobs,
      store,
      settings,
      guilds,
      engine,
      info,
      logger,
      async stop() {
        if (stopped) return;
        stopped = true;
        discord.removeAllListeners(Events.InteractionCreate);
        discord.removeAllListeners(Events.MessageReactionAdd);
        await jobs.stop();
        await discord.destroy();
        await engine!.dispose();
        store.close();
        logger.info('stopped');
      },
    };
  } catch (error) {
    await client?.destroy().catch(() => undefined);
    await engine?.dispose().catch(() => undefined);
    store.close();
    throw error;
  }
}
