// The in-process engine host: an EngineClient whose engine runs in a worker_thread of this process.
import { Worker } from 'node:worker_threads';
import {
  EngineError,
  type EngineClient,
  type GenerateCallOptions,
  type GenerateRequest,
  type GenerateResult,
  type PackageInfo,
  type ProgressEvent,
} from '../engine/api.ts';
import type { EngineThreadData, EngineThreadOptions, FromThread, SerializedError, ToThread } from './protocol.ts';
import { JobControl, type StepHold } from './step-hold.ts';

/** generate()'s options on an engine thread: a `hold` stops the job after one of its steps (tests' hand-offs). */
export type EngineThreadCallOptions = GenerateCallOptions & { hold?: StepHold };

interface Pending {
  resolve: (result: GenerateResult) => void;
  reject: (err: Error) => void;
  onProgress?: (event: ProgressEvent) => void;
  cleanup: () => void;
}

function toError(e: SerializedError): EngineError {
  return new EngineError(e.code as EngineError['code'], e.message);
}

/**
 * Worker threads do not inherit tsx's module hooks on Node 20, so the thread starts from a tiny
 * bootstrap that registers tsx (when the entry is TypeScript) and then imports the real entry.
 */
function spawnThread(entry: URL, workerData: unknown): Worker {
  const isTs = entry.pathname.endsWith('.ts');
  const tsxApi = isTs ? import.meta.resolve('tsx/esm/api') : '';
  const bootstrap = `
    (async () => {
      if (${JSON.stringify(tsxApi)}) (await import(${JSON.stringify(tsxApi)})).register();
      await import(${JSON.stringify(entry.href)});
    })().catch((err) => { console.error(err); process.exit(1); });`;
  const execArgv = process.execArgv.filter((a, i, all) => !a.includes('tsx') && !(all[i + 1] ?? '').includes('tsx'));
  return new Worker(bootstrap, { eval: true, workerData, execArgv });
}

export class EngineThread implements EngineClient {
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private exited = false;

  private constructor(
    private readonly worker: Worker,
    private readonly packageInfo: PackageInfo,
    private readonly exitCell: Int32Array,
  ) {
    worker.on('message', (m: FromThread) => this.onMessage(m));
    worker.on('error', (err) => this.failAll(`The engine crashed: ${err.message}`, 'unavailable'));
    worker.on('exit', (code) => {
      this.exited = true;
      this.failAll(`The engine stopped unexpectedly (exit code ${code}); the job was not finished.`, 'unavailable');
    });
  }

  static start(options: EngineThreadOptions): Promise<EngineThread> {
    const data: EngineThreadData = { options, exitCode: new SharedArrayBuffer(Int32Array.BYTES_PER_ELEMENT) };
    const worker = spawnThread(new URL('./thread-entry.ts', import.meta.url), data);
    return new Promise((resolve, reject) => {
      const onMessage = (m: FromThread) => {
        if (m.type === 'ready') {
          worker.off('message', onMessage);
          worker.off('exit', onExit);
          resolve(new EngineThread(worker, m.info, new Int32Array(data.exitCode)));
        } else if (m.type === 'load-error') {
          worker.off('message', onMessage);
          reject(toError(m.error));
        }
      };
      const onExit = (code: number) => reject(new EngineError('internal', `The engine could not start (exit code ${code}).`));
      worker.on('message', onMessage);
      worker.once('exit', onExit);
      worker.once('error', (err) => reject(new EngineError('internal', `The engine could not start: ${err.message}`)));
    });
  }

  async info(): Promise<PackageInfo> {
    return this.packageInfo;
  }

  generate(
    request: GenerateRequest,
    options: EngineThreadCallOptions = {},
  ): Promise<GenerateResult> {
    if (this.exited) return Promise.reject(new EngineError('unavailable', 'The engine is not running.'));
    if (options.signal?.aborted) return Promise.reject(new EngineError('cancelled', 'The generation was cancelled.'));
    const id = this.nextId++;
    const control = options.hold?.control ?? new JobControl();
    return new Promise((resolve, reject) => {
      const onAbort = () => control.cancel();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      this.pending.set(id, {
        resolve,
        reject,
        onProgress: options.onProgress,
        cleanup: () => options.signal?.removeEventListener('abort', onAbort),
      });
      this.post({ type: 'generate', id, request, control: control.buffer });
    });
  }

  async dispose(): Promise<void> {
    if (this.exited) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 5000);
      this.worker.on('message', (m: FromThread) => {
        if (m.type === 'disposed') {
          clearTimeout(timer);
          resolve();
        }
      });
      this.post({ type: 'dispose' });
    });
    this.failAll('The engine was shut down before the job finished.');
    await this.worker.terminate();
  }

  private post(message: ToThread): void {
    this.worker.postMessage(message);
  }

  private onMessage(m: FromThread): void {
    if (m.type === 'progress') {
      const p = this.pending.get(m.id);
      try {
        p?.onProgress?.(m.event);
      } catch {
        // a failing progress listener must not break the job
      }
      return;
    }
    if (m.type === 'result' || m.type === 'error') {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      p.cleanup();
      if (m.type === 'result') p.resolve(m.result);
      else p.reject(toError(m.error));
    }
  }

  /** True once the thread has exited (crashed, killed or disposed). */
  get stopped(): boolean {
    return this.exited;
  }

  /**
   * Ends the thread abruptly at its next safe point (between denoising steps), as a crash would:
   * pending jobs fail with code 'unavailable'. (Terminating a thread inside onnxruntime's native
   * session.run aborts the whole process, so this never does that.)
   */
  crash(code = 70): void {
    Atomics.store(this.exitCell, 0, code);
    this.post({ type: 'exit' });
  }

  private failAll(message: string, code: EngineError['code'] = 'internal'): void {
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      p.cleanup();
      p.reject(new EngineError(code, message));
    }
  }
}

/** Starts the engine in a worker thread and resolves once the model package is loaded. */
export function startEngineThread(options: EngineThreadOptions): Promise<EngineClient> {
  return EngineThread.start(options);
}
