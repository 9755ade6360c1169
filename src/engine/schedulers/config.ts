// diffusers scheduler configs (scheduler_config.json) → validated objects with each class's defaults.
// Like diffusers' from_config: keys a class does not take are ignored, missing keys get that class's
// __init__ default (so an old SD1.x config without `timestep_spacing` means "leading" for DDIM but
// "linspace" for Euler and DPM-Solver), and keys listed in `_use_default_values` are treated as missing.
import { z } from 'zod';
import { EngineError } from '../api.ts';

export const TIMESTEP_SPACINGS = ['leading', 'linspace', 'trailing'] as const;
export type TimestepSpacing = (typeof TIMESTEP_SPACINGS)[number];

const spacing = (classDefault: TimestepSpacing) => z.enum(TIMESTEP_SPACINGS).default(classDefault);
const flag = (classDefault: boolean) => z.boolean().default(classDefault);
const optionalNumber = z.number().nullable().default(null);

/** The keys every supported class shares: the training noise schedule. */
const trainingKeys = {
  num_train_timesteps: z.number().int().min(2).default(1000),
  beta_start: z.number().nonnegative().default(0.0001),
  beta_end: z.number().nonnegative().default(0.02),
  beta_schedule: z.enum(['linear', 'scaled_linear', 'squaredcos_cap_v2']).default('linear'),
  trained_betas: z.array(z.number().min(0).max(1)).nullable().default(null),
  steps_offset: z.number().int().nonnegative().default(0),
  rescale_betas_zero_snr: flag(false),
};

const unsupported = (what: string) => z.literal(false, { message: `${what} is not supported by this engine` }).default(false);

export const ddimConfigSchema = z.object({
  ...trainingKeys,
  prediction_type: z.enum(['epsilon', 'v_prediction', 'sample']).default('epsilon'),
  clip_sample: flag(true),
  clip_sample_range: z.number().positive().default(1.0),
  set_alpha_to_one: flag(true),
  thresholding: unsupported('thresholding'),
  dynamic_thresholding_ratio: z.number().default(0.995),
  sample_max_value: z.number().default(1.0),
  timestep_spacing: spacing('leading'),
});

export const eulerConfigSchema = z.object({
  ...trainingKeys,
  prediction_type: z.enum(['epsilon', 'v_prediction', 'sample', 'original_sample']).default('epsilon'),
  interpolation_type: z.enum(['linear', 'log_linear']).default('linear'),
  use_karras_sigmas: z.boolean().nullable().default(false).transform((v) => v ?? false),
  use_exponential_sigmas: z.boolean().nullable().default(false).transform((v) => v ?? false),
  use_beta_sigmas: unsupported('use_beta_sigmas'),
  sigma_min: optionalNumber,
  sigma_max: optionalNumber,
  timestep_spacing: spacing('linspace'),
  timestep_type: z.enum(['discrete', 'continuous']).default('discrete'),
  final_sigmas_type: z.enum(['zero', 'sigma_min']).default('zero'),
});

export const eulerAncestralConfigSchema = z.object({
  ...trainingKeys,
  prediction_type: z.enum(['epsilon', 'v_prediction']).default('epsilon'),
  timestep_spacing: spacing('linspace'),
});

const ALGORITHM_ALIASES: Record<string, string> = { deis: 'dpmsolver++' };
const SOLVER_TYPE_ALIASES: Record<string, string> = { logrho: 'midpoint', bh1: 'midpoint', bh2: 'midpoint' };

