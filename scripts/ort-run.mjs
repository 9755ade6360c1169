#!/usr/bin/env node
// Runs an ONNX graph in onnxruntime-node on tensors read from files, for the Python trainer's
// export checks (trainer/export/ort_check.py); there is no onnxruntime for Python on the dev machines.
//
//   node scripts/ort-run.mjs <model.onnx> [--threads N] [--meta <meta.json>] [<in.safetensors> <out.safetensors>]...
//
// Tensor files use the safetensors layout: u64 LE header length, a JSON header
// {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}}, then the raw
// little-endian data. Every input file is one `session.run` (one session for all); its outputs
// go to the paired output file. `--meta` writes the session's input and output metadata
// ({"inputs": [{"name", "type", "shape"}], "outputs": [...]}) as the engine sees it.
import { readFileSync, writeFileSync } from 'node:fs';
import ort from 'onnxruntime-node';

const DTYPES = {
  F32: ['float32', Float32Array],
  F16: ['float16', Uint16Array],
  F64: ['float64', Float64Array],
  I64: ['int64', BigInt64Array],
  I32: ['int32', Int32Array],
  I8: ['int8', Int8Array],
  U8: ['uint8', Uint8Array],
  BOOL: ['bool', Uint8Array],
};
const CODES = Object.fromEntries(Object.entries(DTYPES).map(([code, [type]]) => [type, code]));

function fail(message) {
  process.stderr.write(`ort-run: ${message}\n`);
  process.exit(2);
}

function readTensors(file) {
  const buf = readFileSync(file);
  const headerLength = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLength).toString('utf8'));
  const dataStart = 8 + headerLength;
  const feeds = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const known = DTYPES[entry.dtype];
    if (!known) fail(`${file}: tensor "${name}" has unsupported dtype ${entry.dtype}`);
    const [type, ArrayType] = known;
    const [begin, end] = entry.data_offsets;
    // copy: typed arrays need an aligned buffer of their own
    const bytes = buf.buffer.slice(buf.byteOffset + dataStart + begin, buf.byteOffset + dataStart + end);
    const data = new ArrayType(bytes);
    feeds[name] = new ort.Tensor(type, type === 'bool' ? Uint8Array.from(data) : data, entry.shape);
  }
  return feeds;
}

function writeTensors(file, tensors) {
  const header = {};
  const chunks = [];
  let offset = 0;
  for (const [name, tensor] of Object.entries(tensors)) {
    const code = CODES[tensor.type];
    if (!code) fail(`output "${name}" has unsupported type ${tensor.type}`);
    const data = tensor.data;
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    header[name] = { dtype: code, shape: [...tensor.dims], data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  writeFileSync(file, Buffer.concat([length, Buffer.from(json, 'utf8'), ...chunks]));
}

const describe = (list) =>
  list.map((m) => ({ name: m.name, type: m.isTensor ? m.type : 'non-tensor', shape: m.isTensor ? [...m.shape] : [] }));

async function main() {
  const args = process.argv.slice(2);
  let threads = 2;
  let metaFile;
  const positional = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--threads') threads = Number(args[++i]);
    else if (args[i] === '--meta') metaFile = args[++i];
    else positional.push(args[i]);
  }
  const [model, ...pairs] = positional;
  if (!model || pairs.length % 2 !== 0) {
    fail('usage: ort-run.mjs <model.onnx> [--threads N] [--meta meta.json] [<in.safetensors> <out.safetensors>]...');
  }
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
  });
  if (metaFile) {
    const meta = { inputs: describe(session.inputMetadata), outputs: describe(session.outputMetadata) };
    writeFileSync(metaFile, JSON.stringify(meta, null, 2));
  }
  for (let i = 0; i < pairs.length; i += 2) {
    const outputs = await session.run(readTensors(pairs[i]));
    writeTensors(pairs[i + 1], outputs);
  }
  await session.release();
}

main().catch((err) => fail(err?.stack ?? String(err)));
