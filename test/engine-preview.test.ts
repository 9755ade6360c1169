// Progress previews: a 3×C latent → RGB map fitted to the package's VAE, instead of a VAE decode.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { GenerateRequest, RgbImage } from '../src/engine/api.ts';
import { createDenoiser } from '../src/engine/denoisers.ts';
import type { FloatTensor } from '../src/engine/onnx-session.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { Cancellation } from '../src/engine/pipeline/cancellation.ts';
import { denoise } from '../src/engine/pipeline/denoising-loop.ts';
import { ClassifierFreeGuidance } from '../src/engine/pipeline/guidance.ts';
import { latentShape, SeededNoise } from '../src/engine/pipeline/latents.ts';
import { encodePrompt, repeatForBatch } from '../src/engine/pipeline/prompt-encoding.ts';
import { VaeDecoder } from '../src/engine/pipeline/vae-decoder.ts';
import { LatentRgbApproximation, leastSquares, upscaleBilinear, type LatentDecoder } from '../src/engine/preview.ts';
import { rgbFromFloat } from '../src/engine/render/index.ts';
import { resolveRequest } from '../src/engine/resolve.ts';
import { createScheduler } from '../src/engine/schedulers/index.ts';
import { REPO_ROOT } from './helpers/fixture.ts';

const DEMO = path.join(REPO_ROOT, 'models/demo');

/** Pearson correlation of one colour channel of two same-sized pictures. */
function channelCorrelation(a: RgbImage[], b: RgbImage[], channel: number): number {
  const xs: number[] = [];
  const ys: number[] = [];
  a.forEach((image, i) => {
    for (let p = channel; p < image.data.length; p += 3) {
      xs.push(image.data[p]);
      ys.push(b[i].data[p]);
    }
  });
  const mean = (v: number[]) => v.reduce((s, x) => s + x, 0) / v.length;
  const mx = mean(xs);
  const my = mean(ys);
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < xs.length; i++) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) ** 2;
    syy += (ys[i] - my) ** 2;
  }
  return sxy / Math.sqrt(sxx * syy);
}

function meanAbsDiff(a: RgbImage[], b: RgbImage[]): number {
  let sum = 0;
  let n = 0;
  a.forEach((image, i) => image.data.forEach((v, p) => ((sum += Math.abs(v - b[i].data[p])), n++)));
  return sum / n;
}

/** The finished latents of one image, through the engine's own pipeline steps. */
async function finishedLatents(engine: Engine, request: GenerateRequest): Promise<{ latents: Float32Array; height: number; width: number }> {
  const req = resolveRequest(engine.pkg, request);
  const prompt = await encodePrompt(engine.pkg, req);
  const denoiser = await createDenoiser(engine.pkg, req);
  const scheduler = createScheduler(req.scheduler, await engine.pkg.schedulerConfig(), req.steps, { karras: req.karras });
  const shape = latentShape(engine.pkg.manifest, req);
  const noise = new SeededNoise(req.seed, shape);
  const guidance = new ClassifierFreeGuidance(req.guidance, shape.batch);
  const latents = await denoise(noise.initialLatents(scheduler.initNoiseSigma), {
    denoiser,
    scheduler,
    guidance,
    text: repeatForBatch(prompt.byExpert, shape.batch, guidance.enabled),
    shape,
    noise: noise.next,
    cancellation: new Cancellation(),
  });
  return { latents, height: shape.height, width: shape.width };
}

