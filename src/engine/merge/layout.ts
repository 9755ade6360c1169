// Where things are in an ONNX model file: the graph's operators (as digests, to compare structures),
// the fields to copy into a merged model, and every initializer's name, type, shape and storage
// (inline raw_data, a typed field such as float_data or int32_data, or ONNX external data: a file
// beside the graph at an offset). Nothing is loaded but headers.
import { statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { FileBytes, fields, packedVarints, Wire, type ByteSource } from './protobuf.ts';

export const DataType = {
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  UINT16: 4,
  INT16: 5,
  INT32: 6,
  INT64: 7,
  STRING: 8,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
  UINT32: 12,
  UINT64: 13,
  BFLOAT16: 16,
} as const;

/** The types a merge averages; every other type must be equal across the merged graphs. */
export const FLOAT_TYPES: ReadonlySet<number> = new Set([DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE, DataType.BFLOAT16]);

const ELEMENT_BYTES: Record<number, number> = {
  1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
  17: 1, 18: 1, 19: 1, 20: 1, // float8 variants
};

const TYPE_NAMES: Record<number, string> = {
  1: 'float32', 2: 'uint8', 3: 'int8', 4: 'uint16', 5: 'int16', 6: 'int32', 7: 'int64', 8: 'string', 9: 'bool',
  10: 'float16', 11: 'float64', 12: 'uint32', 13: 'uint64', 16: 'bfloat16',
};

export function typeName(dataType: number): string {
  return TYPE_NAMES[dataType] ?? `type ${dataType}`;
}

/**
 * Where a tensor's little-endian values are: `bytes` at an offset of a file (the graph's own raw_data,
 * float_data or double_data, or an external data file), or `varints` (int32_data, int64_data,
 * uint64_data) in the graph file that must be decoded first.
 */
export type Storage =
  | { kind: 'bytes'; file: string; offset: number; length: number }
  | { kind: 'varints'; file: string; field: number; start: number; end: number };

export interface TensorEntry {
  name: string;
  dataType: number;
  dims: number[];
  count: number;
  elementBytes: number;
  storage: Storage;
}

export interface Range {
  start: number;
  end: number;
}

export interface ModelLayout {
  file: string;
  /** Top-level fields other than the graph, as encoded byte ranges (key included). */
  modelFields: Range[];
  /** The graph's fields in order: encoded byte ranges, or the index of an initializer. */
  graphFields: (Range | number)[];
  /** SHA-256 of each operator's encoding, in order. */
  nodes: string[];
  initializers: TensorEntry[];
  /** The external data files the initializers read, with their sizes and modification times. */
  externalFiles: { file: string; size: number; mtimeMs: number }[];
}

const decoder = new TextDecoder();

/** Reads the layout of the model at `file`; throws an Error with a one-line reason. */
export function readLayout(file: string): ModelLayout {
  const src = new FileBytes(file);
  try {
    return parseModel(src, file);
  } finally {
    src.close();
  }
}

function parseModel(src: FileBytes, file: string): ModelLayout {
  const layout: ModelLayout = { file, modelFields: [], graphFields: [], nodes: [], initializers: [], externalFiles: [] };
  let graph: Range | undefined;
  for (const f of fields(src, 0, src.size)) {
    if (f.number === 7 && f.wire === Wire.Bytes) {
      if (graph) throw new Error('two graphs in one model');
      graph = { start: f.start, end: f.end };
    } else layout.modelFields.push({ start: f.keyStart, end: f.end });
  }
  if (!graph) throw new Error('no graph in the model');
  const externalSizes = new Map<string, { size: number; mtimeMs: number }>();
  for (const f of fields(src, graph.start, graph.end)) {
    if (f.number === 5 && f.wire === Wire.Bytes) {
      layout.graphFields.push(layout.initializers.length);
      layout.initializers.push(parseTensor(src, f.start, f.end, file, externalSizes));
      continue;
    }
    if (f.number === 15) throw new Error('sparse initializers are not supported');
    if (f.number === 1 && f.wire === Wire.Bytes) {
      layout.nodes.push(createHash('sha256').update(src.bytes(f.start, f.end)).digest('hex'));
    }
    layout.graphFields.push({ start: f.keyStart, end: f.end });
  }
  layout.externalFiles = [...externalSizes].map(([f, s]) => ({ file: f, ...s }));
  return layout;
}

function parseTensor(
  src: ByteSource & { bytes(start: number, end: number): Uint8Array },
  start: number,
  end: number,
  file: string,
  externalSizes: Map<string, { size: number; mtimeMs: number }>,
): TensorEntry {
  let name = '';
  let dataType = 0;
  const dims: number[] = [];
  let payload: { field: number; start: number; end: number } | undefined;
  let external = false;
  const entries = new Map<string, string>();
  for (const f of fields(src, start, end)) {
    switch (f.number) {
      case 1:
        if (f.wire === Wire.Varint) dims.push(f.value);
        else dims.push(...packedVarints(src, f.start, f.end));
        break;
      case 2:
        dataType = f.value;
        break;
      case 3:
        throw new Error('segmented tensors are not supported');
      case 8:
        name = decoder.decode(src.bytes(f.start, f.end));
        break;
      case 4:
      case 5:
      case 6:
      case 7:
      case 9:
      case 10:
      case 11:
        if (f.wire !== Wire.Bytes) throw new Error(`unpacked repeated field ${f.number} in a tensor is not supported`);
        if (payload && payload.end > payload.start && f.end > f.start) throw new Error('a tensor with two data fields');
        if (!payload || f.end > f.start) payload = { field: f.number, start: f.start, end: f.end };
        break;
      case 13: {
        let key = '';
        let value = '';
        for (const e of fields(src, f.start, f.end)) {
          if (e.number === 1) key = decoder.decode(src.bytes(e.start, e.end));
          else if (e.number === 2) value = decoder.decode(src.bytes(e.start, e.end));
        }
        entries.set(key, value);
        break;
      }
      case 14:
        external = f.value === 1;
        break;
      default:
        break; // doc_string, metadata: not copied
    }
  }
  const label = `weight "${name}"`;
  const elementBytes = ELEMENT_BYTES[dataType];
  if (elementBytes === undefined) throw new Error(`${label} has ${typeName(dataType)} values, which a merge cannot read`);
  const count = dims.reduce((a, b) => a * b, 1);
  const byteLength = count * elementBytes;
  let storage: Storage;
  if (external) {
    const location = entries.get('location');
    if (!location) throw new Error(`${label} is external data without a location`);
    const dir = path.dirname(file);
    const target = path.resolve(dir, location);
    const rel = path.relative(dir, target);
    if (path.isAbsolute(location) || rel.startsWith('..') || path.isAbsolute(rel)) {
      throw new Error(`${label} is external data outside the graph's folder (${location})`);
    }
    let info = externalSizes.get(target);
    if (!info) {
      try {
        const s = statSync(target);
        info = { size: s.size, mtimeMs: s.mtimeMs };
      } catch {
        throw new Error(`${label} is stored in ${location}, which is missing`);
      }
      externalSizes.set(target, info);
    }
    const offset = Number(entries.get('offset') ?? 0);
    const length = entries.has('length') ? Number(entries.get('length')) : info.size - offset;
    if (length !== byteLength) {
      throw new Error(`${label} [${dims.join(', ')}] ${typeName(dataType)} needs ${byteLength} bytes, its external data entry says ${length}`);
    }
    if (offset + length > info.size) {
      throw new Error(`${label} needs bytes ${offset}–${offset + length} of ${location}, which has only ${info.size} (truncated?)`);
    }
    storage = { kind: 'bytes', file: target, offset, length };
  } else if (!payload || payload.end === payload.start) {
    if (count !== 0) throw new Error(`${label} has no data`);
    storage = { kind: 'bytes', file, offset: 0, length: 0 };
  } else if (payload.field === 9 || (payload.field === 4 && dataType === DataType.FLOAT) || (payload.field === 10 && dataType === DataType.DOUBLE)) {
    // raw_data, and float_data / double_data of their own type, are the little-endian values themselves
    const length = payload.end - payload.start;
    if (length !== byteLength) {
      throw new Error(`${label} [${dims.join(', ')}] ${typeName(dataType)} needs ${byteLength} bytes, it holds ${length}`);
    }
    storage = { kind: 'bytes', file, offset: payload.start, length };
  } else if (payload.field === 5 || payload.field === 7 || payload.field === 11) {
    storage = { kind: 'varints', file, field: payload.field, start: payload.start, end: payload.end };
  } else {
    throw new Error(`${label} (${typeName(dataType)}) stores its values in a field a merge cannot read (${payload.field})`);
  }
  return { name, dataType, dims, count, elementBytes, storage };
}

/**
 * The little-endian bytes of a tensor stored as varints (int32_data: one value per element, of which
 * the element's bits are the low ones, e.g. float16 bits; int64_data / uint64_data: 64-bit values).
 */
export function decodeVarintStorage(src: FileBytes, tensor: TensorEntry): Uint8Array {
  if (tensor.storage.kind !== 'varints') throw new Error('not varint storage');
  const { start, end, field } = tensor.storage;
  const payload = src.bytes(start, end);
  const out = new Uint8Array(tensor.count * tensor.elementBytes);
  const view = new DataView(out.buffer);
  let pos = 0;
  let i = 0;
  const next = (): number => {
    if (pos >= payload.length) throw new Error(`weight "${tensor.name}" ends inside a value (truncated?)`);
    return payload[pos++];
  };
  while (pos < payload.length) {
    if (i >= tensor.count) throw new Error(`weight "${tensor.name}" holds more values than its shape [${tensor.dims.join(', ')}]`);
    if (field === 5) {
      // low 32 bits are exact even for the 10-byte encoding of negative int32 values
      let low = 0;
      let shift = 0;
      for (;;) {
        const b = next();
        if (shift < 32) low |= (b & 0x7f) << shift;
        shift += 7;
        if ((b & 0x80) === 0) break;
      }
      const at = i * tensor.elementBytes;
      if (tensor.elementBytes === 1) view.setUint8(at, low & 0xff);
      else if (tensor.elementBytes === 2) view.setUint16(at, low & 0xffff, true);
      else view.setUint32(at, low >>> 0, true);
    } else {
      let value = 0n;
      let shift = 0n;
      for (;;) {
        const b = next();
        value |= BigInt(b & 0x7f) << shift;
        shift += 7n;
        if ((b & 0x80) === 0) break;
      }
      const at = i * tensor.elementBytes;
      if (tensor.elementBytes === 8) view.setBigUint64(at, BigInt.asUintN(64, value), true);
      else view.setUint32(at, Number(BigInt.asUintN(32, value)), true);
    }
    i++;
  }
  if (i !== tensor.count) throw new Error(`weight "${tensor.name}" holds ${i} values, its shape [${tensor.dims.join(', ')}] needs ${tensor.count}`);
  return out;
}
