// Image-to-image in the schedulers: add_noise (x₀ noised to a step's level) checked against values
// worked out here from the golden schedule (test/fixtures/golden/scheduler_golden.json: SD1.5's
// ᾱ and each case's σ, both diffusers'), and runs that start part-way (diffusers' set_begin_index).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TorchGenerator } from '../src/engine/random.ts';
import { ENGINE_NAME, readSchedulerGolden } from './helpers/scheduler-golden.ts';
import {
  createScheduler,
  DpmSolverScheduler,
  img2imgSteps,
  resolveSchedulerConfig,
  type Scheduler,
  startingAt,
} from '../src/engine/schedulers/index.ts';

interface GoldenCase {
  id: string;
  scheduler: string;
  use_karras_sigmas: boolean;
  num_inference_steps: number;
  config: Record<string, unknown>;
  timesteps: number[];
  sigmas: number[] | null;
}
const golden = readSchedulerGolden<GoldenCase>();const SIZE = 4 * 8 * 8;
const f = Math.fround;
const x0 = new TorchGenerator(1).randn(SIZE);
const eps = new TorchGenerator(2).randn(SIZE);

function schedulerOf(c: GoldenCase): Scheduler {
  return createScheduler(ENGINE_NAME[c.scheduler], c.config, c.num_inference_steps, { karras: c.use_karras_sigmas });
}

/** |a − b| ≤ atol + rtol·|b| elementwise. */
function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rtol: number, atol: number, what: string): void {
  assert.equal(actual.length, expected.length);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(Math.abs(actual[i] - expected[i]) <= atol + rtol * Math.abs(expected[i]), `${what}[${i}]: ${actual[i]} vs ${expected[i]}`);
  }
}

for (const c of golden.cases.filter((g) => g.scheduler in ENGINE_NAME)) {
  test(`add_noise of ${c.id} at the first, a middle and the last step, from the golden schedule`, () => {
    const scheduler = schedulerOf(c);
    for (const k of [0, Math.floor(c.num_inference_steps / 2), c.num_inference_steps - 1]) {
      const got = scheduler.addNoise(x0, eps, k);
      let want: number[];
      if (c.scheduler === 'DDIMScheduler') {
        // √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε at t = timesteps[k], torch float32 op by op: exact.
        const alpha = golden.train_schedule.alphas_cumprod[c.timesteps[k]];
        const a = f(Math.sqrt(alpha));
        const b = f(Math.sqrt(f(1 - alpha)));
        want = Array.from(x0, (x, i) => f(f(a * x) + f(b * eps[i])));
        assert.deepEqual(Array.from(got), want, `step ${k} (t = ${c.timesteps[k]})`);
        continue;
      }
      const sigma = c.sigmas![k];
      if (c.scheduler === 'DPMSolverMultistepScheduler') {
        // α_t·x₀ + σ_t·ε with α_t = 1/√(σ² + 1), σ_t = σ·α_t (diffusers' _sigma_to_alpha_sigma_t).
        const alpha = 1 / Math.sqrt(sigma * sigma + 1);
        want = Array.from(x0, (x, i) => alpha * x + sigma * alpha * eps[i]);
      } else {
        // Euler-type: x₀ + σ·ε.
        want = Array.from(x0, (x, i) => x + sigma * eps[i]);
      }
      // golden σ are diffusers' to 1e-6 relative; the rest is float32 rounding
      assertClose(got, want, 2e-6, 2e-6, `step ${k} (σ = ${sigma})`);
    }
  });
}

test('add_noise, worked by hand: DDIM at t = 951 and 1, Euler at σ_max', () => {
  const ddim = schedulerOf(golden.cases.find((c) => c.id === 'ddim_leading_20')!);
  const one = Float32Array.of(1, 0, -2);
  const unit = Float32Array.of(0, 1, 0.5);
  // ᾱ_951 = 0.0081550: √ᾱ = 0.090305, √(1 − ᾱ) = 0.995914
  const a951 = golden.train_schedule.alphas_cumprod[951];
  assert.ok(Math.abs(a951 - 0.008155) < 1e-6);
  const noisy = ddim.addNoise(one, unit, 0);
  assert.ok(Math.abs(noisy[0] - 0.090305) < 1e-6 && Math.abs(noisy[1] - 0.995914) < 1e-6);
  assert.ok(Math.abs(noisy[2] - (-2 * 0.090305 + 0.5 * 0.995914)) < 1e-5);
  // t = 1: ᾱ_1 = 0.99830 keeps almost all of x₀
  const last = ddim.addNoise(one, unit, 19);
  assert.ok(Math.abs(last[0] - Math.sqrt(golden.train_schedule.alphas_cumprod[1])) < 1e-6);
  const euler = schedulerOf(golden.cases.find((c) => c.id === 'euler_linspace_20')!);
  // σ_max = √((1 − ᾱ_999)/ᾱ_999) = 14.6146
  const loud = euler.addNoise(one, unit, 0);
  assert.ok(Math.abs(loud[1] - 14.6146) < 1e-3 && Math.abs(loud[0] - 1) < 1e-6);
});

