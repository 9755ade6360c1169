// What every new job needs from where it was asked for: a short id, and the route its messages take
// when it was asked for through an interaction. Commands, buttons and reactions create jobs with these.
import { randomInt } from 'node:crypto';
import type { ReplyRoute } from '../store/job-store.ts';

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
