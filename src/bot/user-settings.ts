// /settings: checking a user's /imagine defaults against the package, applying them to the options
// a command left out, and describing them.
import { SCHEDULER_NAMES, type PackageInfo } from '../engine/api.ts';
import { MODE_LABELS, schedulerLabel } from '../engine/labels.ts';
import type { UserSettingKey, UserSettings } from '../store/user-settings-store.ts';
import { isSizeChoice, SIZE_CHOICES, SIZE_VALUES, sizeFor } from './image-size.ts';
import { LIMITS, type ImagineOptions } from './imagine-request.ts';
import { resolveModelChoice } from './model-choice.ts';

export type { UserSettingKey, UserSettings } from '../store/user-settings-store.ts';
export { USER_SETTING_KEYS } from '../store/user-settings-store.ts';

export const SETTING_LABELS: Record<UserSettingKey, string> = {
  model: 'Model',
  mode: 'Mode',
  steps: 'Steps',
  guidance: 'Guidance',
  scheduler: 'Scheduler',
  size: 'Size',
  contributions: 'Contributions',
  visibility: 'Replies',
};

function maxSteps(info: PackageInfo): number {
  return Math.min(LIMITS.maxSteps, info.limits?.maxSteps ?? LIMITS.maxSteps);
}

/**
 * Checks the fields in `changed` of the new settings against the package (the model is checked
 * together with the mode it will be used with). Returns a message for the first problem.
 */
export function settingsProblem(next: UserSettings, changed: ReadonlySet<UserSettingKey>, info: PackageInfo): string | undefined {
  if ((changed.has('model') || changed.has('mode')) && (next.model !== undefined || next.mode !== undefined)) {
    const choice = resolveModelChoice(next.model, next.mode, info);
    if (!choice.ok) return choice.message;
  }
  if (changed.has('steps') && next.steps !== undefined) {
    const max = maxSteps(info);
    if (!Number.isInteger(next.steps) || next.steps < LIMITS.minSteps || next.steps > max) {
      return `steps must be a whole number from ${LIMITS.minSteps} to ${max} for ${info.name} (got ${next.steps}).`;
    }
  }
  if (changed.has('guidance') && next.guidance !== undefined) {
    if (!Number.isFinite(next.guidance) || next.guidance < LIMITS.minGuidance || next.guidance > LIMITS.maxGuidance) {
      return `guidance must be a number from ${LIMITS.minGuidance} to ${LIMITS.maxGuidance} (got ${next.guidance}).`;
    }
  }
  if (changed.has('scheduler') && next.scheduler !== undefined && !SCHEDULER_NAMES.includes(next.scheduler)) {
    return `Unknown scheduler "${next.scheduler}"; choose one of ${SCHEDULER_NAMES.join(', ')}.`;
  }
  if (changed.has('size') && next.size !== undefined && !isSizeChoice(next.size)) {
    return `Unknown size "${next.size}"; choose one of ${SIZE_VALUES.join(', ')}.`;
  }
  return undefined;
}

export interface AppliedSettings {
  options: ImagineOptions;
  /** Contributions when the chosen models can show them (a default, not a demand). */
  preferContributions: boolean;
  /** The settings that filled in an option. */
  used: UserSettingKey[];
  ephemeral: boolean;
}

/**
 * Fills the options a command left out from the user's settings. The model and mode go together:
 * they are used only when the command names neither.
 */
export function applySettings(options: ImagineOptions, settings: UserSettings): AppliedSettings {
  const filled: ImagineOptions = { ...options };
  const used: UserSettingKey[] = [];
  const absent = (value: unknown): boolean => value === undefined || value === null;
  if (absent(options.model) && absent(options.mode) && (settings.model !== undefined || settings.mode !== undefined)) {
    if (settings.model !== undefined) {
      filled.model = settings.model;
      used.push('model');
    }
    if (settings.mode !== undefined) {
      filled.mode = settings.mode;
      used.push('mode');
    }
  }
  for (const key of ['steps', 'guidance', 'scheduler', 'size'] as const) {
    if (absent(options[key]) && settings[key] !== undefined) {
      (filled as Record<string, unknown>)[key] = settings[key];
      used.push(key);
    }
  }
  const preferContributions = absent(options.contributions) && settings.contributions === true;
  if (preferContributions) used.push('contributions');
  return { options: filled, preferContributions, used, ephemeral: settings.visibility === 'private' };
}

/** One line per setting: the user's value, or the package default it falls back to. */
export function describeSettings(settings: UserSettings, info: PackageInfo): string {
  const d = info.defaults;
  const mine = (text: string): string => `**${text}**`;
  const fallback = (text: string): string => `${text} (default)`;
  const modelText =
    settings.model !== undefined || settings.mode !== undefined
      ? mine(`${settings.model ?? 'the package default'}${settings.mode ? ` · ${MODE_LABELS[settings.mode]?.name ?? settings.mode}` : ''}`)
      : fallback(info.ensembles[0]?.id ?? info.experts[0]?.id ?? 'none');
  const size = settings.size !== undefined && isSizeChoice(settings.size) ? settings.size : undefined;
  const sizeText = size
    ? mine(`${SIZE_CHOICES.find((c) => c.value === size)!.name} (${sizeFor(size, info).width}×${sizeFor(size, info).height})`)
    : fallback(`${d.width}×${d.height}`);
  const lines: [UserSettingKey | 'model', string][] = [
    ['model', modelText],
    ['steps', settings.steps !== undefined ? mine(String(settings.steps)) : fallback(String(d.steps))],
    ['guidance', settings.guidance !== undefined ? mine(String(settings.guidance)) : fallback(String(d.guidance))],
    ['scheduler', settings.scheduler !== undefined ? mine(schedulerLabel(settings.scheduler, false)) : fallback(schedulerLabel(d.scheduler, false))],
    ['size', sizeText],
    ['contributions', settings.contributions !== undefined ? mine(settings.contributions ? 'on' : 'off') : fallback('off')],
    [
      'visibility',
      settings.visibility !== undefined
        ? mine(settings.visibility === 'private' ? 'private (only you see your pictures)' : 'public')
        : fallback('public'),
    ],
  ];
  return lines.map(([key, text]) => `• ${SETTING_LABELS[key]}: ${text}`).join('\n');
}
