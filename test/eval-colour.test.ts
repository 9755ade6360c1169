// The eval's strict colour reading (src/eval/colour.ts) on images drawn by the world's own renderer
// (test/fixtures/colour, written by `python3 -m trainer.demo.colour_cases`): every palette colour on
// every shape, size and background reads right, alone and in pairs; recoloured objects (orange for
// yellow, blue for purple, orange-red for red, a red circle with a purple-grey centre) read wrong.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { describe, test } from 'node:test';
import type { RgbImage } from '../src/engine/api.ts';
import {
  BOUNDARY_SHARE,
  deltaE,
  frameBackground,
  nearestColours,
  readColours,
  readRegionColour,
  rgbToLab,
  strictColourLabels,
} from '../src/eval/colour.ts';
import { scoreReading } from '../src/eval/scoring.ts';
import { BACKGROUND_RGB, BACKGROUNDS, COLOURS, PALETTE_RGB, SHAPES, SIZES, type Scene } from '../src/eval/world.ts';
import { REPO_ROOT } from './helpers/fixture.ts';

const DIR = path.join(REPO_ROOT, 'test/fixtures/colour');
const SIDE = 64;

interface Case {
  caption: string;
  objects: 1 | 2;
  expect: string[];
  kind: 'clean' | 'recoloured';
  note?: string;
}

const cases: Case[] = JSON.parse(readFileSync(path.join(DIR, 'cases.json'), 'utf8'));
const pixels = gunzipSync(readFileSync(path.join(DIR, 'renders.bin.gz')));
const image = (i: number): RgbImage => ({ width: SIDE, height: SIDE, data: pixels.subarray(i * SIDE * SIDE * 3, (i + 1) * SIDE * SIDE * 3) });

function solid(rgb: readonly [number, number, number]): RgbImage {
  const data = new Uint8Array(SIDE * SIDE * 3);
  for (let p = 0; p < SIDE * SIDE; p++) data.set(rgb, p * 3);
  return { width: SIDE, height: SIDE, data };
}

describe('strict colour reading: colour science', () => {
  test('CIELAB of known colours; the palette colours are far from every background', () => {
    const white = rgbToLab(255, 255, 255);
    assert.ok(Math.abs(white[0] - 100) < 0.01 && Math.abs(white[1]) < 0.01 && Math.abs(white[2]) < 0.01);
    assert.deepEqual(rgbToLab(0, 0, 0), [0, 0, 0]);
    const red = rgbToLab(255, 0, 0); // the CIE's own numbers for sRGB red
    assert.ok(Math.abs(red[0] - 53.24) < 0.05 && Math.abs(red[1] - 80.09) < 0.05 && Math.abs(red[2] - 67.2) < 0.05, String(red));
    for (const colour of COLOURS) {
      assert.equal(nearestColours(rgbToLab(...PALETTE_RGB[colour]))[0].colour, colour);
      for (const bg of BACKGROUNDS) assert.ok(deltaE(rgbToLab(...PALETTE_RGB[colour]), rgbToLab(...BACKGROUND_RGB[bg])) > 70, `${colour} on ${bg}`);
    }
  });

  test('the background comes from the image frame; no object is "none"', () => {
    for (const bg of BACKGROUNDS) {
      assert.deepEqual(frameBackground(solid(BACKGROUND_RGB[bg])), BACKGROUND_RGB[bg]);
      assert.equal(readColours(solid(BACKGROUND_RGB[bg]), 1)[0].label, 'none');
      assert.deepEqual(readColours(solid(BACKGROUND_RGB[bg]), 2).map((r) => r.label), ['none', 'none']);
    }
  });

  test('a colour near the boundary between two palette colours, or far from all of them, is "unclear"', () => {
    // a square of a given colour on white
    const square = (rgb: readonly [number, number, number]) => {
      const img = solid([255, 255, 255]);
      for (let y = 20; y < 44; y++) for (let x = 20; x < 44; x++) img.data.set(rgb, (y * SIDE + x) * 3);
      return img;
    };
    const mix = (a: readonly number[], b: readonly number[], t: number) => a.map((v, i) => Math.round(v + (b[i] - v) * t)) as unknown as [number, number, number];
    const { red, orange, blue, purple } = PALETTE_RGB;
    // along the sRGB line between two neighbours: first the one colour, then "unclear", then the other
    for (const [a, b] of [['red', 'orange'], ['blue', 'purple'], ['orange', 'yellow']] as const) {
      const labels = Array.from({ length: 21 }, (_, k) => readRegionColour(square(mix(PALETTE_RGB[a], PALETTE_RGB[b], k / 20)), 0, SIDE).label);
      const first = labels.indexOf('unclear');
      const last = labels.lastIndexOf('unclear');
      assert.ok(first > 0 && last < 20, `${a}→${b}: ${labels.join(' ')}`);
      assert.deepEqual(labels, [...Array(first).fill(a), ...Array(last - first + 1).fill('unclear'), ...Array(20 - last).fill(b)], `${a}→${b}`);
    }
    assert.equal(readRegionColour(square(mix(red, orange, 0.1)), 0, SIDE).label, 'red');
    assert.equal(readRegionColour(square(mix(purple, blue, 0.15)), 0, SIDE).label, 'purple');
    const halfway = readRegionColour(square(mix(red, orange, 0.5)), 0, SIDE);
    assert.equal(halfway.label, 'unclear');
    assert.equal(halfway.nearest, 'red');
    assert.ok(halfway.toward! > BOUNDARY_SHARE && halfway.toward! < 0.5, `toward ${halfway.toward}`);
    // a lighter, greyer blue leans away from purple: blue, though purple is only ΔE 26 from blue
    assert.equal(readRegionColour(square([45, 101, 186]), 0, SIDE).label, 'blue');
    // muddy: nearest red, but far from every palette colour
    const muddy = readRegionColour(square([143, 87, 78]), 0, SIDE);
    assert.deepEqual([muddy.label, muddy.nearest], ['unclear', 'red']);
    assert.ok(muddy.toward! < BOUNDARY_SHARE);
  });
});

