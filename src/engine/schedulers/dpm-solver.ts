// diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M and relatives), float32 arithmetic op by op.
// The solver is multistep: it remembers the last converted model outputs, so steps must be taken in
// order (step 0, or the begin index of a run that starts part-way, starts a new trajectory).
import type { DpmSolverConfig } from './config.ts';
import { f32, numpyInterp, numpyLinspace, roundHalfEven } from './numeric.ts';
import { exponentialSigmas, karrasSigmas, logSigmas, sigmaToTimestep, trainingSigmas } from './sigmas.ts';
import { dpmSolverTimesteps } from './spacing.ts';
import { buildTrainingSchedule } from './training-schedule.ts';
import { type NoiseSource, type Scheduler, checkSameLength, checkStepIndex, drawNoise, mixFloat32 } from './types.ts';

/** α_t = 1/√(σ² + 1) and σ_t = σ·α_t, and their log-SNR λ = log α_t − log σ_t, in float32. */
interface NoiseLevel {
  alpha: number;
  sigma: number;
  lambda: number;
}

function noiseLevel(sigma: number): NoiseLevel {
  const alpha = f32(1 / f32(Math.sqrt(f32(f32(sigma * sigma) + 1))));
  const sigmaT = f32(sigma * alpha);
  return { alpha, sigma: sigmaT, lambda: f32(f32(Math.log(alpha)) - f32(Math.log(sigmaT))) };
}

const exp32 = (x: number) => f32(Math.exp(x));

/**
 * diffusers casts the timesteps to int64, which truncates. Unrounded σ→t values (cosine schedule,
 * exponential σ) meant to be whole, like the 999 of σ_max, come out a hair below it or not depending on
 * the platform's float32 log, so values within 1e-6 of an integer are taken as that integer.
 */
function toInt64(t: number): number {
  const nearest = Math.round(t);
  return Math.abs(t - nearest) < 1e-6 ? nearest : Math.trunc(t);
}

/** Σ coefficient·array, accumulated left to right with float32 rounding after every operation. */
function combine(length: number, terms: ReadonlyArray<readonly [number, Float32Array]>): Float32Array {
  const out = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    let acc = f32(terms[0][0] * terms[0][1][i]);
    for (let k = 1; k < terms.length; k++) acc = f32(acc + f32(terms[k][0] * terms[k][1][i]));
    out[i] = acc;
  }
  return out;
}

/** (1 / r) · (a − b), elementwise in float32: a divided difference of model outputs. */
function difference(a: Float32Array, b: Float32Array, r: number): Float32Array {
  const scale = f32(1 / r);
  return a.map((v, i) => scale * f32(v - b[i]));
}

export class DpmSolverScheduler implements Scheduler {
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma = 1;
  readonly usesNoise: boolean;
  private readonly sigmaTable: Float32Array;
  /** Converted model outputs of the previous steps, newest last. */
  private history: Float32Array[] = [];
  private lowerOrderCount = 0;
  private nextStep = 0;
  /** diffusers' begin_index: where a run that starts part-way (image-to-image) takes its first step. */
  private beginIndex = 0;

  constructor(
    private readonly config: DpmSolverConfig,
    steps: number,
  ) {
    const { alphasCumprod } = buildTrainingSchedule(config, true);
    const tableSigmas = trainingSigmas(alphasCumprod);
    const tableLogSigmas = logSigmas(tableSigmas);
    const last = tableSigmas.length - 1;
    const roundsTimesteps = config.beta_schedule !== 'squaredcos_cap_v2';

    let timesteps = dpmSolverTimesteps(
      { spacing: config.timestep_spacing, numTrainTimesteps: config.num_train_timesteps, steps, stepsOffset: config.steps_offset },
      config.num_train_timesteps - this.clippedCount(alphasCumprod),
    );
    let sigmas: number[];
    if (config.use_karras_sigmas) {
      sigmas = karrasSigmas(tableSigmas[0], tableSigmas[last], steps);
      timesteps = sigmas.map((s) => sigmaToTimestep(s, tableLogSigmas)).map((t) => (roundsTimesteps ? roundHalfEven(t) : t));
    } else if (config.use_lu_lambdas) {
      const lambdaMax = tableLogSigmas[last];
      const lambdaMin = tableLogSigmas[0];
      sigmas = numpyLinspace(0, 1, steps).map((r) => Math.exp(lambdaMax + r * (lambdaMin - lambdaMax)));
      timesteps = sigmas.map((s) => sigmaToTimestep(s, tableLogSigmas)).map((t) => (roundsTimesteps ? roundHalfEven(t) : t));
    } else if (config.use_exponential_sigmas) {
      sigmas = exponentialSigmas(tableSigmas[0], tableSigmas[last], steps);
      timesteps = sigmas.map((s) => sigmaToTimestep(s, tableLogSigmas));
    } else {
      const trainIndex = Array.from(tableSigmas, (_, i) => i);
      sigmas = timesteps.map((t) => numpyInterp(t, trainIndex, tableSigmas));
    }
    const finalSigma =
      config.final_sigmas_type === 'zero' ? 0 : Math.sqrt(f32(f32(1 - alphasCumprod[0]) / alphasCumprod[0]));
    this.sigmaTable = Float32Array.from([...sigmas, finalSigma]);
    this.sigmas = Array.from(this.sigmaTable);
    this.timesteps = timesteps.map(toInt64);
    this.usesNoise = config.algorithm_type === 'sde-dpmsolver++';
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    return sample;
  }

