// PNG encoding with text chunks. sharp (libvips) cannot write arbitrary tEXt keys, so the
// `parameters` chunk is spliced in after IHDR by hand.
import { inflateSync } from 'node:zlib';
import sharp from 'sharp';
import type { ResolvedParams, RgbImage } from '../api.ts';
import { formatParameters } from './parameters.ts';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 (ISO-HDLC, as PNG chunks use it). */
export function crc32(bytes: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

function chunk(type: string, data: Buffer): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

function isLatin1(text: string): boolean {
  return /^[\u0000-\u00ff]*$/.test(text);
}

/**
 * A text chunk the way Pillow (and so A1111) writes it: tEXt when the text fits Latin-1,
 * otherwise an uncompressed UTF-8 iTXt.
 */
export function textChunk(keyword: string, text: string): Buffer {
  if (!/^[\u0020-\u007e\u00a1-\u00ff]{1,79}$/.test(keyword) || keyword !== keyword.trim()) {
    throw new Error(`invalid PNG text keyword: ${JSON.stringify(keyword)}`);
  }
  if (isLatin1(text)) {
    return chunk('tEXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0]), Buffer.from(text, 'latin1')]));
  }
  // keyword\0, compression flag 0, method 0, empty language tag\0, empty translated keyword\0
  return chunk(
    'iTXt',
    Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0, 0, 0, 0, 0]), Buffer.from(text, 'utf8')]),
  );
}

interface RawChunk {
  type: string;
  start: number;
  data: Buffer;
}

function* chunksOf(png: Buffer): Generator<RawChunk> {
  if (png.length < 8 || !png.subarray(0, 8).equals(PNG_SIGNATURE)) throw new Error('not a PNG file');
  let offset = 8;
  while (offset + 12 <= png.length) {
    const length = png.readUInt32BE(offset);
    const end = offset + 12 + length;
    if (end > png.length) throw new Error('truncated PNG chunk');
    const type = png.toString('latin1', offset + 4, offset + 8);
    yield { type, start: offset, data: png.subarray(offset + 8, offset + 8 + length) };
    offset = end;
    if (type === 'IEND') return;
  }
}

/** Returns a copy of `png` with tEXt/iTXt chunks for `texts` inserted right after IHDR. */
export function insertPngText(png: Buffer, texts: Record<string, string>): Buffer {
  const first = chunksOf(png).next();
  if (first.done || first.value.type !== 'IHDR') throw new Error('PNG does not start with IHDR');
  const afterHeader = first.value.start + 12 + first.value.data.length;
  const inserted = Object.entries(texts).map(([keyword, text]) => textChunk(keyword, text));
  return Buffer.concat([png.subarray(0, afterHeader), ...inserted, png.subarray(afterHeader)]);
}

function splitAtNul(data: Buffer, from = 0): [string, number] {
  const nul = data.indexOf(0, from);
  if (nul < 0) throw new Error('malformed PNG text chunk');
  return [data.toString('latin1', from, nul), nul + 1];
}

/** Every tEXt, zTXt and iTXt entry of a PNG, keyword → text (the first of duplicate keywords wins). */
export function readPngText(png: Uint8Array): Record<string, string> {
  const buffer = Buffer.isBuffer(png) ? png : Buffer.from(png.buffer, png.byteOffset, png.byteLength);
  const texts: Record<string, string> = {};
  const add = (keyword: string, text: string): void => {
    if (!(keyword in texts)) texts[keyword] = text;
  };
  for (const { type, data } of chunksOf(buffer)) {
    if (type === 'tEXt') {
      const [keyword, rest] = splitAtNul(data);
      add(keyword, data.toString('latin1', rest));
    } else if (type === 'zTXt') {
      const [keyword, rest] = splitAtNul(data);
      add(keyword, inflateSync(data.subarray(rest + 1)).toString('latin1'));
    } else if (type === 'iTXt') {
      const [keyword, afterKeyword] = splitAtNul(data);
      const compressed = data[afterKeyword] === 1;
      const [, afterLanguage] = splitAtNul(data, afterKeyword + 2);
      const [, afterTranslated] = splitAtNul(data, afterLanguage);
      const body = data.subarray(afterTranslated);
      add(keyword, (compressed ? inflateSync(body) : body).toString('utf8'));
    }
  }
  return texts;
}

export type Resample = 'nearest' | 'lanczos';

export interface EncodePngOptions {
  /** Upscale (or downscale) to this size for display; the `Size` parameter keeps the generated size. */
  displayWidth?: number;
  displayHeight?: number;
  /** Default `nearest`, which keeps tiny model outputs crisp; `lanczos` smooths them. */
  resample?: Resample;
}

export function checkRgbImage(image: RgbImage): void {
  if (!Number.isInteger(image.width) || !Number.isInteger(image.height) || image.width <= 0 || image.height <= 0) {
    throw new Error(`invalid image size ${image.width}x${image.height}`);
  }
  if (image.data.length !== image.width * image.height * 3) {
    throw new Error(`image data has ${image.data.length} bytes, expected ${image.width * image.height * 3}`);
  }
}

/** sharp pipeline over an RgbImage, resized when a target size differs from the image's. */
export function sharpFromRgb(image: RgbImage, width = image.width, height = image.height, resample: Resample = 'nearest') {
  checkRgbImage(image);
  const pipeline = sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } });
  if (width === image.width && height === image.height) return pipeline;
  return pipeline.resize(width, height, { fit: 'fill', kernel: resample === 'nearest' ? 'nearest' : 'lanczos3' });
}

/** The display size; a single given side keeps the image's aspect ratio. */
export function displaySize(image: RgbImage, width?: number, height?: number): { width: number; height: number } {
  if (width === undefined && height === undefined) return { width: image.width, height: image.height };
  const w = width ?? Math.max(1, Math.round((image.width * height!) / image.height));
  const h = height ?? Math.max(1, Math.round((image.height * width!) / image.width));
  if (!Number.isInteger(w) || !Number.isInteger(h) || w <= 0 || h <= 0) throw new Error(`invalid display size ${w}x${h}`);
  return { width: w, height: h };
}

/** PNG bytes; with `params`, a `parameters` text chunk in A1111's format. */
export async function encodePng(image: RgbImage, params?: ResolvedParams, opts: EncodePngOptions = {}): Promise<Buffer> {
  const { width, height } = displaySize(image, opts.displayWidth, opts.displayHeight);
  const png = await sharpFromRgb(image, width, height, opts.resample).png().toBuffer();
  return params ? insertPngText(png, { parameters: formatParameters(params) }) : png;
}
