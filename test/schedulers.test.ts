// Over 500 lines on purpose: one table-driven file for every scheduler, spacing and config against diffusers' golden trajectories.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EngineError } from '../src/engine/api.ts';
import { TorchGenerator } from '../src/engine/random.ts';
import { ENGINE_NAME, readSchedulerGolden } from './helpers/scheduler-golden.ts';
import {
  DdimScheduler,
  DpmSolverScheduler,
  EulerAncestralScheduler,
  EulerScheduler,
  type Scheduler,
  type SchedulerClassName,
  buildTrainingSchedule,
  createScheduler,
  resolveConfigFor,
  resolveSchedulerConfig,
} from '../src/engine/schedulers/index.ts';
import { numpyArange, roundHalfEven, torchLinspaceFloat32 } from '../src/engine/schedulers/numeric.ts';

// Golden trajectories made with diffusers 58eb52c (see the file's description): a fake elementwise
// model, randn([1,4,8,8]) from seed 1234 for the start, the same generator for ancestral noise.
interface GoldenCase {
  id: string;
  scheduler: string;
  timestep_spacing: string;
  use_karras_sigmas: boolean;
  num_inference_steps: number;
  config: Record<string, unknown>;
  timesteps: number[];
  timestep_dtype: 'int64' | 'float32';
  sigmas: number[] | null;
  init_noise_sigma: number;
  model_calls: number;
  randn_calls: number;
  x_init_sum: number;
  x_init_sumsq: number;
  per_step_sum: number[];
  step_noise_sums?: number[];
  step_noise_head?: number[][];
  x_final: number[];
}
const golden = readSchedulerGolden<GoldenCase>();

const LATENT_SIZE = 4 * 8 * 8;

/** The golden file's model: eps(x, t) = 0.5·x·cos(t/300) + 0.1·sin(t/50), rounded to float32. */
function fakeModel(x: Float32Array, t: number): Float32Array {
  return x.map((v) => 0.5 * v * Math.cos(t / 300) + 0.1 * Math.sin(t / 50));
}

interface Trajectory {
  initial: Float32Array;
  final: Float32Array;
  stepSums: number[];
  noiseDraws: Float32Array[];
  modelCalls: number;
}

function runTrajectory(scheduler: Scheduler): Trajectory {
  const generator = new TorchGenerator(1234);
  const initial = generator.randn(LATENT_SIZE).map((v) => v * scheduler.initNoiseSigma);
  const noiseDraws: Float32Array[] = [];
  const noise = () => {
    const draw = generator.randn(LATENT_SIZE);
    noiseDraws.push(draw);
    return draw;
  };
  let x: Float32Array = initial;
  let modelCalls = 0;
  const stepSums: number[] = [];
  scheduler.timesteps.forEach((t, i) => {
    const output = fakeModel(scheduler.scaleModelInput(x, i), t);
    modelCalls++;
    x = scheduler.step(output, i, x, noise);
    stepSums.push(sum(x));
  });
  return { initial, final: x, stepSums, noiseDraws, modelCalls };
}

const sum = (values: ArrayLike<number>) => Array.from(values).reduce((a, b) => a + b, 0);
const sumOfSquares = (values: ArrayLike<number>) => Array.from(values).reduce((a, b) => a + b * b, 0);

/** The golden file's suggested check: |x − gold| ≤ 1e-3 + 1e-5·|gold|. */
function assertTrajectoryClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const tolerance = 1e-3 + 1e-5 * Math.abs(expected[i]);
    assert.ok(Math.abs(actual[i] - expected[i]) <= tolerance, `${what}[${i}]: ${actual[i]} vs ${expected[i]}`);
  }
}

function assertRelativelyClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rtol: number, what: string, atol = 0): void {
  assert.equal(actual.length, expected.length, `${what}: length ${actual.length} vs ${expected.length}`);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(Math.abs(actual[i] - expected[i]) <= atol + rtol * Math.abs(expected[i]), `${what}[${i}]: ${actual[i]} vs ${expected[i]}`);
  }
}

/** Tolerance for a sum of 256 values each within 1e-3 + 1e-5·|x|. */
function sumTolerance(sumsq: number, count = LATENT_SIZE): number {
  return count * (1e-3 + 1e-5 * Math.sqrt(sumsq / count));
}

const SD15 = {
  _class_name: 'PNDMScheduler',
  _diffusers_version: '0.6.0',
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  steps_offset: 1,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  clip_sample: false,
  trained_betas: null,
};

// --- diffusers' own numbers -------------------------------------------------------------------