test('zero terminal SNR: DDIM noises t = 999 to pure noise (the picture is gone), Euler to x₀ + σ·ε with σ ≈ 4096', () => {
  const config = { ...golden.cases[0].config, rescale_betas_zero_snr: true, timestep_spacing: 'trailing' };
  const ddim = createScheduler('ddim', config, 10);
  assert.equal(ddim.timesteps[0], 999);
  assert.deepEqual(Array.from(ddim.addNoise(x0, eps, 0)), Array.from(eps));
  const euler = createScheduler('euler', config, 10);
  const sigma = euler.sigmas![0];
  assert.ok(Math.abs(sigma - 4096) < 1, `σ_max ${sigma}`);
  assertClose(euler.addNoise(x0, eps, 0), Array.from(x0, (x, i) => x + sigma * eps[i]), 1e-6, 1e-6, 'euler');
});

test('img2imgSteps is diffusers get_timesteps: int() of the float product, as Python truncates it', () => {
  assert.deepEqual(img2imgSteps(20, 1), { beginIndex: 0, stepsRun: 20 });
  assert.deepEqual(img2imgSteps(20, 0.8), { beginIndex: 4, stepsRun: 16 });
  assert.deepEqual(img2imgSteps(10, 0.7), { beginIndex: 3, stepsRun: 7 }); // 10 · 0.7 = 7.000000000000001
  assert.deepEqual(img2imgSteps(100, 0.29), { beginIndex: 72, stepsRun: 28 }); // 28.999999999999996
  assert.deepEqual(img2imgSteps(3, 0.5), { beginIndex: 2, stepsRun: 1 });
  assert.deepEqual(img2imgSteps(20, 0.04), { beginIndex: 20, stepsRun: 0 });
});

test('startingAt: the last timesteps, with the full schedule step for step', () => {
  const c = golden.cases.find((g) => g.id === 'euler_a_linspace_20')!;
  const full = schedulerOf(c);
  assert.equal(startingAt(full, 0), full);
  const part = startingAt(schedulerOf(c), 12);
  assert.deepEqual(part.timesteps, full.timesteps.slice(12));
  assert.deepEqual(part.sigmas, full.sigmas!.slice(12));
  assert.deepEqual(Array.from(part.addNoise(x0, eps, 0)), Array.from(full.addNoise(x0, eps, 12)));
  const out = x0.map((v) => 0.3 * v);
  assert.deepEqual(Array.from(part.scaleModelInput(x0, 2)), Array.from(full.scaleModelInput(x0, 14)));
  const noise = () => eps;
  assert.deepEqual(Array.from(part.step(out, 2, x0, noise)), Array.from(full.step(out, 14, x0, noise)));
  assert.throws(() => part.step(out, 8, x0, noise), /step index 8 is outside 0..7/);
  assert.throws(() => startingAt(full, 20), /begin index 20/);
});

test('DPM-Solver++ 2M from a begin index: first order at its first step, second order after, as diffusers', () => {
  const c = golden.cases.find((g) => g.id === 'dpmpp_2m_leading_20')!;
  const firstOrderConfig = resolveSchedulerConfig('DPMSolverMultistepScheduler', { ...c.config, solver_order: 1 });
  const model = (x: Float32Array, t: number) => x.map((v) => 0.5 * v * Math.cos(t / 300) + 0.1 * Math.sin(t / 50));
  const begin = 8;
  // Without the begin index the multistep solver refuses to start in the middle.
  assert.throws(() => schedulerOf(c).step(model(x0, 0), begin, x0), /expected step 0, got 8/);

  const part = startingAt(schedulerOf(c), begin);
  const firstOrder = new DpmSolverScheduler(firstOrderConfig, c.num_inference_steps);
  firstOrder.setBeginIndex(begin);
  let x = part.addNoise(x0, eps, 0);
  let y = x;
  const t0 = part.timesteps[0];
  x = part.step(model(x, t0), 0, x);
  y = firstOrder.step(model(y, t0), begin, y);
  assert.deepEqual(Array.from(x), Array.from(y), 'the first step is first order');
  const t1 = part.timesteps[1];
  const second = part.step(model(x, t1), 1, x);
  const firstAgain = firstOrder.step(model(y, t1), begin + 1, y);
  assert.ok(second.some((v, i) => v !== firstAgain[i]), 'the second step uses the history (second order)');
  for (let k = 2; k < part.timesteps.length; k++) x = part.step(model(x, part.timesteps[k]), k, x);
  assert.ok(x.every(Number.isFinite));
});
