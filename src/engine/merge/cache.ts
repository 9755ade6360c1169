// Merged graphs on disk, under the engine's cache (packageCacheDir(package, 'merged')): one folder
// per (graphs, weights), named by a hash of each graph's path, size and modification time, those of
// its external data files, and the weights. A merge is written to a temporary folder and renamed
// when complete, so a crash never leaves a half graph that a later call would use.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { packageCacheDir } from '../cache-dir.ts';
import { mergeGraphs, readLayouts, type MergeInput } from './stream-merge.ts';

/** Bump when the merged bytes would change for the same inputs (invalidates old cache entries). */
const MERGE_FORMAT = 1;
/** Merged graphs kept per package (the least recently used beyond this are deleted). */
export const MERGED_KEEP = 4;
/** Temporary folders older than this are left-overs of a crash. */
const STALE_TMP_MS = 24 * 3600 * 1000;

/** Weights as the cache keys and merges them: normalised to sum 1, rounded to 6 decimals. */
export function roundWeights(weights: number[]): number[] {
  const total = weights.reduce((s, w) => s + w, 0);
  return weights.map((w) => (total > 0 ? Number((w / total).toFixed(6)) : w));
}

/** The cache folder name for these graphs and weights (reads the graphs' headers and stats). */
export async function mergeKey(inputs: MergeInput[], weights: number[]): Promise<{ key: string; layouts: ReturnType<typeof readLayouts> }> {
  const layouts = readLayouts(inputs);
  const graphs = await Promise.all(
    layouts.map(async (l) => {
      const s = await stat(l.file);
      return {
        file: path.resolve(l.file),
        size: s.size,
        mtimeMs: s.mtimeMs,
        external: l.externalFiles.map((e) => [path.basename(e.file), e.size, e.mtimeMs]),
      };
    }),
  );
  const text = JSON.stringify({ format: MERGE_FORMAT, weights: roundWeights(weights), graphs });
  return { key: createHash('sha256').update(text).digest('hex').slice(0, 24), layouts };
}

/**
 * The path of the merged graph of `inputs` with `weights` for the package at `packageDir`: the
 * cached one when its key matches, else merged now (streaming) into the cache.
 */
export async function mergedGraph(
  packageDir: string,
  inputs: MergeInput[],
  weights: number[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<string> {
  const root = packageCacheDir(packageDir, 'merged', env);
  const { key, layouts } = await mergeKey(inputs, weights);
  const dir = path.join(root, key);
  const file = path.join(dir, 'model.onnx');
  if (await exists(file)) {
    const now = new Date();
    await utimes(dir, now, now).catch(() => {});
    return file;
  }
  const tmp = path.join(root, `${key}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp, { recursive: true });
  try {
    const rounded = roundWeights(weights);
    await mergeGraphs(inputs, rounded, tmp, layouts);
    const about = { experts: inputs.map((m, i) => ({ graph: path.resolve(m.file), weight: rounded[i] })) };
    await writeFile(path.join(tmp, 'merge.json'), JSON.stringify(about, null, 2) + '\n');
    try {
      await rename(tmp, dir);
    } catch (err) {
      // another process finished the same merge first: use theirs
      if (!(await exists(file))) throw err;
      await rm(tmp, { recursive: true, force: true });
    }
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw err;
  }
  await pruneMerged(root, dir).catch(() => {});
  return file;
}

/**
 * Deletes the least recently used merged graphs beyond MERGED_KEEP (never `keep`), and temporary
 * folders left by a crash.
 */
export async function pruneMerged(root: string, keep?: string): Promise<void> {
  const entries = await readdir(root, { withFileTypes: true });
  const done: { dir: string; used: number }[] = [];
  for (const e of entries) {
    if (!e.isDirectory()) continue;
    const dir = path.join(root, e.name);
    const s = await stat(dir).catch(() => undefined);
    if (!s) continue;
    if (e.name.includes('.tmp-')) {
      if (Date.now() - s.mtimeMs > STALE_TMP_MS) await rm(dir, { recursive: true, force: true });
    } else if (dir !== keep) done.push({ dir, used: s.mtimeMs });
  }
  done.sort((a, b) => b.used - a.used);
  const room = keep ? MERGED_KEEP - 1 : MERGED_KEEP;
  for (const old of done.slice(Math.max(room, 0))) await rm(old.dir, { recursive: true, force: true });
}

async function exists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch {
    return false;
  }
}