describe('the latent → RGB fit', () => {
  test('least squares recovers an exact linear map with a bias', () => {
    const truth = [
      [0.5, -1, 2],
      [0.25, 0, -3],
      [1, 0.5, 0.125],
    ]; // rows: the two inputs, then the bias; columns: three outputs
    const inputs: Float64Array[] = [];
    const targets: Float64Array[] = [];
    for (let i = 0; i < 12; i++) {
      const x = [Math.sin(i), Math.cos(3 * i)];
      inputs.push(Float64Array.from([...x, 1]));
      targets.push(Float64Array.from([0, 1, 2], (o) => x[0] * truth[0][o] + x[1] * truth[1][o] + truth[2][o]));
    }
    const fitted = leastSquares(inputs, targets);
    fitted.forEach((row, r) => row.forEach((v, o) => assert.ok(Math.abs(v - truth[r][o]) < 1e-6, `β[${r}][${o}] = ${v}`)));
  });

  test('bilinear upscaling keeps flat planes flat and interpolates between pixel centres', () => {
    const flat = upscaleBilinear(Float32Array.from([0.3, 0.3, 0.3, 0.3]), 1, 2, 2, 6, 6);
    assert.ok(flat.every((v) => Math.abs(v - 0.3) < 1e-6));
    const ramp = upscaleBilinear(Float32Array.from([0, 1]), 1, 1, 2, 1, 4);
    assert.deepEqual(Array.from(ramp), [0, 0.25, 0.75, 1]);
  });

  test('a decoder that is linear per pixel is reproduced exactly', async () => {
    // Small enough that N(0, 1) probes stay inside the display range −1 … 1 (clipped values are not linear).
    const matrix = [0.1, -0.05, 0.025, 0.075, -0.125, 0.15, 0.05, 0, 0.025, 0.025, -0.075, 0.05];
    const bias = [0.05, -0.1, 0.2];
    const scale = 2;
    const linear: LatentDecoder = {
      async decode(latents: Float32Array, channels: number, height: number, width: number): Promise<FloatTensor> {
        const H = height * scale;
        const W = width * scale;
        const data = new Float32Array(3 * H * W);
        for (let rgb = 0; rgb < 3; rgb++) {
          for (let y = 0; y < H; y++) {
            for (let x = 0; x < W; x++) {
              let v = bias[rgb];
              for (let c = 0; c < channels; c++) v += matrix[rgb * channels + c] * latents[c * height * width + Math.floor(y / scale) * width + Math.floor(x / scale)];
              data[rgb * H * W + y * W + x] = v;
            }
          }
        }
        return { data, dims: [1, 3, H, W] };
      },
    };
    const fit = await LatentRgbApproximation.fit(linear, 4, { side: 2 });
    fit.matrix.forEach((v, i) => assert.ok(Math.abs(v - matrix[i]) < 1e-4, `m[${i}] = ${v}`));
    fit.bias.forEach((v, i) => assert.ok(Math.abs(v - bias[i]) < 1e-4, `b[${i}] = ${v}`));
  });
});

describe('previews on the demo package (models/demo)', () => {
  let engine: Engine;
  before(async () => {
    engine = await Engine.load(DEMO);
  });
  after(async () => engine.dispose());

  test("the approximate preview of finished latents has the real decode's colours", async () => {
    const decoder = await VaeDecoder.open(engine.pkg);
    const approximation = await LatentRgbApproximation.fit(decoder, engine.pkg.manifest.latent.channels, { side: 8 });
    const real: RgbImage[] = [];
    const approximate: RgbImage[] = [];
    const scenes: [string, string][] = [
      ['a red circle on the left and a blue square on the right, white background', 'curves'],
      ['a yellow star in the center, black background', 'spikes'],
      ['a green diamond on the top, gray background', 'blocks'],
    ];
    for (const [prompt, expert] of scenes) {
      const { latents, height, width } = await finishedLatents(engine, { prompt, mode: 'single', experts: [expert], seed: 3, steps: 10 });
      const decoded = await decoder.decode(latents, engine.pkg.manifest.latent.channels, height, width);
      real.push(rgbFromFloat(decoded.data, 3, decoded.dims[2], decoded.dims[3]));
      approximate.push(approximation.render(latents, height, width, engine.pkg.manifest.latent.downsample));
    }
    for (let channel = 0; channel < 3; channel++) {
      const r = channelCorrelation(approximate, real, channel);
      assert.ok(r > 0.85, `channel ${'RGB'[channel]}: correlation ${r.toFixed(3)}`);
    }
    const mad = meanAbsDiff(approximate, real);
    assert.ok(mad < 40, `mean absolute difference ${mad.toFixed(1)} of 255`);
  });

  test('previews come at the image size without running the VAE, and the final image does not change', async () => {
    const request: GenerateRequest = { prompt: 'a red circle on the left', mode: 'single', experts: ['curves'], seed: 9, steps: 10 };
    await engine.warmUp();
    const vae = await engine.pkg.session(engine.pkg.manifest.vaeDecoder);
    const runsBefore = vae.runs;
    const previews: RgbImage[] = [];
    const withPreviews = await engine.generate({ ...request, preview: true }, { onProgress: (e) => e.preview && previews.push(e.preview) });
    assert.equal(vae.runs - runsBefore, 1, 'only the final decode ran the VAE');
    assert.equal(previews.length, 4);
    for (const p of previews) {
      assert.deepEqual([p.width, p.height, p.data.length], [64, 64, 64 * 64 * 3]);
    }
    const without = await engine.generate(request);
    assert.deepEqual(withPreviews.images[0].image.data, without.images[0].image.data);
  });
});
