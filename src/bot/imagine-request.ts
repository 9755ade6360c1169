// Turns /imagine options into an engine GenerateRequest, or a short explanation of what is wrong.
import { randomInt } from 'node:crypto';
import { MODES, modeHasContributions, SCHEDULER_NAMES, type GenerateRequest, type Mode, type PackageInfo, type SchedulerName } from '../engine/api.ts';
import { isSizeChoice, sizeFor, SIZE_VALUES } from './image-size.ts';
import { resolveModelChoice, type ModelSelection } from './model-choice.ts';

export const LIMITS = {
  promptMaxLength: 1000,
  negativeMaxLength: 1000,
  maxSeed: 4_294_967_295,
  minSteps: 1,
  maxSteps: 150,
  minGuidance: 0,
  maxGuidance: 30,
  minCount: 1,
  maxCount: 4,
} as const;

export interface ImagineOptions {
  prompt?: string | null;
  model?: string | null;
  mode?: string | null;
  negative?: string | null;
  seed?: number | null;
  steps?: number | null;
  guidance?: number | null;
  scheduler?: string | null;
  count?: number | null;
  contributions?: boolean | null;
  /** A shape from SIZE_CHOICES (square, portrait, …), mapped to a size the package allows. */
  size?: string | null;
}

export type ImagineRequestResult =
  | { ok: true; request: GenerateRequest; selection: ModelSelection }
  | { ok: false; message: string };

export function randomSeed(): number {
  return randomInt(0, LIMITS.maxSeed + 1);
}

/** The blocked word found in `text`, if any: whole words for plain words, substrings otherwise. */
export function findBlockedWord(text: string, blockedWords: readonly string[]): string | undefined {
  const lower = text.toLowerCase();
  return blockedWords.find((word) => {
    if (/^[\p{L}\p{N}_]+$/u.test(word)) {
      const escaped = word.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      return new RegExp(`(?<![\\p{L}\\p{N}_])${escaped}(?![\\p{L}\\p{N}_])`, 'u').test(lower);
    }
    return lower.includes(word);
  });
}

/** Why a request may not run with these blocked words (its prompt or negative prompt has one), if so. */
export function blockedWordProblem(request: Pick<GenerateRequest, 'prompt' | 'negative'>, blockedWords: readonly string[]): string | undefined {
  const inPrompt = findBlockedWord(request.prompt, blockedWords);
  if (inPrompt !== undefined) return `The prompt contains a word that is not allowed here ("${inPrompt}").`;
  const inNegative = request.negative ? findBlockedWord(request.negative, blockedWords) : undefined;
  if (inNegative !== undefined) return `The negative prompt contains a word that is not allowed here ("${inNegative}").`;
  return undefined;
}

function outOfRange(name: string, value: number, min: number, max: number, integer: boolean): string | undefined {
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < min || value > max) {
    return `${name} must be ${integer ? 'a whole number' : 'a number'} from ${min} to ${max} (got ${value}).`;
  }
  return undefined;
}

export function buildImagineRequest(
  options: ImagineOptions,
  info: PackageInfo,
  settings: {
    blockedWords: readonly string[];
    /** Contributions when the chosen models can show them and `contributions` is not set (a /settings default). */
    preferContributions?: boolean;
  },
): ImagineRequestResult {
  const prompt = (options.prompt ?? '').trim();
  if (prompt === '') return { ok: false, message: 'The prompt is empty: describe what to draw.' };
  if (prompt.length > LIMITS.promptMaxLength) {
    return { ok: false, message: `The prompt is too long (${prompt.length} characters; at most ${LIMITS.promptMaxLength}).` };
  }
  const negative = (options.negative ?? '').trim();
  if (negative.length > LIMITS.negativeMaxLength) {
    return { ok: false, message: `The negative prompt is too long (${negative.length} characters; at most ${LIMITS.negativeMaxLength}).` };
  }
  const blocked = blockedWordProblem({ prompt, negative }, settings.blockedWords);
  if (blocked !== undefined) return { ok: false, message: blocked };

  let mode: Mode | undefined;
  if (options.mode !== undefined && options.mode !== null) {
    if (!(MODES as readonly string[]).includes(options.mode)) {
      return { ok: false, message: `Unknown mode "${options.mode}"; choose one of ${MODES.join(', ')}.` };
    }
    mode = options.mode as Mode;
  }
  let scheduler: SchedulerName | undefined;
  if (options.scheduler !== undefined && options.scheduler !== null) {
    if (!(SCHEDULER_NAMES as readonly string[]).includes(options.scheduler)) {
      return { ok: false, message: `Unknown scheduler "${options.scheduler}"; choose one of ${SCHEDULER_NAMES.join(', ')}.` };
    }
    scheduler = options.scheduler as SchedulerName;
  }
  let size: { width: number; height: number } | undefined;
  if (options.size !== undefined && options.size !== null) {
    if (!isSizeChoice(options.size)) {
      return { ok: false, message: `Unknown size "${options.size}"; choose one of ${SIZE_VALUES.join(', ')}.` };
    }
    size = sizeFor(options.size, info);
  }
  const numberChecks: [string, number | null | undefined, number, number, boolean][] = [
    ['seed', options.seed, 0, LIMITS.maxSeed, true],
    ['steps', options.steps, LIMITS.minSteps, LIMITS.maxSteps, true],
    ['guidance', options.guidance, LIMITS.minGuidance, LIMITS.maxGuidance, false],
    ['count', options.count, LIMITS.minCount, LIMITS.maxCount, true],
  ];
  for (const [name, value, min, max, integer] of numberChecks) {
    if (value === undefined || value === null) continue;
    const problem = outOfRange(name, value, min, max, integer);
    if (problem) return { ok: false, message: problem };
  }

  const choice = resolveModelChoice(options.model, mode, info);
  if (!choice.ok) return choice;
  const { selection } = choice;
  const canMap = modeHasContributions(selection.mode);
  const contributions = options.contributions ?? (settings.preferContributions === true && canMap);
  if (contributions && !canMap) {
    return {
      ok: false,
      message: `Contributions show how several models share the image; they need mode afa, fuse or average, not ${selection.mode}.`,
    };
  }

  const request: GenerateRequest = {
    prompt,
    ...(negative !== '' ? { negative } : {}),
    mode: selection.mode,
    ...(selection.ensemble !== undefined ? { ensemble: selection.ensemble } : {}),
    ...(selection.experts !== undefined ? { experts: selection.experts } : {}),
    seed: options.seed ?? randomSeed(),
    ...(options.steps != null ? { steps: options.steps } : {}),
    ...(options.guidance != null ? { guidance: options.guidance } : {}),
    ...(scheduler !== undefined ? { scheduler } : {}),
    ...(size !== undefined ? { width: size.width, height: size.height } : {}),
    count: options.count ?? 1,
    ...(contributions ? { contributions: true } : {}),
  };
  return { ok: true, request, selection };
}