test('the SD1.5 training schedule is bit-identical to diffusers/torch and hits the anchors', () => {
  const config = resolveSchedulerConfig('DDIMScheduler', SD15);
  const { betas, alphasCumprod } = buildTrainingSchedule(config, false);
  assert.deepEqual(Array.from(betas), golden.train_schedule.betas);
  assert.deepEqual(Array.from(alphasCumprod), golden.train_schedule.alphas_cumprod);
  assert.equal(alphasCumprod[0].toFixed(5), '0.99915');
  assert.equal(alphasCumprod[999].toPrecision(5), '0.0046601');
  const sigmaMax = Math.sqrt((1 - alphasCumprod[999]) / alphasCumprod[999]);
  assert.equal(sigmaMax.toFixed(4), '14.6146');
  const euler = createScheduler('euler', SD15, 20);
  assert.equal(euler.initNoiseSigma.toFixed(4), '14.6146');
});

test('DDIM 50 leading is [981, 961, …, 1] and DPM++ 2M leading 20 is [941, 894, 847, …]', () => {
  const ddim = createScheduler('ddim', SD15, 50);
  assert.deepEqual(ddim.timesteps, Array.from({ length: 50 }, (_, i) => 981 - 20 * i));
  const dpm = createScheduler('dpmpp_2m', { ...SD15, timestep_spacing: 'leading' }, 20);
  assert.deepEqual(dpm.timesteps.slice(0, 3), [941, 894, 847]);
  assert.deepEqual(dpm.timesteps, Array.from({ length: 20 }, (_, i) => (20 - i) * 47 + 1));
});

test('every non-PNDM golden case is covered', () => {
  const covered = golden.cases.filter((c) => c.scheduler in ENGINE_NAME).map((c) => c.scheduler);
  const skipped = golden.cases.filter((c) => !(c.scheduler in ENGINE_NAME)).map((c) => c.scheduler);
  assert.ok(covered.length >= 19, `${covered.length} cases`);
  assert.deepEqual([...new Set(skipped)], ['PNDMScheduler'].filter((s) => skipped.includes(s)));
  for (const name of Object.keys(ENGINE_NAME)) assert.ok(covered.includes(name), `${name} has golden cases`);
});

for (const c of golden.cases.filter((g) => g.scheduler in ENGINE_NAME)) {
  test(`golden ${c.id}: timesteps, sigmas and the whole trajectory match diffusers`, () => {
    const scheduler = createScheduler(ENGINE_NAME[c.scheduler], c.config, c.num_inference_steps, { karras: c.use_karras_sigmas });
    if (c.timestep_dtype === 'int64') {
      assert.deepEqual(scheduler.timesteps, c.timesteps);
    } else {
      assertRelativelyClose(scheduler.timesteps, c.timesteps, 1e-6, 'timesteps');
    }
    if (c.sigmas === null) assert.equal(scheduler.sigmas, undefined);
    else assertRelativelyClose(scheduler.sigmas!, c.sigmas, 1e-6, 'sigmas');
    assertRelativelyClose([scheduler.initNoiseSigma], [c.init_noise_sigma], 1e-6, 'init_noise_sigma');

    const run = runTrajectory(scheduler);
    assert.equal(run.modelCalls, c.model_calls);
    assert.equal(1 + run.noiseDraws.length, c.randn_calls);
    assert.ok(Math.abs(sum(run.initial) - c.x_init_sum) <= 1e-4 * (1 + Math.abs(c.x_init_sum)));
    assert.ok(Math.abs(sumOfSquares(run.initial) - c.x_init_sumsq) <= 1e-4 * c.x_init_sumsq);
    run.stepSums.forEach((s, i) => {
      assert.ok(Math.abs(s - c.per_step_sum[i]) <= sumTolerance(c.x_final.reduce((a, v) => a + v * v, 0)), `sum after step ${i}: ${s} vs ${c.per_step_sum[i]}`);
    });
    if (c.step_noise_sums) {
      run.noiseDraws.forEach((draw, i) => {
        assertRelativelyClose(draw.subarray(0, 8), c.step_noise_head![i], 0, `noise ${i} head`, 1e-6);
        assert.ok(Math.abs(sum(draw) - c.step_noise_sums![i]) <= 1e-4, `noise ${i} sum`);
      });
    }
    assertTrajectoryClose(run.final, c.x_final, 'x_final');
  });
}

// --- More of diffusers' behaviour: zero-SNR + v-prediction, other beta schedules, solver variants ----
// Reference values from running the unmodified diffusers 58eb52c scheduler sources on torch 1.13 CPU
// with the golden file's protocol (fake model, seed 1234, shape [1,4,8,8]).
const ZERO_SNR = { ...SD15, rescale_betas_zero_snr: true, prediction_type: 'v_prediction', timestep_spacing: 'trailing' };
const COSINE = { beta_schedule: 'squaredcos_cap_v2' };

interface ReferenceCase {
  id: string;
  scheduler: SchedulerClassName;
  config: Record<string, unknown>;
  steps: number;
  timesteps: number[];
  sigmas: { count: number; first: number; last: [number, number] } | null;
  initNoiseSigma: number;
  head: number[];
  sum: number;
  sumsq: number;
}

