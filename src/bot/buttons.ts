// 🔁 Reroll, 🧩 Contributions, 🔍 Compare, 🗑️ Delete on result messages. The job comes from the
// store by the id in the custom id, so buttons work on old messages and after a restart.
// Blocked users never get here (interactions.ts); new jobs from buttons pass the same checks as /imagine.
import { MessageFlags, type ButtonInteraction } from 'discord.js';
import { modeHasContributions, type GenerateRequest } from '../engine/api.ts';
import type { JobKind, JobRecord } from '../store/job-store.ts';
import { isModerator, jobRefusal, memberRoleIds, rerunRefusal } from './access.ts';
import { channelAllowed, channelRefusal, type BotContext } from './context.ts';
import { IMAGE_ACTIONS, parseButtonId, type ButtonAction } from './custom-ids.ts';
import { NO_ENCODER_MESSAGE } from './init-image.ts';
import { randomSeed } from './imagine-request.ts';
import { interactionRoute, newJobId, submitFromInteraction } from './new-job.ts';

export async function handleButton(interaction: ButtonInteraction, ctx: BotContext): Promise<void> {
  const ephemeral = (content: string) => interaction.reply({ content, flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  const parsed = parseButtonId(interaction.customId);
  if (!parsed) return void (await ephemeral('This button is not one of mine, or it is outdated.'));
  const job = ctx.store.get(parsed.jobId);
  if (!job) return void (await ephemeral('I no longer have the details of this picture.'));

  if (parsed.action === 'delete') {
    const moderator = isModerator(interaction.memberPermissions);
    if (interaction.user.id !== job.userId && !moderator) {
      return void (await ephemeral(`Only <@${job.userId}> (who asked for it) or someone with Manage Messages can delete this.`));
    }
    await interaction.deferUpdate();
    try {
      // An ephemeral (private) result is the interaction's to delete; a channel message is the channel's.
      if (interaction.message.flags.has(MessageFlags.Ephemeral)) await interaction.deleteReply();
      else await interaction.message.delete();
      ctx.store.markDeleted(job.id);
    } catch (error) {
      ctx.logger.warn({ job: job.id, err: error }, 'could not delete a result');
      await interaction.followUp({ content: 'I could not delete that message.', flags: MessageFlags.Ephemeral });
    }
    return;
  }

  if (!channelAllowed(ctx.config, interaction.channelId)) return void (await ephemeral(channelRefusal(ctx.config)));
  if (job.status !== 'done') return void (await ephemeral('That job has not finished, so there is nothing to build on yet.'));
  if (parsed.action === 'panel' && !modeHasContributions(job.request.mode)) {
    return void (await ephemeral('Contributions need several models (mode afa, fuse or average); this picture came from one.'));
  }
  const refusal =
    rerunRefusal(ctx, job.request) ??
    jobRefusal(ctx, { guildId: interaction.guildId, userId: interaction.user.id, roleIds: memberRoleIds(interaction.member) });
  if (refusal) return void (await ephemeral(refusal));
  const verdict = ctx.jobs.check(interaction.user.id);
  if (!verdict.accepted) return void (await ephemeral(verdict.message));

  let kind: JobKind;
  let request: GenerateRequest;
  let initImagePng: Buffer | undefined;
  if (IMAGE_ACTIONS.includes(parsed.action)) {
    const from = imageJob(job, parsed.action, parsed.imageIndex, ctx);
    if (!from.ok) return void (await ephemeral(from.message));
    ({ kind, request, png: initImagePng } = from);
  } else {
    kind = parsed.action === 'reroll' ? 'reroll' : (parsed.action as 'panel' | 'compare');
    request = parsed.action === 'reroll' ? { ...job.request, seed: randomSeed() } : job.request;
  }
  // Private when the presser's /settings say so, or when the button is on a private result.
  const privately = ctx.settings.get(interaction.user.id).visibility === 'private' || interaction.message.flags.has(MessageFlags.Ephemeral);
  const ack = interaction.deferReply(privately ? { flags: MessageFlags.Ephemeral } : {});
  await submitFromInteraction(
    ctx,
    interaction,
    {
      id: newJobId(),
      kind,
      userId: interaction.user.id,
      guildId: interaction.guildId,
      channelId: interaction.channelId,
      request,
      reply: interactionRoute(interaction, { ephemeral: privately }),
      parentJobId: job.id,
      replyToMessageId: interaction.message.id,
      ...(initImagePng ? { initImagePng } : {}),
    },
    ack,
  );
}

/** Strengths of 🎨 Vary (Subtle) and (Strong), and of ⬆️ Upscale's second pass (a hires fix). */
export const IMAGE_ACTION_STRENGTH: Record<'subtle' | 'strong' | 'upscale', number> = { subtle: 0.35, strong: 0.65, upscale: 0.5 };

/**
 * The image-to-image job a Vary or Upscale button starts from image `index` of a finished job: same
 * models, mode and settings, one image; Vary at the same size with a new seed, Upscale at twice the
 * size (clamped to the package's largest) with the image's seed. Its init image is the stored result.
 */
export function imageJob(
  job: JobRecord,
  action: ButtonAction,
  index: number,
  ctx: Pick<BotContext, 'info' | 'store'>,
): { ok: true; kind: 'vary' | 'upscale'; request: GenerateRequest; png: Buffer } | { ok: false; message: string } {
  const { info } = ctx;
  if (!info.img2img) return { ok: false, message: NO_ENCODER_MESSAGE };
  const result = job.result;
  const png = ctx.store.getImage(job.id, 'result', index);
  if (!result || !png || index >= result.seeds.length) return { ok: false, message: 'I no longer have this picture, so I cannot build on it.' };
  const { width, height } = result.params;
  const { initImage: _initImage, preview: _preview, ...base } = job.request;
  if (action === 'upscale') {
    const { max, multiple } = info.size;
    const factor = Math.min(2, max / width, max / height);
    const up = (side: number) => Math.max(side, Math.floor((side * factor) / multiple) * multiple);
    const target = { width: up(width), height: up(height) };
    if (target.width === width && target.height === height) {
      return { ok: false, message: `This picture is already as large as these models draw (${width}×${height}; at most ${max}×${max}).` };
    }
    return {
      ok: true,
      kind: 'upscale',
      request: { ...base, ...target, seed: result.seeds[index], count: 1, strength: IMAGE_ACTION_STRENGTH.upscale },
      png,
    };
  }
  const strength = IMAGE_ACTION_STRENGTH[action === 'strong' ? 'strong' : 'subtle'];
  return { ok: true, kind: 'vary', request: { ...base, width, height, seed: randomSeed(), count: 1, strength }, png };
}
