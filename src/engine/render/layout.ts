// Shared look and tile layout of panels and grids: tiles with a caption bar under each.
import type { RgbImage } from '../api.ts';
import { type Canvas, type Rgb, blit, fillRect } from './canvas.ts';
import { GLYPH_HEIGHT, drawText, fitText, measureText } from './font.ts';

export const BACKGROUND: Rgb = [30, 31, 34];
export const CAPTION_BACKGROUND: Rgb = [43, 45, 49];
export const TEXT_COLOUR: Rgb = [235, 235, 240];
export const MUTED_TEXT_COLOUR: Rgb = [170, 172, 180];

/** Font scale for a tile of this size: 2 (10×16 px glyphs) for tiles of 192 px and up. */
export function textScaleFor(tileSize: number): number {
  return tileSize >= 192 ? 2 : 1;
}

export function captionHeight(scale: number): number {
  return GLYPH_HEIGHT * scale + 6 * scale;
}

/** Columns and rows for `count` tiles: one row up to `maxSingleRow`, else two rows. */
export function gridShape(count: number, columns?: number, maxSingleRow = 5): { columns: number; rows: number } {
  const cols = Math.max(1, Math.min(count, columns ?? (count <= maxSingleRow ? count : Math.ceil(count / 2))));
  return { columns: cols, rows: Math.max(1, Math.ceil(count / cols)) };
}

/** Draws a tile image centred in its cell and its caption (centred, shortened to fit) below it. */
export function drawTile(
  canvas: Canvas,
  image: RgbImage,
  caption: string | undefined,
  cellX: number,
  cellY: number,
  cellWidth: number,
  cellHeight: number,
  scale: number,
): void {
  blit(canvas, image, cellX + Math.floor((cellWidth - image.width) / 2), cellY + Math.floor((cellHeight - image.height) / 2));
  if (caption === undefined) return;
  const barHeight = captionHeight(scale);
  const barY = cellY + cellHeight;
  fillRect(canvas, cellX, barY, cellWidth, barHeight, CAPTION_BACKGROUND);
  const text = fitText(caption, cellWidth - 4 * scale, scale);
  const { width } = measureText(text, scale);
  drawText(canvas, text, cellX + Math.floor((cellWidth - width) / 2), barY + 3 * scale, TEXT_COLOUR, scale);
}
