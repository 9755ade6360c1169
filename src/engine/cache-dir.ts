import { createHash } from 'node:crypto';
import { homedir } from 'node:os';
import path from 'node:path';

/**
 * Where the engine keeps files it derives from a model package and can rebuild at any time
 * (merged graphs, ORT-optimized graphs): $ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/ensemble-diffusion,
 * else ~/.cache/ensemble-diffusion. One folder per package (by its absolute path) and purpose, so
 * that a read-only package folder still works and deleting the cache only costs time.
 */
export function engineCacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.ENGINE_CACHE_DIR) return path.resolve(env.ENGINE_CACHE_DIR);
  const base = env.XDG_CACHE_HOME ? path.resolve(env.XDG_CACHE_HOME) : path.join(homedir(), '.cache');
  return path.join(base, 'ensemble-diffusion');
}

/** The cache folder for one package and one purpose, e.g. packageCacheDir('models/demo', 'merged'). */
export function packageCacheDir(packageDir: string, purpose: string, env: NodeJS.ProcessEnv = process.env): string {
  const abs = path.resolve(packageDir);
  const tag = `${path.basename(abs) || 'package'}-${createHash('sha256').update(abs).digest('hex').slice(0, 12)}`;
  return path.join(engineCacheRoot(env), tag, purpose);
}
