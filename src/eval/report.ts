// docs/results.md: the table, the targets with pass/miss, the figures and how the numbers were made.
// A hand-written analysis between the ANALYSIS markers survives regeneration.
import type { SetKind } from './reference.ts';
import { ATTRIBUTES, type AdherenceSummary } from './scoring.ts';
import type { ModeSummary, TargetResult } from './summary.ts';
import { FAMILY_NAMES } from './world.ts';

export const ANALYSIS_START = '<!-- analysis:start (hand-written; kept when the file is regenerated) -->';
export const ANALYSIS_END = '<!-- analysis:end -->';
const NO_ANALYSIS = '_None yet. Write here why a target is missed; `npm run eval` keeps this section._';

export interface ProbeCheck {
  maxDiff: number;
  scale: number;
  /** Probe renders whose every attribute the classifier reads right (null: scenes not recorded). */
  readBack: number | null;
  images: number;
}

export interface ReportInput {
  packageLabel: string;
  date: string;
  command: string;
  promptSet: { name: string; single: number; pair: number };
  generation: { steps: number; guidance: number; scheduler: string; width: number; height: number };
  machine: { cpu: string; cores: number; node: string; threads: number; jobs: number; provider: string };
  totalSeconds: number;
  summaries: ModeSummary[];
  targets: TargetResult[];
  reference:
    | { status: 'missing'; file: string }
    | { status: 'ok'; file: string; weights: string; floor: Partial<Record<SetKind, { n: number; frechet: number } | null>>; parity: ProbeCheck | null };
  classifierAccuracy: Record<string, number>;
  notes: string[];
  figures: {
    panel?: { file: string; prompt: string; shares: string };
    grid?: { file: string; prompts: string[]; modes: string[] };
  };
  perPromptFile: string;
  analysis?: string | null;
}

/** The hand-written analysis of an existing report (null when it has none). */
export function extractAnalysis(markdown: string): string | null {
  const start = markdown.indexOf(ANALYSIS_START);
  const end = markdown.indexOf(ANALYSIS_END);
  if (start < 0 || end < start) return null;
  const text = markdown.slice(start + ANALYSIS_START.length, end).trim();
  return text && text !== NO_ANALYSIS ? text : null;
}

export function formatPercent(x: number | null): string {
  return x === null || Number.isNaN(x) ? '–' : (x * 100).toFixed(1);
}

function formatNumber(x: number | null, digits = 3): string {
  return x === null || Number.isNaN(x) ? '–' : x.toFixed(digits);
}

/** Fréchet distances span 0.01 to 10⁴: whole numbers from 100 up. */
export function formatDistance(x: number | null): string {
  if (x === null || Number.isNaN(x)) return '–';
  return Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(2);
}

function formatMargin(t: TargetResult): string {
  if (t.pass === null || t.margin === null) return 'not measured';
  const size =
    t.unit === 'points' ? `${Math.abs(t.margin).toFixed(1)} points` : t.unit === 'objects' ? `${Math.abs(t.margin)} object${Math.abs(t.margin) === 1 ? '' : 's'}` : Math.abs(t.margin).toFixed(3);
  if (t.pass && t.unit === 'objects') return 'pass';
  return t.pass ? `pass (by ${size})` : `**miss** (by ${size})`;
}

/** Colour and full match with the classifier's colour head (as before) and with the strict reading, side by side. */
function colourComparison(summaries: ModeSummary[]): string[] {
  const header = [
    'mode',
    'single colour: classifier',
    'strict',
    'single full: classifier',
    '**strict**',
    'two-object colour: classifier',
    'strict',
    'two-object full: classifier',
    '**strict**',
    'objects mixed / unclear',
  ];
  const rows = summaries.map((s) => [
    s.label,
    formatPercent(s.classifierSingle.attributes.colour),
    formatPercent(s.single.attributes.colour),
    formatPercent(s.classifierSingle.full),
    `**${formatPercent(s.single.full)}**`,
    formatPercent(s.classifierPair.attributes.colour),
    formatPercent(s.pair.attributes.colour),
    formatPercent(s.classifierPair.full),
    `**${formatPercent(s.pair.full)}**`,
    `${s.offColour.mixed} / ${s.offColour.unclear} of ${s.offColour.objects}`,
  ]);
  return [
    '### Colour read by the classifier and read strictly',
    '',
    'The same images scored two ways: with the attribute classifier\'s colour heads (the reading of earlier reports, which ' +
      'counts orange for yellow, blue for purple and orange-red for red as right) and with the strict pixel reading used in ' +
      'the tables above. "Mixed": an object not of one colour (e.g. a purple-grey centre in a red circle); "unclear": its mean ' +
      'colour lies between two palette colours.',
    '',
    `| ${header.join(' | ')} |`,
    `|${header.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`,
    ...rows.map((r) => `| ${r.join(' | ')} |`),
    '',
  ];
}