const REFERENCE_CASES: ReferenceCase[] = [
  {
    id: 'ddim_zero_snr_vpred_trailing_12',
    scheduler: 'DDIMScheduler',
    config: ZERO_SNR,
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82],
    sigmas: null,
    initNoiseSigma: 1,
    head: [-0.10675395280122757, -0.40489816665649414, 0.106116384267807, -0.7032174468040466, 0.02154410444200039, 0.49755144119262695, -0.06642447412014008, -0.38236162066459656],
    sum: -16.71275388682261,
    sumsq: 142.34667327888815,
  },
  {
    id: 'euler_zero_snr_vpred_trailing_12',
    scheduler: 'EulerDiscreteScheduler',
    config: ZERO_SNR,
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82],
    sigmas: { count: 13, first: 4095.999755859375, last: [0.31446605920791626, 0] },
    initNoiseSigma: 4095.999755859375,
    head: [-0.10744118690490723, -0.3973861634731293, 0.09957526624202728, -0.6875050067901611, 0.01732882857322693, 0.48024439811706543, -0.06822110712528229, -0.3754696249961853],
    sum: -17.18044065311551,
    sumsq: 134.7456753719714,
  },
  {
    id: 'euler_a_zero_snr_vpred_trailing_12',
    scheduler: 'EulerAncestralDiscreteScheduler',
    config: ZERO_SNR,
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82],
    sigmas: { count: 13, first: 4095.999755859375, last: [0.31446605920791626, 0] },
    initNoiseSigma: 4095.999755859375,
    head: [0.1988764852285385, -0.03200270235538483, 0.028549212962388992, -1.3507049083709717, -0.27887505292892456, 0.46809202432632446, -0.11627128720283508, -0.7604835033416748],
    sum: -11.124919783324003,
    sumsq: 83.07254537286856,
  },
  {
    id: 'dpmpp_2m_zero_snr_vpred_trailing_12',
    scheduler: 'DPMSolverMultistepScheduler',
    config: ZERO_SNR,
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82],
    sigmas: { count: 13, first: 4095.999755859375, last: [0.31446605920791626, 0] },
    initNoiseSigma: 1,
    head: [-0.10937301814556122, -0.40545913577079773, 0.10202783346176147, -0.7017190456390381, 0.018039420247077942, 0.4907609820365906, -0.0693219006061554, -0.38307830691337585],
    sum: -17.45651240646839,
    sumsq: 140.50248340380963,
  },
  {
    id: 'ddim_cosine_defaults_10',
    scheduler: 'DDIMScheduler',
    config: COSINE,
    steps: 10,
    timesteps: [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    sigmas: null,
    initNoiseSigma: 1,
    head: [-0.588211178779602, -0.5099477171897888, 0.5445018410682678, 0.12933602929115295, 0.6687062382698059, -0.2943245768547058, -0.2628374993801117, -0.5582423806190491],
    sum: -21.67177574584639,
    sumsq: 54.12421094477058,
  },
  {
    id: 'euler_cosine_karras_10',
    scheduler: 'EulerDiscreteScheduler',
    config: { ...COSINE, use_karras_sigmas: true },
    steps: 10,
    timesteps: [999, 998.7909545898438, 998.5578002929688, 998.2943115234375, 997.9572143554688, 995.4381713867188, 983.2861328125, 894.6807250976562, 259.2021789550781, 0],
    sigmas: { count: 11, first: 20291.302734375, last: [0.006427108775824308, 0] },
    initNoiseSigma: 20291.302734375,
    head: [-31663.36328125, -102392.59375, 18836.181640625, -173163.34375, -1227.0203857421875, 111696.9765625, -22095.943359375, -97046.2265625],
    sum: -5587310.828063965,
    sumsq: 8071642529491.542,
  },
  {
    id: 'dpmpp_2m_cosine_karras_10',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...COSINE, use_karras_sigmas: true },
    steps: 10,
    timesteps: [999, 998, 998, 998, 997, 995, 983, 894, 259, 0],
    sigmas: { count: 11, first: 20291.302734375, last: [0.006427108775824308, 0] },
    initNoiseSigma: 1,
    head: [-94589.5390625, -306181.96875, 56484.09765625, -517898.71875, -3536.661865234375, 334285, -65967.8046875, -290187.90625],
    sum: -16680584.466308594,
    sumsq: 72233299389069.47,
  },
  {
    id: 'ddim_linear_defaults_15',
    scheduler: 'DDIMScheduler',
    config: {},
    steps: 15,
    timesteps: [924, 858, 792, 726, 660, 594, 528, 462, 396, 330, 264, 198, 132, 66, 0],
    sigmas: null,
    initNoiseSigma: 1,
    head: [0.0008257335284724832, -0.10362651199102402, -0.0444517657160759, -0.11969060450792313, 0.01979527622461319, 0.14863698184490204, 0.014954773709177971, -0.09573099762201309],
    sum: 3.4646533015184104,
    sumsq: 6.952138005930063,
  },
  {
    id: 'euler_a_linear_defaults_15',
    scheduler: 'EulerAncestralDiscreteScheduler',
    config: {},
    steps: 15,
    timesteps: [999, 927.6428833007812, 856.2857055664062, 784.9285888671875, 713.5714111328125, 642.2142944335938, 570.8571166992188, 499.5, 428.1428527832031, 356.78570556640625, 285.4285583496094, 214.07142639160156, 142.7142791748047, 71.35713958740234, 0],
    sigmas: { count: 16, first: 157.40725708007812, last: [0.010001329705119133, 0] },
    initNoiseSigma: 157.40725708007812,
    head: [-179.23828125, -85.59223937988281, -3.2947521209716797, -453.5372314453125, -157.31288146972656, 99.48162841796875, -74.57176208496094, -15.223559379577637],
    sum: -14473.991151332855,
    sumsq: 45117537.612814896,
  },
  {
    id: 'ddim_sample_pred_linspace_8',
    scheduler: 'DDIMScheduler',
    config: { ...SD15, prediction_type: 'sample', timestep_spacing: 'linspace' },
    steps: 8,
    timesteps: [999, 856, 714, 571, 428, 285, 143, 0],
    sigmas: null,
    initNoiseSigma: 1,
    head: [-0.01896866410970688, -0.12946544587612152, 0.05992431938648224, -0.24002709984779358, 0.0285805594176054, 0.2049962282180786, -0.004021935164928436, -0.12111307680606842],
    sum: -0.9214283358305693,
    sumsq: 19.405573451544868,
  },
  {
    id: 'euler_sample_pred_8',
    scheduler: 'EulerDiscreteScheduler',
    config: { ...SD15, prediction_type: 'sample' },
    steps: 8,
    timesteps: [999, 856.2857055664062, 713.5714111328125, 570.8571166992188, 428.1428527832031, 285.4285583496094, 142.7142791748047, 0],
    sigmas: { count: 9, first: 14.614645004272461, last: [0.029167532920837402, 0] },
    initNoiseSigma: 14.614645004272461,
    head: [-0.00020770648552570492, -0.03684278950095177, 0.02594916708767414, -0.07349938154220581, 0.015557177364826202, 0.07404757291078568, 0.004747859667986631, -0.03407356142997742],
    sum: 1.2513214922946645,
    sumsq: 2.138901741973887,
  },
  {
    id: 'euler_log_linear_sigma_min_12',
    scheduler: 'EulerDiscreteScheduler',
    config: { ...SD15, interpolation_type: 'log_linear', final_sigmas_type: 'sigma_min' },
    steps: 12,
    timesteps: [999, 908.1818237304688, 817.3636474609375, 726.5454711914062, 635.727294921875, 544.9091186523438, 454.0909118652344, 363.2727355957031, 272.4545593261719, 181.63636779785156, 90.81818389892578, 0],
    sigmas: { count: 14, first: 14.614643096923828, last: [0.0291675366461277, 0.029167532920837402] },
    initNoiseSigma: 14.614643096923828,
    head: [-3.7497894763946533, -14.840678215026855, 4.168929576873779, -25.938081741333008, 1.022864818572998, 18.730220794677734, -2.2495436668395996, -14.002324104309082],
    sum: -565.0239837020636,
    sumsq: 196719.4745676052,
  },
  {
    id: 'euler_continuous_vpred_exponential_12',
    scheduler: 'EulerDiscreteScheduler',
    config: { ...SD15, prediction_type: 'v_prediction', timestep_type: 'continuous', use_exponential_sigmas: true },
    steps: 12,
    timesteps: [0.6705060005187988, 0.5292168855667114, 0.38792768120765686, 0.24663853645324707, 0.10534936934709549, -0.035939790308475494, -0.17722895741462708, -0.31851813197135925, -0.45980727672576904, -0.6010964512825012, -0.7423856258392334, -0.8836747407913208],
    sigmas: { count: 13, first: 14.614645004272461, last: [0.029167532920837402, 0] },
    initNoiseSigma: 14.614645004272461,
    head: [-0.04334666579961777, -0.1930571049451828, 0.06354423612356186, -0.3428554832935333, 0.021077049896121025, 0.2600998878479004, -0.02309558168053627, -0.18174059689044952],
    sum: -5.765886700246483,
    sumsq: 35.74683737055019,
  },
  {
    id: 'euler_karras_sigma_range_12',
    scheduler: 'EulerDiscreteScheduler',
    config: { ...SD15, use_karras_sigmas: true, sigma_min: 0.1, sigma_max: 10.0 },
    steps: 12,
    timesteps: [933.5067138671875, 874.2734985351562, 806.3445434570312, 727.4275512695312, 634.8885498046875, 526.7474365234375, 404.5159606933594, 277.57049560546875, 163.69754028320312, 80.19847106933594, 32.08442306518555, 10.38216781616211],
    sigmas: { count: 13, first: 10, last: [0.10000000149011612, 0] },
    initNoiseSigma: 10,
    head: [-1.2162362337112427, -6.191948890686035, 2.336345672607422, -11.170585632324219, 0.9249239563941956, 8.868987083435059, -0.5431792140007019, -5.815837860107422],
    sum: -134.1821961218957,
    sumsq: 39412.98532752023,
  },
  {
    id: 'dpm_sde_2_trailing_16',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, algorithm_type: 'sde-dpmsolver++', timestep_spacing: 'trailing' },
    steps: 16,
    timesteps: [999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61],
    sigmas: { count: 17, first: 14.614645004272461, last: [0.25313183665275574, 0] },
    initNoiseSigma: 1,
    head: [-16.25707244873047, 8.459416389465332, -1.0531178712844849, -45.63936233520508, -24.311172485351562, 0.001130721066147089, -6.8764729499816895, 10.620466232299805],
    sum: -1255.7016731775366,
    sumsq: 342394.5875998517,
  },
  {
    id: 'dpm_sde_3_heun_10',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, algorithm_type: 'sde-dpmsolver++', solver_order: 3, solver_type: 'heun' },
    steps: 10,
    timesteps: [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
    sigmas: { count: 11, first: 14.614645004272461, last: [0.34393182396888733, 0] },
    initNoiseSigma: 1,
    head: [-19.341907501220703, -0.5144606232643127, -1.7745391130447388, -40.950347900390625, -18.43799591064453, 2.38017201423645, -7.2823309898376465, 6.608139991760254],
    sum: -1187.0094482302666,
    sumsq: 327184.2083361104,
  },
  {
    id: 'dpm_3_linspace_25',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, solver_order: 3 },
    steps: 25,
    timesteps: [999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519, 480, 440, 400, 360, 320, 280, 240, 200, 160, 120, 80, 40],
    sigmas: { count: 26, first: 14.614645004272461, last: [0.1990589052438736, 0] },
    initNoiseSigma: 1,
    head: [-2.5806095600128174, -11.076972961425781, 3.4856598377227783, -19.578327178955078, 1.0755627155303955, 14.640583038330078, -1.4313201904296875, -10.434735298156738],
    sum: -358.09940369427204,
    sumsq: 115215.562285248,
  },
  {
    id: 'dpm_2_heun_lu_18',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, solver_type: 'heun', use_lu_lambdas: true },
    steps: 18,
    timesteps: [999, 936, 867, 790, 704, 608, 502, 391, 283, 188, 115, 65, 34, 17, 8, 3, 1, 0],
    sigmas: { count: 19, first: 14.614643096923828, last: [0.0291675366461277, 0] },
    initNoiseSigma: 1,
    head: [-2.5432450771331787, -10.961013793945312, 3.466909885406494, -19.383731842041016, 1.0791070461273193, 14.51863956451416, -1.404586911201477, -10.32472038269043],
    sum: -351.3325598835945,
    sumsq: 113084.3630967766,
  },
  {
    id: 'dpm_exponential_euler_at_final_16',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, use_exponential_sigmas: true, euler_at_final: true, final_sigmas_type: 'sigma_min' },
    steps: 16,
    timesteps: [999, 927, 846, 756, 653, 538, 413, 289, 182, 102, 52, 24, 10, 4, 1, 0],
    sigmas: { count: 17, first: 14.614645004272461, last: [0.029167532920837402, 0.029167532920837402] },
    initNoiseSigma: 1,
    head: [-2.5903751850128174, -11.037710189819336, 3.440890312194824, -19.490001678466797, 1.0447006225585938, 14.531445503234863, -1.4477168321609497, -10.399182319641113],
    sum: -362.3449046462774,
    sumsq: 113907.43109940212,
  },
  {
    id: 'dpmsolver_sigma_min_3_12',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, algorithm_type: 'dpmsolver', final_sigmas_type: 'sigma_min', solver_order: 3 },
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 583, 500, 416, 333, 250, 166, 83],
    sigmas: { count: 13, first: 14.614645004272461, last: [0.30520182847976685, 0.029167532920837402] },
    initNoiseSigma: 1,
    head: [-2.6369619369506836, -10.770305633544922, 3.170119524002075, -18.908432006835938, 0.8629968166351318, 13.848431587219238, -1.5367772579193115, -10.155513763427734],
    sum: -385.45163225661963,
    sumsq: 105701.77561197874,
  },
  {
    id: 'dpmsolver_heun_vpred_12',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, algorithm_type: 'dpmsolver', final_sigmas_type: 'sigma_min', solver_type: 'heun', prediction_type: 'v_prediction' },
    steps: 12,
    timesteps: [999, 916, 832, 749, 666, 583, 500, 416, 333, 250, 166, 83],
    sigmas: { count: 13, first: 14.614645004272461, last: [0.30520182847976685, 0.029167532920837402] },
    initNoiseSigma: 1,
    head: [-0.10816861689090729, -0.41419416666030884, 0.11032877117395401, -0.7203993797302246, 0.02352091670036316, 0.5121115446090698, -0.06677304208278656, -0.3910618722438812],
    sum: -16.794269770383835,
    sumsq: 149.92402981900273,
  },
  {
    id: 'dpm_lambda_clipped_leading_20',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, lambda_min_clipped: -2.5, timestep_spacing: 'leading' },
    steps: 20,
    timesteps: [921, 875, 829, 783, 737, 691, 645, 599, 553, 507, 461, 415, 369, 323, 277, 231, 185, 139, 93, 47],
    sigmas: { count: 21, first: 9.338079452514648, last: [0.21780167520046234, 0] },
    initNoiseSigma: 1,
    head: [-1.0465197563171387, -5.409121513366699, 2.0683090686798096, -9.774279594421387, 0.8308043479919434, 7.795990943908691, -0.4563974440097809, -5.079354286193848],
    sum: -112.56631199177355,
    sumsq: 30293.80235988769,
  },
  {
    id: 'dpm_sample_pred_1_10',
    scheduler: 'DPMSolverMultistepScheduler',
    config: { ...SD15, prediction_type: 'sample', solver_order: 1 },
    steps: 10,
    timesteps: [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
    sigmas: { count: 11, first: 14.614645004272461, last: [0.34393182396888733, 0] },
    initNoiseSigma: 1,
    head: [0.05921892076730728, -0.007815832272171974, 0.10708069056272507, -0.07488997280597687, 0.08806546032428741, 0.19509100914001465, 0.06828660517930984, -0.0027487229090183973],
    sum: 17.547004907377413,
    sumsq: 8.343624913705156,
  },
];

