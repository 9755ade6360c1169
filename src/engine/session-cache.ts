// ORT's optimized graphs, kept in the engine's cache (cache-dir.ts, purpose "optimized") so that a
// graph is optimized once, not at every start. A U-Net stored in float16 (the trainer's --fp16 export)
// takes ORT most of its load time to fold the float16 → float32 casts (38 s for an SD1.5 expert on
// 2 cores); the optimized graph has them folded, so the next open only reads it.
//
// An entry is a folder <graph-tag>-<key>/ with model.onnx, model.onnx.data (its initializers: the
// external-data file keeps graphs over protobuf's 2 GiB working, and onnxruntime 1.30 wants it in the
// graph's own folder) and entry.json. The key covers everything the optimized graph depends on: the
// graph file (path, size, mtime), onnxruntime's version, the execution provider, the optimization
// level and the CPU (level "all" writes CPU-specific layouts). Entries are written to a temporary
// folder and renamed into place; one that fails to open is deleted and rebuilt.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { cpus } from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';

export const ENTRY_MODEL = 'model.onnx';
export const ENTRY_DATA = 'model.onnx.data';
const ENTRY_META = 'entry.json';

export interface CacheKeyParts {
  graph: string;
  size: number;
  mtimeMs: number;
  ort: string;
  executionProvider: string;
  optimizationLevel: string;
  cpu: string;
}

export interface CachedOpen {
  session: ort.InferenceSession;
  /**
   * "hit": opened from the cache; "written": optimized from the graph and stored; "rebuilt": a broken
   * entry was replaced; "uncacheable": onnxruntime cannot reopen what it saves of this graph (the entry
   * records that), so the graph itself was opened.
   */
  outcome: 'hit' | 'written' | 'rebuilt' | 'uncacheable';
  entry: string;
}

/** Creates a session (the engine's wrapper around InferenceSession.create, with its error mapping). */
export type CreateSession = (file: string, options: ort.InferenceSession.SessionOptions) => Promise<ort.InferenceSession>;

function hash(text: string, length: number): string {
  return createHash('sha256').update(text).digest('hex').slice(0, length);
}

/**
 * The graph file and the files beside it that may hold its external data (`model.onnx_data`,
 * `weights.onnx_data` shared by several graphs, …: every file there but other graphs and JSON or text
 * files), with their sizes and modification times. onnxruntime reads external data only from the
 * graph's own folder, so a change to its weights changes one of these.
 */
export async function graphFiles(graph: string): Promise<{ name: string; size: number; mtimeMs: number }[]> {
  const dir = path.dirname(graph);
  const base = path.basename(graph);
  const names = (await readdir(dir)).filter((n) => n === base || !/\.(onnx|json|txt|md)$/i.test(n)).sort();
  const files = await Promise.all(
    names.map(async (name) => {
      const s = await stat(path.join(dir, name));
      return { name, size: s.size, mtimeMs: Math.round(s.mtimeMs), file: s.isFile() };
    }),
  );
  // folders are not external data (a merged graph keeps its optimized entry in a folder beside it)
  return files.filter((f) => f.file).map(({ name, size, mtimeMs }) => ({ name, size, mtimeMs }));
}

export async function cacheKeyParts(
  graph: string,
  executionProvider: string,
  optimizationLevel: string,
): Promise<CacheKeyParts> {
  const files = await graphFiles(graph);
  return {
    graph: path.resolve(graph),
    size: files.reduce((a, f) => a + f.size, 0),
    mtimeMs: Math.max(...files.map((f) => f.mtimeMs)),
    ort: ort.env.versions.node ?? ort.env.versions.common,
    executionProvider,
    optimizationLevel,
    cpu: `${process.arch} ${cpus()[0]?.model ?? 'unknown'}`,
  };
}

/** The entry folder of a graph under `cacheDir`: one per graph path (older keys are replaced). */
export function entryDir(cacheDir: string, key: CacheKeyParts): string {
  return path.join(cacheDir, `${graphTag(key.graph)}-${hash(JSON.stringify(key), 16)}`);
}

