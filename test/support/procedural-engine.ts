// TEST DOUBLE of the engine: implements EngineClient without any model. It draws real RGB images
// procedurally from (prompt, seed) — a coloured disc on a gradient — so the bot's PNG, grid and panel
// paths get genuine pixels, and it paces its steps with timers (as a worker thread would, it never
// blocks the event loop). The end-to-end tests switch to the real engine thread on the fixture
// package by changing `createTestEngine` in test/support/bot-harness.ts.
import {
  EngineError,
  type ContributionMaps,
  type EngineClient,
  type GenerateCallOptions,
  type GenerateRequest,
  type GenerateResult,
  type PackageInfo,
  type RgbImage,
} from '../../src/engine/api.ts';
import { SHAPE_EXPERTS } from '../helpers/package-info.ts';

export interface ProceduralEngineOptions {
  /** Wall time of one denoising step. */
  stepDelayMs?: number;
  /** Experts with a different architecture tag cannot be merged. */
  architectures?: Record<string, string>;
}

export const PROCEDURAL_PACKAGE_INFO: PackageInfo = {
  name: 'procedural-test',
  version: '0.0.0',
  description: 'test double: procedural pictures, no models',
  experts: SHAPE_EXPERTS,
  ensembles: [
    { id: 'duo', title: 'Duo (AFA)', description: 'curves and blocks fused', method: 'afa', experts: ['curves', 'blocks'], subsets: false },
  ],
  defaults: { steps: 8, guidance: 5, scheduler: 'ddim', width: 64, height: 64 },
  size: { min: 32, max: 128, multiple: 4 },
  display: { width: 256, height: 256 },
  executionProvider: 'cpu',
};

function hash(text: string): number {
  let h = 2166136261;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619);
  return h >>> 0;
}

function drawPicture(prompt: string, seed: number, width: number, height: number, progress = 1): RgbImage {
  const h = hash(`${prompt}|${seed}`);
  const data = new Uint8Array(width * height * 3);
  const cx = (h % width) * 0.6 + width * 0.2;
  const cy = ((h >>> 8) % height) * 0.6 + height * 0.2;
  const radius = Math.max(3, ((h >>> 16) % Math.floor(width / 3)) + 4);
  const disc = [(h >>> 3) & 0xff, (h >>> 11) & 0xff, (h >>> 19) & 0xff];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      const inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2;
      const base = [(x * 255) / width, (y * 255) / height, 128];
      for (let c = 0; c < 3; c++) {
        const target = inside ? disc[c] : base[c];
        const noise = ((hash(`${seed}:${x}:${y}:${c}`) & 0xff) - 128) * (1 - progress);
        data[i + c] = Math.max(0, Math.min(255, Math.round(target + noise)));
      }
    }
  }
  return { width, height, data };
}

function contributionMaps(experts: string[], seed: number, width: number, height: number): ContributionMaps {
  const n = experts.length;
  const weights = experts.map(() => new Float32Array(width * height));
  const split = (seed % width) / width;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = y * width + x;
      const favoured = Math.min(n - 1, Math.floor(((x / width + split) % 1) * n));
      for (let e = 0; e < n; e++) weights[e][p] = e === favoured ? 0.7 + 0.3 / n : 0.3 / n;
      const sum = weights.reduce((s, w) => s + w[p], 0);
      for (let e = 0; e < n; e++) weights[e][p] /= sum;
    }
  }
  const shares = weights.map((w) => w.reduce((s, v) => s + v, 0) / (width * height));
  return { experts, width, height, weights, shares };
}

export class ProceduralTestEngine implements EngineClient {
  readonly calls: GenerateRequest[] = [];
  disposed = false;
  private readonly stepDelayMs: number;
  private readonly architectures: Record<string, string>;

  constructor(options: ProceduralEngineOptions = {}) {
    this.stepDelayMs = options.stepDelayMs ?? 15;
    this.architectures = options.architectures ?? { spikes: 'other-net' };
  }