function schedulerOfClass(className: SchedulerClassName, config: Record<string, unknown>, steps: number): Scheduler {
  switch (className) {
    case 'DDIMScheduler':
      return new DdimScheduler(resolveSchedulerConfig(className, config), steps);
    case 'EulerDiscreteScheduler':
      return new EulerScheduler(resolveSchedulerConfig(className, config), steps);
    case 'EulerAncestralDiscreteScheduler':
      return new EulerAncestralScheduler(resolveSchedulerConfig(className, config), steps);
    case 'DPMSolverMultistepScheduler':
      return new DpmSolverScheduler(resolveSchedulerConfig(className, config), steps);
  }
}

for (const c of REFERENCE_CASES) {
  test(`diffusers reference ${c.id}`, () => {
    const scheduler = schedulerOfClass(c.scheduler, c.config, c.steps);
    // Unrounded timesteps near 0 may differ by ~1e-6 absolute (NumPy's float32 log is not correctly rounded).
    assertRelativelyClose(scheduler.timesteps, c.timesteps, 1e-6, 'timesteps', 1e-5);
    if (c.sigmas) {
      const sigmas = scheduler.sigmas!;
      assert.equal(sigmas.length, c.sigmas.count);
      assertRelativelyClose([sigmas[0], ...sigmas.slice(-2)], [c.sigmas.first, ...c.sigmas.last], 1e-6, 'sigmas');
    } else {
      assert.equal(scheduler.sigmas, undefined);
    }
    assertRelativelyClose([scheduler.initNoiseSigma], [c.initNoiseSigma], 1e-6, 'initNoiseSigma');
    const { final } = runTrajectory(scheduler);
    assertTrajectoryClose(final.subarray(0, 8), c.head, 'head');
    assert.ok(Math.abs(sum(final) - c.sum) <= sumTolerance(c.sumsq), `sum ${sum(final)} vs ${c.sum}`);
    const rms = Math.sqrt(c.sumsq / LATENT_SIZE);
    const sumsqTolerance = 2 * Math.sqrt(c.sumsq * LATENT_SIZE) * (1e-3 + 1e-5 * rms) + sumTolerance(c.sumsq) ** 2 / LATENT_SIZE;
    assert.ok(Math.abs(sumOfSquares(final) - c.sumsq) <= sumsqTolerance, `sumsq ${sumOfSquares(final)} vs ${c.sumsq}`);
  });
}

