// `npm run bench:sd15 [-- --size 256 --steps 2 --experts 3 --threads 2 --json]` (not in CI; docs/sd15.md)
// The engine at SD1.5 scale on this machine's CPU:
//  1. builds (once, cached outside git) random-initialised SD1.5-architecture single-file checkpoints
//     (trainer.fixture.sd15_checkpoints: U-Net, CLIP ViT-L/14 text encoder, VAE; fp16; one seed per
//     expert; the last of three has its own CLIP);
//  2. imports them with `npm run import` (cached: redone when a checkpoint is newer than the package);
//  3. measures each mode in a fresh process (bench/sd15-mode.ts) — single (each expert, then the first
//     again with the optimized-graph cache warm), average, merge (twice: building, then cached) — and
//     the PyTorch fp32 U-Net on the same weights and thread count;
//  4. adds a 3-expert AFA ensemble with a random-initialised aggregator (hidden 128, depth 2) with
//     `python3 -m trainer.export --add-to` (users' command; at this size it streams one expert's weights
//     at a time through trainer.export.large_graph), and measures afa (twice);
//  5. prints load s, ms per guided step, peak RSS and file sizes per mode, afa_over_singles and
//     torch_over_engine against their targets, and (with --json) one JSON line at the end.
// Everything lives in $SD15_BENCH_DIR (default ~/.cache/ensemble-diffusion/sd15-bench), the engine's
// derived graphs in its engine-cache/ (--cold empties it first); each result is appended to progress.jsonl
// there as it comes. Expect tens of minutes and ~12 GB of RAM.
import { appendFileSync, existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { lastJsonLine, pythonCommand, runMeasured, torchUnavailable } from './helpers.ts';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '256' },
    steps: { type: 'string', default: '2' },
    experts: { type: 'string', default: '3' },
    threads: { type: 'string', default: String(Math.max(1, os.availableParallelism?.() ?? os.cpus().length)) },
    json: { type: 'boolean' },
    dir: { type: 'string' },
    config: { type: 'string', default: 'sd15' }, // 'tiny': the same path in seconds (a smoke test of the bench)
    hidden: { type: 'string', default: '128' },
    depth: { type: 'string', default: '2' },
    modes: { type: 'string', default: 'single,average,merge,afa' },
    cold: { type: 'boolean' },
    'no-torch': { type: 'boolean' },
  },
});

const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const size = Number(values.size);
const steps = Number(values.steps);
const nExperts = Number(values.experts);
const threads = Number(values.threads);
const config = values.config!;
const modes = new Set(values.modes!.split(','));
const root = path.resolve(values.dir ?? process.env.SD15_BENCH_DIR ?? path.join(os.homedir(), '.cache', 'ensemble-diffusion', 'sd15-bench'));
const packageDir = path.join(root, `package-${config}-${nExperts}`);
const engineCache = path.join(root, 'engine-cache');
const py = pythonCommand();
const log = (s: string) => process.stderr.write(s + '\n');
const echo = (line: string) => log(`    ${line}`);
const pyEnv = { ...process.env, PYTHONPATH: REPO, OMP_WAIT_POLICY: 'PASSIVE' };
const mb = (bytes: number) => bytes / 1e6;
const f = (x: number | null | undefined, d = 1) => (x === null || x === undefined ? 'n/a' : x.toFixed(d));
const bytesOf = (file: string): number => statSync(file).size + (existsSync(file + '_data') ? statSync(file + '_data').size : 0);

if (!(size > 0 && steps > 0 && nExperts >= 2 && threads > 0)) {
  log('bench:sd15: --size, --steps and --threads must be positive and --experts at least 2');
  process.exit(1);
}
const noTorch = torchUnavailable(py);
if (noTorch) {
  log(`bench:sd15 needs PyTorch to build its checkpoints: ${noTorch}`);
  process.exit(1);
}
if (values.cold) rmSync(engineCache, { recursive: true, force: true });

