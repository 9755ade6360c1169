// `npm start` (src/bot/main.ts) as a child process, for the tests of what a supervisor sees: exit
// statuses, log lines, signals.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const MAIN = fileURLToPath(new URL('../../src/bot/main.ts', import.meta.url));
const TSX = import.meta.resolve('tsx');

export interface BotProcess {
  /** Everything it wrote so far, stdout and stderr together. */
  output: () => string;
  /** Its exit status (null when a signal ended it). */
  exited: Promise<number | null>;
  /** Whether it is still running. */
  running: () => boolean;
  kill: (signal: NodeJS.Signals) => void;
}

/** Runs main.ts in `cwd` (an empty directory: no .env there) with exactly the given environment. */
export function runMain(env: Record<string, string>, cwd: string): BotProcess {
  const child = spawn(process.execPath, ['--import', TSX, MAIN], {
    cwd,
    env: { PATH: process.env.PATH ?? '', OMP_WAIT_POLICY: 'PASSIVE', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let done = false;
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  // 'close', not 'exit': by then everything the process wrote has been read.
  const exited = new Promise<number | null>((resolve) =>
    child.on('close', (code) => {
      done = true;
      resolve(code);
    }),
  );
  return { output: () => output, exited, running: () => !done, kill: (signal) => void child.kill(signal) };
}

/**
 * The exit status, or a failure after `boundMs`: a bound for a process that would never exit, not a
 * measure of how long it takes (no test asserts a duration).
 */
export async function exitStatus(run: BotProcess, boundMs: number, what: string): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: the bot process had not exited after ${boundMs / 1000} s\n${run.output()}`)), boundMs);
  });
  try {
    return await Promise.race([run.exited, bound]);
  } finally {
    clearTimeout(timer);
  }
}

export interface LogLine {
  level: number;
  msg: string;
  [field: string]: unknown;
}

/** The pino lines of the output (JSON), skipping anything else (console.error lines, a line still being written). */
export function logLines(output: string): LogLine[] {
  return output.split('\n').flatMap((line) => {
    if (!line.startsWith('{')) return [];
    try {
      return [JSON.parse(line) as LogLine];
    } catch {
      return [];
    }
  });
}
