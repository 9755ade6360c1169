// Turns a GenerateRequest into fully specified parameters, or a clear EngineError saying what is wrong.
import path from 'node:path';
import {
  DEFAULT_STRENGTH,
  EngineError,
  isEnsembleMode,
  MODES,
  SCHEDULER_NAMES,
  type EnsembleMethod,
  type GenerateRequest,
  type Mode,
  type RgbImage,
  type SchedulerName,
} from './api.ts';
import type { EnsembleEntry, ExpertEntry } from './manifest.ts';
import type { ModelPackage } from './model-package.ts';
import { img2imgSteps } from './schedulers/index.ts';

export const MAX_SEED = Number.MAX_SAFE_INTEGER;
export const MAX_GUIDANCE = 30;

export interface ResolvedRequest {
  prompt: string;
  negative: string;
  mode: Mode;
  ensemble?: EnsembleEntry;
  experts: ExpertEntry[];
  weights: number[];
  seed: number;
  steps: number;
  guidance: number;
  scheduler: SchedulerName;
  karras: boolean;
  count: number;
  width: number;
  height: number;
  contributions: boolean;
  preview: boolean;
  /** Image-to-image: the picture to start from, and where in the schedule the run begins. */
  img2img?: Img2ImgStart;
}

export interface Img2ImgStart {
  image: RgbImage;
  strength: number;
  /** diffusers' t_start: the index of the first of the scheduler's timesteps that runs. */
  beginIndex: number;
  /** steps − beginIndex: the denoising steps that run. */
  stepsRun: number;
}

export const NO_VAE_ENCODER = 'This model package has no VAE encoder, so image-to-image is not available.';

function bad(message: string): EngineError {
  return new EngineError('bad_request', message);
}

function integerIn(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || !Number.isInteger(value)) {
    throw bad(`${name} must be a whole number between ${min} and ${max} (got ${JSON.stringify(value)}).`);
  }
  if (value < min || value > max) throw bad(`${name} must be between ${min} and ${max} (got ${value}).`);
  return value;
}

function numberIn(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw bad(`${name} must be a number between ${min} and ${max} (got ${JSON.stringify(value)}).`);
  }
  if (value < min || value > max) throw bad(`${name} must be between ${min} and ${max} (got ${value}).`);
  return value;
}

const METHOD_WORDS: Record<EnsembleMethod, string> = { afa: 'a trained AFA', fuse: 'a training-free fuse' };

function listEnsembles(ensembles: EnsembleEntry[]): string {
  return ensembles.map((e) => `${e.id} (${e.experts.join('+')})`).join(', ');
}

/** The folder as a person would type it: relative to the working folder when inside it. */
function displayDir(dir: string): string {
  const relative = path.relative(process.cwd(), dir);
  return relative && !relative.startsWith('..') && !path.isAbsolute(relative) ? relative : dir;
}

/** Why no ensemble of `method` can run: the package has none of that method. */
function noEnsembleOf(pkg: ModelPackage, method: EnsembleMethod, ids: string[]): EngineError {
  const m = pkg.manifest;
  const others = m.ensembles.filter((e) => e.method !== method);
  const modes = [...new Set(others.map((e) => `"${e.method}"`)), '"average"', '"merge"'];
  const alternatives = `${modes.slice(0, -1).join(', ')} or ${modes[modes.length - 1]}`;
  if (method === 'fuse') {
    const experts = (ids.length >= 2 ? ids : m.experts.map((e) => e.id)).join(',');
    return new EngineError(
      'unknown_model',
      `Mode "fuse" needs a fuse ensemble, and this model package has none; add one with ` +
        `python3 -m trainer.export --add-to ${displayDir(m.dir)} --method fuse --experts ${experts} (or use mode ${alternatives}).`,
    );
  }
  return new EngineError('unknown_model', `Mode "afa" needs a trained ensemble, and this model package has none. Use ${alternatives}.`);
}

/**
 * Mode `afa` or `fuse`: the ensemble named (it must be of the mode's method), or else the first one of
 * that method covering the requested experts — one of exactly those experts first, then one that
 * runs subsets — and the experts that take part.
 */
