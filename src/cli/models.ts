// `npm run models`: lists a package's experts and ensembles with what each is good at.
import { parseArgs } from 'node:util';
import { ModelPackage } from '../engine/model-package.ts';
import { defaultModelDir, exitWithError } from './args.ts';

try {
  const { values } = parseArgs({ options: { 'model-dir': { type: 'string' }, json: { type: 'boolean' } } });
  const pkg = await ModelPackage.load(values['model-dir'] ?? defaultModelDir());
  const info = pkg.info();
  if (values.json) {
    process.stdout.write(JSON.stringify(info, null, 2) + '\n');
  } else {
    const lines = [`${info.name} ${info.version}${info.description ? ` — ${info.description}` : ''}`, '', 'Experts (mode single, average, merge):'];
    for (const e of info.experts) lines.push(`  ${e.id.padEnd(14)} ${e.title}${e.description ? ` — ${e.description}` : ''}`);
    lines.push('', 'Ensembles (mode afa: trained; fuse: training-free):');
    if (info.ensembles.length === 0) lines.push('  (none)');
    for (const e of info.ensembles) {
      lines.push(`  ${e.id.padEnd(14)} ${e.method.padEnd(5)} ${e.title} [${e.experts.join(' + ')}]${e.subsets ? ' (any subset)' : ''}${e.description ? ` — ${e.description}` : ''}`);
    }
    const d = info.defaults;
    lines.push('', `Defaults: ${d.steps} steps, guidance ${d.guidance}, ${d.scheduler}, ${d.width}x${d.height}`);
    process.stdout.write(lines.join('\n') + '\n');
  }
} catch (err) {
  exitWithError(err);
}
