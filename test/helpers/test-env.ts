// Loaded with --import into every test file's process (package.json's test:node): the engine's
// derived graphs (merges, ORT-optimized copies) go to a throwaway folder, never to the user's
// ~/.cache. Child processes a test starts inherit the variable; the process that made the folder
// removes it when it exits.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

if (!process.env.ENGINE_CACHE_DIR) {
  const dir = mkdtempSync(path.join(tmpdir(), 'engine-cache-test-'));
  process.env.ENGINE_CACHE_DIR = dir;
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
}
