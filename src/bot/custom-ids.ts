// Button custom ids carry the job id, so buttons keep working after a restart (the job is in the store).

export const BUTTON_ACTIONS = ['reroll', 'panel', 'compare', 'delete'] as const;
export type ButtonAction = (typeof BUTTON_ACTIONS)[number];

const PREFIX = 'job';

export function buttonId(action: ButtonAction, jobId: string): string {
  return `${PREFIX}:${action}:${jobId}`;
}

export function parseButtonId(customId: string): { action: ButtonAction; jobId: string } | undefined {
  const [prefix, action, jobId, ...rest] = customId.split(':');
  if (prefix !== PREFIX || rest.length > 0 || !jobId) return undefined;
  if (!(BUTTON_ACTIONS as readonly string[]).includes(action)) return undefined;
  return { action: action as ButtonAction, jobId };
}
