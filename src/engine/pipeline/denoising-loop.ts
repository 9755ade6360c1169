// The denoising loop: at each of the scheduler's timesteps the denoiser predicts (with classifier-free
// guidance) and the scheduler steps the latents; contributions and progress are collected on the way.
import type { Conditioning, Denoiser } from '../denoisers.ts';
import type { NoiseSource, Scheduler } from '../schedulers/index.ts';
import type { Cancellation } from './cancellation.ts';
import type { ContributionAccumulator } from './contributions.ts';
import type { ClassifierFreeGuidance } from './guidance.ts';
import type { LatentShape } from './latents.ts';
import type { ProgressReporter } from './progress.ts';

export interface DenoisingLoop {
  denoiser: Denoiser;
  scheduler: Scheduler;
  guidance: ClassifierFreeGuidance;
  /** Each expert's text conditioning with one row per model-batch row (see repeatForBatch). */
  text: Map<string, Conditioning>;
  shape: LatentShape;
  /** Ancestral samplers' per-step noise. */
  noise: NoiseSource;
  contributions?: ContributionAccumulator;
  progress?: ProgressReporter;
  cancellation: Cancellation;
}

/** x_T → x_0: returns the denoised latents of the whole batch. */
export async function denoise(initialLatents: Float32Array, loop: DenoisingLoop): Promise<Float32Array> {
  const { denoiser, scheduler, guidance, shape, cancellation } = loop;
  let latents = initialLatents;
  for (let step = 0; step < scheduler.timesteps.length; step++) {
    cancellation.throwIfRequested();
    const input = guidance.modelInput(scheduler.scaleModelInput(latents, step));
    const dims = [guidance.rows, shape.channels, shape.height, shape.width];
    const out = await denoiser.predict({ data: input, dims }, scheduler.timesteps[step], loop.text);
    latents = scheduler.step(guidance.combine(out.prediction), step, latents, loop.noise);
    if (out.weights) loop.contributions?.add(out.weights, guidance.rows, guidance.firstPromptRow);
    loop.progress?.stepDone(step, latents);
  }
  cancellation.throwIfRequested();
  return latents;
}
