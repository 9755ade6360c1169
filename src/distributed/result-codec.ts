// Binary form of a generation's result (and of preview images) for Redis: a JSON header followed by
// the raw pixel and weight bytes, so that images do not grow by a third as base64 would.
import type { ContributionMaps, GenerateResult, RgbImage } from '../engine/api.ts';

const MAGIC = 'EDR1';

type Span = [offset: number, length: number];

interface Header {
  params: GenerateResult['params'];
  timings: GenerateResult['timings'];
  warnings: string[];
  images: {
    seed: number;
    width: number;
    height: number;
    pixels: Span;
    contributions?: Omit<ContributionMaps, 'weights'> & { weights: Span[] };
  }[];
}

class BlobWriter {
  readonly chunks: Buffer[] = [];
  private size = 0;

  add(bytes: Buffer): Span {
    const span: Span = [this.size, bytes.length];
    this.chunks.push(bytes);
    this.size += bytes.length;
    return span;
  }
}

function floatsToBytes(values: Float32Array): Buffer {
  const out = Buffer.allocUnsafe(values.length * 4);
  for (let i = 0; i < values.length; i++) out.writeFloatLE(values[i], i * 4);
  return out;
}

function bytesToFloats(bytes: Buffer): Float32Array {
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = bytes.readFloatLE(i * 4);
  return out;
}

function pack(header: unknown, blobs: Buffer[]): Buffer {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.write(MAGIC, 0, 'latin1');
  prefix.writeUInt32LE(json.length, 4);
  return Buffer.concat([prefix, json, ...blobs]);
}

function unpack<T>(data: Buffer): { header: T; blob: (span: Span) => Buffer } {
  if (data.length < 8 || data.toString('latin1', 0, 4) !== MAGIC) throw new Error('not an encoded result');
  const headerLength = data.readUInt32LE(4);
  const header = JSON.parse(data.toString('utf8', 8, 8 + headerLength)) as T;
  const base = 8 + headerLength;
  return {
    header,
    blob: ([offset, length]) => {
      if (base + offset + length > data.length) throw new Error('truncated result');
      return data.subarray(base + offset, base + offset + length);
    },
  };
}

export function encodeResult(result: GenerateResult): Buffer {
  const blobs = new BlobWriter();
  const header: Header = {
    params: result.params,
    timings: result.timings,
    warnings: result.warnings,
    images: result.images.map((img) => ({
      seed: img.seed,
      width: img.image.width,
      height: img.image.height,
      pixels: blobs.add(Buffer.from(img.image.data.buffer, img.image.data.byteOffset, img.image.data.byteLength)),
      ...(img.contributions
        ? { contributions: { ...img.contributions, weights: img.contributions.weights.map((w) => blobs.add(floatsToBytes(w))) } }
        : {}),
    })),
  };
  return pack(header, blobs.chunks);
}

export function decodeResult(data: Buffer): GenerateResult {
  const { header, blob } = unpack<Header>(data);
  return {
    params: header.params,
    timings: header.timings,
    warnings: header.warnings,
    images: header.images.map((img) => ({
      seed: img.seed,
      image: { width: img.width, height: img.height, data: new Uint8Array(blob(img.pixels)) },
      ...(img.contributions
        ? { contributions: { ...img.contributions, weights: img.contributions.weights.map((span) => bytesToFloats(blob(span))) } }
        : {}),
    })),
  };
}

export function encodeImage(image: RgbImage): Buffer {
  return pack({ width: image.width, height: image.height }, [Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength)]);
}

export function decodeImage(data: Buffer): RgbImage {
  const { header, blob } = unpack<{ width: number; height: number }>(data);
  return { width: header.width, height: header.height, data: new Uint8Array(blob([0, header.width * header.height * 3])) };
}
