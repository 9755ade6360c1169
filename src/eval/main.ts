// `npm run eval [-- --model-dir DIR] [--quick | --small] [--out docs/results.md]`: the demo zoo's
// table (every mode, scored by the package's attribute classifier), targets and figures.
import path from 'node:path';
import { parseArgs } from 'node:util';
import { defaultModelDir, exitWithError, parseNumber, UsageError } from '../cli/args.ts';
import type { ExecutionProvider } from '../engine/onnx-session.ts';
import { runEvaluation } from './evaluate.ts';
import type { PromptSetName } from './prompts.ts';

const USAGE = `usage: npm run eval -- [--model-dir DIR] [--quick | --small] [--out FILE.md] [--steps N] [--guidance F] [--ensemble ID] [--jobs N] [--threads N] [--images]

  --quick   6 single-object + 2 two-object prompts (a smoke test)
  (default) 108 single-object + 36 two-object prompts (about 4.5 min for the demo's 7 rows on 2 idle CPU cores)
  --small   36 single-object + 24 two-object prompts (for a busy machine)
  --out     the report (default docs/results.md); figures go to the folder of the same name
  --guidance  classifier-free guidance for every mode (default: the package's)
  --images  also write every generated image under the figures folder (images/<mode>/<prompt id>.png)
  --jobs    engine threads generating at once (default: one per CPU core; 1 with EXECUTION_PROVIDER=cuda)
  --threads onnxruntime threads per engine (default: cores / jobs)`;

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const { values } = parseArgs({
    args,
    options: {
      'model-dir': { type: 'string' },
      quick: { type: 'boolean' },
      small: { type: 'boolean' },
      out: { type: 'string' },
      steps: { type: 'string' },
      guidance: { type: 'string' },
      images: { type: 'boolean' },
      ensemble: { type: 'string' },
      threads: { type: 'string' },
      jobs: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  if (values.quick && values.small) throw new UsageError('Give --quick or --small, not both.');
  const promptSet: PromptSetName = values.quick ? 'quick' : values.small ? 'small' : 'full';
  const steps = parseNumber('steps', values.steps);
  if (steps !== undefined && (!Number.isInteger(steps) || steps < 1)) throw new UsageError('--steps must be a positive integer.');
  const guidance = parseNumber('guidance', values.guidance);
  if (guidance !== undefined && !(guidance >= 0 && guidance <= 50)) throw new UsageError('--guidance must be between 0 and 50.');
  const threads = parseNumber('threads', values.threads);
  if (threads !== undefined && (!Number.isInteger(threads) || threads < 0)) throw new UsageError('--threads must be a whole number ≥ 0.');
  const jobs = parseNumber('jobs', values.jobs);
  if (jobs !== undefined && (!Number.isInteger(jobs) || jobs < 1)) throw new UsageError('--jobs must be a positive integer.');
  const out = path.resolve(values.out ?? 'docs/results.md');
  if (!out.toLowerCase().endsWith('.md')) throw new UsageError('--out must name a .md file.');

  const result = await runEvaluation({
    modelDir: values['model-dir'] ? path.resolve(values['model-dir']) : defaultModelDir(),
    promptSet,
    out,
    command: ['npm run eval', ...(args.length ? ['--', ...args] : [])].join(' '),
    steps,
    guidance,
    saveImages: values.images ?? false,
    ensemble: values.ensemble,
    threads,
    jobs,
    executionProvider: (process.env.EXECUTION_PROVIDER as ExecutionProvider | undefined) ?? 'cpu',
    log: (message) => process.stderr.write(message + '\n'),
  });
  for (const t of result.targets) {
    const verdict = t.pass === null ? 'not measured' : t.pass ? 'pass' : 'MISS';
    process.stderr.write(`${verdict.padEnd(12)} ${t.target}${t.measured ? `: ${t.measured}` : ''}\n`);
  }
  process.stdout.write(result.files.join('\n') + '\n');
}

main().catch(exitWithError);
