// Wrappers around any EngineClient (the procedural double or the real engine) that let tests control
// timing and failures without depending on how fast the engine underneath is.
import { EngineError, type EngineClient, type GenerateCallOptions, type GenerateRequest, type GenerateResult, type PackageInfo, type ProgressEvent } from '../../src/engine/api.ts';

/** Holds every generate() call at a gate until the test opens it (abortable unless `ignoreAbort`). */
export class GatedEngine implements EngineClient {
  /** generate() calls waiting at the gate right now. */
  waiting = 0;
  /** generate() calls that passed the gate. */
  started = 0;
  readonly requests: GenerateRequest[] = [];
  private gate: Promise<void>;
  private release!: () => void;

  constructor(
    readonly base: EngineClient,
    private readonly options: { open?: boolean; ignoreAbort?: boolean } = {},
  ) {
    this.gate = new Promise((resolve) => (this.release = resolve));
    if (options.open) this.release();
  }

  open(): void {
    this.release();
  }

  /** Closes the gate again for calls that arrive from now on. */
  close(): void {
    this.gate = new Promise((resolve) => (this.release = resolve));
  }

  info(): Promise<PackageInfo> {
    return this.base.info();
  }

  async generate(request: GenerateRequest, options: GenerateCallOptions = {}): Promise<GenerateResult> {
    this.requests.push(structuredClone(request));
    this.waiting++;
    try {
      await new Promise<void>((resolve, reject) => {
        const { signal } = options;
        if (signal && !this.options.ignoreAbort) {
          if (signal.aborted) return reject(new EngineError('cancelled', 'Generation cancelled.'));
          signal.addEventListener('abort', () => reject(new EngineError('cancelled', 'Generation cancelled.')), { once: true });
        }
        void this.gate.then(resolve);
      });
    } finally {
      this.waiting--;
    }
    // An engine that noticed the abort late still gives up before doing the work.
    if (options.signal?.aborted) throw new EngineError('cancelled', 'Generation cancelled.');
    this.started++;
    return this.base.generate(request, options);
  }

  dispose(): Promise<void> {
    this.release();
    return this.base.dispose();
  }
}

/** Fails generate() with the given EngineError when `rejects(request)` says so. */
export class RejectingEngine implements EngineClient {
  constructor(
    readonly base: EngineClient,
    private readonly rejects: (request: GenerateRequest) => EngineError | undefined,
  ) {}

  info(): Promise<PackageInfo> {
    return this.base.info();
  }

  async generate(request: GenerateRequest, options?: GenerateCallOptions): Promise<GenerateResult> {
    const error = this.rejects(request);
    if (error) throw error;
    return this.base.generate(request, options);
  }

  dispose(): Promise<void> {
    return this.base.dispose();
  }
}