// --- numeric building blocks ------------------------------------------------------------------

test('NumPy-style rounding, arange and torch linspace details', () => {
  assert.deepEqual([0.5, 1.5, 2.5, -1.5, 166.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, -2, 166, 2, 3]);
  // np.arange(1000, 0, -1000/61) has 62 elements (the last rounds to 0); "trailing" keeps 61 timesteps.
  assert.equal(numpyArange(1000, 0, -1000 / 61).length, 62);
  const trailing61 = createScheduler('ddim', { ...SD15, timestep_spacing: 'trailing' }, 61);
  assert.equal(trailing61.timesteps.length, 61);
  assert.ok(trailing61.timesteps.every((t) => t >= 0));
  // torch.linspace(0.001, 0.5, n, dtype=torch.float32) on the CPU, as torch 1.13 returns it: n = 7 is
  // computed element by element, n = 17 in two 8-lane chunks plus one element.
  assert.deepEqual(Array.from(torchLinspaceFloat32(0.001, 0.5, 7)), [
    0.0010000000474974513, 0.08416666835546494, 0.16733333468437195, 0.25049999356269836, 0.33366668224334717,
    0.4168333411216736, 0.5,
  ]);
  assert.deepEqual(Array.from(torchLinspaceFloat32(0.001, 0.5, 17)), [
    0.0010000000474974513, 0.03218749910593033, 0.06337500363588333, 0.09456250071525574, 0.12575000524520874,
    0.15693750977516174, 0.18812499940395355, 0.21931250393390656, 0.25049999356269836, 0.28168749809265137,
    0.31287500262260437, 0.3440625071525574, 0.375249981880188, 0.4064375162124634, 0.437624990940094,
    0.468812495470047, 0.5,
  ]);
});

