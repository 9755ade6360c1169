// 🔁 on a result message reruns the same request with a new seed; the result is posted in the
// channel as a reply to that message. Works on uncached messages (partials + reaction.fetch()).
import type { MessageReaction, PartialMessageReaction, PartialUser, User } from 'discord.js';
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
  if (!job || job.status !== 'done' || job.deleted || (job.kind !== 'imagine' && job.kind !== 'reroll')) return;
  if (!channelAllowed(ctx.config, message.channelId)) return;

  const verdict = ctx.jobs.check(user.id);
  if (!verdict.accepted) {
    // No ephemeral reply exists for reactions: answer briefly in the channel.
    await message
      .reply({ content: `<@${user.id}> ${verdict.message}`, allowedMentions: { users: [user.id], repliedUser: false } })
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
