// `npm start`: reads .env, validates the configuration, starts the engine threads and the bot, and
// stops it on SIGTERM/SIGINT or when Discord closes the connection for good (docs/bot.md, "Running it").
import { config as loadDotenv } from 'dotenv';
import { startEnginePool } from '../engine-host/engine-pool.ts';
import { createLogger } from '../log/logger.ts';
import { startBot } from './bot.ts';
import { loadConfigOrExit } from './config.ts';

/** Exit statuses, for a supervisor (systemd Restart=always restarts on every one of them). */
const EXIT = {
  /** Stopped by SIGTERM or SIGINT (also when the shutdown ran past its deadline). */
  stopped: 0,
  /** The configuration is invalid, the engine could not load, or Discord refused the bot at startup. */
  couldNotStart: 1,
  /** The connection to Discord was lost for good while running (e.g. 4004: the token was reset). */
  gatewayLost: 2,
} as const;

/**
 * How long a shutdown may take before the process exits anyway (systemd's TimeoutStopSec defaults to
 * 90 s, Docker's stop to 10 s). REST calls held back by a rate limit are never waited for; this bounds
 * whatever else might hang (a gateway that does not answer the close, an engine that does not stop).
 */
const SHUTDOWN_DEADLINE_MS = 8000;

async function main(): Promise<void> {
  loadDotenv({ quiet: true });
  const config = loadConfigOrExit(process.env);
  const logger = createLogger({ level: config.logLevel, secrets: [config.discordToken] });
  process.on('unhandledRejection', (reason) => logger.error({ err: reason }, 'unhandled rejection'));

  const bot = await startBot({
    config,
    logger,
    engineFactory: (c) => startEnginePool({ modelDir: c.modelDir, executionProvider: c.executionProvider, warmUp: true }, c.queueConcurrency),
  });

  let stopping = false;
  const shutdown = (exitCode: number): void => {
    if (stopping) return;
    stopping = true;
    const deadline = setTimeout(() => {
      logger.warn(
        { pending: bot.pending() },
        `shutdown still unfinished after ${SHUTDOWN_DEADLINE_MS / 1000} s; exiting anyway (unfinished jobs stay queued for the next start)`,
      );
      bot.abandon();
      process.exit(exitCode);
    }, SHUTDOWN_DEADLINE_MS);
    bot.stop().then(
      () => process.exit(exitCode),
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        bot.abandon();
        process.exit(exitCode === EXIT.stopped ? 1 : exitCode);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) return;
    logger.info({ signal }, 'shutting down; unfinished jobs stay queued for the next start');
    shutdown(EXIT.stopped);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  void bot.gatewayLost.then((loss) => {
    if (stopping) return;
    logger.error(
      { code: loss.code },
      `${loss.message}. Stopping (unfinished jobs stay queued) and exiting with status ${EXIT.gatewayLost} for the supervisor to restart the bot`,
    );
    shutdown(EXIT.gatewayLost);
  });
}

main().catch((error: unknown) => {
  // Startup failures (engine could not load the package, Discord refused the token, …): say why and stop.
  const message = error instanceof Error ? error.message : String(error);
  const token = process.env.DISCORD_TOKEN;
  console.error(`The bot could not start: ${token && token.length >= 8 ? message.split(token).join('[secret]') : message}`);
  process.exit(EXIT.couldNotStart);
});
