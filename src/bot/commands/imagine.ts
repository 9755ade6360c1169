import { MessageFlags, InteractionContextType, SlashCommandBuilder, type AutocompleteInteraction, type ChatInputCommandInteraction } from 'discord.js';
import { DEFAULT_STRENGTH, MODES, SCHEDULER_NAMES } from '../../engine/api.ts';
import { modeChoice, SCHEDULER_LABELS } from '../../engine/labels.ts';
import { jobRefusal, memberRoleIds } from '../access.ts';
import { channelAllowed, channelRefusal, type BotContext, type SlashCommand } from '../context.ts';
import { SIZE_CHOICES } from '../image-size.ts';
import { buildImagineRequest, LIMITS } from '../imagine-request.ts';
import { attachmentProblem, initImageFromAttachment, INIT_IMAGE_LIMITS, NO_ENCODER_MESSAGE } from '../init-image.ts';
import { modelSuggestions } from '../model-choice.ts';
import { interactionRoute, newJobId, submitFromInteraction } from '../new-job.ts';
import { applySettings, SETTING_LABELS } from '../user-settings.ts';

const data = new SlashCommandBuilder()
  .setName('imagine')
  // Server channels only: results, reactions and fallbacks are channel messages.
  .setContexts(InteractionContextType.Guild)
  .setDescription('Draw a picture with one model or an ensemble of models')
  .addStringOption((o) =>
    o.setName('prompt').setDescription('What to draw').setRequired(true).setMinLength(1).setMaxLength(LIMITS.promptMaxLength),
  )
  .addStringOption((o) =>
    o.setName('model').setDescription('Ensemble, expert, or experts joined by + (e.g. curves+blocks)').setAutocomplete(true).setMaxLength(200),
  )
  .addStringOption((o) =>
    o
      .setName('mode')
      .setDescription('How several models are combined (default: from the model)')
      .addChoices(...MODES.map((mode) => ({ name: modeChoice(mode), value: mode }))),
  )
  .addStringOption((o) => o.setName('negative').setDescription('What to avoid').setMaxLength(LIMITS.negativeMaxLength))
  .addIntegerOption((o) => o.setName('seed').setDescription('Same seed, same picture').setMinValue(0).setMaxValue(LIMITS.maxSeed))
  .addIntegerOption((o) => o.setName('steps').setDescription('Denoising steps').setMinValue(LIMITS.minSteps).setMaxValue(LIMITS.maxSteps))
  .addNumberOption((o) =>
    o.setName('guidance').setDescription('How closely to follow the prompt (CFG scale)').setMinValue(LIMITS.minGuidance).setMaxValue(LIMITS.maxGuidance),
  )
  .addStringOption((o) =>
    o
      .setName('scheduler')
      .setDescription('Sampler')
      .addChoices(...SCHEDULER_NAMES.map((name) => ({ name: SCHEDULER_LABELS[name], value: name }))),
  )
  .addStringOption((o) =>
    o
      .setName('size')
      .setDescription('Shape of the picture (default: the model’s own size)')
      .addChoices(...SIZE_CHOICES.map((choice) => ({ name: choice.name, value: choice.value }))),
  )
  .addIntegerOption((o) => o.setName('count').setDescription('Pictures at once (a grid)').setMinValue(LIMITS.minCount).setMaxValue(LIMITS.maxCount))
  .addBooleanOption((o) => o.setName('contributions').setDescription('Also show which model drew which part'))
  .addAttachmentOption((o) => o.setName('image').setDescription('Start from this picture (PNG, JPEG or WebP; image-to-image)'))
  .addNumberOption((o) =>
    o
      .setName('strength')
      .setDescription(`How much of the picture to redraw with image (default ${DEFAULT_STRENGTH})`)
      .setMinValue(INIT_IMAGE_LIMITS.minStrength)
      .setMaxValue(INIT_IMAGE_LIMITS.maxStrength),
  );

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const ephemeral = (content: string) => interaction.reply({ content, flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  if (!channelAllowed(ctx.config, interaction.channelId)) {
    await ephemeral(channelRefusal(ctx.config));
    return;
  }
  const { options } = interaction;
  // Options left out come from the user's /settings.
  const applied = applySettings(
    {
      prompt: options.getString('prompt'),
      model: options.getString('model'),
      mode: options.getString('mode'),
      negative: options.getString('negative'),
      seed: options.getInteger('seed'),
      steps: options.getInteger('steps'),
      guidance: options.getNumber('guidance'),
      scheduler: options.getString('scheduler'),
      count: options.getInteger('count'),
      contributions: options.getBoolean('contributions'),
      size: options.getString('size'),
    },
    ctx.settings.get(interaction.user.id),
  );
  const built = buildImagineRequest(applied.options, ctx.info, {
    blockedWords: ctx.config.blockedWords,
    preferContributions: applied.preferContributions,
  });
  if (!built.ok) {
    const fromSettings = applied.used.filter((key) => key !== 'contributions').map((key) => SETTING_LABELS[key].toLowerCase());
    const hint =
      fromSettings.length > 0
        ? `
-# Your /settings filled in: ${fromSettings.join(', ')}. Change them with /settings, or forget them with /settings reset:True.`
        : '';
    await ephemeral(`${built.message}${hint}`);
    return;
  }
  const refusal = jobRefusal(ctx, { guildId: interaction.guildId, userId: interaction.user.id, roleIds: memberRoleIds(interaction.member) });
  if (refusal) {
    await ephemeral(refusal);
    return;
  }
  const verdict = ctx.jobs.check(interaction.user.id);
  if (!verdict.accepted) {
    await ephemeral(verdict.message);
    return;
  }
  // Image-to-image: what Discord says of the attachment is checked before anything is downloaded.
  const attachment = options.getAttachment('image');
  const strength = options.getNumber('strength');
  let request = built.request;
  let initImagePng: Buffer | undefined;
  if (strength !== null && !attachment) {
    await ephemeral('strength is for drawing from a picture: attach one with image.');
    return;
  }
  if (attachment) {
    if (!ctx.info.img2img) return void (await ephemeral(NO_ENCODER_MESSAGE));
    const sizeLimit = interaction.attachmentSizeLimit;
    const problem = attachmentProblem(attachment, sizeLimit);
    if (problem) return void (await ephemeral(problem));
    const { minStrength, maxStrength } = INIT_IMAGE_LIMITS;
    if (strength !== null && !(strength >= minStrength && strength <= maxStrength)) {
      return void (await ephemeral(`strength must be a number from ${minStrength} to ${maxStrength} (got ${strength}).`));
    }
    const width = request.width ?? ctx.info.defaults.width;
    const height = request.height ?? ctx.info.defaults.height;
    request = { ...request, width, height, strength: strength ?? DEFAULT_STRENGTH };
    // Downloading and decoding may take longer than Discord's 3 s: acknowledge first.
    await interaction.deferReply(applied.ephemeral ? { flags: MessageFlags.Ephemeral } : {});
    const fitted = await initImageFromAttachment(attachment, { width, height }, sizeLimit);
    if (!fitted.ok) {
      await interaction.followUp({ content: `❌ ${fitted.message}`, flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
      await interaction.deleteReply().catch(() => undefined);
      return;
    }
    initImagePng = fitted.png;
  }
  // Acknowledge first; the job is stored and queued synchronously while the defer is in flight.
  const ack = interaction.deferred ? Promise.resolve() : interaction.deferReply(applied.ephemeral ? { flags: MessageFlags.Ephemeral } : {});
  await submitFromInteraction(
    ctx,
    interaction,
    {
      id: newJobId(),
      kind: 'imagine',
      userId: interaction.user.id,
      guildId: interaction.guildId,
      channelId: interaction.channelId,
      request,
      reply: interactionRoute(interaction, { ephemeral: applied.ephemeral }),
      parentJobId: null,
      replyToMessageId: null,
      ...(initImagePng ? { initImagePng } : {}),
    },
    ack,
  );
}

async function autocomplete(interaction: AutocompleteInteraction, ctx: BotContext): Promise<void> {
  const focused = interaction.options.getFocused(true);
  if (focused.name !== 'model') {
    await interaction.respond([]);
    return;
  }
  await interaction.respond(modelSuggestions(String(focused.value), ctx.info));
}

export const imagine: SlashCommand = { data, execute, autocomplete };