  async info(): Promise<PackageInfo> {
    return structuredClone(PROCEDURAL_PACKAGE_INFO);
  }

  async generate(
    request: GenerateRequest,
    options: GenerateCallOptions = {},
  ): Promise<GenerateResult> {
    if (this.disposed) throw new EngineError('internal', 'engine disposed');
    this.calls.push(structuredClone(request));
    const info = PROCEDURAL_PACKAGE_INFO;
    const experts = this.resolveExperts(request);
    const steps = request.steps ?? info.defaults.steps;
    const width = request.width ?? info.defaults.width;
    const height = request.height ?? info.defaults.height;
    const count = request.count ?? 1;
    const started = Date.now();
    for (let step = 1; step <= steps; step++) {
      await new Promise<void>((resolve, reject) => {
        const signal = options.signal;
        if (signal?.aborted) return reject(new EngineError('cancelled', 'Generation cancelled.'));
        const onAbort = (): void => {
          clearTimeout(timer);
          reject(new EngineError('cancelled', 'Generation cancelled.'));
        };
        const timer = setTimeout(() => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        }, this.stepDelayMs);
        signal?.addEventListener('abort', onAbort, { once: true });
      });
      options.onProgress?.({
        step,
        steps,
        ...(request.preview ? { preview: drawPicture(request.prompt, request.seed, width / 4, height / 4, step / steps) } : {}),
      });
    }
    const denoiseMs = Date.now() - started;
    const images = Array.from({ length: count }, (_, i) => {
      const seed = request.seed + i;
      return {
        seed,
        image: drawPicture(request.prompt, seed, width, height),
        ...(request.contributions ? { contributions: contributionMaps(experts, seed, width / 4, height / 4) } : {}),
      };
    });
    return {
      params: {
        prompt: request.prompt,
        negative: request.negative ?? '',
        mode: request.mode,
        ...(request.ensemble ? { ensemble: request.ensemble } : {}),
        experts,
        ...(request.weights ? { weights: request.weights } : {}),
        seed: request.seed,
        steps,
        guidance: request.guidance ?? info.defaults.guidance,
        scheduler: request.scheduler ?? info.defaults.scheduler,
        karras: request.karras ?? false,
        width,
        height,
        count,
        model: `${info.name}@${info.version}`,
        truncatedWords: [],
      },
      images,
      timings: { totalMs: Date.now() - started, denoiseMs, decodeMs: 0, runMs: denoiseMs, denoiseRunMs: denoiseMs },
      warnings: [],
    };
  }

  async dispose(): Promise<void> {
    this.disposed = true;
  }

  private resolveExperts(request: GenerateRequest): string[] {
    const known = PROCEDURAL_PACKAGE_INFO.experts.map((e) => e.id);
    if (request.mode === 'afa' || request.mode === 'fuse') {
      const ensemble = PROCEDURAL_PACKAGE_INFO.ensembles.find((e) => e.id === request.ensemble && e.method === request.mode);
      if (!ensemble) throw new EngineError('unknown_model', `no ${request.mode} ensemble "${request.ensemble}"`);
      return request.experts ?? ensemble.experts;
    }
    const experts = request.experts ?? [];
    for (const id of experts) if (!known.includes(id)) throw new EngineError('unknown_model', `unknown expert "${id}"`);
    if (request.mode === 'single' && experts.length !== 1) throw new EngineError('bad_request', 'single mode takes one expert');
    if (request.mode !== 'single' && experts.length < 2) throw new EngineError('bad_request', `${request.mode} needs two or more experts`);
    if (request.mode === 'merge') {
      const tags = new Set(experts.map((id) => this.architectures[id] ?? 'tiny-sd'));
      if (tags.size > 1) {
        throw new EngineError('bad_request', `cannot merge ${experts.join('+')}: their U-Nets have different architectures`);
      }
    }
    return experts;
  }
}
