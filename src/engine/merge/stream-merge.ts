// Weight-space merge of ONNX graphs that share one structure (the classic checkpoint merger,
// θ = Σ wᵢ θᵢ), streamed tensor by tensor: each chunk of each floating-point initializer is read
// from every graph (inline, typed field or external data), accumulated, and written to one external
// data file beside the merged graph, whose protobuf is the first graph's with the initializers
// pointing into that file. Memory: a few chunk buffers, not the graphs.
import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { EngineError } from '../api.ts';
import { floatFromHalfBits } from '../float16.ts';
import { float32ToHalfBits } from './half.ts';
import { DataType, decodeVarintStorage, FLOAT_TYPES, readLayout, typeName, type ModelLayout, type TensorEntry } from './layout.ts';
import { FileBytes, MessageWriter } from './protobuf.ts';

export interface MergeInput {
  /** How errors name the graph, e.g. `expert "alpha" (…/model.onnx)`. */
  label: string;
  file: string;
}

/** The merged graph's external data file, beside its `model.onnx`. */
export const MERGED_DATA_FILE = 'model.onnx_data';
/** Tensors smaller than this stay inside the merged protobuf (as onnx's save_as_external_data does). */
const INLINE_BELOW = 1024;
/** Offsets of external tensors are multiples of this (lets onnxruntime map them). */
const ALIGN = 4096;
/** Elements per chunk: the buffers are a few times this many bytes. */
const CHUNK = 1 << 20;

let halfTable: Float32Array | undefined;
function halfToFloat(): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) halfTable[h] = floatFromHalfBits(h);
  }
  return halfTable;
}

/** Reads the layouts of the graphs, with a clear error naming any graph that cannot be read. */
export function readLayouts(inputs: MergeInput[]): ModelLayout[] {
  return inputs.map((m) => {
    try {
      return readLayout(m.file);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? `Missing graph: ${m.file}` : null;
      if (code) throw new EngineError('bad_package', code);
      throw new EngineError('bad_package', `Cannot read ${m.label} as an ONNX model: ${(err as Error).message}.`);
    }
  });
}

/** Throws an EngineError naming the first difference when the graphs' structures differ. */
export function checkSameStructure(inputs: MergeInput[], layouts: ModelLayout[]): void {
  const [base, ...others] = layouts;
  const shape = (t: TensorEntry) => `${typeName(t.dataType)} [${t.dims.join(', ')}]`;
  others.forEach((layout, k) => {
    const cannot = (why: string) =>
      new EngineError(
        'bad_request',
        `Cannot merge ${inputs[0].label} with ${inputs[k + 1].label}: the graphs have different structures (${why}). Use mode "average" instead.`,
      );
    const theirs = new Map(layout.initializers.map((t) => [t.name, t]));
    for (const a of base.initializers) {
      const b = theirs.get(a.name);
      if (!b) throw cannot(`weight "${a.name}" is missing from the second`);
      if (a.dataType !== b.dataType || a.dims.join(',') !== b.dims.join(',')) {
        throw cannot(`weight "${a.name}" is ${shape(a)} vs ${shape(b)}`);
      }
    }
    if (layout.initializers.length !== base.initializers.length) {
      const ours = new Set(base.initializers.map((t) => t.name));
      const extra = layout.initializers.find((t) => !ours.has(t.name));
      throw cannot(`weight "${extra?.name ?? '?'}" is missing from the first`);
    }
    if (layout.nodes.length !== base.nodes.length) throw cannot(`${base.nodes.length} vs ${layout.nodes.length} operators`);
    const i = base.nodes.findIndex((d, j) => d !== layout.nodes[j]);
    if (i >= 0) throw cannot(`operator #${i} differs`);
  });
}

/**
 * Open files by path, at most MAX_OPEN at a time (a graph with one external file per tensor has
 * hundreds; the least recently used is closed first).
 */
class FilePool {
  private static readonly MAX_OPEN = 64;
  private readonly handles = new Map<string, Promise<FileHandle>>();

  async get(file: string): Promise<FileHandle> {
    let fh = this.handles.get(file);
    if (fh) this.handles.delete(file);
    else fh = open(file, 'r');
    this.handles.set(file, fh);
    while (this.handles.size > FilePool.MAX_OPEN) {
      const [oldest, handle] = this.handles.entries().next().value as [string, Promise<FileHandle>];
      this.handles.delete(oldest);
      await (await handle).close();
    }
    return fh;
  }

  async close(): Promise<void> {
    const all = [...this.handles.values()];
    this.handles.clear();
    for (const fh of all) await (await fh.catch(() => undefined))?.close();
  }
}

