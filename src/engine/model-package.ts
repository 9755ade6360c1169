import { readFile } from 'node:fs/promises';
import type { PackageInfo, SchedulerName } from './api.ts';
import { EngineError } from './api.ts';
import { loadManifest, type EnsembleEntry, type ExpertEntry, type Manifest } from './manifest.ts';
import { mergedGraph } from './merge/cache.ts';
import { GraphSession, type SessionOptions } from './onnx-session.ts';
import { ClipTokenizer } from './tokenizer.ts';

const MERGE_CACHE_SIZE = 2;

/**
 * A loaded model package: the manifest plus lazily opened sessions and tokenizers. Sessions are
 * opened on first use and kept; merged graphs are cached per (experts, weights).
 */
export class ModelPackage {
  private sessions = new Map<string, Promise<GraphSession>>();
  private tokenizers = new Map<string, Promise<ClipTokenizer>>();
  private merged = new Map<string, Promise<GraphSession>>();
  private schedulerConfigCache: Promise<Record<string, unknown>> | undefined;

  private constructor(
    readonly manifest: Manifest,
    readonly options: SessionOptions,
  ) {}

  static async load(dir: string, options: Partial<SessionOptions> = {}): Promise<ModelPackage> {
    const manifest = await loadManifest(dir);
    return new ModelPackage(manifest, { executionProvider: options.executionProvider ?? 'cpu', threads: options.threads });
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

  session(file: string): Promise<GraphSession> {
    let s = this.sessions.get(file);
    if (!s) {
      s = GraphSession.open(file, this.options);
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
      return GraphSession.open(file, this.options);
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
