// The contribution panel: the image, one heatmap per expert, and a map of the dominant expert.
import type { ContributionMaps, ResolvedParams, RgbImage } from '../api.ts';
import { type Canvas, type Rgb, createCanvas, fillRect, fitInside, resampleMap, resizeRgb } from './canvas.ts';
import { type ColormapName, colormapTable, expertColour } from './colormap.ts';
import { GLYPH_HEIGHT, drawText, measureText } from './font.ts';
import { BACKGROUND, MUTED_TEXT_COLOUR, TEXT_COLOUR, captionHeight, drawTile, gridShape, textScaleFor } from './layout.ts';
import { type Resample, encodePng } from './png.ts';

export interface PanelOptions {
  /** Longer side of each tile in pixels (default 256). */
  tileSize?: number;
  /** Tiles per row; default: one row up to 5 tiles, else two rows. */
  columns?: number;
  colormap?: ColormapName;
  /** How the image is scaled up to the tile (default `nearest`). */
  resample?: Resample;
  /** Caption of the image tile (default "Image"). */
  imageLabel?: string;
  /** Embed these as the PNG's `parameters`, as A1111 does for grids. */
  params?: ResolvedParams;
}

const GAP = 8;

export function checkContributionMaps(maps: ContributionMaps): void {
  const size = maps.width * maps.height;
  if (!Number.isInteger(size) || size <= 0) throw new Error(`invalid map size ${maps.width}x${maps.height}`);
  if (maps.experts.length === 0) throw new Error('contribution maps name no experts');
  if (maps.weights.length !== maps.experts.length) {
    throw new Error(`${maps.weights.length} weight maps for ${maps.experts.length} experts`);
  }
  for (const [i, weights] of maps.weights.entries()) {
    if (weights.length !== size) throw new Error(`weight map ${i} has ${weights.length} values, expected ${size}`);
  }
}

/** Per-pixel share 0..1 of one expert through a colour map. */
function heatmapTile(weights: Float32Array, colormap: Uint8Array, width: number, height: number): RgbImage {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < weights.length; i++) {
    const weight = weights[i];
    const level = weight > 0 ? Math.round(Math.min(1, weight) * 255) * 3 : 0;
    data[i * 3] = colormap[level];
    data[i * 3 + 1] = colormap[level + 1];
    data[i * 3 + 2] = colormap[level + 2];
  }
  return { width, height, data };
}

/**
 * Each pixel in the colour of its strongest expert, shaded by the image's brightness so the
 * picture stays readable, over a dimmed grey copy of the image; the more certain the choice
 * (weight from 1/N up to 1), the more opaque the colour.
 */
function dominantTile(image: RgbImage, upsampled: Float32Array[], colours: readonly Rgb[]): RgbImage {
  const { width, height } = image;
  const data = new Uint8Array(width * height * 3);
  const uniform = 1 / upsampled.length;
  for (let p = 0; p < width * height; p++) {
    let best = 0;
    for (let e = 1; e < upsampled.length; e++) if (upsampled[e][p] > upsampled[best][p]) best = e;
    const certainty = upsampled.length === 1 ? 1 : Math.min(1, Math.max(0, (upsampled[best][p] - uniform) / (1 - uniform)));
    const alpha = 0.35 + 0.6 * certainty;
    const luminance = (0.299 * image.data[p * 3] + 0.587 * image.data[p * 3 + 1] + 0.114 * image.data[p * 3 + 2]) / 255;
    const dimmed = 90 * luminance;
    const shade = 0.35 + 0.65 * luminance;
    const colour = colours[best];
    for (let c = 0; c < 3; c++) data[p * 3 + c] = Math.round(dimmed * (1 - alpha) + colour[c] * shade * alpha);
  }
  return { width, height, data };
}

interface LegendItem {
  width: number;
  draw: (canvas: Canvas, x: number, y: number) => void;
}

