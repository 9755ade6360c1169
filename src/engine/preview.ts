// Progress previews without the VAE: each latent pixel is mapped to a colour by a 3×C matrix plus a
// bias, then the small picture is upscaled (AUTOMATIC1111's "Approx cheap" live preview). A full
// decode per preview would cost as much as the final decode; this costs a few multiply-adds a pixel.
//
// The matrix depends on the VAE, and a package does not ship one, so it is fitted to the package's
// own decoder by least squares: spatially constant latents decode to (nearly) flat pictures, so
// each probe gives one (latent vector → colour) pair; a few dozen random ones pin the 3 × (C + 1)
// unknowns down. On the demo package this reproduces the real decode's colours of finished latents
// with a correlation of 0.94–0.95 per channel (test/engine-preview.test.ts checks it).
import type { RgbImage } from './api.ts';
import type { FloatTensor } from './onnx-session.ts';
import { TorchGenerator } from './random.ts';
import { rgbFromFloat } from './render/index.ts';

/** What the fit needs of a VAE decoder: latents in the denoiser's space → `[1, 3, H, W]` in −1 … 1. */
export interface LatentDecoder {
  decode(latents: Float32Array, channels: number, height: number, width: number): Promise<FloatTensor>;
}

export interface FitOptions {
  /** Probes to decode; at least channels + 1. */
  probes?: number;
  /** Probe latents' side: small keeps the fit cheap, though borders then weigh more. */
  side?: number;
  seed?: number;
}

const DEFAULT_PROBES = 16;
const DEFAULT_PROBE_SIDE = 8;

/** A 3×C matrix and a bias that map one latent pixel (in the denoiser's space) to RGB in −1 … 1. */
export class LatentRgbApproximation {
  constructor(
    readonly channels: number,
    /** Row-major 3 × channels. */
    readonly matrix: Float64Array,
    readonly bias: Float64Array,
  ) {}

  /**
   * Decodes `probes` spatially constant latents whose values are drawn from N(0, 1) (the denoiser's
   * latents are scaled to unit variance) and fits the map from latent vector to mean colour.
   */
  static async fit(decoder: LatentDecoder, channels: number, options: FitOptions = {}): Promise<LatentRgbApproximation> {
    const probes = Math.max(options.probes ?? DEFAULT_PROBES, channels + 1);
    const side = options.side ?? DEFAULT_PROBE_SIDE;
    const random = new TorchGenerator(options.seed ?? 0);
    const inputs: Float64Array[] = [];
    const colours: Float64Array[] = [];
    for (let k = 0; k < probes; k++) {
      const vector = random.randn(channels);
      const latents = new Float32Array(channels * side * side);
      for (let c = 0; c < channels; c++) latents.fill(vector[c], c * side * side, (c + 1) * side * side);
      const decoded = await decoder.decode(latents, channels, side, side);
      inputs.push(Float64Array.from([...vector, 1]));
      colours.push(meanDisplayedColour(decoded));
    }
    const coefficients = leastSquares(inputs, colours);
    const matrix = new Float64Array(3 * channels);
    const bias = new Float64Array(3);
    for (let rgb = 0; rgb < 3; rgb++) {
      for (let c = 0; c < channels; c++) matrix[rgb * channels + c] = coefficients[c][rgb];
      bias[rgb] = coefficients[channels][rgb];
    }
    return new LatentRgbApproximation(channels, matrix, bias);
  }

  /** One image's latents `[C, height, width]` → RGB at `upscale`× the latent size (bilinear). */
  render(latents: Float32Array, height: number, width: number, upscale: number): RgbImage {
    const { channels, matrix, bias } = this;
    const plane = height * width;
    const small = new Float32Array(3 * plane);
    for (let rgb = 0; rgb < 3; rgb++) {
      for (let p = 0; p < plane; p++) {
        let v = bias[rgb];
        for (let c = 0; c < channels; c++) v += matrix[rgb * channels + c] * latents[c * plane + p];
        small[rgb * plane + p] = v;
      }
    }
    const H = height * upscale;
    const W = width * upscale;
    return rgbFromFloat(upscaleBilinear(small, 3, height, width, H, W), 3, H, W);
  }
}

