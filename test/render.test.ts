import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import zlib from 'node:zlib';
import sharp from 'sharp';
import type { ContributionMaps, ResolvedParams, RgbImage } from '../src/engine/api.ts';
import {
  crc32,
  encodePng,
  formatParameters,
  insertPngText,
  parseParameters,
  readPngText,
  renderContributionPanel,
  renderGrid,
  rgbFromFloat,
} from '../src/engine/render/index.ts';
import { createCanvas, resampleMap } from '../src/engine/render/canvas.ts';
import { colormapTable, expertColour } from '../src/engine/render/colormap.ts';
import { drawText, fitText, measureText } from '../src/engine/render/font.ts';
import { BACKGROUND, CAPTION_BACKGROUND } from '../src/engine/render/layout.ts';

const params: ResolvedParams = {
  prompt: 'a red circle, on a blue square',
  negative: 'blurry',
  mode: 'afa',
  ensemble: 'trio',
  experts: ['curves', 'blocks', 'spikes'],
  seed: 42,
  steps: 20,
  guidance: 7.5,
  scheduler: 'ddim',
  karras: true,
  width: 64,
  height: 64,
  count: 1,
  model: 'demo@1.0.0',
  truncatedWords: [],
};

function gradientImage(width: number, height: number): RgbImage {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      data[i] = (x * 4) & 255;
      data[i + 1] = (y * 4) & 255;
      data[i + 2] = (x * 7 + y * 13) & 255;
    }
  }
  return { width, height, data };
}

function solidImage(width: number, height: number, rgb: [number, number, number]): RgbImage {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < data.length; i += 3) data.set(rgb, i);
  return { width, height, data };
}

async function decode(png: Buffer): Promise<RgbImage> {
  const { data, info } = await sharp(png).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  assert.equal(info.channels, 3);
  return { width: info.width, height: info.height, data: new Uint8Array(data) };
}

function pixel(image: RgbImage, x: number, y: number): [number, number, number] {
  const i = (y * image.width + x) * 3;
  return [image.data[i], image.data[i + 1], image.data[i + 2]];
}

function chunks(png: Buffer): { type: string; crcInput: Buffer; storedCrc: number }[] {
  const out: { type: string; crcInput: Buffer; storedCrc: number }[] = [];
  for (let offset = 8; offset < png.length; ) {
    const length = png.readUInt32BE(offset);
    out.push({
      type: png.toString('latin1', offset + 4, offset + 8),
      crcInput: png.subarray(offset + 4, offset + 8 + length),
      storedCrc: png.readUInt32BE(offset + 8 + length),
    });
    offset += 12 + length;
  }
  return out;
}

const luminance = ([r, g, b]: [number, number, number]): number => 0.299 * r + 0.587 * g + 0.114 * b;

