// The strict colour reading of the eval (issue 18): each object's colour is read from its pixels, not
// from the attribute classifier's colour head (which learnt to say "yellow" for orange, "purple" for
// blue and "red" for orange-red). The shapes world is simple: flat achromatic backgrounds, one object,
// or one object per half of the image, drawn in one of six palette colours (world.ts).
//
// Per object (the whole image, or one half of a two-object scene):
//  1. Background: the per-channel median of the image's outer frame (2 px). Not the stated
//     background: the background column scores that, and an object's colour should be read even on a
//     background of the wrong grey.
//  2. Object pixels: CIELAB distance from the background > OBJECT_DELTA_E (every palette colour is
//     ≥ 73 from every background, so that is a pixel at least about a third covered).
//  3. Solid pixels: object pixels whose 8 neighbours are object pixels too (no anti-aliased or blurred
//     edge). Thin shapes (a small ring's stroke is under 2 px) have few: then the half of the object
//     pixels farthest from the background.
//  4. The mean CIELAB colour of the solid pixels, against the six palette colours. It reads as the
//     nearest palette colour only when it is clearly on that colour's side of the boundary to every
//     other one (at most BOUNDARY_SHARE of the way to it, the boundary being halfway) and within
//     MAX_DISTANCE of it (else "unclear"), and only when at least UNIFORM_SHARE of the solid pixels
//     are that colour one by one (else "mixed": a red circle with a purple-grey centre is not red).
import { COLOURS, PALETTE_RGB, type Colour, type Rgb, type Scene } from './world.ts';
import type { RgbImage } from '../engine/api.ts';

/**
 * How far (as a share of the distance between them, in CIELAB) the mean may lie from its nearest
 * palette colour toward any other; halfway (0.5) is the boundary between them, so the band from 0.4
 * to 0.6 around every boundary reads "unclear". sRGB halfway between red and orange (232, 90, 30) lies
 * 0.45 of the way from red to orange and is unclear; a lighter, greyer blue (45, 101, 186) lies 0.23
 * of the way toward its nearest neighbour and is blue. A rule on the ratio of the two nearest
 * distances would call that blue unclear (ratio 1.3): blue and purple are only ΔE 26 apart, so any
 * deviation from blue, even one away from purple, shrinks the ratio.
 */
export const BOUNDARY_SHARE = 0.4;
/**
 * A mean farther than this (CIELAB ΔE76) from every palette colour is no palette colour ("unclear"):
 * muddy or greyish. Palette colours are 26–64 from their nearest neighbours.
 */
export const MAX_DISTANCE = 50;
/** Share of an object's solid pixels that must be its colour one by one (nearest palette colour). */
export const UNIFORM_SHARE = 0.8;
/** A pixel belongs to an object when it is at least this far (CIELAB ΔE76) from the background. */
export const OBJECT_DELTA_E = 25;
/** Fewer object pixels than this: nothing is drawn there ("none"). */
export const MIN_OBJECT_PIXELS = 6;
const FRAME = 2;

export type Lab = [number, number, number];

function linear(c: number): number {
  const v = c / 255;
  return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
}

const LINEAR = Float64Array.from({ length: 256 }, (_, i) => linear(i));

function labF(t: number): number {
  return t > 216 / 24389 ? Math.cbrt(t) : (24389 / 27 * t + 16) / 116;
}

/** sRGB bytes (D65) → CIELAB. */
export function rgbToLab(r: number, g: number, b: number): Lab {
  const [R, G, B] = [LINEAR[Math.round(r)], LINEAR[Math.round(g)], LINEAR[Math.round(b)]];
  const x = (0.4124564 * R + 0.3575761 * G + 0.1804375 * B) / 0.95047;
  const y = 0.2126729 * R + 0.7151522 * G + 0.072175 * B;
  const z = (0.0193339 * R + 0.119192 * G + 0.9503041 * B) / 1.08883;
  const [fx, fy, fz] = [labF(x), labF(y), labF(z)];
  return [116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)];
}

export function deltaE(a: Lab, b: Lab): number {
  return Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);
}

const PALETTE_LAB: Lab[] = COLOURS.map((c) => rgbToLab(...PALETTE_RGB[c]));

/**
 * The largest share of the way from palette colour `from` toward another palette colour that `lab`
 * has gone (its projection on the line between them; 0.5 is the boundary between the two).
 */
export function towardOthers(lab: Lab, from: Colour): number {
  const a = PALETTE_LAB[COLOURS.indexOf(from)];
  let most = -Infinity;
  for (const b of PALETTE_LAB) {
    if (b === a) continue;
    const axis = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    const t = ((lab[0] - a[0]) * axis[0] + (lab[1] - a[1]) * axis[1] + (lab[2] - a[2]) * axis[2]) / (axis[0] ** 2 + axis[1] ** 2 + axis[2] ** 2);
    most = Math.max(most, t);
  }
  return most;
}

/** The palette colours by distance from `lab`, nearest first. */
export function nearestColours(lab: Lab): { colour: Colour; distance: number }[] {
  return COLOURS.map((colour, i) => ({ colour, distance: deltaE(lab, PALETTE_LAB[i]) })).sort((a, b) => a.distance - b.distance);
}

