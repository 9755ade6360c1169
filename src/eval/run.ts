// Generates every prompt of the set in every mode through the engine, and has the classifier read
// each image back: the raw material of the results table.
import type { EngineClient, GeneratedImage, GenerateRequest, PackageInfo } from '../engine/api.ts';
import { MODE_LABELS } from '../engine/labels.ts';
import type { ImageReader } from './classifier.ts';
import { strictColourLabels, type ColourReading } from './colour.ts';
import type { EvalPrompt } from './prompts.ts';
import { routingShares, scoreReading, type PromptScore } from './scoring.ts';

/** One row of the table: a way of generating (an expert alone, average, merge, fuse or AFA). */
export interface EvalMode {
  key: string;
  label: string;
  request: Pick<GenerateRequest, 'mode' | 'experts' | 'ensemble' | 'contributions'>;
  /** For an expert alone: its id. */
  expert?: string;
}

/**
 * The modes over the experts of `ensembleId` (default: the package's first AFA ensemble, else its
 * first ensemble; without one, all experts and no ensemble rows): each expert alone, their average,
 * their merge (when their graphs have the same architecture), the training-free fuse ensemble over
 * the same experts (when the package has one) and AFA, both with contributions.
 */
export function evalModes(info: PackageInfo, ensembleId?: string): { modes: EvalMode[]; notes: string[] } {
  const notes: string[] = [];
  const ensemble = ensembleId ? info.ensembles.find((e) => e.id === ensembleId) : (info.ensembles.find((e) => e.method === 'afa') ?? info.ensembles[0]);
  if (ensembleId && !ensemble) {
    throw new Error(`no ensemble "${ensembleId}" in ${info.name} (ensembles: ${info.ensembles.map((e) => e.id).join(', ') || 'none'})`);
  }
  const experts = ensemble ? ensemble.experts : info.experts.map((e) => e.id);
  const title = (id: string) => info.experts.find((e) => e.id === id)?.title ?? id;
  const modes: EvalMode[] = experts.map((id) => ({
    key: `single:${id}`,
    label: `${title(id)} alone`,
    request: { mode: 'single', experts: [id] },
    expert: id,
  }));
  if (experts.length >= 2) {
    modes.push({ key: 'average', label: `${MODE_LABELS.average.name} of ${experts.length}`, request: { mode: 'average', experts: [...experts] } });
    const tags = experts.map((id) => info.architectures?.[id]);
    if (tags.some((t) => t !== tags[0])) {
      notes.push(`merge left out: the experts have different architectures (${tags.join(', ')})`);
    } else {
      modes.push({ key: 'merge', label: `${MODE_LABELS.merge.name} of ${experts.length}`, request: { mode: 'merge', experts: [...experts] } });
    }
  }
  if (!ensemble) {
    notes.push('AFA left out: the package has no ensemble');
    return { modes, notes };
  }
  const sameExperts = (e: PackageInfo['ensembles'][number]) => e.experts.length === experts.length && experts.every((id) => e.experts.includes(id));
  const fuse = ensemble.method === 'fuse' ? ensemble : info.ensembles.find((e) => e.method === 'fuse' && sameExperts(e));
  const afa = ensemble.method === 'afa' ? ensemble : info.ensembles.find((e) => e.method === 'afa' && sameExperts(e));
  if (fuse) {
    modes.push({ key: `fuse:${fuse.id}`, label: `${MODE_LABELS.fuse.name} of ${experts.length}`, request: { mode: 'fuse', ensemble: fuse.id, contributions: true } });
  } else {
    notes.push(`fuse left out: the package has no fuse ensemble over ${experts.join(', ')} (add one with python3 -m trainer.export --add-to PKG --method fuse --experts ${experts.join(',')})`);
  }
  if (afa) {
    modes.push({ key: `afa:${afa.id}`, label: `${MODE_LABELS.afa.name} ${afa.id}`, request: { mode: 'afa', ensemble: afa.id, contributions: true } });
  } else {
    notes.push(`AFA left out: the package has no AFA ensemble over ${experts.join(', ')}`);
  }
  return { modes, notes };
}

