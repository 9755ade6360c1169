// The latent tensor's shape and its seeded starting noise, drawn exactly as diffusers draws it with
// torch.Generator('cpu').manual_seed(seed), so that a seed gives the same picture in both.
import type { Manifest } from '../manifest.ts';
import { TorchGenerator } from '../random.ts';
import type { ResolvedRequest } from '../resolve.ts';
import type { NoiseSource } from '../schedulers/index.ts';

/** [batch, channels, height, width] of the latents being denoised. */
export interface LatentShape {
  batch: number;
  channels: number;
  height: number;
  width: number;
  /** channels × height × width: one image's share of the flat latent array. */
  perImage: number;
}

export function latentShape(manifest: Manifest, req: ResolvedRequest): LatentShape {
  const { channels, downsample } = manifest.latent;
  const height = req.height / downsample;
  const width = req.width / downsample;
  return { batch: req.count, channels, height, width, perImage: channels * height * width };
}

/**
 * One generator per image, image i seeded with seed + i, so that image i of a batch is the image a
 * single run with seed + i draws. Each generator gives its image the initial noise first, then the
 * ancestral samplers' per-step noise.
 */
export class SeededNoise {
  private readonly generators: TorchGenerator[];

  constructor(
    seed: number,
    private readonly shape: LatentShape,
  ) {
    this.generators = Array.from({ length: shape.batch }, (_, i) => new TorchGenerator(BigInt(seed) + BigInt(i)));
  }

  /** x_T: standard normal noise scaled to the scheduler's initial σ. */
  initialLatents(initNoiseSigma: number): Float32Array {
    const { perImage } = this.shape;
    const latents = new Float32Array(this.shape.batch * perImage);
    this.generators.forEach((g, i) => {
      const noise = g.randn(perImage);
      for (let j = 0; j < perImage; j++) latents[i * perImage + j] = noise[j] * initNoiseSigma;
    });
    return latents;
  }

  /** The next draw for the whole batch (what ancestral samplers add back at each step). */
  readonly next: NoiseSource = () => {
    const { perImage } = this.shape;
    const out = new Float32Array(this.shape.batch * perImage);
    this.generators.forEach((g, i) => out.set(g.randn(perImage), i * perImage));
    return out;
  };
}