describe('infotext (A1111 parameters)', () => {
  test('formats the exact A1111 layout for a known case', () => {
    assert.equal(
      formatParameters(params),
      'a red circle, on a blue square\n' +
        'Negative prompt: blurry\n' +
        'Steps: 20, Sampler: DDIM, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, ' +
        'Model: demo@1.0.0, Ensemble: trio, Experts: curves+blocks+spikes, Mode: afa',
    );
  });

  test('omits an empty negative prompt, writes integral CFG like Python and quotes like A1111', () => {
    const text = formatParameters({
      ...params,
      negative: '',
      mode: 'average',
      ensemble: undefined,
      experts: ['curves', 'blocks'],
      weights: [0.7, 0.3],
      guidance: 7,
      scheduler: 'euler_a',
      karras: false,
      width: 96,
      height: 64,
      model: 'my, model: v2',
    });
    assert.equal(
      text,
      'a red circle, on a blue square\n' +
        'Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 96x64, ' +
        'Model: "my, model: v2", Experts: curves+blocks, Weights: 0.7+0.3, Mode: average',
    );
    const parsed = parseParameters(text);
    assert.equal(parsed.model, 'my, model: v2');
    assert.deepEqual(parsed.weights, [0.7, 0.3]);
    assert.equal(parsed.scheduler, 'euler_a');
    assert.equal(parsed.karras, false);
    assert.equal(parsed.negative, '');
  });

  test('uses A1111 sampler names', () => {
    const sampler = (scheduler: ResolvedParams['scheduler']) => parseParameters(formatParameters({ ...params, scheduler })).fields['Sampler'];
    assert.deepEqual(
      (['ddim', 'euler', 'euler_a', 'dpmpp_2m'] as const).map(sampler),
      ['DDIM', 'Euler', 'Euler a', 'DPM++ 2M'],
    );
  });

  test('round-trips every field, multi-line prompts included', () => {
    const original = { ...params, prompt: 'line one\nline two', negative: 'ugly\nbad hands', scheduler: 'dpmpp_2m' as const };
    const parsed = parseParameters(formatParameters(original));
    assert.equal(parsed.prompt, original.prompt);
    assert.equal(parsed.negative, original.negative);
    assert.equal(parsed.steps, 20);
    assert.equal(parsed.scheduler, 'dpmpp_2m');
    assert.equal(parsed.karras, true);
    assert.equal(parsed.guidance, 7.5);
    assert.equal(parsed.seed, 42);
    assert.equal(parsed.width, 64);
    assert.equal(parsed.height, 64);
    assert.equal(parsed.model, 'demo@1.0.0');
    assert.equal(parsed.mode, 'afa');
    assert.equal(parsed.ensemble, 'trio');
    assert.deepEqual(parsed.experts, ['curves', 'blocks', 'spikes']);
  });

  test('reads infotext written by an old webui (schedule inside the sampler name)', () => {
    const parsed = parseParameters(
      'masterpiece, 1girl\nNegative prompt: lowres\n' +
        'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, Model: anything-v3',
    );
    assert.equal(parsed.prompt, 'masterpiece, 1girl');
    assert.equal(parsed.negative, 'lowres');
    assert.equal(parsed.scheduler, 'dpmpp_2m');
    assert.equal(parsed.karras, true);
    assert.equal(parsed.guidance, 7);
    assert.equal(parsed.width, 512);
    assert.equal(parsed.height, 768);
    assert.equal(parsed.fields['Model hash'], '45dee52b');
    assert.equal(parsed.mode, undefined);
  });

  test('a text without a parameter line is all prompt', () => {
    const parsed = parseParameters('just a prompt, with: one colon');
    assert.equal(parsed.prompt, 'just a prompt, with: one colon');
    assert.deepEqual(parsed.fields, {});
  });
});

