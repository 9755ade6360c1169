// Where the distributed mode keeps things in Redis. BullMQ's own keys live under `imagine:<queue>:…`;
// ours (results, previews, cancellations, workers, packages) under `imagine:x:…`, never inside them.

/** BullMQ key prefix of every queue of this bot. */
export const QUEUE_PREFIX = 'imagine';

const OWN = `${QUEUE_PREFIX}:x`;

/** `name@version`, as workers advertise packages and jobs are routed. */
export function packageId(info: { name: string; version: string }): string {
  return `${info.name}@${info.version}`;
}

/**
 * One BullMQ queue per model package: a job only reaches workers that loaded that package (and that
 * version). BullMQ refuses ':' in queue names.
 */
export function queueNameFor(info: { name: string; version: string }): string {
  return `pkg.${packageId(info)}`.replace(/[:\s]/g, '_');
}

export const redisKeys = {
  /** A finished job's images (binary, see result-codec.ts), until the bot collects them. */
  result: (jobId: string) => `${OWN}:result:${jobId}`,
  /** The newest progress preview of a running job. */
  preview: (jobId: string) => `${OWN}:preview:${jobId}`,
  /** Set by the bot: the job is cancelled (workers check it before and during the job). */
  cancel: (jobId: string) => `${OWN}:cancel:${jobId}`,
  /** A worker's advertisement; expires unless the worker's heartbeat renews it. */
  worker: (workerId: string) => `${OWN}:worker:${workerId}`,
  workerPattern: `${OWN}:worker:*`,
  /** Package info as the workers loaded it (kept without expiry: the bot can start while workers are away). */
  packages: `${OWN}:packages`,
};
