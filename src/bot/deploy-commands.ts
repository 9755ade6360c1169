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

/** Discord's limits on a chat-input command's definition (a PUT that breaks one is refused whole). */
export const COMMAND_LIMITS = { options: 25, choices: 25, name: 32, description: 100, choiceName: 100, totalCharacters: 4000 } as const;

interface OptionJson {
  name: string;
  description: string;
  choices?: { name: string }[];
  options?: OptionJson[];
}

/** Every way these definitions break Discord's limits (options and choices per level, lengths, total size). */
export function commandLimitProblems(definitions: RESTPostAPIChatInputApplicationCommandsJSONBody[]): string[] {
  const problems: string[] = [];
  const L = COMMAND_LIMITS;
  const check = (where: string, item: OptionJson): number => {
    let characters = item.name.length + item.description.length;
    if (!/^[-_\p{Ll}\p{N}]{1,32}$/u.test(item.name)) problems.push(`${where}: the name must be 1–${L.name} lower-case letters, digits, - or _`);
    if (item.description.length < 1 || item.description.length > L.description) problems.push(`${where}: the description must be 1–${L.description} characters`);
    if ((item.options?.length ?? 0) > L.options) problems.push(`${where}: ${item.options!.length} options (at most ${L.options})`);
    if ((item.choices?.length ?? 0) > L.choices) problems.push(`${where}: ${item.choices!.length} choices (at most ${L.choices})`);
    for (const choice of item.choices ?? []) {
      if (choice.name.length > L.choiceName) problems.push(`${where}: the choice "${choice.name.slice(0, 20)}…" is longer than ${L.choiceName}`);
      characters += choice.name.length;
    }
    for (const option of item.options ?? []) characters += check(`${where} ${option.name}`, option);
    return characters;
  };
  for (const definition of definitions) {
    const total = check(`/${definition.name}`, definition as unknown as OptionJson);
    if (total > L.totalCharacters) problems.push(`/${definition.name}: ${total} characters of names, descriptions and choices (at most ${L.totalCharacters})`);
  }
  return problems;
}

export async function deployCommands(
  config: Pick<BotConfig, 'discordToken' | 'applicationId' | 'guildId' | 'apiUrl'>,
  definitions: RESTPostAPIChatInputApplicationCommandsJSONBody[] = commands.map((command) => command.data.toJSON()),
): Promise<DeployResult> {
  const problems = commandLimitProblems(definitions);
  if (problems.length > 0) throw new Error(`The commands break Discord's limits:\n  - ${problems.join('\n  - ')}`);
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