/** Reads a tensor's little-endian bytes in pieces, from a file or from decoded varints. */
class TensorBytes {
  private decoded: Uint8Array | undefined;

  constructor(
    private readonly tensor: TensorEntry,
    private readonly files: FilePool,
  ) {
    if (tensor.storage.kind === 'varints') {
      const src = new FileBytes(tensor.storage.file);
      try {
        this.decoded = decodeVarintStorage(src, tensor);
      } finally {
        src.close();
      }
    }
  }

  async read(byteOffset: number, into: Uint8Array): Promise<void> {
    if (this.decoded) {
      into.set(this.decoded.subarray(byteOffset, byteOffset + into.length));
      return;
    }
    const s = this.tensor.storage as { file: string; offset: number };
    const fh = await this.files.get(s.file);
    let done = 0;
    while (done < into.length) {
      const { bytesRead } = await fh.read(into, done, into.length - done, s.offset + byteOffset + done);
      if (bytesRead === 0) throw new Error(`weight "${this.tensor.name}": ${path.basename(s.file)} ends early (truncated?)`);
      done += bytesRead;
    }
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** acc[0..n) += w · values of `bytes` (little-endian, of `dataType`). */
function accumulate(acc: Float64Array, bytes: ArrayBuffer, n: number, dataType: number, w: number): void {
  switch (dataType) {
    case DataType.FLOAT: {
      const v = new Float32Array(bytes, 0, n);
      for (let j = 0; j < n; j++) acc[j] += w * v[j];
      break;
    }
    case DataType.FLOAT16: {
      const v = new Uint16Array(bytes, 0, n);
      const table = halfToFloat();
      for (let j = 0; j < n; j++) acc[j] += w * table[v[j]];
      break;
    }
    case DataType.BFLOAT16: {
      const v = new Uint16Array(bytes, 0, n);
      const f = new Float32Array(1);
      const u = new Uint32Array(f.buffer);
      for (let j = 0; j < n; j++) {
        u[0] = v[j] << 16;
        acc[j] += w * f[0];
      }
      break;
    }
    default: {
      const v = new Float64Array(bytes, 0, n);
      for (let j = 0; j < n; j++) acc[j] += w * v[j];
    }
  }
}

/** Writes acc[0..n) as `dataType` into `out` (values go through float32 first, as before streaming). */
function encode(acc: Float64Array, n: number, dataType: number, out: ArrayBuffer): void {
  switch (dataType) {
    case DataType.FLOAT: {
      const o = new Float32Array(out, 0, n);
      for (let j = 0; j < n; j++) o[j] = acc[j];
      break;
    }
    case DataType.FLOAT16: {
      // through float32, kept in the second half of the buffer
      const f = new Float32Array(out, out.byteLength / 2, n);
      for (let j = 0; j < n; j++) f[j] = acc[j];
      float32ToHalfBits(f, n, new Uint16Array(out, 0, n));
      break;
    }
    case DataType.BFLOAT16: {
      const o = new Uint16Array(out, 0, n);
      const f = new Float32Array(1);
      const u = new Uint32Array(f.buffer);
      for (let j = 0; j < n; j++) {
        f[0] = acc[j];
        const x = u[0];
        o[j] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
      }
      break;
    }
    default:
      new Float64Array(out, 0, n).set(acc.subarray(0, n));
  }
}

function encodeTensorHeader(t: TensorEntry): MessageWriter {
  const m = new MessageWriter();
  for (const d of t.dims) m.varint(1, d);
  m.varint(2, t.dataType);
  m.string(8, t.name);
  return m;
}

/**
 * Writes `outDir/model.onnx` + `outDir/model.onnx_data`: the first graph with every floating-point
 * initializer replaced by Σ wᵢ θᵢ (weights normalised to sum 1; each tensor keeps the first graph's
 * type). Initializers of other types must be equal in all graphs; the first graph's are kept.
 * Throws an EngineError naming the first structural difference or unreadable graph.
 */
export async function mergeGraphs(
  inputs: MergeInput[],
  weights: number[],
  outDir: string,
  known?: ModelLayout[],
): Promise<string> {
  if (inputs.length < 2) throw new EngineError('bad_request', 'A merge needs at least two models.');
  if (weights.length !== inputs.length) throw new EngineError('bad_request', 'A merge needs one weight per model.');
  const total = weights.reduce((s, w) => s + w, 0);
  if (!(total > 0) || weights.some((w) => !(w >= 0))) {
    throw new EngineError('bad_request', 'Merge weights must be zero or more, and not all zero.');
  }
  const norm = weights.map((w) => w / total);
  const layouts = known ?? readLayouts(inputs);
  checkSameStructure(inputs, layouts);
  const byName = layouts.map((l) => new Map(l.initializers.map((t) => [t.name, t])));

  const files = new FilePool();
  const modelPath = path.join(outDir, 'model.onnx');
  const data = await open(path.join(outDir, MERGED_DATA_FILE), 'w');
  try {
    const input = new ArrayBuffer(CHUNK * 8);
    const other = new ArrayBuffer(CHUNK * 8);
    const output = new ArrayBuffer(CHUNK * 8);
    const acc = new Float64Array(CHUNK);
    let dataEnd = 0;
    const encoded: Uint8Array[] = [];
    for (const base of layouts[0].initializers) {
      const tensors = byName.map((m) => m.get(base.name)!);
      const readers = tensors.map((t, k) => {
        try {
          return new TensorBytes(t, files);
        } catch (err) {
          throw new EngineError('bad_package', `Cannot read ${inputs[k].label}: ${(err as Error).message}.`);
        }
      });
      const byteLength = base.count * base.elementBytes;
      const inline = byteLength < INLINE_BELOW;
      const inlineBytes = inline ? new Uint8Array(byteLength) : undefined;
      const offset = inline ? 0 : Math.ceil(dataEnd / ALIGN) * ALIGN;
      const isFloat = FLOAT_TYPES.has(base.dataType);
      for (let at = 0; at < base.count; at += CHUNK) {
        const n = Math.min(CHUNK, base.count - at);
        const len = n * base.elementBytes;
        const byteAt = at * base.elementBytes;
        let result: Uint8Array;
        if (isFloat) {
          acc.fill(0, 0, n);
          for (let k = 0; k < readers.length; k++) {
            await readChunk(readers[k], byteAt, new Uint8Array(input, 0, len), inputs[k].label);
            accumulate(acc, input, n, base.dataType, norm[k]);
          }
          encode(acc, n, base.dataType, output);
          result = new Uint8Array(output, 0, len);
        } else {
          // not averaged: taken from the first graph after checking that the others hold the same values
          result = new Uint8Array(input, 0, len);
          await readChunk(readers[0], byteAt, result, inputs[0].label);
          for (let k = 1; k < readers.length; k++) {
            const theirs = new Uint8Array(other, 0, len);
            await readChunk(readers[k], byteAt, theirs, inputs[k].label);
            if (!sameBytes(result, theirs)) {
              throw new EngineError(
                'bad_request',
                `Cannot merge ${inputs[0].label} with ${inputs[k].label}: the graphs have different structures (${typeName(base.dataType)} weight "${base.name}" differs). Use mode "average" instead.`,
              );
            }
          }
        }
        if (inlineBytes) inlineBytes.set(result, byteAt);
        else await writeAll(data, result, offset + byteAt);
      }
      const header = encodeTensorHeader(base);
      if (inlineBytes) header.bytes(9, inlineBytes);
      else {
        header.varint(14, 1);
        header.bytes(13, new MessageWriter().string(1, 'location').string(2, MERGED_DATA_FILE).finish());
        header.bytes(13, new MessageWriter().string(1, 'offset').string(2, String(offset)).finish());
        header.bytes(13, new MessageWriter().string(1, 'length').string(2, String(byteLength)).finish());
        dataEnd = offset + byteLength;
      }
      encoded.push(header.finish());
    }
    await data.sync();
    const model = await open(modelPath, 'w');
    try {
      await writeAll(model, buildModel(layouts[0], encoded), 0);
      await model.sync();
    } finally {
      await model.close();
    }
  } finally {
    await data.close();
    await files.close();
  }
  return modelPath;
}

async function readChunk(reader: TensorBytes, byteAt: number, into: Uint8Array, label: string): Promise<void> {
  try {
    await reader.read(byteAt, into);
  } catch (err) {
    throw new EngineError('bad_package', `Cannot read ${label}: ${(err as Error).message}.`);
  }
}

async function writeAll(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.length - done, position + done);
    done += bytesWritten;
  }
}

/** The first graph's model with its initializers replaced by `encoded` (in the same order). */
function buildModel(layout: ModelLayout, encoded: Uint8Array[]): Uint8Array {
  const src = new FileBytes(layout.file);
  try {
    const graph = new MessageWriter();
    for (const f of layout.graphFields) {
      if (typeof f === 'number') graph.bytes(5, encoded[f]);
      else graph.raw(src.bytes(f.start, f.end));
    }
    const model = new MessageWriter();
    for (const f of layout.modelFields) model.raw(src.bytes(f.start, f.end));
    model.bytes(7, graph.finish());
    return model.finish();
  } finally {
    src.close();
  }
}
