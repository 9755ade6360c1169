// A generation stops between denoising steps when its caller asks.
import { EngineError } from '../api.ts';

export class Cancellation {
  constructor(
    private readonly signal?: AbortSignal,
    /** Polled too, for hosts that cannot deliver an AbortSignal in time (a busy worker thread's event loop). */
    private readonly isCancelled?: () => boolean,
  ) {}

  throwIfRequested(): void {
    if (this.signal?.aborted || this.isCancelled?.()) throw new EngineError('cancelled', 'The generation was cancelled.');
  }
}