  setBeginIndex(stepIndex: number): void {
    checkStepIndex(stepIndex, this.timesteps.length);
    this.beginIndex = stepIndex;
  }

  /** α_t·x₀ + σ_t·ε at the σ of step `stepIndex` (diffusers: sigmas[begin_index] before the first step). */
  addNoise(original: Float32Array, noise: Float32Array, stepIndex: number): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    const { alpha, sigma } = noiseLevel(this.sigmaTable[stepIndex]);
    return mixFloat32(alpha, original, sigma, noise);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: NoiseSource): Float32Array {
    checkStepIndex(stepIndex, this.timesteps.length);
    checkSameLength(modelOutput, sample);
    // A new trajectory: diffusers' lower_order_nums and model_outputs start empty at the begin index.
    if (stepIndex === this.beginIndex) {
      this.history = [];
      this.lowerOrderCount = 0;
    } else if (stepIndex !== this.nextStep) {
      throw new Error(`DPM-Solver is multistep: expected step ${this.nextStep}, got ${stepIndex}`);
    }
    const { solver_order: order, lower_order_final: lowerOrderFinal } = this.config;
    const stepCount = this.timesteps.length;
    const finalFirstOrder =
      stepIndex === stepCount - 1 &&
      (this.config.euler_at_final || (lowerOrderFinal && stepCount < 15) || this.config.final_sigmas_type === 'zero');
    const secondToLastSecondOrder = stepIndex === stepCount - 2 && lowerOrderFinal && stepCount < 15;

    const converted = this.convertModelOutput(modelOutput, stepIndex, sample);
    this.history.push(converted);
    if (this.history.length > order) this.history.shift();
    const ancestral = this.usesNoise ? drawNoise(noise, sample.length, 'SDE-DPM-Solver++') : undefined;

    let next: Float32Array;
    if (order === 1 || this.lowerOrderCount < 1 || finalFirstOrder) {
      next = this.firstOrderUpdate(converted, stepIndex, sample, ancestral);
    } else if (order === 2 || this.lowerOrderCount < 2 || secondToLastSecondOrder) {
      next = this.secondOrderUpdate(stepIndex, sample, ancestral);
    } else {
      next = this.thirdOrderUpdate(stepIndex, sample, ancestral);
    }
    if (this.lowerOrderCount < order) this.lowerOrderCount++;
    this.nextStep = stepIndex + 1;
    return next;
  }

  /** Searchsorted of lambda_min_clipped in the ascending λ of the training schedule. */
  private clippedCount(alphasCumprod: Float32Array): number {
    const limit = this.config.lambda_min_clipped;
    if (limit === -Infinity) return 0;
    let count = 0;
    for (const a of alphasCumprod) {
      const lambda = f32(f32(Math.log(f32(Math.sqrt(a)))) - f32(Math.log(f32(Math.sqrt(f32(1 - a))))));
      if (lambda < limit) count++;
    }
    return count;
  }

  /** dpmsolver++ works with the denoised x̂₀, dpmsolver with ε. */
  private convertModelOutput(modelOutput: Float32Array, stepIndex: number, sample: Float32Array): Float32Array {
    const { alpha, sigma } = noiseLevel(this.sigmaTable[stepIndex]);
    const prediction = this.config.prediction_type;
    if (this.config.algorithm_type === 'dpmsolver') {
      if (prediction === 'epsilon') return modelOutput;
      if (prediction === 'sample') return modelOutput.map((m, i) => f32(sample[i] - f32(alpha * m)) / sigma);
      return modelOutput.map((m, i) => f32(alpha * m) + f32(sigma * sample[i]));
    }
    if (prediction === 'epsilon') return modelOutput.map((m, i) => f32(sample[i] - f32(sigma * m)) / alpha);
    if (prediction === 'sample') return modelOutput;
    return modelOutput.map((m, i) => f32(alpha * sample[i]) - f32(sigma * m));
  }

  private levels(stepIndex: number, count: number): NoiseLevel[] {
    // [target, current, previous, …]
    return Array.from({ length: count }, (_, k) => noiseLevel(this.sigmaTable[stepIndex + 1 - k]));
  }

  private firstOrderUpdate(m: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array {
    const [t, s] = this.levels(stepIndex, 2);
    const h = f32(t.lambda - s.lambda);
    switch (this.config.algorithm_type) {
      case 'dpmsolver++':
        return combine(sample.length, [
          [f32(t.sigma / s.sigma), sample],
          [-f32(t.alpha * f32(exp32(-h) - 1)), m],
        ]);
      case 'dpmsolver':
        return combine(sample.length, [
          [f32(t.alpha / s.alpha), sample],
          [-f32(t.sigma * f32(exp32(h) - 1)), m],
        ]);
      case 'sde-dpmsolver++': {
        const decay = exp32(f32(-2 * h));
        return combine(sample.length, [
          [f32(f32(t.sigma / s.sigma) * exp32(-h)), sample],
          [f32(t.alpha * f32(1 - decay)), m],
          [f32(t.sigma * f32(Math.sqrt(f32(1 - decay)))), noise!],
        ]);
      }
    }
  }

  private secondOrderUpdate(stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array {
    const [t, s0, s1] = this.levels(stepIndex, 3);
    const [m1, m0] = this.history.slice(-2);
    const h = f32(t.lambda - s0.lambda);
    const r0 = f32(f32(s0.lambda - s1.lambda) / h);
    const d0 = m0;
    const d1 = difference(m0, m1, r0);
    const heun = this.config.solver_type === 'heun';
    switch (this.config.algorithm_type) {
      case 'dpmsolver++': {
        const expm1 = f32(exp32(-h) - 1);
        const c0 = f32(t.alpha * expm1);
        const c1 = heun ? -f32(t.alpha * f32(f32(expm1 / h) + 1)) : f32(0.5 * c0);
        return combine(sample.length, [
          [f32(t.sigma / s0.sigma), sample],
          [-c0, d0],
          [-c1, d1],
        ]);
      }
      case 'dpmsolver': {
        const expm1 = f32(exp32(h) - 1);
        const c0 = f32(t.sigma * expm1);
        const c1 = heun ? f32(t.sigma * f32(f32(expm1 / h) - 1)) : f32(0.5 * c0);
        return combine(sample.length, [
          [f32(t.alpha / s0.alpha), sample],
          [-c0, d0],
          [-c1, d1],
        ]);
      }
      case 'sde-dpmsolver++': {
        const decay = exp32(f32(-2 * h));
        const c0 = f32(t.alpha * f32(1 - decay));
        const c1 = heun ? f32(t.alpha * f32(f32(f32(1 - decay) / f32(-2 * h)) + 1)) : f32(0.5 * c0);
        return combine(sample.length, [
          [f32(f32(t.sigma / s0.sigma) * exp32(-h)), sample],
          [c0, d0],
          [c1, d1],
          [f32(t.sigma * f32(Math.sqrt(f32(1 - decay)))), noise!],
        ]);
      }
    }
  }

  private thirdOrderUpdate(stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array {
    const [t, s0, s1, s2] = this.levels(stepIndex, 4);
    const [m2, m1, m0] = this.history.slice(-3);
    const h = f32(t.lambda - s0.lambda);
    const r0 = f32(f32(s0.lambda - s1.lambda) / h);
    const r1 = f32(f32(s1.lambda - s2.lambda) / h);
    const d10 = difference(m0, m1, r0);
    const d11 = difference(m1, m2, r1);
    const rSum = f32(r0 + r1);
    const blend = f32(r0 / rSum);
    const d1 = d10.map((v, i) => v + f32(blend * f32(v - d11[i])));
    const d2 = difference(d10, d11, rSum);
    const hSquared = f32(h * h);
    switch (this.config.algorithm_type) {
      case 'dpmsolver++': {
        const expm1 = f32(exp32(-h) - 1);
        return combine(sample.length, [
          [f32(t.sigma / s0.sigma), sample],
          [-f32(t.alpha * expm1), m0],
          [f32(t.alpha * f32(f32(expm1 / h) + 1)), d1],
          [-f32(t.alpha * f32(f32(f32(expm1 + h) / hSquared) - 0.5)), d2],
        ]);
      }
      case 'dpmsolver': {
        const expm1 = f32(exp32(h) - 1);
        return combine(sample.length, [
          [f32(t.alpha / s0.alpha), sample],
          [-f32(t.sigma * expm1), m0],
          [-f32(t.sigma * f32(f32(expm1 / h) - 1)), d1],
          [-f32(t.sigma * f32(f32(f32(expm1 - h) / hSquared) - 0.5)), d2],
        ]);
      }
      case 'sde-dpmsolver++': {
        const minusTwoH = f32(-2 * h);
        const oneMinusDecay = f32(1 - exp32(minusTwoH));
        const twoH = f32(2 * h);
        return combine(sample.length, [
          [f32(f32(t.sigma / s0.sigma) * exp32(-h)), sample],
          [f32(t.alpha * oneMinusDecay), m0],
          [f32(t.alpha * f32(f32(oneMinusDecay / minusTwoH) + 1)), d1],
          [f32(t.alpha * f32(f32(f32(oneMinusDecay - twoH) / f32(twoH * twoH)) - 0.5)), d2],
          [f32(t.sigma * f32(Math.sqrt(oneMinusDecay))), noise!],
        ]);
      }
    }
  }
}
