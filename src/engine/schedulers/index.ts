// Scheduler factory: the engine's sampler names → diffusers classes configured from scheduler_config.json.
import { EngineError, type SchedulerName } from '../api.ts';
import { type SchedulerClassName, type SchedulerConfigOf, TIMESTEP_SPACINGS, type TimestepSpacing, resolveSchedulerConfig } from './config.ts';
import { DdimScheduler } from './ddim.ts';
import { DpmSolverScheduler } from './dpm-solver.ts';
import { EulerAncestralScheduler } from './euler-ancestral.ts';
import { EulerScheduler } from './euler.ts';
import type { Scheduler } from './types.ts';

export type { NoiseSource, Scheduler } from './types.ts';
export { resolveSchedulerConfig, TIMESTEP_SPACINGS } from './config.ts';
export type { DdimConfig, DpmSolverConfig, EulerAncestralConfig, EulerConfig, SchedulerClassName, TimestepSpacing } from './config.ts';
export { buildTrainingSchedule, type TrainingSchedule } from './training-schedule.ts';
export { img2imgSteps, startingAt } from './begin-index.ts';
export { DdimScheduler, DpmSolverScheduler, EulerAncestralScheduler, EulerScheduler };

/** The diffusers class behind each engine sampler name. */
export const SCHEDULER_CLASSES = {
  ddim: 'DDIMScheduler',
  euler: 'EulerDiscreteScheduler',
  euler_a: 'EulerAncestralDiscreteScheduler',
  dpmpp_2m: 'DPMSolverMultistepScheduler',
} as const satisfies Record<SchedulerName, SchedulerClassName>;

/** Samplers for which `karras: true` means something (DDIM has no σ schedule to reshape). */
export const KARRAS_CAPABLE: readonly SchedulerName[] = ['euler', 'euler_a', 'dpmpp_2m'];

export interface SchedulerOptions {
  /** Karras σ spacing (diffusers' use_karras_sigmas); ignored when undefined. */
  karras?: boolean;
  /** Overrides the config's timestep_spacing ("leading", "linspace" or "trailing"). */
  timestepSpacing?: string;
}

/**
 * The diffusers config a sampler name resolves to: the package's scheduler_config.json read by that
 * class (its own defaults for missing keys) plus the engine's overrides. `dpmpp_2m` always means
 * algorithm dpmsolver++ with solver order 2, whatever DPM-Solver settings the file has.
 */
export function resolveConfigFor<N extends SchedulerName>(
  name: N,
  raw: Record<string, unknown>,
  options: SchedulerOptions = {},
): SchedulerConfigOf<(typeof SCHEDULER_CLASSES)[N]> {
  const className: SchedulerClassName | undefined = SCHEDULER_CLASSES[name];
  if (!className) throw new EngineError('bad_request', `Unknown scheduler "${String(name)}".`);
  const overrides: Record<string, unknown> = {};
  if (options.timestepSpacing !== undefined) {
    if (!(TIMESTEP_SPACINGS as readonly string[]).includes(options.timestepSpacing)) {
      throw new EngineError('bad_request', `Unknown timestep spacing "${options.timestepSpacing}" (use ${TIMESTEP_SPACINGS.join(', ')}).`);
    }
    overrides.timestep_spacing = options.timestepSpacing as TimestepSpacing;
  }
  if (options.karras !== undefined && (className === 'EulerDiscreteScheduler' || className === 'DPMSolverMultistepScheduler')) {
    overrides.use_karras_sigmas = options.karras;
    if (options.karras) overrides.use_exponential_sigmas = false;
  }
  if (name === 'dpmpp_2m') {
    overrides.algorithm_type = 'dpmsolver++';
    overrides.solver_order = 2;
  }
  return resolveSchedulerConfig(className, raw, overrides) as SchedulerConfigOf<(typeof SCHEDULER_CLASSES)[N]>;
}

/**
 * A scheduler for `steps` denoising steps, like diffusers'
 * `Class.from_config(config, **overrides).set_timesteps(steps)`.
 * Throws EngineError('bad_package') for an invalid config and ('bad_request') for bad options.
 */
export function createScheduler(
  name: SchedulerName,
  config: Record<string, unknown>,
  steps: number,
  options: SchedulerOptions = {},
): Scheduler {
  if (options.karras && !KARRAS_CAPABLE.includes(name)) {
    throw new EngineError('bad_request', `Karras sigmas do not apply to the ${name} scheduler.`);
  }
  const resolved = resolveConfigFor(name, config, options);
  if (!Number.isInteger(steps) || steps < 1 || steps > resolved.num_train_timesteps) {
    throw new EngineError('bad_request', `Steps must be a whole number from 1 to ${resolved.num_train_timesteps} (got ${steps}).`);
  }
  switch (name) {
    case 'ddim':
      return new DdimScheduler(resolved as SchedulerConfigOf<'DDIMScheduler'>, steps);
    case 'euler':
      return new EulerScheduler(resolved as SchedulerConfigOf<'EulerDiscreteScheduler'>, steps);
    case 'euler_a':
      return new EulerAncestralScheduler(resolved as SchedulerConfigOf<'EulerAncestralDiscreteScheduler'>, steps, options.karras ?? false);
    case 'dpmpp_2m':
      return new DpmSolverScheduler(resolved as SchedulerConfigOf<'DPMSolverMultistepScheduler'>, steps);
  }
}
