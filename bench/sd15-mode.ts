// One mode of `npm run bench:sd15`, alone in its own process so that its peak RSS is its own:
//   node --import tsx bench/sd15-mode.ts --package DIR --mode single|average|merge|afa|fuse
//        [--experts a,b,c] [--ensemble ID] [--size 256] [--steps 2] [--threads 2]
// Opens the graphs the mode needs (timed one by one; merge: builds or finds the merged graph), runs one
// 1-step image (warm-up), then one image of --steps steps, and prints one JSON line: load and open
// times, ms per guided step, decode ms, the graphs used and the peak RSS of this process.
import { statSync, existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import type { Mode } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';

const { values } = parseArgs({
  options: {
    package: { type: 'string' },
    mode: { type: 'string' },
    experts: { type: 'string' },
    ensemble: { type: 'string' },
    size: { type: 'string', default: '256' },
    steps: { type: 'string', default: '2' },
    threads: { type: 'string', default: '2' },
  },
});
if (!values.package || !values.mode) throw new Error('--package and --mode are required');
const mode = values.mode as Mode;
const size = Number(values.size);
const steps = Number(values.steps);

const bytesOf = (file: string): number => statSync(file).size + (existsSync(file + '_data') ? statSync(file + '_data').size : 0);
const seconds = (since: number) => (performance.now() - since) / 1000;

const started = performance.now();
const engine = await Engine.load(values.package, { executionProvider: 'cpu', threads: Number(values.threads) });
const pkg = engine.pkg;
const m = pkg.manifest;
const ensemble = values.ensemble ? pkg.ensemble(values.ensemble) : undefined;
const ids = ensemble ? ensemble.experts : (values.experts ?? '').split(',').filter(Boolean);
const experts = ids.map((id) => pkg.expert(id));
const textEncoders = [...new Set(experts.map((e) => e.textEncoder ?? m.textEncoder))];
const denoisers = mode === 'afa' || mode === 'fuse' ? [ensemble!.graph] : mode === 'merge' ? [] : experts.map((e) => e.unet);
const files = [...textEncoders, ...denoisers, m.vaeDecoder];

const open: { file: string; bytes: number; seconds: number }[] = [];
for (const file of files) {
  const t = performance.now();
  await pkg.session(file);
  open.push({ file, bytes: bytesOf(file), seconds: seconds(t) });
}
let mergeSeconds: number | null = null;
if (mode === 'merge') {
  const t = performance.now();
  await pkg.mergedUnet(experts, experts.map(() => 1 / experts.length)); // the weights a plain merge request resolves to
  mergeSeconds = seconds(t);
}
const loadSeconds = seconds(started);

const request = {
  mode,
  ...(ensemble ? { ensemble: ensemble.id } : { experts: ids }),
  prompt: 'a lighthouse on a cliff at sunset, oil painting',
  seed: 1,
  width: size,
  height: size,
  scheduler: 'ddim' as const,
};
const warm = await engine.generate({ ...request, steps: 1 });
const result = await engine.generate({ ...request, seed: 2, steps });
const sessions = await pkg.openSessions();
await engine.dispose();

process.stdout.write(
  JSON.stringify({
    mode,
    experts: ids,
    ensemble: ensemble?.id ?? null,
    load_s: loadSeconds,
    open,
    merge_s: mergeSeconds,
    first_image_s: warm.timings.totalMs / 1000,
    step_ms: result.timings.denoiseMs / steps,
    decode_ms: result.timings.decodeMs,
    total_ms: result.timings.totalMs,
    sessions: sessions.length,
    peak_rss_mb: process.resourceUsage().maxRSS / 1024,
  }) + '\n',
);
