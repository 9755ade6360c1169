import { Client, Events, GatewayCloseCodes, GatewayIntentBits, Partials, type REST } from 'discord.js';
import type { Logger } from '../log/logger.ts';
import type { BotConfig } from './config.ts';

/**
 * The discord.js client: guild and reaction intents only (no message content), partials so that
 * reactions on messages outside the cache arrive, and `rest.api` pointed at DISCORD_API_URL when set
 * (discord.js then finds the gateway through GET /gateway/bot on that API).
 */
export function createDiscordClient(config: Pick<BotConfig, 'apiUrl'>): Client {
  return new Client({
    intents: [GatewayIntentBits.Guilds, GatewayIntentBits.GuildMessageReactions],
    partials: [Partials.Message, Partials.Reaction, Partials.User],
    allowedMentions: { parse: [] },
    failIfNotExists: false,
    ...(config.apiUrl ? { rest: { api: config.apiUrl } } : {}),
  });
}

/**
 * The gateway close codes after which discord.js 14 gives its shard up: @discordjs/ws neither resumes
 * nor reconnects, discord.js emits `shardDisconnect` (and `shardError`), and the process would stay up
 * without receiving anything. What each means for whoever runs the bot, in words.
 */
export const FATAL_GATEWAY_CLOSES: ReadonlyMap<number, string> = new Map([
  [GatewayCloseCodes.AuthenticationFailed, 'Discord refused the token (close 4004): check DISCORD_TOKEN (it was reset or is wrong; developer portal → Bot → Reset Token)'],
  [GatewayCloseCodes.InvalidShard, 'Discord refused the shard (close 4010, invalid shard): the bot connects as a single shard, so this is a bug to report'],
  [GatewayCloseCodes.ShardingRequired, 'Discord requires sharding (close 4011): the bot is in too many servers for one gateway connection'],
  [GatewayCloseCodes.InvalidAPIVersion, 'Discord refused the gateway API version (close 4012): update discord.js'],
  [GatewayCloseCodes.InvalidIntents, 'Discord refused the gateway intents (close 4013, invalid intents)'],
  [GatewayCloseCodes.DisallowedIntents, 'Discord refused the gateway intents (close 4014, disallowed intents): enable them for this bot in the developer portal (Bot → Privileged Gateway Intents)'],
]);

/** Why the connection to Discord is gone for good. */
export interface GatewayLoss {
  /** The gateway close code, when there was one. */
  code?: number;
  message: string;
}

/**
 * Calls `onLost` (once) when the gateway connection is lost for good: a close code from
 * FATAL_GATEWAY_CLOSES (or any other code discord.js reports through `shardDisconnect`, which 14.28
 * emits only for the codes it gives up on), or `invalidated` (declared by discord.js 14 but no longer
 * emitted: an invalid session (op 9) makes it identify again). Transient closes (1000, 1001, 4000,
 * 4008, 4009, a dropped connection, …) are only logged: discord.js resumes or reconnects by itself.
 * Returns a function that stops watching (before the client is destroyed on purpose).
 */
export function watchGateway(client: Client, logger: Logger, onLost: (loss: GatewayLoss) => void): () => void {
  let lost = false;
  const lose = (loss: GatewayLoss): void => {
    if (lost) return;
    lost = true;
    onLost(loss);
  };
  const onDisconnect = (event: { code: number }, shardId: number): void => {
    const message = FATAL_GATEWAY_CLOSES.get(event.code) ?? `Discord closed the gateway connection for good (close ${event.code})`;
    logger.debug({ shard: shardId, code: event.code }, 'gateway shard disconnected; discord.js will not reconnect it');
    lose({ code: event.code, message });
  };
  const onInvalidated = (): void => lose({ message: 'Discord invalidated the session and discord.js gave it up' });
  // discord.js reports the fatal closes a second time as errors ("Authentication failed"): the loss above is the error line.
  const onError = (error: Error, shardId: number): void => void logger.warn({ shard: shardId, err: error }, 'gateway error');
  const onReconnecting = (shardId: number): void => void logger.info({ shard: shardId }, 'gateway connection closed; discord.js reconnects');
  const onResume = (shardId: number, replayed: number): void => void logger.info({ shard: shardId, replayed }, 'gateway connection resumed');
  client.on(Events.ShardDisconnect, onDisconnect);
  client.on(Events.Invalidated, onInvalidated);
  client.on(Events.ShardError, onError);
  client.on(Events.ShardReconnecting, onReconnecting);
  client.on(Events.ShardResume, onResume);
  return () => {
    client.off(Events.ShardDisconnect, onDisconnect);
    client.off(Events.Invalidated, onInvalidated);
    client.off(Events.ShardError, onError);
    client.off(Events.ShardReconnecting, onReconnecting);
    client.off(Events.ShardResume, onResume);
  };
}

/**
 * The REST requests that discord.js holds back behind a rate limit (a 429 answer or a bucket known to
 * be empty), until the next answer on their route. discord.js sleeps them out in its queue (minutes,
 * for a long `retry_after` or the global limit); a shutdown must not wait for them, only say which
 * they were. Routes are discord.js's bucket routes (`/webhooks/:id/:token/…`): they hold no token.
 */
export class RateLimitWatch {
  private readonly waiting = new Map<string, { until: number; global: boolean }>();

  constructor(rest: REST, logger: Logger) {
    rest.on('rateLimited', (info) => {
      const key = `${info.method.toUpperCase()} ${info.route}`;
      this.waiting.set(key, { until: Date.now() + info.timeToReset, global: info.global });
      logger.debug({ route: key, retryAfterMs: info.timeToReset, global: info.global }, 'rate limited');
    });
    rest.on('response', (request, response) => {
      const key = `${request.method.toUpperCase()} ${request.route}`;
      if (response.status !== 429) {
        this.waiting.delete(key);
        return;
      }
      const retryAfterMs = Number(response.headers.get('retry-after') ?? 0) * 1000;
      const global = response.headers.has('x-ratelimit-global');
      this.waiting.set(key, { until: Date.now() + retryAfterMs, global });
      logger.debug({ route: key, retryAfterMs, global }, 'rate limited');
    });
  }

  /** One line per route still waiting, e.g. `PATCH /webhooks/:id/:token/messages/:id (rate limited for another 3599 s)`. */
  describe(now = Date.now()): string[] {
    return [...this.waiting].map(([key, { until, global }]) => {
      const left = Math.max(0, Math.ceil((until - now) / 1000));
      return `${key} (${global ? 'global rate limit' : 'rate limited'} for another ${left} s)`;
    });
  }
}