/** The picture's mean colour as it will be shown: values clipped to −1 … 1 first, like rgbFromFloat. */
function meanDisplayedColour(decoded: FloatTensor): Float64Array {
  const [, c, H, W] = decoded.dims;
  const plane = H * W;
  const out = new Float64Array(3);
  for (let rgb = 0; rgb < 3; rgb++) {
    const offset = (c === 1 ? 0 : rgb) * plane;
    let sum = 0;
    for (let p = 0; p < plane; p++) {
      const v = decoded.data[offset + p];
      sum += v > 1 ? 1 : v > -1 ? v : -1;
    }
    out[rgb] = sum / plane;
  }
  return out;
}

/**
 * Ordinary least squares, one column of `targets` at a time: the coefficients β (inputs' width ×
 * targets' width) minimising Σ‖xᵢβ − yᵢ‖², from the normal equations. A tiny ridge keeps the
 * system solvable when the probes happen to be nearly collinear.
 */
export function leastSquares(inputs: Float64Array[], targets: Float64Array[]): Float64Array[] {
  const n = inputs[0].length;
  const m = targets[0].length;
  const a = Array.from({ length: n }, () => new Float64Array(n + m));
  inputs.forEach((x, i) => {
    for (let r = 0; r < n; r++) {
      for (let c = 0; c < n; c++) a[r][c] += x[r] * x[c];
      for (let t = 0; t < m; t++) a[r][n + t] += x[r] * targets[i][t];
    }
  });
  for (let r = 0; r < n; r++) a[r][r] += 1e-9 * inputs.length;
  // Gauss–Jordan elimination with partial pivoting on [XᵀX | XᵀY].
  for (let col = 0; col < n; col++) {
    let pivot = col;
    for (let r = col + 1; r < n; r++) if (Math.abs(a[r][col]) > Math.abs(a[pivot][col])) pivot = r;
    [a[col], a[pivot]] = [a[pivot], a[col]];
    const p = a[col][col];
    if (p === 0) throw new Error('least squares: singular system');
    for (let c = col; c < n + m; c++) a[col][c] /= p;
    for (let r = 0; r < n; r++) {
      if (r === col || a[r][col] === 0) continue;
      const f = a[r][col];
      for (let c = col; c < n + m; c++) a[r][c] -= f * a[col][c];
    }
  }
  return a.map((row) => row.slice(n));
}

/** CHW planes resized with bilinear interpolation between pixel centres (align_corners = false). */
export function upscaleBilinear(chw: Float32Array, channels: number, h: number, w: number, H: number, W: number): Float32Array {
  const out = new Float32Array(channels * H * W);
  const xs = samplePositions(w, W);
  const ys = samplePositions(h, H);
  for (let c = 0; c < channels; c++) {
    const src = c * h * w;
    const dst = c * H * W;
    for (let Y = 0; Y < H; Y++) {
      const { lo: y0, hi: y1, t: ty } = ys[Y];
      for (let X = 0; X < W; X++) {
        const { lo: x0, hi: x1, t: tx } = xs[X];
        const top = chw[src + y0 * w + x0] * (1 - tx) + chw[src + y0 * w + x1] * tx;
        const bottom = chw[src + y1 * w + x0] * (1 - tx) + chw[src + y1 * w + x1] * tx;
        out[dst + Y * W + X] = top * (1 - ty) + bottom * ty;
      }
    }
  }
  return out;
}

function samplePositions(size: number, outSize: number): { lo: number; hi: number; t: number }[] {
  return Array.from({ length: outSize }, (_, i) => {
    const x = Math.min(Math.max(((i + 0.5) * size) / outSize - 0.5, 0), size - 1);
    const lo = Math.floor(x);
    return { lo, hi: Math.min(lo + 1, size - 1), t: x - lo };
  });
}
