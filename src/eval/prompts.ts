// The evaluation's fixed prompt set: every shape × colour alone (with positions, sizes and
// backgrounds varied deterministically), and two-object prompts across families (left and right).
import {
  BACKGROUNDS,
  COLOURS,
  FAMILIES,
  FAMILY_NAMES,
  POSITIONS,
  SHAPES,
  SIZES,
  caption,
  type Family,
  type Scene,
} from './world.ts';

export interface EvalPrompt {
  /** Position in the full set; subsets keep their prompts' ids and seeds. */
  id: number;
  kind: 'single' | 'pair';
  text: string;
  scene: Scene;
  /** The same seed in every mode, so modes are compared on the same starting noise. */
  seed: number;
}

const SEED_BASE = 1000;
/** In the full set each shape × colour appears this many times (the small set: once). */
const SINGLE_REPEATS = 3;
/** Two-object prompts per ordered family pair in the full set (the small set: 4, one per shape combination). */
const PAIRS_PER_FAMILY_ORDER = 6;
const SMALL_SINGLE_REPEATS = 1;
const SMALL_PAIRS_PER_ORDER = 4;

type PromptDraft = Omit<EvalPrompt, 'id' | 'seed'> & { round: number };

/** The six ordered pairs of different families: (curves, blocks), (blocks, curves), … */
export function familyOrders(): [Family, Family][] {
  const out: [Family, Family][] = [];
  for (let a = 0; a < FAMILY_NAMES.length; a++) {
    for (let b = a + 1; b < FAMILY_NAMES.length; b++) {
      out.push([FAMILY_NAMES[a], FAMILY_NAMES[b]], [FAMILY_NAMES[b], FAMILY_NAMES[a]]);
    }
  }
  return out;
}

/**
 * Single-object prompts in rounds of 36, one per shape × colour, every attribute stated. Size,
 * background and position step with shape, colour and round at different rates, so that within a
 * round every shape and every colour meets both sizes, all backgrounds and all positions, and over
 * the three rounds each shape × colour is drawn on every background at three positions.
 */
function singleDrafts(): PromptDraft[] {
  const out: PromptDraft[] = [];
  for (let r = 0; r < SINGLE_REPEATS; r++) {
    SHAPES.forEach((shape, s) => {
      COLOURS.forEach((colour, c) => {
        const scene: Scene = {
          objects: [
            {
              shape,
              colour,
              size: SIZES[(s + c + r) % SIZES.length],
              position: POSITIONS[(2 * s + c + 2 * r) % POSITIONS.length],
            },
          ],
          background: BACKGROUNDS[(s + 2 * c + r) % BACKGROUNDS.length],
        };
        out.push({ kind: 'single', text: caption(scene), scene, round: r });
      });
    });
  }
  return out;
}

/**
 * Two-object prompts, "a red circle on the left and a blue square on the right, white
 * background", in rounds of six (one per ordered family pair); over the rounds each pair meets its
 * shape combinations, every colour on each side (the two colours always differ), both sizes and
 * every background.
 */
function pairDrafts(): PromptDraft[] {
  const orders = familyOrders();
  const out: PromptDraft[] = [];
  for (let j = 0; j < PAIRS_PER_FAMILY_ORDER; j++) {
    orders.forEach(([left, right], p) => {
      const k = j * orders.length + p;
      const leftColour = (p + j) % COLOURS.length;
      const rightColour = (leftColour + 1 + (k % (COLOURS.length - 1))) % COLOURS.length;
      const scene: Scene = {
        objects: [
          {
            shape: FAMILIES[left][j % 2],
            colour: COLOURS[leftColour],
            size: SIZES[(Math.floor(j / 2) + p) % 2],
            position: 'left',
          },
          {
            shape: FAMILIES[right][Math.floor(j / 2) % 2],
            colour: COLOURS[rightColour],
            size: SIZES[(j + Math.floor(p / 2)) % 2],
            position: 'right',
          },
        ],
        background: BACKGROUNDS[(p + 2 * j) % BACKGROUNDS.length],
      };
      out.push({ kind: 'pair', text: caption(scene), scene, round: j });
    });
  }
  return out;
}

function numbered(): (EvalPrompt & { round: number })[] {
  return [...singleDrafts(), ...pairDrafts()].map((p, id) => ({ ...p, id, seed: SEED_BASE + id }));
}

function strip({ round: _round, ...prompt }: EvalPrompt & { round: number }): EvalPrompt {
  return prompt;
}

/** The full set (the default): 108 single-object prompts (ids 0–107), then 36 pairs (108–143); seed = 1000 + id. */
export function fullPromptSet(): EvalPrompt[] {
  return numbered().map(strip);
}

/** A smaller set for a busy machine: the first round of single-object prompts (36) and four rounds of pairs (24). */
export function smallPromptSet(): EvalPrompt[] {
  return numbered()
    .filter((p) => p.round < (p.kind === 'single' ? SMALL_SINGLE_REPEATS : SMALL_PAIRS_PER_ORDER))
    .map(strip);
}

/**
 * For tests and quick looks: one single-object prompt per shape, each in another colour and taken
 * from another round (so backgrounds and sizes vary too), and two pairs.
 */
export function quickPromptSet(): EvalPrompt[] {
  const all = fullPromptSet();
  const perRound = SHAPES.length * COLOURS.length;
  const singles = SHAPES.map((_, s) => all[(s % SINGLE_REPEATS) * perRound + s * COLOURS.length + s]);
  const pairs = all.filter((p) => p.kind === 'pair').slice(0, 2);
  return [...singles, ...pairs];
}

export type PromptSetName = 'quick' | 'small' | 'full';

export function promptSetByName(name: PromptSetName): EvalPrompt[] {
  return name === 'quick' ? quickPromptSet() : name === 'small' ? smallPromptSet() : fullPromptSet();
}
