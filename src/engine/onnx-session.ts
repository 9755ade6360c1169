import { stat } from 'node:fs/promises';
import path from 'node:path';
import ort from 'onnxruntime-node';
import { EngineError } from './api.ts';
import { checkCudaLibraries, describeMissing, explainCudaFailure, type CudaLibraryReport } from './cuda-libraries.ts';
import { float16ToFloat32, float32ToFloat16 } from './float16.ts';
import type { Precision } from './manifest.ts';
import { graphFiles, openThroughCache, type CachedOpen } from './session-cache.ts';

export type ExecutionProvider = 'cpu' | 'cuda';

export interface SessionOptions {
  executionProvider: ExecutionProvider;
  /** Intra-op threads; 0 lets onnxruntime choose. */
  threads?: number;
  /** The CUDA device (default 0). */
  deviceId?: number;
  /**
   * A folder for onnxruntime's optimized graphs (session-cache.ts): a graph is optimized once and
   * opened from there next time. CPU only. ModelPackage sets it (the package's cache folder).
   */
  optimizedCacheDir?: string;
  /** Graphs smaller than this open without the cache (default 32 MiB: they load fast anyway). */
  optimizedCacheMinBytes?: number;
  // What ModelPackage.load reads (Engine.load passes them through):
  /** The graph variant to prefer; default fp16 under CUDA, fp32 on the CPU (docs/model-package.md). */
  precision?: Precision;
  /** Run each graph once when it is opened, at the package's default size; default: on under CUDA. */
  warmUp?: boolean;
  /** Keep optimized graphs in the engine cache (CPU; default true). */
  optimizedCache?: boolean;
  /** Where warnings go (e.g. a CPU engine given an fp16-only graph); default console.warn. */
  warn?: (message: string) => void;
}

export const DEFAULT_CACHE_MIN_BYTES = 32 * 1024 * 1024;

/**
 * onnxruntime's options for a session. Under CUDA the CUDA provider alone is asked for: if it cannot
 * start, creating the session fails (never a silent run on the CPU). onnxruntime still places the few
 * nodes CUDA has no kernel for (shape arithmetic) on its CPU provider, as it always does.
 *
 * onnxruntime-node 1.30's binding passes only `deviceId` to the CUDA provider (js/node/src/
 * session_options_helper.cc), so its other options keep onnxruntime's defaults: cudnn_conv_algo_search
 * EXHAUSTIVE (the best algorithm per convolution shape, measured once per shape: the warm-up run pays
 * it for the default size), arena_extend_strategy kNextPowerOfTwo, do_copy_in_default_stream on,
 * prefer_nhwc off, enable_cuda_graph off.
 */
export function ortSessionOptions(options: SessionOptions): ort.InferenceSession.SessionOptions {
  const cuda = options.executionProvider === 'cuda';
  return {
    executionProviders: cuda ? [{ name: 'cuda', deviceId: options.deviceId ?? 0 }] : ['cpu'],
    graphOptimizationLevel: 'all',
    intraOpNumThreads: options.threads ?? 0,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    enableCpuMemArena: true,
    enableMemPattern: true,
  };
}

let cudaReport: CudaLibraryReport | undefined;

/** The CUDA library check, once per process (it reads a few files and runs `ldconfig -p`). */
export function cudaLibraryReport(): CudaLibraryReport {
  cudaReport ??= checkCudaLibraries();
  return cudaReport;
}

/** Fails with the reason and the install line when a CUDA session cannot be created here. */
export function assertCudaUsable(report: CudaLibraryReport = cudaLibraryReport()): void {
  const problem = describeMissing(report);
  if (problem) throw new EngineError('internal', problem);
}