describe('PNG encoding', () => {
  test('crc32 matches the standard check value', () => {
    assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  });

  test('parameters survive a real PNG and pixels survive unchanged', async () => {
    const image = gradientImage(64, 48);
    const png = await encodePng(image, params);
    const texts = readPngText(png);
    assert.equal(texts['parameters'], formatParameters(params));
    assert.deepEqual(parseParameters(texts['parameters']).experts, params.experts);

    // libvips reads the chunk back too, and every chunk's CRC agrees with an independent CRC-32.
    const metadata = await sharp(png).metadata();
    assert.equal(metadata.width, 64);
    assert.equal(metadata.height, 48);
    assert.deepEqual(metadata.comments, [{ keyword: 'parameters', text: formatParameters(params) }]);

    for (const { type, crcInput, storedCrc } of chunks(png)) assert.equal(storedCrc, zlib.crc32(crcInput), type);
    assert.deepEqual(
      chunks(png).map((c) => c.type).slice(0, 2),
      ['IHDR', 'tEXt'],
    );

    const decoded = await decode(png);
    assert.deepEqual(decoded.data, image.data);
  });

  test('text outside Latin-1 goes into an iTXt chunk and reads back', async () => {
    const unicode = { ...params, prompt: 'ein Kreis ☀ 日本語', negative: 'café' };
    const png = await encodePng(gradientImage(8, 8), unicode);
    assert.ok(png.includes(Buffer.from('iTXt')));
    assert.equal(readPngText(png)['parameters'], formatParameters(unicode));
    assert.equal((await sharp(png).metadata()).comments?.[0]?.text, formatParameters(unicode));
  });

  test('Latin-1 text goes into tEXt; a PNG without params has no text', async () => {
    const png = await encodePng(gradientImage(8, 8), { ...params, prompt: 'café crème' });
    assert.ok(png.includes(Buffer.from('tEXt')));
    assert.equal(parseParameters(readPngText(png)['parameters']).prompt, 'café crème');
    assert.deepEqual(readPngText(await encodePng(gradientImage(8, 8))), {});
  });

  test('upscales for display with nearest neighbour, keeping the generated size in the parameters', async () => {
    const image = gradientImage(64, 64);
    const png = await encodePng(image, params, { displayWidth: 512, displayHeight: 512 });
    const decoded = await decode(png);
    assert.equal(decoded.width, 512);
    assert.equal(decoded.height, 512);
    for (const [x, y] of [[0, 0], [5, 9], [63, 63], [31, 40]]) {
      assert.deepEqual(pixel(decoded, x * 8 + 3, y * 8 + 5), pixel(image, x, y));
    }
    assert.equal(parseParameters(readPngText(png)['parameters']).width, 64);
  });

  test('lanczos display size keeps the aspect ratio when one side is given', async () => {
    const decoded = await decode(await encodePng(solidImage(64, 32, [200, 50, 10]), undefined, { displayWidth: 256, resample: 'lanczos' }));
    assert.equal(decoded.width, 256);
    assert.equal(decoded.height, 128);
    assert.deepEqual(pixel(decoded, 128, 64), [200, 50, 10]);
  });

  test('insertPngText rejects non-PNG data and bad sizes are reported', async () => {
    assert.throws(() => insertPngText(Buffer.from('not a png at all'), { a: 'b' }), /not a PNG/);
    await assert.rejects(encodePng({ width: 4, height: 4, data: new Uint8Array(10) }), /expected 48/);
  });
});

describe('rgbFromFloat', () => {
  test('maps [-1, 1] CHW to rounded, clipped RGB bytes', () => {
    // 3 channels, 1×4 pixels
    const chw = new Float32Array([-1, 0, 1, 2, /* G */ -3, 0.5, -0.5, NaN, /* B */ 1, 1, -1, 0.2]);
    const image = rgbFromFloat(chw, 3, 1, 4);
    assert.equal(image.width, 4);
    assert.equal(image.height, 1);
    assert.deepEqual([...image.data], [0, 0, 255, 128, 191, 255, 255, 64, 0, 255, 0, 153]);
  });

  test('shows one channel as grey and rejects short tensors', () => {
    assert.deepEqual([...rgbFromFloat(new Float32Array([1, -1]), 1, 2, 1).data], [255, 255, 255, 0, 0, 0]);
    assert.throws(() => rgbFromFloat(new Float32Array(5), 3, 1, 2), /expected 6/);
  });
});

describe('bitmap font', () => {
  test('draws glyph pixels at the given scale', () => {
    const canvas = createCanvas(20, 20, [0, 0, 0]);
    drawText(canvas, 'I', 1, 1, [255, 255, 255], 2);
    let ink = 0;
    for (let i = 0; i < canvas.data.length; i += 3) if (canvas.data[i] === 255) ink++;
    // 'I' is 3 + 5 + 3 = 11 font pixels, each 2×2.
    assert.equal(ink, 11 * 4);
    assert.deepEqual(measureText('Curves 41%', 2), { width: (10 * 6 - 1) * 2, height: 16 });
  });

  test('shortens text to fit a width', () => {
    assert.equal(fitText('Short', 100), 'Short');
    const fitted = fitText('A much longer expert title', 60);
    assert.ok(fitted.endsWith('...'));
    assert.ok(measureText(fitted).width <= 60);
  });
});

function halfMaps(width: number, height: number, experts: string[]): ContributionMaps {
  const left = new Float32Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width / 2; x++) left[y * width + x] = 1;
  const right = left.map((v) => 1 - v);
  const weights = [left, right];
  for (let i = 2; i < experts.length; i++) weights.push(new Float32Array(width * height));
  return { experts, width, height, weights, shares: weights.map((w) => w.reduce((a, b) => a + b, 0) / w.length) };
}

