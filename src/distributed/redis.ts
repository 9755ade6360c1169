// Redis connections of the distributed mode. Commands wait through a Redis restart instead of failing
// (maxRetriesPerRequest: null), as BullMQ requires for its blocking connections anyway.
import { Redis } from 'ioredis';
import type { ConnectionOptions } from 'bullmq';

export interface DistributedLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/** Connection settings for BullMQ's Queue, QueueEvents and Worker. */
export function bullConnection(url: string): ConnectionOptions {
  return { url, maxRetriesPerRequest: null };
}

/** A plain client for our own keys. Connection errors are logged once per outage, not per retry. */
export function createRedis(url: string, logger: DistributedLogger, name: string): Redis {
  const redis = new Redis(url, { maxRetriesPerRequest: null, connectionName: name });
  let down = false;
  redis.on('error', (error: Error) => {
    if (down) return;
    down = true;
    logger.warn({ err: error, connection: name }, 'redis connection lost; retrying');
  });
  redis.on('ready', () => {
    if (!down) return;
    down = false;
    logger.info({ connection: name }, 'redis connection back');
  });
  return redis;
}
