// The whole evaluation of a package: generate in every mode, score, summarise, draw the figures and
// write the report (docs/results.md and its folder docs/results/).
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../cli/args.ts';
import type { ExecutionProvider } from '../engine/onnx-session.ts';
import { encodePng, renderContributionPanel, renderGrid, type GridTile } from '../engine/render/index.ts';
import { startEnginePool } from '../engine-host/engine-pool.ts';
import { AttributeClassifier } from './classifier.ts';
import { promptSetByName, type EvalPrompt, type PromptSetName } from './prompts.ts';
import { floorAt, loadReference, REFERENCE_FILE, type Reference } from './reference.ts';
import { extractAnalysis, renderReport, type ProbeCheck, type ReportInput } from './report.ts';
import { evalModes, runMode, type ModeRun } from './run.ts';
import { scoreReading } from './scoring.ts';
import { evaluateTargets, summarizeMode, type ModeSummary, type TargetResult } from './summary.ts';

export interface EvaluationOptions {
  modelDir: string;
  promptSet: PromptSetName;
  /** The markdown report; figures and per-prompt data go to the folder of the same name without `.md`. */
  out: string;
  /** As typed, for the report. */
  command: string;
  steps?: number;
  /** Classifier-free guidance for every mode (default: the package's). */
  guidance?: number;
  /** Also write every generated image to <figures folder>/images/<mode>/<prompt id>.png (to check the readings by eye). */
  saveImages?: boolean;
  ensemble?: string;
  /** onnxruntime threads per engine (default: the cores divided among the jobs). */
  threads?: number;
  /** Engines generating at once, each in its own thread (default: one per core on the CPU, one on a GPU). */
  jobs?: number;
  executionProvider?: ExecutionProvider;
  log?: (message: string) => void;
}

export interface EvaluationResult {
  summaries: ModeSummary[];
  targets: TargetResult[];
  files: string[];
}

/**
 * The ONNX classifier on the reference's probe renders: max |Δ| from PyTorch's features (and the
 * largest |feature|), and how many of the rendered scenes it reads back completely.
 */
async function probeCheck(classifier: AttributeClassifier, reference: Reference): Promise<ProbeCheck | null> {
  if (!reference.probe) return null;
  const readings = await classifier.classify(reference.probe.images);
  let maxDiff = 0;
  let scale = 0;
  readings.forEach((r, i) => {
    const want = reference.probe!.features[i];
    for (let k = 0; k < want.length; k++) {
      maxDiff = Math.max(maxDiff, Math.abs(r.features[k] - want[k]));
      scale = Math.max(scale, Math.abs(want[k]));
    }
  });
  const scenes = reference.probe.scenes;
  const readBack = scenes ? scenes.filter((scene, i) => scoreReading(scene, readings[i].labels).full).length : null;
  return { maxDiff, scale, readBack, images: readings.length };
}

/** Prompts shown in the figures: the first two-object prompt (panel), and it with the next pair and the first single-object prompt (grid). */
function showcase(prompts: EvalPrompt[]): { panel?: EvalPrompt; grid: EvalPrompt[] } {
  const pairs = prompts.filter((p) => p.kind === 'pair');
  const single = prompts.find((p) => p.kind === 'single');
  return { panel: pairs[0], grid: [single, ...pairs.slice(0, 2)].filter((p): p is EvalPrompt => p !== undefined) };
}

const SINGLE_HEADS = ['background', 'count', 'colour', 'shape', 'size', 'position'];

/** The heads that score a prompt of this kind (pairs: background, count and the per-half heads). */
function relevantLabels(labels: Record<string, string>, kind: EvalPrompt['kind']): Record<string, string> {
  const keep = (head: string) => (kind === 'single' ? SINGLE_HEADS.includes(head) : head === 'background' || head === 'count' || /^(left|right)_/.test(head));
  return Object.fromEntries(Object.entries(labels).filter(([head]) => keep(head)));
}

