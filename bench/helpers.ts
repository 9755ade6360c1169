// Small helpers shared by the benches (bench/engine.ts, bench/sd15.ts): medians, the Python that has
// torch, and child processes measured for wall time and peak RSS.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** Debian's python3 (or PYTHON), as the trainer's tests use: a pyenv/venv python3 first on PATH has no torch. */
export const pythonCommand = (): string => process.env.PYTHON || '/usr/bin/python3';

/** Why `py` cannot run the trainer's PyTorch code, or null when it can. */
export function torchUnavailable(py: string = pythonCommand()): string | null {
  return spawnSync(py, ['-c', 'import torch'], { stdio: 'ignore' }).status === 0
    ? null
    : `${py} cannot import torch (bash scripts/prerequisites.sh installs it, or set PYTHON)`;
}

export interface Measured {
  status: number | null;
  stdout: string;
  stderr: string;
  seconds: number;
  /** Peak resident set size of the child (the largest of it and the children it waited for), from /usr/bin/time. */
  peakRssMb: number | null;
}

const GNU_TIME = '/usr/bin/time';

/**
 * Runs a command to its end, passing its stderr through as it comes (progress), and returns its
 * output, wall time and peak RSS. The child runs niced when `nice` is set (long CPU jobs on a shared machine).
 */
export async function runMeasured(
  command: string,
  args: string[],
  options: { env?: NodeJS.ProcessEnv; nice?: number; echo?: (line: string) => void; cwd?: string } = {},
): Promise<Measured> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'bench-'));
  const timeFile = path.join(dir, 'time');
  let argv = [command, ...args];
  const timed = existsSync(GNU_TIME);
  if (timed) argv = [GNU_TIME, '-f', '%e %M', '-o', timeFile, ...argv];
  if (options.nice) argv = ['nice', '-n', String(options.nice), ...argv];
  const started = performance.now();
  const child = spawn(argv[0], argv.slice(1), { env: options.env ?? process.env, cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let partial = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => {
    const text = d.toString();
    stderr += text;
    if (!options.echo) return;
    const lines = (partial + text).split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) if (line.trim() && !/Warning|warnings\.warn|^\s/.test(line)) options.echo(line);
  });
  const status = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const seconds = (performance.now() - started) / 1000;
  let peakRssMb: number | null = null;
  if (timed && existsSync(timeFile)) {
    const last = readFileSync(timeFile, 'utf8').trim().split('\n').pop() ?? '';
    const kb = Number(last.split(' ')[1]);
    if (Number.isFinite(kb)) peakRssMb = kb / 1024;
  }
  rmSync(dir, { recursive: true, force: true });
  return { status, stdout, stderr, seconds, peakRssMb };
}

/** The last line of a child's stdout, parsed as JSON (the benches' children end with one). */
export function lastJsonLine<T>(run: Measured, what: string): T {
  const last = run.stdout.trim().split('\n').pop();
  if (run.status !== 0 || !last) {
    const why = run.stderr.trim().split('\n').filter((l) => l.trim()).pop() ?? `exit code ${run.status}`;
    throw new Error(`${what} failed: ${why}`);
  }
  return JSON.parse(last) as T;
}
