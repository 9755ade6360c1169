// Plain, JSON-serialisable records exchanged between the engine and its clients (CLI, bot, queue,
// remote workers). The engine knows nothing about Discord; the bot nothing about ONNX.

export type Mode = 'single' | 'average' | 'merge' | 'fuse' | 'afa';
export type SchedulerName = 'ddim' | 'euler' | 'euler_a' | 'dpmpp_2m';
export const SCHEDULER_NAMES: readonly SchedulerName[] = ['ddim', 'euler', 'euler_a', 'dpmpp_2m'];
export const MODES: readonly Mode[] = ['single', 'average', 'merge', 'fuse', 'afa'];

/** How an ensemble of the manifest fuses its experts: the mode that runs it has the same name. */
export type EnsembleMethod = 'afa' | 'fuse';
/**
 * The modes that run one ensemble graph of the manifest, whose `method` is the mode: `afa` (a trained
 * SABW aggregator) and `fuse` (training-free feature fusion). Both return contribution maps.
 */
export const ENSEMBLE_MODES: readonly EnsembleMethod[] = ['fuse', 'afa'];

export function isEnsembleMode(mode: Mode): mode is EnsembleMethod {
  return (ENSEMBLE_MODES as readonly string[]).includes(mode);
}

/** Whether results of this mode can carry contribution maps (several models share the picture). */
export function modeHasContributions(mode: Mode): boolean {
  return mode === 'average' || isEnsembleMode(mode);
}

/** What to generate. Unset numbers fall back to the package's defaults. */
export interface GenerateRequest {
  prompt: string;
  negative?: string;
  /**
   * `afa` / `fuse`: an ensemble id of that method (its experts are implied; `experts` may pick a subset
   * when the graph supports it). Without it, the first ensemble of the mode's method that covers
   * `experts` (or the first of that method).
   */
  ensemble?: string;
  /** `single`: exactly one expert id; `average` / `merge`: two or more; `afa` / `fuse`: the ensemble's experts that take part. */
  experts?: string[];
  mode: Mode;
  /** `average` / `merge`: one weight per expert (normalised to sum 1); equal when absent. */
  weights?: number[];
  seed: number;
  steps?: number;
  guidance?: number;
  scheduler?: SchedulerName;
  karras?: boolean;
  /** Images in the batch; image i uses seed + i. */
  count?: number;
  width?: number;
  height?: number;
  /** Also return per-expert weight maps (afa: the aggregator's; fuse: the training-free rule's; average: the fixed weights). */
  contributions?: boolean;
  /**
   * Send a preview of image 0 with the progress event of every ⌊steps / 5⌋-th step but the last.
   * It is a cheap latent → RGB approximation (a linear map per latent pixel fitted to the package's
   * VAE, then upscaled to the image size), not a VAE decode: blurrier and less exact in colour.
   */
  preview?: boolean;
  /**
   * Image-to-image: start from this picture instead of pure noise (diffusers'
   * StableDiffusionImg2ImgPipeline). It must already be `width` × `height` (the request's size, or
   * the package's default): resizing and cropping are the caller's job. Needs a package with a VAE
   * encoder (`PackageInfo.img2img`).
   */
  initImage?: RgbImage;
  /**
   * Image-to-image only: how much of the picture is redrawn, in (0, 1] (default 0.8, as diffusers).
   * The last ⌊steps · strength⌋ of the `steps` timesteps run, starting from the image noised to the
   * first of them; 1 starts from the noisiest timestep (a zero-terminal-SNR schedule then keeps
   * nothing of the image), small values keep it nearly as it is.
   */
  strength?: number;
}

/** Image-to-image's default strength (diffusers' StableDiffusionImg2ImgPipeline). */
export const DEFAULT_STRENGTH = 0.8;

export interface RgbImage {
  width: number;
  height: number;
  /** Row-major RGB, 3 bytes per pixel. */
  data: Uint8Array;
}

