// Engine results → PNG attachments (via src/engine/render: A1111 parameters, grids, contribution panels).
import type { GenerateResult, PackageInfo, RgbImage } from '../engine/api.ts';
import { encodePng, renderContributionPanel, renderGrid } from '../engine/render/index.ts';
import type { OutgoingFile } from './messages.ts';

export interface RenderedImages {
  files: OutgoingFile[];
  /** The file the embed shows. */
  mainFile: string;
}

const PREVIEW_SIDE = 128;
const MIN_TILE = 128;

function displayOptions(info: PackageInfo): { displayWidth?: number; displayHeight?: number } {
  return info.display ? { displayWidth: info.display.width, displayHeight: info.display.height } : {};
}

function tileSize(info: PackageInfo, result: GenerateResult): number {
  return Math.max(MIN_TILE, info.display?.width ?? result.params.width);
}

function titles(info: PackageInfo): Record<string, string> {
  return Object.fromEntries(info.experts.map((e) => [e.id, e.title]));
}

/** One PNG for one image, a labelled grid for several; plus a contribution panel per image when asked. */
export async function renderImages(jobId: string, result: GenerateResult, info: PackageInfo, withPanels: boolean): Promise<RenderedImages> {
  const files: OutgoingFile[] = [];
  if (result.images.length === 1) {
    const [only] = result.images;
    files.push({ name: `${jobId}.png`, data: await encodePng(only.image, { ...result.params, seed: only.seed }, displayOptions(info)) });
  } else {
    const grid = await renderGrid(
      result.images.map((img) => ({ image: img.image, label: `seed ${img.seed}` })),
      { params: result.params, tileSize: tileSize(info, result), columns: 2 },
    );
    files.push({ name: `${jobId}-grid.png`, data: grid });
  }
  if (withPanels) files.push(...(await renderPanels(jobId, result, info)));
  return { files, mainFile: files[0].name };
}

/** A contribution panel (image, one weight map per expert, dominant expert) for each image that has maps. */
export async function renderPanels(jobId: string, result: GenerateResult, info: PackageInfo): Promise<OutgoingFile[]> {
  const panels: OutgoingFile[] = [];
  for (const [i, img] of result.images.entries()) {
    if (!img.contributions) continue;
    const data = await renderContributionPanel(img.image, img.contributions, titles(info), {
      params: { ...result.params, seed: img.seed },
    });
    panels.push({ name: `${jobId}-contributions${result.images.length > 1 ? `-${i + 1}` : ''}.png`, data });
  }
  return panels;
}

/** Each run's first image side by side, labelled (Compare: every expert alone, then the ensemble). */
export async function renderComparison(
  jobId: string,
  runs: { label: string; result: GenerateResult }[],
  info: PackageInfo,
): Promise<RenderedImages> {
  const grid = await renderGrid(
    runs.map((run) => ({ image: run.result.images[0].image, label: run.label })),
    { params: runs[runs.length - 1].result.params, tileSize: tileSize(info, runs[0].result), columns: Math.min(runs.length, 4) },
  );
  const name = `${jobId}-compare.png`;
  return { files: [{ name, data: grid }], mainFile: name };
}

/** A small preview of a running generation. */
export async function renderPreview(jobId: string, image: RgbImage): Promise<OutgoingFile> {
  const scale = Math.max(1, Math.floor(PREVIEW_SIDE / Math.max(image.width, image.height)));
  const data = await encodePng(image, undefined, { displayWidth: image.width * scale, displayHeight: image.height * scale });
  return { name: `${jobId}-preview.png`, data };
}
