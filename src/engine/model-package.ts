import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { PackageInfo, SchedulerName } from './api.ts';
import { EngineError } from './api.ts';
import { packageCacheDir } from './cache-dir.ts';
import { loadManifest, type EnsembleEntry, type ExpertEntry, type GraphChoice, type Manifest } from './manifest.ts';
import { mergedGraph } from './merge/cache.ts';
import { assertCudaUsable, GraphSession, type SessionOptions } from './onnx-session.ts';
import { ClipTokenizer } from './tokenizer.ts';
import { warmUpRun } from './warm-up.ts';

const MERGE_CACHE_SIZE = 2;

/**
 * A loaded model package: the manifest plus lazily opened sessions and tokenizers. Sessions are
 * opened on first use and kept; merged graphs are cached per (experts, weights).
 */
export class ModelPackage {
  private sessions = new Map<string, Promise<GraphSession>>();
  /** Sessions open one at a time: two graphs loading at once would hold both loads' buffers. */
  private opening: Promise<unknown> = Promise.resolve();
  /** Where the package's graphs keep their onnxruntime-optimized copies (CPU); undefined: no cache. */
  private optimizedCacheDir: string | undefined;
  private tokenizers = new Map<string, Promise<ClipTokenizer>>();
  private merged = new Map<string, Promise<GraphSession>>();
  private schedulerConfigCache: Promise<Record<string, unknown>> | undefined;

  private constructor(
    readonly manifest: Manifest,
    readonly options: SessionOptions,
  ) {}

  /**
   * Reads the package's manifest and picks each graph's variant for the execution provider: under
   * CUDA the fp16-compute one where there is one (else fp32), on the CPU fp32 where there is one (else
   * fp16, with a warning). Under CUDA it first checks that onnxruntime's CUDA provider and the CUDA
   * libraries are there (EngineError naming what is missing). Sessions open lazily (session()).
   */
  static async load(dir: string, options: Partial<SessionOptions> = {}): Promise<ModelPackage> {
    const executionProvider = options.executionProvider ?? 'cpu';
    const cuda = executionProvider === 'cuda';
    const precision = options.precision ?? (cuda ? 'fp16' : 'fp32');
    const manifest = await loadManifest(dir, { precision });
    if (cuda) assertCudaUsable();
    const warn = options.warn ?? ((message: string) => console.warn(message));
    if (!cuda) {
      const fp16Only = uniqueFiles(manifest.fallbacks.filter((g) => g.precision === 'fp16'));
      if (fp16Only.length > 0) {
        warn(
          `${manifest.name}: ${fp16Only.map((g) => g.what).join(', ')} ${fp16Only.length === 1 ? 'has' : 'have'} only an fp16-compute graph; ` +
            "the CPU runs it, but onnxruntime's CPU provider lacks float16 kernels for most operators (slow, or it fails to load). " +
            'Export an fp32 variant for CPU use.',
        );
      }
    }
    const optimizedCacheDir =
      options.optimizedCacheDir ?? (!cuda && options.optimizedCache !== false ? packageCacheDir(manifest.dir, 'optimized') : undefined);
    const { optimizedCacheDir: _, ...rest } = options;
    const pkg = new ModelPackage(manifest, { ...rest, executionProvider, precision, warmUp: options.warmUp ?? cuda, warn });
    pkg.optimizedCacheDir = optimizedCacheDir;
    return pkg;
  }

  get label(): string {
    return `${this.manifest.name}@${this.manifest.version}`;
  }

  info(): PackageInfo {
    const m = this.manifest;
    return {
      name: m.name,
      version: m.version,
      description: m.description,
      experts: m.experts.map((e) => ({ id: e.id, title: e.title, description: e.description })),
      ensembles: m.ensembles.map((e) => ({
        id: e.id,
        title: e.title,
        description: e.description,
        method: e.method,
        experts: [...e.experts],
        subsets: e.subsets,
      })),
      defaults: { ...m.defaults, scheduler: m.defaults.scheduler as SchedulerName },
      size: { ...m.size, multiple: m.latent.downsample },
      limits: { ...m.limits },
      display: m.display,
      architectures: Object.fromEntries(m.experts.map((e) => [e.id, e.architecture])),
      img2img: m.vaeEncoder !== undefined,
      executionProvider: this.options.executionProvider,
      precision: precisionSummary(this.manifest.graphs),
    };
  }

  expert(id: string): ExpertEntry {
    const e = this.manifest.experts.find((x) => x.id === id);
    if (!e) {
      throw new EngineError(
        'unknown_model',
        `Unknown expert "${id}". Available experts: ${this.manifest.experts.map((x) => x.id).join(', ')}.`,
      );
    }
    return e;
  }

