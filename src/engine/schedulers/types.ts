/** Supplies one draw of standard normal noise of the sample's size (from the run's TorchGenerator). */
export type NoiseSource = () => Float32Array;

/**
 * A configured sampler, after diffusers' `set_timesteps(steps)`. Samples are flat float32 arrays
 * (any batch × channels × height × width); every operation is elementwise, so a batch of images can
 * share one scheduler as in diffusers.
 *
 * Drive it like a diffusers pipeline:
 *   x = noise · initNoiseSigma
 *   for i in 0 … timesteps.length − 1:
 *     out = model(scaleModelInput(x, i), timesteps[i])
 *     x = step(out, i, x, noise)
 */
export interface Scheduler {
  /** The timestep to give the model at each step, in order (fractional for Euler-type samplers). */
  readonly timesteps: readonly number[];
  /** Standard deviation of the initial noise (1 for DDIM / DPM-Solver, σ_max-ish for Euler). */
  readonly initNoiseSigma: number;
  /** The σ of each step plus the final one, where the sampler works in σ (Euler, DPM-Solver). */
  readonly sigmas?: readonly number[];
  /** Whether `step` draws ancestral noise (then it calls `noise` once per step, the last one included). */
  readonly usesNoise: boolean;
  /** The model input for step `stepIndex`; returns `sample` itself when no scaling applies. */
  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array;
  /** One denoising step from the model's output at step `stepIndex`; returns a new array. */
  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: NoiseSource): Float32Array;
}

export function checkStepIndex(stepIndex: number, stepCount: number): void {
  if (!Number.isInteger(stepIndex) || stepIndex < 0 || stepIndex >= stepCount) {
    throw new RangeError(`step index ${stepIndex} is outside 0..${stepCount - 1}`);
  }
}

export function checkSameLength(modelOutput: Float32Array, sample: Float32Array): void {
  if (modelOutput.length !== sample.length) {
    throw new RangeError(`model output has ${modelOutput.length} values but the sample has ${sample.length}`);
  }
}

export function drawNoise(noise: NoiseSource | undefined, length: number, who: string): Float32Array {
  if (!noise) throw new Error(`${who} needs a noise source for its ancestral noise`);
  const values = noise();
  if (values.length !== length) throw new RangeError(`${who}: the noise has ${values.length} values, the sample ${length}`);
  return values;
}
