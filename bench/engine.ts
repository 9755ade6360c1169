// `npm run bench [-- --json] [--model-dir DIR] [--rounds N] [--steps N]`
// Measures, side by side in one run on one package: ms per denoising step for each mode, AFA against
// the sum of its experts' single steps, the engine's overhead over session.run, end-to-end time, peak
// RSS, and (when Python with torch is present) the PyTorch reference sampler against the engine on the
// tiny fixture, whose PyTorch modules the trainer can rebuild.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { GenerateRequest, Mode } from '../src/engine/api.ts';
import { Engine } from '../src/engine/pipeline.ts';
import { median, pythonCommand, torchUnavailable } from './helpers.ts';

const { values } = parseArgs({
  options: {
    json: { type: 'boolean' },
    'model-dir': { type: 'string' },
    rounds: { type: 'string', default: '5' },
    steps: { type: 'string', default: '10' },
  },
});

const modelDir = path.resolve(
  values['model-dir'] ?? process.env.MODEL_DIR ?? (existsSync('models/demo/manifest.json') ? 'models/demo' : 'test/fixtures/tiny'),
);
const rounds = Number(values.rounds);
const steps = Number(values.steps);
const log = (s: string) => process.stderr.write(s + '\n');


const engine = await Engine.load(modelDir, { executionProvider: (process.env.EXECUTION_PROVIDER as 'cpu' | 'cuda') ?? 'cpu' });
const info = engine.info();
const ensemble = info.ensembles.find((e) => e.method === 'afa');
const experts = ensemble ? ensemble.experts : info.experts.slice(0, 3).map((e) => e.id);
// The training-free fuse ensemble of the same experts (issue 18), when the package has one.
const fuse = info.ensembles.find((e) => e.method === 'fuse' && e.experts.length === experts.length && experts.every((x) => e.experts.includes(x)));
const prompt = 'a red circle on the left and a blue square on the right, white background';

const cases: { key: string; request: Omit<GenerateRequest, 'prompt' | 'seed'> }[] = [
  ...experts.map((id) => ({ key: `single:${id}`, request: { mode: 'single' as Mode, experts: [id] } })),
  { key: 'average', request: { mode: 'average', experts } },
  { key: 'merge', request: { mode: 'merge', experts } },
];
if (fuse) cases.push({ key: 'fuse', request: { mode: 'fuse', ensemble: fuse.id } });
if (ensemble) cases.push({ key: 'afa', request: { mode: 'afa', ensemble: ensemble.id } });

