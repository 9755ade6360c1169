/** Supplies one draw of standard normal noise of the sample's size (from the run's TorchGenerator). */
export type NoiseSource = () => Float32Array;

/**
 * A configured sampler, after diffusers' `set_timesteps(steps)`. Samples are flat float32 arrays
 * (any batch × channels × height × width); every operation is elementwise, so a batch of images can
 * share one scheduler as in diffusers.
 *
 * Drive it like a diffusers pipeline:
 *   x = noise · initNoiseSigma                    (image-to-image: x = addNoise(x₀, noise, begin))
 *   for i in 0 … timesteps.length − 1:            (image-to-image: begin … timesteps.length − 1,
 *     out = model(scaleModelInput(x, i), timesteps[i])    see startingAt in begin-index.ts)
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
  /**
   * diffusers' `add_noise(original, noise, timesteps[stepIndex])`: `original` (clean latents x₀)
   * noised to the level at which step `stepIndex` starts, as image-to-image begins. DDIM-type
   * (variance preserving): √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε; Euler-type (variance exploding): x₀ + σ·ε;
   * DPM-Solver: α_t·x₀ + σ_t·ε with α_t = 1/√(σ² + 1), σ_t = σ·α_t. Returns a new array.
   */
  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array;
  /**
   * diffusers' `set_begin_index`: the first step of a run that starts part-way (image-to-image).
   * Only multistep solvers need it (they start their history there); absent elsewhere.
   */
  setBeginIndex?(stepIndex: number): void;
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

/** a·x + b·n elementwise, each product and the sum rounded to float32 (torch's `a * x + b * n`). */
export function mixFloat32(a: number, x: Float32Array, b: number, n: Float32Array): Float32Array {
  checkSameNoise(n, x);
  const out = new Float32Array(x.length);
  const fa = Math.fround(a);
  const fb = Math.fround(b);
  for (let i = 0; i < x.length; i++) out[i] = Math.fround(fa * x[i]) + Math.fround(fb * n[i]);
  return out;
}

export function checkSameNoise(noise: Float32Array, sample: Float32Array): void {
  if (noise.length !== sample.length) {
    throw new RangeError(`the noise has ${noise.length} values but the sample has ${sample.length}`);
  }
}