function adherenceTable(summaries: ModeSummary[], kind: SetKind): string[] {
  const pick = (s: ModeSummary): AdherenceSummary => s[kind];
  const header = ['mode', ...ATTRIBUTES, ...(kind === 'pair' ? ['count'] : []), '**full match**', 'Fréchet ↓'];
  const rows = summaries.map((s) => {
    const a = pick(s);
    return [
      s.label,
      ...ATTRIBUTES.map((attr) => formatPercent(a.attributes[attr])),
      ...(kind === 'pair' ? [formatPercent(a.count)] : []),
      `**${formatPercent(a.full)}**`,
      formatDistance(s.frechet[kind]),
    ];
  });
  return [`| ${header.join(' | ')} |`, `|${header.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)];
}

export function renderReport(r: ReportInput): string {
  const out: string[] = [];
  const n = r.summaries[0];
  out.push('# Evaluation of the demo model zoo', '');
  out.push(
    `Package **${r.packageLabel}**, evaluated ${r.date} with \`${r.command}\` ` +
      `(prompt set "${r.promptSet.name}": ${r.promptSet.single} single-object and ${r.promptSet.pair} two-object prompts; ` +
      `${r.generation.steps} ${r.generation.scheduler} steps, guidance ${r.generation.guidance}, ${r.generation.width}×${r.generation.height}). ` +
      `This file is generated by \`npm run eval\`; only the analysis section is written by hand.`,
    '',
  );
  if (r.promptSet.name === 'quick') out.push('> **Quick subset**: a smoke test of the evaluation, not a measurement.', '');

  out.push('## Targets', '', '| target | measured | result |', '|---|---|---|');
  for (const t of r.targets) out.push(`| ${t.target} | ${t.measured || '–'} | ${formatMargin(t)} |`);
  out.push('');

  out.push(
    '## Prompt adherence',
    '',
    'Every prompt is generated once per mode with the same seed. Colours are read strictly from the pixels ' +
      '(`src/eval/colour.ts`): each object\'s mean CIELAB colour (the whole image, or its half of a two-object image, ' +
      'against the background of the image frame) must be nearest to the stated palette colour and clearly so (at most 0.4 ' +
      'of the way toward any other palette colour, within ΔE 50 of it), and 80% of its solid pixels must be that colour. Every other attribute is read by the ' +
      'attribute classifier (`eval/classifier.onnx`). An attribute column is the share of stated values read back ' +
      'correctly; **full match** is the share of images with every stated attribute right and the right number of objects. ' +
      'Two-object prompts are read per half (left object, right object); their position counts as right when both objects ' +
      'have their stated colour and shape in their stated half. Fréchet is the distance between the classifier features of ' +
      'the generated images and of rendered world images (an FID analogue, lower is better). Values in %.',
    '',
    `### Single-object prompts (${n?.single.n ?? 0} per mode)`,
    '',
    ...adherenceTable(r.summaries, 'single'),
    '',
    `### Two-object prompts (${n?.pair.n ?? 0} per mode, objects of different families at left and right)`,
    '',
    ...adherenceTable(r.summaries, 'pair'),
    '',
    ...colourComparison(r.summaries),
  );

  const experts = r.summaries.filter((s) => s.ownFamily);
  if (experts.length) {
    out.push('### Each expert on its own family', '', '| expert | family | prompts | shape accuracy | full match (all single-object prompts) |', '|---|---|---:|---:|---:|');
    for (const s of experts) {
      const own = s.ownFamily!;
      out.push(`| ${s.label} | ${own.family} | ${own.n} | ${formatPercent(own.shape)} | ${formatPercent(s.single.full)} |`);
    }
    out.push('');
  }

  for (const ensemble of r.summaries.filter((s) => s.routing?.mean != null)) {
    const routing = ensemble.routing!;
    out.push(
      `### Routing of ${ensemble.label}`,
      '',
      `In the two-object ${ensemble.label} images, the weight (contribution map, averaged over steps and aggregation points) that ` +
        `the expert of each object's family carries in that object's half of the image: mean **${formatNumber(routing.mean)}** ` +
        `over ${routing.n} objects${ensemble.mode === 'afa' ? ' (target ≥ 0.6)' : ''}; ${formatPercent(routing.atLeastTarget)}% of the halves reach 0.6.`,
      '',
      '| object family | objects | mean weight of its expert |',
      '|---|---:|---:|',
      ...FAMILY_NAMES.filter((f) => routing.byFamily[f]).map((f) => `| ${f} | ${routing.byFamily[f]!.n} | ${formatNumber(routing.byFamily[f]!.mean)} |`),
      '',
    );
  }

  out.push('## Figures', '');
  if (r.figures.panel) {
    out.push(
      `Contributions of a two-object prompt, "${r.figures.panel.prompt}" (${r.figures.panel.shares}):`,
      '',
      `![contribution panel](${r.figures.panel.file})`,
      '',
    );
  }
  if (r.figures.grid) {
    out.push(
      `Compare grid: one row per prompt, one column per mode (${r.figures.grid.modes.join(', ')}); prompts: ` +
        r.figures.grid.prompts.map((p) => `"${p}"`).join('; ') + '.',
      '',
      `![compare grid](${r.figures.grid.file})`,
      '',
    );
  }

  out.push('## Analysis', '', ANALYSIS_START, '', r.analysis?.trim() || NO_ANALYSIS, '', ANALYSIS_END, '');

  out.push('## How these numbers were made', '');
  out.push(
    `- Prompts (\`src/eval/prompts.ts\`): single objects cover every shape × colour, each stated with a size, a position and a ` +
      'background varied deterministically; two-object prompts put objects of two different families on the left and the ' +
      'right, six per ordered family pair in the full set. Seed of a prompt = 1000 + its index in the full set, the same in every mode.',
  );
  out.push(
    '- Modes: each expert alone, the average of their predictions, their weight-space merge (equal weights), the training-free fuse ensemble and the AFA ensemble (both with contribution maps), all through the engine (`src/engine/pipeline.ts`).',
  );
  out.push(
    '- Strict colour reading (`src/eval/colour.ts`, tested on the renderer\'s own images in `test/eval-colour.test.ts`): background = the median of the 2-px image frame; ' +
      'object pixels = CIELAB ΔE > 25 from it; solid pixels = object pixels whose 8 neighbours are object pixels (thin shapes: the half farthest from the background); ' +
      'their mean must be nearest the stated palette colour, at most 0.4 of the way toward any other (0.5 is the boundary; blue and purple are only ΔE 26 apart, red and orange 46) and within ΔE 50 of it, and 80% of them must be that colour one by one.',
  );
  if (r.reference.status === 'ok') {
    const floor = (['single', 'pair'] as const)
      .map((k) => (r.reference.status === 'ok' && r.reference.floor[k] ? `${k} ${formatDistance(r.reference.floor[k]!.frechet)} at n = ${r.reference.floor[k]!.n}` : null))
      .filter(Boolean)
      .join(', ');
    out.push(
      `- Fréchet reference: \`${r.reference.file}\` (rendered scenes, classifier weights ${r.reference.weights}). A distance on few ` +
        `images is biased upwards; rendered images themselves score ${floor || '(floor not recorded)'}.` +
        (r.reference.parity
          ? ` ONNX vs PyTorch classifier features on the ${r.reference.parity.images} probe renders: max |Δ| = ${r.reference.parity.maxDiff.toExponential(1)} (features up to ${r.reference.parity.scale.toPrecision(2)})` +
            (r.reference.parity.readBack !== null ? `; read back completely: ${r.reference.parity.readBack} of ${r.reference.parity.images}.` : '.')
          : ''),
    );
  } else {
    out.push(
      `- Fréchet distance not measured: \`${r.reference.file}\` is missing. Write it with ` +
        '`python3 -m trainer.eval_reference --classifier <run>/classifier/classifier.pt --package <package>`.',
    );
  }
  const acc = Object.entries(r.classifierAccuracy)
    .filter(([k]) => k !== 'min')
    .map(([k, v]) => `${k} ${formatPercent(v)}`)
    .join(', ');
  if (acc) out.push(`- Classifier accuracy on rendered images (from \`classifier.json\`): ${acc}.`);
  out.push(
    `- Machine: ${r.machine.cpu}, ${r.machine.cores} cores, Node ${r.machine.node}, onnxruntime ${r.machine.provider}; ` +
      `${r.machine.jobs} engine thread${r.machine.jobs > 1 ? 's' : ''} generating at once (as the bot's embedded pool), ` +
      `${r.machine.threads || 'default'} onnxruntime thread${r.machine.threads === 1 ? '' : 's'} each. Whole evaluation: ${(r.totalSeconds / 60).toFixed(1)} min; per mode: ` +
      r.summaries.map((s) => `${s.label} ${s.seconds.toFixed(0)} s`).join(', ') + '.',
  );
  for (const note of r.notes) out.push(`- Note: ${note}.`);
  out.push(`- Per-prompt readings: \`${r.perPromptFile}\`.`, '');
  return out.join('\n');
}
