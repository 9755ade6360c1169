// The attribute classifier shipped with a package (`<package>/eval/classifier.onnx` + `classifier.json`,
// written by trainer/demo/classifier.py): reads back background, count, colour, shape, size and position
// of generated images, per half for two-object scenes, plus a feature vector for the Fréchet distance.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { RgbImage } from '../engine/api.ts';
import { GraphSession } from '../engine/onnx-session.ts';

export interface ClassifierMeta {
  inputName: string;
  /** Square input side in pixels. */
  size: number;
  /** Head name → class names in logit order (e.g. `shape`, `left_colour`). */
  heads: Record<string, string[]>;
  featuresName: string;
  featureDim: number;
  accuracyOnRenders: Record<string, number>;
}

/** What the classifier reads in one image: the arg-max class name of every head, and its features. */
export interface Reading {
  labels: Record<string, string>;
  features: Float32Array;
}

/** What the evaluation needs from a classifier (the ONNX one, or a test double). */
export interface ImageReader {
  readonly meta: Pick<ClassifierMeta, 'size'>;
  classify(images: RgbImage[]): Promise<Reading[]>;
}

export function parseClassifierMeta(json: unknown): ClassifierMeta {
  const m = json as {
    input?: { name?: string; shape?: (number | null)[] };
    heads?: Record<string, string[]>;
    features?: { name?: string; dim?: number };
    accuracy_on_renders?: Record<string, number>;
  };
  const shape = m.input?.shape ?? [];
  const size = shape[2];
  if (!m.heads || typeof size !== 'number' || shape[3] !== size || shape[1] !== 3) {
    throw new Error('classifier.json: expected input.shape [B, 3, S, S] and heads');
  }
  for (const head of ['background', 'count', 'colour', 'shape', 'size', 'position']) {
    if (!Array.isArray(m.heads[head])) throw new Error(`classifier.json: no head "${head}"`);
  }
  return {
    inputName: m.input?.name ?? 'image',
    size,
    heads: m.heads,
    featuresName: m.features?.name ?? 'features',
    featureDim: m.features?.dim ?? 0,
    accuracyOnRenders: m.accuracy_on_renders ?? {},
  };
}

/** Row-major RGB bytes → float32 CHW in [0, 1], appended at `offset` of `out`. */
export function toClassifierInput(image: RgbImage, out: Float32Array, offset: number): void {
  const plane = image.width * image.height;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) out[offset + c * plane + p] = image.data[p * 3 + c] / 255;
  }
}

export function argmax(values: Float32Array, start: number, length: number): number {
  let best = 0;
  for (let i = 1; i < length; i++) if (values[start + i] > values[start + best]) best = i;
  return best;
}

export class AttributeClassifier implements ImageReader {
  private constructor(
    readonly meta: ClassifierMeta,
    private readonly session: GraphSession,
  ) {}

  /** Loads `<evalDir>/classifier.onnx` and `<evalDir>/classifier.json`. */
  static async load(evalDir: string, threads = 0): Promise<AttributeClassifier> {
    const meta = parseClassifierMeta(JSON.parse(await readFile(path.join(evalDir, 'classifier.json'), 'utf8')));
    const session = await GraphSession.open(path.join(evalDir, 'classifier.onnx'), { executionProvider: 'cpu', threads });
    session.require([meta.inputName], [...Object.keys(meta.heads), meta.featuresName]);
    return new AttributeClassifier(meta, session);
  }

  async classify(images: RgbImage[], batchSize = 32): Promise<Reading[]> {
    const s = this.meta.size;
    const readings: Reading[] = [];
    for (let start = 0; start < images.length; start += batchSize) {
      const chunk = images.slice(start, start + batchSize);
      const input = new Float32Array(chunk.length * 3 * s * s);
      chunk.forEach((image, i) => {
        if (image.width !== s || image.height !== s) {
          throw new Error(`the classifier reads ${s}×${s} images, got ${image.width}×${image.height}`);
        }
        toClassifierInput(image, input, i * 3 * s * s);
      });
      const feeds = { [this.meta.inputName]: this.session.tensor(this.meta.inputName, { data: input, dims: [chunk.length, 3, s, s] }) };
      const out = await this.session.run(feeds);
      const features = out[this.meta.featuresName];
      const dim = features.dims[1];
      chunk.forEach((_, i) => {
        const labels: Record<string, string> = {};
        for (const [head, classes] of Object.entries(this.meta.heads)) {
          labels[head] = classes[argmax(out[head].data, i * classes.length, classes.length)];
        }
        readings.push({ labels, features: features.data.slice(i * dim, (i + 1) * dim) });
      });
    }
    return readings;
  }

  async dispose(): Promise<void> {
    await this.session.release();
  }
}
