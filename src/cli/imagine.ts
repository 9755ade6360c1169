// `npm run imagine -- "<prompt>" [options]`: the main job on the embedded default (models/demo).
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { isEnsembleMode, MODES, SCHEDULER_NAMES, type GenerateRequest, type GenerateResult, type Mode, type SchedulerName } from '../engine/api.ts';
import { MODE_LABELS } from '../engine/labels.ts';
import { Engine } from '../engine/pipeline.ts';
import { encodePng, loadRgbImage, renderContributionPanel, renderGrid } from '../engine/render/index.ts';
import { defaultModelDir, exitWithError, parseNumber, UsageError } from './args.ts';

const USAGE = `usage: npm run imagine -- "<prompt>" [--model-dir DIR] [--ensemble ID | --experts a,b[,c] --mode single|average|merge|fuse|afa [--weights w1,w2,…]]
       [--seed N] [--steps N] [--guidance F] [--scheduler ${SCHEDULER_NAMES.join('|')}] [--karras] [--negative TEXT]
       [--count N] [--width N --height N] [--image FILE [--strength F]] [--contributions] [--compare] [--prompts FILE] [--out DIR] [--json]
  --image starts from a picture (image-to-image; scaled and centre-cropped to the size drawn);
  --strength in (0, 1] is how much of it is redrawn (default 0.8).`;