function countDifferent(image: RgbImage, x0: number, y0: number, w: number, h: number, colour: readonly number[]): number {
  let count = 0;
  for (let y = y0; y < y0 + h; y++) {
    for (let x = x0; x < x0 + w; x++) {
      const p = pixel(image, x, y);
      if (p[0] !== colour[0] || p[1] !== colour[1] || p[2] !== colour[2]) count++;
    }
  }
  return count;
}

describe('contribution panel', () => {
  const tile = 256;
  const gap = 8;
  const caption = 28;

  test('shows each map as a heatmap, labels it, and colours the dominant expert', async () => {
    const image = solidImage(64, 64, [220, 220, 220]);
    const maps = halfMaps(16, 16, ['left', 'right']);
    const panel = await decode(await renderContributionPanel(image, maps, { left: 'Lefty', right: 'Righty' }));
    // image + 2 heatmaps + dominant map in one row, a legend row below
    assert.equal(panel.width, gap + 4 * (tile + gap));
    assert.equal(panel.height, gap + tile + caption + gap + caption + gap);

    const tileX = (i: number) => gap + i * (tile + gap);
    const mid = gap + tile / 2;
    const viridis = colormapTable('viridis');
    // 'left' is 1 on the left half: bright yellow there, dark purple on the right.
    assert.deepEqual(pixel(panel, tileX(1) + 20, mid), [viridis[765], viridis[766], viridis[767]]);
    assert.deepEqual(pixel(panel, tileX(1) + tile - 20, mid), [viridis[0], viridis[1], viridis[2]]);
    assert.ok(luminance(pixel(panel, tileX(2) + 20, mid)) < 60);
    assert.ok(luminance(pixel(panel, tileX(2) + tile - 20, mid)) > 180);

    // dominant map: the left expert's colour on the left, the right expert's on the right
    const hue = (p: [number, number, number]) => p.map((v) => v / Math.max(...p));
    const leftColour = expertColour(0);
    const rightColour = expertColour(1);
    const dominantLeft = hue(pixel(panel, tileX(3) + 20, mid));
    const dominantRight = hue(pixel(panel, tileX(3) + tile - 20, mid));
    dominantLeft.forEach((v, c) => assert.ok(Math.abs(v - leftColour[c] / Math.max(...leftColour)) < 0.1));
    dominantRight.forEach((v, c) => assert.ok(Math.abs(v - rightColour[c] / Math.max(...rightColour)) < 0.1));

    // every caption bar holds text
    for (let i = 0; i < 4; i++) {
      assert.ok(countDifferent(panel, tileX(i), gap + tile, tile, caption, CAPTION_BACKGROUND) > 50, `caption ${i}`);
    }
    // the legend row holds the colour bar and the swatches
    assert.ok(countDifferent(panel, 0, gap + tile + caption + gap, panel.width, caption, BACKGROUND) > 500);
  });

  test('labels carry the share in percent', async () => {
    const image = solidImage(32, 32, [0, 0, 0]);
    const maps = halfMaps(8, 8, ['a', 'b']);
    maps.shares = [0.41, 0.59];
    const withShare = await decode(await renderContributionPanel(image, maps, { a: 'Curves', b: 'Blocks' }));
    maps.shares = [0.42, 0.58];
    const otherShare = await decode(await renderContributionPanel(image, maps, { a: 'Curves', b: 'Blocks' }));
    const captionY = gap + tile;
    const region = (panel: RgbImage, i: number) => {
      const bytes: number[] = [];
      for (let y = captionY; y < captionY + caption; y++) {
        for (let x = gap + i * (tile + gap); x < gap + i * (tile + gap) + tile; x++) bytes.push(...pixel(panel, x, y));
      }
      return bytes;
    };
    // the image's caption is the same; the first expert's differs (41% vs 42%)
    assert.deepEqual(region(withShare, 0), region(otherShare, 0));
    assert.notDeepEqual(region(withShare, 1), region(otherShare, 1));
  });

  test('lays out six experts in two rows and fits non-square images', async () => {
    const experts = ['a', 'b', 'c', 'd', 'e', 'f'];
    const six = await decode(await renderContributionPanel(solidImage(64, 64, [9, 9, 9]), halfMaps(16, 16, experts), {}));
    assert.equal(six.width, gap + 4 * (tile + gap));
    assert.ok(six.height >= gap + 2 * (tile + caption + gap) + caption + gap);

    const wide = await decode(
      await renderContributionPanel(solidImage(64, 32, [9, 9, 9]), halfMaps(16, 8, ['a', 'b']), {}, { tileSize: 128 }),
    );
    assert.equal(wide.width, gap + 4 * (128 + gap));
  });

  test('rejects maps that do not match their experts', async () => {
    const maps = halfMaps(4, 4, ['a', 'b']);
    maps.weights.pop();
    await assert.rejects(renderContributionPanel(solidImage(16, 16, [0, 0, 0]), maps, {}), /1 weight maps for 2 experts/);
  });

  test('bicubic upsampling keeps the map in 0..1 and smooth', () => {
    const up = resampleMap(new Float32Array([0, 1, 1, 0]), 2, 2, 16, 16);
    assert.ok(up.every((v) => v >= 0 && v <= 1));
    assert.ok(up[0] < 0.1 && up[15] > 0.9 && up[15 * 16] > 0.9 && up[255] < 0.1);
    for (let x = 1; x < 16; x++) assert.ok(up[x] >= up[x - 1], 'rises from the 0 corner to the 1 corner');
    // constant maps stay constant
    assert.ok(resampleMap(new Float32Array(9).fill(0.25), 3, 3, 10, 7).every((v) => Math.abs(v - 0.25) < 1e-6));
  });
});

