// An EngineClient that survives the death of its engine thread: the thread is started again, and a
// job that was running when it died is run once more on the fresh one before it is given up.
import { EngineError, type EngineClient, type GenerateRequest, type GenerateResult, type PackageInfo } from '../engine/api.ts';
import { EngineThread, type EngineThreadCallOptions } from './engine-thread.ts';
import type { EngineThreadOptions } from './protocol.ts';

export interface SupervisorOptions {
  /** Runs of one job, counting the first (default 2). */
  attempts?: number;
  onRestart?: (reason: string) => void;
}

export class SupervisedEngine implements EngineClient {
  restarts = 0;
  private current: Promise<EngineThread>;
  private disposed = false;

  private constructor(
    private readonly options: EngineThreadOptions,
    first: EngineThread,
    private readonly supervisor: SupervisorOptions,
  ) {
    this.current = Promise.resolve(first);
  }

  static async start(options: EngineThreadOptions, supervisor: SupervisorOptions = {}): Promise<SupervisedEngine> {
    return new SupervisedEngine(options, await EngineThread.start(options), supervisor);
  }

  /** The engine thread serving jobs now (restarted first if it has died). */
  async thread(): Promise<EngineThread> {
    const w = await this.current;
    if (!w.stopped || this.disposed) return w;
    this.restarts += 1;
    this.supervisor.onRestart?.('the engine thread stopped');
    this.current = EngineThread.start(this.options);
    this.current.catch(() => {
      // a failed start is reported to the job that asked; the next job tries again
      this.current = Promise.resolve(w);
    });
    return this.current;
  }

  async info(): Promise<PackageInfo> {
    return (await this.thread()).info();
  }

  async generate(
    request: GenerateRequest,
    options: EngineThreadCallOptions = {},
  ): Promise<GenerateResult> {
    const attempts = this.supervisor.attempts ?? 2;
    for (let attempt = 1; ; attempt++) {
      try {
        return await (await this.thread()).generate(request, options);
      } catch (err) {
        const died = err instanceof EngineError && err.code === 'unavailable';
        if (!died || this.disposed || options.signal?.aborted) throw err;
        if (attempt >= attempts) {
          throw new EngineError(
            'unavailable',
            `The image engine stopped ${attempts} times while drawing this picture, so it was given up. Please try again later.`,
          );
        }
      }
    }
  }

  async dispose(): Promise<void> {
    this.disposed = true;
    await (await this.current).dispose();
  }
}

export function startSupervisedEngine(options: EngineThreadOptions, supervisor?: SupervisorOptions): Promise<SupervisedEngine> {
  return SupervisedEngine.start(options, supervisor);
}
