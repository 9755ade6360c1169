// The attachment checks and the capped download of /imagine image:, against a local HTTP server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import sharp from 'sharp';
import { attachmentProblem, downloadAttachment, fitInitImage, INIT_IMAGE_LIMITS, sniffImageType } from '../src/bot/init-image.ts';

const MiB = 1024 * 1024;

function attachment(overrides: Partial<Parameters<typeof attachmentProblem>[0]> = {}): Parameters<typeof attachmentProblem>[0] {
  return { name: 'a.png', url: 'http://127.0.0.1:1/a.png', size: 1000, contentType: 'image/png', width: 64, height: 64, ...overrides };
}

test('attachments are checked from what Discord says: type, size (and the interaction limit), dimensions', () => {
  assert.equal(attachmentProblem(attachment()), undefined);
  assert.equal(attachmentProblem(attachment({ contentType: 'image/jpeg', width: null, height: null })), undefined);
  assert.equal(attachmentProblem(attachment({ contentType: 'image/webp' })), undefined);
  assert.match(attachmentProblem(attachment({ contentType: 'image/gif' }))!, /PNG, JPEG or WebP.*image\/gif/);
  assert.match(attachmentProblem(attachment({ contentType: null }))!, /unknown type/);
  assert.match(attachmentProblem(attachment({ size: 10 * MiB + 1 }))!, /too big/);
  assert.equal(attachmentProblem(attachment({ size: 10 * MiB })), undefined);
  assert.match(attachmentProblem(attachment({ size: 2 * MiB }), 1 * MiB)!, /too big.*at most 1\.0 MiB/);
  assert.match(attachmentProblem(attachment({ width: 4097, height: 10 }))!, /too large/);
});

