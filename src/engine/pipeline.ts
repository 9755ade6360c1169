// prompt → text embeddings → initial noise → denoising loop (scheduler + denoiser) → VAE decode.
import {
  EngineError,
  type ContributionMaps,
  type GenerateRequest,
  type GenerateResult,
  type GeneratedImage,
  type PackageInfo,
  type ProgressEvent,
  type RgbImage,
} from './api.ts';
import { createDenoiser, type Conditioning } from './denoisers.ts';
import type { ExpertEntry } from './manifest.ts';
import { ModelPackage } from './model-package.ts';
import type { FloatTensor, SessionOptions } from './onnx-session.ts';
import { TorchGenerator } from './random.ts';
import { rgbFromFloat } from './render/index.ts';
import { resolveRequest, type ResolvedRequest } from './resolve.ts';
import { createScheduler } from './schedulers/index.ts';

export interface GenerateOptions {
  signal?: AbortSignal;
  /** Polled between steps, for hosts that cannot deliver an AbortSignal in time (worker threads). */
  isCancelled?: () => boolean;
  onProgress?: (event: ProgressEvent) => void;
}

const MAX_TOKENS = 77;

export class Engine {
  private constructor(readonly pkg: ModelPackage) {}

  static async load(modelDir: string, options: Partial<SessionOptions> = {}): Promise<Engine> {
    return new Engine(await ModelPackage.load(modelDir, options));
  }

  info(): PackageInfo {
    return this.pkg.info();
  }

  /** Opens every graph of the package now instead of on first use (fails early on a corrupt file). */
  async warmUp(): Promise<void> {
    const m = this.pkg.manifest;
    const files = new Set([m.textEncoder, m.vaeDecoder, ...m.experts.map((e) => e.unet), ...m.ensembles.map((e) => e.graph)]);
    for (const e of m.experts) if (e.textEncoder) files.add(e.textEncoder);
    for (const f of files) await this.pkg.session(f);
    await this.pkg.tokenizer();
    await this.pkg.schedulerConfig();
  }