describe('strict colour reading on the renderer’s images', () => {
  test('the fixture holds every colour × shape × size × background alone, and pairs of every two colours on every background', () => {
    const clean = cases.filter((c) => c.kind === 'clean');
    const singles = clean.filter((c) => c.objects === 1);
    assert.equal(singles.length, COLOURS.length * SHAPES.length * SIZES.length * BACKGROUNDS.length);
    for (const colour of COLOURS) {
      for (const shape of SHAPES) {
        for (const size of SIZES) {
          for (const bg of BACKGROUNDS) {
            const want = `${size} ${colour} ${shape}`;
            assert.ok(singles.some((c) => c.caption.includes(want) && c.caption.endsWith(`${bg} background`)), `${want} on ${bg}`);
          }
        }
      }
    }
    assert.equal(clean.filter((c) => c.objects === 2).length, COLOURS.length * (COLOURS.length - 1) * BACKGROUNDS.length);
    assert.equal(pixels.length, cases.length * SIDE * SIDE * 3);
  });

  test('every palette colour reads right on clean renders, alone and per half of a pair', () => {
    const wrong: string[] = [];
    cases.forEach((c, i) => {
      if (c.kind !== 'clean') return;
      const got = readColours(image(i), c.objects).map((r) => r.label);
      if (got.join() !== c.expect.join()) wrong.push(`${c.caption}: read ${got.join(', ')}`);
    });
    assert.deepEqual(wrong, []);
  });

  test('recoloured objects read as what is drawn, never as the colour stated', () => {
    const recoloured = cases.map((c, i) => ({ c, i })).filter(({ c }) => c.kind === 'recoloured');
    const notes = new Set(recoloured.map(({ c }) => c.note!.replace(/ \(.*\)$/, '')));
    for (const note of [
      'orange drawn for yellow',
      'blue drawn for purple',
      'orange-red drawn for red',
      'orange square drawn for yellow',
      'blue circle drawn for purple',
      'red circle with a purple-grey centre',
    ]) {
      assert.ok(notes.has(note), note);
    }
    const wrong: string[] = [];
    for (const { c, i } of recoloured) {
      const got = readColours(image(i), c.objects).map((r) => r.label);
      if (got.join() !== c.expect.join()) wrong.push(`${c.caption} (${c.note}): read ${got.join(', ')}, expected ${c.expect.join(', ')}`);
    }
    assert.deepEqual(wrong, []);
  });

  test('scoring with the strict labels: clean renders fully right, recoloured ones wrong in colour (and in place for pairs)', () => {
    cases.forEach((c, i) => {
      const objects = c.caption.replace(/, \w+ background$/, '').split(' and ');
      const scene: Scene = {
        objects: objects.map((o) => {
          const words = o.split(' ');
          const position = o.includes('on the left') ? 'left' : o.includes('on the right') ? 'right' : undefined;
          return { size: words[1] as never, colour: words[2] as never, shape: words[3] as never, ...(position ? { position } : {}) };
        }),
        background: c.caption.match(/, (\w+) background$/)![1] as never,
      };
      const { labels } = strictColourLabels(image(i), scene);
      // everything but colour as stated (what a perfect classifier would read)
      const rest: Record<string, string> =
        scene.objects.length === 1
          ? { background: scene.background!, count: 'one', shape: scene.objects[0].shape, size: scene.objects[0].size! }
          : {
              background: scene.background!,
              count: 'two',
              left_shape: scene.objects[0].shape,
              left_size: scene.objects[0].size!,
              right_shape: scene.objects[1].shape,
              right_size: scene.objects[1].size!,
            };
      if (scene.objects.length === 1) {
        rest.position = c.caption.includes('on the left') ? 'left' : c.caption.includes('at the top') ? 'top' : c.caption.includes('on the right') ? 'right' : c.caption.includes('at the bottom') ? 'bottom' : 'center';
        scene.objects[0].position = rest.position as never;
      }
      const score = scoreReading(scene, { ...rest, ...labels });
      const stated = scene.objects.map((o) => o.colour);
      const right = c.expect.filter((e, k) => e === stated[k]).length;
      assert.equal(score.correct.colour, right, c.caption);
      assert.equal(score.full, c.kind === 'clean', `${c.caption} ${c.note ?? ''}`);
    });
  });
});
