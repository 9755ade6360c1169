import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { CONTEXT_LENGTH, ClipTokenizer, cleanText, decodeTokens } from '../src/engine/tokenizer.ts';

const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const clipDir = path.join(repoRoot, 'test/fixtures/golden/clip');
const golden: { bos: number; eos: number; cases: { text: string; ids: number[] }[] } = JSON.parse(
  await readFile(path.join(clipDir, 'clip_golden.json'), 'utf8'),
);
const tokenizer = await ClipTokenizer.load(clipDir);

test('BOS and EOS come from the vocabulary; padding is EOS', () => {
  assert.equal(tokenizer.bosId, golden.bos);
  assert.equal(tokenizer.eosId, golden.eos);
  assert.equal(tokenizer.padId, golden.eos);
});

for (const c of golden.cases) {
  test(`encodes ${JSON.stringify(c.text)} like CLIP`, () => {
    assert.deepEqual(tokenizer.encode(c.text), c.ids);
  });
}

test('tokenize frames the ids with BOS/EOS and pads to 77', () => {
  const result = tokenizer.tokenize('a photo of a cat');
  assert.deepEqual(result.ids, [320, 1125, 539, 320, 2368]);
  assert.deepEqual(result.tokens, ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>']);
  assert.equal(result.inputIds.length, CONTEXT_LENGTH);
  assert.deepEqual(result.inputIds.slice(0, 7), [49406, 320, 1125, 539, 320, 2368, 49407]);
  assert.ok(result.inputIds.slice(7).every((id) => id === 49407));
  assert.equal(result.truncated, false);
  assert.equal(result.tokenCount, 5);
  assert.deepEqual(result.droppedWords, []);

  const empty = tokenizer.tokenize('');
  assert.deepEqual(empty.inputIds.slice(0, 2), [49406, 49407]);
  assert.equal(empty.inputIds.length, CONTEXT_LENGTH);
});

test('exactly 75 content tokens fit; the 76th and later are cut and their words reported', () => {
  const fits = tokenizer.tokenize(Array(75).fill('cat').join(' '));
  assert.equal(fits.tokenCount, 75);
  assert.equal(fits.truncated, false);
  assert.equal(fits.inputIds[76], 49407);

  const over = tokenizer.tokenize(`${Array(74).fill('cat').join(' ')} red Blue,  supercalifragilisticexpialidocious dog`);
  assert.equal(over.truncated, true);
  assert.ok(over.tokenCount > 75);
  assert.equal(over.ids.length, over.tokenCount);
  assert.equal(over.inputIds.length, CONTEXT_LENGTH);
  assert.equal(over.inputIds[75], 736, 'the 75th content token is "red"');
  assert.equal(over.inputIds[76], 49407, 'EOS closes a truncated prompt');
  // "blue," loses both of its tokens; the long word and "dog" are cut entirely.
  assert.deepEqual(over.droppedWords, ['blue,', 'supercalifragilisticexpialidocious', 'dog']);

  const splitWord = tokenizer.tokenize(`${Array(73).fill('cat').join(' ')} supercalifragilisticexpialidocious`);
  assert.deepEqual(splitWord.droppedWords, ['supercalifragilisticexpialidocious'], 'a word cut in its middle is reported whole');
});

test('text is cleaned like CLIP: html entities, quotes, widths, whitespace, case', () => {
  assert.equal(cleanText('  A&amp;amp;B\t\n C  '), 'a&b c');
  assert.equal(cleanText('Don’t “Quote”'), 'don\'t "quote"');
  assert.equal(cleanText('ＡＢＣ　ﬁne'), 'abc fine');
  assert.equal(cleanText('cafe\u0301'), 'café');
  assert.deepEqual(tokenizer.encode('Don’t'), tokenizer.encode("don't"));
  assert.deepEqual(tokenizer.encode('<|startoftext|>cat<|endoftext|>'), [49406, 2368, 49407]);
});

test('tokens decode back to the cleaned text', () => {
  const text = 'an astronaut riding a horse on mars, 4k, café naïve 😀';
  const { tokens } = tokenizer.tokenize(text);
  assert.equal(decodeTokens(tokens).replace(/ /g, ''), cleanText(text).replace(/ /g, ''));
});

test('BPE applies the lowest-ranked merge first, with </w> on the last symbol', () => {
  const vocab: Record<string, number> = { '<|startoftext|>': 0, '<|endoftext|>': 1, a: 2, 'bc</w>': 3, 'abb</w>': 4, 'a</w>': 5 };
  const tiny = new ClipTokenizer(vocab, ['b c</w>', 'a b', 'ab b</w>']);
  // "a b" would also apply, but "b c</w>" has the lower rank.
  assert.deepEqual(tiny.tokenize('abc').tokens, ['a', 'bc</w>']);
  assert.deepEqual(tiny.tokenize('abc').ids, [2, 3]);
  assert.deepEqual(tiny.tokenize('abb').tokens, ['abb</w>']);
  assert.deepEqual(tiny.tokenize('a').ids, [5]);
  // A token missing from the vocabulary becomes the unknown token (EOS), as in Hugging Face's tokenizer.
  assert.deepEqual(tiny.tokenize('zz').ids, [1, 1]);
  assert.throws(() => new ClipTokenizer({ a: 1 }, []), /startoftext/);
});

test('load reads the pad token from special_tokens_map.json and explains missing files', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'clip-tok-'));
  try {
    await symlink(path.join(clipDir, 'vocab.json'), path.join(dir, 'vocab.json'));
    await symlink(path.join(clipDir, 'merges.txt'), path.join(dir, 'merges.txt'));
    await writeFile(path.join(dir, 'special_tokens_map.json'), JSON.stringify({ pad_token: { content: '!' } }));
    const sd2 = await ClipTokenizer.load(dir);
    assert.equal(sd2.padId, 0);
    assert.equal(sd2.tokenize('cat').inputIds[3], 0);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  await assert.rejects(ClipTokenizer.load(path.join(tmpdir(), 'no-such-tokenizer-dir')), /vocab\.json does not exist/);
});

const run = promisify(execFile);
const cliArgs = ['--import', 'tsx', path.join(repoRoot, 'src/cli/tokenize.ts')];

test('the tokenize CLI prints JSON, and a clear error for a missing folder', async () => {
  const { stdout } = await run(process.execPath, [...cliArgs, '--tokenizer', clipDir, 'A Red Circle on a BLUE background!!'], { cwd: repoRoot });
  const output = JSON.parse(stdout);
  assert.deepEqual(output.ids, golden.cases[1].ids);
  assert.equal(output.input_ids.length, 77);
  assert.equal(output.truncated, false);
  assert.equal(output.token_count, 8);
  assert.deepEqual(output.dropped_words, []);
  assert.equal(output.tokens[0], 'a</w>');

  const failure = await run(process.execPath, [...cliArgs, '--tokenizer', '/no/such/dir', 'cat'], { cwd: repoRoot }).then(
    () => assert.fail('expected a failure'),
    (err: { code: number; stderr: string }) => err,
  );
  assert.equal(failure.code, 2);
  assert.match(failure.stderr, /cannot load a CLIP tokenizer from \/no\/such\/dir/);
  assert.doesNotMatch(failure.stderr, /\n\s+at /, 'no stack trace');
});