  async generate(request: GenerateRequest, options: GenerateOptions = {}): Promise<GenerateResult> {
    const started = performance.now();
    const runBefore = await this.runMsSoFar();
    const req = resolveRequest(this.pkg, request);
    const warnings: string[] = [];
    const checkCancelled = () => {
      if (options.signal?.aborted || options.isCancelled?.()) throw new EngineError('cancelled', 'The generation was cancelled.');
    };
    checkCancelled();

    const { text, truncatedWords } = await this.encodeText(req);
    if (truncatedWords.length) {
      warnings.push(
        `The prompt is longer than ${MAX_TOKENS - 2} tokens; these words were dropped: ${truncatedWords.join(' ')}`,
      );
    }
    const denoiser = await createDenoiser(this.pkg, req);
    const { channels, downsample } = this.pkg.manifest.latent;
    const h = req.height / downsample;
    const w = req.width / downsample;
    const perImage = channels * h * w;
    const batch = req.count;
    const guided = req.guidance > 1;

    const scheduler = createScheduler(req.scheduler, await this.pkg.schedulerConfig(), req.steps, { karras: req.karras });
    const generators = Array.from({ length: batch }, (_, i) => new TorchGenerator(BigInt(req.seed) + BigInt(i)));
    let latents: Float32Array = new Float32Array(batch * perImage);
    generators.forEach((g, i) => {
      const noise = g.randn(perImage);
      for (let j = 0; j < perImage; j++) latents[i * perImage + j] = noise[j] * scheduler.initNoiseSigma;
    });
    const ancestralNoise = () => {
      const out = new Float32Array(batch * perImage);
      generators.forEach((g, i) => out.set(g.randn(perImage), i * perImage));
      return out;
    };

    const n = denoiser.experts.length;
    const weightSums = req.contributions ? new Float64Array(batch * n * h * w) : undefined;
    const afaIndex = req.ensemble ? denoiser.experts.map((e) => req.ensemble!.experts.indexOf(e.id)) : undefined;
    const loopRunBefore = await this.runMsSoFar();
    const loopStart = performance.now();
    const totalSteps = scheduler.timesteps.length;
    const conditioning = this.expand(text, batch, guided);
    for (let step = 0; step < totalSteps; step++) {
      checkCancelled();
      const t = scheduler.timesteps[step];
      const scaled = scheduler.scaleModelInput(latents, step);
      const modelInput = guided ? concat(scaled, scaled) : scaled;
      const rows = guided ? 2 * batch : batch;
      const out = await denoiser.predict({ data: modelInput, dims: [rows, channels, h, w] }, t, conditioning);
      const prediction = guided ? applyGuidance(out.prediction, req.guidance) : out.prediction;
      latents = scheduler.step(prediction, step, latents, ancestralNoise);
      if (weightSums && out.weights) {
        const total = out.weights.length / rows / (h * w);
        const firstCondRow = guided ? batch : 0;
        for (let b = 0; b < batch; b++) {
          for (let i = 0; i < n; i++) {
            const src = ((firstCondRow + b) * total + (afaIndex ? afaIndex[i] : i)) * h * w;
            const dst = (b * n + i) * h * w;
            for (let p = 0; p < h * w; p++) weightSums[dst + p] += out.weights[src + p];
          }
        }
      }
      if (options.onProgress) {
        const event: ProgressEvent = { step: step + 1, steps: totalSteps };
        const every = Math.max(1, Math.floor(totalSteps / 5));
        if (req.preview && step + 1 < totalSteps && (step + 1) % every === 0) {
          event.preview = (await this.decode(latents.subarray(0, perImage), 1, channels, h, w))[0];
        }
        options.onProgress(event);
      }
    }
    checkCancelled();
    const denoiseMs = performance.now() - loopStart;
    const denoiseRunMs = (await this.runMsSoFar()) - loopRunBefore;
    const decodeStart = performance.now();
    const rgb = await this.decode(latents, batch, channels, h, w);
    const decodeMs = performance.now() - decodeStart;

    const images: GeneratedImage[] = rgb.map((image, b) => {
      const result: GeneratedImage = { seed: req.seed + b, image };
      if (weightSums) result.contributions = toContributionMaps(weightSums, b, denoiser.experts, h, w, totalSteps);
      return result;
    });
    const runAfter = await this.runMsSoFar();
    return {
      params: {
        prompt: req.prompt,
        negative: req.negative,
        mode: req.mode,
        ensemble: req.ensemble?.id,
        experts: req.experts.map((e) => e.id),
        weights: req.mode === 'average' || req.mode === 'merge' ? req.weights : undefined,
        seed: req.seed,
        steps: req.steps,
        guidance: req.guidance,
        scheduler: req.scheduler,
        karras: req.karras,
        width: req.width,
        height: req.height,
        count: req.count,
        model: this.pkg.label,
        truncatedWords,
      },
      images,
      timings: { totalMs: performance.now() - started, denoiseMs, decodeMs, runMs: runAfter - runBefore, denoiseRunMs },
      warnings,
    };
  }

  async dispose(): Promise<void> {
    await this.pkg.dispose();
  }

  private async runMsSoFar(): Promise<number> {
    return (await this.pkg.openSessions()).reduce((s, x) => s + x.runMs, 0);
  }

  /** One [uncond; cond] embedding pair per distinct text encoder, mapped to every expert using it. */
  private async encodeText(req: ResolvedRequest): Promise<{ text: Map<string, Conditioning>; truncatedWords: string[] }> {
    const m = this.pkg.manifest;
    const byEncoder = new Map<string, Promise<Conditioning>>();
    let truncatedWords: string[] = [];
    const encode = async (encoderFile: string, tokenizerDir: string): Promise<Conditioning> => {
      const tokenizer = await this.pkg.tokenizer(tokenizerDir);
      const cond = tokenizer.tokenize(req.prompt);
      const uncond = tokenizer.tokenize(req.negative);
      if (tokenizerDir === m.tokenizer || truncatedWords.length === 0) truncatedWords = cond.droppedWords;
      const session = await this.pkg.session(encoderFile);
      session.require(['input_ids']);
      const ids = new Float32Array(2 * MAX_TOKENS);
      ids.set(uncond.inputIds, 0);
      ids.set(cond.inputIds, MAX_TOKENS);
      const out = await session.run({ input_ids: session.tensor('input_ids', { data: ids, dims: [2, MAX_TOKENS] }) });
      const hidden = out.last_hidden_state ?? Object.values(out)[0];
      const mask = new Float32Array(2 * MAX_TOKENS);
      [uncond.inputIds, cond.inputIds].forEach((row, r) => {
        const eos = row.indexOf(tokenizer.eosId, 1);
        mask.fill(1, r * MAX_TOKENS, r * MAX_TOKENS + (eos < 0 ? MAX_TOKENS : eos + 1));
      });
      return { hidden, pooled: out.pooler_output, mask: { data: mask, dims: [2, MAX_TOKENS] } };
    };
    const text = new Map<string, Conditioning>();
    for (const e of req.experts) {
      const encoderFile = e.textEncoder ?? m.textEncoder;
      const tokenizerDir = e.tokenizer ?? m.tokenizer;
      const key = `${encoderFile}\n${tokenizerDir}`;
      if (!byEncoder.has(key)) byEncoder.set(key, encode(encoderFile, tokenizerDir));
      text.set(e.id, await byEncoder.get(key)!);
    }
    return { text, truncatedWords };
  }

