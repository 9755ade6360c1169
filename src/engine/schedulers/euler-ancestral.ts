// diffusers' EulerAncestralDiscreteScheduler, float32 arithmetic op by op. Every step, the last one
// included, draws one noise tensor (diffusers calls randn with the pipeline's generator inside step).
import type { EulerAncestralConfig } from './config.ts';
import { addNoiseAtSigma, eulerGrid, predictOriginal, scaleBySigma } from './euler.ts';
import { f32 } from './numeric.ts';
import { buildTrainingSchedule } from './training-schedule.ts';
import { type NoiseSource, type Scheduler, checkSameLength, checkStepIndex, drawNoise } from './types.ts';

export class EulerAncestralScheduler implements Scheduler {
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly usesNoise = true;
  private readonly sigmaTable: Float32Array;

  /**
   * @param karras use Karras σ (as EulerDiscreteScheduler does with use_karras_sigmas); diffusers'
   *   ancestral class has no such option, so `false` is the diffusers behaviour.
   */
  constructor(
    private readonly config: EulerAncestralConfig,
    steps: number,
    karras = false,
  ) {
    const { alphasCumprod } = buildTrainingSchedule(config, true);
    const grid = eulerGrid(alphasCumprod, steps, {
      spacing: config.timestep_spacing,
      numTrainTimesteps: config.num_train_timesteps,
      stepsOffset: config.steps_offset,
      interpolation: 'linear',
      sigmaGrid: karras ? 'karras' : 'interpolated',
      sigmaMin: null,
      sigmaMax: null,
      finalSigma: 'zero',
    });
    this.timesteps = grid.timesteps;
    this.sigmaTable = grid.sigmas;
    this.sigmas = Array.from(grid.sigmas);
    this.initNoiseSigma = grid.initNoiseSigma;
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    return scaleBySigma(sample, this.sigmaTable[stepIndex]);
  }

  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    return addNoiseAtSigma(original, noise, this.sigmaTable[stepIndex]);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: NoiseSource): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    checkSameLength(modelOutput, sample);
    const sigmaFrom = this.sigmaTable[stepIndex];
    const sigmaTo = this.sigmaTable[stepIndex + 1];
    const fromSquared = f32(sigmaFrom * sigmaFrom);
    const toSquared = f32(sigmaTo * sigmaTo);
    const sigmaUp = f32(Math.sqrt(f32(f32(toSquared * f32(fromSquared - toSquared)) / fromSquared)));
    const sigmaDown = f32(Math.sqrt(f32(toSquared - f32(sigmaUp * sigmaUp))));
    const dt = f32(sigmaDown - sigmaFrom);
    const prediction = this.config.prediction_type;
    const eps = drawNoise(noise, sample.length, 'Euler ancestral');

    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const x = sample[i];
      const x0 = predictOriginal(prediction, sigmaFrom, x, modelOutput[i]);
      const derivative = f32(f32(x - x0) / sigmaFrom);
      const deterministic = f32(x + f32(derivative * dt));
      out[i] = deterministic + f32(eps[i] * sigmaUp);
    }
    return out;
  }
}
