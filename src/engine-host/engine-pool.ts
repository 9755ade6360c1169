// Several engine threads behind one EngineClient: each job goes to the least busy thread, so
// QUEUE_CONCURRENCY jobs really run at the same time (one thread runs one job at a time).
import os from 'node:os';
import type { EngineClient, GenerateRequest, GenerateResult, PackageInfo } from '../engine/api.ts';
import type { EngineThreadCallOptions } from './engine-thread.ts';
import type { EngineThreadOptions } from './protocol.ts';
import { startSupervisedEngine, type SupervisorOptions } from './supervised-engine.ts';

export class EnginePool implements EngineClient {
  private readonly busy: number[];

  constructor(private readonly members: EngineClient[]) {
    if (members.length === 0) throw new Error('an engine pool needs at least one engine');
    this.busy = members.map(() => 0);
  }

  get size(): number {
    return this.members.length;
  }

  info(): Promise<PackageInfo> {
    return this.members[0].info();
  }

  async generate(
    request: GenerateRequest,
    options?: EngineThreadCallOptions,
  ): Promise<GenerateResult> {
    let pick = 0;
    for (let i = 1; i < this.members.length; i++) if (this.busy[i] < this.busy[pick]) pick = i;
    this.busy[pick] += 1;
    try {
      return await this.members[pick].generate(request, options);
    } finally {
      this.busy[pick] -= 1;
    }
  }

  async dispose(): Promise<void> {
    await Promise.all(this.members.map((m) => m.dispose()));
  }
}

/** `size` supervised engine threads on one model package (threads split the CPU cores between them). */
export async function startEnginePool(options: EngineThreadOptions, size: number, supervisor?: SupervisorOptions): Promise<EngineClient> {
  if (size <= 1) return startSupervisedEngine(options, supervisor);
  const threads = options.threads ?? Math.max(1, Math.floor(os.availableParallelism() / size));
  const members = await Promise.all(Array.from({ length: size }, () => startSupervisedEngine({ ...options, threads }, supervisor)));
  return new EnginePool(members);
}
