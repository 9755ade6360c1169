// Classifier-free guidance: the model sees every latent twice, once with the negative prompt and once
// with the prompt, and the two predictions are extrapolated from the first towards the second.
export class ClassifierFreeGuidance {
  /** At a scale of 1 or less the unconditional half would not change the result, so it is not run. */
  readonly enabled: boolean;

  constructor(
    readonly scale: number,
    readonly batch: number,
  ) {
    this.enabled = scale > 1;
  }

  /** Rows of the model batch: [uncond × B; cond × B] when guided, cond × B otherwise. */
  get rows(): number {
    return this.enabled ? 2 * this.batch : this.batch;
  }

  /** The first model-batch row conditioned on the prompt. */
  get firstPromptRow(): number {
    return this.enabled ? this.batch : 0;
  }

  /** The model input for one step: the latents, twice when guided. */
  modelInput(latents: Float32Array): Float32Array {
    if (!this.enabled) return latents;
    const out = new Float32Array(2 * latents.length);
    out.set(latents, 0);
    out.set(latents, latents.length);
    return out;
  }

  /** [uncond; cond] → uncond + g·(cond − uncond); unguided predictions pass through. */
  combine(prediction: Float32Array): Float32Array {
    if (!this.enabled) return prediction;
    const half = prediction.length / 2;
    const out = new Float32Array(half);
    for (let i = 0; i < half; i++) {
      const u = prediction[i];
      out[i] = u + this.scale * (prediction[half + i] - u);
    }
    return out;
  }
}
