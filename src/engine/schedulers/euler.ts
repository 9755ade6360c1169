// diffusers' EulerDiscreteScheduler (s_churn = 0), float32 arithmetic op by op.
import type { EulerConfig, TimestepSpacing } from './config.ts';
import { f32, numpyInterp, torchLinspaceFloat32 } from './numeric.ts';
import { exponentialSigmas, karrasSigmas, logSigmas, sigmaToTimestep, trainingSigmas } from './sigmas.ts';
import { spacedTimesteps } from './spacing.ts';
import { buildTrainingSchedule } from './training-schedule.ts';
import { type Scheduler, checkSameLength, checkSameNoise, checkStepIndex } from './types.ts';

/** What Euler-type set_timesteps needs (Euler ancestral uses the subset it has). */
export interface EulerGridOptions {
  spacing: TimestepSpacing;
  numTrainTimesteps: number;
  stepsOffset: number;
  interpolation: 'linear' | 'log_linear';
  sigmaGrid: 'interpolated' | 'karras' | 'exponential';
  sigmaMin: number | null;
  sigmaMax: number | null;
  finalSigma: 'zero' | 'sigma_min';
}

export interface EulerGrid {
  /** float32 timesteps for the model. */
  timesteps: number[];
  /** float32 σ per step plus the final σ. */
  sigmas: Float32Array;
  initNoiseSigma: number;
}

/** Euler-type set_timesteps: timesteps, σ grid and the initial noise scale. */
export function eulerGrid(alphasCumprod: Float32Array, steps: number, options: EulerGridOptions): EulerGrid {
  let timesteps = spacedTimesteps(
    { spacing: options.spacing, numTrainTimesteps: options.numTrainTimesteps, steps, stepsOffset: options.stepsOffset },
    false,
  ).map(f32);
  const tableSigmas = trainingSigmas(alphasCumprod);
  const tableLogSigmas = logSigmas(tableSigmas);
  const trainIndex = Array.from(tableSigmas, (_, i) => i);

  let sigmas: ArrayLike<number>;
  if (options.interpolation === 'linear') {
    sigmas = timesteps.map((t) => numpyInterp(t, trainIndex, tableSigmas));
  } else {
    // diffusers builds steps + 1 log-spaced σ here (and appends the final σ after them).
    const first = f32(Math.log(tableSigmas[tableSigmas.length - 1]));
    const last = f32(Math.log(tableSigmas[0]));
    sigmas = torchLinspaceFloat32(first, last, steps + 1).map(Math.exp);
  }
  if (options.sigmaGrid !== 'interpolated') {
    const sigmaMin = options.sigmaMin ?? sigmas[sigmas.length - 1];
    const sigmaMax = options.sigmaMax ?? sigmas[0];
    sigmas =
      options.sigmaGrid === 'karras' ? karrasSigmas(sigmaMin, sigmaMax, steps) : exponentialSigmas(sigmaMin, sigmaMax, steps);
    timesteps = Array.from(sigmas, (s) => f32(sigmaToTimestep(s, tableLogSigmas)));
  }
  const finalSigma = options.finalSigma === 'zero' ? 0 : Math.sqrt(f32(f32(1 - alphasCumprod[0]) / alphasCumprod[0]));
  const allSigmas = Float32Array.from([...Array.from(sigmas), finalSigma]);

  let maxSigma = -Infinity;
  for (const s of allSigmas) maxSigma = Math.max(maxSigma, s);
  const initNoiseSigma =
    options.spacing === 'leading' ? f32(Math.sqrt(f32(f32(maxSigma * maxSigma) + 1))) : maxSigma;
  return { timesteps, sigmas: allSigmas, initNoiseSigma };
}

/** x / √(σ² + 1) in float32: the input scaling of Euler-type samplers. */
export function scaleBySigma(sample: Float32Array, sigma: number): Float32Array {
  const divisor = f32(Math.sqrt(f32(f32(sigma * sigma) + 1)));
  return sample.map((x) => x / divisor);
}

/** x₀ + σ·ε in float32 (diffusers' Euler-type add_noise: `original + noise * sigma`). */
export function addNoiseAtSigma(original: Float32Array, noise: Float32Array, sigma: number): Float32Array {
  checkSameNoise(noise, original);
  const s = f32(sigma);
  return original.map((x, i) => x + f32(noise[i] * s));
}

export type EulerPrediction = 'epsilon' | 'v_prediction' | 'sample' | 'original_sample';

/** The denoised estimate x̂₀ from a model output at noise level σ. */
export function predictOriginal(prediction: EulerPrediction, sigma: number, sample: number, modelOutput: number): number {
  switch (prediction) {
    case 'epsilon':
      return f32(sample - f32(sigma * modelOutput));
    case 'v_prediction': {
      const sigmaSquaredPlusOne = f32(f32(sigma * sigma) + 1);
      const outputScale = f32(-sigma / f32(Math.sqrt(sigmaSquaredPlusOne)));
      return f32(f32(modelOutput * outputScale) + f32(sample / sigmaSquaredPlusOne));
    }
    case 'sample':
    case 'original_sample':
      return modelOutput;
  }
}

export class EulerScheduler implements Scheduler {
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly usesNoise = false;
  private readonly sigmaTable: Float32Array;

  constructor(
    private readonly config: EulerConfig,
    steps: number,
  ) {
    const { alphasCumprod } = buildTrainingSchedule(config, true);
    const grid = eulerGrid(alphasCumprod, steps, {
      spacing: config.timestep_spacing,
      numTrainTimesteps: config.num_train_timesteps,
      stepsOffset: config.steps_offset,
      interpolation: config.interpolation_type,
      sigmaGrid: config.use_karras_sigmas ? 'karras' : config.use_exponential_sigmas ? 'exponential' : 'interpolated',
      sigmaMin: config.sigma_min,
      sigmaMax: config.sigma_max,
      finalSigma: config.final_sigmas_type,
    });
    this.sigmaTable = grid.sigmas;
    this.sigmas = Array.from(grid.sigmas);
    this.initNoiseSigma = grid.initNoiseSigma;
    this.timesteps =
      config.timestep_type === 'continuous' && config.prediction_type === 'v_prediction'
        ? Array.from(grid.sigmas.subarray(0, steps), (s) => f32(0.25 * f32(Math.log(s))))
        : grid.timesteps;
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    return scaleBySigma(sample, this.sigmaTable[stepIndex]);
  }

  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    return addNoiseAtSigma(original, noise, this.sigmaTable[stepIndex]);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    checkSameLength(modelOutput, sample);
    const sigma = this.sigmaTable[stepIndex];
    const dt = f32(this.sigmaTable[stepIndex + 1] - sigma);
    const prediction = this.config.prediction_type;
    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const x = sample[i];
      const x0 = predictOriginal(prediction, sigma, x, modelOutput[i]);
      const derivative = f32(f32(x - x0) / sigma);
      out[i] = x + f32(derivative * dt);
    }
    return out;
  }
}
