// Runs inside a worker_thread: owns the Engine, so onnxruntime's synchronous session.run never blocks
// the main thread's event loop.
import { parentPort, workerData } from 'node:worker_threads';
import { EngineError, type GenerateResult } from '../engine/api.ts';
import { Engine } from '../engine/pipeline.ts';
import type { EngineThreadData, FromThread, SerializedError, ToThread } from './protocol.ts';
import { JobControl } from './step-hold.ts';

const port = parentPort!;
const { options, exitCode } = workerData as EngineThreadData;
const exitCell = new Int32Array(exitCode);
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
// never inside a native session.run: between steps, or when idle
const exitIfAsked = () => {
  const code = Atomics.load(exitCell, 0);
  if (code !== 0) process.exit(code);
};
port.on('message', (message: ToThread) => {
  if (message.type === 'exit') {
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
  const { id, request } = message;
  const control = new JobControl(message.control);
  chain = chain.then(async () => {
    busy = true;
    try {
      const result = await engine.generate(request, {
        isCancelled: () => {
          exitIfAsked();
          return control.cancelled;
        },
        onProgress: (event) => {
          const held = control.arriveAt(event.step);
          send({ type: 'progress', id, event });
          if (held) control.waitWhileHeld();
        },
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