const stepMs = new Map<string, number[]>();
const overheads: number[] = [];
log(`bench: ${info.name}@${info.version} from ${modelDir}, ${rounds} rounds × ${cases.length} cases × ${steps} steps`);
await engine.warmUp();
for (const c of cases) await engine.generate({ ...c.request, prompt, seed: 1, steps: 2 }); // warm every path (merge builds its graph)
for (let r = 0; r < rounds; r++) {
  for (const c of cases) {
    const result = await engine.generate({ ...c.request, prompt, seed: 100 + r, steps });
    const list = stepMs.get(c.key) ?? [];
    list.push(result.timings.denoiseMs / steps);
    stepMs.set(c.key, list);
    overheads.push(result.timings.denoiseMs / result.timings.denoiseRunMs);
  }
}
const endToEnd: number[] = [];
for (let r = 0; r < rounds; r++) {
  const started = performance.now();
  await engine.generate({ mode: ensemble ? 'afa' : 'single', ensemble: ensemble?.id, experts: ensemble ? undefined : [experts[0]], prompt, seed: 7 + r });
  endToEnd.push(performance.now() - started);
}
await engine.dispose();
// The PyTorch reference can only rebuild the tiny fixture's modules (the other packages ship ONNX
// graphs alone), so the ratio is measured there, both sides on the same weights and the same requests.
let torchOverEngine: number | null = null;
const torchScript = path.resolve('trainer/fixture/bench_reference.py');
const tinyDir = path.resolve('test/fixtures/tiny');
const py = pythonCommand();
const noTorch = torchUnavailable(py);
if (noTorch) {
  log(`torch reference not measured: ${noTorch}`);
} else {
  const run = spawnSync(py, [torchScript, '--model-dir', tinyDir, '--steps', String(steps), '--rounds', String(rounds)], {
    encoding: 'utf8',
    env: { ...process.env, OMP_WAIT_POLICY: 'PASSIVE', PYTHONPATH: path.resolve('.') },
  });
  const last = run.stdout?.trim().split('\n').pop();
  if (run.status === 0 && last) {
    const torch = JSON.parse(last) as { step_ms: Record<'single' | 'afa', number> };
    const tiny = await Engine.load(tinyDir, { executionProvider: 'cpu' });
    const same = { prompt, seed: 1, steps, guidance: 5, scheduler: 'ddim' as const };
    const tinyMs = async (request: Omit<GenerateRequest, 'prompt' | 'seed'>): Promise<number> => {
      await tiny.generate({ ...request, ...same, steps: 2 });
      const times: number[] = [];
      for (let r = 0; r < rounds; r++) times.push((await tiny.generate({ ...request, ...same })).timings.denoiseMs / steps);
      return median(times);
    };
    const engineMs = { single: await tinyMs({ mode: 'single', experts: ['alpha'] }), afa: await tinyMs({ mode: 'afa', ensemble: 'duo' }) };
    await tiny.dispose();
    torchOverEngine = torch.step_ms.afa / engineMs.afa;
    log(
      `torch reference on the tiny fixture: single ${torch.step_ms.single.toFixed(2)} vs engine ${engineMs.single.toFixed(2)} ms/step, ` +
        `afa ${torch.step_ms.afa.toFixed(2)} vs ${engineMs.afa.toFixed(2)} ms/step`,
    );
  } else {
    log(`torch reference not measured: ${(run.stderr ?? '').trim().split('\n').pop()}`);
  }
}


const singleSum = experts.reduce((s, id) => s + median(stepMs.get(`single:${id}`)!), 0);
const step = {
  single: experts.reduce((s, id) => s + median(stepMs.get(`single:${id}`)!), 0) / experts.length,
  average: median(stepMs.get('average')!),
  merge: median(stepMs.get('merge')!),
  fuse: fuse ? median(stepMs.get('fuse')!) : null,
  afa: ensemble ? median(stepMs.get('afa')!) : null,
};

const result = {
  package: `${info.name}@${info.version}`,
  step_ms: step,
  afa_over_singles: step.afa !== null ? step.afa / singleSum : null,
  fuse_over_singles: step.fuse !== null ? step.fuse / singleSum : null,
  overhead: median(overheads),
  end_to_end_ms: median(endToEnd),
  peak_rss_mb: process.resourceUsage().maxRSS / 1024,
  torch_over_engine: torchOverEngine,
};
const f = (x: number | null, d = 2) => (x === null ? 'n/a' : x.toFixed(d));
log(
  [
    `ms per step: single ${f(step.single)} (mean over ${experts.length} experts), average ${f(step.average)}, merge ${f(step.merge)}, fuse ${f(step.fuse)}, afa ${f(step.afa)}`,
    `afa / sum of its experts' single steps: ${f(result.afa_over_singles)} (target ≤ 1.25); fuse: ${f(result.fuse_over_singles)}`,
    `engine overhead (loop wall time / time in session.run): ${f(result.overhead, 3)} (target ≤ 1.05)`,
    `end to end (default generation): ${f(result.end_to_end_ms, 1)} ms; peak RSS ${f(result.peak_rss_mb, 0)} MB`,
    `PyTorch reference / engine (AFA, tiny fixture): ${f(torchOverEngine)} (target > 1)`,
  ].join('\n'),
);
if (values.json) process.stdout.write(JSON.stringify(result) + '\n');