/** What the strict reading sees of one object. `label` is what the scoring compares with the stated colour. */
export interface ColourReading {
  /** The colour, or "unclear" (near a boundary between palette colours, or far from all), "mixed" (not one colour) or "none" (no object pixels). */
  label: Colour | 'unclear' | 'mixed' | 'none';
  /** Nearest palette colour of the mean (absent when there is no object). */
  nearest?: Colour;
  /** CIELAB distance of the mean from `nearest`. */
  distance?: number;
  /** How far the mean lies from `nearest` toward the other palette colour it leans to most (share of the way; 0.5 = the boundary). */
  toward?: number;
  /** Share of the solid pixels whose own nearest palette colour is `nearest`. */
  uniform?: number;
  /** Mean colour of the solid pixels, sRGB-ish (for the per-prompt file). */
  mean?: Rgb;
  pixels: number;
}

/** The background actually drawn: the per-channel median of the outer frame of the image. */
export function frameBackground(image: RgbImage): Rgb {
  const { width, height, data } = image;
  const channels: number[][] = [[], [], []];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (x >= FRAME && x < width - FRAME && y >= FRAME && y < height - FRAME) continue;
      const p = (y * width + x) * 3;
      for (let c = 0; c < 3; c++) channels[c].push(data[p + c]);
    }
  }
  const median = (v: number[]) => {
    v.sort((a, b) => a - b);
    return v[Math.floor(v.length / 2)];
  };
  return [median(channels[0]), median(channels[1]), median(channels[2])];
}

/** Reads the colour of the object in columns [x0, x1) of the image against the background `bg`. */
export function readRegionColour(image: RgbImage, x0: number, x1: number, bg: Rgb = frameBackground(image)): ColourReading {
  const { width, height, data } = image;
  const bgLab = rgbToLab(...bg);
  const w = x1 - x0;
  const labs: Lab[] = new Array(w * height);
  const dist = new Float64Array(w * height);
  const object = new Uint8Array(w * height);
  let pixels = 0;
  for (let y = 0; y < height; y++) {
    for (let x = x0; x < x1; x++) {
      const p = (y * width + x) * 3;
      const i = y * w + (x - x0);
      labs[i] = rgbToLab(data[p], data[p + 1], data[p + 2]);
      dist[i] = deltaE(labs[i], bgLab);
      if (dist[i] > OBJECT_DELTA_E) {
        object[i] = 1;
        pixels++;
      }
    }
  }
  if (pixels < MIN_OBJECT_PIXELS) return { label: 'none', pixels };

  let solid: number[] = [];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!object[i]) continue;
      let inner = true;
      for (let dy = -1; dy <= 1 && inner; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const yy = y + dy;
          const xx = x + dx;
          if (yy < 0 || yy >= height || xx < 0 || xx >= w || !object[yy * w + xx]) {
            inner = false;
            break;
          }
        }
      }
      if (inner) solid.push(i);
    }
  }
  if (solid.length < Math.max(MIN_OBJECT_PIXELS, 0.3 * pixels)) {
    const all = [...object.keys()].filter((i) => object[i]).sort((a, b) => dist[b] - dist[a]);
    solid = all.slice(0, Math.max(MIN_OBJECT_PIXELS, Math.ceil(all.length / 2)));
  }

  const mean: Lab = [0, 0, 0];
  const meanRgb = [0, 0, 0];
  for (const i of solid) {
    for (let c = 0; c < 3; c++) mean[c] += labs[i][c] / solid.length;
    const y = Math.floor(i / w);
    const p = (y * width + x0 + (i % w)) * 3;
    for (let c = 0; c < 3; c++) meanRgb[c] += data[p + c] / solid.length;
  }
  const [first] = nearestColours(mean);
  const toward = towardOthers(mean, first.colour);
  const uniform = solid.filter((i) => nearestColours(labs[i])[0].colour === first.colour).length / solid.length;
  const label = toward > BOUNDARY_SHARE || first.distance > MAX_DISTANCE ? 'unclear' : uniform < UNIFORM_SHARE ? 'mixed' : first.colour;
  return {
    label,
    nearest: first.colour,
    distance: first.distance,
    toward,
    uniform,
    mean: meanRgb.map((v) => Math.round(v)) as unknown as Rgb,
    pixels,
  };
}

/** The colour of a one-object image (whole image) or of each half of a two-object image. */
export function readColours(image: RgbImage, objects: 1 | 2): ColourReading[] {
  const bg = frameBackground(image);
  if (objects === 1) return [readRegionColour(image, 0, image.width, bg)];
  const mid = Math.floor(image.width / 2);
  return [readRegionColour(image, 0, mid, bg), readRegionColour(image, mid, image.width, bg)];
}

/**
 * The strict colour labels of an image in the classifier's head names (`colour`, or `left_colour`
 * and `right_colour`), to put in place of the classifier's before scoring.
 */
export function strictColourLabels(image: RgbImage, scene: Scene): { labels: Record<string, string>; readings: ColourReading[] } {
  if (scene.objects.length === 1) {
    const readings = readColours(image, 1);
    return { labels: { colour: readings[0].label }, readings };
  }
  const readings = readColours(image, 2);
  return { labels: { left_colour: readings[0].label, right_colour: readings[1].label }, readings };
}

