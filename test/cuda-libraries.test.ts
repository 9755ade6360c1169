// EXECUTION_PROVIDER=cuda on a machine without CUDA: a clear error at load naming what is missing and
// the line that installs it, never a run on the CPU. The library check is tested on fake folders.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import ort from 'onnxruntime-node';
import { EngineError } from '../src/engine/api.ts';
import {
  checkCudaLibraries,
  CUDA_LIBRARIES_FALLBACK,
  describeMissing,
  explainCudaFailure,
  ortBinaryDir,
  readElfDynamic,
} from '../src/engine/cuda-libraries.ts';
import { createSession, GraphSession, ortSessionOptions } from '../src/engine/onnx-session.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { TINY } from './helpers/fixture.ts';

const providerInstalled = existsSync(path.join(ortBinaryDir(), 'libonnxruntime_providers_cuda.so'));
const noCuda = { skip: providerInstalled ? 'onnxruntime-node has its CUDA provider here' : false };

describe('CUDA library check (fake folders)', () => {
  let root: string;
  const touch = async (dir: string, name: string) => {
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, name), 'not an ELF file');
  };
  before(async () => {
    root = await mkdtemp(path.join(os.tmpdir(), 'cuda-libs-'));
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  test('no provider libraries beside the binding: both named, with the installer line', async () => {
    const bin = path.join(root, 'empty-bin');
    await mkdir(bin);
    const report = checkCudaLibraries({ binaryDir: bin, env: {}, ldCache: new Map(), standardDirs: [] });
    assert.deepEqual(report.missingProviders, ['libonnxruntime_providers_shared.so', 'libonnxruntime_providers_cuda.so']);
    const message = describeMissing(report)!;
    assert.match(message, /libonnxruntime_providers_cuda\.so/);
    assert.match(message, /ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node/);
    assert.ok(!message.includes('\n'));
  });

  test('providers present: CUDA 13 / cuDNN 9 libraries are looked for in LD_LIBRARY_PATH, ld.so.cache and the standard folders', async () => {
    const bin = path.join(root, 'bin');
    await touch(bin, 'libonnxruntime_providers_shared.so');
    await touch(bin, 'libonnxruntime_providers_cuda.so'); // unreadable as ELF: the built-in list applies
    const wanted = [...CUDA_LIBRARIES_FALLBACK, 'libcudnn.so.9'];
    const none = checkCudaLibraries({ binaryDir: bin, env: {}, ldCache: new Map(), standardDirs: [] });
    assert.deepEqual(none.missingProviders, []);
    assert.deepEqual(none.missingLibraries, wanted);
    const message = describeMissing(none)!;
    for (const lib of wanted) assert.ok(message.includes(lib), lib);
    assert.match(message, /apt install cuda-libraries-13-0 libcudnn9-cuda-13/);
    assert.match(message, /nvidia-cudnn-cu13/);

    const ld1 = path.join(root, 'ld1');
    const ld2 = path.join(root, 'ld2');
    const std = path.join(root, 'std');
    await touch(ld1, 'libcudart.so.13');
    await touch(ld2, 'libcublas.so.13');
    await touch(std, 'libcurand.so.10');
    const some = checkCudaLibraries({
      binaryDir: bin,
      env: { LD_LIBRARY_PATH: `${ld1}::${ld2}` },
      ldCache: new Map([['libcublasLt.so.13', '/somewhere/libcublasLt.so.13']]),
      standardDirs: [std],
    });
    assert.deepEqual(some.missingLibraries, ['libcudnn.so.9']);
    assert.equal(some.found['libcudart.so.13'], path.join(ld1, 'libcudart.so.13'));
    assert.equal(some.found['libcublas.so.13'], path.join(ld2, 'libcublas.so.13'));
    assert.equal(some.found['libcublasLt.so.13'], '/somewhere/libcublasLt.so.13');
    assert.equal(some.found['libcurand.so.10'], path.join(std, 'libcurand.so.10'));
    assert.match(describeMissing(some)!, /cannot be found: libcudnn\.so\.9 /);

    await touch(path.join(root, 'cudnn'), 'libcudnn.so.9');
    const all = checkCudaLibraries({
      binaryDir: bin,
      env: { LD_LIBRARY_PATH: [ld1, ld2, path.join(root, 'cudnn')].join(':') },
      ldCache: new Map([['libcublasLt.so.13', '/x/libcublasLt.so.13']]),
      standardDirs: [std],
    });
    assert.deepEqual(all.missingLibraries, []);
    assert.equal(describeMissing(all), undefined);
  });

  test('the ELF reader lists what a library links and its run path', () => {
    const dynamic = readElfDynamic(path.join(ortBinaryDir(), 'onnxruntime_binding.node'));
    assert.ok(dynamic);
    assert.ok(dynamic.needed.includes('libonnxruntime.so.1'), dynamic.needed.join(', '));
    assert.ok(dynamic.runpath.some((d) => d.startsWith('$ORIGIN')));
    assert.equal(readElfDynamic(path.join(TINY, 'manifest.json')), undefined);
    assert.equal(readElfDynamic(path.join(TINY, 'no-such-file')), undefined);
  });

  test("onnxruntime's CUDA errors become messages that say what to do", () => {
    const cases: [string, RegExp][] = [
      ['Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: No such file or directory', /libcublasLt\.so\.13 cannot be loaded.*apt install/],
      ['CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version', /driver is older/],
      ['CUDA failure 100: no CUDA-capable device is detected', /no NVIDIA GPU is visible/],
      ['CUDA failure 101: invalid device ordinal', /device id does not exist/],
      ['OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library', /could not load its CUDA provider/],
    ];
    for (const [ortMessage, want] of cases) {
      const explained = explainCudaFailure(ortMessage);
      assert.ok(explained, ortMessage);
      assert.match(explained, want);
      assert.match(explained, /^EXECUTION_PROVIDER=cuda/);
    }
    assert.equal(explainCudaFailure('Protobuf parsing failed.'), undefined);
  });
});