describe('grid', () => {
  test('places labelled tiles in rows at the expected size', async () => {
    const red = solidImage(64, 64, [230, 20, 20]);
    const blue = solidImage(64, 64, [20, 20, 230]);
    const green = solidImage(64, 64, [20, 200, 20]);
    const png = await renderGrid(
      [
        { image: red, label: 'Curves' },
        { image: blue, label: 'Blocks' },
        { image: green, label: 'Trio (AFA)' },
      ],
      { tileSize: 128, gap: 4, params },
    );
    const grid = await decode(png);
    // 3 tiles → 2 columns × 2 rows, caption bars of 28 px at tile size 128 (scale 1: 14 px)
    const cell = 128 + 14;
    assert.equal(grid.width, 4 + 2 * (128 + 4));
    assert.equal(grid.height, 4 + 2 * (cell + 4));
    assert.deepEqual(pixel(grid, 4 + 64, 4 + 64), [230, 20, 20]);
    assert.deepEqual(pixel(grid, 4 + 132 + 64, 4 + 64), [20, 20, 230]);
    assert.deepEqual(pixel(grid, 4 + 64, 4 + cell + 4 + 64), [20, 200, 20]);
    assert.deepEqual(pixel(grid, 4 + 132 + 64, 4 + cell + 4 + 64), [...BACKGROUND]);
    assert.ok(countDifferent(grid, 4, 4 + 128, 128, 14, CAPTION_BACKGROUND) > 20);
    assert.equal(parseParameters(readPngText(png)['parameters']).seed, 42);
  });

  test('unlabelled tiles get no caption bar; columns and mixed aspect ratios are honoured', async () => {
    const grid = await decode(
      await renderGrid(
        [{ image: solidImage(64, 32, [1, 2, 3]) }, { image: solidImage(32, 64, [4, 5, 6]) }, { image: gradientImage(64, 64) }],
        { columns: 3, tileSize: 64, gap: 2 },
      ),
    );
    assert.equal(grid.width, 2 + 3 * (64 + 2));
    assert.equal(grid.height, 2 + 64 + 2);
    // the 64×32 image is centred in its 64×64 box
    assert.deepEqual(pixel(grid, 2 + 32, 2 + 32), [1, 2, 3]);
    assert.deepEqual(pixel(grid, 2 + 32, 2 + 4), [...BACKGROUND]);
    await assert.rejects(renderGrid([]), /at least one tile/);
  });
});
