// The merge on small hand-built graphs: non-float initializers (equal → kept, different → refused),
// float64 and bfloat16 weights, and typed fields (float_data, int64_data) mixed with raw_data.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import ort from 'onnxruntime-node';
import { EngineError } from '../src/engine/api.ts';
import { readLayout } from '../src/engine/merge/layout.ts';
import { MessageWriter } from '../src/engine/merge/protobuf.ts';
import { mergeGraphs } from '../src/engine/merge/stream-merge.ts';

const scratch = await mkdtemp(path.join(os.tmpdir(), 'merge-types-'));
after(() => rm(scratch, { recursive: true, force: true }));

const FLOAT = 1;
const INT64 = 7;
const DOUBLE = 11;
const BFLOAT16 = 16;

interface Init {
  name: string;
  type: number;
  dims: number[];
  /** little-endian values */
  raw: Uint8Array;
  /** store in the typed field instead of raw_data (float_data / int64_data) */
  typed?: boolean;
}

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function tensor(t: Init): Uint8Array {
  const m = new MessageWriter();
  for (const d of t.dims) m.varint(1, d);
  m.varint(2, t.type);
  m.string(8, t.name);
  if (!t.typed) m.bytes(9, t.raw);
  else if (t.type === FLOAT) m.bytes(4, t.raw); // packed float_data is the little-endian floats
  else if (t.type === INT64) {
    const values = new BigInt64Array(t.raw.slice().buffer);
    const packed: number[] = [];
    for (const v of values) {
      let x = BigInt.asUintN(64, v);
      while (x >= 0x80n) {
        packed.push(Number(x & 0x7fn) | 0x80);
        x >>= 7n;
      }
      packed.push(Number(x));
    }
    m.bytes(7, Uint8Array.from(packed));
  }
  return m.finish();
}

function valueInfo(name: string, dims: number[]): Uint8Array {
  const shape = new MessageWriter();
  for (const d of dims) shape.bytes(1, new MessageWriter().varint(1, d).finish());
  const tensorType = new MessageWriter().varint(1, FLOAT).bytes(2, shape.finish()).finish();
  return new MessageWriter().string(1, name).bytes(2, new MessageWriter().bytes(1, tensorType).finish()).finish();
}

function node(op: string, inputs: string[], outputs: string[]): Uint8Array {
  const m = new MessageWriter();
  for (const i of inputs) m.string(1, i);
  for (const o of outputs) m.string(2, o);
  return m.string(4, op).finish();
}

/** z = Reshape(x + w, shape) with x, w [2, 3] and shape int64 [2]; plus unused d (float64) and h (bfloat16). */
async function model(name: string, inits: Init[]): Promise<string> {
  const graph = new MessageWriter()
    .bytes(1, node('Add', ['x', 'w'], ['y']))
    .bytes(1, node('Reshape', ['y', 'shape'], ['z']))
    .string(2, 'g');
  for (const t of inits) graph.bytes(5, tensor(t));
  graph.bytes(11, valueInfo('x', [2, 3])).bytes(12, valueInfo('z', [3, 2]));
  const opset = new MessageWriter().string(1, '').varint(2, 17).finish();
  const bytes = new MessageWriter().varint(1, 8).bytes(8, opset).bytes(7, graph.finish()).finish();
  const dir = path.join(scratch, name);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, 'model.onnx'), bytes);
  return path.join(dir, 'model.onnx');
}

function inits(w: number[], shape: bigint[], d: number[], h: number[], typed = false): Init[] {
  const bf16 = Uint16Array.from(new Uint32Array(Float32Array.from(h).buffer), (x) => x >>> 16);
  return [
    { name: 'w', type: FLOAT, dims: [2, 3], raw: bytesOf(Float32Array.from(w)), typed },
    { name: 'shape', type: INT64, dims: [2], raw: bytesOf(BigInt64Array.from(shape)), typed },
    { name: 'd', type: DOUBLE, dims: [4], raw: bytesOf(Float64Array.from(d)) },
    { name: 'h', type: BFLOAT16, dims: [4], raw: bytesOf(bf16) },
  ];
}

async function values(file: string, name: string): Promise<ArrayBuffer> {
  const t = readLayout(file).initializers.find((i) => i.name === name)!;
  assert.equal(t.storage.kind, 'bytes');
  const s = t.storage as { file: string; offset: number; length: number };
  return new Uint8Array((await readFile(s.file)).subarray(s.offset, s.offset + s.length)).buffer;
}

test('float32, float64 and bfloat16 weights are averaged; equal int64 tensors are kept; typed fields read like raw_data', async () => {
  const a = await model('a', inits([1, 2, 3, 4, 5, 6], [3n, 2n], [1, 2, 3, 4], [1, 2, 4, 8]));
  const b = await model('b', inits([3, 4, 5, 6, 7, 8], [3n, 2n], [3, 4, 5, 6], [3, 4, 8, 16], true));
  const out = path.join(scratch, 'out');
  await mkdir(out);
  const merged = await mergeGraphs([{ label: 'A', file: a }, { label: 'B', file: b }], [1, 1], out);
  assert.deepEqual([...new Float32Array(await values(merged, 'w'))], [2, 3, 4, 5, 6, 7]);
  assert.deepEqual([...new BigInt64Array(await values(merged, 'shape'))], [3n, 2n]);
  assert.deepEqual([...new Float64Array(await values(merged, 'd'))], [2, 3, 4, 5]);
  const h = Float32Array.from(new Uint16Array(await values(merged, 'h')), (x) => new Float32Array(Uint32Array.of(x << 16).buffer)[0]);
  assert.deepEqual([...h], [2, 3, 6, 12]);
  const session = await ort.InferenceSession.create(merged, { logSeverityLevel: 3 });
  const result = await session.run({ x: new ort.Tensor('float32', new Float32Array(6).fill(10), [2, 3]) });
  assert.deepEqual([...(result.z.data as Float32Array)], [12, 13, 14, 15, 16, 17]);
  assert.deepEqual(result.z.dims, [3, 2]);
  await session.release();
});

test('an int64 tensor that differs between the graphs is refused, naming it', async () => {
  const a = await model('c', inits([1, 2, 3, 4, 5, 6], [3n, 2n], [0, 0, 0, 0], [0, 0, 0, 0]));
  const b = await model('d', inits([1, 2, 3, 4, 5, 6], [2n, 3n], [0, 0, 0, 0], [0, 0, 0, 0], true));
  const out = path.join(scratch, 'out2');
  await mkdir(out);
  await assert.rejects(
    mergeGraphs([{ label: 'A', file: a }, { label: 'B', file: b }], [1, 1], out),
    (err: unknown) =>
      err instanceof EngineError &&
      err.message === 'Cannot merge A with B: the graphs have different structures (int64 weight "shape" differs). Use mode "average" instead.',
  );
});