describe('EXECUTION_PROVIDER=cuda without CUDA', () => {
  test('the session options ask for the CUDA provider alone (no CPU fallback entry)', () => {
    const options = ortSessionOptions({ executionProvider: 'cuda', deviceId: 1 });
    assert.deepEqual(options.executionProviders, [{ name: 'cuda', deviceId: 1 }]);
    assert.equal(options.graphOptimizationLevel, 'all');
    assert.deepEqual(ortSessionOptions({ executionProvider: 'cpu' }).executionProviders, ['cpu']);
  });

  test('the engine fails at load with the missing library and the install line, and opens nothing', noCuda, async () => {
    await assert.rejects(Engine.load(TINY, { executionProvider: 'cuda' }), (err: Error) => {
      assert.ok(err instanceof EngineError, String(err));
      assert.match(err.message, /libonnxruntime_providers_cuda\.so/);
      assert.match(err.message, /ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node/);
      return true;
    });
    await assert.rejects(GraphSession.open(path.join(TINY, 'vae_decoder/model.onnx'), { executionProvider: 'cuda' }), /libonnxruntime_providers_cuda\.so/);
  });

  test('onnxruntime itself, asked for CUDA alone, refuses instead of running on the CPU; the engine explains why', noCuda, async () => {
    const file = path.join(TINY, 'vae_decoder/model.onnx');
    const options = ortSessionOptions({ executionProvider: 'cuda' });
    await assert.rejects(ort.InferenceSession.create(file, { ...options, logSeverityLevel: 4 }));
    await assert.rejects(createSession(file, { ...options, logSeverityLevel: 4 }, { executionProvider: 'cuda' }, file), (err: Error) => {
      assert.ok(err instanceof EngineError);
      assert.match(err.message, /^Cannot open .* on CUDA: EXECUTION_PROVIDER=cuda/);
      assert.match(err.message, /ONNXRUNTIME_NODE_INSTALL=cuda12/);
      return true;
    });
  });
});
