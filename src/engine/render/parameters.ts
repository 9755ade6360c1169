// Generation parameters as AUTOMATIC1111's webui writes them into a PNG's `parameters` text
// (modules/processing.py create_infotext, modules/infotext_utils.py quote/parse_generation_parameters),
// so its PNG Info tab, Civitai and other readers understand our images.
import type { Mode, ResolvedParams, SchedulerName } from '../api.ts';
import { MODES, SCHEDULER_NAMES } from '../api.ts';
import { KARRAS_LABEL, SCHEDULER_LABELS } from '../labels.ts';

/** A1111 writes the label of the chosen schedule; `Automatic` is the sampler's own default. */
const SCHEDULE_DEFAULT = 'Automatic';

/** Python's `str(float)` for the values we write: integers keep a `.0` (A1111 writes `CFG scale: 7.0`). */
function pythonFloat(value: number): string {
  return Number.isInteger(value) ? value.toFixed(1) : String(value);
}

/** A1111's quote(): values holding `,`, `:` or a newline become a JSON string literal. */
export function quoteValue(value: string): string {
  if (!value.includes(',') && !value.includes(':') && !value.includes('\n')) return value;
  return JSON.stringify(value);
}

function unquoteValue(value: string): string {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
    try {
      const parsed: unknown = JSON.parse(value);
      if (typeof parsed === 'string') return parsed;
    } catch {
      // A1111 keeps such a value as written.
    }
  }
  return value;
}

function formatWeight(weight: number): string {
  return String(Number(weight.toFixed(4)));
}

/**
 * The infotext for one image: prompt, optional `Negative prompt:` line, then the `key: value` line.
 * Pass the image's own seed in `params.seed` (image i of a batch uses seed + i).
 */
export function formatParameters(params: ResolvedParams): string {
  const fields: [string, string | undefined][] = [
    ['Steps', String(params.steps)],
    ['Sampler', SCHEDULER_LABELS[params.scheduler]],
    ['Schedule type', params.karras ? KARRAS_LABEL : SCHEDULE_DEFAULT],
    ['CFG scale', pythonFloat(params.guidance)],
    ['Seed', String(params.seed)],
    ['Size', `${params.width}x${params.height}`],
    ['Model', params.model],
    // A1111's img2img key, after the model as there; absent when drawing from noise.
    ['Denoising strength', params.strength !== undefined ? String(params.strength) : undefined],
    ['Ensemble', params.ensemble],
    ['Experts', params.experts.length > 0 ? params.experts.join('+') : undefined],
    ['Weights', params.weights && params.weights.length > 0 ? params.weights.map(formatWeight).join('+') : undefined],
    ['Mode', params.mode],
  ];
  const line = fields
    .filter((field): field is [string, string] => field[1] !== undefined && field[1] !== '')
    .map(([key, value]) => `${key}: ${quoteValue(value)}`)
    .join(', ');
  const negative = params.negative ? `\nNegative prompt: ${params.negative}` : '';
  return `${params.prompt}${negative}\n${line}`.trim();
}

/** What `parseParameters` recovers: the raw fields plus those we understand, typed. */
export interface ParsedParameters {
  prompt: string;
  negative: string;
  /** Every `key: value` pair of the last line, unquoted, in order of appearance. */
  fields: Record<string, string>;
  steps?: number;
  scheduler?: SchedulerName;
  karras?: boolean;
  guidance?: number;
  seed?: number;
  width?: number;
  height?: number;
  model?: string;
  /** `Denoising strength`: image-to-image's strength. */
  strength?: number;
  mode?: Mode;
  ensemble?: string;
  experts?: string[];
  weights?: number[];
}

// A1111's re_param: a key starts with a word character; a value is a JSON string or runs to the next comma.
const PARAM_PATTERN = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
const NEGATIVE_PREFIX = 'Negative prompt:';

function parseNumber(value: string | undefined): number | undefined {
  if (value === undefined || value.trim() === '') return undefined;
  const parsed = Number(value);
  return Number.isFinite(parsed) ? parsed : undefined;
}

function parseInteger(value: string | undefined): number | undefined {
  const parsed = parseNumber(value);
  return parsed !== undefined && Number.isInteger(parsed) ? parsed : undefined;
}

function parseSampler(sampler: string): { scheduler?: SchedulerName; karras?: boolean } {
  // Before webui 1.9 the schedule was part of the sampler name ("DPM++ 2M Karras").
  const suffix = ` ${KARRAS_LABEL}`;
  const legacyKarras = sampler.endsWith(suffix);
  const base = legacyKarras ? sampler.slice(0, -suffix.length) : sampler;
  const scheduler = SCHEDULER_NAMES.find((name) => SCHEDULER_LABELS[name] === base);
  return { scheduler, karras: legacyKarras ? true : undefined };
}

/** Reads an A1111 infotext (ours or anyone's) the way the webui's PNG Info tab does. */
export function parseParameters(text: string): ParsedParameters {
  const lines = text.trim().split('\n');
  let lastLine = lines.pop() ?? '';
  if ([...lastLine.matchAll(PARAM_PATTERN)].length < 3) {
    lines.push(lastLine);
    lastLine = '';
  }

  const promptLines: string[] = [];
  const negativeLines: string[] = [];
  let inNegative = false;
  for (const rawLine of lines) {
    let line = rawLine.trim();
    if (line.startsWith(NEGATIVE_PREFIX)) {
      inNegative = true;
      line = line.slice(NEGATIVE_PREFIX.length).trim();
    }
    (inNegative ? negativeLines : promptLines).push(line);
  }

  const fields: Record<string, string> = {};
  for (const match of lastLine.matchAll(PARAM_PATTERN)) {
    fields[match[1]] = unquoteValue(match[2]);
  }

  const parsed: ParsedParameters = {
    prompt: promptLines.join('\n'),
    negative: negativeLines.join('\n'),
    fields,
  };

  parsed.steps = parseInteger(fields['Steps']);
  if (fields['Sampler'] !== undefined) {
    const { scheduler, karras } = parseSampler(fields['Sampler']);
    parsed.scheduler = scheduler;
    parsed.karras = karras;
  }
  if (fields['Schedule type'] !== undefined) parsed.karras = fields['Schedule type'] === KARRAS_LABEL;
  parsed.guidance = parseNumber(fields['CFG scale']);
  parsed.seed = parseInteger(fields['Seed']);
  const size = /^(\d+)x(\d+)$/.exec(fields['Size'] ?? '');
  if (size) {
    parsed.width = Number(size[1]);
    parsed.height = Number(size[2]);
  }
  parsed.model = fields['Model'];
  parsed.strength = parseNumber(fields['Denoising strength']);
  const mode = fields['Mode'];
  parsed.mode = MODES.find((candidate) => candidate === mode);
  parsed.ensemble = fields['Ensemble'];
  if (fields['Experts'] !== undefined) parsed.experts = fields['Experts'].split('+').filter(Boolean);
  if (fields['Weights'] !== undefined) {
    const weights = fields['Weights'].split('+').map((weight) => parseNumber(weight));
    if (weights.every((weight): weight is number => weight !== undefined)) parsed.weights = weights;
  }

  for (const key of Object.keys(parsed) as (keyof ParsedParameters)[]) {
    if (parsed[key] === undefined) delete parsed[key];
  }
  return parsed;
}
