// Messages between the engine's worker thread and the thread that owns it.
import type { GenerateRequest, GenerateResult, PackageInfo, ProgressEvent } from '../engine/api.ts';

export interface EngineThreadOptions {
  modelDir: string;
  executionProvider?: 'cpu' | 'cuda';
  threads?: number;
  /** Open every graph at start, so a corrupt package fails at load instead of at the first job. */
  warmUp?: boolean;
}

export interface SerializedError {
  code: string;
  message: string;
}

export type ToThread =
  /** `control`: a JobControl's buffer (cancellation and holds, read at step boundaries). */
  | { type: 'generate'; id: number; request: GenerateRequest; control: SharedArrayBuffer }
  | { type: 'dispose' }
  /** End the thread now if it is idle (a running job sees the thread's exit cell at its next step). */
  | { type: 'exit' };

/** What the thread is started with: its options, and a cell holding an exit code to end with (0: none). */
export interface EngineThreadData {
  options: EngineThreadOptions;
  exitCode: SharedArrayBuffer;
}

export type FromThread =
  | { type: 'ready'; info: PackageInfo }
  | { type: 'load-error'; error: SerializedError }
  | { type: 'progress'; id: number; event: ProgressEvent }
  | { type: 'result'; id: number; result: GenerateResult }
  | { type: 'error'; id: number; error: SerializedError }
  | { type: 'disposed' };
