// Runs inside a worker_thread: owns the Engine, so onnxruntime's synchronous session.run never blocks
// the main thread's event loop.
import { parentPort, workerData } from 'node:worker_threads';
import { EngineError, type GenerateResult } from '../engine/api.ts';
import { Engine } from '../engine/pipeline.ts';
import type { EngineThreadOptions, FromThread, SerializedError, ToThread } from './protocol.ts';

const port = parentPort!;
const options = workerData as EngineThreadOptions;
const send = (message: FromThread, transfer: ArrayBuffer[] = []) => port.postMessage(message, transfer);

function serialize(err: unknown): SerializedError {
  if (err instanceof EngineError) return { code: err.code, message: err.message };
  return { code: 'internal', message: `The engine failed: ${(err as Error)?.message ?? String(err)}` };
}

function transferables(result: GenerateResult): ArrayBuffer[] {
  const list: ArrayBuffer[] = [];
  for (const img of result.images) {
    list.push(img.image.data.buffer as ArrayBuffer);
    for (const w of img.contributions?.weights ?? []) list.push(w.buffer as ArrayBuffer);
  }
  return [...new Set(list)];
}

let engine: Engine;
try {
  engine = await Engine.load(options.modelDir, { executionProvider: options.executionProvider, threads: options.threads });
  if (options.warmUp) await engine.warmUp();
  send({ type: 'ready', info: engine.info() });
} catch (err) {
  send({ type: 'load-error', error: serialize(err) });
  process.exit(0);
}

let chain: Promise<void> = Promise.resolve();
let busy = false;
let exitCode: number | undefined;
const exitIfAsked = () => {
  if (exitCode !== undefined) process.exit(exitCode);
};
port.on('message', (message: ToThread) => {
  if (message.type === 'exit') {
    // never inside a native session.run: exit now if idle, else at the next step boundary
    exitCode = message.code;
    if (!busy) exitIfAsked();
    return;
  }
  if (message.type === 'dispose') {
    chain = chain.then(async () => {
      await engine.dispose();
      send({ type: 'disposed' });
    });
    return;
  }
  const { id, request, cancel } = message;
  const flag = new Int32Array(cancel);
  chain = chain.then(async () => {
    busy = true;
    try {
      const result = await engine.generate(request, {
        isCancelled: () => {
          exitIfAsked();
          return Atomics.load(flag, 0) !== 0;
        },
        onProgress: (event) => send({ type: 'progress', id, event }),
      });
      send({ type: 'result', id, result }, transferables(result));
    } catch (err) {
      send({ type: 'error', id, error: serialize(err) });
    } finally {
      busy = false;
      exitIfAsked();
    }
  });
});
