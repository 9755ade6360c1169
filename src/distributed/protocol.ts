// What travels through BullMQ between the bot and the GPU workers (all JSON; images go through
// their own Redis keys, see names.ts, so the queue's event stream stays small).
import { EngineError, type GenerateRequest } from '../engine/api.ts';

export const JOB_NAME = 'generate';

/** A worker picks a killed worker's job up again at most this many times; the next stall fails it. */
export const MAX_STALLED_RUNS = 2;

/**
 * A GenerateRequest as JSON can carry it: an image-to-image init picture (a Uint8Array, which JSON
 * would turn into an object of numbered keys) travels as base64. Build it with encodeRequest.
 */
export type WireRequest = Omit<GenerateRequest, 'initImage'> & {
  initImage?: { width: number; height: number; base64: string };
};

export function encodeRequest(request: GenerateRequest): WireRequest {
  const { initImage, ...rest } = request;
  if (!initImage) return rest;
  const { width, height, data } = initImage;
  return { ...rest, initImage: { width, height, base64: Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('base64') } };
}

export function decodeRequest(wire: WireRequest): GenerateRequest {
  const { initImage, ...rest } = wire;
  if (!initImage) return rest;
  const bytes = Buffer.from(initImage.base64, 'base64');
  if (bytes.length !== initImage.width * initImage.height * 3) {
    throw new EngineError('bad_request', `The init image arrived damaged (${bytes.length} bytes for ${initImage.width}×${initImage.height}).`);
  }
  return { ...rest, initImage: { width: initImage.width, height: initImage.height, data: new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) } };
}

export interface RemoteJobData {
  /** The request, its init image (if any) in base64 (encodeRequest / decodeRequest). */
  request: WireRequest;
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
