// The shapes world's vocabulary (trainer/demo/shapes.py): attribute values in the trainer's class order,
// families, and the caption grammar the demo models were trained on.

export const BACKGROUNDS = ['white', 'black', 'gray'] as const;
export const COLOURS = ['red', 'orange', 'yellow', 'green', 'blue', 'purple'] as const;
export const SHAPES = ['circle', 'ring', 'square', 'diamond', 'triangle', 'star'] as const;
export const SIZES = ['small', 'large'] as const;
export const POSITIONS = ['left', 'right', 'top', 'bottom', 'center'] as const;

export type Background = (typeof BACKGROUNDS)[number];
export type Colour = (typeof COLOURS)[number];
export type Shape = (typeof SHAPES)[number];
export type Size = (typeof SIZES)[number];
export type Position = (typeof POSITIONS)[number];

export const FAMILIES = {
  curves: ['circle', 'ring'],
  blocks: ['square', 'diamond'],
  spikes: ['triangle', 'star'],
} as const satisfies Record<string, readonly Shape[]>;
export type Family = keyof typeof FAMILIES;
export const FAMILY_NAMES = Object.keys(FAMILIES) as Family[];

export function familyOf(shape: Shape): Family {
  for (const family of FAMILY_NAMES) if ((FAMILIES[family] as readonly Shape[]).includes(shape)) return family;
  throw new Error(`unknown shape ${shape}`);
}

export function isFamily(id: string): id is Family {
  return (FAMILY_NAMES as string[]).includes(id);
}

const POSITION_PHRASES: Record<Position, string> = {
  left: 'on the left',
  right: 'on the right',
  top: 'at the top',
  bottom: 'at the bottom',
  center: 'in the center',
};

/** One object of a scene; a left-out attribute is absent (the caption does not state it). */
export interface SceneObject {
  shape: Shape;
  colour?: Colour;
  size?: Size;
  position?: Position;
}

export interface Scene {
  /** One object, or two (left one first when positions are stated). */
  objects: SceneObject[];
  background?: Background;
}

/** `a|an [size] [colour] <shape> [position phrase]`, as trainer/demo/shapes.py's object_phrase. */
export function objectPhrase(o: SceneObject): string {
  const words: string[] = [o.size, o.colour, o.shape].filter((w) => w !== undefined);
  const article = 'aeiou'.includes(words[0][0]) ? 'an' : 'a';
  return `${article} ${words.join(' ')}` + (o.position ? ` ${POSITION_PHRASES[o.position]}` : '');
}

/** Objects joined by " and ", then `, <background> background` (trainer/demo/shapes.py's caption). */
export function caption(scene: Scene): string {
  const text = scene.objects.map(objectPhrase).join(' and ');
  return scene.background ? `${text}, ${scene.background} background` : text;
}

export type Rgb = readonly [number, number, number];

/** The renderer's colours (trainer/demo/shapes.py's COLOUR_RGB), in COLOURS order. */
export const PALETTE_RGB: Record<Colour, Rgb> = {
  red: [220, 40, 40],
  orange: [245, 140, 20],
  yellow: [240, 220, 40],
  green: [40, 170, 60],
  blue: [40, 80, 220],
  purple: [140, 60, 200],
};

/** The renderer's backgrounds (trainer/demo/shapes.py's BACKGROUND_RGB). */
export const BACKGROUND_RGB: Record<Background, Rgb> = {
  white: [255, 255, 255],
  black: [0, 0, 0],
  gray: [128, 128, 128],
};
