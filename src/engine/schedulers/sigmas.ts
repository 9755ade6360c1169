// Noise levels σ = √((1 − ᾱ) / ᾱ) and the sigma-space grids (Karras, exponential) that diffusers
// builds for Euler-type and DPM-Solver schedulers, plus the inverse map σ → (fractional) timestep.
import { f32, numpyLinspace } from './numeric.ts';

/** σ_t of every training timestep, ascending in t (float32, as torch computes it). */
export function trainingSigmas(alphasCumprod: Float32Array): Float32Array {
  return alphasCumprod.map((a) => Math.sqrt(f32(f32(1 - a) / a)));
}

/** np.log of the float32 σ array (a float32 result). */
export function logSigmas(sigmas: Float32Array): Float32Array {
  return sigmas.map((s) => Math.log(s));
}

/** Karras et al. (2022) ρ = 7 ramp from σ_max down to σ_min, in float64. */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, steps: number): number[] {
  const rho = 7;
  const minInvRho = sigmaMin ** (1 / rho);
  const maxInvRho = sigmaMax ** (1 / rho);
  return numpyLinspace(0, 1, steps).map((r) => (maxInvRho + r * (minInvRho - maxInvRho)) ** rho);
}

/** Evenly spaced in log σ from σ_max down to σ_min, in float64. */
export function exponentialSigmas(sigmaMin: number, sigmaMax: number, steps: number): number[] {
  return numpyLinspace(Math.log(sigmaMax), Math.log(sigmaMin), steps).map(Math.exp);
}

/**
 * diffusers' _sigma_to_t: the fractional training timestep whose σ is `sigma`, interpolating
 * linearly in log σ between the two neighbouring training timesteps (clamped to the ends).
 */
export function sigmaToTimestep(sigma: number, logSigmaTable: Float32Array): number {
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  let low = 0;
  for (let i = 0; i < logSigmaTable.length; i++) if (logSigma - logSigmaTable[i] >= 0) low = i;
  low = Math.min(low, logSigmaTable.length - 2);
  const high = low + 1;
  const lowLog = logSigmaTable[low];
  // NumPy subtracts the two float32 table entries in float32.
  const weight = Math.min(1, Math.max(0, (lowLog - logSigma) / f32(lowLog - logSigmaTable[high])));
  return (1 - weight) * low + weight * high;
}
