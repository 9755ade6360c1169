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
  | { type: 'generate'; id: number; request: GenerateRequest; cancel: SharedArrayBuffer }
  | { type: 'dispose' }
  /** End the thread abruptly at its next safe point (between steps), as a crash would. */
  | { type: 'exit'; code: number };

export type FromThread =
  | { type: 'ready'; info: PackageInfo }
  | { type: 'load-error'; error: SerializedError }
  | { type: 'progress'; id: number; event: ProgressEvent }
  | { type: 'result'; id: number; result: GenerateResult }
  | { type: 'error'; id: number; error: SerializedError }
  | { type: 'disposed' };
