// `npm start`: reads .env, validates the configuration, starts the engine threads and the bot.
import { config as loadDotenv } from 'dotenv';
import { startEnginePool } from '../engine-host/engine-pool.ts';
import { createLogger } from '../log/logger.ts';
import { startBot } from './bot.ts';
import { loadConfigOrExit } from './config.ts';

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
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down; unfinished jobs stay queued for the next start');
    bot.stop().then(
      () => process.exit(0),
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGINT', () => shutdown('SIGINT'));
  process.once('SIGTERM', () => shutdown('SIGTERM'));
}

main().catch((error: unknown) => {
  // Startup failures (engine could not load the package, Discord refused the token, …): say why and stop.
  const message = error instanceof Error ? error.message : String(error);
  const token = process.env.DISCORD_TOKEN;
  console.error(`The bot could not start: ${token && token.length >= 8 ? message.split(token).join('[secret]') : message}`);
  process.exit(1);
});
