// Small helpers shared by the command-line tools: model directory default and user-facing errors.
import path from 'node:path';
import { EngineError } from '../engine/api.ts';

export function defaultModelDir(): string {
  return path.resolve(process.env.MODEL_DIR ?? 'models/demo');
}

export class UsageError extends Error {}

/** Prints a person-readable message (never a stack trace for expected failures) and exits. */
export function exitWithError(err: unknown): never {
  if (err instanceof EngineError || err instanceof UsageError) {
    process.stderr.write(`error: ${err.message}\n`);
    process.exit(2);
  }
  const e = err as { code?: string; message?: string };
  if (e?.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' || e?.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`error: unexpected failure: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
}

export function parseNumber(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number (got "${value}").`);
  return n;
}
