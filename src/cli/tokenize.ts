// `npm run tokenize -- [--tokenizer DIR] "text"`: shows how CLIP tokenizes a prompt, as JSON.
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ClipTokenizer } from '../engine/tokenizer.ts';
import { UsageError, defaultModelDir, exitWithError } from './args.ts';

const USAGE = 'usage: npm run tokenize -- [--tokenizer DIR] "prompt text"';

try {
  const { values, positionals } = parseArgs({
    options: { tokenizer: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    allowPositionals: true,
  });
  if (values.help) {
    process.stdout.write(
      `${USAGE}\n\nDIR holds vocab.json and merges.txt; it defaults to $MODEL_DIR/tokenizer, else models/demo/tokenizer.\n`,
    );
    process.exit(0);
  }
  if (positionals.length === 0) throw new UsageError(`no prompt given.\n${USAGE}`);
  const dir = path.resolve(values.tokenizer ?? path.join(defaultModelDir(), 'tokenizer'));

  let tokenizer: ClipTokenizer;
  try {
    tokenizer = await ClipTokenizer.load(dir);
  } catch (err) {
    throw new UsageError(`cannot load a CLIP tokenizer from ${dir}: ${(err as Error).message}`);
  }
  const result = tokenizer.tokenize(positionals.join(' '));
  const output = {
    ids: result.ids,
    input_ids: result.inputIds,
    tokens: result.tokens,
    truncated: result.truncated,
    token_count: result.tokenCount,
    dropped_words: result.droppedWords,
  };
  process.stdout.write(JSON.stringify(output) + '\n');
} catch (err) {
  exitWithError(err);
}
