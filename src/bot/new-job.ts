// What every new job needs from where it was asked for: a short id, and the route its messages take
// when it was asked for through an interaction. Commands, buttons and reactions create jobs with these.
import { randomInt } from 'node:crypto';
import { MessageFlags, type RepliableInteraction } from 'discord.js';
import type { NewJob, ReplyRoute } from '../store/job-store.ts';
import type { BotContext } from './context.ts';

const JOB_ID_ALPHABET = 'abcdefghijkmnopqrstuvwxyz23456789';

/** The reply route of a job answered through its interaction (edits while the token lives). */
export function interactionRoute(
  interaction: {
    applicationId: string;
    id: string;
    token: string;
    createdTimestamp: number;
  },
  options: { ephemeral?: boolean } = {},
): ReplyRoute {
  return {
    type: 'interaction',
    applicationId: interaction.applicationId,
    interactionId: interaction.id,
    token: interaction.token,
    tokenIssuedAt: interaction.createdTimestamp,
    ...(options.ephemeral ? { ephemeral: true } : {}),
  };
}

/** Short, unambiguous ids (they appear in /queue, /cancel and file names). */
export function newJobId(): string {
  return Array.from({ length: 8 }, () => JOB_ID_ALPHABET[randomInt(JOB_ID_ALPHABET.length)]).join('');
}

/**
 * Queues a job asked for through an interaction whose acknowledgement (`ack`) is in flight; a refusal
 * (queue full, limits) replaces the deferred reply with a private message.
 */
export async function submitFromInteraction(ctx: BotContext, interaction: RepliableInteraction, job: NewJob, ack: Promise<unknown>): Promise<void> {
  const submitted = ctx.jobs.submit(job, ack);
  await ack;
  if (!submitted.accepted) {
    await interaction.followUp({ content: submitted.message, flags: MessageFlags.Ephemeral });
    await interaction.deleteReply().catch(() => undefined);
  }
}
