// Engine.generate, laid out like a diffusers pipeline's __call__: resolve the request, encode the
// prompt, prepare denoiser, scheduler and latents, denoise, decode. Each step is a helper in
// ./pipeline/ (previews: ./preview.ts); this file only wires them together.
import type { GenerateCallOptions, GenerateRequest, GenerateResult, GeneratedImage, PackageInfo, ProgressEvent } from './api.ts';
import { createDenoiser } from './denoisers.ts';
import { ModelPackage } from './model-package.ts';
import type { SessionOptions } from './onnx-session.ts';
import { Cancellation } from './pipeline/cancellation.ts';
import { ContributionAccumulator } from './pipeline/contributions.ts';
import { denoise } from './pipeline/denoising-loop.ts';
import { ClassifierFreeGuidance } from './pipeline/guidance.ts';
import { latentShape, SeededNoise, type LatentShape } from './pipeline/latents.ts';
import { ProgressReporter, type PreviewRenderer } from './pipeline/progress.ts';
import { encodePrompt, repeatForBatch, truncationWarnings } from './pipeline/prompt-encoding.ts';
import { echoParams } from './pipeline/resolved-params.ts';
import { GenerationTimer } from './pipeline/timings.ts';
import { VaeDecoder } from './pipeline/vae-decoder.ts';
import { img2imgLatents, VaeEncoder } from './pipeline/vae-encoder.ts';
import { LatentRgbApproximation } from './preview.ts';
import { resolveRequest } from './resolve.ts';
import { createScheduler, startingAt } from './schedulers/index.ts';

export interface GenerateOptions extends GenerateCallOptions {
  /** Polled between steps, for hosts that cannot deliver an AbortSignal in time (worker threads). */
  isCancelled?: () => boolean;
}

/** Preferred side of the preview fit's probe latents (kept within the package's sizes). */
const PREVIEW_PROBE_SIDE = 8;

export class Engine {
  private previewFit: Promise<LatentRgbApproximation | undefined> | undefined;

  private constructor(readonly pkg: ModelPackage) {}

  static async load(modelDir: string, options: Partial<SessionOptions> = {}): Promise<Engine> {
    return new Engine(await ModelPackage.load(modelDir, options));
  }

  info(): PackageInfo {
    return this.pkg.info();
  }

  /**
   * Opens every graph of the package now instead of on first use (fails early on a corrupt file),
   * and fits the preview map, so that the first job pays for neither.
   */
  async warmUp(): Promise<void> {
    const m = this.pkg.manifest;
    const files = new Set([m.textEncoder, m.vaeDecoder, ...m.experts.map((e) => e.unet), ...m.ensembles.map((e) => e.graph)]);
    if (m.vaeEncoder !== undefined) files.add(m.vaeEncoder);
    for (const e of m.experts) if (e.textEncoder) files.add(e.textEncoder);
    for (const f of files) await this.pkg.session(f);
    await this.pkg.tokenizer();
    await this.pkg.schedulerConfig();
    await this.latentPreview();
  }

  async generate(request: GenerateRequest, options: GenerateOptions = {}): Promise<GenerateResult> {
    const timer = await GenerationTimer.start(this.pkg);
    const cancellation = new Cancellation(options.signal, options.isCancelled);

    // 1. Resolve the request: defaults, limits and the models it names.
    const req = resolveRequest(this.pkg, request);
    cancellation.throwIfRequested();

    // 2. Encode the prompt and the negative prompt ([uncond; cond] per text encoder).
    const prompt = await encodePrompt(this.pkg, req);

    // 3. Prepare the denoiser (one expert, an average, a merge or an AFA ensemble) and the timesteps;
    //    image-to-image runs only the last ⌊steps · strength⌋ of them (diffusers' get_timesteps).
    const denoiser = await createDenoiser(this.pkg, req);
    const fullSchedule = createScheduler(req.scheduler, await this.pkg.schedulerConfig(), req.steps, { karras: req.karras });
    const scheduler = req.img2img ? startingAt(fullSchedule, req.img2img.beginIndex) : fullSchedule;

    // 4. Prepare the latents: torch-compatible seeded noise, image i from seed + i; image-to-image
    //    starts from the init image's latent noised to the first timestep that runs.
    const shape = latentShape(this.pkg.manifest, req);
    const noise = new SeededNoise(req.seed, shape);
    const img2img = req.img2img;
    const initialLatents = img2img
      ? await timer.encoding(async () => {
          const posterior = await (await VaeEncoder.open(this.pkg)).encode(img2img.image);
          return img2imgLatents(posterior, shape, this.pkg.manifest.latent.scaleFactor, noise, scheduler);
        })
      : noise.initialLatents(scheduler.initNoiseSigma);

    // 5. Progress reporting, with cheap previews of image 0 when asked.
    const progress = options.onProgress && (await this.progressReporter(options.onProgress, req.preview, shape, scheduler.timesteps.length));

    // 6. The denoising loop, with classifier-free guidance, summing the experts' contribution maps.
    const guidance = new ClassifierFreeGuidance(req.guidance, shape.batch);
    const contributions = req.contributions ? ContributionAccumulator.for(denoiser.experts, req.ensemble, shape) : undefined;
    const latents = await timer.denoising(() =>
      denoise(initialLatents, {
        denoiser,
        scheduler,
        guidance,
        text: repeatForBatch(prompt.byExpert, shape.batch, guidance.enabled),
        shape,
        noise: noise.next,
        contributions,
        progress,
        cancellation,
      }),
    );

    // 7. Decode the latents into pictures.
    const decoder = await VaeDecoder.open(this.pkg);
    const pictures = await timer.decoding(() => decoder.decodeImages(latents, shape));

    // 8. The result: each image with its seed (and mean contribution maps), the parameters used, timings.
    const images = pictures.map((image, b): GeneratedImage => {
      const generated: GeneratedImage = { seed: req.seed + b, image };
      if (contributions) generated.contributions = contributions.mean(b);
      return generated;
    });
    return {
      params: echoParams(req, this.pkg.label, prompt.truncatedWords),
      images,
      timings: await timer.finish(),
      warnings: truncationWarnings(prompt.truncatedWords),
    };
  }

  async dispose(): Promise<void> {
    await this.pkg.dispose();
  }

  /**
   * The latent → RGB map for progress previews, fitted to this package's VAE once (a few small
   * decodes). Previews are a nicety: if the fit fails, generations go on without them.
   */
  private latentPreview(): Promise<LatentRgbApproximation | undefined> {
    this.previewFit ??= (async () => {
      const { latent, size } = this.pkg.manifest;
      const side = Math.min(Math.max(PREVIEW_PROBE_SIDE, Math.ceil(size.min / latent.downsample)), Math.floor(size.max / latent.downsample));
      return LatentRgbApproximation.fit(await VaeDecoder.open(this.pkg), latent.channels, { side });
    })().catch(() => undefined);
    return this.previewFit;
  }

  private async progressReporter(
    onProgress: (event: ProgressEvent) => void,
    withPreviews: boolean,
    shape: LatentShape,
    totalSteps: number,
  ): Promise<ProgressReporter> {
    const approximation = withPreviews ? await this.latentPreview() : undefined;
    const upscale = this.pkg.manifest.latent.downsample;
    const render: PreviewRenderer | undefined = approximation && ((latents) => approximation.render(latents, shape.height, shape.width, upscale));
    return new ProgressReporter(onProgress, totalSteps, render && { render, perImage: shape.perImage });
  }
}
