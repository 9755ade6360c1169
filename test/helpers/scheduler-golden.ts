// The golden diffusers trajectories (test/fixtures/golden/scheduler_golden.json) and the engine's
// name for each diffusers scheduler class in it; each test file types the case fields it reads.
import { readFileSync } from 'node:fs';
import type { SchedulerName } from '../../src/engine/api.ts';

export const ENGINE_NAME: Record<string, SchedulerName> = {
  DDIMScheduler: 'ddim',
  EulerDiscreteScheduler: 'euler',
  EulerAncestralDiscreteScheduler: 'euler_a',
  DPMSolverMultistepScheduler: 'dpmpp_2m',
};

export function readSchedulerGolden<Case>(): { train_schedule: { betas: number[]; alphas_cumprod: number[] }; cases: Case[] } {
  return JSON.parse(readFileSync(new URL('../fixtures/golden/scheduler_golden.json', import.meta.url), 'utf8'));
}