// 1. Checkpoints
log(`bench:sd15 in ${root} (${config}, ${nExperts} experts, ${size}², ${steps} steps, ${threads} threads)`);
const built = await runMeasured(py, ['-m', 'trainer.fixture.sd15_checkpoints', '--out', path.join(root, 'checkpoints'), '--experts', String(nExperts), '--config', config], { env: pyEnv, nice: 10, echo, cwd: REPO });
const checkpoints = lastJsonLine<{ checkpoints: string[] }>(built, 'building the checkpoints').checkpoints;
log(`checkpoints: ${checkpoints.map((c) => `${path.basename(c)} ${f(mb(statSync(c).size), 0)} MB`).join(', ')} (${f(built.seconds)} s)`);

// 2. Import (skipped when the package is newer than every checkpoint and came from them)
const manifestPath = path.join(packageDir, 'manifest.json');
const sourcesPath = path.join(packageDir, 'sources.json');
const upToDate = (): boolean => {
  if (!existsSync(manifestPath) || !existsSync(sourcesPath)) return false;
  const sources = JSON.parse(readFileSync(sourcesPath, 'utf8')) as { experts: Record<string, { path: string }> };
  const paths = Object.values(sources.experts).map((e) => e.path).sort();
  const made = statSync(sourcesPath).mtimeMs;
  return JSON.stringify(paths) === JSON.stringify([...checkpoints].sort()) && checkpoints.every((c) => statSync(c).mtimeMs < made);
};
let importRun: { seconds: number; peak_rss_mb: number | null } | null = null;
if (!upToDate()) {
  log('importing (npm run import) …');
  const sizeArgs = config === 'tiny' ? ['--size', '64', '--steps', '4'] : [];
  const run = await runMeasured('node', ['--import', 'tsx', path.join(REPO, 'src/cli/import.ts'), '--out', packageDir, '--force', '--check', 'off', ...sizeArgs, ...checkpoints], { nice: 10, echo, cwd: REPO });
  if (run.status !== 0) throw new Error(`import failed: ${run.stderr.trim().split('\n').pop()}`);
  importRun = { seconds: run.seconds, peak_rss_mb: run.peakRssMb };
  log(`imported in ${f(run.seconds)} s, peak RSS ${f(run.peakRssMb, 0)} MB`);
} else {
  log(`package: ${packageDir} (cached)`);
}

type ManifestJson = { experts: { id: string }[]; ensembles?: { id: string; graph: string | Record<string, string> }[] };
const readManifest = () => JSON.parse(readFileSync(manifestPath, 'utf8')) as ManifestJson;
const ids = readManifest().experts.map((e) => e.id).slice(0, nExperts);
// every child's result as it comes, so that an interrupted run keeps what it measured
const progress = path.join(root, 'progress.jsonl');
appendFileSync(progress, JSON.stringify({ started: new Date().toISOString(), config, size, steps, threads, import: importRun }) + '\n');

