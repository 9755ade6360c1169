// The training noise schedule every scheduler starts from: betas and ᾱ (alphas_cumprod), in float32
// exactly as diffusers builds them with torch on the CPU.
import type { TrainingScheduleConfig } from './config.ts';
import { cumprodFloat32, f32, torchLinspaceFloat32 } from './numeric.ts';

export interface TrainingSchedule {
  betas: Float32Array;
  /** ᾱ_t = Π_{s≤t} (1 − β_s). */
  alphasCumprod: Float32Array;
}

/** diffusers' betas_for_alpha_bar with the "cosine" (squaredcos_cap_v2) ᾱ, computed in float64. */
function cosineBetas(count: number, maxBeta = 0.999): Float32Array {
  const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
  const betas = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    betas[i] = Math.min(1 - alphaBar((i + 1) / count) / alphaBar(i / count), maxBeta);
  }
  return betas;
}

/**
 * Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
 * Schedules and Sample Steps are Flawed", Algorithm 1), op by op in float32 like diffusers.
 */
export function rescaleZeroTerminalSnr(betas: Float32Array): Float32Array {
  const alphasCumprod = cumprodFloat32(betas.map((b) => f32(1 - b)));
  const sqrtBar = alphasCumprod.map((a) => Math.sqrt(a));
  const first = sqrtBar[0];
  const last = sqrtBar[sqrtBar.length - 1];
  const scale = f32(first / f32(first - last));
  const bar = sqrtBar.map((s) => {
    const shifted = f32(f32(s - last) * scale);
    return shifted * shifted;
  });
  const rescaled = new Float32Array(betas.length);
  rescaled[0] = f32(1 - bar[0]);
  for (let i = 1; i < bar.length; i++) rescaled[i] = f32(1 - f32(bar[i] / bar[i - 1]));
  return rescaled;
}

export function buildBetas(config: TrainingScheduleConfig): Float32Array {
  const count = config.num_train_timesteps;
  if (config.trained_betas !== null) return Float32Array.from(config.trained_betas);
  switch (config.beta_schedule) {
    case 'linear':
      return torchLinspaceFloat32(config.beta_start, config.beta_end, count);
    case 'scaled_linear':
      return torchLinspaceFloat32(Math.sqrt(config.beta_start), Math.sqrt(config.beta_end), count).map((b) => b * b);
    case 'squaredcos_cap_v2':
      return cosineBetas(count);
  }
}

/**
 * Betas and ᾱ for a config. `pinTerminalAlpha` is what Euler, Euler ancestral and DPM-Solver do
 * after a zero-SNR rescale (ᾱ_T = 2^-24 instead of 0, so that σ_T stays finite); DDIM does not.
 */
export function buildTrainingSchedule(config: TrainingScheduleConfig, pinTerminalAlpha: boolean): TrainingSchedule {
  let betas = buildBetas(config);
  if (config.rescale_betas_zero_snr) betas = rescaleZeroTerminalSnr(betas);
  const alphasCumprod = cumprodFloat32(betas.map((b) => f32(1 - b)));
  if (config.rescale_betas_zero_snr && pinTerminalAlpha) alphasCumprod[alphasCumprod.length - 1] = 2 ** -24;
  return { betas, alphasCumprod };
}
