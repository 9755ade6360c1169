// The engine's half of the prepared GPU run (scripts/gpu/measure.sh, docs/gpu.md): loads a package on
// an execution provider and times whole pictures per mode, as a user's request runs them.
//
//   node engine-bench.mjs --model-dir PKG [--provider cuda|cpu] [--modes single,afa,single_att] [--rounds 3] [--json FILE]
//
// Bundled into one file by scripts/gpu/pack.sh (onnxruntime-node stays external), so that the GPU
// machine needs only node and onnxruntime-node. Per mode: the first picture (CUDA: cuDNN's algorithm
// search, arena growth) and the median of `rounds` more of the package's default size, steps and
// guidance: total, denoising and decoding ms, ms per step. Load: Engine.load + warmUp (every graph).
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import type { GenerateRequest, Mode } from '../../src/engine/api.ts';
import { Engine } from '../../src/engine/pipeline.ts';

const { values } = parseArgs({
  options: {
    'model-dir': { type: 'string' },
    provider: { type: 'string', default: 'cuda' },
    modes: { type: 'string', default: 'single,afa,single_att' },
    rounds: { type: 'string', default: '3' },
    json: { type: 'string' },
  },
});
if (!values['model-dir']) throw new Error('engine-bench: --model-dir PKG is required');
const provider = values.provider === 'cpu' ? 'cpu' : 'cuda';
const rounds = Math.max(1, Number(values.rounds));
const log = (s: string) => process.stderr.write(`engine-bench: ${s}\n`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const prompt = 'a photograph of an astronaut riding a horse on the moon';

const started = performance.now();
const engine = await Engine.load(values['model-dir'], { executionProvider: provider, warn: log });
const loadMs = performance.now() - started;
await engine.warmUp();
const warmUpMs = performance.now() - started - loadMs;
const info = engine.info();
log(`${info.name} on ${provider}: load ${loadMs.toFixed(0)} ms, warm-up (every graph) ${warmUpMs.toFixed(0)} ms`);

const requests: Record<string, Omit<GenerateRequest, 'seed'>> = {
  single: { prompt, mode: 'single' as Mode, experts: [info.experts[0].id] },
  afa: { prompt, mode: 'afa' as Mode, ensemble: info.ensembles[0]?.id },
  // expert e0att (scripts/gpu/measure.py build): e0 with the attention softmax in float16 as well
  single_att: { prompt, mode: 'single' as Mode, experts: ['e0att'] },
};
const modes: Record<string, unknown> = {};
for (const mode of values.modes.split(',')) {
  const request = requests[mode];
  if (!request) throw new Error(`engine-bench: unknown mode ${mode} (single, afa, single_att)`);
  if (mode === 'single_att' && !info.experts.some((e) => e.id === 'e0att')) continue;
  const first = performance.now();
  const warm = await engine.generate({ ...request, seed: 1 });
  const firstMs = performance.now() - first;
  const runs = [];
  for (let r = 0; r < rounds; r++) runs.push((await engine.generate({ ...request, seed: 2 + r })).timings);
  const steps = warm.params.steps;
  const row = {
    size: `${warm.params.width}x${warm.params.height}`,
    steps,
    guidance: warm.params.guidance,
    first_ms: firstMs,
    total_ms: median(runs.map((t) => t.totalMs)),
    denoise_ms: median(runs.map((t) => t.denoiseMs)),
    decode_ms: median(runs.map((t) => t.decodeMs)),
    run_ms: median(runs.map((t) => t.runMs)),
    step_ms: median(runs.map((t) => t.denoiseMs)) / steps,
    totals_ms: runs.map((t) => t.totalMs),
  };
  modes[mode] = row;
  log(`${mode}: ${JSON.stringify(row)}`);
}
await engine.dispose();
const result = {
  provider,
  package: `${info.name}@${info.version}`,
  load_ms: loadMs,
  warm_up_ms: warmUpMs,
  rss_peak_bytes: process.resourceUsage().maxRSS * 1024,
  modes,
};
if (values.json) writeFileSync(values.json, JSON.stringify(result, null, 2));
console.log(JSON.stringify(result));