/** Per-prompt readings as JSON with one prompt or outcome per line (small diffs between runs). */
function perPromptJson(runs: ModeRun[], prompts: EvalPrompt[], byId: Map<number, EvalPrompt>): string {
  const round = (x: number) => Math.round(x * 1000) / 1000;
  const lines = prompts.map((p) => JSON.stringify({ id: p.id, kind: p.kind, seed: p.seed, text: p.text }));
  const modes = runs.map((run) => {
    const outcomes = run.outcomes.map((o) =>
      JSON.stringify({
        id: o.promptId,
        full: o.score.full,
        wrong: [
          ...(o.score.countRight ? [] : ['count']),
          ...Object.entries(o.score.stated)
            .filter(([a, n]) => o.score.correct[a as keyof typeof o.score.correct] < n)
            .map(([a]) => a),
        ],
        read: relevantLabels(o.labels, byId.get(o.promptId)!.kind),
        classifier_colour: o.classifierColours,
        classifier_full: o.classifierScore.full,
        colour_read: o.colourReadings.map((r) => ({
          label: r.label,
          ...(r.mean ? { mean: r.mean, distance: round(r.distance!), toward: round(r.toward!), uniform: round(r.uniform!) } : {}),
          pixels: r.pixels,
        })),
        ...(o.shares ? { shares: o.shares.map(round) } : {}),
        ...(o.routing ? { routing: o.routing.map(round) } : {}),
      }),
    );
    const head = JSON.stringify({ key: run.mode.key, label: run.mode.label, seconds: Math.round(run.seconds * 10) / 10 }).slice(0, -1);
    return `  ${head}, "outcomes": [\n    ${outcomes.join(',\n    ')}\n  ]}`;
  });
  return `{"prompts": [\n  ${lines.join(',\n  ')}\n],\n"modes": [\n${modes.join(',\n')}\n]}\n`;
}