/** InferenceSession.create with the engine's errors: a CUDA failure explained, anything else a bad graph. */
export async function createSession(
  source: string | Uint8Array,
  sessionOptions: ort.InferenceSession.SessionOptions,
  options: SessionOptions,
  name: string,
): Promise<ort.InferenceSession> {
  try {
    return typeof source === 'string'
      ? await ort.InferenceSession.create(source, sessionOptions)
      : await ort.InferenceSession.create(source, sessionOptions);
  } catch (err) {
    const message = (err as Error).message;
    if (options.executionProvider === 'cuda') {
      const explained = explainCudaFailure(message, cudaReport);
      if (explained) throw new EngineError('internal', `Cannot open ${name} on CUDA: ${explained}`);
    }
    throw new EngineError('bad_package', `Cannot load graph ${name}: it is corrupt or not an ONNX model (${message.split('\n')[0]}).`);
  }
}

export interface InputSpec {
  name: string;
  type: string;
  /** Declared shape; strings are symbolic dimensions. Empty for scalars. */
  shape: readonly (number | string)[];
}

/** Float32 data in, whatever the graph declares on the wire. */
export interface FloatTensor {
  data: Float32Array;
  dims: number[];
}

/**
 * One onnxruntime session plus what its metadata says about its inputs, and a clock for the time
 * spent inside `session.run` (the engine's overhead is measured against it).
 */
export class GraphSession {
  runMs = 0;
  runs = 0;
  /** How the optimized-graph cache served this session; undefined: not through the cache. */
  cacheOutcome: CachedOpen['outcome'] | undefined;

  private constructor(
    readonly file: string,
    readonly session: ort.InferenceSession,
    readonly inputs: Map<string, InputSpec>,
    readonly outputs: Map<string, InputSpec>,
    readonly executionProvider: ExecutionProvider = 'cpu',
  ) {}

  static async open(source: string | Uint8Array, options: SessionOptions, label?: string): Promise<GraphSession> {
    const file = typeof source === 'string' ? source : (label ?? '(in-memory graph)');
    let bytes = 0;
    if (typeof source === 'string') {
      try {
        await stat(source);
        bytes = (await graphFiles(source)).reduce((a, f) => a + f.size, 0); // with its external data
      } catch {
        throw new EngineError('bad_package', `Missing graph: ${source}`);
      }
    }
    if (options.executionProvider === 'cuda') assertCudaUsable();
    const sessionOptions = ortSessionOptions(options);
    const create = (src: string | Uint8Array, opts: ort.InferenceSession.SessionOptions) => createSession(src, opts, options, file);
    const cache =
      typeof source === 'string' &&
      options.executionProvider === 'cpu' &&
      options.optimizedCacheDir !== undefined &&
      bytes >= (options.optimizedCacheMinBytes ?? DEFAULT_CACHE_MIN_BYTES);
    let session: ort.InferenceSession;
    let cacheOutcome: GraphSession['cacheOutcome'];
    if (cache) {
      const opened = await openThroughCache(source, sessionOptions, options.optimizedCacheDir!, create);
      session = opened.session;
      cacheOutcome = opened.outcome;
    } else {
      session = await create(source, sessionOptions);
    }
    const toSpecs = (list: readonly ort.InferenceSession.ValueMetadata[]) =>
      new Map(
        list.map((m): [string, InputSpec] => [
          m.name,
          { name: m.name, type: m.isTensor ? m.type : 'non-tensor', shape: m.isTensor ? m.shape : [] },
        ]),
      );
    const opened = new GraphSession(file, session, toSpecs(session.inputMetadata), toSpecs(session.outputMetadata), options.executionProvider);
    opened.cacheOutcome = cacheOutcome;
    return opened;
  }

  get displayName(): string {
    return path.basename(path.dirname(this.file)) + '/' + path.basename(this.file);
  }

  has(input: string): boolean {
    return this.inputs.has(input);
  }

  /** Fails with a message naming the graph when an expected input or output is absent. */
  require(inputs: string[], outputs: string[] = []): void {
    const missingIn = inputs.filter((n) => !this.inputs.has(n));
    const missingOut = outputs.filter((n) => !this.outputs.has(n));
    if (missingIn.length || missingOut.length) {
      const have = `inputs: ${[...this.inputs.keys()].join(', ')}; outputs: ${[...this.outputs.keys()].join(', ')}`;
      const want = [
        ...missingIn.map((n) => `input "${n}"`),
        ...missingOut.map((n) => `output "${n}"`),
      ].join(', ');
      throw new EngineError('bad_package', `Graph ${this.file} does not match the manifest: it lacks ${want} (it has ${have}).`);
    }
  }

