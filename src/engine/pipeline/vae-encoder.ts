// Image-to-image's start: the init picture → the VAE encoder's latent distribution → a latent drawn
// from it, scaled, then noised to the first timestep that runs (diffusers' StableDiffusionImg2ImgPipeline
// .prepare_latents with a list of per-image generators, so image i of a batch is seed + i's).
import { EngineError, type RgbImage } from '../api.ts';
import type { ModelPackage } from '../model-package.ts';
import type { GraphSession } from '../onnx-session.ts';
import { NO_VAE_ENCODER } from '../resolve.ts';
import type { Scheduler } from '../schedulers/index.ts';
import type { LatentShape, SeededNoise } from './latents.ts';

const f32 = Math.fround;

/** diffusers' DiagonalGaussianDistribution clamps logvar to this range before exp. */
const LOGVAR_MIN = -30;
const LOGVAR_MAX = 20;

/** The posterior of one picture: `[C, h, w]` each. Without `logvar` the encoder gave a latent, not a distribution. */
export interface LatentPosterior {
  mean: Float32Array;
  logvar?: Float32Array;
  channels: number;
  height: number;
  width: number;
}

/** uint8 RGB, HWC → float32 `[1, 3, H, W]` in [−1, 1]: `2 · (v / 255) − 1` in float32, as diffusers' VaeImageProcessor. */
export function imageToSample(image: RgbImage): Float32Array {
  const { width, height, data } = image;
  const plane = width * height;
  const out = new Float32Array(3 * plane);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) out[c * plane + p] = f32(2 * f32(data[p * 3 + c] / 255)) - 1;
  }
  return out;
}

/**
 * The package's VAE encoder. Its contract (docs/model-package.md): input `sample` float32
 * `[B,3,H,W]` in [−1, 1]; output either `latent_parameters` `[B,2C,h,w]` (the posterior's mean and
 * logvar stacked on the channel axis, diffusers' `latent_dist.parameters`, as Optimum exports it) or
 * `latent_sample` `[B,C,h,w]` (a latent used as it is). Names are read from the session metadata; a
 * graph with one output of another name is read by its channel count.
 */
export class VaeEncoder {
  private readonly inputName: string;
  private readonly outputName: string;

  private constructor(
    private readonly session: GraphSession,
    private readonly channels: number,
  ) {
    this.inputName = session.has('sample') ? 'sample' : [...session.inputs.keys()][0];
    const outputs = [...session.outputs.keys()];
    const named = ['latent_parameters', 'latent_sample'].find((n) => session.outputs.has(n));
    if (!named && outputs.length !== 1) {
      throw new EngineError(
        'bad_package',
        `VAE encoder ${session.file} has outputs ${outputs.join(', ')}; expected "latent_parameters" (mean and logvar) or "latent_sample".`,
      );
    }
    this.outputName = named ?? outputs[0];
  }

  static async open(pkg: ModelPackage): Promise<VaeEncoder> {
    const file = pkg.manifest.vaeEncoder;
    if (file === undefined) throw new EngineError('bad_request', NO_VAE_ENCODER);
    return new VaeEncoder(await pkg.session(file), pkg.manifest.latent.channels);
  }

  /** One picture → its latent posterior (unscaled: the VAE's own latent space). */
  async encode(image: RgbImage): Promise<LatentPosterior> {
    const s = this.session;
    const sample = s.tensor(this.inputName, { data: imageToSample(image), dims: [1, 3, image.height, image.width] });
    const out = (await s.run({ [this.inputName]: sample }, [this.outputName]))[this.outputName];
    const [batch, c, height, width] = out.dims;
    const C = this.channels;
    const allowed = this.outputName === 'latent_parameters' ? [2 * C] : this.outputName === 'latent_sample' ? [C] : [C, 2 * C];
    if (out.dims.length !== 4 || batch !== 1 || !allowed.includes(c)) {
      throw new EngineError(
        'bad_package',
        `VAE encoder ${s.file}: output "${this.outputName}" has shape [${out.dims.join(', ')}]; expected ${allowed.map((k) => `[1, ${k}, h, w]`).join(' or ')} for ${C} latent channels.`,
      );
    }
    const plane = height * width;
    const posterior: LatentPosterior = { mean: out.data.slice(0, C * plane), channels: C, height, width };
    if (c === 2 * C) posterior.logvar = out.data.slice(C * plane, 2 * C * plane);
    return posterior;
  }
}

/**
 * The denoising loop's start for image-to-image: for image b (generator seed + b),
 * z = mean + exp(½·clamp(logvar, −30, 20))·ε₁ (retrieve_latents with sample_mode "sample"; no draw
 * when the encoder gives a latent), x₀ = scale_factor · z, then scheduler.addNoise(x₀, ε₂, 0) with
 * `scheduler` already started at the first step that runs (startingAt). ε₁ and ε₂ are that image's
 * next two draws, in this order, as diffusers draws them; ancestral samplers go on from there.
 */
export function img2imgLatents(
  posterior: LatentPosterior,
  shape: LatentShape,
  scaleFactor: number,
  noise: SeededNoise,
  scheduler: Scheduler,
): Float32Array {
  const { batch, channels, height, width, perImage } = shape;
  if (posterior.channels !== channels || posterior.height !== height || posterior.width !== width) {
    throw new EngineError(
      'bad_package',
      `The VAE encoder gives ${posterior.channels}×${posterior.height}×${posterior.width} latents for this picture; the denoiser needs ${channels}×${height}×${width}.`,
    );
  }
  const { mean, logvar } = posterior;
  const std = logvar?.map((v) => f32(Math.exp(f32(0.5 * Math.min(LOGVAR_MAX, Math.max(LOGVAR_MIN, v))))));
  const draws = std ? noise.next() : undefined;
  const scale = f32(scaleFactor);
  const clean = new Float32Array(batch * perImage);
  for (let b = 0; b < batch; b++) {
    for (let j = 0; j < perImage; j++) {
      const z = std && draws ? f32(mean[j] + f32(std[j] * draws[b * perImage + j])) : mean[j];
      clean[b * perImage + j] = f32(scale * z);
    }
  }
  return scheduler.addNoise(clean, noise.next(), 0);
}
