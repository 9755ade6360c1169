// diffusers' DDIMScheduler with eta = 0 (deterministic), float32 arithmetic op by op.
import type { DdimConfig } from './config.ts';
import { f32 } from './numeric.ts';
import { spacedTimesteps } from './spacing.ts';
import { buildTrainingSchedule } from './training-schedule.ts';
import { type Scheduler, checkSameLength, checkStepIndex, mixFloat32 } from './types.ts';

export class DdimScheduler implements Scheduler {
  readonly timesteps: readonly number[];
  readonly initNoiseSigma = 1;
  readonly usesNoise = false;
  private readonly alphasCumprod: Float32Array;
  private readonly finalAlphaCumprod: number;
  /** diffusers steps back by this many training timesteps, whatever the spacing. */
  private readonly stride: number;

  constructor(
    private readonly config: DdimConfig,
    steps: number,
  ) {
    this.alphasCumprod = buildTrainingSchedule(config, false).alphasCumprod;
    this.finalAlphaCumprod = config.set_alpha_to_one ? 1 : this.alphasCumprod[0];
    this.stride = Math.floor(config.num_train_timesteps / steps);
    this.timesteps = spacedTimesteps(
      { spacing: config.timestep_spacing, numTrainTimesteps: config.num_train_timesteps, steps, stepsOffset: config.steps_offset },
      true,
    );
  }

  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    checkSameLength(modelOutput, sample);
    const t = this.timesteps[stepIndex];
    const previous = t - this.stride;
    const alpha = this.alphaAt(t);
    const alphaPrev = previous >= 0 ? this.alphaAt(previous) : this.finalAlphaCumprod;
    const sqrtAlpha = f32(Math.sqrt(alpha));
    const sqrtBeta = f32(Math.sqrt(f32(1 - alpha)));
    const sqrtAlphaPrev = f32(Math.sqrt(alphaPrev));
    // With eta = 0 the variance term is zero: the direction coefficient is √(1 − ᾱ_prev − 0).
    const directionScale = f32(Math.sqrt(f32(1 - alphaPrev)));
    const clip = this.config.clip_sample ? f32(this.config.clip_sample_range) : Infinity;
    const prediction = this.config.prediction_type;

    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const x = sample[i];
      const m = modelOutput[i];
      let x0: number;
      let eps: number;
      if (prediction === 'epsilon') {
        x0 = f32(f32(x - f32(sqrtBeta * m)) / sqrtAlpha);
        eps = m;
      } else if (prediction === 'v_prediction') {
        x0 = f32(f32(sqrtAlpha * x) - f32(sqrtBeta * m));
        eps = f32(f32(sqrtAlpha * m) + f32(sqrtBeta * x));
      } else {
        x0 = m;
        eps = f32(f32(x - f32(sqrtAlpha * x0)) / sqrtBeta);
      }
      if (x0 > clip) x0 = clip;
      else if (x0 < -clip) x0 = -clip;
      out[i] = f32(sqrtAlphaPrev * x0) + f32(directionScale * eps);
    }
    return out;
  }

  /** √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε at t = timesteps[stepIndex] (ᾱ of the training schedule, as diffusers). */
  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    const alpha = this.alphaAt(this.timesteps[stepIndex]);
    return mixFloat32(Math.sqrt(alpha), original, Math.sqrt(f32(1 - alpha)), noise);
  }

  private alphaAt(t: number): number {
    const alpha = this.alphasCumprod[t];
    if (alpha === undefined) throw new RangeError(`timestep ${t} is outside the training schedule`);
    return alpha;
  }
}
