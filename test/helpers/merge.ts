// Shared by the merge tests: the tiny experts in their storage layouts, a reader of a graph's
// float weights that knows only raw bytes (inline raw_data and external data), and one U-Net run.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { floatFromHalfBits } from '../../src/engine/float16.ts';
import { readLayout } from '../../src/engine/merge/layout.ts';
import { GraphSession } from '../../src/engine/onnx-session.ts';
import { REPO_ROOT, TINY } from './fixture.ts';

export const EXTERNAL = path.join(REPO_ROOT, 'test/fixtures/external');

/** Graphs by short name: the tiny experts inline, and the copies of trainer/fixture/external_data.py. */
export const GRAPHS = {
  alpha: path.join(TINY, 'experts/alpha/unet/model.onnx'),
  beta: path.join(TINY, 'experts/beta/unet/model.onnx'),
  odd: path.join(TINY, 'experts/odd/unet/model.onnx'),
  alphaSingle: path.join(EXTERNAL, 'alpha-single/model.onnx'),
  alphaSome: path.join(EXTERNAL, 'alpha-some/model.onnx'),
  betaPerTensor: path.join(EXTERNAL, 'beta-per-tensor/model.onnx'),
  alphaFp16Single: path.join(EXTERNAL, 'alpha-fp16-single/model.onnx'),
  betaFp16Fields: path.join(EXTERNAL, 'beta-fp16-fields/model.onnx'),
};

export function input(name: keyof typeof GRAPHS): { label: string; file: string } {
  return { label: `expert "${name}"`, file: GRAPHS[name] };
}

/** name → (type, values as float64) of every float32/float16 initializer stored as raw bytes. */
export function floatWeights(file: string): Map<string, { dataType: number; values: Float64Array }> {
  const out = new Map<string, { dataType: number; values: Float64Array }>();
  const cache = new Map<string, Buffer>();
  for (const t of readLayout(file).initializers) {
    if (t.storage.kind !== 'bytes' || (t.dataType !== 1 && t.dataType !== 10)) continue;
    const { file: f, offset, length } = t.storage;
    if (!cache.has(f)) cache.set(f, readFileSync(f));
    const bytes = cache.get(f)!.subarray(offset, offset + length);
    const copy = new Uint8Array(bytes).buffer;
    const values =
      t.dataType === 1 ? Float64Array.from(new Float32Array(copy)) : Float64Array.from(new Uint16Array(copy), floatFromHalfBits);
    out.set(t.name, { dataType: t.dataType, values });
  }
  return out;
}

/** A fixed U-Net input: batch 2, 8×8 latents, two timesteps, deterministic pseudo-random values. */
export async function runUnet(file: string): Promise<Float32Array> {
  const session = await GraphSession.open(file, { executionProvider: 'cpu', threads: 1 });
  try {
    const wave = (n: number, phase: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + phase));
    const out = await session.run({
      sample: session.tensor('sample', { data: wave(2 * 4 * 8 * 8, 0), dims: [2, 4, 8, 8] }),
      timestep: session.tensor('timestep', { data: Float32Array.from([10, 700]), dims: [2] }),
      encoder_hidden_states: session.tensor('encoder_hidden_states', { data: wave(2 * 77 * 32, 1), dims: [2, 77, 32] }),
    });
    return out.out_sample.data;
  } finally {
    await session.release();
  }
}