/** A server whose one route does what `handler` says; returns its URL and a closer. */
async function serve(handler: (res: ServerResponse) => void): Promise<{ url: string; close: () => Promise<void> }> {
  const server = createServer((_req, res) => handler(res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/file`,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

test('the download is capped: a body longer than allowed is cut off and refused, announced or not', async () => {
  const body = Buffer.alloc(5000, 7);
  const announced = await serve((res) => {
    res.writeHead(200, { 'content-type': 'image/png', 'content-length': String(body.length) });
    res.end(body);
  });
  const chunked = await serve((res) => {
    res.writeHead(200, { 'content-type': 'image/png' }); // no length: chunked
    for (let i = 0; i < 5; i++) res.write(body.subarray(i * 1000, (i + 1) * 1000));
    res.end();
  });
  try {
    assert.deepEqual(await downloadAttachment(announced.url, 5000), { ok: true, bytes: body });
    const over = await downloadAttachment(announced.url, 4999);
    assert.match(over.ok ? '' : over.message, /too big/);
    const cut = await downloadAttachment(chunked.url, 2500);
    assert.equal(cut.ok, false);
    assert.match(cut.ok ? '' : cut.message, /too big/);
    assert.deepEqual(await downloadAttachment(chunked.url, 5000), { ok: true, bytes: body });
  } finally {
    await announced.close();
    await chunked.close();
  }
});

test('a download that never ends is given up at its timeout; HTTP errors are refused', async () => {
  const hung = await serve((res) => res.writeHead(200, { 'content-type': 'image/png' })); // headers, then nothing
  const missing = await serve((res) => {
    res.writeHead(404);
    res.end();
  });
  try {
    const result = await downloadAttachment(hung.url, MiB, 50);
    assert.deepEqual(result, { ok: false, message: 'Downloading the picture took too long; try again.' });
    const gone = await downloadAttachment(missing.url, MiB);
    assert.match(gone.ok ? '' : gone.message, /HTTP 404/);
  } finally {
    await hung.close();
    await missing.close();
  }
});

test('decoding: sniffed formats, the first frame, cover-crop to the size, a pixel limit from the header', async () => {
  const webp = await sharp({ create: { width: 30, height: 10, channels: 4, background: { r: 0, g: 0, b: 255, alpha: 1 } } }).webp().toBuffer();
  assert.equal(sniffImageType(webp), 'webp');
  const fitted = await fitInitImage(webp, 16, 16);
  assert.ok(fitted.ok);
  const meta = await sharp(fitted.png).metadata();
  assert.deepEqual([meta.width, meta.height, meta.format], [16, 16, 'png']);

  // An animated WebP: the first frame (red), not the second (green).
  const frame = (r: number, g: number) => sharp({ create: { width: 8, height: 8, channels: 3, background: { r, g, b: 0 } } }).raw().toBuffer();
  const frames = Buffer.concat([await frame(255, 0), await frame(0, 255)]);
  const animated = await sharp(frames, { raw: { width: 8, height: 16, channels: 3, pageHeight: 8 } } as never).webp({ lossless: true }).toBuffer();
  assert.equal((await sharp(animated).metadata()).pages, 2, 'two frames');
  const first = await fitInitImage(animated, 8, 8);
  assert.ok(first.ok);
  const pixel = await sharp(first.png).raw().toBuffer();
  assert.ok(pixel[0] > 200 && pixel[1] < 50, `first frame is red (got ${pixel[0]},${pixel[1]})`);

  assert.deepEqual(await fitInitImage(Buffer.from('GIF89a....'), 16, 16), { ok: false, message: 'The attachment is not a PNG, JPEG or WebP picture.' });
  const truncated = (await sharp({ create: { width: 20, height: 20, channels: 3, background: '#000' } }).png().toBuffer()).subarray(0, 40);
  const damaged = await fitInitImage(truncated, 16, 16);
  assert.match(damaged.ok ? '' : damaged.message, /could not read/);
  assert.equal(INIT_IMAGE_LIMITS.maxPixels, 4096 * 4096);
});

test('Upscale doubles the size, clamped to the package’s largest at multiples of its step; Vary keeps it', async () => {
  const { JobStore } = await import('../src/store/job-store.ts');
  const { imageJob } = await import('../src/bot/buttons.ts');
  const store = new JobStore(':memory:');
  try {
    const info = {
      img2img: true,
      size: { min: 64, max: 768, multiple: 8 },
      defaults: { width: 512, height: 512 },
    } as unknown as import('../src/engine/api.ts').PackageInfo;
    const finished = (id: string, width: number, height: number) => {
      store.create({
        id,
        kind: 'imagine',
        userId: 'u',
        guildId: 'g',
        channelId: 'c',
        request: { prompt: 'p', mode: 'afa', ensemble: 'duo', seed: 10, count: 2, width, height },
        reply: { type: 'channel' },
        parentJobId: null,
        replyToMessageId: null,
      });
      const params = { width, height } as import('../src/engine/api.ts').ResolvedParams;
      store.finish(id, 'done', { result: { params, seeds: [10, 11], timings: {} as never, warnings: [] } });
      store.putImage(id, 'result', 0, Buffer.from('png0'));
      store.putImage(id, 'result', 1, Buffer.from('png1'));
      return store.get(id)!;
    };
    const small = finished('small', 256, 384);
    const up = imageJob(small, 'upscale', 1, { info, store });
    assert.ok(up.ok);
    assert.deepEqual([up.request.width, up.request.height, up.request.seed, up.request.count, up.request.strength], [512, 768, 11, 1, 0.5]);
    assert.equal(up.png.toString(), 'png1');
    assert.equal(up.request.ensemble, 'duo');

    // 512×768: its longer side is already the largest the package draws, so it keeps its shape and cannot grow.
    const tall = finished('tall', 512, 768);
    const refused = imageJob(tall, 'upscale', 0, { info, store });
    assert.equal(refused.ok, false);
    assert.match(refused.ok ? '' : refused.message, /already as large/);
    // 400×400 grows to 768×768 (clamped, not 800), a multiple of 8.
    const mid = imageJob(finished('mid', 400, 400), 'upscale', 0, { info, store });
    assert.ok(mid.ok);
    assert.deepEqual([mid.request.width, mid.request.height], [768, 768]);

    const vary = imageJob(small, 'strong', 0, { info, store });
    assert.ok(vary.ok);
    assert.deepEqual([vary.kind, vary.request.width, vary.request.height, vary.request.strength, vary.request.count], ['vary', 256, 384, 0.65, 1]);
    assert.notEqual(vary.request.seed, 10);

    const missing = imageJob(small, 'subtle', 3, { info, store });
    assert.match(missing.ok ? '' : missing.message, /no longer have this picture/);
    const noEncoder = imageJob(small, 'subtle', 0, { info: { ...info, img2img: false }, store });
    assert.match(noEncoder.ok ? '' : noEncoder.message, /cannot draw from an image/);
  } finally {
    store.close();
  }
});
