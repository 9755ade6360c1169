// Perceptual colour maps for weight heatmaps and fixed, distinct colours for experts.
import type { Rgb } from './canvas.ts';

export type ColormapName = 'viridis' | 'magma';

// matplotlib's maps sampled at 0, 0.1, …, 1; linear interpolation between them stays within a
// couple of levels of the full 256-entry tables.
const STOPS: Record<ColormapName, readonly string[]> = {
  viridis: ['440154', '482475', '414487', '355f8d', '2a788e', '21918c', '22a884', '44bf70', '7ad151', 'bddf26', 'fde725'],
  magma: ['000004', '140e36', '3b0f70', '641a80', '8c2981', 'b73779', 'de4968', 'f7705c', 'fe9f6d', 'fecf92', 'fcfdbf'],
};

export function hexToRgb(hex: string): Rgb {
  const value = Number.parseInt(hex.replace(/^#/, ''), 16);
  return [(value >> 16) & 0xff, (value >> 8) & 0xff, value & 0xff];
}

/** A 256-entry lookup table (RGB triplets) for weights 0..1. */
export function colormapTable(name: ColormapName): Uint8Array {
  const stops = STOPS[name].map(hexToRgb);
  const table = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const position = (i / 255) * (stops.length - 1);
    const lower = Math.min(stops.length - 2, Math.floor(position));
    const t = position - lower;
    for (let c = 0; c < 3; c++) {
      table[i * 3 + c] = Math.round(stops[lower][c] * (1 - t) + stops[lower + 1][c] * t);
    }
  }
  return table;
}

/** Okabe–Ito colours: distinct for colour-blind viewers too; cycles after seven experts. */
const EXPERT_COLOURS: readonly Rgb[] = ['e69f00', '56b4e9', '009e73', 'cc79a7', 'f0e442', 'd55e00', '0072b2'].map(hexToRgb);

export function expertColour(index: number): Rgb {
  return EXPERT_COLOURS[index % EXPERT_COLOURS.length];
}
