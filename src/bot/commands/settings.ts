import { MessageFlags, InteractionContextType, SlashCommandBuilder, type AutocompleteInteraction, type ChatInputCommandInteraction } from 'discord.js';
import { MODES, SCHEDULER_NAMES } from '../../engine/api.ts';
import { modeChoice, SCHEDULER_LABELS } from '../../engine/labels.ts';
import type { BotContext, SlashCommand } from '../context.ts';
import { SIZE_CHOICES } from '../image-size.ts';
import { LIMITS } from '../imagine-request.ts';
import { clip } from '../messages.ts';
import { modelSuggestions } from '../model-choice.ts';
import { describeSettings, SETTING_LABELS, settingsProblem, USER_SETTING_KEYS, type UserSettingKey, type UserSettings } from '../user-settings.ts';

const data = new SlashCommandBuilder()
  .setName('settings')
  // Server channels only, like /imagine whose defaults these are.
  .setContexts(InteractionContextType.Guild)
  .setDescription('Your defaults for /imagine (no options: show them)')
  .addStringOption((o) =>
    o.setName('model').setDescription('Default ensemble, expert, or experts joined by +').setAutocomplete(true).setMaxLength(200),
  )
  .addStringOption((o) =>
    o
      .setName('mode')
      .setDescription('Default way to combine models (used with the default model)')
      .addChoices(...MODES.map((mode) => ({ name: modeChoice(mode), value: mode }))),
  )
  .addIntegerOption((o) => o.setName('steps').setDescription('Default denoising steps').setMinValue(LIMITS.minSteps).setMaxValue(LIMITS.maxSteps))
  .addNumberOption((o) =>
    o.setName('guidance').setDescription('Default guidance (CFG scale)').setMinValue(LIMITS.minGuidance).setMaxValue(LIMITS.maxGuidance),
  )
  .addStringOption((o) =>
    o
      .setName('scheduler')
      .setDescription('Default sampler')
      .addChoices(...SCHEDULER_NAMES.map((name) => ({ name: SCHEDULER_LABELS[name], value: name }))),
  )
  .addStringOption((o) =>
    o
      .setName('size')
      .setDescription('Default shape of the picture')
      .addChoices(...SIZE_CHOICES.map((choice) => ({ name: choice.name, value: choice.value }))),
  )
  .addBooleanOption((o) => o.setName('contributions').setDescription('Also show which model drew what, when several models draw'))
  .addStringOption((o) =>
    o
      .setName('visibility')
      .setDescription('Who sees your pictures: everyone in the channel, or only you')
      .addChoices({ name: 'Public: in the channel', value: 'public' }, { name: 'Private: only you (ephemeral)', value: 'private' }),
  )
  .addStringOption((o) =>
    o
      .setName('clear')
      .setDescription('Forget one default')
      .addChoices(...USER_SETTING_KEYS.map((key) => ({ name: SETTING_LABELS[key], value: key }))),
  )
  .addBooleanOption((o) => o.setName('reset').setDescription('Forget all your defaults (before applying the other options)'));

/** The options given in this command, as settings. */
function givenSettings(interaction: ChatInputCommandInteraction): UserSettings {
  const { options } = interaction;
  const given: Record<string, unknown> = {
    model: options.getString('model')?.trim() || undefined,
    mode: options.getString('mode') ?? undefined,
    steps: options.getInteger('steps') ?? undefined,
    guidance: options.getNumber('guidance') ?? undefined,
    scheduler: options.getString('scheduler') ?? undefined,
    size: options.getString('size') ?? undefined,
    contributions: options.getBoolean('contributions') ?? undefined,
    visibility: options.getString('visibility') ?? undefined,
  };
  return Object.fromEntries(Object.entries(given).filter(([, value]) => value !== undefined)) as UserSettings;
}

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const reply = (content: string) =>
    interaction.reply({ content: clip(content, 2000), flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  const userId = interaction.user.id;
  const current = ctx.settings.get(userId);
  const given = givenSettings(interaction);
  const clear = interaction.options.getString('clear') as UserSettingKey | null;
  const reset = interaction.options.getBoolean('reset') === true;

  if (!reset && clear === null && Object.keys(given).length === 0) {
    await reply(`Your /imagine defaults (used when you leave an option out):\n${describeSettings(current, ctx.info)}`);
    return;
  }
  const next: UserSettings = reset ? {} : { ...current };
  if (clear !== null) delete next[clear];
  Object.assign(next, given);
  const problem = settingsProblem(next, new Set(Object.keys(given) as UserSettingKey[]), ctx.info);
  if (problem) {
    await reply(`Nothing was saved: ${problem}`);
    return;
  }
  ctx.settings.set(userId, next);
  const what = reset ? 'Your defaults were reset' : 'Saved';
  await reply(`${what}. Your /imagine defaults now:\n${describeSettings(next, ctx.info)}`);
}

async function autocomplete(interaction: AutocompleteInteraction, ctx: BotContext): Promise<void> {
  const focused = interaction.options.getFocused(true);
  await interaction.respond(focused.name === 'model' ? modelSuggestions(String(focused.value), ctx.info) : []);
}

export const settings: SlashCommand = { data, execute, autocomplete };
