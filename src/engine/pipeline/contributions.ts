// Which expert drew which part of each image: the denoiser's per-expert weight maps, averaged over steps.
import type { ContributionMaps } from '../api.ts';
import type { EnsembleEntry, ExpertEntry } from '../manifest.ts';
import type { LatentShape } from './latents.ts';

/** Sums the per-step weight maps of the prompt-conditioned rows, per image and expert, in float64. */
export class ContributionAccumulator {
  private readonly sums: Float64Array;
  private readonly plane: number;
  private steps = 0;

  /**
   * `columns[i]`: where expert i's map sits in the denoiser's weights. An AFA graph reports every
   * expert of its ensemble (absent ones with weight 0), in the ensemble's order.
   */
  private constructor(
    private readonly experts: ExpertEntry[],
    private readonly columns: number[],
    private readonly shape: LatentShape,
  ) {
    this.plane = shape.height * shape.width;
    this.sums = new Float64Array(shape.batch * experts.length * this.plane);
  }

  static for(experts: ExpertEntry[], ensemble: EnsembleEntry | undefined, shape: LatentShape): ContributionAccumulator {
    const columns = ensemble ? experts.map((e) => ensemble.experts.indexOf(e.id)) : experts.map((_, i) => i);
    return new ContributionAccumulator(experts, columns, shape);
  }

  /**
   * Adds one step's weights `[rows, E, h, w]`; only rows firstRow … firstRow + batch − 1 (those
   * conditioned on the prompt) count.
   */
  add(weights: Float32Array, rows: number, firstRow: number): void {
    const { plane, sums } = this;
    const n = this.experts.length;
    const total = weights.length / rows / plane;
    for (let b = 0; b < this.shape.batch; b++) {
      for (let i = 0; i < n; i++) {
        const src = ((firstRow + b) * total + this.columns[i]) * plane;
        const dst = (b * n + i) * plane;
        for (let p = 0; p < plane; p++) sums[dst + p] += weights[src + p];
      }
    }
    this.steps++;
  }

  /** Image `image`'s mean map per expert and each expert's share of the picture (all zero if no step added any). */
  mean(image: number): ContributionMaps {
    const { plane, sums } = this;
    const n = this.experts.length;
    const steps = Math.max(this.steps, 1);
    const weights: Float32Array[] = [];
    const shares: number[] = [];
    for (let i = 0; i < n; i++) {
      const map = new Float32Array(plane);
      let sum = 0;
      for (let p = 0; p < plane; p++) {
        map[p] = sums[(image * n + i) * plane + p] / steps;
        sum += map[p];
      }
      weights.push(map);
      shares.push(sum / plane);
    }
    const total = shares.reduce((s, x) => s + x, 0) || 1;
    return {
      experts: this.experts.map((e) => e.id),
      width: this.shape.width,
      height: this.shape.height,
      weights,
      shares: shares.map((s) => s / total),
    };
  }
}
