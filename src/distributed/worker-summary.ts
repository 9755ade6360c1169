// The GPU workers in a few lines for Discord (/queue in the distributed mode).
import type { WorkerAdvert } from './registry.ts';

const MAX_LISTED = 10;

/** One line per worker serving `packageId` (busy first), then the unhealthy ones with their reason. */
export function describeWorkers(workers: WorkerAdvert[], packageId: string): string {
  const serving = workers.filter((w) => w.healthy && w.package === packageId);
  const unhealthy = workers.filter((w) => !w.healthy);
  const busy = serving.filter((w) => w.state === 'busy').length;
  const lines = [
    serving.length === 0
      ? `No GPU worker is online for ${packageId}: jobs wait until one starts.`
      : `${serving.length} GPU worker${serving.length === 1 ? '' : 's'} for ${packageId}, ${busy} busy:`,
  ];
  const order = { busy: 0, idle: 1, stopping: 2 } as const;
  for (const w of [...serving].sort((a, b) => order[a.state] - order[b.state] || a.id.localeCompare(b.id)).slice(0, MAX_LISTED)) {
    const state = w.state === 'busy' ? 'drawing' : w.state === 'stopping' ? 'stopping' : 'idle';
    lines.push(`• \`${w.id}\` (${w.executionProvider}) — ${state}, ${w.jobsDone} job${w.jobsDone === 1 ? '' : 's'} done`);
  }
  if (serving.length > MAX_LISTED) lines.push(`• … and ${serving.length - MAX_LISTED} more`);
  for (const w of unhealthy.slice(0, MAX_LISTED)) lines.push(`• ⚠️ \`${w.id}\` takes no jobs: ${(w.problem ?? 'unhealthy').slice(0, 200)}`);
  return lines.join('\n');
}
