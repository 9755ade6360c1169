// Just enough protobuf to walk an ONNX model file without loading it: fields are read through a
// small window over the file (synchronous reads at offsets), so a multi-gigabyte graph costs a few
// header reads, and payloads are located, not copied. Writing is field by field into byte arrays.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';

export const Wire = { Varint: 0, Fixed64: 1, Bytes: 2, Fixed32: 5 } as const;

/** One field: its number and wire type, where its key starts, and its value (or payload) range. */
export interface Field {
  number: number;
  wire: number;
  /** Offset of the field's key (the field's bytes are [keyStart, end)). */
  keyStart: number;
  /** Varint: the value's bytes; Bytes: the payload; fixed: the value's bytes. */
  start: number;
  end: number;
  /** Varint value (exact below 2^53), or the payload length for Bytes. */
  value: number;
}

/** Bytes at offsets of an open file, through a reusable window buffer. */
export class FileBytes {
  readonly size: number;
  private readonly fd: number;
  private readonly window = Buffer.allocUnsafe(1 << 16);
  private windowStart = 0;
  private windowLength = 0;

  constructor(readonly path: string) {
    this.fd = openSync(path, 'r');
    this.size = fstatSync(this.fd).size;
  }

  byte(pos: number): number {
    if (pos < this.windowStart || pos >= this.windowStart + this.windowLength) {
      if (pos >= this.size) throw new Error('the file ends inside a field (truncated?)');
      this.windowStart = pos;
      this.windowLength = readSync(this.fd, this.window, 0, this.window.length, pos);
    }
    return this.window[pos - this.windowStart];
  }

  /** A copy of [start, end). */
  bytes(start: number, end: number): Uint8Array {
    if (end > this.size) throw new Error('the file ends inside a field (truncated?)');
    const out = new Uint8Array(end - start);
    let done = 0;
    while (done < out.length) {
      const n = readSync(this.fd, out, done, out.length - done, start + done);
      if (n === 0) throw new Error('the file ends inside a field (truncated?)');
      done += n;
    }
    return out;
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Something whose bytes can be read one at a time: a file window or an array. */
export interface ByteSource {
  byte(pos: number): number;
}

export function arraySource(buf: Uint8Array): ByteSource {
  return {
    byte(pos) {
      if (pos >= buf.length) throw new Error('truncated field');
      return buf[pos];
    },
  };
}

export function readVarint(src: ByteSource, pos: number): [number, number] {
  let result = 0;
  let scale = 1;
  for (;;) {
    const b = src.byte(pos++);
    result += (b & 0x7f) * scale;
    if ((b & 0x80) === 0) return [result, pos];
    scale *= 128;
    if (scale > 2 ** 70) throw new Error('malformed varint');
  }
}

/** The fields of the message in [start, end). */
export function* fields(src: ByteSource, start: number, end: number): Generator<Field> {
  let pos = start;
  while (pos < end) {
    const keyStart = pos;
    const [key, afterKey] = readVarint(src, pos);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    pos = afterKey;
    switch (wire) {
      case Wire.Varint: {
        const [value, next] = readVarint(src, pos);
        yield { number, wire, keyStart, start: pos, end: next, value };
        pos = next;
        break;
      }
      case Wire.Fixed64:
        yield { number, wire, keyStart, start: pos, end: pos + 8, value: 0 };
        pos += 8;
        break;
      case Wire.Fixed32:
        yield { number, wire, keyStart, start: pos, end: pos + 4, value: 0 };
        pos += 4;
        break;
      case Wire.Bytes: {
        const [length, next] = readVarint(src, pos);
        const payloadEnd = next + length;
        if (payloadEnd > end) throw new Error('a field runs past the end of its message (truncated?)');
        yield { number, wire, keyStart, start: next, end: payloadEnd, value: length };
        pos = payloadEnd;
        break;
      }
      default:
        throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  }
  if (pos !== end) throw new Error('a field runs past the end of its message (truncated?)');
}

/** Packed varints in [start, end) (int32_data, int64_data, packed dims). */
export function packedVarints(src: ByteSource, start: number, end: number): number[] {
  const out: number[] = [];
  for (let p = start; p < end; ) {
    const [v, next] = readVarint(src, p);
    out.push(v);
    p = next;
  }
  return out;
}

// ---- writing ----

export function varintBytes(value: number): number[] {
  if (!Number.isSafeInteger(value) || value < 0) throw new Error(`cannot encode ${value} as a varint`);
  const out: number[] = [];
  while (value >= 0x80) {
    out.push((value % 128) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
  return out;
}

/** Builds a message from fields, in order. */
export class MessageWriter {
  private parts: Uint8Array[] = [];
  private length = 0;

  private push(bytes: Uint8Array): this {
    this.parts.push(bytes);
    this.length += bytes.length;
    return this;
  }

  varint(number: number, value: number): this {
    return this.push(Uint8Array.from([...varintBytes(number * 8 + Wire.Varint), ...varintBytes(value)]));
  }

  bytes(number: number, payload: Uint8Array): this {
    this.push(Uint8Array.from([...varintBytes(number * 8 + Wire.Bytes), ...varintBytes(payload.length)]));
    return this.push(payload);
  }

  string(number: number, text: string): this {
    return this.bytes(number, new TextEncoder().encode(text));
  }

  /** Bytes that already are whole encoded fields (copied from another message). */
  raw(encodedFields: Uint8Array): this {
    return this.push(encodedFields);
  }

  finish(): Uint8Array {
    const out = new Uint8Array(this.length);
    let pos = 0;
    for (const p of this.parts) {
      out.set(p, pos);
      pos += p.length;
    }
    return out;
  }
}
