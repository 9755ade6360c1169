// Paths and small utilities shared by the engine tests.
import { cp, mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const TINY = process.env.TINY_FIXTURE ?? path.join(REPO_ROOT, 'test/fixtures/tiny');

/** A writable copy of the tiny fixture package, for tests that break or rearrange it. */
export async function copyOfTiny(): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tiny-'));
  await cp(TINY, dir, { recursive: true });
  return dir;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
