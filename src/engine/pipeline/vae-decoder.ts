// The package's VAE decoder: latents in the denoiser's space → pictures.
import type { RgbImage } from '../api.ts';
import type { ModelPackage } from '../model-package.ts';
import type { FloatTensor, GraphSession } from '../onnx-session.ts';
import { rgbFromFloat } from '../render/index.ts';
import type { LatentShape } from './latents.ts';

export class VaeDecoder {
  private readonly inputName: string;

  private constructor(
    private readonly session: GraphSession,
    /** The denoiser works on latents × scale_factor (unit variance); the decoder wants them unscaled. */
    private readonly unscale: number,
  ) {
    this.inputName = session.has('latent_sample') ? 'latent_sample' : [...session.inputs.keys()][0];
  }

  static async open(pkg: ModelPackage): Promise<VaeDecoder> {
    return new VaeDecoder(await pkg.session(pkg.manifest.vaeDecoder), 1 / pkg.manifest.latent.scaleFactor);
  }

  /** One image's latents `[channels, height, width]` → the decoder's output `[1, 3, H, W]`, about −1 … 1. */
  async decode(latents: Float32Array, channels: number, height: number, width: number): Promise<FloatTensor> {
    const z = new Float32Array(channels * height * width);
    for (let j = 0; j < z.length; j++) z[j] = latents[j] * this.unscale;
    const s = this.session;
    const out = await s.run({ [this.inputName]: s.tensor(this.inputName, { data: z, dims: [1, channels, height, width] }) });
    return out.sample ?? Object.values(out)[0];
  }

  /** Every image of the batch, one decoder run per image, so that decoders exported for a batch of 1 work too. */
  async decodeImages(latents: Float32Array, shape: LatentShape): Promise<RgbImage[]> {
    const { batch, channels, height, width, perImage } = shape;
    const images: RgbImage[] = [];
    for (let b = 0; b < batch; b++) {
      const sample = await this.decode(latents.subarray(b * perImage, (b + 1) * perImage), channels, height, width);
      const [, c, H, W] = sample.dims;
      images.push(rgbFromFloat(sample.data, c, H, W));
    }
    return images;
  }
}
