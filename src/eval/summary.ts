// From per-prompt outcomes to the numbers of the report: adherence per mode and kind of prompt,
// each expert's shape accuracy on its own family, AFA routing, Fréchet distances, and the demo's
// targets with pass/miss and the margin.
import { featureStats, frechetDistance } from './frechet.ts';
import type { EvalPrompt } from './prompts.ts';
import { referenceRoot, type Reference, type SetKind } from './reference.ts';
import type { ModeRun } from './run.ts';
import { summarize, type AdherenceSummary } from './scoring.ts';
import { familyOf, isFamily, type Family } from './world.ts';

export const ROUTING_TARGET = 0.6;

export interface RoutingSummary {
  /** Mean over all objects of the family expert's weight in the object's half. */
  mean: number | null;
  /** Objects (halves) measured. */
  n: number;
  /** Share of halves where the family expert carries at least ROUTING_TARGET. */
  atLeastTarget: number | null;
  byFamily: Partial<Record<Family, { mean: number; n: number }>>;
}

export interface ModeSummary {
  key: string;
  label: string;
  mode: string;
  expert?: string;
  single: AdherenceSummary;
  pair: AdherenceSummary;
  /** Experts named after a family: shape accuracy on single-object prompts of that family. */
  ownFamily?: { family: Family; shape: number | null; n: number };
  routing?: RoutingSummary;
  frechet: Record<SetKind, number | null>;
  seconds: number;
}

function mean(values: number[]): number | null {
  return values.length ? values.reduce((s, x) => s + x, 0) / values.length : null;
}

export function summarizeRouting(run: ModeRun, prompts: Map<number, EvalPrompt>): RoutingSummary | undefined {
  if (run.mode.request.mode !== 'afa') return undefined;
  const all: number[] = [];
  const byFamily: Partial<Record<Family, number[]>> = {};
  for (const o of run.outcomes) {
    if (!o.routing) continue;
    const scene = prompts.get(o.promptId)!.scene;
    const objects = scene.objects[0].position === 'right' ? [scene.objects[1], scene.objects[0]] : scene.objects;
    o.routing.forEach((share, half) => {
      all.push(share);
      (byFamily[familyOf(objects[half].shape)] ??= []).push(share);
    });
  }
  return {
    mean: mean(all),
    n: all.length,
    atLeastTarget: all.length ? all.filter((x) => x >= ROUTING_TARGET).length / all.length : null,
    byFamily: Object.fromEntries(Object.entries(byFamily).map(([f, v]) => [f, { mean: mean(v)!, n: v.length }])),
  };
}

export function summarizeMode(run: ModeRun, prompts: Map<number, EvalPrompt>, reference: Reference | null): ModeSummary {
  const kindOf = (id: number) => prompts.get(id)!.kind;
  const of = (kind: SetKind) => run.outcomes.filter((o) => kindOf(o.promptId) === kind);
  const summary: ModeSummary = {
    key: run.mode.key,
    label: run.mode.label,
    mode: run.mode.request.mode,
    expert: run.mode.expert,
    single: summarize(of('single').map((o) => o.score)),
    pair: summarize(of('pair').map((o) => o.score)),
    frechet: { single: null, pair: null },
    seconds: run.seconds,
  };
  const expert = run.mode.expert;
  if (expert && isFamily(expert)) {
    const own = of('single').filter((o) => familyOf(prompts.get(o.promptId)!.scene.objects[0].shape) === expert);
    summary.ownFamily = { family: expert, shape: mean(own.map((o) => o.score.correct.shape)), n: own.length };
  }
  summary.routing = summarizeRouting(run, prompts);
  for (const kind of ['single', 'pair'] as const) {
    const set = reference?.sets[kind];
    const outcomes = of(kind);
    if (set && outcomes.length >= 2) {
      summary.frechet[kind] = frechetDistance(set, featureStats(outcomes.map((o) => o.features)), referenceRoot(set));
    }
  }
  return summary;
}

export interface TargetResult {
  target: string;
  measured: string;
  /** null: could not be measured (a mode or a number is missing). */
  pass: boolean | null;
  /** measured − required, in the target's unit. */
  margin: number | null;
  unit: 'points' | 'weight';
}

const pct = (x: number) => `${(x * 100).toFixed(1)}%`;

function target(target: string, value: number | null | undefined, required: number | null, measured: string, unit: TargetResult['unit'] = 'points'): TargetResult {
  if (value === null || value === undefined || required === null || Number.isNaN(value)) {
    return { target, measured: 'not measured', pass: null, margin: null, unit };
  }
  const margin = value - required;
  return { target, measured, pass: margin >= -1e-12, margin: unit === 'points' ? margin * 100 : margin, unit };
}

/**
 * The demo's targets on this run: what each expert and the AFA ensemble must reach, and by how much
 * the ensemble must beat the experts alone, their average and their merge.
 */
export function evaluateTargets(summaries: ModeSummary[]): TargetResult[] {
  const afa = summaries.find((s) => s.mode === 'afa');
  const average = summaries.find((s) => s.mode === 'average');
  const merge = summaries.find((s) => s.mode === 'merge');
  const experts = summaries.filter((s) => s.mode === 'single');
  const results: TargetResult[] = [];

  const afaSingle = afa?.single.full ?? null;
  results.push(target('AFA single-object full match ≥ 70%', afaSingle, 0.7, afaSingle === null ? '' : pct(afaSingle)));

  for (const e of experts) {
    const own = e.ownFamily;
    results.push(
      target(
        `${e.label}: shape accuracy on its own family${own ? ` (${own.family})` : ''} ≥ 85%`,
        own?.shape ?? null,
        0.85,
        own?.shape == null ? '' : `${pct(own.shape)} (${own.n} prompts)`,
      ),
    );
  }

  const bestExpert = experts
    .filter((e) => e.single.full !== null)
    .reduce<ModeSummary | undefined>((best, e) => (!best || e.single.full! > best.single.full! ? e : best), undefined);
  results.push(
    target(
      'AFA single-object full match ≥ best single expert + 10 points',
      afaSingle,
      bestExpert ? bestExpert.single.full! + 0.1 : null,
      afaSingle === null || !bestExpert ? '' : `AFA ${pct(afaSingle)} vs ${bestExpert.label} ${pct(bestExpert.single.full!)}`,
    ),
  );

  const afaPair = afa?.pair.full ?? null;
  for (const [name, base] of [['average', average], ['merge', merge]] as const) {
    const baseFull = base?.pair.full ?? null;
    results.push(
      target(
        `AFA two-object full match ≥ ${name} + 15 points`,
        afaPair,
        baseFull === null ? null : baseFull + 0.15,
        afaPair === null || baseFull === null ? '' : `AFA ${pct(afaPair)} vs ${name} ${pct(baseFull)}`,
      ),
    );
  }

  const routing = afa?.routing;
  results.push(
    target(
      `AFA routing: family expert's weight in its object's half ≥ ${ROUTING_TARGET}`,
      routing?.mean ?? null,
      ROUTING_TARGET,
      routing?.mean == null ? '' : `${routing.mean.toFixed(3)} (mean over ${routing.n} objects)`,
      'weight',
    ),
  );
  return results;
}
