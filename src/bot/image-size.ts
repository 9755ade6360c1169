// The /imagine `size` option: a shape (square, portrait, landscape, …) turned into a width and height
// that the package accepts. Sides are multiples of the package's latent downsample (PackageInfo
// size.multiple) inside [size.min, size.max]; the pixel count stays near the default size's, so a
// portrait costs about as much as the default square.
import type { PackageInfo } from '../engine/api.ts';

export const SIZE_CHOICES = [
  { value: 'square', name: 'Square 1:1', ratio: [1, 1] },
  { value: 'portrait', name: 'Portrait 2:3', ratio: [2, 3] },
  { value: 'landscape', name: 'Landscape 3:2', ratio: [3, 2] },
  { value: 'tall', name: 'Tall 9:16', ratio: [9, 16] },
  { value: 'wide', name: 'Wide 16:9', ratio: [16, 9] },
] as const;

export type SizeChoice = (typeof SIZE_CHOICES)[number]['value'];

export const SIZE_VALUES: readonly string[] = SIZE_CHOICES.map((choice) => choice.value);

export function isSizeChoice(value: string): value is SizeChoice {
  return SIZE_VALUES.includes(value);
}

export interface ImageSize {
  width: number;
  height: number;
}

/**
 * The allowed size closest to the shape at about the default pixel count. Every pair of allowed sides
 * is scored by how far its aspect ratio is from the shape's (weighted twice) plus how far its pixel
 * count is from the default's, both as log ratios; ties go to the smaller image.
 */
export function sizeFor(choice: SizeChoice, info: Pick<PackageInfo, 'defaults' | 'size'>): ImageSize {
  const [rw, rh] = SIZE_CHOICES.find((c) => c.value === choice)!.ratio;
  const { defaults, size } = info;
  const multiple = Math.max(1, size.multiple);
  const lo = Math.ceil(size.min / multiple) * multiple;
  const hi = Math.floor(size.max / multiple) * multiple;
  if (lo > hi) return { width: defaults.width, height: defaults.height };
  const pixels = defaults.width * defaults.height;
  const aspect = Math.log(rw / rh);
  let best: ImageSize & { score: number } = { width: defaults.width, height: defaults.height, score: Infinity };
  for (let width = lo; width <= hi; width += multiple) {
    for (let height = lo; height <= hi; height += multiple) {
      const score = 2 * Math.abs(Math.log(width / height) - aspect) + Math.abs(Math.log((width * height) / pixels));
      if (score < best.score - 1e-9 || (Math.abs(score - best.score) <= 1e-9 && width * height < best.width * best.height)) {
        best = { width, height, score };
      }
    }
  }
  return { width: best.width, height: best.height };
}

/** "28×40 (Portrait 2:3)" when a shape maps to exactly this size, else "28×40". */
export function describeSize(width: number, height: number, info: Pick<PackageInfo, 'defaults' | 'size'>): string {
  const shape = SIZE_CHOICES.find((choice) => {
    const mapped = sizeFor(choice.value, info);
    return mapped.width === width && mapped.height === height;
  });
  return shape ? `${width}×${height} (${shape.name})` : `${width}×${height}`;
}