function chooseEnsemble(
  pkg: ModelPackage,
  mode: EnsembleMethod,
  ensembleId: string | undefined,
  ids: string[],
): Pick<ResolvedRequest, 'mode' | 'ensemble' | 'experts' | 'weights'> {
  const ofMethod = pkg.manifest.ensembles.filter((e) => e.method === mode);
  let ensemble: EnsembleEntry;
  if (ensembleId !== undefined) {
    ensemble = pkg.ensemble(ensembleId);
    if (ensemble.method !== mode) {
      throw bad(
        `Ensemble "${ensemble.id}" is ${METHOD_WORDS[ensemble.method]} ensemble: run it with mode "${ensemble.method}"` +
          (ofMethod.length ? `, or pick ${METHOD_WORDS[mode]} ensemble for mode "${mode}": ${listEnsembles(ofMethod)}.` : '.'),
      );
    }
  } else {
    if (ofMethod.length === 0) throw noEnsembleOf(pkg, mode, ids);
    for (const x of ids) pkg.expert(x);
    const covering = ofMethod.filter((e) => ids.every((x) => e.experts.includes(x)));
    if (covering.length === 0) {
      throw bad(`Mode "${mode}" needs ${METHOD_WORDS[mode]} ensemble; none covers ${ids.join('+')}. Ensembles: ${listEnsembles(ofMethod)}.`);
    }
    ensemble =
      ids.length === 0
        ? covering[0]
        : (covering.find((e) => e.experts.length === ids.length) ?? covering.find((e) => e.subsets) ?? covering[0]);
  }
  const chosen = ids.length ? ids : ensemble.experts;
  for (const x of chosen) {
    pkg.expert(x);
    if (!ensemble.experts.includes(x)) {
      throw bad(`Expert "${x}" is not part of ensemble "${ensemble.id}" (${ensemble.experts.join(', ')}).`);
    }
  }
  if (chosen.length !== ensemble.experts.length && !ensemble.subsets) {
    throw bad(`Ensemble "${ensemble.id}" only works with all of its experts (${ensemble.experts.join(', ')}).`);
  }
  const experts = ensemble.experts.filter((x) => chosen.includes(x)).map((x) => pkg.expert(x));
  return { mode, ensemble, experts, weights: experts.map(() => 1 / experts.length) };
}

function chooseModels(pkg: ModelPackage, req: GenerateRequest): Pick<ResolvedRequest, 'mode' | 'ensemble' | 'experts' | 'weights'> {
  const mode = req.mode;
  if (!MODES.includes(mode)) throw bad(`Unknown mode "${String(mode)}". Modes: ${MODES.join(', ')}.`);
  const ids = req.experts ?? [];
  if (new Set(ids).size !== ids.length) throw bad('Each expert may be named only once.');
  if (isEnsembleMode(mode)) return chooseEnsemble(pkg, mode, req.ensemble, ids);
  let expertIds = ids;
  if (req.ensemble !== undefined) {
    const ensemble = pkg.ensemble(req.ensemble);
    if (expertIds.length === 0) expertIds = ensemble.experts;
  }
  if (expertIds.length === 0) throw bad(`Mode "${mode}" needs ${mode === 'single' ? 'an expert' : 'two or more experts'}.`);
  const experts = expertIds.map((x) => pkg.expert(x));
  if (mode === 'single' && experts.length !== 1) {
    throw bad(`Mode "single" takes exactly one expert (got ${experts.length}: ${expertIds.join(', ')}).`);
  }
  if ((mode === 'average' || mode === 'merge') && experts.length < 2) {
    throw bad(`Mode "${mode}" needs two or more experts (got ${expertIds.join(', ')}).`);
  }
  let weights = experts.map(() => 1 / experts.length);
  if (req.weights !== undefined && mode !== 'single') {
    if (req.weights.length !== experts.length) {
      throw bad(`Give one weight per expert: ${experts.length} experts, ${req.weights.length} weights.`);
    }
    for (const w of req.weights) numberIn('Each weight', w, 0, 1000);
    const sum = req.weights.reduce((s, w) => s + w, 0);
    if (sum <= 0) throw bad('The weights must not all be zero.');
    weights = req.weights.map((w) => w / sum);
  }
  return { mode, experts, weights };
}