export async function runEvaluation(options: EvaluationOptions): Promise<EvaluationResult> {
  const log = options.log ?? (() => {});
  const started = performance.now();
  const prompts = promptSetByName(options.promptSet);
  const byId = new Map(prompts.map((p) => [p.id, p]));
  const evalDir = path.join(options.modelDir, 'eval');
  const provider = options.executionProvider ?? 'cpu';
  const jobs = options.jobs ?? (provider === 'cpu' ? os.availableParallelism() : 1);
  const threads = options.threads ?? (provider === 'cpu' ? Math.max(1, Math.floor(os.availableParallelism() / jobs)) : 0);
  const classifier = await AttributeClassifier.load(evalDir, threads).catch((err: Error) => {
    throw new UsageError(`Cannot load the attribute classifier from ${evalDir} (classifier.onnx + classifier.json): ${err.message}`);
  });
  const engine = await startEnginePool({ modelDir: options.modelDir, executionProvider: provider, threads }, jobs).catch(async (err) => {
    await classifier.dispose();
    throw err;
  });
  try {
    const info = await engine.info();
    const reference = await loadReference(evalDir);
    const parity = reference ? await probeCheck(classifier, reference) : null;
    const { modes, notes } = (() => {
      try {
        return evalModes(info, options.ensemble);
      } catch (err) {
        throw new UsageError((err as Error).message);
      }
    })();
    const shown = showcase(prompts);
    const keep = new Set(options.saveImages ? prompts.map((p) => p.id) : shown.grid.map((p) => p.id));
    const steps = options.steps ?? info.defaults.steps;
    const guidance = options.guidance ?? info.defaults.guidance;
    const figuresDir = options.out.replace(/\.md$/i, '');
    log(
      `eval of ${info.name}@${info.version}: ${prompts.length} prompts (${options.promptSet} set) × ${modes.length} modes, ${steps} steps, guidance ${guidance}, ` +
        `${jobs} engine${jobs > 1 ? 's' : ''} × ${threads || 'default'} thread${threads === 1 ? '' : 's'}` +
        (reference ? '' : `; no ${REFERENCE_FILE}, so no Fréchet distance`),
    );
    if (parity && parity.maxDiff > 1e-2 * parity.scale) {
      notes.push(`the ONNX classifier's features differ from the reference's by up to ${parity.maxDiff.toExponential(1)} on its probe images: the reference may belong to another classifier`);
    }
    if (parity && parity.readBack !== null && parity.readBack < parity.images) {
      notes.push(`the classifier reads back only ${parity.readBack} of ${parity.images} rendered probe scenes`);
    }

    const runs: ModeRun[] = [];
    const summaries: ModeSummary[] = [];
    for (const [i, mode] of modes.entries()) {
      log(`[${i + 1}/${modes.length}] ${mode.label}`);
      const run = await runMode(engine, classifier, mode, prompts, { steps: options.steps, guidance: options.guidance, keepImages: keep, log, concurrency: jobs });
      if (options.saveImages) await saveImages(run, path.join(figuresDir, 'images'));
      const s = summarizeMode(run, byId, reference);
      runs.push(run);
      summaries.push(s);
      log(`  done in ${run.seconds.toFixed(0)} s: full match ${fmt(s.single.full)} single, ${fmt(s.pair.full)} two-object`);
    }
    const targets = evaluateTargets(summaries);

    const relative = (file: string) => path.relative(path.dirname(options.out), file).split(path.sep).join('/');
    await mkdir(figuresDir, { recursive: true });
    const files: string[] = [options.out];
    const titles = Object.fromEntries(info.experts.map((e) => [e.id, e.title]));
    const figures: ReportInput['figures'] = {};
    const afaRun = runs.find((r) => r.mode.request.mode === 'afa');
    const panelImage = shown.panel && afaRun?.kept.get(shown.panel.id);
    if (shown.panel && panelImage?.contributions) {
      const file = path.join(figuresDir, 'contributions.png');
      await writeFile(file, await renderContributionPanel(panelImage.image, panelImage.contributions, titles, { tileSize: 192, imageLabel: afaRun!.mode.label }));
      files.push(file);
      const c = panelImage.contributions;
      figures.panel = {
        file: relative(file),
        prompt: shown.panel.text,
        shares: c.experts.map((e, i) => `${titles[e] ?? e} ${(c.shares[i] * 100).toFixed(0)}%`).join(', '),
      };
    }
    if (shown.grid.length) {
      const tiles: GridTile[] = [];
      for (const prompt of shown.grid) {
        for (const run of runs) tiles.push({ image: run.kept.get(prompt.id)!.image, label: run.mode.label });
      }
      const file = path.join(figuresDir, 'compare.png');
      await writeFile(file, await renderGrid(tiles, { columns: runs.length, tileSize: 128 }));
      files.push(file);
      figures.grid = { file: relative(file), prompts: shown.grid.map((p) => p.text), modes: runs.map((r) => r.mode.label) };
    }
    const perPromptFile = path.join(figuresDir, 'per-prompt.json');
    await writeFile(perPromptFile, perPromptJson(runs, prompts, byId));
    files.push(perPromptFile);

    let analysis: string | null = null;
    try {
      analysis = extractAnalysis(await readFile(options.out, 'utf8'));
    } catch {
      // no earlier report
    }
    const single = prompts.filter((p) => p.kind === 'single').length;
    const report = renderReport({
      packageLabel: `${info.name}@${info.version}`,
      date: new Date().toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC'),
      command: options.command,
      promptSet: { name: options.promptSet, single, pair: prompts.length - single },
      generation: { steps, guidance, scheduler: info.defaults.scheduler, width: classifier.meta.size, height: classifier.meta.size },
      machine: {
        cpu: os.cpus()[0]?.model.trim() ?? 'unknown CPU',
        cores: os.cpus().length,
        node: process.versions.node,
        threads,
        jobs,
        provider,
      },
      totalSeconds: (performance.now() - started) / 1000,
      summaries,
      targets,
      reference: reference
        ? {
            status: 'ok',
            file: relative(reference.file),
            weights: reference.weights,
            floor: {
              single: floorAt(reference, 'single', single),
              pair: floorAt(reference, 'pair', prompts.length - single),
            },
            parity,
          }
        : { status: 'missing', file: relative(path.join(evalDir, REFERENCE_FILE)) },
      classifierAccuracy: classifier.meta.accuracyOnRenders,
      notes,
      figures,
      perPromptFile: relative(perPromptFile),
      analysis,
    });
    await writeFile(options.out, report);
    return { summaries, targets, files };
  } finally {
    await classifier.dispose();
    await engine.dispose();
  }
}

/** Every kept image of a mode as <dir>/<mode key>/<prompt id>.png (the key's ':' becomes '-'). */
async function saveImages(run: ModeRun, dir: string): Promise<void> {
  const folder = path.join(dir, run.mode.key.replace(/[^a-z0-9_-]/gi, '-'));
  await mkdir(folder, { recursive: true });
  for (const [id, image] of run.kept) await writeFile(path.join(folder, `${String(id).padStart(3, '0')}.png`), await encodePng(image.image));
}

function fmt(x: number | null): string {
  return x === null ? '–' : `${(x * 100).toFixed(1)}%`;
}
