// Prompt adherence from the classifier's readings, as trainer/demo/classifier.py's `adherence()` scores
// it: per attribute the share of stated values read back, and full match (every stated attribute
// right and the right object count). Pairs are read per half; their position is right when the
// count head sees two objects and each half holds its object's stated colour and shape.
import type { ContributionMaps } from '../engine/api.ts';
import { familyOf, type Scene, type SceneObject } from './world.ts';

export const ATTRIBUTES = ['background', 'colour', 'shape', 'size', 'position'] as const;
export type Attribute = (typeof ATTRIBUTES)[number];
const HALF_ATTRIBUTES = ['colour', 'shape', 'size'] as const;

/** One image against its prompt: how many values of each attribute the prompt states and how many were read back. */
export interface PromptScore {
  stated: Record<Attribute, number>;
  correct: Record<Attribute, number>;
  countRight: boolean;
  full: boolean;
}

function zeros(): Record<Attribute, number> {
  return { background: 0, colour: 0, shape: 0, size: 0, position: 0 };
}

interface PairReading {
  correct: Record<Attribute, number>;
  stated: Record<Attribute, number>;
  placed: boolean;
  wrong: number;
}

function readPair(objects: SceneObject[], labels: Record<string, string>, order: [number, number]): PairReading {
  const correct = zeros();
  const stated = zeros();
  let placed = labels.count === 'two';
  let wrong = 0;
  (['left', 'right'] as const).forEach((half, h) => {
    const object = objects[order[h]];
    for (const a of HALF_ATTRIBUTES) {
      const want = object[a];
      if (want === undefined) continue;
      stated[a] += 1;
      const ok = labels[`${half}_${a}`] === want;
      if (ok) correct[a] += 1;
      else wrong += 1;
      if (!ok && (a === 'colour' || a === 'shape')) placed = false;
    }
  });
  return { correct, stated, placed, wrong: wrong + (placed ? 0 : 1) };
}

export function scoreReading(scene: Scene, labels: Record<string, string>): PromptScore {
  const stated = zeros();
  const correct = zeros();
  if (scene.background !== undefined) {
    stated.background = 1;
    correct.background = labels.background === scene.background ? 1 : 0;
  }
  let countRight: boolean;
  if (scene.objects.length === 1) {
    const object = scene.objects[0];
    countRight = labels.count === 'one';
    for (const a of ['colour', 'shape', 'size', 'position'] as const) {
      if (object[a] === undefined) continue;
      stated[a] = 1;
      correct[a] = labels[a] === object[a] ? 1 : 0;
    }
  } else if (scene.objects.length === 2) {
    countRight = labels.count === 'two';
    const positionsStated = scene.objects[0].position !== undefined;
    // stated positions fix which object belongs in which half; otherwise take the better fit
    const leftFirst: [number, number] = scene.objects[0].position === 'right' ? [1, 0] : [0, 1];
    let reading = readPair(scene.objects, labels, leftFirst);
    if (!positionsStated) {
      const swapped = readPair(scene.objects, labels, [1, 0]);
      if (swapped.wrong < reading.wrong) reading = swapped;
    }
    for (const a of HALF_ATTRIBUTES) {
      stated[a] = reading.stated[a];
      correct[a] = reading.correct[a];
    }
    if (positionsStated) {
      stated.position = 1;
      correct.position = reading.placed ? 1 : 0;
    }
  } else {
    throw new Error(`a scene has one or two objects, not ${scene.objects.length}`);
  }
  const full = countRight && ATTRIBUTES.every((a) => correct[a] === stated[a]);
  return { stated, correct, countRight, full };
}

/** Accuracy per attribute (null where nothing was stated), object count and full match over a set of images. */
export interface AdherenceSummary {
  n: number;
  attributes: Record<Attribute, number | null>;
  count: number | null;
  full: number | null;
}

export function summarize(scores: PromptScore[]): AdherenceSummary {
  const attributes = {} as Record<Attribute, number | null>;
  for (const a of ATTRIBUTES) {
    const stated = scores.reduce((s, x) => s + x.stated[a], 0);
    attributes[a] = stated ? scores.reduce((s, x) => s + x.correct[a], 0) / stated : null;
  }
  const mean = (f: (s: PromptScore) => boolean) => (scores.length ? scores.filter(f).length / scores.length : null);
  return { n: scores.length, attributes, count: mean((s) => s.countRight), full: mean((s) => s.full) };
}

/**
 * Routing in a two-object AFA image: the mean weight that the expert of each object's family
 * carries in that object's half (left: columns < ⌊w/2⌋, as trainer/build_demo.py's routing_share).
 * Returns [left, right], or null when a family has no expert in the maps or both objects share a family.
 */
export function routingShares(scene: Scene, maps: ContributionMaps): [number, number] | null {
  if (scene.objects.length !== 2) return null;
  const objects = scene.objects[0].position === 'right' ? [scene.objects[1], scene.objects[0]] : scene.objects;
  const families = objects.map((o) => familyOf(o.shape));
  if (families[0] === families[1]) return null;
  const index = families.map((f) => maps.experts.indexOf(f));
  if (index.some((i) => i < 0)) return null;
  const mid = Math.floor(maps.width / 2);
  const halfMean = (expert: number, from: number, to: number): number => {
    const map = maps.weights[expert];
    let sum = 0;
    for (let y = 0; y < maps.height; y++) for (let x = from; x < to; x++) sum += map[y * maps.width + x];
    return sum / (maps.height * (to - from));
  };
  return [halfMean(index[0], 0, mid), halfMean(index[1], mid, maps.width)];
}