  /** [uncond; cond] pairs → rows ordered uncond×B then cond×B (or cond×B unguided); done once per generation. */
  private expand(text: Map<string, Conditioning>, batch: number, guided: boolean): Map<string, Conditioning> {
    const rows = guided ? 2 * batch : batch;
    const expandTensor = (pair: FloatTensor): FloatTensor => {
      const row = pair.data.length / 2;
      const data = new Float32Array(rows * row);
      for (let r = 0; r < rows; r++) {
        const src = guided && r < batch ? 0 : row;
        data.set(pair.data.subarray(src, src + row), r * row);
      }
      return { data, dims: [rows, ...pair.dims.slice(1)] };
    };
    const cache = new Map<Conditioning, Conditioning>();
    const out = new Map<string, Conditioning>();
    for (const [id, pair] of text) {
      let expanded = cache.get(pair);
      if (!expanded) {
        expanded = {
          hidden: expandTensor(pair.hidden),
          pooled: pair.pooled && expandTensor(pair.pooled),
          mask: pair.mask && expandTensor(pair.mask),
        };
        cache.set(pair, expanded);
      }
      out.set(id, expanded);
    }
    return out;
  }

  private async decode(latents: Float32Array, batch: number, channels: number, h: number, w: number): Promise<RgbImage[]> {
    const session = await this.pkg.session(this.pkg.manifest.vaeDecoder);
    const inputName = session.has('latent_sample') ? 'latent_sample' : [...session.inputs.keys()][0];
    const scale = 1 / this.pkg.manifest.latent.scaleFactor;
    const perImage = channels * h * w;
    const images: RgbImage[] = [];
    for (let b = 0; b < batch; b++) {
      const z = new Float32Array(perImage);
      for (let j = 0; j < perImage; j++) z[j] = latents[b * perImage + j] * scale;
      const out = await session.run({ [inputName]: session.tensor(inputName, { data: z, dims: [1, channels, h, w] }) });
      const sample = out.sample ?? Object.values(out)[0];
      const [, c, H, W] = sample.dims;
      images.push(rgbFromFloat(sample.data, c, H, W));
    }
    return images;
  }
}

function concat(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** [uncond; cond] → uncond + g·(cond − uncond). */
function applyGuidance(prediction: Float32Array, guidance: number): Float32Array {
  const half = prediction.length / 2;
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const u = prediction[i];
    out[i] = u + guidance * (prediction[half + i] - u);
  }
  return out;
}

function toContributionMaps(
  sums: Float64Array,
  image: number,
  experts: ExpertEntry[],
  h: number,
  w: number,
  steps: number,
): ContributionMaps {
  const n = experts.length;
  const weights: Float32Array[] = [];
  const shares: number[] = [];
  for (let i = 0; i < n; i++) {
    const map = new Float32Array(h * w);
    let sum = 0;
    for (let p = 0; p < h * w; p++) {
      map[p] = sums[(image * n + i) * h * w + p] / steps;
      sum += map[p];
    }
    weights.push(map);
    shares.push(sum / (h * w));
  }
  const total = shares.reduce((s, x) => s + x, 0) || 1;
  return { experts: experts.map((e) => e.id), width: w, height: h, weights, shares: shares.map((s) => s / total) };
}