export interface ContributionMaps {
  experts: string[];
  /** Latent resolution. */
  width: number;
  height: number;
  /** weights[i] is expert i's row-major map, averaged over steps; the maps sum to 1 per pixel. */
  weights: Float32Array[];
  /** Overall share of each expert (mean of its map), summing to 1. */
  shares: number[];
}

export interface GeneratedImage {
  seed: number;
  image: RgbImage;
  contributions?: ContributionMaps;
}

/** Everything that was actually used, after defaults were applied (goes into the PNG's parameters). */
export interface ResolvedParams {
  prompt: string;
  negative: string;
  mode: Mode;
  ensemble?: string;
  experts: string[];
  weights?: number[];
  seed: number;
  steps: number;
  guidance: number;
  scheduler: SchedulerName;
  karras: boolean;
  width: number;
  height: number;
  count: number;
  /** Package name and version, e.g. `demo@1.0.0`. */
  model: string;
  /** Image-to-image only: the strength used (absent when drawing from noise). `steps` stays the number requested. */
  strength?: number;
  /** Content words dropped because the prompt was longer than 75 tokens. */
  truncatedWords: string[];
}

export interface GenerateResult {
  params: ResolvedParams;
  images: GeneratedImage[];
  /** runMs: time inside onnxruntime's session.run (all graphs); denoiseRunMs: the part spent in the denoising loop. */
  timings: {
    totalMs: number;
    denoiseMs: number;
    decodeMs: number;
    runMs: number;
    denoiseRunMs: number;
    /** Image-to-image only: time spent encoding the init image (VAE encoder and the noising). */
    encodeMs?: number;
  };
  warnings: string[];
}

export interface ProgressEvent {
  step: number;
  /** Steps that run: the request's steps, or with an init image only ⌊steps · strength⌋ of them. */
  steps: number;
  /** Image 0 so far, at the image's size, when the request asked for previews (see GenerateRequest.preview). */
  preview?: RgbImage;
}

export interface ExpertInfo {
  id: string;
  title: string;
  description: string;
}

export interface EnsembleInfo extends ExpertInfo {
  method: EnsembleMethod;
  experts: string[];
  subsets: boolean;
}

export interface PackageInfo {
  name: string;
  version: string;
  description: string;
  experts: ExpertInfo[];
  ensembles: EnsembleInfo[];
  defaults: { steps: number; guidance: number; scheduler: SchedulerName; width: number; height: number };
  size: { min: number; max: number; multiple: number };
  limits?: { maxSteps: number; maxCount: number };
  display?: { width: number; height: number };
  /** Expert id → architecture tag; experts with equal tags can be merged (absent: unknown). */
  architectures?: Record<string, string | undefined>;
  /** Whether requests may carry an `initImage` (the package has a VAE encoder); absent: no. */
  img2img?: boolean;
  executionProvider: string;
  /** What the graphs in use compute in: all "fp32", all "fp16", or "mixed" (docs/model-package.md, "Precision variants"). */
  precision?: 'fp32' | 'fp16' | 'mixed';
}

/** A user-facing failure: `message` is safe and meaningful to show to a person. */
export class EngineError extends Error {
  constructor(
    public readonly code:
      | 'unknown_model'
      | 'bad_request'
      | 'bad_package'
      | 'cancelled'
      | 'timeout'
      /** The engine process or thread died; the job may be retried on a fresh one. */
      | 'unavailable'
      | 'internal',
    message: string,
  ) {
    super(message);
    this.name = 'EngineError';
  }
}

/** How a caller follows and stops one generation (the second argument of EngineClient.generate). */
export interface GenerateCallOptions {
  /** Aborting it stops the generation between denoising steps with EngineError('cancelled'). */
  signal?: AbortSignal;
  /** Called after every denoising step, some of them with a preview. */
  onProgress?: (event: ProgressEvent) => void;
}

/** The async API every engine host offers (engine threads in-process, or GPU worker processes over Redis). */
export interface EngineClient {
  info(): Promise<PackageInfo>;
  generate(request: GenerateRequest, options?: GenerateCallOptions): Promise<GenerateResult>;
  dispose(): Promise<void>;
}