export const dpmSolverConfigSchema = z
  .object({
    ...trainingKeys,
    solver_order: z.union([z.literal(1), z.literal(2), z.literal(3)]).default(2),
    prediction_type: z.enum(['epsilon', 'v_prediction', 'sample']).default('epsilon'),
    thresholding: unsupported('thresholding'),
    dynamic_thresholding_ratio: z.number().default(0.995),
    sample_max_value: z.number().default(1.0),
    algorithm_type: z
      .string()
      .default('dpmsolver++')
      .transform((v) => ALGORITHM_ALIASES[v] ?? v)
      .pipe(z.enum(['dpmsolver++', 'sde-dpmsolver++', 'dpmsolver'])),
    solver_type: z
      .string()
      .default('midpoint')
      .transform((v) => SOLVER_TYPE_ALIASES[v] ?? v)
      .pipe(z.enum(['midpoint', 'heun'])),
    lower_order_final: flag(true),
    euler_at_final: flag(false),
    use_karras_sigmas: flag(false),
    use_exponential_sigmas: flag(false),
    use_beta_sigmas: unsupported('use_beta_sigmas'),
    use_lu_lambdas: flag(false),
    use_flow_sigmas: unsupported('use_flow_sigmas'),
    flow_shift: z.number().default(1.0),
    final_sigmas_type: z.enum(['zero', 'sigma_min']).default('zero'),
    lambda_min_clipped: z.number().default(-Infinity),
    variance_type: z.null({ message: 'variance_type "learned"/"learned_range" is not supported by this engine' }).default(null),
    timestep_spacing: spacing('linspace'),
    use_dynamic_shifting: unsupported('use_dynamic_shifting'),
  })
  .superRefine((config, ctx) => {
    if (config.algorithm_type === 'dpmsolver' && config.final_sigmas_type === 'zero') {
      ctx.addIssue({
        code: 'custom',
        path: ['final_sigmas_type'],
        message: 'final_sigmas_type "zero" needs algorithm_type dpmsolver++ or sde-dpmsolver++; use "sigma_min"',
      });
    }
  });

export type DdimConfig = z.infer<typeof ddimConfigSchema>;
export type EulerConfig = z.infer<typeof eulerConfigSchema>;
export type EulerAncestralConfig = z.infer<typeof eulerAncestralConfigSchema>;
export type DpmSolverConfig = z.infer<typeof dpmSolverConfigSchema>;
/** What the training noise schedule is built from (every class has these keys). */
export type TrainingScheduleConfig = Pick<
  DdimConfig,
  'num_train_timesteps' | 'beta_start' | 'beta_end' | 'beta_schedule' | 'trained_betas' | 'rescale_betas_zero_snr'
>;

export const SCHEDULER_CONFIG_SCHEMAS = {
  DDIMScheduler: ddimConfigSchema,
  EulerDiscreteScheduler: eulerConfigSchema,
  EulerAncestralDiscreteScheduler: eulerAncestralConfigSchema,
  DPMSolverMultistepScheduler: dpmSolverConfigSchema,
} as const;
export type SchedulerClassName = keyof typeof SCHEDULER_CONFIG_SCHEMAS;
export type SchedulerConfigOf<C extends SchedulerClassName> = z.infer<(typeof SCHEDULER_CONFIG_SCHEMAS)[C]>;

/** Drops what diffusers' from_config drops before calling __init__: private keys and `_use_default_values`. */
function initKeys(raw: Record<string, unknown>): Record<string, unknown> {
  const usedDefaults = Array.isArray(raw._use_default_values) ? new Set(raw._use_default_values) : new Set();
  return Object.fromEntries(Object.entries(raw).filter(([key]) => !key.startsWith('_') && !usedDefaults.has(key)));
}

/**
 * Validates a scheduler_config.json object for a diffusers scheduler class and fills in that class's
 * defaults. `overrides` win over the file (like keyword arguments to from_config). Throws an
 * EngineError('bad_package') naming every bad key.
 */
export function resolveSchedulerConfig<C extends SchedulerClassName>(
  className: C,
  raw: unknown,
  overrides: Record<string, unknown> = {},
): SchedulerConfigOf<C> {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new EngineError('bad_package', 'The scheduler config must be a JSON object.');
  }
  const input = { ...initKeys(raw as Record<string, unknown>), ...overrides };
  const result = SCHEDULER_CONFIG_SCHEMAS[className].safeParse(input);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => `${issue.path.join('.') || '(config)'}: ${issue.message}`);
    throw new EngineError('bad_package', `Invalid scheduler config for ${className}: ${problems.join('; ')}`);
  }
  const config = result.data as SchedulerConfigOf<C>;
  if (config.trained_betas !== null && config.trained_betas.length !== config.num_train_timesteps) {
    throw new EngineError(
      'bad_package',
      `Invalid scheduler config for ${className}: trained_betas has ${config.trained_betas.length} values, num_train_timesteps is ${config.num_train_timesteps}`,
    );
  }
  return config;
}
