// Where a generation's time went: wall time per phase, and the part spent inside onnxruntime.
import type { GenerateResult } from '../api.ts';
import type { ModelPackage } from '../model-package.ts';

export type GenerationTimings = GenerateResult['timings'];

export class GenerationTimer {
  private denoiseMs = 0;
  private denoiseRunMs = 0;
  private decodeMs = 0;
  private encodeMs: number | undefined;

  private constructor(
    private readonly pkg: ModelPackage,
    private readonly startedAt: number,
    private readonly runMsAtStart: number,
  ) {}

  static async start(pkg: ModelPackage): Promise<GenerationTimer> {
    return new GenerationTimer(pkg, performance.now(), await runMsSoFar(pkg));
  }

  /** Runs the denoising loop, timing it (wall and session.run). */
  async denoising<T>(loop: () => Promise<T>): Promise<T> {
    const runBefore = await runMsSoFar(this.pkg);
    const started = performance.now();
    const result = await loop();
    this.denoiseMs = performance.now() - started;
    this.denoiseRunMs = (await runMsSoFar(this.pkg)) - runBefore;
    return result;
  }

  /** Runs image-to-image's encoding of the init image, timing it. */
  async encoding<T>(encode: () => Promise<T>): Promise<T> {
    const started = performance.now();
    const result = await encode();
    this.encodeMs = performance.now() - started;
    return result;
  }

  /** Runs the final decode, timing it. */
  async decoding<T>(decode: () => Promise<T>): Promise<T> {
    const started = performance.now();
    const result = await decode();
    this.decodeMs = performance.now() - started;
    return result;
  }

  async finish(): Promise<GenerationTimings> {
    const runMs = (await runMsSoFar(this.pkg)) - this.runMsAtStart;
    const { denoiseMs, decodeMs, denoiseRunMs, encodeMs } = this;
    const timings: GenerationTimings = { totalMs: performance.now() - this.startedAt, denoiseMs, decodeMs, runMs, denoiseRunMs };
    if (encodeMs !== undefined) timings.encodeMs = encodeMs;
    return timings;
  }
}

/** Time inside session.run, summed over every graph the package has opened. */
async function runMsSoFar(pkg: ModelPackage): Promise<number> {
  return (await pkg.openSessions()).reduce((s, x) => s + x.runMs, 0);
}