// --- config handling --------------------------------------------------------------------------

test('an old config without timestep_spacing gets each class default, as in diffusers', () => {
  assert.equal(createScheduler('ddim', SD15, 20).timesteps[0], 951, 'DDIM: leading');
  assert.equal(resolveConfigFor('ddim', SD15).timestep_spacing, 'leading');
  const euler = createScheduler('euler', SD15, 20);
  assert.equal(euler.timesteps[0], 999, 'Euler: linspace');
  assert.equal(euler.timesteps[1], Math.fround(946.4210815429688));
  assert.equal(resolveConfigFor('euler_a', SD15).timestep_spacing, 'linspace');
  assert.deepEqual(createScheduler('dpmpp_2m', SD15, 20).timesteps.slice(0, 3), [999, 949, 899], 'DPM-Solver: linspace');
  // Class defaults for keys the file lacks: DDIM clips x̂₀ and sets ᾱ_prev = 1 at the end unless told otherwise.
  const bare = resolveConfigFor('ddim', {});
  assert.equal(bare.clip_sample, true);
  assert.equal(bare.set_alpha_to_one, true);
  assert.equal(bare.beta_schedule, 'linear');
  assert.equal(bare.steps_offset, 0);
  const dpm = resolveConfigFor('dpmpp_2m', { ...SD15, algorithm_type: 'sde-dpmsolver++', solver_order: 3 });
  assert.equal(dpm.algorithm_type, 'dpmsolver++', 'dpmpp_2m means DPM-Solver++ 2M');
  assert.equal(dpm.solver_order, 2);
  assert.equal(dpm.lower_order_final, true);
});