function graphTag(graph: string): string {
  const readable = `${path.basename(path.dirname(graph))}-${path.basename(graph, '.onnx')}`.replace(/[^A-Za-z0-9_.-]/g, '_');
  return `${readable}-${hash(graph, 8)}`;
}

/** 'valid', 'uncacheable' (an entry that records onnxruntime could not reopen its optimized graph) or 'invalid'. */
async function entryState(dir: string, key: CacheKeyParts): Promise<'valid' | 'uncacheable' | 'invalid'> {
  try {
    const meta = JSON.parse(await readFile(path.join(dir, ENTRY_META), 'utf8')) as { key: unknown; files?: Record<string, number>; uncacheable?: string };
    if (JSON.stringify(meta.key) !== JSON.stringify(key)) return 'invalid';
    if (typeof meta.uncacheable === 'string') return 'uncacheable';
    for (const [name, bytes] of Object.entries(meta.files ?? {})) {
      if ((await stat(path.join(dir, name))).size !== bytes) return 'invalid';
    }
    return meta.files?.[ENTRY_MODEL] !== undefined ? 'valid' : 'invalid';
  } catch {
    return 'invalid';
  }
}

/** Replaces the entry by one that only records why the graph is not cached (the key keeps it current). */
async function markUncacheable(dir: string, key: CacheKeyParts, reason: string): Promise<void> {
  const tmp = `${dir}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
  try {
    await rm(dir, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    await writeFile(path.join(tmp, ENTRY_META), `${JSON.stringify({ key, uncacheable: reason.split('\n')[0] }, null, 2)}\n`);
    await removeOlderEntries(path.dirname(dir), path.basename(dir));
    await rename(tmp, dir);
  } catch {
    await rm(tmp, { recursive: true, force: true });
  }
}

/**
 * Opens `graph` through the cache: from its optimized entry when there is a valid one (no
 * optimization at load: it was done), else writes the entry first, in a child process (the load-time
 * peak, about twice the float32 bytes of a float16-stored graph, then stays out of the engine's
 * process and its heap), and opens it. When the child cannot write it, the engine optimizes the graph
 * itself, writing the entry on the way. `options` are the session options for the graph (the
 * optimization level is part of the key).
 */
export async function openThroughCache(
  graph: string,
  options: ort.InferenceSession.SessionOptions,
  cacheDir: string,
  create: CreateSession,
  { inChild = true }: { inChild?: boolean } = {},
): Promise<CachedOpen> {
  const level = options.graphOptimizationLevel ?? 'all';
  const key = await cacheKeyParts(graph, executionProviderName(options), level);
  const dir = entryDir(cacheDir, key);
  const fromEntry = () => create(path.join(dir, ENTRY_MODEL), { ...options, graphOptimizationLevel: 'disabled' });
  let outcome: CachedOpen['outcome'] = 'written';
  const state = await entryState(dir, key);
  if (state === 'uncacheable') return { session: await create(graph, options), outcome: 'uncacheable', entry: dir };
  if (state === 'valid') {
    try {
      return { session: await fromEntry(), outcome: 'hit', entry: dir };
    } catch {
      outcome = 'rebuilt';
    }
  }
  await rm(dir, { recursive: true, force: true });
  if (inChild) {
    // A child that fails (a broken graph, no way to start one) leaves it to the engine below, whose
    // errors say what is wrong with the graph.
    const stored = await writeEntry(graph, options, key, dir, optimizeInChild).catch(() => false);
    if (stored) {
      try {
        return { session: await fromEntry(), outcome, entry: dir };
      } catch (err) {
        // onnxruntime wrote an optimized graph it cannot load (e.g. an If branch that repeats an
        // initializer's name): remember that, or every open would optimize the graph three times
        await markUncacheable(dir, key, err instanceof Error ? err.message : String(err));
        return { session: await create(graph, options), outcome: 'uncacheable', entry: dir };
      }
    }
  }
  let session: ort.InferenceSession | undefined;
  await writeEntry(graph, options, key, dir, async (file, opts) => {
    session = await create(file, opts);
  });
  return { session: session!, outcome, entry: dir };
}

/** Writes the optimized graph of `graph` as onnxruntime does with `options.optimizedModelFilePath`. */
type Optimize = (graph: string, options: ort.InferenceSession.SessionOptions) => Promise<void>;

/**
 * Writes the entry into a temporary folder and renames it into place; true when it is there. A
 * failure of `optimize` itself is thrown (a broken graph); a cache that cannot be written is not.
 */
async function writeEntry(
  graph: string,
  options: ort.InferenceSession.SessionOptions,
  key: CacheKeyParts,
  dir: string,
  optimize: Optimize,
): Promise<boolean> {
  const tmp = `${dir}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
  try {
    await mkdir(tmp, { recursive: true });
  } catch {
    await optimize(graph, options); // no cache here: only the session
    return false;
  }
  try {
    await optimize(graph, {
      ...options,
      optimizedModelFilePath: path.join(tmp, ENTRY_MODEL),
      // ORT warns that a level-"all" graph is for this machine only: the key holds the CPU for that.
      logSeverityLevel: 3,
      extra: {
        ...(options.extra ?? {}),
        session: {
          ...(((options.extra ?? {}) as { session?: Record<string, string> }).session ?? {}),
          optimized_model_external_initializers_file_name: ENTRY_DATA,
          optimized_model_external_initializers_min_size_in_bytes: '1024',
        },
      },
    });
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  try {
    const files: Record<string, number> = {};
    for (const name of await readdir(tmp)) files[name] = (await stat(path.join(tmp, name))).size;
    if (files[ENTRY_MODEL] === undefined) throw new Error('onnxruntime wrote no optimized graph');
    await writeFile(path.join(tmp, ENTRY_META), `${JSON.stringify({ key, files }, null, 2)}\n`);
    await removeOlderEntries(path.dirname(dir), path.basename(dir));
    await rename(tmp, dir);
    return true;
  } catch {
    // Another engine wrote the entry first, or the cache is not writable: the session is good anyway.
    await rm(tmp, { recursive: true, force: true });
    return false;
  }
}

const CHILD_SCRIPT = `
const [ortPath, graph, optionsJson] = process.argv.slice(1);
require(ortPath).InferenceSession.create(graph, JSON.parse(optionsJson)).then(
  (s) => s.release().then(() => process.exit(0)),
  (e) => { process.stderr.write(String(e && e.message)); process.exit(1); });
`;

/** Runs onnxruntime's optimization in a child Node process; rejects when it fails. */
function optimizeInChild(graph: string, options: ort.InferenceSession.SessionOptions): Promise<void> {
  const ortPath = createRequire(import.meta.url).resolve('onnxruntime-node');
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['-e', CHILD_SCRIPT, ortPath, graph, JSON.stringify(options)],
      { maxBuffer: 1 << 20, env: process.env },
      (err, _stdout, stderr) => (err ? reject(new Error(stderr.trim() || err.message)) : resolve()),
    );
  });
}

/** Entries of the same graph under other keys (it changed, or onnxruntime was updated). */
async function removeOlderEntries(cacheDir: string, keep: string): Promise<void> {
  const tag = keep.slice(0, keep.lastIndexOf('-') + 1);
  for (const name of await readdir(cacheDir).catch(() => [] as string[])) {
    if (name.startsWith(tag) && name !== keep && !name.includes('.tmp-')) {
      await rm(path.join(cacheDir, name), { recursive: true, force: true });
    }
  }
}

function executionProviderName(options: ort.InferenceSession.SessionOptions): string {
  return (options.executionProviders ?? ['cpu'])
    .map((ep) => (typeof ep === 'string' ? ep : `${ep.name}${'deviceId' in ep ? `:${String(ep.deviceId)}` : ''}`))
    .join(',');
}
