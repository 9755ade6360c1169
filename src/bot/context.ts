import type { AutocompleteInteraction, ChatInputCommandInteraction, RESTPostAPIChatInputApplicationCommandsJSONBody } from 'discord.js';
import type { PackageInfo } from '../engine/api.ts';
import type { JobStore } from '../store/job-store.ts';
import type { UserSettingsStore } from '../store/user-settings-store.ts';
import type { GuildSettingsStore } from '../store/guild-settings-store.ts';
import type { Logger } from '../log/logger.ts';
import type { BotConfig } from './config.ts';
import type { JobService } from './job-service.ts';

/** What command handlers get to work with. */
export interface BotContext {
  config: BotConfig;
  info: PackageInfo;
  jobs: JobService;
  store: JobStore;
  /** Each user's /imagine defaults (/settings). */
  settings: UserSettingsStore;
  /** Each server's moderation settings (/admin). */
  guilds: GuildSettingsStore;
  /** The bot's clock (daily quotas). */
  now: () => number;
  logger: Logger;
  /** Distributed mode: a few lines describing the GPU workers (for /queue). */
  describeWorkers?: () => Promise<string>;
}

/** One module in src/bot/commands/: its definition (a discord.js builder) and handlers. */
export interface SlashCommand {
  data: { name: string; toJSON(): RESTPostAPIChatInputApplicationCommandsJSONBody };
  execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void>;
  /** Must answer from memory: autocomplete responses cannot be deferred. */
  autocomplete?(interaction: AutocompleteInteraction, ctx: BotContext): Promise<void>;
}

/** ALLOWED_CHANNEL_IDS empty means every channel. */
export function channelAllowed(config: BotConfig, channelId: string | null): boolean {
  return config.allowedChannelIds.length === 0 || (channelId !== null && config.allowedChannelIds.includes(channelId));
}

export function channelRefusal(config: BotConfig): string {
  const where = config.allowedChannelIds.map((id) => `<#${id}>`).join(', ');
  return `I only draw in ${where}.`;
}
