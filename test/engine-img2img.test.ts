// Image-to-image (GenerateRequest.initImage / strength) with diffusers' StableDiffusionImg2ImgPipeline
// semantics: on the tiny fixture against its PyTorch references (reference/img2img.json), in every mode
// and scheduler, with its errors; on the demo package for what a person sees.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EngineError, type GenerateRequest, type RgbImage } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { VaeDecoder } from '../src/engine/pipeline/vae-decoder.ts';
import { imageToSample, VaeEncoder } from '../src/engine/pipeline/vae-encoder.ts';
import { formatParameters, parseParameters, rgbFromFloat } from '../src/engine/render/index.ts';
import { copyOfTiny, maxAbsDiff, REPO_ROOT, TINY } from './helpers/fixture.ts';

const DEMO = path.join(REPO_ROOT, 'models/demo');

async function rejectsWith(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof EngineError, `expected an EngineError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    return true;
  });
}

function meanAbsDiff(a: Uint8Array, b: Uint8Array): number {
  assert.equal(a.length, b.length);
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += Math.abs(a[i] - b[i]);
  return sum / a.length;
}

/** A picture without randomness: a horizontal colour ramp with a dark square; `inverted`: its negative. */
function picture(width: number, height: number, inverted = false): RgbImage {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = (y * width + x) * 3;
      const inSquare = Math.abs(x - width / 2) < width / 5 && Math.abs(y - height / 2) < height / 5;
      data[p] = inSquare ? 20 : (x * 255) / width;
      data[p + 1] = inSquare ? 20 : (y * 7) % 256;
      data[p + 2] = inSquare ? 20 : 255 - (x * 255) / width;
    }
  }
  if (inverted) for (let i = 0; i < data.length; i++) data[i] = 255 - data[i];
  return { width, height, data };
}

interface Img2ImgCase {
  name: string;
  request: GenerateRequest;
  init_image: { file: string; width: number; height: number };
  begin_index: number;
  timesteps: number[];
  images: { seed: number; file: string; width: number; height: number; contributions?: { file: string; experts: string[]; dims: number[] } }[];
}

describe('image-to-image on the tiny package', () => {
  const referenceDir = path.join(TINY, 'reference');
  let engine: Engine;
  let cases: Img2ImgCase[];
  const base: GenerateRequest = { prompt: 'a red circle on the left', mode: 'single', experts: ['alpha'], seed: 5, steps: 8 };
  const image = picture(32, 32);
  before(async () => {
    engine = await Engine.load(TINY);
    cases = (JSON.parse(await readFile(path.join(referenceDir, 'img2img.json'), 'utf8')) as { cases: Img2ImgCase[] }).cases;
  });
  after(async () => engine.dispose());

  test('the package says image-to-image is available', () => {
    assert.equal(engine.info().img2img, true);
  });

  test('equals the PyTorch img2img references (posterior draw, then noise, from each image generator)', async () => {
    assert.ok(cases.length >= 2);
    for (const c of cases) {
      const init = await readFile(path.join(referenceDir, c.init_image.file));
      const events: { step: number; steps: number }[] = [];
      const result = await engine.generate(
        { ...c.request, initImage: { width: c.init_image.width, height: c.init_image.height, data: new Uint8Array(init) } },
        { onProgress: (e) => events.push(e) },
      );
      assert.deepEqual(
        events.map((e) => [e.step, e.steps]),
        c.timesteps.map((_, k) => [k + 1, c.timesteps.length]),
        `${c.name}: progress counts the steps that run`,
      );
      assert.equal(result.params.strength, c.request.strength);
      assert.equal(result.params.steps, c.request.steps, 'the parameters keep the steps asked for');
      assert.equal(result.images.length, c.images.length);
      for (const [i, ref] of c.images.entries()) {
        const got = result.images[i];
        assert.equal(got.seed, ref.seed);
        const diff = maxAbsDiff(got.image.data, await readFile(path.join(referenceDir, ref.file)));
        assert.ok(diff <= 2, `${c.name} image ${i}: max abs difference ${diff}/255 > 2/255`);
        if (ref.contributions) {
          const bytes = await readFile(path.join(referenceDir, ref.contributions.file));
          const gold = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
          const plane = ref.contributions.dims[1] * ref.contributions.dims[2];
          ref.contributions.experts.forEach((id, k) => {
            const mine = got.contributions!.weights[got.contributions!.experts.indexOf(id)];
            assert.ok(maxAbsDiff(mine, gold.subarray(k * plane, (k + 1) * plane)) < 1e-3, `${c.name}: map of ${id}`);
          });
        }
      }
    }
  });

  test('strength sets how many of the steps run: min(⌊steps · strength⌋, steps), the last ones', async () => {
    for (const [strength, run] of [[1, 8], [0.8, 6], [0.6, 4], [0.5, 4], [0.3, 2], [0.125, 1]] as const) {
      const events: number[] = [];
      await engine.generate({ ...base, initImage: image, strength }, { onProgress: (e) => events.push(e.steps) });
      assert.deepEqual(events, Array(run).fill(run), `strength ${strength}`);
    }
    // the default is diffusers' 0.8
    const result = await engine.generate({ ...base, initImage: image });
    assert.equal(result.params.strength, 0.8);
  });

  test('same seed, same bytes; another seed or another picture, another image', async () => {
    const request = { ...base, initImage: image, strength: 0.6 };
    const a = await engine.generate(request);
    const b = await engine.generate(request);
    assert.deepEqual(a.images[0].image.data, b.images[0].image.data);
    const otherSeed = await engine.generate({ ...request, seed: 6 });
    assert.ok(maxAbsDiff(a.images[0].image.data, otherSeed.images[0].image.data) > 10);
    const otherPicture = await engine.generate({ ...request, initImage: picture(32, 32, true) });
    assert.ok(maxAbsDiff(a.images[0].image.data, otherPicture.images[0].image.data) > 10);
  });

  test('image i of a batch is the image of seed + i, as in txt2img', async () => {
    const batch = await engine.generate({ ...base, initImage: image, strength: 0.5, count: 2 });
    const second = await engine.generate({ ...base, initImage: image, strength: 0.5, seed: base.seed + 1 });
    assert.deepEqual(batch.images.map((i) => i.seed), [5, 6]);
    assert.ok(maxAbsDiff(batch.images[1].image.data, second.images[0].image.data) <= 1);
  });

  test('every mode runs from a picture; maps are averaged over the steps that run', async () => {
    const requests: GenerateRequest[] = [
      { ...base, mode: 'single' },
      { ...base, mode: 'average', experts: ['alpha', 'beta'], contributions: true },
      { ...base, mode: 'merge', experts: ['alpha', 'beta'] },
      { ...base, mode: 'afa', ensemble: 'duo', experts: undefined, contributions: true },
      { ...base, mode: 'afa', ensemble: 'duo', experts: ['beta'], contributions: true },
    ];
    for (const request of requests) {
      const events: number[] = [];
      const result = await engine.generate({ ...request, initImage: image, strength: 0.5 }, { onProgress: (e) => events.push(e.step) });
      assert.deepEqual(events, [1, 2, 3, 4], request.mode);
      const maps = result.images[0].contributions;
      if (request.contributions) {
        assert.ok(maps, `${request.mode}: maps`);
        for (let p = 0; p < maps.width * maps.height; p++) {
          const sum = maps.weights.reduce((s, w) => s + w[p], 0);
          assert.ok(Math.abs(sum - 1) < 1e-5, `${request.mode}: maps sum to 1`);
        }
      }
    }
  });

  test('every scheduler starts part-way as diffusers does (DPM-Solver from its begin index)', async () => {
    for (const scheduler of ['ddim', 'euler', 'euler_a', 'dpmpp_2m'] as const) {
      const request: GenerateRequest = { ...base, scheduler, initImage: image, strength: 0.6 };
      const events: number[] = [];
      const a = await engine.generate(request, { onProgress: (e) => events.push(e.steps) });
      const b = await engine.generate(request);
      assert.deepEqual(events, [4, 4, 4, 4], scheduler);
      assert.deepEqual(a.images[0].image.data, b.images[0].image.data, `${scheduler}: deterministic`);
    }
  });

  test('previews come with the steps that run', async () => {
    const previews: number[] = [];
    await engine.generate({ ...base, initImage: image, strength: 0.5, preview: true }, { onProgress: (e) => e.preview && previews.push(e.step) });
    assert.deepEqual(previews, [1, 2, 3]);
  });

  test('at strength 1 the picture still sets the start here (its schedule does not reach zero SNR)', async () => {
    const a = await engine.generate({ ...base, initImage: image, strength: 1 });
    const b = await engine.generate({ ...base, initImage: picture(32, 32, true), strength: 1 });
    assert.ok(maxAbsDiff(a.images[0].image.data, b.images[0].image.data) > 0);
  });

  test('the parameters say the strength, as A1111 writes it', async () => {
    const result = await engine.generate({ ...base, initImage: image, strength: 0.6 });
    const text = formatParameters(result.params);
    assert.match(text, /Denoising strength: 0\.6/);
    assert.equal(parseParameters(text).strength, 0.6);
    const plain = await engine.generate(base);
    assert.doesNotMatch(formatParameters(plain.params), /Denoising strength/);
    assert.equal(plain.params.strength, undefined);
    assert.equal(plain.timings.encodeMs, undefined);
    assert.ok(result.timings.encodeMs! > 0);
  });

  test('bad strength, size or picture: a clear EngineError', async () => {
    for (const strength of [0, -0.5, 1.5, Number.NaN, '0.5' as unknown as number]) {
      await rejectsWith(engine.generate({ ...base, initImage: image, strength }), 'bad_request', /Strength must be greater than 0 and at most 1/);
    }
    await rejectsWith(
      engine.generate({ ...base, initImage: picture(16, 16) }),
      'bad_request',
      /init image is 16×16 pixels but this request draws 32×32: resize or crop it to 32×32 first/,
    );
    await rejectsWith(engine.generate({ ...base, width: 16, height: 16, initImage: image }), 'bad_request', /32×32 pixels but this request draws 16×16/);
    await rejectsWith(engine.generate({ ...base, initImage: { ...image, data: image.data.subarray(3) } }), 'bad_request', /3069 bytes; 32×32 RGB needs 3072/);
    await rejectsWith(
      engine.generate({ ...base, initImage: { width: 32, height: 32, data: Array.from(image.data) as unknown as Uint8Array } }),
      'bad_request',
      /must be an RGB image/,
    );
    await rejectsWith(engine.generate({ ...base, strength: 0.5 }), 'bad_request', /Strength only applies to image-to-image/);
    await rejectsWith(engine.generate({ ...base, steps: 4, initImage: image, strength: 0.2 }), 'bad_request', /runs no denoising step/);
  });

  test('a package without a VAE encoder still draws, says so in its info, and refuses a picture clearly', async () => {
    const dir = await copyOfTiny();
    const manifestFile = path.join(dir, 'manifest.json');
    const manifest = JSON.parse(await readFile(manifestFile, 'utf8')) as Record<string, unknown>;
    delete manifest.vae_encoder;
    await writeFile(manifestFile, JSON.stringify(manifest));
    const old = await Engine.load(dir);
    try {
      assert.equal(old.info().img2img, false);
      const plain = await old.generate(base);
      const same = await engine.generate(base);
      assert.deepEqual(plain.images[0].image.data, same.images[0].image.data);
      await rejectsWith(
        old.generate({ ...base, initImage: image }),
        'bad_request',
        /^This model package has no VAE encoder, so image-to-image is not available\.$/,
      );
      await old.warmUp();
    } finally {
      await old.dispose();
    }
  });

  test('the encoder reads uint8 as diffusers does: 2·(v/255) − 1 in float32', () => {
    const sample = imageToSample({ width: 2, height: 1, data: Uint8Array.from([0, 128, 255, 51, 1, 254]) });
    const f = Math.fround;
    assert.deepEqual(Array.from(sample), [0, 51, 128, 1, 255, 254].map((v) => f(f(2 * f(v / 255)) - 1)));
    assert.equal(sample[0], -1);
    assert.equal(sample[4], 1);
  });
});

describe('image-to-image on the demo package (models/demo)', () => {
  let engine: Engine;
  let circle: RgbImage;
  let square: RgbImage;
  const request: GenerateRequest = { prompt: 'a large red circle on the left, white background', mode: 'single', experts: ['curves'], seed: 7, steps: 10 };
  before(async () => {
    engine = await Engine.load(DEMO);
    circle = (await engine.generate({ ...request, seed: 3 })).images[0].image;
    square = (await engine.generate({ ...request, prompt: 'a small blue square on the right, black background', experts: ['blocks'], seed: 4 })).images[0].image;
  });
  after(async () => engine.dispose());

  test('has a VAE encoder, and encode → decode gives the picture back', async () => {
    assert.equal(engine.info().img2img, true);
    const posterior = await (await VaeEncoder.open(engine.pkg)).encode(square);
    assert.deepEqual([posterior.channels, posterior.height, posterior.width], [4, 16, 16]);
    assert.ok(posterior.logvar, 'the demo encoder gives a distribution');
    const scaled = posterior.mean.map((v) => v * engine.pkg.manifest.latent.scaleFactor);
    const decoded = await (await VaeDecoder.open(engine.pkg)).decode(scaled, 4, 16, 16);
    const back = rgbFromFloat(decoded.data, 3, 64, 64);
    const roundTrip = meanAbsDiff(back.data, square.data);
    assert.ok(roundTrip < 10, `encode → decode differs by ${roundTrip.toFixed(1)}/255 on average`);
    assert.ok(meanAbsDiff(square.data, circle.data) > 100);
  });

  test('low strength keeps the picture even against the prompt; more strength follows the prompt', async () => {
    const kept = await engine.generate({ ...request, initImage: square, strength: 0.1 });
    const toSquare = meanAbsDiff(kept.images[0].image.data, square.data);
    const toCircle = meanAbsDiff(kept.images[0].image.data, circle.data);
    assert.ok(toSquare < 30 && toCircle > 150, `strength 0.1: ${toSquare.toFixed(1)} from the picture, ${toCircle.toFixed(1)} from the prompt's`);
    const redrawn = await engine.generate({ ...request, initImage: square, strength: 0.7 });
    assert.ok(meanAbsDiff(redrawn.images[0].image.data, circle.data) < 30, 'strength 0.7 draws what the prompt says');
    const kept2 = await engine.generate({ ...request, mode: 'afa', ensemble: 'trio', experts: undefined, initImage: square, strength: 0.1, contributions: true });
    assert.ok(meanAbsDiff(kept2.images[0].image.data, square.data) < 30, 'afa too');
    assert.ok(kept2.images[0].contributions);
  });

  test('strength 1 with its zero-terminal-SNR schedule (DDIM, trailing) keeps nothing of the picture', async () => {
    const scheduler = JSON.parse(await readFile(path.join(DEMO, 'scheduler/scheduler_config.json'), 'utf8')) as Record<string, unknown>;
    assert.equal(scheduler.rescale_betas_zero_snr, true);
    assert.equal(scheduler.timestep_spacing, 'trailing');
    const a = await engine.generate({ ...request, scheduler: 'ddim', initImage: square, strength: 1 });
    const b = await engine.generate({ ...request, scheduler: 'ddim', initImage: circle, strength: 1 });
    assert.deepEqual(a.images[0].image.data, b.images[0].image.data);
  });
});