const { values, positionals } = (() => {
  try {
    return parseArgs({
      allowPositionals: true,
      options: {
        'model-dir': { type: 'string' },
        ensemble: { type: 'string' },
        experts: { type: 'string' },
        mode: { type: 'string' },
        weights: { type: 'string' },
        seed: { type: 'string' },
        steps: { type: 'string' },
        guidance: { type: 'string' },
        scheduler: { type: 'string' },
        karras: { type: 'boolean' },
        negative: { type: 'string' },
        count: { type: 'string' },
        width: { type: 'string' },
        height: { type: 'string' },
        image: { type: 'string' },
        strength: { type: 'string' },
        contributions: { type: 'boolean' },
        compare: { type: 'boolean' },
        prompts: { type: 'string' },
        out: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    exitWithError(err);
  }
})();

function slug(text: string): string {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 48) || 'image';
}

function log(message: string): void {
  process.stderr.write(message + '\n');
}

async function main(): Promise<void> {
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  let prompts: string[];
  if (values.prompts) {
    let text: string;
    try {
      text = await readFile(values.prompts, 'utf8');
    } catch {
      throw new UsageError(`Cannot read the prompts file ${values.prompts}.`);
    }
    prompts = text.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
    if (prompts.length === 0) throw new UsageError(`The prompts file ${values.prompts} has no prompts.`);
  } else {
    if (positionals.length === 0) throw new UsageError(`Give a prompt.\n${USAGE}`);
    prompts = [positionals.join(' ')];
  }

  const engine = await Engine.load(values['model-dir'] ?? defaultModelDir(), {
    executionProvider: (process.env.EXECUTION_PROVIDER as 'cpu' | 'cuda' | undefined) ?? 'cpu',
  });
  const info = engine.info();
  const experts = values.experts ? values.experts.split(/[,+]/).map((s) => s.trim()).filter(Boolean) : undefined;
  if (values.mode !== undefined && !MODES.includes(values.mode as Mode)) {
    throw new UsageError(`--mode must be one of ${MODES.join(', ')} (got "${values.mode}").`);
  }
  let mode = values.mode as Mode | undefined;
  if (!mode) {
    // An ensemble runs in the mode of its method (afa: trained, fuse: training-free).
    if (values.ensemble) mode = info.ensembles.find((e) => e.id === values.ensemble)?.method ?? 'afa';
    else if (experts && experts.length === 1) mode = 'single';
    else if (experts) mode = 'average';
    else mode = info.ensembles[0]?.method ?? 'single';
  }
  // Without --ensemble or --experts, mode afa / fuse takes the package's first ensemble of that method.
  const ensemble = values.ensemble ?? (isEnsembleMode(mode) && !experts ? info.ensembles.find((e) => e.method === mode)?.id : undefined);
  const chosenExperts = experts ?? (mode === 'single' ? [info.experts[0].id] : undefined);
  if (values.scheduler && !SCHEDULER_NAMES.includes(values.scheduler as SchedulerName)) {
    throw new UsageError(`--scheduler must be one of ${SCHEDULER_NAMES.join(', ')} (got "${values.scheduler}").`);
  }
  const seed = parseNumber('seed', values.seed) ?? Math.floor(Math.random() * 2 ** 32);
  const width = parseNumber('width', values.width);
  const height = parseNumber('height', values.height);
  const strength = parseNumber('strength', values.strength);
  if (strength !== undefined && !values.image) throw new UsageError('--strength needs --image (the picture to start from).');
  let initImage: GenerateRequest['initImage'];
  if (values.image) {
    if (!info.img2img) throw new UsageError(`${info.name} has no VAE encoder, so --image (image-to-image) is not available.`);
    const w = width ?? info.defaults.width;
    const h = height ?? info.defaults.height;
    // Sizes the engine would refuse are reported by the engine, not by a failed resize.
    if ([w, h].every((n) => Number.isInteger(n) && n > 0 && n <= 4096)) {
      try {
        initImage = await loadRgbImage(values.image, w, h);
      } catch (err) {
        throw new UsageError(`Cannot read the image ${values.image}: ${(err as Error).message}`);
      }
    }
  }
  const base: Omit<GenerateRequest, 'prompt'> = {
    mode,
    ensemble,
    experts: chosenExperts,
    weights: values.weights ? values.weights.split(',').map((w) => parseNumber('weights', w)!) : undefined,
    negative: values.negative,
    seed,
    steps: parseNumber('steps', values.steps),
    guidance: parseNumber('guidance', values.guidance),
    scheduler: values.scheduler as SchedulerName | undefined,
    karras: values.karras ?? false,
    count: parseNumber('count', values.count),
    width,
    height,
    contributions: values.contributions ?? false,
    ...(initImage ? { initImage, strength } : {}),
  };
  const outDir = path.resolve(values.out ?? 'out');
  await mkdir(outDir, { recursive: true });
  const display = info.display ? { displayWidth: info.display.width, displayHeight: info.display.height } : {};
  const titles = Object.fromEntries(info.experts.map((e) => [e.id, e.title]));

  const report: {
    images: { path: string; seed: number; prompt?: string }[];
    contributions: { path: string; shares: Record<string, number>; maps: string; prompt?: string }[];
    compare: { path: string; prompt?: string }[];
    warnings: string[];
    timings: GenerateResult['timings'][];
  } = { images: [], contributions: [], compare: [], warnings: [], timings: [] };

  for (const [index, prompt] of prompts.entries()) {
    const tag = prompts.length > 1 ? String(index).padStart(3, '0') + '-' : '';
    const started = Date.now();
    const result = await engine.generate(
      { ...base, prompt },
      {
        onProgress: (e) => {
          if (!values.json) process.stderr.write(`\rstep ${e.step}/${e.steps}`);
        },
      },
    );
    if (!values.json) process.stderr.write('\n');
    for (const w of result.warnings) log(`warning: ${w}`);
    report.warnings.push(...result.warnings);
    report.timings.push(result.timings);
    const withPrompt = prompts.length > 1 ? { prompt } : {};
    for (const img of result.images) {
      const name = `${tag}${slug(prompt)}-${img.seed}`;
      const file = path.join(outDir, `${name}.png`);
      await writeFile(file, await encodePng(img.image, { ...result.params, seed: img.seed }, display));
      report.images.push({ path: file, seed: img.seed, ...withPrompt });
      if (!values.json) log(`wrote ${file}`);
      if (img.contributions) {
        const panel = path.join(outDir, `${name}-contributions.png`);
        await writeFile(panel, await renderContributionPanel(img.image, img.contributions, titles));
        const mapsFile = path.join(outDir, `${name}-contributions.json`);
        const c = img.contributions;
        await writeFile(
          mapsFile,
          JSON.stringify({ experts: c.experts, width: c.width, height: c.height, weights: c.weights.map((w) => Array.from(w)) }),
        );
        report.contributions.push({
          path: panel,
          shares: Object.fromEntries(c.experts.map((e, i) => [e, c.shares[i]])),
          maps: mapsFile,
          ...withPrompt,
        });
        if (!values.json) log(`wrote ${panel} (${c.experts.map((e, i) => `${e} ${(c.shares[i] * 100).toFixed(0)}%`).join(', ')})`);
      }
    }
    if (values.compare) {
      const tiles = [];
      for (const id of result.params.experts) {
        const alone = await engine.generate({ ...base, prompt, mode: 'single', ensemble: undefined, experts: [id], count: 1, contributions: false });
        tiles.push({ image: alone.images[0].image, label: titles[id] ?? id });
      }
      // An ensemble by its title ("Trio (AFA)", "Fuse (training-free)"), as the bot's Compare shows it.
      const ensembleTitle = info.ensembles.find((e) => e.id === result.params.ensemble)?.title;
      const label = isEnsembleMode(result.params.mode)
        ? (ensembleTitle ?? `${MODE_LABELS[result.params.mode].name} ${result.params.ensemble}`)
        : MODE_LABELS[result.params.mode].name;
      tiles.push({ image: result.images[0].image, label });
      const file = path.join(outDir, `${tag}${slug(prompt)}-${seed}-compare.png`);
      await writeFile(file, await renderGrid(tiles));
      report.compare.push({ path: file, ...withPrompt });
      if (!values.json) log(`wrote ${file}`);
    }
    if (!values.json) log(`${result.images.length} image(s) in ${((Date.now() - started) / 1000).toFixed(2)} s`);
  }
  await engine.dispose();
  if (values.json) process.stdout.write(JSON.stringify(report) + '\n');
}

main().catch(exitWithError);
