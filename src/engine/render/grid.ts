// A labelled grid of images: `--count N` batches, and `--compare` (each expert next to the ensemble).
import type { ResolvedParams, RgbImage } from '../api.ts';
import { createCanvas, fitInside, resizeRgb } from './canvas.ts';
import { BACKGROUND, captionHeight, drawTile, gridShape, textScaleFor } from './layout.ts';
import { type Resample, checkRgbImage, encodePng } from './png.ts';

export interface GridTile {
  image: RgbImage;
  label?: string;
}

export interface GridOptions {
  /** Default: about square (ceil of the square root of the tile count). */
  columns?: number;
  /** Longer side of each tile's box in pixels (default 256). */
  tileSize?: number;
  /** Pixels between tiles and around the grid (default 8). */
  gap?: number;
  /** How images are scaled into their boxes (default `nearest`). */
  resample?: Resample;
  /** Embed these as the PNG's `parameters`, as A1111 does for grids. */
  params?: ResolvedParams;
}

/**
 * One PNG with the tiles in rows, each image fitted (aspect kept) into a tileSize box; when any
 * tile has a label, every tile gets a caption bar so the rows stay aligned.
 */
export async function renderGrid(tiles: GridTile[], opts: GridOptions = {}): Promise<Buffer> {
  if (tiles.length === 0) throw new Error('renderGrid needs at least one tile');
  tiles.forEach((tile) => checkRgbImage(tile.image));
  const tileSize = opts.tileSize ?? 256;
  const gap = opts.gap ?? 8;
  if (!Number.isInteger(tileSize) || tileSize <= 0) throw new Error(`invalid tile size ${tileSize}`);
  if (!Number.isInteger(gap) || gap < 0) throw new Error(`invalid gap ${gap}`);

  const { columns, rows } = gridShape(tiles.length, opts.columns ?? Math.ceil(Math.sqrt(tiles.length)));
  // Boxes share the widest aspect ratio among the tiles so mixed sizes still line up.
  const boxWidth = Math.max(...tiles.map((t) => fitInside(t.image.width, t.image.height, tileSize, tileSize).width));
  const boxHeight = Math.max(...tiles.map((t) => fitInside(t.image.width, t.image.height, tileSize, tileSize).height));
  const scale = textScaleFor(tileSize);
  const labelled = tiles.some((tile) => tile.label !== undefined && tile.label !== '');
  const cellHeight = boxHeight + (labelled ? captionHeight(scale) : 0);

  const canvas = createCanvas(gap + columns * (boxWidth + gap), gap + rows * (cellHeight + gap), BACKGROUND);
  const resized = await Promise.all(
    tiles.map((tile) => {
      const size = fitInside(tile.image.width, tile.image.height, boxWidth, boxHeight);
      return resizeRgb(tile.image, size.width, size.height, opts.resample ?? 'nearest');
    }),
  );
  resized.forEach((image, i) => {
    const x = gap + (i % columns) * (boxWidth + gap);
    const y = gap + Math.floor(i / columns) * (cellHeight + gap);
    drawTile(canvas, image, labelled ? (tiles[i].label ?? '') : undefined, x, y, boxWidth, boxHeight, scale);
  });
  return encodePng(canvas, opts.params);
}