test('_use_default_values, unknown keys and options behave like from_config(..., **kwargs)', () => {
  const withUsedDefault = { ...SD15, timestep_spacing: 'trailing', _use_default_values: ['timestep_spacing'] };
  assert.equal(createScheduler('ddim', withUsedDefault, 20).timesteps[0], 951);
  assert.equal(createScheduler('ddim', { ...SD15, some_future_key: 3 }, 20).timesteps[0], 951);
  assert.equal(createScheduler('ddim', SD15, 20, { timestepSpacing: 'trailing' }).timesteps[0], 999);
  const karrasGolden = golden.cases.find((c) => c.id === 'euler_linspace_karras_20')!;
  assertRelativelyClose(createScheduler('euler', SD15, 20, { karras: true }).timesteps, karrasGolden.timesteps, 1e-6, 'karras option');
  assert.equal(createScheduler('euler', { ...SD15, use_karras_sigmas: true }, 20, { karras: false }).timesteps[1], Math.fround(946.4210815429688));
  // Euler ancestral has no Karras option in diffusers; here it takes the Euler Karras grid.
  const ancestralKarras = createScheduler('euler_a', SD15, 20, { karras: true });
  assertRelativelyClose(ancestralKarras.timesteps, karrasGolden.timesteps, 1e-6, 'euler_a karras timesteps');
  assertRelativelyClose(ancestralKarras.sigmas!, karrasGolden.sigmas!, 1e-6, 'euler_a karras sigmas');
  assert.ok(runTrajectory(ancestralKarras).final.every(Number.isFinite));
});

test('trained_betas replace the beta schedule', () => {
  const scheduler = createScheduler('ddim', { ...SD15, beta_schedule: 'linear', trained_betas: golden.train_schedule.betas }, 20);
  const reference = createScheduler('ddim', SD15, 20);
  const x = new TorchGenerator(5).randn(64);
  const eps = new TorchGenerator(6).randn(64);
  assert.deepEqual(scheduler.step(eps, 3, x), reference.step(eps, 3, x));
});

