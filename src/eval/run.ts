// Generates every prompt of the set in every mode through the engine, and has the classifier read
// each image back: the raw material of the results table.
import type { EngineClient, GeneratedImage, GenerateRequest, PackageInfo } from '../engine/api.ts';
import { MODE_LABELS } from '../engine/labels.ts';
import type { ImageReader } from './classifier.ts';
import type { EvalPrompt } from './prompts.ts';
import { routingShares, scoreReading, type PromptScore } from './scoring.ts';

/** One row of the table: a way of generating (an expert alone, average, merge or AFA). */
export interface EvalMode {
  key: string;
  label: string;
  request: Pick<GenerateRequest, 'mode' | 'experts' | 'ensemble' | 'contributions'>;
  /** For an expert alone: its id. */
  expert?: string;
}

/**
 * The modes over the experts of `ensembleId` (default: the package's first ensemble; without one,
 * all experts and no AFA row): each expert alone, their average, their merge (when their graphs
 * have the same architecture) and AFA with contributions.
 */
export function evalModes(info: PackageInfo, ensembleId?: string): { modes: EvalMode[]; notes: string[] } {
  const notes: string[] = [];
  const ensemble = ensembleId ? info.ensembles.find((e) => e.id === ensembleId) : info.ensembles[0];
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
  if (ensemble) {
    modes.push({ key: `afa:${ensemble.id}`, label: `${MODE_LABELS.afa.name} ${ensemble.id}`, request: { mode: 'afa', ensemble: ensemble.id, contributions: true } });
  } else {
    notes.push('AFA left out: the package has no ensemble');
  }
  return { modes, notes };
}

export interface PromptOutcome {
  promptId: number;
  labels: Record<string, string>;
  score: PromptScore;
  /** Two-object AFA images: the weight of each object's family expert in its half [left, right]. */
  routing?: [number, number] | null;
  /** Mean contribution of each expert over the image (AFA). */
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
    const outcome: PromptOutcome = {
      promptId: prompt.id,
      labels: readings[i].labels,
      score: scoreReading(prompt.scene, readings[i].labels),
      features: readings[i].features,
    };
    if (maps && mode.request.mode === 'afa') {
      outcome.shares = maps.shares;
      if (prompt.kind === 'pair') outcome.routing = routingShares(prompt.scene, maps);
    }
    return outcome;
  });
  return { mode, outcomes, seconds: (performance.now() - started) / 1000, kept };
}