function colourBarItem(colormap: Uint8Array, scale: number): LegendItem {
  const barWidth = 64 * scale;
  const barHeight = GLYPH_HEIGHT * scale;
  const left = '0%';
  const right = '100%';
  const gap = 4 * scale;
  const leftWidth = measureText(left, scale).width;
  const width = leftWidth + gap + barWidth + gap + measureText(right, scale).width;
  return {
    width,
    draw: (canvas, x, y) => {
      drawText(canvas, left, x, y, MUTED_TEXT_COLOUR, scale);
      const barX = x + leftWidth + gap;
      for (let i = 0; i < barWidth; i++) {
        const level = Math.round((i / (barWidth - 1)) * 255) * 3;
        fillRect(canvas, barX + i, y, 1, barHeight, [colormap[level], colormap[level + 1], colormap[level + 2]]);
      }
      drawText(canvas, right, barX + barWidth + gap, y, MUTED_TEXT_COLOUR, scale);
    },
  };
}

function swatchItem(label: string, colour: Rgb, scale: number): LegendItem {
  const swatch = GLYPH_HEIGHT * scale;
  const gap = 4 * scale;
  return {
    width: swatch + gap + measureText(label, scale).width,
    draw: (canvas, x, y) => {
      fillRect(canvas, x, y, swatch, swatch, colour);
      drawText(canvas, label, x + swatch + gap, y, TEXT_COLOUR, scale);
    },
  };
}

/** Places legend items left to right, wrapping within `width`; returns the rows' item positions. */
function flowLegend(items: LegendItem[], width: number, scale: number): { x: number; row: number; item: LegendItem }[] {
  const spacing = 12 * scale;
  const placed: { x: number; row: number; item: LegendItem }[] = [];
  let x = 0;
  let row = 0;
  for (const item of items) {
    if (x > 0 && x + item.width > width) {
      x = 0;
      row += 1;
    }
    placed.push({ x, row, item });
    x += item.width + spacing;
  }
  return placed;
}

/**
 * A PNG panel: the image, each expert's weight map (title and overall share, e.g. "Curves 41%"),
 * the dominant-expert map, and a legend (colour bar and expert colours).
 */
export async function renderContributionPanel(
  image: RgbImage,
  maps: ContributionMaps,
  titles: Record<string, string>,
  opts: PanelOptions = {},
): Promise<Buffer> {
  checkContributionMaps(maps);
  const tileSize = opts.tileSize ?? 256;
  const scale = textScaleFor(tileSize);
  const colormap = colormapTable(opts.colormap ?? 'viridis');
  const { width: tileWidth, height: tileHeight } = fitInside(image.width, image.height, tileSize, tileSize);

  const shown = await resizeRgb(image, tileWidth, tileHeight, opts.resample ?? 'nearest');
  const upsampled = maps.weights.map((weights) => resampleMap(weights, maps.width, maps.height, tileWidth, tileHeight));
  const colours = maps.experts.map((_, i) => expertColour(i));
  const titleOf = (expert: string): string => titles[expert] ?? expert;

  const tiles: { image: RgbImage; caption: string }[] = [
    { image: shown, caption: opts.imageLabel ?? 'Image' },
    ...maps.experts.map((expert, i) => ({
      image: heatmapTile(upsampled[i], colormap, tileWidth, tileHeight),
      caption: `${titleOf(expert)} ${Math.round((maps.shares[i] ?? 0) * 100)}%`,
    })),
    { image: dominantTile(shown, upsampled, colours), caption: 'Dominant expert' },
  ];

  const { columns, rows } = gridShape(tiles.length, opts.columns);
  const cellHeight = tileHeight + captionHeight(scale);
  const width = GAP + columns * (tileWidth + GAP);
  const legendItems = [colourBarItem(colormap, scale), ...maps.experts.map((e, i) => swatchItem(titleOf(e), colours[i], scale))];
  const legend = flowLegend(legendItems, width - 2 * GAP, scale);
  const legendRowHeight = GLYPH_HEIGHT * scale + 6 * scale;
  const legendRows = (legend.at(-1)?.row ?? 0) + 1;
  const legendTop = GAP + rows * (cellHeight + GAP);
  const height = legendTop + legendRows * legendRowHeight + GAP;

  const canvas = createCanvas(width, height, BACKGROUND);
  tiles.forEach((tile, i) => {
    const x = GAP + (i % columns) * (tileWidth + GAP);
    const y = GAP + Math.floor(i / columns) * (cellHeight + GAP);
    drawTile(canvas, tile.image, tile.caption, x, y, tileWidth, tileHeight, scale);
  });
  for (const { x, row, item } of legend) item.draw(canvas, GAP + x, legendTop + 3 * scale + row * legendRowHeight);

  return encodePng(canvas, opts.params);
}
