// Weight-space merge of ONNX graphs that share one structure (the classic checkpoint merger,
// θ = Σ wᵢ θᵢ), done on the serialized protobuf: the first graph's bytes are copied and every
// floating-point initializer's payload is overwritten, in place, with the weighted average.
import { EngineError } from './api.ts';
import { float16ToFloat32, float32ToFloat16 } from './float16.ts';

const enum Wire {
  Varint = 0,
  Fixed64 = 1,
  Bytes = 2,
  Fixed32 = 5,
}

interface Field {
  number: number;
  wire: number;
  /** For Bytes: payload start/end; for others: the value's start/end. */
  start: number;
  end: number;
  value: bigint;
}

function readVarint(buf: Uint8Array, pos: number): [bigint, number] {
  let result = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const b = buf[pos++];
    result |= BigInt(b & 0x7f) << shift;
    if ((b & 0x80) === 0) return [result, pos];
    shift += 7n;
  }
}

function* fields(buf: Uint8Array, start: number, end: number): Generator<Field> {
  let pos = start;
  while (pos < end) {
    const [key, afterKey] = readVarint(buf, pos);
    const number = Number(key >> 3n);
    const wire = Number(key & 7n);
    pos = afterKey;
    switch (wire) {
      case Wire.Varint: {
        const [value, next] = readVarint(buf, pos);
        yield { number, wire, start: pos, end: next, value };
        pos = next;
        break;
      }
      case Wire.Fixed64:
        yield { number, wire, start: pos, end: pos + 8, value: 0n };
        pos += 8;
        break;
      case Wire.Fixed32:
        yield { number, wire, start: pos, end: pos + 4, value: 0n };
        pos += 4;
        break;
      case Wire.Bytes: {
        const [len, next] = readVarint(buf, pos);
        const payloadEnd = next + Number(len);
        if (payloadEnd > end) throw new Error('truncated field');
        yield { number, wire, start: next, end: payloadEnd, value: len };
        pos = payloadEnd;
        break;
      }
      default:
        throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

const DataType = { FLOAT: 1, FLOAT16: 10, DOUBLE: 11, BFLOAT16: 16 } as const;

interface Initializer {
  name: string;
  dataType: number;
  dims: number[];
  /** Where the tensor's values are stored (raw_data, or packed float_data). */
  payload: { start: number; end: number } | undefined;
  external: boolean;
}

interface GraphLayout {
  nodes: Uint8Array[];
  initializers: Initializer[];
}

const decoder = new TextDecoder();

function parseInitializer(buf: Uint8Array, start: number, end: number): Initializer {
  const init: Initializer = { name: '', dataType: 0, dims: [], payload: undefined, external: false };
  for (const f of fields(buf, start, end)) {
    if (f.number === 1) {
      if (f.wire === Wire.Varint) init.dims.push(Number(f.value));
      else for (let p = f.start; p < f.end; ) {
        const [v, next] = readVarint(buf, p);
        init.dims.push(Number(v));
        p = next;
      }
    } else if (f.number === 2) init.dataType = Number(f.value);
    else if (f.number === 8) init.name = decoder.decode(buf.subarray(f.start, f.end));
    else if (f.number === 9 || (f.number === 4 && f.wire === Wire.Bytes)) init.payload = { start: f.start, end: f.end };
    else if (f.number === 14 && f.value === 1n) init.external = true;
  }
  return init;
}

function parseGraph(buf: Uint8Array): GraphLayout {
  let graph: Field | undefined;
  for (const f of fields(buf, 0, buf.length)) if (f.number === 7 && f.wire === Wire.Bytes) graph = f;
  if (!graph) throw new Error('no graph in model');
  const layout: GraphLayout = { nodes: [], initializers: [] };
  for (const f of fields(buf, graph.start, graph.end)) {
    if (f.number === 1) layout.nodes.push(buf.subarray(f.start, f.end));
    else if (f.number === 5) layout.initializers.push(parseInitializer(buf, f.start, f.end));
  }
  return layout;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function bf16ToFloat32(bits: Uint16Array): Float32Array {
  const out = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bits[i] << 16;
  return new Float32Array(out.buffer);
}

function float32ToBf16(values: Float32Array): Uint16Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = u[i];
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

function decodeFloats(buf: Uint8Array, init: Initializer): Float64Array {
  const { start, end } = init.payload!;
  const bytes = buf.slice(start, end);
  switch (init.dataType) {
    case DataType.FLOAT:
      return Float64Array.from(new Float32Array(bytes.buffer));
    case DataType.DOUBLE:
      return new Float64Array(bytes.buffer);
    case DataType.FLOAT16:
      return Float64Array.from(float16ToFloat32(new Uint16Array(bytes.buffer)));
    default:
      return Float64Array.from(bf16ToFloat32(new Uint16Array(bytes.buffer)));
  }
}

function encodeFloats(values: Float64Array, dataType: number): Uint8Array {
  switch (dataType) {
    case DataType.FLOAT:
      return new Uint8Array(Float32Array.from(values).buffer);
    case DataType.DOUBLE:
      return new Uint8Array(values.buffer);
    case DataType.FLOAT16:
      return new Uint8Array(float32ToFloat16(Float32Array.from(values)).buffer);
    default:
      return new Uint8Array(float32ToBf16(Float32Array.from(values)).buffer);
  }
}

const FLOAT_TYPES = new Set<number>(Object.values(DataType));

/**
 * Returns the bytes of a model whose floating-point initializers are Σ wᵢ θᵢ over `models`.
 * Throws an EngineError naming the first difference when the graphs' structures differ.
 */
export function mergeOnnxModels(models: { label: string; bytes: Uint8Array }[], weights: number[]): Uint8Array {
  if (models.length < 2) throw new EngineError('bad_request', 'A merge needs at least two models.');
  if (weights.length !== models.length) throw new EngineError('bad_request', 'A merge needs one weight per model.');
  const layouts = models.map((m) => {
    try {
      return parseGraph(m.bytes);
    } catch (err) {
      throw new EngineError('bad_package', `Cannot read ${m.label} as an ONNX model: ${(err as Error).message}.`);
    }
  });
  const [base, ...others] = layouts;
  const cannot = (other: string, why: string) =>
    new EngineError(
      'bad_request',
      `Cannot merge ${models[0].label} with ${other}: the graphs have different structures (${why}). Use mode "average" instead.`,
    );
  others.forEach((layout, k) => {
    const label = models[k + 1].label;
    if (layout.nodes.length !== base.nodes.length) {
      throw cannot(label, `${base.nodes.length} vs ${layout.nodes.length} operators`);
    }
    for (let i = 0; i < base.nodes.length; i++) {
      if (!sameBytes(base.nodes[i], layout.nodes[i])) throw cannot(label, `operator #${i} differs`);
    }
    if (layout.initializers.length !== base.initializers.length) {
      throw cannot(label, `${base.initializers.length} vs ${layout.initializers.length} weight tensors`);
    }
    base.initializers.forEach((a, i) => {
      const b = layout.initializers[i];
      if (a.name !== b.name || a.dataType !== b.dataType || a.dims.join('x') !== b.dims.join('x')) {
        throw cannot(label, `weight "${a.name}" [${a.dims.join(', ')}] vs "${b.name}" [${b.dims.join(', ')}]`);
      }
    });
  });
  if (base.initializers.some((i) => i.external)) {
    throw new EngineError(
      'bad_request',
      `Cannot merge ${models[0].label}: its weights are stored as external data; re-export it with weights inside the graph (or use fp16).`,
    );
  }
  const total = weights.reduce((s, w) => s + w, 0);
  const norm = weights.map((w) => w / total);
  const out = Uint8Array.from(models[0].bytes);
  base.initializers.forEach((init, i) => {
    if (!init.payload) return;
    if (!FLOAT_TYPES.has(init.dataType)) {
      for (let k = 0; k < others.length; k++) {
        const o = others[k].initializers[i];
        const a = models[0].bytes.subarray(init.payload.start, init.payload.end);
        const b = o.payload ? models[k + 1].bytes.subarray(o.payload.start, o.payload.end) : new Uint8Array();
        if (!sameBytes(a, b)) throw cannot(models[k + 1].label, `integer tensor "${init.name}" differs`);
      }
      return;
    }
    const acc = decodeFloats(models[0].bytes, init).map((v) => v * norm[0]);
    others.forEach((layout, k) => {
      const values = decodeFloats(models[k + 1].bytes, layout.initializers[i]);
      if (values.length !== acc.length) throw cannot(models[k + 1].label, `weight "${init.name}" has another size`);
      const w = norm[k + 1];
      for (let j = 0; j < acc.length; j++) acc[j] += w * values[j];
    });
    out.set(encodeFloats(acc, init.dataType), init.payload.start);
  });
  return out;
}
