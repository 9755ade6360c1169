// What travels through BullMQ between the bot and the GPU workers (all JSON; images go through
// their own Redis keys, see names.ts, so the queue's event stream stays small).
import { EngineError, type GenerateRequest } from '../engine/api.ts';

export const JOB_NAME = 'generate';

/** A worker picks a killed worker's job up again at most this many times; the next stall fails it. */
export const MAX_STALLED_RUNS = 2;

export interface RemoteJobData {
  request: GenerateRequest;
  /** The bot that dispatched it (its application id): a restarted bot cancels its own leftovers. */
  owner: string;
  dispatchedAt: number;
}

export interface RemoteJobProgress {
  step: number;
  steps: number;
  /** A new preview image is stored under redisKeys.preview(jobId). */
  preview?: boolean;
}

/** The job's return value; the images are stored under redisKeys.result(jobId). */
export interface RemoteJobReturn {
  worker: string;
  bytes: number;
}

const FAILURE_MARK = 'engine-error:';

/** A worker's failure as the text BullMQ stores (failedReason), keeping the engine's error code. */
export function encodeFailure(error: unknown): string {
  const body =
    error instanceof EngineError
      ? { code: error.code, message: error.message }
      : { code: 'internal', message: `The GPU worker failed: ${(error as Error)?.message ?? String(error)}` };
  return FAILURE_MARK + JSON.stringify(body);
}

export const STALLED_MESSAGE =
  `the GPU workers running this job stopped ${MAX_STALLED_RUNS + 1} times (it was started again on another worker ` +
  `${MAX_STALLED_RUNS} times), so it was given up. Please try again later.`;

/** The error to show for a failed job's reason, whoever failed it (the engine, BullMQ's stall check, …). */
export function decodeFailure(reason: string | undefined): EngineError {
  const text = reason ?? '';
  if (text.startsWith(FAILURE_MARK)) {
    try {
      const { code, message } = JSON.parse(text.slice(FAILURE_MARK.length)) as { code: EngineError['code']; message: string };
      return new EngineError(code, message);
    } catch {
      // fall through: show the raw reason
    }
  }
  if (/stalled more than allowable limit/.test(text)) return new EngineError('internal', STALLED_MESSAGE);
  return new EngineError('internal', `The GPU worker failed: ${text || 'no reason given'}`);
}
