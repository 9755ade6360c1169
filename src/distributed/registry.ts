// Workers advertise what they can run: a key per worker that expires unless its heartbeat renews it,
// and the package info they loaded (kept, so the bot can start while no worker is online).
import type { Redis } from 'ioredis';
import type { PackageInfo } from '../engine/api.ts';
import { packageId, redisKeys } from './names.ts';

export interface WorkerAdvert {
  id: string;
  host: string;
  pid: number;
  /** `name@version` of the loaded package; empty when it could not be loaded. */
  package: string;
  experts: string[];
  ensembles: string[];
  executionProvider: string;
  /** False: the worker takes no jobs (see `problem`). */
  healthy: boolean;
  problem?: string;
  state: 'idle' | 'busy' | 'stopping';
  /** The job it is running. */
  jobId?: string;
  jobsDone: number;
  startedAt: number;
  seenAt: number;
}

export interface PublishedPackage {
  info: PackageInfo;
  publishedAt: number;
}

export async function advertise(redis: Redis, advert: WorkerAdvert, ttlMs: number): Promise<void> {
  await redis.set(redisKeys.worker(advert.id), JSON.stringify({ ...advert, seenAt: Date.now() }), 'PX', ttlMs);
}

export async function withdraw(redis: Redis, workerId: string): Promise<void> {
  await redis.del(redisKeys.worker(workerId));
}

/** Every worker whose advertisement has not expired, by id. */
export async function listWorkers(redis: Redis): Promise<WorkerAdvert[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await redis.scan(cursor, 'MATCH', redisKeys.workerPattern, 'COUNT', 200);
    keys.push(...batch);
    cursor = next;
  } while (cursor !== '0');
  if (keys.length === 0) return [];
  const values = await redis.mget(...keys);
  return values
    .filter((v): v is string => v !== null)
    .map((v) => JSON.parse(v) as WorkerAdvert)
    .sort((a, b) => a.id.localeCompare(b.id));
}

export async function publishPackage(redis: Redis, info: PackageInfo): Promise<void> {
  const entry: PublishedPackage = { info, publishedAt: Date.now() };
  await redis.hset(redisKeys.packages, packageId(info), JSON.stringify(entry));
}

export async function listPackages(redis: Redis): Promise<PublishedPackage[]> {
  const all = await redis.hgetall(redisKeys.packages);
  return Object.values(all).map((v) => JSON.parse(v) as PublishedPackage);
}

/**
 * The package the bot serves: `prefer` if given; else the one most healthy workers have loaded (ties:
 * the most recently started worker); else, with no worker online, the most recently published one.
 */
export function choosePackage(workers: WorkerAdvert[], packages: PublishedPackage[], prefer?: string): PackageInfo | undefined {
  const byId = new Map(packages.map((p) => [packageId(p.info), p]));
  if (prefer !== undefined) return byId.get(prefer)?.info;
  const groups = new Map<string, { count: number; newest: number }>();
  for (const w of workers) {
    if (!w.healthy || !byId.has(w.package)) continue;
    const g = groups.get(w.package) ?? { count: 0, newest: 0 };
    groups.set(w.package, { count: g.count + 1, newest: Math.max(g.newest, w.startedAt) });
  }
  const live = [...groups.entries()].sort((a, b) => b[1].count - a[1].count || b[1].newest - a[1].newest)[0];
  if (live) return byId.get(live[0])!.info;
  return [...packages].sort((a, b) => b.publishedAt - a.publishedAt)[0]?.info;
}
