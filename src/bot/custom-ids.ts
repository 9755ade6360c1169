// Button custom ids carry the job id, so buttons keep working after a restart (the job is in the store).
// Vary and Upscale also carry which image of a grid they start from: `job:upscale:<id>:<index>`.

export const BUTTON_ACTIONS = ['reroll', 'panel', 'compare', 'delete', 'subtle', 'strong', 'upscale'] as const;
export type ButtonAction = (typeof BUTTON_ACTIONS)[number];

/** Actions that start from one image of a result (image-to-image). */
export const IMAGE_ACTIONS: readonly ButtonAction[] = ['subtle', 'strong', 'upscale'];

const PREFIX = 'job';

/** Discord's limit on a custom id. */
export const MAX_CUSTOM_ID_LENGTH = 100;

export function buttonId(action: ButtonAction, jobId: string, imageIndex?: number): string {
  return imageIndex === undefined || imageIndex === 0 ? `${PREFIX}:${action}:${jobId}` : `${PREFIX}:${action}:${jobId}:${imageIndex}`;
}

export function parseButtonId(customId: string): { action: ButtonAction; jobId: string; imageIndex: number } | undefined {
  const [prefix, action, jobId, index, ...rest] = customId.split(':');
  if (prefix !== PREFIX || rest.length > 0 || !jobId) return undefined;
  if (!(BUTTON_ACTIONS as readonly string[]).includes(action)) return undefined;
  let imageIndex = 0;
  if (index !== undefined) {
    if (!IMAGE_ACTIONS.includes(action as ButtonAction) || !/^[0-9]$/.test(index)) return undefined;
    imageIndex = Number(index);
  }
  return { action: action as ButtonAction, jobId, imageIndex };
}