// 3. Each mode in its own process (the AFA ensemble's after its export, the slowest part)
interface ModeRun {
  mode: string;
  experts: string[];
  load_s: number;
  open: { file: string; bytes: number; seconds: number }[];
  merge_s: number | null;
  first_image_s: number;
  step_ms: number;
  decode_ms: number;
  peak_rss_mb: number;
}
const runMode = async (key: string, args: string[]): Promise<ModeRun> => {
  log(`${key} …`);
  const run = await runMeasured(
    'node',
    ['--import', 'tsx', path.join(REPO, 'bench/sd15-mode.ts'), '--package', packageDir, '--size', String(size), '--steps', String(steps), '--threads', String(threads), ...args],
    { env: { ...process.env, ENGINE_CACHE_DIR: engineCache }, nice: 10, echo, cwd: REPO },
  );
  const out = lastJsonLine<ModeRun>(run, key);
  appendFileSync(progress, JSON.stringify({ key, ...out }) + '\n');
  log(`  load ${f(out.load_s)} s, ${f(out.step_ms, 0)} ms/step, decode ${f(out.decode_ms, 0)} ms, peak RSS ${f(out.peak_rss_mb, 0)} MB`);
  return out;
};
const runs: Record<string, ModeRun> = {};
if (modes.has('single')) {
  for (const id of ids) runs[`single:${id}`] = await runMode(`single:${id}`, ['--mode', 'single', '--experts', id]);
  runs['single:again'] = await runMode(`single:${ids[0]} again`, ['--mode', 'single', '--experts', ids[0]]);
}
if (modes.has('average')) runs.average = await runMode('average', ['--mode', 'average', '--experts', ids.join(',')]);
if (modes.has('merge')) {
  runs.merge = await runMode('merge', ['--mode', 'merge', '--experts', ids.join(',')]);
  runs['merge:again'] = await runMode('merge again', ['--mode', 'merge', '--experts', ids.join(',')]);
}
// 4. PyTorch on the same weights (expert 0's U-Net, fp32, same threads)
let torchRun: { step_ms: number; load_s: number; peak_rss_mb: number } | null = null;
if (!values['no-torch']) {
  log('PyTorch fp32 U-Net on the same weights …');
  const run = await runMeasured(py, ['-m', 'trainer.fixture.sd15_bench', 'torch', '--checkpoint', checkpoints[0], '--size', String(size), '--steps', String(steps), '--threads', String(threads)], { env: pyEnv, nice: 10, echo, cwd: REPO });
  torchRun = lastJsonLine(run, 'the PyTorch reference');
  appendFileSync(progress, JSON.stringify({ key: 'torch', ...torchRun }) + '\n');
  log(`  ${f(torchRun!.step_ms, 0)} ms/step`);
}

// 5. The AFA ensemble, added as users add a trained one (`trainer.export --add-to`, which at this size holds
//    one expert's weights at a time): here a random-initialised aggregator saved as a training run saves it
const ensembleId = `afa${nExperts}`;
let afaExport: { seconds: number; peak_rss_mb: number | null; bytes: number } | null = null;
const ensembleGraph = () => (readManifest().ensembles ?? []).find((e) => e.id === ensembleId && typeof e.graph === 'string' && existsSync(path.join(packageDir, e.graph)))?.graph as string | undefined;
if (modes.has('afa') && (importRun !== null || !ensembleGraph())) {
  log(`exporting the AFA ensemble ${ensembleId} (hidden ${values.hidden}, depth ${values.depth}) …`);
  const runDir = path.join(root, `aggregator-${config}-${nExperts}-h${values.hidden}-d${values.depth}`);
  const made = await runMeasured(py, ['-m', 'trainer.fixture.sd15_bench', 'aggregator', '--package', packageDir, '--out', runDir, '--experts', ids.join(','), '--hidden', values.hidden!, '--depth', values.depth!], { env: pyEnv, cwd: REPO });
  lastJsonLine(made, 'the random aggregator');
  const args = ['-m', 'trainer.export', '--add-to', packageDir, '--method', 'afa', '--aggregator', runDir, '--id', ensembleId, '--subsets', '--force', '--check', 'off'];
  const run = await runMeasured(py, args, { env: pyEnv, nice: 10, echo, cwd: REPO });
  if (run.status !== 0) throw new Error(`--add-to failed: ${run.stderr.trim().split('\n').pop()}`);
  afaExport = { seconds: run.seconds, peak_rss_mb: run.peakRssMb, bytes: bytesOf(path.join(packageDir, ensembleGraph()!)) };
  appendFileSync(progress, JSON.stringify({ key: 'afa_export', ...afaExport }) + '\n');
  log(`AFA graph: ${f(mb(afaExport.bytes), 0)} MB in ${f(run.seconds)} s, peak RSS ${f(run.peakRssMb, 0)} MB`);
}
if (modes.has('afa')) {
  runs.afa = await runMode('afa', ['--mode', 'afa', '--ensemble', ensembleId]);
  runs['afa:again'] = await runMode('afa again', ['--mode', 'afa', '--ensemble', ensembleId]);
}

// float32 bytes of every graph used (what onnxruntime holds on the CPU once float16 weights are cast)
const graphFiles = [...new Set(Object.values(runs).flatMap((r) => r.open.map((o) => o.file)))];
const fp32 = graphFiles.length
  ? lastJsonLine<Record<string, number>>(await runMeasured(py, ['-m', 'trainer.fixture.sd15_bench', 'fp32-bytes', ...graphFiles], { env: pyEnv, cwd: REPO }), 'counting graph bytes')
  : {};