function engineError(fn: () => unknown): EngineError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof EngineError, `expected an EngineError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected an error');
}

test('bad configs and options fail with clear engine errors', () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ ...SD15, beta_schedule: 'cosine' }, /beta_schedule/],
    [{ ...SD15, prediction_type: 'flow' }, /prediction_type/],
    [{ ...SD15, num_train_timesteps: '1000' }, /num_train_timesteps/],
    [{ ...SD15, thresholding: true }, /thresholding is not supported/],
    [{ ...SD15, trained_betas: [0.1, 0.2] }, /trained_betas has 2 values/],
  ];
  for (const [config, message] of cases) {
    const err = engineError(() => createScheduler('ddim', config, 20));
    assert.equal(err.code, 'bad_package');
    assert.match(err.message, message);
    assert.match(err.message, /DDIMScheduler/);
  }
  assert.match(engineError(() => createScheduler('euler', { ...SD15, use_beta_sigmas: true }, 20)).message, /use_beta_sigmas/);
  assert.match(engineError(() => createScheduler('dpmpp_2m', { ...SD15, variance_type: 'learned_range' }, 20)).message, /variance_type/);
  assert.match(engineError(() => createScheduler('ddim', [] as unknown as Record<string, unknown>, 20)).message, /JSON object/);
  assert.equal(engineError(() => createScheduler('ddim', SD15, 0)).code, 'bad_request');
  assert.equal(engineError(() => createScheduler('ddim', SD15, 1001)).code, 'bad_request');
  assert.equal(engineError(() => createScheduler('ddim', SD15, 20, { karras: true })).code, 'bad_request');
  assert.equal(engineError(() => createScheduler('euler', SD15, 20, { timestepSpacing: 'middle' })).code, 'bad_request');
});

// --- driving the schedulers -------------------------------------------------------------------

test('DPM-Solver is multistep: steps must come in order, and step 0 restarts cleanly', () => {
  const scheduler = createScheduler('dpmpp_2m', SD15, 10);
  const x = new TorchGenerator(1).randn(64);
  const first = runSteps(scheduler, x, 3);
  assert.throws(() => scheduler.step(fakeModel(x, 1), 5, x), /expected step 3/);
  assert.deepEqual(runSteps(scheduler, x, 3), first);
  // A second-order step depends on the previous output; a fresh scheduler's first step does not.
  const fresh = createScheduler('dpmpp_2m', SD15, 10);
  assert.notDeepEqual(fresh.step(fakeModel(x, fresh.timesteps[1]), 0, x), scheduler.step(fakeModel(x, scheduler.timesteps[3]), 3, x));
});

function runSteps(scheduler: Scheduler, start: Float32Array, count: number): Float32Array {
  let x = start;
  for (let i = 0; i < count; i++) x = scheduler.step(fakeModel(scheduler.scaleModelInput(x, i), scheduler.timesteps[i]), i, x);
  return x;
}

test('ancestral samplers need and consume noise each step; others never ask for it', () => {
  const ancestral = createScheduler('euler_a', SD15, 5);
  assert.equal(ancestral.usesNoise, true);
  const x = new TorchGenerator(2).randn(64);
  assert.throws(() => ancestral.step(fakeModel(x, 999), 0, x), /noise source/);
  assert.throws(() => ancestral.step(fakeModel(x, 999), 0, x, () => new Float32Array(3)), /noise has 3 values/);
  for (const name of ['ddim', 'euler', 'dpmpp_2m'] as const) {
    const scheduler = createScheduler(name, SD15, 5);
    assert.equal(scheduler.usesNoise, false);
    let calls = 0;
    scheduler.step(fakeModel(x, scheduler.timesteps[0]), 0, x, () => {
      calls++;
      return new Float32Array(64);
    });
    assert.equal(calls, 0, name);
  }
  assert.throws(() => createScheduler('euler', SD15, 5).step(new Float32Array(3), 0, x), /model output has 3 values/);
  assert.throws(() => createScheduler('euler', SD15, 5).scaleModelInput(x, 5), /outside 0\.\.4/);
});

test('a batch of images steps exactly like each image alone', () => {
  const a = new TorchGenerator(10).randn(64);
  const b = new TorchGenerator(11).randn(64);
  const batch = new Float32Array([...a, ...b]);
  for (const name of ['ddim', 'euler', 'dpmpp_2m'] as const) {
    const together = runSteps(createScheduler(name, SD15, 6), batch, 6);
    assert.deepEqual(together.subarray(0, 64), runSteps(createScheduler(name, SD15, 6), a, 6), name);
    assert.deepEqual(together.subarray(64), runSteps(createScheduler(name, SD15, 6), b, 6), name);
  }
});
