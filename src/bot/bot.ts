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
import { createDiscordClient, RateLimitWatch, watchGateway, type GatewayLoss } from './client.ts';
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
  /**
   * Settles when the connection to Discord is lost for good (a close code discord.js does not
   * recover from, e.g. 4004 after the token was reset); never while discord.js resumes or reconnects.
   */
  gatewayLost: Promise<GatewayLoss>;
  /**
   * Graceful stop: running jobs are interrupted and stay queued in the store for the next start. It
   * never waits for REST calls held back by a rate limit (it names them in its log line), but it may
   * wait for the gateway or the engine to close: bound it (main.ts does).
   */
  stop(): Promise<void>;
  /** What a stop in progress still waits for, and the REST requests held back by a rate limit. */
  pending(): string[];
  /**
   * For a stop that is past its deadline, right before the process exits: marks the jobs that are
   * still running as queued and closes the SQLite store (synchronously).
   */
  abandon(): void;
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
    const rateLimits = new RateLimitWatch(discord.rest, logger);

    // A close that discord.js gives up on (4004 …) ends the login with a bare "Authentication failed",
    // or leaves `ready` pending forever: both end with the loss in words instead.
    let loss: GatewayLoss | undefined;
    let stopWatching = (): void => undefined;
    const gatewayLost = new Promise<GatewayLoss>((resolve) => {
      stopWatching = watchGateway(discord, logger, (lost) => {
        loss = lost;
        resolve(lost);
      });
    });
    const refused = gatewayLost.then((lost) => Promise.reject(new Error(lost.message)));
    refused.catch(() => undefined);
    const ready = new Promise<void>((resolve) => discord.once(Events.ClientReady, () => resolve()));
    try {
      await Promise.race([discord.login(config.discordToken), refused]);
      await Promise.race([ready, refused]);
    } catch (error) {
      throw loss ? new Error(loss.message, { cause: error }) : error;
    }
    logger.info({ user: discord.user?.tag, guilds: discord.guilds.cache.size }, 'connected to Discord');
    jobs.restore();

    const requeueRunning = (): number => {
      let requeued = 0;
      for (const job of store.unfinished()) {
        if (job.status !== 'running') continue;
        store.requeue(job.id);
        requeued++;
      }
      return requeued;
    };
    const abandon = (): void => {
      if (!store.db.open) return;
      requeueRunning();
      store.close();
    };
    let waitingFor: string | undefined;
    let stopping: Promise<void> | undefined;
    const stop = async (): Promise<void> => {
      discord.removeAllListeners(Events.InteractionCreate);
      discord.removeAllListeners(Events.MessageReactionAdd);
      waitingFor = 'running jobs to stop';
      await jobs.stop();
      // A job whose last message waits behind a rate limit is still marked running: queued, it runs again.
      const requeued = requeueRunning();
      const heldBack = rateLimits.describe();
      if (heldBack.length > 0) {
        logger.warn({ requests: heldBack, requeued }, 'not waiting for REST requests held back by a rate limit; their jobs run again at the next start');
      }
      stopWatching();
      waitingFor = 'the Discord gateway to close';
      await discord.destroy();
      waitingFor = 'the engine to stop';
      await engine!.dispose();
      waitingFor = undefined;
      abandon();
      logger.info('stopped');
    };
    return {
      client: discord,
      jobs,
      store,
      settings,
      guilds,
      engine,
      info,
      logger,
      gatewayLost,
      stop() {
        stopping ??= stop();
        return stopping;
      },
      pending() {
        return [...(waitingFor ? [`waiting for ${waitingFor}`] : []), ...rateLimits.describe()];
      },
      abandon,
    };
  } catch (error) {
    await client?.destroy().catch(() => undefined);
    await engine?.dispose().catch(() => undefined);
    store.close();
    throw error;
  }
}