const rel = (file: string) => path.relative(packageDir, file);
const modeSummary = (r: ModeRun) => {
  const fp32Bytes = r.open.reduce((s, o) => s + (fp32[o.file] ?? 0), 0);
  return {
    load_s: r.load_s,
    merge_s: r.merge_s,
    step_ms: r.step_ms,
    decode_ms: r.decode_ms,
    first_image_s: r.first_image_s,
    peak_rss_mb: r.peak_rss_mb,
    open_s: Object.fromEntries(r.open.map((o) => [rel(o.file), o.seconds])),
    file_mb: Object.fromEntries(r.open.map((o) => [rel(o.file), mb(o.bytes)])),
    fp32_mb: mb(fp32Bytes),
    rss_over_fp32: fp32Bytes && r.mode !== 'merge' ? (r.peak_rss_mb * 1e6 * 1.048576) / fp32Bytes : null,
  };
};
// Each ratio takes the best of a mode's runs (expert 0's single and AFA ran twice): on a shared
// machine the slower run measures the machine, not the engine
const best = (...keys: string[]): number | null => {
  const found = keys.map((k) => runs[k]?.step_ms).filter((x): x is number => x !== undefined);
  return found.length ? Math.min(...found) : null;
};
const singleBest = ids.map((id, i) => (i === 0 ? best(`single:${id}`, 'single:again') : best(`single:${id}`)));
const singleSum = singleBest.every((x) => x !== null) ? singleBest.reduce((s, x) => s! + x!, 0)! : null;
const afaBest = best('afa', 'afa:again');
const unetOpen = runs['single:again']?.open.find((o) => o.file.includes(`${path.sep}unet${path.sep}`));
const result = {
  machine: `${os.cpus()[0]?.model ?? 'cpu'} × ${os.cpus().length}, ${f(os.totalmem() / 2 ** 30, 0)} GiB`,
  config,
  size,
  steps,
  threads,
  experts: ids,
  checkpoint_mb: checkpoints.map((c) => mb(statSync(c).size)),
  import: importRun,
  afa_export: afaExport,
  package_mb: Object.fromEntries(graphFiles.map((g) => [rel(g), mb(bytesOf(g))])),
  modes: Object.fromEntries(Object.entries(runs).map(([k, r]) => [k, modeSummary(r)])),
  afa_over_singles: afaBest !== null && singleSum !== null ? afaBest / singleSum : null,
  afa_over_singles_first_runs: runs.afa && singleSum !== null ? runs.afa.step_ms / ids.reduce((s, id) => s + runs[`single:${id}`].step_ms, 0) : null,
  torch_over_engine: torchRun && singleBest[0] !== null ? torchRun.step_ms / singleBest[0] : null,
  torch: torchRun,
  expert_open_s: unetOpen?.seconds ?? null,
};

log('');
log(`mode            load s   ms/step   decode ms   peak RSS MB   fp32 MB of graphs   RSS/fp32`);
for (const [k, s] of Object.entries(result.modes)) {
  log(`${k.padEnd(28).slice(0, 28)} ${f(s.load_s).padStart(7)} ${f(s.step_ms, 0).padStart(9)} ${f(s.decode_ms, 0).padStart(11)} ${f(s.peak_rss_mb, 0).padStart(13)} ${f(s.fp32_mb, 0).padStart(19)} ${f(s.rss_over_fp32, 2).padStart(10)}`);
}
log(`afa_over_singles: ${f(result.afa_over_singles, 3)} (target ≤ 1.15; best run of each; first runs only: ${f(result.afa_over_singles_first_runs, 3)})`);
log(`torch_over_engine: ${f(result.torch_over_engine, 2)} (target ≥ 1.3)`);
log(`an expert's U-Net opens in ${f(result.expert_open_s)} s with the cache warm (target ≤ 10 s)`);
if (values.json) process.stdout.write(JSON.stringify(result) + '\n');
