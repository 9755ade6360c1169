import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { REPO_ROOT, TINY } from './fixture.ts';

const exec = promisify(execFile);

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs src/cli/<script> in a child Node (tsx) on the tiny fixture (MODEL_DIR) and returns its exit code and output. */
export async function runCli(script: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  try {
    const { stdout, stderr } = await exec(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src/cli', script), ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, MODEL_DIR: TINY, ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}
