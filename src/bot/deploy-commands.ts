// `npm run deploy-commands`: registers the slash commands once (not on every start: Discord allows
// 200 command creations per day per guild). With DISCORD_GUILD_ID they appear in that server at once
// (development); without it they are global (production).
import { pathToFileURL } from 'node:url';
import { REST, Routes, type RESTPostAPIChatInputApplicationCommandsJSONBody } from 'discord.js';
import { config as loadDotenv } from 'dotenv';
import { commands } from './commands/index.ts';
import { loadConfigOrExit, type BotConfig } from './config.ts';

export interface DeployResult {
  scope: 'guild' | 'global';
  names: string[];
}

export async function deployCommands(
  config: Pick<BotConfig, 'discordToken' | 'applicationId' | 'guildId' | 'apiUrl'>,
  definitions: RESTPostAPIChatInputApplicationCommandsJSONBody[] = commands.map((command) => command.data.toJSON()),
): Promise<DeployResult> {
  const rest = new REST(config.apiUrl ? { api: config.apiUrl } : {}).setToken(config.discordToken);
  const route = config.guildId
    ? Routes.applicationGuildCommands(config.applicationId, config.guildId)
    : Routes.applicationCommands(config.applicationId);
  // PUT replaces the whole set: renamed or removed commands disappear too.
  const registered = (await rest.put(route, { body: definitions })) as { name: string }[];
  return { scope: config.guildId ? 'guild' : 'global', names: registered.map((c) => c.name) };
}

async function main(): Promise<void> {
  loadDotenv({ quiet: true });
  const config = loadConfigOrExit(process.env);
  const result = await deployCommands(config);
  const where = result.scope === 'guild' ? `server ${config.guildId}` : 'all servers (global; may take up to an hour to appear)';
  console.log(`Registered /${result.names.join(', /')} for ${where}.`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((error: unknown) => {
    console.error(`Could not register the commands: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  });
}
