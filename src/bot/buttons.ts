// 🔁 Reroll, 🧩 Contributions, 🔍 Compare, 🗑️ Delete on result messages. The job comes from the
// store by the id in the custom id, so buttons work on old messages and after a restart.
// Blocked users never get here (interactions.ts); new jobs from buttons pass the same checks as /imagine.
import { MessageFlags, type ButtonInteraction } from 'discord.js';
import type { JobKind } from '../store/job-store.ts';
import { isModerator, jobRefusal, memberRoleIds, rerunRefusal } from './access.ts';
import { channelAllowed, channelRefusal, type BotContext } from './context.ts';
import { parseButtonId } from './custom-ids.ts';
import { randomSeed } from './imagine-request.ts';
import { interactionRoute, newJobId } from './new-job.ts';

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
  if (parsed.action === 'panel' && job.request.mode !== 'afa' && job.request.mode !== 'average') {
    return void (await ephemeral('Contributions need several models (mode afa or average); this picture came from one.'));
  }
  const refusal =
    rerunRefusal(ctx, job.request) ??
    jobRefusal(ctx, { guildId: interaction.guildId, userId: interaction.user.id, roleIds: memberRoleIds(interaction.member) });
  if (refusal) return void (await ephemeral(refusal));
  const verdict = ctx.jobs.check(interaction.user.id);
  if (!verdict.accepted) return void (await ephemeral(verdict.message));

  const kind: JobKind = parsed.action === 'reroll' ? 'reroll' : parsed.action;
  const request = parsed.action === 'reroll' ? { ...job.request, seed: randomSeed() } : job.request;
  // Private when the presser's /settings say so, or when the button is on a private result.
  const privately = ctx.settings.get(interaction.user.id).visibility === 'private' || interaction.message.flags.has(MessageFlags.Ephemeral);
  const ack = interaction.deferReply(privately ? { flags: MessageFlags.Ephemeral } : {});
  const submitted = ctx.jobs.submit(
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
    },
    ack,
  );
  await ack;
  if (!submitted.accepted) {
    await interaction.followUp({ content: submitted.message, flags: MessageFlags.Ephemeral });
    await interaction.deleteReply().catch(() => undefined);
  }
}
