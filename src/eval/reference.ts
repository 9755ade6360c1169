// `<package>/eval/reference_features.json` (python3 -m trainer.eval_reference): the classifier's
// feature statistics of rendered world images, the Fréchet distance that rendered images reach at
// small sample sizes (the floor), and probe images to check the ONNX classifier against PyTorch.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { RgbImage } from '../engine/api.ts';
import { sqrtPsd, type FeatureStats } from './frechet.ts';
import type { Scene } from './world.ts';

export type SetKind = 'single' | 'pair';

export interface ReferenceSet extends FeatureStats {
  /** Σ^½ of the covariance, computed on first use. */
  root?: Float64Array;
}

export interface Reference {
  file: string;
  weights: string;
  sets: Partial<Record<SetKind, ReferenceSet>>;
  floor: Partial<Record<SetKind, { n: number[]; frechet: number[] }>>;
  /** Rendered images with their PyTorch features and (when recorded) the scenes they show. */
  probe?: { images: RgbImage[]; features: number[][]; scenes?: Scene[] };
}

export const REFERENCE_FILE = 'reference_features.json';
const FORMAT = 'shapes-classifier-reference-features';

function float32FromBase64(text: string): Float32Array {
  const bytes = Buffer.from(text, 'base64');
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = bytes.readFloatLE(i * 4);
  return out;
}

interface ReferenceJson {
  format?: string;
  classifier?: { weights?: string; feature_dim?: number };
  sets?: Record<string, { n: number; mean: number[]; cov_f32: string }>;
  floor?: Record<string, { n: number[]; frechet: number[] }>;
  probe?: { count: number; width: number; height: number; images_rgb_base64: string; features: number[][]; scenes?: Scene[] };
}

export function parseReference(json: unknown, file = REFERENCE_FILE): Reference {
  const r = json as ReferenceJson;
  if (r.format !== FORMAT) throw new Error(`${file}: not a reference feature file (format "${String(r.format)}")`);
  const sets: Reference['sets'] = {};
  for (const kind of ['single', 'pair'] as const) {
    const s = r.sets?.[kind];
    if (!s) continue;
    const dim = s.mean.length;
    const cov = Float64Array.from(float32FromBase64(s.cov_f32));
    if (cov.length !== dim * dim) throw new Error(`${file}: ${kind} covariance has ${cov.length} values for dimension ${dim}`);
    sets[kind] = { n: s.n, dim, mean: Float64Array.from(s.mean), cov };
  }
  let probe: Reference['probe'];
  if (r.probe && r.probe.count > 0) {
    const bytes = Buffer.from(r.probe.images_rgb_base64, 'base64');
    const size = r.probe.width * r.probe.height * 3;
    const images = Array.from({ length: r.probe.count }, (_, i) => ({
      width: r.probe!.width,
      height: r.probe!.height,
      data: new Uint8Array(bytes.subarray(i * size, (i + 1) * size)),
    }));
    probe = { images, features: r.probe.features, scenes: r.probe.scenes };
  }
  return { file, weights: r.classifier?.weights ?? 'unknown', sets, floor: r.floor ?? {}, probe };
}

/** The package's reference, or null when the file is absent. */
export async function loadReference(evalDir: string): Promise<Reference | null> {
  const file = path.join(evalDir, REFERENCE_FILE);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    return null;
  }
  return parseReference(JSON.parse(text), file);
}

export function referenceRoot(set: ReferenceSet): Float64Array {
  set.root ??= sqrtPsd(set.cov, set.dim);
  return set.root;
}

/** The floor measured at the sample size nearest to n (rendered images against the same statistics). */
export function floorAt(reference: Reference, kind: SetKind, n: number): { n: number; frechet: number } | null {
  const f = reference.floor[kind];
  if (!f || f.n.length === 0) return null;
  let best = 0;
  f.n.forEach((size, i) => {
    if (Math.abs(size - n) < Math.abs(f.n[best] - n)) best = i;
  });
  return { n: f.n[best], frechet: f.frechet[best] };
}