export interface PromptOutcome {
  promptId: number;
  /** The classifier's labels, colours replaced by the strict reading's (colour.ts). */
  labels: Record<string, string>;
  /** Scored on `labels`: the strict reading. */
  score: PromptScore;
  /** The classifier's own colour labels and the score they give (the lenient reading the eval used before). */
  classifierColours: Record<string, string>;
  classifierScore: PromptScore;
  /** What the strict reading saw of each object (the whole image, or the left and right halves). */
  colourReadings: ColourReading[];
  /** Two-object AFA and fuse images: the weight of each object's family expert in its half [left, right]. */
  routing?: [number, number] | null;
  /** Mean contribution of each expert over the image (AFA, fuse). */
  shares?: number[];
  features: Float32Array;
}

export interface ModeRun {
  mode: EvalMode;
  outcomes: PromptOutcome[];
  seconds: number;
  /** Images (with maps) of the prompts asked for in `keepImages`. */
  kept: Map<number, GeneratedImage>;
}

export interface RunOptions {
  steps?: number;
  /** Classifier-free guidance (default: the package's). */
  guidance?: number;
  /** Generations in flight at once (an engine pool serves them; default 1). */
  concurrency?: number;
  keepImages?: ReadonlySet<number>;
  log?: (message: string) => void;
  /** Seconds between progress lines (default 15). */
  progressEvery?: number;
}

function formatDuration(seconds: number): string {
  const s = Math.round(seconds);
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}

export async function runMode(
  engine: Pick<EngineClient, 'generate'>,
  classifier: ImageReader,
  mode: EvalMode,
  prompts: EvalPrompt[],
  options: RunOptions = {},
): Promise<ModeRun> {
  const log = options.log ?? (() => {});
  const every = (options.progressEvery ?? 15) * 1000;
  const size = classifier.meta.size;
  const started = performance.now();
  let lastReport = started;
  const generated: GeneratedImage[] = new Array(prompts.length);
  let next = 0;
  let finished = 0;
  const work = async () => {
    while (next < prompts.length) {
      const i = next++;
      const prompt = prompts[i];
      const result = await engine.generate({
        ...mode.request,
        prompt: prompt.text,
        seed: prompt.seed,
        steps: options.steps,
        ...(options.guidance !== undefined ? { guidance: options.guidance } : {}),
        width: size,
        height: size,
        count: 1,
      });
      generated[i] = result.images[0];
      finished += 1;
      const now = performance.now();
      if (now - lastReport >= every || finished === prompts.length) {
        const perPrompt = (now - started) / 1000 / finished;
        log(
          `  ${mode.label}: ${finished}/${prompts.length} prompts, ${perPrompt.toFixed(2)} s each` +
            (finished < prompts.length ? `, ${formatDuration(perPrompt * (prompts.length - finished))} left in this mode` : ''),
        );
        lastReport = now;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.concurrency ?? 1) }, work));
  const kept = new Map<number, GeneratedImage>();
  prompts.forEach((p, i) => {
    if (options.keepImages?.has(p.id)) kept.set(p.id, generated[i]);
  });
  const readings = await classifier.classify(generated.map((g) => g.image));
  const outcomes = prompts.map((prompt, i): PromptOutcome => {
    const maps = generated[i].contributions;
    const classifierLabels = readings[i].labels;
    const strict = strictColourLabels(generated[i].image, prompt.scene);
    const labels = { ...classifierLabels, ...strict.labels };
    const outcome: PromptOutcome = {
      promptId: prompt.id,
      labels,
      score: scoreReading(prompt.scene, labels),
      classifierColours: Object.fromEntries(Object.keys(strict.labels).map((head) => [head, classifierLabels[head]])),
      classifierScore: scoreReading(prompt.scene, classifierLabels),
      colourReadings: strict.readings,
      features: readings[i].features,
    };
    if (maps && (mode.request.mode === 'afa' || mode.request.mode === 'fuse')) {
      outcome.shares = maps.shares;
      if (prompt.kind === 'pair') outcome.routing = routingShares(prompt.scene, maps);
    }
    return outcome;
  });
  return { mode, outcomes, seconds: (performance.now() - started) / 1000, kept };
}
