// 🔁 on a result message reruns the same request with a new seed; the result is posted in the
// channel as a reply to that message. Works on uncached messages (partials + reaction.fetch()).
// It passes the checks of /imagine (blocked users, allowed roles, quotas, blocked words).
import type { MessageReaction, PartialMessageReaction, PartialUser, User } from 'discord.js';
import { jobRefusal, memberRoleIds, rerunRefusal } from './access.ts';
import { channelAllowed, type BotContext } from './context.ts';
import { randomSeed } from './imagine-request.ts';
import { RERUN_EMOJI } from './job-service.ts';
import { newJobId } from './new-job.ts';

export async function handleReaction(
  reactionOrPartial: MessageReaction | PartialMessageReaction,
  user: User | PartialUser,
  ctx: BotContext,
  botUserId: string,
): Promise<void> {
  if (user.id === botUserId || user.bot) return;
  if (reactionOrPartial.emoji.name !== RERUN_EMOJI) return;
  const reaction = reactionOrPartial.partial ? await reactionOrPartial.fetch() : reactionOrPartial;
  const message = reaction.message;
  const job = ctx.store.findByMessage(message.id);
  if (!job || job.status !== 'done' || job.deleted || !['imagine', 'reroll', 'vary', 'upscale'].includes(job.kind)) return;
  if (!channelAllowed(ctx.config, message.channelId)) return;

  // The reaction's member (with roles) was cached from the gateway event.
  const member = message.guild?.members.cache.get(user.id);
  const verdict = ctx.jobs.check(user.id);
  const refusal =
    jobRefusal(ctx, { guildId: job.guildId, userId: user.id, roleIds: memberRoleIds(member) }) ??
    rerunRefusal(ctx, job.request) ??
    (verdict.accepted ? undefined : verdict.message);
  if (refusal) {
    // No ephemeral reply exists for reactions: answer briefly in the channel.
    await message
      .reply({ content: `<@${user.id}> ${refusal}`, allowedMentions: { users: [user.id], repliedUser: false } })
      .catch((error: unknown) => ctx.logger.warn({ err: error }, 'could not answer a reaction'));
    return;
  }
  ctx.jobs.submit({
    id: newJobId(),
    kind: 'reroll',
    userId: user.id,
    guildId: job.guildId,
    channelId: message.channelId,
    request: { ...job.request, seed: randomSeed() },
    reply: { type: 'channel' },
    parentJobId: job.id,
    replyToMessageId: message.id,
  });
}