  /** Converts float32 data to the input's declared element type and rank. */
  tensor(name: string, value: FloatTensor): ort.Tensor {
    const spec = this.inputs.get(name);
    if (!spec) throw new EngineError('bad_package', `Graph ${this.file} has no input "${name}".`);
    return toTensor(spec, value, this.file);
  }

  /** Timestep input: int64 `[B]`, float `[1]`, a scalar: whatever the graph declares. */
  timestepTensor(name: string, t: number, batch: number): ort.Tensor {
    const spec = this.inputs.get(name);
    if (!spec) throw new EngineError('bad_package', `Graph ${this.file} has no input "${name}".`);
    let dims: number[];
    if (spec.shape.length === 0) dims = [];
    else if (spec.shape.length === 1 && spec.shape[0] === 1) dims = [1];
    else dims = [batch];
    const count = dims.length === 0 ? 1 : dims[0];
    return toTensor(spec, { data: new Float32Array(count).fill(t), dims }, this.file);
  }

  async run(feeds: Record<string, ort.Tensor>, outputs?: string[]): Promise<Record<string, FloatTensor>> {
    const start = performance.now();
    let result: ort.InferenceSession.OnnxValueMapType;
    try {
      result = outputs ? await this.session.run(feeds, outputs) : await this.session.run(feeds);
    } catch (err) {
      const message = (err as Error).message;
      const cuda = this.executionProvider === 'cuda' ? explainCudaFailure(message) : undefined;
      throw new EngineError('internal', cuda ? `Running ${this.file} failed: ${cuda}` : `Running ${this.file} failed: ${message.split('\n')[0]}`);
    } finally {
      this.runMs += performance.now() - start;
      this.runs += 1;
    }
    const out: Record<string, FloatTensor> = {};
    for (const [name, value] of Object.entries(result)) {
      const t = value as ort.Tensor;
      out[name] = { data: fromTensorData(t), dims: [...t.dims] };
      t.dispose?.();
    }
    return out;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

function toTensor(spec: InputSpec, value: FloatTensor, file: string): ort.Tensor {
  const { data, dims } = value;
  const declared = spec.shape;
  if (declared.length !== dims.length && !(declared.length === 0 && dims.length === 0)) {
    throw new EngineError(
      'bad_package',
      `Graph ${file}: input "${spec.name}" has rank ${declared.length} [${declared.join(', ')}], the engine feeds rank ${dims.length} [${dims.join(', ')}].`,
    );
  }
  declared.forEach((d, i) => {
    if (typeof d === 'number' && d > 0 && d !== dims[i]) {
      throw new EngineError(
        'bad_package',
        `Graph ${file}: input "${spec.name}" expects shape [${declared.join(', ')}], got [${dims.join(', ')}].`,
      );
    }
  });
  switch (spec.type) {
    case 'float32':
      return new ort.Tensor('float32', data, dims);
    case 'float16':
      return new ort.Tensor('float16', float32ToFloat16(data), dims);
    case 'float64':
      return new ort.Tensor('float64', Float64Array.from(data), dims);
    case 'int64':
      return new ort.Tensor('int64', BigInt64Array.from(data, (x) => BigInt(Math.trunc(x))), dims);
    case 'int32':
      return new ort.Tensor('int32', Int32Array.from(data, (x) => Math.trunc(x)), dims);
    default:
      throw new EngineError('bad_package', `Graph ${file}: input "${spec.name}" has unsupported type ${spec.type}.`);
  }
}

function fromTensorData(t: ort.Tensor): Float32Array {
  switch (t.type) {
    case 'float32':
      return t.data as Float32Array;
    case 'float16':
      return float16ToFloat32(t.data as Uint16Array);
    case 'float64':
      return Float32Array.from(t.data as Float64Array);
    default:
      throw new EngineError('bad_package', `Unsupported output type ${t.type}.`);
  }
}
