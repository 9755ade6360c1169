// Which training timesteps the sampler visits (diffusers' `timestep_spacing`), descending.
// Values are float64 here; each scheduler casts them (int64 for DDIM/DPM-Solver, float32 for Euler).
import type { TimestepSpacing } from './config.ts';
import { numpyArange, numpyLinspace, roundHalfEven } from './numeric.ts';

export interface SpacingInput {
  spacing: TimestepSpacing;
  numTrainTimesteps: number;
  steps: number;
  stepsOffset: number;
}

/**
 * NumPy's `arange(start, 0, -ratio).round() - 1`, as "trailing" spacing computes it. For some step
 * counts (61, 103, …) floating-point error makes NumPy return one extra element, -1, that diffusers
 * would then sample at; it is dropped here so that there are never more than `steps` timesteps.
 */
function trailing(start: number, ratio: number, steps: number): number[] {
  return numpyArange(start, 0, -ratio)
    .map((t) => roundHalfEven(t) - 1)
    .filter((t) => t >= 0)
    .slice(0, steps);
}

/**
 * DDIM, Euler and Euler ancestral: `steps` timesteps. "linspace" is not rounded for Euler-type
 * schedulers (`roundLinspace` false), which then get fractional timesteps.
 */
export function spacedTimesteps({ spacing, numTrainTimesteps, steps, stepsOffset }: SpacingInput, roundLinspace: boolean): number[] {
  switch (spacing) {
    case 'linspace': {
      const grid = numpyLinspace(0, numTrainTimesteps - 1, steps);
      return (roundLinspace ? grid.map(roundHalfEven) : grid).reverse();
    }
    case 'leading': {
      const ratio = Math.floor(numTrainTimesteps / steps);
      return Array.from({ length: steps }, (_, i) => (steps - 1 - i) * ratio + stepsOffset);
    }
    case 'trailing':
      return trailing(numTrainTimesteps, numTrainTimesteps / steps, steps);
  }
}

/**
 * DPM-Solver's variant: grids of steps + 1 points whose last (lowest) point is dropped, up to
 * `lastTimestep` (the training length, or less when lambda_min_clipped cuts the noisy end).
 */
export function dpmSolverTimesteps({ spacing, numTrainTimesteps, steps, stepsOffset }: SpacingInput, lastTimestep: number): number[] {
  switch (spacing) {
    case 'linspace':
      return numpyLinspace(0, lastTimestep - 1, steps + 1).map(roundHalfEven).reverse().slice(0, steps);
    case 'leading': {
      const ratio = Math.floor(lastTimestep / (steps + 1));
      return Array.from({ length: steps }, (_, i) => (steps - i) * ratio + stepsOffset);
    }
    case 'trailing':
      return trailing(lastTimestep, numTrainTimesteps / steps, steps);
  }
}