/** The init image and strength of an image-to-image request, checked against the package and the size drawn. */
function resolveImg2Img(pkg: ModelPackage, req: GenerateRequest, size: { width: number; height: number; steps: number }): Img2ImgStart | undefined {
  if (req.initImage === undefined || req.initImage === null) {
    if (req.strength !== undefined) throw bad('Strength only applies to image-to-image: give an init image too.');
    return undefined;
  }
  if (pkg.manifest.vaeEncoder === undefined) throw bad(NO_VAE_ENCODER);
  const image = req.initImage as Partial<RgbImage>;
  const { width, height } = size;
  if (typeof image !== 'object' || !Number.isInteger(image.width) || !Number.isInteger(image.height) || !(image.data instanceof Uint8Array)) {
    throw bad('The init image must be an RGB image: { width, height, data: Uint8Array } with 3 bytes per pixel, row by row.');
  }
  if (image.width !== width || image.height !== height) {
    throw bad(
      `The init image is ${image.width}×${image.height} pixels but this request draws ${width}×${height}: resize or crop it to ${width}×${height} first.`,
    );
  }
  if (image.data!.length !== width * height * 3) {
    throw bad(`The init image has ${image.data!.length} bytes; ${width}×${height} RGB needs ${width * height * 3} (3 per pixel).`);
  }
  const strength = req.strength ?? DEFAULT_STRENGTH;
  if (typeof strength !== 'number' || !Number.isFinite(strength) || strength <= 0 || strength > 1) {
    throw bad(`Strength must be greater than 0 and at most 1 (got ${JSON.stringify(strength)}).`);
  }
  const { beginIndex, stepsRun } = img2imgSteps(size.steps, strength);
  if (stepsRun === 0) {
    throw bad(
      `Strength ${strength} of ${size.steps} steps runs no denoising step (⌊${size.steps} × ${strength}⌋ = 0): raise the strength or the steps.`,
    );
  }
  return { image: image as RgbImage, strength, beginIndex, stepsRun };
}

export function resolveRequest(pkg: ModelPackage, req: GenerateRequest): ResolvedRequest {
  const m = pkg.manifest;
  if (typeof req.prompt !== 'string' || req.prompt.trim() === '') throw bad('The prompt is empty.');
  if (req.initImage !== undefined && req.initImage !== null && m.vaeEncoder === undefined) throw bad(NO_VAE_ENCODER);
  const models = chooseModels(pkg, req);
  const scheduler = (req.scheduler ?? m.defaults.scheduler) as SchedulerName;
  if (!SCHEDULER_NAMES.includes(scheduler)) {
    throw bad(`Unknown scheduler "${scheduler}". Schedulers: ${SCHEDULER_NAMES.join(', ')}.`);
  }
  const multiple = m.latent.downsample;
  const side = (name: string, value: number | undefined, fallback: number) => {
    const v = integerIn(name, value ?? fallback, m.size.min, m.size.max);
    if (v % multiple !== 0) throw bad(`${name} must be a multiple of ${multiple} (got ${v}).`);
    return v;
  };
  const resolved: ResolvedRequest = {
    prompt: req.prompt.trim(),
    negative: (req.negative ?? '').trim(),
    ...models,
    seed: integerIn('Seed', req.seed, 0, MAX_SEED),
    steps: integerIn('Steps', req.steps ?? m.defaults.steps, 1, m.limits.maxSteps),
    guidance: numberIn('Guidance', req.guidance ?? m.defaults.guidance, 0, MAX_GUIDANCE),
    scheduler,
    karras: req.karras ?? false,
    count: integerIn('Count', req.count ?? 1, 1, m.limits.maxCount),
    width: side('Width', req.width, m.defaults.width),
    height: side('Height', req.height, m.defaults.height),
    contributions: req.contributions ?? false,
    preview: req.preview ?? false,
  };
  const img2img = resolveImg2Img(pkg, req, resolved);
  if (img2img) resolved.img2img = img2img;
  return resolved;
}
