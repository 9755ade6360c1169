// Progress events after each denoising step, with a preview of image 0 now and then.
import type { ProgressEvent, RgbImage } from '../api.ts';

/** Image 0's current latents `[channels, height, width]` → a picture of what is being drawn. */
export type PreviewRenderer = (latents: Float32Array) => RgbImage;

/**
 * A preview every ⌊steps / 5⌋ steps (four in a 20-step run, one each step under 10 steps); none at
 * the last step, since the final image follows at once.
 */
const PREVIEWS_PER_RUN = 5;

export class ProgressReporter {
  private readonly previewEvery: number;

  constructor(
    private readonly onProgress: (event: ProgressEvent) => void,
    private readonly totalSteps: number,
    private readonly preview: { render: PreviewRenderer; perImage: number } | undefined,
  ) {
    this.previewEvery = Math.max(1, Math.floor(totalSteps / PREVIEWS_PER_RUN));
  }

  /** After step `step` (0-based) produced `latents` (the whole batch). */
  stepDone(step: number, latents: Float32Array): void {
    const done = step + 1;
    const event: ProgressEvent = { step: done, steps: this.totalSteps };
    if (this.preview && done < this.totalSteps && done % this.previewEvery === 0) {
      event.preview = this.preview.render(latents.subarray(0, this.preview.perImage));
    }
    this.onProgress(event);
  }
}
