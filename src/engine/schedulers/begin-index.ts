// A run that starts part-way through a scheduler's timesteps (image-to-image), as diffusers does it:
// `timesteps = scheduler.timesteps[t_start * order:]` plus `scheduler.set_begin_index(t_start * order)`.
// Every scheduler here has order 1 (DPM-Solver multistep included; only Heun-type solvers have 2).
import type { NoiseSource, Scheduler } from './types.ts';

/**
 * The scheduler seen from step `beginIndex` on: index 0 of the view is step `beginIndex` of the full
 * schedule, so a denoising loop that runs `timesteps.length` steps from 0 runs only the last ones,
 * with the full schedule's noise levels (DDIM's step size, DPM-Solver's final-order rule and σ
 * table stay those of all `steps`). `addNoise(x₀, ε, 0)` noises to the level of the first step run.
 * `beginIndex` 0 returns the scheduler itself.
 */
export function startingAt(scheduler: Scheduler, beginIndex: number): Scheduler {
  const total = scheduler.timesteps.length;
  if (!Number.isInteger(beginIndex) || beginIndex < 0 || beginIndex >= total) {
    throw new RangeError(`begin index ${beginIndex} is outside 0..${total - 1}`);
  }
  if (beginIndex === 0) return scheduler;
  scheduler.setBeginIndex?.(beginIndex);
  return new OffsetScheduler(scheduler, beginIndex);
}

class OffsetScheduler implements Scheduler {
  readonly timesteps: readonly number[];
  readonly sigmas?: readonly number[];
  readonly initNoiseSigma: number;
  readonly usesNoise: boolean;

  constructor(
    private readonly inner: Scheduler,
    private readonly offset: number,
  ) {
    this.timesteps = inner.timesteps.slice(offset);
    if (inner.sigmas) this.sigmas = inner.sigmas.slice(offset);
    this.initNoiseSigma = inner.initNoiseSigma;
    this.usesNoise = inner.usesNoise;
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array {
    return this.inner.scaleModelInput(sample, this.index(stepIndex));
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: NoiseSource): Float32Array {
    return this.inner.step(modelOutput, this.index(stepIndex), sample, noise);
  }

  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array {
    return this.inner.addNoise(original, noise, this.index(stepIndex));
  }

  private index(stepIndex: number): number {
    if (!Number.isInteger(stepIndex) || stepIndex < 0 || stepIndex >= this.timesteps.length) {
      throw new RangeError(`step index ${stepIndex} is outside 0..${this.timesteps.length - 1}`);
    }
    return stepIndex + this.offset;
  }
}

/**
 * diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: `init_timestep = min(int(steps · strength),
 * steps)`, `t_start = max(steps − init_timestep, 0)`. Returns t_start (the begin index) and the number
 * of steps that run (0 when steps · strength < 1: the image would come back unchanged but noised).
 */
export function img2imgSteps(steps: number, strength: number): { beginIndex: number; stepsRun: number } {
  const initTimestep = Math.min(Math.trunc(steps * strength), steps);
  const beginIndex = Math.max(steps - initTimestep, 0);
  return { beginIndex, stepsRun: steps - beginIndex };
}