  ensemble(id: string): EnsembleEntry {
    const e = this.manifest.ensembles.find((x) => x.id === id);
    if (!e) {
      const available = this.manifest.ensembles.map((x) => x.id);
      throw new EngineError(
        'unknown_model',
        available.length
          ? `Unknown ensemble "${id}". Available ensembles: ${available.join(', ')}.`
          : `Unknown ensemble "${id}": this model package has no trained ensemble.`,
      );
    }
    return e;
  }

  /**
   * The session of one of the package's graphs (a path from the manifest), opened once and shared by
   * everything that names the same file (experts sharing a text encoder, say). With `warmUp` it runs
   * once at the package's default size right after opening.
   */
  session(file: string): Promise<GraphSession> {
    let s = this.sessions.get(file);
    if (!s) {
      const open = async () => {
        const session = await GraphSession.open(file, { ...this.options, optimizedCacheDir: this.optimizedCacheDir });
        const graph = this.manifest.graphs.find((g) => g.path === file);
        if (this.options.warmUp && graph) {
          try {
            await warmUpRun(session, graph.role, this.manifest);
          } catch (err) {
            await session.release().catch(() => {});
            throw err;
          }
        }
        return session;
      };
      s = this.opening.then(open, open);
      this.opening = s.catch(() => {});
      this.sessions.set(file, s);
      s.catch(() => this.sessions.delete(file));
    }
    return s;
  }

  tokenizer(dir: string = this.manifest.tokenizer): Promise<ClipTokenizer> {
    let t = this.tokenizers.get(dir);
    if (!t) {
      t = ClipTokenizer.load(dir).catch((err: unknown) => {
        this.tokenizers.delete(dir);
        throw new EngineError('bad_package', `Cannot load the tokenizer in ${dir}: ${(err as Error).message}`);
      });
      this.tokenizers.set(dir, t);
    }
    return t;
  }

  schedulerConfig(): Promise<Record<string, unknown>> {
    this.schedulerConfigCache ??= readFile(this.manifest.schedulerConfig, 'utf8').then(
      (text) => {
        try {
          return JSON.parse(text) as Record<string, unknown>;
        } catch (err) {
          throw new EngineError('bad_package', `${this.manifest.schedulerConfig} is not valid JSON: ${(err as Error).message}`);
        }
      },
    );
    return this.schedulerConfigCache;
  }

  /**
   * A session over Σ wᵢ θᵢ of the experts' U-Nets, opened once per (experts, weights) and kept in a
   * small LRU; the merged graph itself is streamed to, and reused from, the engine's cache folder.
   */
  mergedUnet(experts: ExpertEntry[], weights: number[]): Promise<GraphSession> {
    const key = experts.map((e, i) => `${e.id}:${weights[i].toFixed(6)}`).join('|');
    const cached = this.merged.get(key);
    if (cached) {
      this.merged.delete(key);
      this.merged.set(key, cached);
      return cached;
    }
    const build = (async () => {
      const graphs = experts.map((e) => ({ label: `expert "${e.id}" (${e.unet})`, file: e.unet }));
      const file = await mergedGraph(this.manifest.dir, graphs, weights);
      // its optimized graph lives in the merged graph's own folder, so pruning the merge removes it too
      const optimizedCacheDir = this.optimizedCacheDir && path.join(path.dirname(file), 'optimized');
      return GraphSession.open(file, { ...this.options, optimizedCacheDir });
    })();
    this.merged.set(key, build);
    build.catch(() => this.merged.delete(key));
    while (this.merged.size > MERGE_CACHE_SIZE) {
      const oldest = this.merged.keys().next().value as string;
      const evicted = this.merged.get(oldest)!;
      this.merged.delete(oldest);
      evicted.then((s) => s.release()).catch(() => {});
    }
    return build;
  }

  /** Every session opened so far (for timing). */
  async openSessions(): Promise<GraphSession[]> {
    const all = await Promise.allSettled([...this.sessions.values(), ...this.merged.values()]);
    return all.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  }

  async dispose(): Promise<void> {
    for (const s of await this.openSessions()) await s.release();
    this.sessions.clear();
    this.merged.clear();
  }
}

/** One entry per file (a shared text encoder is listed for each expert that uses it). */
function uniqueFiles(graphs: GraphChoice[]): GraphChoice[] {
  return [...new Map(graphs.map((g) => [g.path, g])).values()];
}

function precisionSummary(graphs: GraphChoice[]): 'fp32' | 'fp16' | 'mixed' {
  const used = new Set(graphs.map((g) => g.precision));
  return used.size === 1 ? [...used][0] : 'mixed';
}
