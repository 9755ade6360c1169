// Decoder output → RgbImage.
import type { RgbImage } from '../api.ts';

/**
 * A decoder output in [-1, 1], CHW, to 8-bit RGB: round(clip(x / 2 + 0.5, 0, 1) * 255).
 * One channel is shown as grey; channels past the third (e.g. alpha) are ignored; NaN becomes 0.
 */
export function rgbFromFloat(chw: Float32Array, c: number, h: number, w: number): RgbImage {
  if (![c, h, w].every((n) => Number.isInteger(n) && n > 0)) throw new Error(`invalid shape [${c}, ${h}, ${w}]`);
  if (c === 2) throw new Error('cannot show a 2-channel tensor as RGB');
  const plane = h * w;
  if (chw.length < c * plane) throw new Error(`tensor has ${chw.length} values, expected ${c * plane}`);
  const data = new Uint8Array(plane * 3);
  for (let channel = 0; channel < 3; channel++) {
    const offset = (c === 1 ? 0 : channel) * plane;
    for (let p = 0; p < plane; p++) {
      const value = chw[offset + p] / 2 + 0.5;
      data[p * 3 + channel] = value > 0 ? Math.round(Math.min(1, value) * 255) : 0;
    }
  }
  return { width: w, height: h, data };
}
