// A plain RGB pixel buffer to compose panels and grids in, plus the resampling they need.
import type { RgbImage } from '../api.ts';
import { type Resample, sharpFromRgb } from './png.ts';

export type Rgb = readonly [number, number, number];
/** Same layout as RgbImage: row-major RGB, 3 bytes per pixel. */
export type Canvas = RgbImage;

export function createCanvas(width: number, height: number, background: Rgb): Canvas {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < data.length; i += 3) {
    data[i] = background[0];
    data[i + 1] = background[1];
    data[i + 2] = background[2];
  }
  return { width, height, data };
}

/** Fills a rectangle, clipped to the canvas. */
export function fillRect(canvas: Canvas, x: number, y: number, width: number, height: number, color: Rgb): void {
  const x0 = Math.max(0, Math.floor(x));
  const y0 = Math.max(0, Math.floor(y));
  const x1 = Math.min(canvas.width, Math.floor(x + width));
  const y1 = Math.min(canvas.height, Math.floor(y + height));
  for (let row = y0; row < y1; row++) {
    for (let col = x0; col < x1; col++) {
      const i = (row * canvas.width + col) * 3;
      canvas.data[i] = color[0];
      canvas.data[i + 1] = color[1];
      canvas.data[i + 2] = color[2];
    }
  }
}

/** Copies `image` onto the canvas with its top-left corner at (x, y), clipped to the canvas. */
export function blit(canvas: Canvas, image: RgbImage, x: number, y: number): void {
  const x0 = Math.max(0, x);
  const x1 = Math.min(canvas.width, x + image.width);
  if (x1 <= x0) return;
  for (let row = Math.max(0, y); row < Math.min(canvas.height, y + image.height); row++) {
    const source = ((row - y) * image.width + (x0 - x)) * 3;
    canvas.data.set(image.data.subarray(source, source + (x1 - x0) * 3), (row * canvas.width + x0) * 3);
  }
}

/** Resizes an RGB image with sharp (`nearest` or `lanczos`). */
export async function resizeRgb(image: RgbImage, width: number, height: number, resample: Resample): Promise<RgbImage> {
  if (width === image.width && height === image.height) return image;
  const { data, info } = await sharpFromRgb(image, width, height, resample).raw().toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`expected 3 channels after resize, got ${info.channels}`);
  return { width: info.width, height: info.height, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** The largest size with the image's aspect ratio that fits a box (at least 1×1). */
export function fitInside(width: number, height: number, boxWidth: number, boxHeight: number): { width: number; height: number } {
  const scale = Math.min(boxWidth / width, boxHeight / height);
  return { width: Math.max(1, Math.round(width * scale)), height: Math.max(1, Math.round(height * scale)) };
}

function cubicWeights(t: number): [number, number, number, number] {
  // Catmull-Rom (Keys, a = -0.5) at offsets -1, 0, 1, 2 from the sample left of t.
  const t2 = t * t;
  const t3 = t2 * t;
  return [
    -0.5 * t3 + t2 - 0.5 * t,
    1.5 * t3 - 2.5 * t2 + 1,
    -1.5 * t3 + 2 * t2 + 0.5 * t,
    0.5 * t3 - 0.5 * t2,
  ];
}

/**
 * Bicubic resampling of a scalar map (pixel centres aligned, edges clamped), result clamped to
 * [min, max] so that overshoot never leaves the map's range.
 */
export function resampleMap(
  map: Float32Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
  min = 0,
  max = 1,
): Float32Array {
  if (map.length !== width * height) throw new Error(`map has ${map.length} values, expected ${width * height}`);
  const out = new Float32Array(outWidth * outHeight);
  const xIndex = new Int32Array(outWidth * 4);
  const xWeight = new Float32Array(outWidth * 4);
  for (let ox = 0; ox < outWidth; ox++) {
    const sx = ((ox + 0.5) * width) / outWidth - 0.5;
    const left = Math.floor(sx);
    const weights = cubicWeights(sx - left);
    for (let k = 0; k < 4; k++) {
      xIndex[ox * 4 + k] = Math.min(width - 1, Math.max(0, left - 1 + k));
      xWeight[ox * 4 + k] = weights[k];
    }
  }
  const rows = new Float32Array(outWidth * height);
  for (let y = 0; y < height; y++) {
    for (let ox = 0; ox < outWidth; ox++) {
      let sum = 0;
      for (let k = 0; k < 4; k++) sum += xWeight[ox * 4 + k] * map[y * width + xIndex[ox * 4 + k]];
      rows[y * outWidth + ox] = sum;
    }
  }
  for (let oy = 0; oy < outHeight; oy++) {
    const sy = ((oy + 0.5) * height) / outHeight - 0.5;
    const top = Math.floor(sy);
    const weights = cubicWeights(sy - top);
    const rowIndex = weights.map((_, k) => Math.min(height - 1, Math.max(0, top - 1 + k)));
    for (let ox = 0; ox < outWidth; ox++) {
      let sum = 0;
      for (let k = 0; k < 4; k++) sum += weights[k] * rows[rowIndex[k] * outWidth + ox];
      out[oy * outWidth + ox] = Math.min(max, Math.max(min, sum));
    }
  }
  return out;
}
