import { Client, GatewayIntentBits, Partials } from 'discord.js';
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
